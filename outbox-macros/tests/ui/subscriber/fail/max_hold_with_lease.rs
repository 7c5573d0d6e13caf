use outbox_core::subscriber;

// `max_hold` bounds how long a `Transaction` claim holds its transaction
// open: a `Lease` claim holds none.
#[subscriber("orders", claim_mode = Lease, max_hold = "5s")]
async fn lease(order_id: i64) {
    let _ = order_id;
}

// In either order, and through the enum.
#[subscriber("orders", max_hold = "1s", claim_mode = outbox_core::ClaimMode::Lease)]
async fn lease_path(order_id: i64) {
    let _ = order_id;
}

// Reported along with a wrong `max_hold` value.
#[subscriber("orders", claim_mode = Lease, max_hold = 5)]
async fn lease_and_bad_value(order_id: i64) {
    let _ = order_id;
}

// Not reported when `claim_mode` itself is wrong: that error says it all.
#[subscriber("orders", claim_mode = "Lease", max_hold = "5s")]
async fn claim_mode_wrong(order_id: i64) {
    let _ = order_id;
}

fn main() {}
