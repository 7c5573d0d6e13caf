// The old spellings of the duration options still compile (each with one
// deprecation warning: `fail/deprecated_options.rs` shows them under
// `#![deny(deprecated)]`) and set the same values as the new ones.
use outbox_core::subscriber;

#[subscriber(
    "orders",
    lease_ttl_secs = 2.5,
    min_fetch_interval_ms = 500,
    max_fetch_interval_ms = 5_000
)]
async fn old(order_id: i64) {
    let _ = order_id;
}

#[subscriber(
    "orders",
    lease_ttl = "2500ms",
    min_fetch_interval = "500ms",
    max_fetch_interval = "5s"
)]
async fn new(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", lease_ttl_secs = 30)]
async fn integer_lease(order_id: i64) {
    let _ = order_id;
}

fn main() {
    for route in [
        outbox_core::IntoRoute::into_route(old {}),
        outbox_core::IntoRoute::into_route(new {}),
    ] {
        let debug = format!("{route:?}");
        for expected in [
            "lease_ttl: 2.5s,",
            "min_fetch_interval: 500ms,",
            "max_fetch_interval: 5s,",
        ] {
            assert!(debug.contains(expected), "{expected} not in {debug}");
        }
    }
    let debug = format!("{:?}", outbox_core::IntoRoute::into_route(integer_lease {}));
    assert!(debug.contains("lease_ttl: 30s,"), "{debug}");
}
