//! The rules a `#[subscriber]` fn and its arguments must follow. Every
//! violation is reported at the offending tokens; nothing here stops at the
//! first one.

use std::collections::HashSet;

use proc_macro2::Span;
use quote::ToTokens;
use syn::{FnArg, ItemFn, Safety, Type};

use crate::ctxt::Ctxt;
use crate::parse::{SubscriberArgs, is_attr};
use crate::symbol::{MAX_QUEUE_CHARS, PUBLISH_TO, SUBSCRIBER};

/// The fn's other attributes: a `#[publish_to]` below `#[subscriber]` (it
/// would expand after us and its target would be lost), a second
/// `#[subscriber]`.
pub(crate) fn attrs(func: &ItemFn, cx: &Ctxt) {
    for attr in &func.attrs {
        if is_attr(attr, PUBLISH_TO) {
            cx.error_spanned_by(
                attr,
                "place `#[publish_to]` above `#[subscriber]`: attributes expand top-down, and \
                 `#[publish_to]` hands its target to the `#[subscriber]` below it",
            );
        } else if is_attr(attr, SUBSCRIBER) {
            cx.error_spanned_by(
                attr,
                "a fn takes one `#[subscriber]`; to consume several queues, list them: \
                 `#[subscriber([\"orders\", \"refunds\"])]`",
            );
        }
    }
}

/// Signature rules: an `async fn`, free (no `self`), not generic, no
/// variadics, no `const`/`unsafe`/`extern`.
pub(crate) fn signature(func: &ItemFn, cx: &Ctxt) {
    let sig = &func.sig;
    let name = &sig.ident;
    if let Some(c) = &sig.constness {
        cx.error_spanned_by(c, "`#[subscriber]` does not support `const fn`");
    }
    if let Safety::Unsafe(u) = &sig.safety {
        cx.error_spanned_by(
            u,
            "`#[subscriber]` does not support `unsafe fn`: keep the `unsafe` block inside the handler",
        );
    }
    if let Some(abi) = &sig.abi {
        cx.error_spanned_by(abi, "`#[subscriber]` does not support `extern` fns");
    }
    if sig.asyncness.is_none() {
        cx.error_spanned_by(
            sig.fn_token,
            format!("`#[subscriber]` requires an `async fn`: write `async fn {name}(..)`"),
        );
    }
    if !sig.generics.params.is_empty() {
        let g = &sig.generics;
        let mut tokens = g.lt_token.to_token_stream();
        g.params.to_tokens(&mut tokens);
        g.gt_token.to_tokens(&mut tokens);
        cx.error_spanned_by(
            tokens,
            "`#[subscriber]` handlers cannot be generic: the runtime needs one concrete type per \
             parameter; write a non-generic fn (it may call a generic one)",
        );
    }
    if let Some(w) = &sig.generics.where_clause {
        cx.error_spanned_by(
            w,
            "`#[subscriber]` handlers cannot have a `where` clause: write a non-generic fn",
        );
    }
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(r) => cx.error_spanned_by(
                r,
                format!(
                    "`#[subscriber]` cannot take `self`: make `{name}` a free `async fn` (outside \
                     any `impl` block) and share state with `State<S>` parameters"
                ),
            ),
            FnArg::Typed(pt) => {
                if let Type::ImplTrait(t) = &*pt.ty {
                    cx.error_spanned_by(
                        t,
                        "`impl Trait` parameters are generic; `#[subscriber]` needs a concrete type",
                    );
                }
            }
        }
    }
    if let Some(v) = &sig.variadic {
        cx.error_spanned_by(v, "`#[subscriber]` handlers cannot be variadic");
    }
}

/// Option combinations the runtime would accept but ignore: a
/// `poison_policy` on a subscriber that is not `ordered` (the policy is what
/// an ordered subscriber does with a failing head of a key; an unordered
/// one retries each row on its own, by its `retry` strategy), and a
/// `max_hold` on a `claim_mode = Lease` subscriber (it bounds how long a
/// `Transaction` claim holds its transaction open: a lease claim holds
/// none).
pub(crate) fn options(args: &SubscriberArgs, cx: &Ctxt) {
    poison_policy(args, cx);
    max_hold(args, cx);
    lease_heartbeat(args, cx);
}

/// A `lease_heartbeat` interval not shorter than the lease (the one given,
/// else the runtime's default, 60 s): the lease would expire between two
/// extensions, and the runtime refuses it when the route is built.
fn lease_heartbeat(args: &SubscriberArgs, cx: &Ctxt) {
    let Some(crate::parse::HeartbeatArg::Every(every)) = &args.lease_heartbeat else {
        return;
    };
    let as_duration = |d: &crate::parse::DurationArg| std::time::Duration::new(d.secs, d.nanos);
    let (lease, which) = match &args.lease_ttl {
        Some(l) => (as_duration(l), "`lease_ttl`"),
        None => (DEFAULT_LEASE_TTL, "the default `lease_ttl`"),
    };
    let every = (as_duration(every), every.span);
    if every.0 >= lease {
        cx.error_at(
            every.1,
            format!(
                "`lease_heartbeat` ({:?}) must be shorter than {which} ({lease:?}): a lease \
                 extended less often than it lasts expires between two extensions; the \
                 default is a third of the lease",
                every.0
            ),
        );
    }
}

/// The runtime's default `lease_ttl` (`SubscriberOptions`).
const DEFAULT_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

fn poison_policy(args: &SubscriberArgs, cx: &Ctxt) {
    let Some(poison) = &args.poison_policy_seen else {
        return;
    };
    match &args.ordered {
        None if !args.ordered_seen => cx.error_spanned_by(
            poison,
            "`poison_policy` only applies to ordered subscribers (what a key does when its \
             oldest row fails); add `ordered`: `#[subscriber(\"orders\", ordered, \
             poison_policy = DeadLetterAndContinue)]`",
        ),
        Some(on) if !on.value => cx.error_spanned_by(
            poison,
            "`poison_policy` only applies to ordered subscribers, and this one is \
             `ordered = false`: write `ordered` (or `ordered = true`), or remove `poison_policy`",
        ),
        _ => {}
    }
}

/// `max_hold` with an explicit `claim_mode = Lease`. Without `claim_mode`
/// the mode is the runtime's choice (`Transaction` for a relay), so
/// `max_hold` may apply; with a wrong `claim_mode` that error says it all.
fn max_hold(args: &SubscriberArgs, cx: &Ctxt) {
    let Some(hold) = &args.max_hold_seen else {
        return;
    };
    let Some(mode) = args.claim_mode.as_ref().and_then(|m| m.name()) else {
        return;
    };
    if mode == "Lease" {
        cx.error_spanned_by(
            hold,
            "`max_hold` only applies to `claim_mode = Transaction` (the longest a claim's \
             transaction stays open), and this subscriber is `claim_mode = Lease`, which holds \
             no transaction: remove `max_hold`, or write `claim_mode = Transaction`",
        );
    }
}

/// Queue rules: at least one, each 1..=255 characters, no duplicates.
pub(crate) fn queues(args: &SubscriberArgs, cx: &Ctxt) {
    let Some(queues) = &args.queues else {
        if !args.positional_seen {
            cx.error_at(
                Span::call_site(),
                "`#[subscriber]` needs a queue to consume: `#[subscriber(\"orders\")]`",
            );
        }
        return;
    };
    if queues.names.is_empty() {
        cx.error_spanned_by(
            &queues.tokens,
            "the queue list is empty: give at least one queue, `#[subscriber([\"orders\"])]`",
        );
    }
    let mut seen = HashSet::new();
    for q in &queues.names {
        let value = q.value();
        let n = value.chars().count();
        if n == 0 {
            cx.error_spanned_by(q, "a queue name must not be empty");
        } else if n > MAX_QUEUE_CHARS {
            cx.error_spanned_by(
                q,
                format!("a queue name must be at most {MAX_QUEUE_CHARS} characters (got {n})"),
            );
        }
        if !seen.insert(value.clone()) {
            cx.error_spanned_by(q, format!("queue {value:?} is listed twice"));
        }
    }
}
