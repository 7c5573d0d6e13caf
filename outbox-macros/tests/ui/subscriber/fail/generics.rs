use outbox_core::subscriber;

#[subscriber("orders")]
async fn handle<T: serde::de::DeserializeOwned + Send + 'static>(body: T) {
    let _ = body;
}

fn main() {}
