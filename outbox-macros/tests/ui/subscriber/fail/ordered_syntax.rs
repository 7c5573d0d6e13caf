use outbox_core::subscriber;

// Each mistake is reported at once, at its value.
#[subscriber("orders", ordered = "true")]
async fn quoted(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered = 1)]
async fn integer(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered(true))]
async fn call_syntax(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered, max_workers = 4, ordered = true)]
async fn twice(order_id: i64) {
    let _ = order_id;
}

// Other frameworks' spellings point to `ordered`.
#[subscriber("orders", fifo)]
async fn fifo(order_id: i64) {
    let _ = order_id;
}

// A flag is no queue.
#[subscriber(ordered)]
async fn no_queue(order_id: i64) {
    let _ = order_id;
}

fn main() {}
