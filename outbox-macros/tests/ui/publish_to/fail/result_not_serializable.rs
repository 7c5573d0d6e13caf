use outbox_core::{publish_to, subscriber};

struct Shipped {
    order_id: i64,
}

#[publish_to(kafka, "orders.shipped")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> Result<Option<Shipped>, std::io::Error> {
    Ok(Some(Shipped { order_id }))
}

fn main() {}
