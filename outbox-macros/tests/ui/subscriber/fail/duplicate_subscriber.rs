// A second `#[subscriber]` on one fn (here through its full path).
#[outbox_core::subscriber("orders")]
#[outbox_core::subscriber("refunds")]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
