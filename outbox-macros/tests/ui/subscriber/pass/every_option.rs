// Every option, in any order, with a trailing comma.
use std::time::Duration;

use outbox_core::retry::{ConstantRetry, ExponentialRetry};
use outbox_core::{AckPolicy, subscriber};

#[subscriber(
    "orders",
    name = "billing::orders",
    max_workers = 4,
    fetch_batch_size = 100,
    fetch_concurrency = 2,
    lease_ttl = "30s",
    lease_heartbeat = "10s",
    min_fetch_interval = "500ms",
    max_fetch_interval = "5s",
    max_deliveries = 20,
    terminal_flush_batch_size = 50,
    ack_policy = NackOnError,
    retry = ConstantRetry::new(Duration::from_secs(5)).max_attempts(3),
    propagate_headers = true,
    ordered = true,
    poison_policy = DeadLetterAndContinue,
    claim_mode = Transaction,
    max_hold = "2s",
    exactly_once = 4,
    crate = "::outbox_core",
)]
async fn handle(order_id: i64) {
    let _ = order_id;
}

// Compound and fractional durations, a qualified ack policy, any
// `RetryStrategy` expression.
#[subscriber(
    "refunds",
    propagate_headers = false,
    lease_ttl = "2m30s",
    lease_heartbeat = false,
    min_fetch_interval = "0.25s",
    max_fetch_interval = "1h",
    ack_policy = AckPolicy::RejectOnError,
    retry = ExponentialRetry::default(),
)]
async fn refunds(order_id: i64) {
    let _ = order_id;
}

#[subscriber("manual", ack_policy = Manual)]
async fn manual(msg: outbox_core::Message) {
    msg.ack();
}

fn main() {
    let _ = outbox_core::IntoRoute::into_route(handle {});
    let _ = outbox_core::IntoRoute::into_route(refunds {});
    let _ = outbox_core::IntoRoute::into_route(manual {});
}
