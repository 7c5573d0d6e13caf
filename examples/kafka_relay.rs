//! The seed tutorial's Kafka relay: orders written in Postgres transactions
//! land on the Kafka topic `orders.kafka`, at least once.
//!
//! The handler is the tutorial's: `#[publish_to(kafka, "orders.kafka")]`
//! stacked above `#[subscriber("orders")]`, returning the order id. Once the
//! subscriber is live, three orders are published (each with a domain row, in
//! one transaction) and a fourth is rolled back. A Kafka consumer then reads
//! the topic back and prints what arrived (key, headers, value), and the app
//! stops.
//!
//! ```sh
//! bash scripts/demo.sh          # starts Postgres and a local broker if needed, then runs this
//! # or, against any Kafka:
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo KAFKA_BOOTSTRAP=localhost:9092 \
//!     cargo run -p examples --example kafka_relay
//! ```

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_core::{
    App, AppContext, BoxError, DlqTable, OutboxBroker, OutboxTable, PublishOptions, publish_to,
    subscriber,
};
use outbox_kafka::KafkaBroker;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::message::{Headers as _, Message as _};
use outbox_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "orders.kafka";

#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

/// The correlation ids published by this run (shared with the reader; row
/// ids alone could collide with an earlier run against another database).
#[derive(Debug, Default)]
struct Published(Mutex<BTreeSet<String>>);

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
    println!("rolled back order 99: it never reaches Kafka");
    Ok(())
}

/// Reads the topic back until every row of this run arrived, prints the
/// records, then stops the app.
async fn read_back(app: AppContext) -> Result<(), BoxError> {
    let bootstrap = bootstrap();
    tokio::spawn(async move {
        let wanted = app
            .state::<Published>()
            .map(|p| p.0.lock().map(|g| g.clone()).unwrap_or_default())
            .unwrap_or_default();
        let result = tokio::task::spawn_blocking(move || consume(&bootstrap, &wanted)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("reading {TOPIC} back failed: {e:#}"),
            Err(e) => eprintln!("the reader panicked: {e}"),
        }
        app.shutdown();
    });
    Ok(())
}

/// A plain consumer: assigned to every partition from the beginning (no
/// consumer group, no rebalance wait); prints the records of this run.
fn consume(bootstrap: &str, wanted: &BTreeSet<String>) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-demo-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(TOPIC, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut seen = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    println!("reading {TOPIC} back ({} partitions):", partitions.len());
    while seen.len() < wanted.len() {
        if std::time::Instant::now() > deadline {
            bail!(
                "only {} of {} records arrived within 60 s",
                seen.len(),
                wanted.len()
            );
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let mut headers = Vec::new();
        let mut correlation = None;
        if let Some(hs) = msg.headers() {
            for h in hs.iter() {
                let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                if h.key == "correlation_id" {
                    correlation = Some(v.to_string());
                }
                headers.push(format!("{}={v}", h.key));
            }
        }
        let Some(c) = correlation.filter(|c| wanted.contains(c)) else {
            continue;
        };
        if !seen.insert(c) {
            continue; // a duplicate (at-least-once); consumers dedup on outbox-id
        }
        let key = msg.key().map_or_else(
            || "(none)".to_owned(),
            |k| String::from_utf8_lossy(k).into_owned(),
        );
        let value = msg
            .payload()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        println!(
            "  partition {} offset {}: key={key} value={value} headers: {}",
            msg.partition(),
            msg.offset(),
            headers.join(" ")
        );
    }
    println!(
        "relayed {} of {} orders to {TOPIC}",
        seen.len(),
        wanted.len()
    );
    Ok(())
}

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "localhost:9092".to_owned())
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

    let kafka = KafkaBroker::new(bootstrap());
    // 4 partitions, 1 replica (the local broker is a single node).
    kafka.ensure_topic(TOPIC, 4, 1).await?;

    App::new(outbox.clone())
        .state(Published::default())
        .on_startup(kafka.connect())
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
    Ok(())
}
