// Parameters: the body (any `DeserializeOwned`), the delivery handle, state,
// with any irrefutable pattern.
use outbox_core::{Headers, Message, State, subscriber};

#[derive(serde::Deserialize)]
struct Order {
    id: i64,
}

struct Db;

#[subscriber("orders")]
async fn handle(order: Order, msg: Message, db: State<Db>) {
    let _: &Db = &db;
    println!("{} {}", order.id, msg.id());
}

#[subscriber("patterns")]
async fn patterns(mut n: i64, State(db): State<Db>, _: Message) {
    n += 1;
    let _ = (n, db);
}

#[subscriber("none")]
async fn no_params() {}

// A type written `Headers` is the row's headers; any other map is the body.
#[subscriber("headers")]
async fn headers(
    h: outbox_core::Headers,
    body: std::collections::BTreeMap<String, String>,
    more: Headers,
) {
    let _ = (h, body, more);
}

#[subscriber("json")]
async fn json(value: serde_json::Value) {
    let _ = value;
}

fn main() {}
