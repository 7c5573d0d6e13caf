use outbox_core::subscriber;

// `exactly_once` is a number of lanes from 1 to 1024, checked at compile time.
#[subscriber("orders", exactly_once = 0)]
async fn zero(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", exactly_once = 5000)]
async fn too_many(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", exactly_once = "4")]
async fn string(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", exactly_once = -1)]
async fn negative(order_id: i64) {
    let _ = order_id;
}

fn main() {}
