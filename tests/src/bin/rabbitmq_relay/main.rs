//! A relay process for the crash test of `tests/tests/rabbitmq.rs`: an `App`
//! that relays the JSON `i64` rows of one outbox queue to one RabbitMQ
//! destination (key `k<value>`), until SIGTERM/SIGINT, or until it is killed.
//!
//! Configured from the environment: the variables of every relay child
//! (`tests::relay_child`: `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ`,
//! `RELAY_QUEUE`, `RELAY_DELAY_MS`, `RELAY_WORKERS`, `RELAY_LEASE_MS`, ...),
//! plus:
//!
//! | variable | meaning |
//! |---|---|
//! | `RELAY_DESTINATION` | where to relay (`queue` or `exchange/routing-key`) |
//! | `RABBITMQ_URL` | the broker (default as in `tests::rabbitmq::url`) |

use outbox_rabbitmq::RabbitBroker;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tests::relay_child::run("rabbitmq_relay", "RELAY_DESTINATION", |env| {
        Ok(RabbitBroker::new(tests::rabbitmq::url())
            .connection_name("outbox-tests-relay")
            .publish_timeout(env.lease / 2))
    })
    .await
}
