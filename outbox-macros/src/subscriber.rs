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
