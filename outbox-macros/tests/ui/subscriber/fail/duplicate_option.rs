use outbox_core::subscriber;

#[subscriber("orders", max_workers = 4, name = "a", max_workers = 8)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
