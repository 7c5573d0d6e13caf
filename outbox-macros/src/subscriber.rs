//! `#[subscriber]`: parse → model → validate → expand, or fall back.

use proc_macro2::{Span, TokenStream};

use crate::ctxt::Ctxt;
use crate::model::Subscriber;
use crate::paths::Paths;
use crate::{debug, expand, fallback, parse, valid};

/// Expands `#[subscriber(args)] item`.
pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let cx = Ctxt::new();
    let mut parsed = parse::subscriber_args(args, &cx);
    let func: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            cx.error_at(
                Span::call_site(),
                "`#[subscriber]` applies to an `async fn`: `#[subscriber(\"orders\")] async fn handle(order_id: i64) {}`",
            );
            return match cx.check() {
                Err(e) => fallback::item(item, e),
                Ok(()) => item,
            };
        }
    };
    valid::queues(&parsed, &cx);
    valid::options(&parsed, &cx);
    valid::attrs(&func, &cx);
    valid::signature(&func, &cx);
    if let Err(e) = cx.check() {
        // A bad `crate = ..` is already reported; the marker uses the default.
        let paths = Paths::new(parsed.krate.take().as_ref());
        return fallback::subscriber(&func, &paths, e);
    }
    let model = Subscriber::new(&func, parsed);
    let out = expand::subscriber(&model, item);
    debug::print("subscriber", &model.ident.to_string(), &out);
    out
}

#[cfg(test)]
mod tests {
    use proc_macro2::TokenStream;
    use quote::quote;

    fn expand(args: TokenStream, item: TokenStream) -> String {
        super::expand(args, item).to_string()
    }

    #[test]
    fn keeps_the_fn_and_uses_absolute_paths() {
        let out = expand(
            quote!("orders", retry = NoRetry),
            quote!(
                async fn handle(order_id: i64) -> i64 {
                    order_id
                }
            ),
        );
        assert!(
            out.starts_with("async fn handle (order_id : i64) -> i64 { order_id }"),
            "{out}"
        );
        assert!(out.contains("struct handle { }"), "{out}");
        assert!(out.contains("inventory :: submit !"), "{out}");
        for (i, _) in out.match_indices("outbox_core") {
            assert!(out[..i].ends_with(":: "), "relative path at {i}: {out}");
        }
        for (i, _) in out.match_indices("core ::") {
            assert!(
                out[..i].ends_with(":: ") || out[..i].ends_with("outbox_"),
                "{out}"
            );
        }
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn on_error_the_fn_and_the_marker_stay() {
        let out = expand(
            quote!("", max_worker = 4),
            quote!(
                fn handle(order_id: i64) {}
            ),
        );
        assert!(out.starts_with("fn handle (order_id : i64) { }"), "{out}");
        assert!(out.contains("struct handle { }"), "{out}");
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
        assert!(!out.contains("submit"), "{out}");
    }

    #[test]
    fn durations_are_read_at_compile_time() {
        let out = expand(
            quote!(
                "orders",
                lease_ttl = "2m30s",
                min_fetch_interval = "500ms",
                max_fetch_interval = "1.5s"
            ),
            quote!(
                async fn handle() {}
            ),
        );
        for call in [
            ". lease_ttl (:: core :: time :: Duration :: new (150u64 , 0u32))",
            ". min_fetch_interval (:: core :: time :: Duration :: new (0u64 , 500000000u32))",
            ". max_fetch_interval (:: core :: time :: Duration :: new (1u64 , 500000000u32))",
        ] {
            assert_eq!(out.matches(call).count(), 1, "{call}: {out}");
        }
        assert!(!out.contains("# [deprecated"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn each_deprecated_spelling_still_works_and_warns_once() {
        let out = expand(
            quote!(
                "orders",
                lease_ttl_secs = 2.5,
                min_fetch_interval_ms = 500,
                max_fetch_interval_ms = 5_000,
                max_workers = 2
            ),
            quote!(
                async fn handle() {}
            ),
        );
        for call in [
            ". lease_ttl (:: core :: time :: Duration :: new (2u64 , 500000000u32))",
            ". min_fetch_interval (:: core :: time :: Duration :: new (0u64 , 500000000u32))",
            ". max_fetch_interval (:: core :: time :: Duration :: new (5u64 , 0u32))",
        ] {
            assert_eq!(out.matches(call).count(), 1, "{call}: {out}");
        }
        assert_eq!(out.matches("# [deprecated").count(), 3, "{out}");
        for (old, new) in [
            ("lease_ttl_secs", "lease_ttl = \\\"2500ms\\\""),
            (
                "min_fetch_interval_ms",
                "min_fetch_interval = \\\"500ms\\\"",
            ),
            ("max_fetch_interval_ms", "max_fetch_interval = \\\"5s\\\""),
        ] {
            let note = format!("`#[subscriber]` option `{old}` is deprecated: write `{new}`");
            assert_eq!(out.matches(&note).count(), 1, "{note}: {out}");
            assert_eq!(out.matches(&format!("struct {old} ;")).count(), 1, "{out}");
            assert_eq!(out.matches(&format!("let _ = {old} ;")).count(), 1, "{out}");
        }
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn on_error_no_deprecation_is_emitted() {
        let out = expand(
            quote!("orders", lease_ttl_secs = 3, max_worker = 1),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(!out.contains("deprecated"), "{out}");
    }

    #[test]
    fn ordered_and_poison_policy_reach_the_builder() {
        let out = expand(
            quote!("orders", ordered, poison_policy = DeadLetterAndContinue),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches(". ordered (true)").count(), 1, "{out}");
        assert_eq!(
            out.matches(
                ". poison_policy (:: outbox_core :: PoisonPolicy :: DeadLetterAndContinue)"
            )
            .count(),
            1,
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");

        let out = expand(
            quote!(
                "orders",
                ordered = false,
                poison_policy = outbox_core::PoisonPolicy::Block,
                ordered = true
            ),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
        assert!(
            out.contains("duplicate `#[subscriber]` argument `ordered`"),
            "{out}"
        );
        assert!(out.contains("this one is `ordered = false`"), "{out}");

        let out = expand(
            quote!(
                "orders",
                ordered = true,
                poison_policy = PoisonPolicy::Block
            ),
            quote!(
                async fn handle() {}
            ),
        );
        assert!(out.contains(". ordered (true)"), "{out}");
        assert!(
            out.contains(". poison_policy (PoisonPolicy :: Block)"),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn poison_policy_needs_ordered() {
        let out = expand(
            quote!("orders", poison_policy = Block),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(out.contains("only applies to ordered subscribers"), "{out}");
        assert!(!out.contains("submit"), "{out}");
    }

    #[test]
    fn lease_heartbeat_reaches_the_builder() {
        let handle = || {
            quote!(
                async fn handle() {}
            )
        };
        let out = expand(quote!("orders", lease_heartbeat = "250ms"), handle());
        assert!(
            out.contains(
                ". lease_heartbeat (:: core :: option :: Option :: Some (:: core :: time :: \
                 Duration :: new (0u64 , 250000000u32)))"
            ),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
        let out = expand(quote!("orders", lease_heartbeat = false), handle());
        assert!(
            out.contains(". lease_heartbeat (:: core :: option :: Option :: None)"),
            "{out}"
        );
        // Not shorter than the lease given.
        let out = expand(
            quote!("orders", lease_ttl = "1s", lease_heartbeat = "1s"),
            handle(),
        );
        assert!(
            out.contains("must be shorter than `lease_ttl` (1s)"),
            "{out}"
        );
    }

    #[test]
    fn claim_mode_and_max_hold_reach_the_builder() {
        let out = expand(
            quote!("orders", claim_mode = Transaction, max_hold = "2s"),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(
            out.matches(". claim_mode (:: outbox_core :: ClaimMode :: Transaction)")
                .count(),
            1,
            "{out}"
        );
        assert_eq!(
            out.matches(". max_hold (:: core :: time :: Duration :: new (2u64 , 0u32))")
                .count(),
            1,
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");

        // A path is used as written; `max_hold` alone is the runtime's
        // business (a relay defaults to `Transaction`).
        let out = expand(
            quote!("orders", claim_mode = outbox_core::ClaimMode::Lease),
            quote!(
                async fn handle() {}
            ),
        );
        assert!(
            out.contains(". claim_mode (outbox_core :: ClaimMode :: Lease)"),
            "{out}"
        );
        assert!(!out.contains("max_hold"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");

        let out = expand(
            quote!("orders", max_hold = "250ms", crate = "my_app::outbox"),
            quote!(
                async fn handle() {}
            ),
        );
        assert!(
            out.contains(". max_hold (:: core :: time :: Duration :: new (0u64 , 250000000u32))"),
            "{out}"
        );
        assert!(!out.contains("claim_mode"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");

        let out = expand(
            quote!("orders", claim_mode = Lease),
            quote!(
                async fn handle() {}
            ),
        );
        assert!(
            out.contains(". claim_mode (:: outbox_core :: ClaimMode :: Lease)"),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn claim_mode_and_max_hold_errors() {
        let out = expand(
            quote!("orders", claim_mode = Leased, max_hold = "2"),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
        assert!(
            out.contains("unknown `claim_mode` `Leased`; expected one of: `Lease`, `Transaction`"),
            "{out}"
        );
        assert!(out.contains("invalid duration"), "{out}");
        assert!(out.contains("for `max_hold`"), "{out}");
        assert!(!out.contains("submit"), "{out}");

        // With `Lease`, written either way (and in either order), `max_hold`
        // is an error, even when its own value is wrong.
        for args in [
            quote!("orders", claim_mode = Lease, max_hold = "5s"),
            quote!("orders", max_hold = "5s", claim_mode = ClaimMode::Lease),
        ] {
            let out = expand(
                args,
                quote!(
                    async fn handle() {}
                ),
            );
            assert_eq!(out.matches("compile_error").count(), 1, "{out}");
            assert!(
                out.contains("`max_hold` only applies to `claim_mode = Transaction`"),
                "{out}"
            );
        }
        let out = expand(
            quote!("orders", claim_mode = Lease, max_hold = 5),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
        assert!(out.contains("only applies to `claim_mode"), "{out}");

        // A wrong `claim_mode` is the only error: the combination is unknown.
        let out = expand(
            quote!("orders", claim_mode = "Lease", max_hold = "5s"),
            quote!(
                async fn handle() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(
            out.contains("remove the quotes, `claim_mode = Lease`"),
            "{out}"
        );
    }

    #[test]
    fn the_crate_override_replaces_the_root() {
        let out = expand(
            quote!("orders", crate = "my_app::outbox"),
            quote!(
                async fn handle() {}
            ),
        );
        assert!(
            out.contains("my_app :: outbox :: Route :: builder"),
            "{out}"
        );
        assert!(!out.contains(":: outbox_core"), "{out}");
    }
}
