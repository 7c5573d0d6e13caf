//! A relay process for the crash tests of `tests/tests/kafka.rs`: an `App`
//! that relays the JSON `i64` rows of one outbox queue to one Kafka topic
//! (key `k<value>`), until SIGTERM/SIGINT, or until it is killed.
//!
//! Configured from the environment: the variables of every relay child
//! (`tests::relay_child`: `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ`,
//! `RELAY_QUEUE`, `RELAY_DELAY_MS`, `RELAY_WORKERS`, `RELAY_LEASE_MS`, ...),
//! plus:
//!
//! | variable | meaning |
//! |---|---|
//! | `RELAY_TOPIC` | the topic to relay to |
//! | `KAFKA_BOOTSTRAP` | the Kafka bootstrap servers |
//! | `RELAY_TRANSACTIONAL` | the application id of `KafkaBroker::transactional` (exactly-once lanes; default off) |

use outbox_kafka::KafkaBroker;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tests::relay_child::run("kafka_relay", "RELAY_TOPIC", |env| {
        let kafka = KafkaBroker::new(env.var("KAFKA_BOOTSTRAP")?)
            .client_id("outbox-tests-relay")
            .message_timeout(env.lease / 2)
            .set("reconnect.backoff.max.ms", "1000");
        Ok(match std::env::var("RELAY_TRANSACTIONAL") {
            Ok(app) => kafka.transactional(app),
            Err(_) => kafka,
        })
    })
    .await
}
