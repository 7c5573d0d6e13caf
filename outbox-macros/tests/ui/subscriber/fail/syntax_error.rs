use outbox_core::subscriber;

// A malformed argument is reported and the following ones are still read.
#[subscriber("orders", max_workers = 4 5, name = "", fetch_batch_size = "x")]
async fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {}
