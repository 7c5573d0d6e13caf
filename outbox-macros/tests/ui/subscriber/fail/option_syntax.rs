use outbox_core::subscriber;

#[subscriber("orders", max_workers(4), propagate_headers)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
