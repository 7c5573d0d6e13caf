use outbox_core::subscriber;

#[subscriber("orders", max_workers = 4, name = "a", max_workers = 8)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

// An option given under its current name and its deprecated spelling.
#[subscriber("orders", lease_ttl = "10s", lease_ttl_secs = 10)]
async fn both_spellings(order_id: i64) {
    let _ = order_id;
}

fn main() {}
