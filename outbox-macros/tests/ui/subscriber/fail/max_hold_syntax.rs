use outbox_core::subscriber;

// Each mistake is reported at once, at its value.
#[subscriber("orders", max_hold = "2")]
async fn no_unit(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = 2)]
async fn integer(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = "0s")]
async fn zero(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = "2 sec")]
async fn bad_unit(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = Duration::from_secs(2))]
async fn expression(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", max_hold = "2s", max_hold = "3s")]
async fn twice(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", hold_timeout = "2s")]
async fn alias(order_id: i64) {
    let _ = order_id;
}

fn main() {}
