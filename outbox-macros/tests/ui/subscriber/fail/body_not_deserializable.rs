use outbox_core::subscriber;

struct Order {
    id: i64,
}

#[subscriber("orders")]
async fn handle(order: Order) {
    let _ = order.id;
}

fn main() {}
