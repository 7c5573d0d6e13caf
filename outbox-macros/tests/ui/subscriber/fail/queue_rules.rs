use outbox_core::subscriber;

#[subscriber("")]
async fn empty(order_id: i64) {
    let _ = order_id;
}

#[subscriber(["orders", "refunds", "orders"])]
async fn duplicate(order_id: i64) {
    let _ = order_id;
}

#[subscriber("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")]
async fn too_long(order_id: i64) {
    let _ = order_id;
}

fn main() {}
