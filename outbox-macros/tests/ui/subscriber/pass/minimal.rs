// The smallest handler: one queue, a body parameter, no return value.
use outbox_core::subscriber;

#[subscriber("orders")]
async fn handle(order_id: i64) {
    println!("got order {order_id}");
}

fn main() {
    let _ = outbox_core::IntoRoute::into_route(handle {});
    let _ = handle(1);
}
