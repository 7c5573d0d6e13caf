// The seed snippet.
use outbox_core::{publish_to, subscriber};

#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

fn main() {
    let route = outbox_core::IntoRoute::into_route(handle {});
    assert_eq!(route.targets().len(), 1);
    assert_eq!(route.targets()[0].transport, "kafka");
    assert_eq!(route.targets()[0].destination, "orders.kafka");
}
