use outbox_core::subscriber;

#[subscriber("orders", ack_policy = NackOnErr)]
async fn typo(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ack_policy = "Manual")]
async fn quoted(order_id: i64) {
    let _ = order_id;
}

fn main() {}
