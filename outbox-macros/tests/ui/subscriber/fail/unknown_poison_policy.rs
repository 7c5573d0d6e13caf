use outbox_core::subscriber;

#[subscriber("orders", ordered, poison_policy = DeadLetter)]
async fn typo(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered, poison_policy = "DeadLetterAndContinue")]
async fn quoted(order_id: i64) {
    let _ = order_id;
}

// A variant of the right name through the wrong enum.
#[subscriber("orders", ordered, poison_policy = AckPolicy::Block)]
async fn wrong_enum(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered, poison_policy(Block))]
async fn call_syntax(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered, poison_policy)]
async fn no_value(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered, poison_policy = Block, poison_policy = Block)]
async fn twice(order_id: i64) {
    let _ = order_id;
}

fn main() {}
