use outbox_core::subscriber;

#[subscriber("orders")]
async fn handle(order_id: i64)
where
    i64: Send,
{
    let _ = order_id;
}

fn main() {}
