use outbox_core::subscriber;

#[subscriber("orders")]
fn handle(order_id: i64) {
    let _ = order_id;
}

fn main() {
    // The fn and the marker are still emitted: no error here.
    handle(1);
    let _ = outbox_core::IntoRoute::into_route(handle {});
}
