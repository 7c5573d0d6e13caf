// The old spellings are deprecated: each warns once, at the option, naming
// the new spelling with the same value (denied here so that the warnings
// show in the snapshot).
#![deny(deprecated)]

use outbox_core::subscriber;

#[subscriber(
    "orders",
    lease_ttl_secs = 2.5,
    min_fetch_interval_ms = 500,
    max_fetch_interval_ms = 90_000
)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

// The new spellings do not warn.
#[subscriber(
    "orders",
    lease_ttl = "2500ms",
    min_fetch_interval = "500ms",
    max_fetch_interval = "90s"
)]
async fn current(order_id: i64) {
    let _ = order_id;
}

fn main() {}
