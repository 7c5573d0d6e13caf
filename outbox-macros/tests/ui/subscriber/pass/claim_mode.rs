// `claim_mode` as a bare variant, through its enum, or through the
// `crate = "..."` facade; `max_hold` as a duration, with `Transaction` or
// alone (the runtime then chooses the mode).
mod facade {
    pub use ::outbox_core as outbox;
}

use outbox_core::{ClaimMode, IntoRoute, Route, subscriber};

#[subscriber("orders", claim_mode = Transaction, max_hold = "2s")]
async fn transaction(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode = Lease)]
async fn lease(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = "250ms", claim_mode = ClaimMode::Transaction)]
async fn through_enum(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode = outbox_core::ClaimMode::Lease)]
async fn full_path(order_id: i64) {
    let _ = order_id;
}

#[subscriber(
    "orders",
    claim_mode = Transaction,
    max_hold = "1m",
    crate = "facade::outbox"
)]
async fn through_facade(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = "3s")]
async fn hold_only(order_id: i64) {
    let _ = order_id;
}

fn options(route: Route) -> String {
    let debug = format!("{route:?}");
    let mode = debug.split("claim_mode: ").nth(1).unwrap();
    let hold = debug.split("max_hold: ").nth(1).unwrap();
    let end = |s: &str| s.split([',', ' ', '}']).next().unwrap().to_owned();
    format!("{} {}", end(mode), end(hold))
}

fn main() {
    assert_eq!(options(transaction {}.into_route()), "Transaction 2s");
    assert_eq!(options(lease {}.into_route()), "Lease 5s");
    assert_eq!(options(through_enum {}.into_route()), "Transaction 250ms");
    assert_eq!(options(full_path {}.into_route()), "Lease 5s");
    assert_eq!(options(through_facade {}.into_route()), "Transaction 60s");
    assert_eq!(options(hold_only {}.into_route()), "Lease 3s");
}
