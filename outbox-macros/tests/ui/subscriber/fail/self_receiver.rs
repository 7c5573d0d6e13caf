use outbox_core::subscriber;

struct Service;

impl Service {
    #[subscriber("orders")]
    async fn handle(&self, order_id: i64) {
        let _ = order_id;
    }
}

fn main() {}
