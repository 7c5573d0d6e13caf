// Without `#[publish_to]` any return type is accepted and dropped, except
// that a `Result`'s `Err` is the handler error.
use outbox_core::{Response, subscriber};

struct NotSerializable;

#[subscriber("a")]
async fn unit(n: i64) -> () {
    let _ = n;
}

#[subscriber("b")]
async fn value(n: i64) -> NotSerializable {
    let _ = n;
    NotSerializable
}

#[subscriber("c")]
async fn result(n: i64) -> Result<NotSerializable, std::io::Error> {
    let _ = n;
    Ok(NotSerializable)
}

#[subscriber("d")]
async fn anyhow_result(n: i64) -> anyhow::Result<()> {
    anyhow::ensure!(n > 0, "negative");
    Ok(())
}

#[subscriber("e")]
async fn option(n: i64) -> Option<i64> {
    Some(n)
}

#[subscriber("f")]
async fn response(n: i64) -> Response<i64> {
    Response::new(n)
}

fn main() {}
