use outbox_core::subscriber;

#[subscriber("orders")]
async fn handle(body: impl serde::de::DeserializeOwned) {
    let _ = body;
}

fn main() {}
