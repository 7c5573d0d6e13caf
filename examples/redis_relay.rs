//! The seed tutorial's relay, to Redis: orders written in Postgres
//! transactions land on the Redis stream `orders.redis`, at least once, in
//! the layout FastStream's Redis subscriber reads
//! (`@broker.subscriber(stream="orders.redis")`).
//!
//! The handler is the tutorial's: `#[publish_to(redis, "stream:orders.redis")]`
//! stacked above `#[subscriber("orders")]`, returning the order id. Once the
//! subscriber is live, three orders are published (each with a domain row, in
//! one transaction) and a fourth is rolled back. A plain Redis client then
//! reads the stream back (`XRANGE`), decodes FastStream's format and prints
//! what arrived (entry id, headers, body), and the app stops. The example
//! exits non-zero if not every order arrived.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run -p examples --example redis_relay
//! ```

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_core::{
    App, AppContext, BoxError, DlqTable, OutboxBroker, OutboxTable, PublishOptions, publish_to,
    subscriber,
};
use outbox_redis::RedisBroker;
use outbox_redis::faststream::{DATA_FIELD, decode};
use outbox_redis::redis;

const STREAM: &str = "orders.redis";

/// One `XRANGE` entry: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

#[publish_to(redis, "stream:orders.redis")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

/// The correlation ids published by this run (shared with the reader; row
/// ids alone could collide with an earlier run against another database).
#[derive(Debug, Default)]
struct Published {
    ids: Mutex<BTreeSet<String>>,
}

/// Whether the reader saw every order of this run (the exit status).
static ALL_ARRIVED: AtomicBool = AtomicBool::new(false);

/// Publishes orders 1..=3, each in a transaction with its domain row, and
/// rolls back a fourth one.
async fn publish_orders(app: AppContext) -> Result<(), BoxError> {
    let outbox = app.broker();
    let published = app.state::<Published>().ok_or("no Published state")?;
    for order_id in 1..=3_i64 {
        let mut tx = outbox.pool().begin().await?;
        sqlx::query(
            "INSERT INTO redis_relay_demo_orders (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
        )
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
            .ids
            .lock()
            .map_err(|_| "poisoned")?
            .insert(correlation_id);
        println!("published order {order_id} (outbox row {row})");
    }
    let mut tx = outbox.pool().begin().await?;
    outbox.publish(&99_i64, "orders", &mut *tx).await?;
    tx.rollback().await?;
    println!("rolled back order 99: it never reaches Redis");
    Ok(())
}

/// Reads the stream back until every row of this run arrived, prints the
/// entries, then stops the app.
async fn read_back(app: AppContext) -> Result<(), BoxError> {
    tokio::spawn(async move {
        if let Some(published) = app.state::<Published>() {
            let wanted = published.ids.lock().map(|g| g.clone()).unwrap_or_default();
            match read_stream(&redis_url(), &wanted).await {
                Ok(()) => ALL_ARRIVED.store(true, Ordering::SeqCst),
                Err(e) => eprintln!("reading {STREAM} back failed: {e:#}"),
            }
        }
        app.shutdown();
    });
    Ok(())
}

/// A plain Redis client: `XRANGE orders.redis - +` until every correlation
/// id of this run is there; prints those entries, decoded from FastStream's
/// binary format (the `__data__` field).
async fn read_stream(url: &str, wanted: &BTreeSet<String>) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    println!("reading {STREAM} back:");
    let mut seen = BTreeSet::new();
    loop {
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        for (id, fields) in entries {
            let Some((_, data)) = fields.iter().find(|(f, _)| f == DATA_FIELD) else {
                continue;
            };
            let Some((headers, body)) = decode(data) else {
                continue;
            };
            let correlation = headers
                .iter()
                .find(|(k, _)| k == "correlation_id")
                .map(|(_, v)| v.clone());
            let Some(c) = correlation.filter(|c| wanted.contains(c)) else {
                continue;
            };
            if !seen.insert(c) {
                continue; // a duplicate (at-least-once); consumers dedup on message_id
            }
            let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  entry {id}: body={} headers: {}",
                String::from_utf8_lossy(&body),
                headers.join(" ")
            );
        }
        if seen.len() == wanted.len() {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "only {} of {} entries arrived within 60 s",
                seen.len(),
                wanted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "relayed {} of {} orders to {STREAM}",
        seen.len(),
        wanted.len()
    );
    Ok(())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
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
    sqlx::query("CREATE TABLE IF NOT EXISTS redis_relay_demo_orders (id BIGINT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE redis_relay_demo_orders")
        .execute(&pool)
        .await?;

    // The stream is created by the first XADD.
    let redis = RedisBroker::new(redis_url());

    App::new(outbox.clone())
        .state(Published::default())
        .on_startup(redis.connect())
        .after_startup(publish_orders)
        .after_startup(read_back)
        .run()
        .await?;

    let mut conn = pool.acquire().await?;
    let left = outbox
        .fetch_unprocessed(Some("orders"), 10, &mut conn)
        .await?
        .len();
    println!("{left} rows left in the outbox");
    if !ALL_ARRIVED.load(Ordering::SeqCst) {
        bail!("not every order arrived on the Redis stream {STREAM}");
    }
    Ok(())
}
