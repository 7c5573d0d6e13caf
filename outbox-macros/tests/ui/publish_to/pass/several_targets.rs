// Stacked `#[publish_to]`s, through full paths and with other attributes in
// between; all of them reach the route, top-down.
use outbox_core::{publish_to, subscriber};

/// Documented.
#[publish_to(kafka, "orders.kafka")]
#[outbox_core::publish_to(rabbit, "orders.exchange")]
#[allow(clippy::unused_async)]
#[publish_to(r#async, "raw.ident")]
#[subscriber("orders", max_workers = 2,)]
async fn handle(order_id: i64) -> i64 {
    order_id
}

fn main() {
    let route = outbox_core::IntoRoute::into_route(handle {});
    let targets: Vec<_> = route
        .targets()
        .iter()
        .map(|t| (t.transport.as_str(), t.destination.as_str()))
        .collect();
    assert_eq!(
        targets,
        [
            ("kafka", "orders.kafka"),
            ("rabbit", "orders.exchange"),
            ("async", "raw.ident"),
        ]
    );
}
