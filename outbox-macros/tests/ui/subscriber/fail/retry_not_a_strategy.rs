use std::time::Duration;

use outbox_core::subscriber;

#[subscriber("orders", retry = Duration::from_secs(5))]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
