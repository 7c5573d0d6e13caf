use outbox_core::subscriber;

#[subscriber]
async fn bare(order_id: i64) {
    let _ = order_id;
}

#[subscriber(name = "x")]
async fn options_only(order_id: i64) {
    let _ = order_id;
}

fn main() {}
