use outbox_core::subscriber;

#[subscriber(orders)]
async fn ident(order_id: i64) {
    let _ = order_id;
}

#[subscriber(["orders", 42])]
async fn int_in_list(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", "refunds")]
async fn two_queues(order_id: i64) {
    let _ = order_id;
}

#[subscriber(name = "x", "orders")]
async fn queue_not_first(order_id: i64) {
    let _ = order_id;
}

fn main() {}
