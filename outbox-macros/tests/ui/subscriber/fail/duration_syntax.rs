use outbox_core::subscriber;

// Duration strings are read at compile time: each mistake is reported at
// its literal, saying what is accepted.
#[subscriber("orders", lease_ttl = "10", min_fetch_interval = "10 ms", max_fetch_interval = "1d")]
async fn malformed(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", lease_ttl = "0s", min_fetch_interval = "10sec", max_fetch_interval = "-1s")]
async fn zero_and_units(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", lease_ttl = "", min_fetch_interval = "2m30", max_fetch_interval = "1.s")]
async fn incomplete(order_id: i64) {
    let _ = order_id;
}

// Not strings at all.
#[subscriber(
    "orders",
    lease_ttl = 30,
    min_fetch_interval = 0.5,
    max_fetch_interval = std::time::Duration::from_secs(5),
)]
async fn not_strings(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", lease_ttl = -1, max_fetch_interval = "99999999999999999999999h")]
async fn out_of_range(order_id: i64) {
    let _ = order_id;
}

fn main() {}
