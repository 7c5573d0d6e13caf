use outbox_core::subscriber;

#[subscriber("orders", claim_mode = Leased)]
async fn typo(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode = "Transaction")]
async fn quoted(order_id: i64) {
    let _ = order_id;
}

// A variant name through the wrong enum.
#[subscriber("orders", claim_mode = PoisonPolicy::Lease)]
async fn wrong_enum(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode = ClaimMode::Transactional)]
async fn unknown_path(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode(Lease))]
async fn call_syntax(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode)]
async fn no_value(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", claim_mode = Lease, claim_mode = Transaction)]
async fn twice(order_id: i64) {
    let _ = order_id;
}

// Other spellings point to `claim_mode`.
#[subscriber("orders", claim = Transaction)]
async fn alias(order_id: i64) {
    let _ = order_id;
}

fn main() {}
