// A bracketed list of queues (trailing commas allowed).
use outbox_core::subscriber;

#[subscriber(["orders", "refunds", "orders.retry",])]
async fn handle(order_id: i64) {
    let _ = order_id;
}

#[subscriber(["only"])]
async fn single(order_id: i64) {
    let _ = order_id;
}

fn main() {
    let _ = outbox_core::IntoRoute::into_route(handle {});
    let _ = outbox_core::IntoRoute::into_route(single {});
}
