use outbox_core::{publish_to, subscriber};

#[subscriber("orders")]
#[publish_to(kafka, "orders.kafka")]
async fn handle(order_id: i64) -> i64 {
    order_id
}

fn main() {
    let _ = handle(1);
}
