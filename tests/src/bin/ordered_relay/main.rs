//! A relay process for the ordering chaos test (`tests/tests/ordering.rs`):
//! an `App` with one **ordered** route that relays the rows of one outbox
//! queue to one Kafka topic, the record key being the row's ordering key
//! (the handler sets none), until SIGTERM/SIGINT, or until it is killed.
//!
//! The handler passes the JSON payload through after a random sleep, and
//! fails a share of first attempts, so that heads are retried (poison
//! policy `Block`, a fast `ConstantRetry`, no attempt limit) while the
//! key's later rows wait.
//!
//! Configured from the environment, with the variables of the other relay
//! children (`tests::relay_child`, `tests::crash::RelayChild::command`):
//!
//! | variable | meaning |
//! |---|---|
//! | `OUTBOX_TEST_DATABASE_URL` | PostgreSQL (default as in `tests::database_url`) |
//! | `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ` | the outbox and dead-letter tables |
//! | `RELAY_QUEUE` | the outbox queue to relay |
//! | `RELAY_TOPIC` | the topic to relay to |
//! | `KAFKA_BOOTSTRAP` | the Kafka bootstrap servers |
//! | `RELAY_WORKERS` | `max_workers` (default 4) |
//! | `RELAY_LEASE_MS` | `lease_ttl` (default 2000); the Kafka message timeout is half of it |
//! | `ORDERED_MAX_DELAY_MS` | the handler sleeps 0..=this per row (default 5) |
//! | `ORDERED_FAIL_PERMILLE` | first attempts that fail, per mille (default 30) |
//! | `ORDERED_RETRY_MS` | the retry delay of a failed row (default 20) |
//! | `ORDERED_FETCH_BATCH` | `fetch_batch_size` (default 16) |
//! | `ORDERED_LINGER_MS` | the Kafka producer's `linger.ms` (default 1: few publishes are in flight) |
//! | `RELAY_ORDERED` | `0`: an unordered route, for comparisons (default 1) |
//! | `RUST_LOG` | the stderr log filter (default `warn`) |

use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{App, BoxError, Message, PoisonPolicy, Response, Route};
use outbox_kafka::KafkaBroker;
use rand::Rng as _;
use tests::relay_child::RelayEnv;

const BIN: &str = "ordered_relay";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    RelayEnv::init_tracing();
    let env = RelayEnv::new(BIN, 2000)?;
    let (outbox, queue) = env.outbox().await?;
    let topic = env.var("RELAY_TOPIC")?;
    let workers = usize::try_from(env.num("RELAY_WORKERS", 4)?)?;
    let lease = env.lease;
    let max_delay = env.num("ORDERED_MAX_DELAY_MS", 5)?;
    let fail_permille = env.num("ORDERED_FAIL_PERMILLE", 30)?;
    let retry = Duration::from_millis(env.num("ORDERED_RETRY_MS", 20)?);
    let fetch_batch = usize::try_from(env.num("ORDERED_FETCH_BATCH", 16)?)?;
    let ordered = env.num("RELAY_ORDERED", 1)? != 0;
    let linger = Duration::from_millis(env.num("ORDERED_LINGER_MS", 1)?);

    let kafka = KafkaBroker::new(env.var("KAFKA_BOOTSTRAP")?)
        .client_id("outbox-tests-ordered-relay")
        .message_timeout(lease / 2)
        .linger(linger)
        .set("reconnect.backoff.max.ms", "1000");
    let route = Route::builder([queue])
        .name(BIN)
        .ordered(ordered)
        .poison_policy(PoisonPolicy::Block)
        .max_workers(workers)
        .fetch_batch_size(fetch_batch)
        .lease_ttl(lease)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(retry))
        .publish_to("kafka", topic)
        .handler(move |msg: Message, _ctx| async move {
            let body: serde_json::Value = msg.decode()?;
            let (delay, fail) = {
                let mut rng = rand::rng();
                (
                    rng.random_range(0..=max_delay),
                    rng.random_range(0..1000) < fail_permille,
                )
            };
            tokio::time::sleep(Duration::from_millis(delay)).await;
            if fail && msg.attempts_count() == 0 {
                return Err(BoxError::from(format!(
                    "injected failure of row {} (key {:?})",
                    msg.id(),
                    msg.ordering_key()
                )));
            }
            // No key: the record key is the row's ordering key.
            Ok::<_, BoxError>(Response::new(body))
        });
    App::new(outbox)
        .without_discovery()
        .subscriber(route)
        .on_startup(kafka.connect())
        .run()
        .await?;
    Ok(())
}
