use outbox_core::subscriber;

// Extended once per lease (or less often): the lease would expire between
// two extensions.
#[subscriber("orders", lease_ttl = "30s", lease_heartbeat = "30s")]
async fn as_long_as_the_lease(order_id: i64) {
    let _ = order_id;
}

// Measured against the default lease (60 s) when none is given.
#[subscriber("orders", lease_heartbeat = "2m")]
async fn longer_than_the_default_lease(order_id: i64) {
    let _ = order_id;
}

// `true` is the default: an interval, or `false` (off).
#[subscriber("orders", lease_heartbeat = true)]
async fn turned_on(order_id: i64) {
    let _ = order_id;
}

// A duration needs its unit.
#[subscriber("orders", lease_heartbeat = "10")]
async fn no_unit(order_id: i64) {
    let _ = order_id;
}

fn main() {}
