//! The tutorial's relay on RabbitMQ: orders written in Postgres transactions
//! land in the RabbitMQ queue `orders.rabbit`, at least once.
//!
//! The handler is `#[publish_to(rabbit, "orders.rabbit")]` stacked above
//! `#[subscriber("orders")]`, returning the order id: the default exchange
//! routes it to the queue `orders.rabbit` (declared durable at startup with
//! `ensure_queue`). Once the subscriber is live, three orders are published
//! (each with a domain row, in one transaction) and a fourth is rolled back.
//! A plain lapin client then reads the queue back (`basic.get`) and prints
//! what arrived (properties, headers, body), and the app stops. The example
//! exits non-zero unless every order of this run arrived.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo \
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!     cargo run -p examples --example rabbitmq_relay
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
use outbox_rabbitmq::RabbitBroker;
use outbox_rabbitmq::lapin::options::{BasicAckOptions, BasicGetOptions};
use outbox_rabbitmq::lapin::types::AMQPValue;
use outbox_rabbitmq::lapin::{Connection, ConnectionProperties};

const QUEUE: &str = "orders.rabbit";

#[publish_to(rabbit, "orders.rabbit")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

/// The correlation ids published by this run (shared with the reader; row
/// ids alone could collide with an earlier run against another database).
#[derive(Debug, Default)]
struct Published {
    wanted: Mutex<BTreeSet<String>>,
}

/// Set by the reader once every order of this run arrived.
static ALL_ARRIVED: AtomicBool = AtomicBool::new(false);

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
            .wanted
            .lock()
            .map_err(|_| "poisoned")?
            .insert(correlation_id);
        println!("published order {order_id} (outbox row {row})");
    }
    let mut tx = outbox.pool().begin().await?;
    outbox.publish(&99_i64, "orders", &mut *tx).await?;
    tx.rollback().await?;
    println!("rolled back order 99: it never reaches RabbitMQ");
    Ok(())
}

/// Reads the queue back until every row of this run arrived, prints the
/// messages, then stops the app.
async fn read_back(app: AppContext) -> Result<(), BoxError> {
    tokio::spawn(async move {
        let Some(published) = app.state::<Published>() else {
            app.shutdown();
            return;
        };
        let wanted = published
            .wanted
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        match consume(&rabbitmq_url(), &wanted).await {
            Ok(()) => ALL_ARRIVED.store(true, Ordering::SeqCst),
            Err(e) => eprintln!("reading {QUEUE} back failed: {e:#}"),
        }
        app.shutdown();
    });
    Ok(())
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    }
}

/// A plain lapin client: `basic.get` until every message of this run
/// arrived; acknowledges what it read (earlier runs' messages included).
async fn consume(url: &str, wanted: &BTreeSet<String>) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting the reader to {}", redact(url)))?;
    let channel = conn.create_channel().await?;
    let mut seen = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    println!("reading {QUEUE} back:");
    while seen.len() < wanted.len() {
        if std::time::Instant::now() > deadline {
            bail!(
                "only {} of {} messages arrived within 60 s",
                seen.len(),
                wanted.len()
            );
        }
        let Some(msg) = channel
            .basic_get(QUEUE.into(), BasicGetOptions::default())
            .await?
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let d = msg.delivery;
        d.ack(BasicAckOptions::default()).await?;
        let p = &d.properties;
        let correlation = p.correlation_id().as_ref().map(|c| c.to_string());
        let Some(c) = correlation.filter(|c| wanted.contains(c)) else {
            continue; // an earlier run's message
        };
        if !seen.insert(c.clone()) {
            continue; // a duplicate (at-least-once); consumers dedup on message_id
        }
        let headers: Vec<String> = p
            .headers()
            .as_ref()
            .map(|t| {
                t.into_iter()
                    .map(|(k, v)| format!("{k}={}", text(v)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  message_id={} correlation_id={c} content_type={} delivery_mode={} body={} headers: {}",
            p.message_id().as_ref().map_or("-", |m| m.as_str()),
            p.content_type().as_ref().map_or("-", |m| m.as_str()),
            p.delivery_mode().unwrap_or(0),
            String::from_utf8_lossy(&d.data),
            headers.join(" ")
        );
    }
    let _ = conn.close(200, "done".into()).await;
    println!(
        "relayed {} of {} orders to {QUEUE}",
        seen.len(),
        wanted.len()
    );
    Ok(())
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
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

    let rabbit = RabbitBroker::new(rabbitmq_url());
    // Without the queue, App::run would refuse to start: it checks that each
    // route's queue or exchange exists before consuming anything.
    rabbit.ensure_queue(QUEUE).await?;

    App::new(outbox.clone())
        .state(Published::default())
        .on_startup(rabbit.connect())
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
        bail!("not every order of this run arrived in {QUEUE}");
    }
    Ok(())
}
