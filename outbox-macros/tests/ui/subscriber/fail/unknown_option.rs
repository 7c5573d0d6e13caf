use outbox_core::subscriber;

#[subscriber("orders", max_worker = 4)]
async fn typo(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", concurrency = 4)]
async fn other_framework(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", colour = "blue")]
async fn unrelated(order_id: i64) {
    let _ = order_id;
}

#[subscriber(topic = "orders")]
async fn queue_as_option(order_id: i64) {
    let _ = order_id;
}

// Typos and other spellings of the duration options point to the current
// names.
#[subscriber("orders", lease_ttl_ms = "10s", min_fetch_intervall_ms = 500, poll_interval = "1s")]
async fn durations(order_id: i64) {
    let _ = order_id;
}

fn main() {}
