// What a `#[publish_to]` handler may return, by shape.
use outbox_core::{BoxError, Response, publish_to, subscriber};

#[derive(serde::Serialize)]
struct Shipped {
    order_id: i64,
}

#[publish_to(kafka, "a")]
#[subscriber("a")]
async fn unit(n: i64) {
    let _ = n;
}

#[publish_to(kafka, "b")]
#[subscriber("b")]
async fn explicit_unit(n: i64) -> () {
    let _ = n;
}

#[publish_to(kafka, "c")]
#[subscriber("c")]
async fn value(n: i64) -> Shipped {
    Shipped { order_id: n }
}

#[publish_to(kafka, "d")]
#[subscriber("d")]
async fn result(n: i64) -> Result<Shipped, std::io::Error> {
    Ok(Shipped { order_id: n })
}

#[publish_to(kafka, "e")]
#[subscriber("e")]
async fn anyhow_result(n: i64) -> anyhow::Result<i64> {
    anyhow::ensure!(n > 0, "negative");
    Ok(n)
}

#[publish_to(kafka, "f")]
#[subscriber("f")]
async fn option(n: i64) -> Option<Shipped> {
    (n > 0).then_some(Shipped { order_id: n })
}

#[publish_to(kafka, "g")]
#[subscriber("g")]
async fn response(n: i64) -> Response<Shipped> {
    Response::new(Shipped { order_id: n }).key(n.to_string())
}

#[publish_to(kafka, "h")]
#[subscriber("h")]
async fn nested(n: i64) -> Result<Option<Response<i64>>, BoxError> {
    Ok(Some(Response::new(n)))
}

#[publish_to(kafka, "i")]
#[subscriber("i")]
async fn option_of_result(n: i64) -> Option<Result<String, BoxError>> {
    Some(Ok(n.to_string()))
}

#[publish_to(kafka, "j")]
#[subscriber("j")]
async fn unit_result(n: i64) -> Result<(), BoxError> {
    let _ = n;
    Ok(())
}

#[publish_to(kafka, "k")]
#[subscriber("k")]
async fn impl_serialize(n: i64) -> impl serde::Serialize {
    vec![n]
}

#[publish_to(kafka, "l")]
#[subscriber("l")]
async fn qualified(n: i64) -> std::result::Result<outbox_core::Response<i64>, std::io::Error> {
    Ok(outbox_core::Response::new(n))
}

fn main() {}
