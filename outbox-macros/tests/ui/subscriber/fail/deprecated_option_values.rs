use outbox_core::subscriber;

// The deprecated spellings keep their old value kinds; a wrong one is an
// error that shows the new spelling.
#[subscriber(
    "orders",
    lease_ttl_secs = "10s",
    min_fetch_interval_ms = 2.5,
    max_fetch_interval_ms = "5000",
)]
async fn wrong_kind(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", lease_ttl_secs = 0, min_fetch_interval_ms = -5, max_fetch_interval_ms = true)]
async fn wrong_value(order_id: i64) {
    let _ = order_id;
}

fn main() {}
