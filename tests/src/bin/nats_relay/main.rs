//! A relay process for the crash test of `tests/tests/nats.rs`: an `App`
//! that relays the JSON `i64` rows of one outbox queue to one NATS subject
//! (JetStream, key `k<value>`), until SIGTERM/SIGINT, or until it is killed.
//!
//! Configured from the environment: the variables of every relay child
//! (`tests::relay_child`: `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ`,
//! `RELAY_QUEUE`, `RELAY_DELAY_MS`, `RELAY_WORKERS`, `RELAY_LEASE_MS`, ...),
//! plus:
//!
//! | variable | meaning |
//! |---|---|
//! | `RELAY_SUBJECT` | the subject to relay to |
//! | `NATS_URL` | the NATS server (default `nats://127.0.0.1:4222`) |

use outbox_nats::NatsBroker;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tests::relay_child::run("nats_relay", "RELAY_SUBJECT", |env| {
        Ok(NatsBroker::new(tests::nats::url())
            .client_name("outbox-tests-relay")
            .publish_timeout(env.lease / 2))
    })
    .await
}
