use outbox_core::subscriber;

// A poison policy is what an ordered subscriber does with a failing head of
// a key: an unordered subscriber has none.
#[subscriber("orders", poison_policy = DeadLetterAndContinue)]
async fn not_ordered(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered = false, poison_policy = Block)]
async fn ordered_false(order_id: i64) {
    let _ = order_id;
}

// Not reported when `ordered` itself is wrong: that error says it all.
#[subscriber("orders", ordered = "yes", poison_policy = Block)]
async fn ordered_wrong(order_id: i64) {
    let _ = order_id;
}

fn main() {}
