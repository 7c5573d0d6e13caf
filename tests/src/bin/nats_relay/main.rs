//! A relay process for the crash test of `tests/tests/nats.rs`: an `App`
//! that relays the JSON `i64` rows of one outbox queue to one NATS subject
//! (JetStream, key `k<value>`), until SIGTERM/SIGINT, or until it is killed.
//!
//! Configuration, all from the environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `OUTBOX_TEST_DATABASE_URL` | PostgreSQL (default as in `tests::database_url`) |
//! | `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ` | the outbox and dead-letter tables |
//! | `RELAY_QUEUE`, `RELAY_SUBJECT` | what to relay where |
//! | `NATS_URL` | the NATS server (default `nats://127.0.0.1:4222`) |
//! | `RELAY_DELAY_MS` | handler sleep per row (default 0), to slow the stream down |
//! | `RELAY_WORKERS` | `max_workers` (default 4) |
//! | `RELAY_LEASE_MS` | `lease_ttl` (default 3000) |

use std::time::Duration;

use anyhow::Context as _;
use outbox_core::retry::ConstantRetry;
use outbox_core::{App, BoxError, DlqTable, Message, OutboxBroker, OutboxTable, Response, Route};
use outbox_nats::NatsBroker;
use sqlx::postgres::PgPoolOptions;

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("nats_relay: {name} is not set"))
}

fn num(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("nats_relay: {name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let schema = var("RELAY_SCHEMA")?;
    let table = OutboxTable::new(&var("RELAY_TABLE")?)?.schema(&schema)?;
    let dlq = DlqTable::new(&var("RELAY_DLQ")?)?.schema(&schema)?;
    let queue = var("RELAY_QUEUE")?;
    let subject = var("RELAY_SUBJECT")?;
    let url = tests::nats::url();
    let delay = Duration::from_millis(num("RELAY_DELAY_MS", 0)?);
    let workers = usize::try_from(num("RELAY_WORKERS", 4)?)?;
    let lease = Duration::from_millis(num("RELAY_LEASE_MS", 3000)?);

    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&tests::database_url())
        .await
        .context("nats_relay: connecting to PostgreSQL")?;
    let outbox = OutboxBroker::new(pool, table).dead_letter_table(dlq);
    let nats = NatsBroker::new(url)
        .client_name("outbox-tests-relay")
        .publish_timeout(lease / 2);
    let route = Route::builder([queue])
        .name("nats_relay")
        .max_workers(workers)
        .lease_ttl(lease)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(200)))
        .publish_to("nats", subject)
        .handler(move |msg: Message, _ctx| async move {
            let v: i64 = msg.decode()?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, BoxError>(Response::new(v).key(format!("k{v}")))
        });
    App::new(outbox)
        .without_discovery()
        .subscriber(route)
        .on_startup(nats.connect())
        .run()
        .await?;
    Ok(())
}
