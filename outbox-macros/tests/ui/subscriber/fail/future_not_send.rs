use std::rc::Rc;

use outbox_core::subscriber;

#[subscriber("orders")]
async fn handle(order_id: i64) {
    let shared = Rc::new(order_id);
    tokio::task::yield_now().await;
    let _ = shared;
}

fn main() {}
