// A facade crate re-exporting `outbox_core` under another path points the
// generated code there with `crate = "..."`.
mod facade {
    pub use ::outbox_core as outbox;
}

use facade::outbox::{publish_to, subscriber};

#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders", crate = "facade::outbox")]
async fn handle(order_id: i64) -> i64 {
    order_id
}

fn main() {
    let route = facade::outbox::IntoRoute::into_route(handle {});
    assert_eq!(route.targets()[0].destination, "orders.kafka");
}
