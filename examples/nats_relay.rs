//! The seed tutorial's relay, on NATS: orders written in Postgres
//! transactions land on the JetStream subject `orders.created`, at least
//! once, deduplicated by the server (`Nats-Msg-Id` = `<source>:<outbox id>`).
//!
//! The handler is the tutorial's: `#[publish_to(nats, "orders.created")]`
//! stacked above `#[subscriber("orders")]`, returning the order id. A stream
//! `OUTBOX_DEMO_ORDERS` capturing the subject is created if missing. Once the
//! subscriber is live, three orders are published (each with a domain row, in
//! one transaction) and a fourth is rolled back. A plain async-nats
//! JetStream consumer then reads the stream back and prints what arrived
//! (subject, sequence, headers, payload), and the app stops. Exits non-zero
//! if not every order arrived.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo NATS_URL=nats://127.0.0.1:4222 \
//!     cargo run -p examples --example nats_relay
//! ```

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use outbox_core::{
    App, AppContext, BoxError, DlqTable, OutboxBroker, OutboxTable, PublishOptions, publish_to,
    subscriber,
};
use outbox_nats::NatsBroker;
use outbox_nats::async_nats::jetstream::{self, consumer};

const STREAM: &str = "OUTBOX_DEMO_ORDERS";
const SUBJECT: &str = "orders.created";

#[publish_to(nats, "orders.created")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

/// The correlation ids published by this run (shared with the reader; row
/// ids alone could collide with an earlier run against another database).
#[derive(Debug, Default)]
struct Published(Mutex<BTreeSet<String>>);

/// Whether the reader saw every order of this run.
#[derive(Debug, Default)]
struct Outcome(Mutex<Option<anyhow::Result<usize>>>);

/// Publishes orders 1..=3, each in a transaction with its domain row, and
/// rolls back a fourth one.
async fn publish_orders(app: AppContext) -> Result<(), BoxError> {
    let outbox = app.broker();
    let published = app.state::<Published>().ok_or("no Published state")?;
    for order_id in 1..=3_i64 {
        let mut tx = outbox.pool().begin().await?;
        sqlx::query("INSERT INTO relay_demo_orders (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        let correlation_id = format!("order-{order_id}-{}", uuid::Uuid::new_v4().simple());
        let opts = PublishOptions::new().correlation_id(&correlation_id);
        let row = outbox
            .publish_with(&order_id, "orders", &opts, &mut *tx)
            .await?;
        tx.commit().await?;
        let row = row.ok_or("publish returned no row id")?;
        published
            .0
            .lock()
            .map_err(|_| "poisoned")?
            .insert(correlation_id);
        println!("published order {order_id} (outbox row {row})");
    }
    let mut tx = outbox.pool().begin().await?;
    outbox.publish(&99_i64, "orders", &mut *tx).await?;
    tx.rollback().await?;
    println!("rolled back order 99: it never reaches NATS");
    Ok(())
}

/// Reads the stream back until every order of this run arrived, prints the
/// messages, records the outcome, then stops the app.
async fn read_back(app: AppContext) -> Result<(), BoxError> {
    tokio::spawn(async move {
        let wanted = app
            .state::<Published>()
            .map(|p| p.0.lock().map(|g| g.clone()).unwrap_or_default())
            .unwrap_or_default();
        let result = consume(&wanted).await;
        if let Err(e) = &result {
            eprintln!("reading {STREAM} back failed: {e:#}");
        }
        if let Some(outcome) = app.state::<Outcome>()
            && let Ok(mut g) = outcome.0.lock()
        {
            *g = Some(result);
        }
        app.shutdown();
    });
    Ok(())
}

/// A plain JetStream consumer: ephemeral, from the stream's first message,
/// filtered on the subject; prints the messages of this run.
async fn consume(wanted: &BTreeSet<String>) -> anyhow::Result<usize> {
    let client = outbox_nats::async_nats::connect(nats_url()).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            filter_subject: SUBJECT.to_owned(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    println!("reading {STREAM} ({SUBJECT}) back:");
    while seen.len() < wanted.len() {
        let Ok(next) = tokio::time::timeout_at(deadline, messages.next()).await else {
            bail!(
                "only {} of {} orders arrived within 60 s",
                seen.len(),
                wanted.len()
            );
        };
        let Some(msg) = next else {
            bail!("the consumer ended");
        };
        let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
        msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut headers = Vec::new();
        let mut correlation = None;
        if let Some(hs) = &msg.headers {
            for (k, vs) in hs.iter() {
                for v in vs {
                    if k.to_string() == "correlation_id" {
                        correlation = Some(v.as_str().to_owned());
                    }
                    headers.push(format!("{k}={}", v.as_str()));
                }
            }
        }
        headers.sort();
        let Some(c) = correlation.filter(|c| wanted.contains(c)) else {
            continue; // an earlier run's order
        };
        if !seen.insert(c) {
            continue; // past the duplicate window a redelivery is stored again
        }
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
        println!(
            "  {} seq {seq}: payload={} headers: {}",
            msg.subject,
            String::from_utf8_lossy(&msg.payload),
            headers.join(" ")
        );
    }
    println!(
        "relayed {} of {} orders to {SUBJECT}",
        seen.len(),
        wanted.len()
    );
    Ok(seen.len())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,outbox_core=info".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/outbox_demo".to_owned());
    let pool = sqlx::PgPool::connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url} (set DATABASE_URL)"))?;
    let outbox = OutboxBroker::new(pool.clone(), OutboxTable::new("outbox")?)
        .dead_letter_table(DlqTable::new("outbox_dlq")?);
    outbox.migrate().await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS relay_demo_orders (id BIGINT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE relay_demo_orders")
        .execute(&pool)
        .await?;

    let nats = NatsBroker::new(nats_url());
    // File storage, 2-minute duplicate window (Nats-Msg-Id dedup).
    nats.ensure_stream(STREAM, [SUBJECT]).await?;

    let app = App::new(outbox.clone())
        .state(Published::default())
        .state(Outcome::default())
        .on_startup(nats.connect())
        .after_startup(publish_orders)
        .after_startup(read_back);
    let ctx = app.context().clone();
    app.run().await?;

    let mut conn = pool.acquire().await?;
    let left = outbox
        .fetch_unprocessed(Some("orders"), 10, &mut conn)
        .await?
        .len();
    println!("{left} rows left in the outbox");
    let outcome = ctx
        .state::<Outcome>()
        .and_then(|o| o.0.lock().ok().and_then(|mut g| g.take()));
    match outcome {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e),
        None => bail!("the reader did not finish"),
    }
}
