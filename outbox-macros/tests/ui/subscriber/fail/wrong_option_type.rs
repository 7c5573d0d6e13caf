use outbox_core::subscriber;

// Every mistake is reported at once, each at its value.
#[subscriber(
    "orders",
    max_workers = "4",
    fetch_batch_size = 2.5,
    lease_ttl = 60,
    max_deliveries = -1,
    propagate_headers = "true",
    name = handle,
    crate = outbox_core,
)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
