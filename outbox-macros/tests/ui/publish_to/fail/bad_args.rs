use outbox_core::{publish_to, subscriber};

#[publish_to(kafka)]
#[subscriber("a")]
async fn missing_destination(n: i64) -> i64 {
    n
}

#[publish_to(kafka, "")]
#[subscriber("b")]
async fn empty_destination(n: i64) -> i64 {
    n
}

#[publish_to("kafka", "orders.kafka")]
#[subscriber("c")]
async fn quoted_transport(n: i64) -> i64 {
    n
}

#[publish_to(crate::KAFKA, "orders.kafka")]
#[subscriber("d")]
async fn path_transport(n: i64) -> i64 {
    n
}

#[publish_to(kafka, "orders.kafka", "audit")]
#[subscriber("e")]
async fn extra_args(n: i64) -> i64 {
    n
}

#[publish_to]
#[subscriber("f")]
async fn no_args(n: i64) -> i64 {
    n
}

#[publish_to(kafka, orders)]
#[subscriber("g")]
async fn destination_not_a_string(n: i64) -> i64 {
    n
}

fn main() {}
