//! `#[subscriber(.., claim_mode = .., max_hold = ..)]`: the options reach
//! the macro-built `Route` exactly as the hand-written builder calls put
//! them there.
//!
//! In a binary of its own: `inventory` discovery would otherwise put these
//! handlers into `macros.rs`'s discovery test.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outbox_core::{ClaimMode, IntoRoute, Route, subscriber};

#[subscriber("macros_claim.transaction", claim_mode = Transaction, max_hold = "2s")]
async fn transaction(body: String) {
    let _ = body;
}

#[subscriber(
    "macros_claim.lease",
    claim_mode = outbox_core::ClaimMode::Lease,
    lease_ttl = "30s"
)]
async fn lease(body: String) {
    let _ = body;
}

/// `max_hold` alone: the claim mode stays the runtime's choice.
#[subscriber("macros_claim.hold_only", max_hold = "1m30s")]
async fn hold_only(body: String) {
    let _ = body;
}

/// Neither option: the defaults.
#[subscriber("macros_claim.defaults")]
async fn defaults(body: String) {
    let _ = body;
}

/// `claim_mode: .., max_hold: ..` from the route's options, as
/// `"Transaction 2s"` (the `Route` shows its options only through `Debug`).
fn options(route: &Route) -> String {
    tests::debug_fields(route, &["claim_mode", "max_hold"])
}

#[test]
fn the_options_reach_the_route() {
    assert_eq!(options(&transaction {}.into_route()), "Transaction 2s");
    assert_eq!(options(&lease {}.into_route()), "Lease 5s");
    assert_eq!(options(&hold_only {}.into_route()), "Lease 90s");
    assert_eq!(options(&defaults {}.into_route()), "Lease 5s");
}

/// The attribute builds the same options as the builder calls it documents.
#[test]
fn the_attribute_is_the_builder() {
    let by_hand = Route::builder(["macros_claim.transaction"])
        .claim_mode(ClaimMode::Transaction)
        .max_hold(Duration::from_secs(2))
        .to(|body: String| async move {
            let _ = body;
        });
    assert_eq!(options(&by_hand), "Transaction 2s");
    let subscriber = |route: &Route| {
        let debug = format!("{route:?}");
        let start = debug.find("SubscriberOptions").unwrap();
        let end = start + debug[start..].find('}').unwrap();
        debug[start..end].to_owned()
    };
    assert_eq!(
        subscriber(&transaction {}.into_route()),
        subscriber(&by_hand)
    );
}
