//! Per-key FIFO through Kafka: each order's events reach the topic
//! `orders.events` in the order their transactions committed, although eight
//! workers relay them in parallel.
//!
//! The handler is an **ordered** subscriber, `#[subscriber("order-events",
//! ordered, max_workers = 8)]` below `#[publish_to(kafka, "orders.events")]`:
//! it takes only the head (oldest row) of each ordering key, so one row per key
//! is in flight while different keys run in parallel; it sleeps a random 0-20
//! ms to show that this, not luck, keeps the order. Once it is live, three
//! orders publish their steps (created, paid, shipped), each in its own
//! transaction with the ordering key `order-N`, the orders interleaved; order
//! 1's "created" transaction stays open 300 ms while the other orders commit,
//! and its later steps wait for it on the key's lock. A Kafka consumer then
//! reads the topic back, prints each order's steps with its partition (the
//! ordering key is the record key), checks that every order's steps arrived
//! in order on one partition, and the app stops.
//!
//! ```sh
//! bash scripts/kafka.sh start   # a local broker, if you have none
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo KAFKA_BOOTSTRAP=localhost:9092 \
//!     cargo run -p examples --example ordered_relay
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outbox_core::{
    App, AppContext, BoxError, DlqTable, OutboxBroker, OutboxTable, PublishOptions, publish_to,
    subscriber,
};
use outbox_kafka::KafkaBroker;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::message::{Headers as _, Message as _};
use outbox_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

const QUEUE: &str = "order-events";
const TOPIC: &str = "orders.events";
const ORDERS: i64 = 3;
const STEPS: [&str; 3] = ["created", "paid", "shipped"];
/// A header on every row of this run (propagated to the Kafka record), so
/// that the reader skips the records of earlier runs.
const RUN_HEADER: &str = "x-demo-run";

/// One step of one order.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderEvent {
    order_id: i64,
    step: String,
}

#[publish_to(kafka, "orders.events")]
#[subscriber("order-events", ordered, max_workers = 8)]
async fn handle(event: OrderEvent) -> OrderEvent {
    let pause = Duration::from_millis(rand::rng().random_range(0..=20));
    tokio::time::sleep(pause).await;
    println!("handled order-{} {}", event.order_id, event.step);
    event
}

/// This run's id (the value of [`RUN_HEADER`]).
#[derive(Debug)]
struct Run(String);

/// Publishes every order's steps: order-1's "created" first, in a
/// transaction that stays open 300 ms, then all the other steps, the orders
/// side by side.
async fn publish_events(app: AppContext) -> Result<(), BoxError> {
    let outbox = app.broker().clone();
    let run = app.state::<Run>().ok_or("no Run state")?.0.clone();

    // This publish takes order-1's key lock, held until its transaction ends:
    // order-1's "paid" below waits in its publish until "created" commits,
    // draws its id only then, and so cannot commit before it (nor can
    // "shipped"). The other orders' keys are not locked: they commit
    // meanwhile. "created" has the smallest id but commits last, and the
    // ordered subscriber still delivers nothing of order-1 before it.
    let mut tx = outbox.pool().begin().await?;
    let (row, _) = publish_step(&outbox, &run, 1, "created", &mut tx).await?;
    println!("publishing order-1 created (outbox row {row}), its transaction open 300 ms");
    let slow_commit = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.commit().await?;
        println!("committed order-1 created (outbox row {row})");
        Ok::<_, sqlx::Error>(())
    });

    let mut orders = tokio::task::JoinSet::new();
    for order_id in 1..=ORDERS {
        let steps = if order_id == 1 {
            &STEPS[1..]
        } else {
            &STEPS[..]
        };
        orders.spawn(publish_order(outbox.clone(), run.clone(), order_id, steps));
    }
    while let Some(done) = orders.join_next().await {
        done??;
    }
    slow_commit.await??;
    Ok(())
}

/// Publishes `steps` of one order one after another, each in its own
/// transaction.
async fn publish_order(
    outbox: OutboxBroker,
    run: String,
    order_id: i64,
    steps: &'static [&'static str],
) -> Result<(), BoxError> {
    // A small offset per order, so that the orders' steps interleave.
    tokio::time::sleep(Duration::from_millis(3 * order_id as u64)).await;
    for step in steps {
        let mut tx = outbox.pool().begin().await?;
        let (row, waited) = publish_step(&outbox, &run, order_id, step, &mut tx).await?;
        tx.commit().await?;
        if waited >= Duration::from_millis(50) {
            println!(
                "published order-{order_id} {step} (outbox row {row}) after waiting {} ms \
                 for order-{order_id}'s key lock",
                waited.as_millis()
            );
        } else {
            println!("published order-{order_id} {step} (outbox row {row})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Publishes one step with the ordering key `order-N` in `tx`; returns its
/// row id and how long the publish took (waiting for the key lock included).
async fn publish_step(
    outbox: &OutboxBroker,
    run: &str,
    order_id: i64,
    step: &str,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
) -> Result<(i64, Duration), BoxError> {
    let event = OrderEvent {
        order_id,
        step: step.to_owned(),
    };
    let opts = PublishOptions::new()
        .key(format!("order-{order_id}"))
        .header(RUN_HEADER, run);
    let started = Instant::now();
    let row = outbox
        .publish_with(&event, QUEUE, &opts, &mut **tx)
        .await?
        .ok_or("publish returned no row id")?;
    Ok((row, started.elapsed()))
}

/// Reads the topic back until every event of this run arrived, checks each
/// order's steps, then stops the app.
async fn read_back(app: AppContext) -> Result<(), BoxError> {
    let bootstrap = bootstrap();
    tokio::spawn(async move {
        let run = app.state::<Run>().map(|r| r.0.clone()).unwrap_or_default();
        let result = tokio::task::spawn_blocking(move || consume(&bootstrap, &run)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("reading {TOPIC} back failed: {e:#}"),
            Err(e) => eprintln!("the reader panicked: {e}"),
        }
        app.shutdown();
    });
    Ok(())
}

/// One record of this run, as read back.
#[derive(Debug)]
struct Arrived {
    partition: i32,
    step: String,
}

/// A plain consumer: assigned to every partition from the beginning (no
/// consumer group, no rebalance wait). A partition is read in offset order,
/// so a key's records arrive in the order they were written.
fn consume(bootstrap: &str, run: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-demo-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(TOPIC, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let wanted = (ORDERS as usize) * STEPS.len();
    let mut seen = BTreeSet::new(); // outbox ids: at least once, so skip duplicates
    let mut by_key: BTreeMap<String, Vec<Arrived>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < wanted {
        if Instant::now() > deadline {
            bail!("only {} of {wanted} events arrived within 60 s", seen.len());
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let header = |name: &str| {
            msg.headers()?
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        if header(RUN_HEADER).as_deref() != Some(run) {
            continue;
        }
        let outbox_id = header("outbox-id").context("a record without outbox-id")?;
        if !seen.insert(outbox_id) {
            continue;
        }
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .context("a record without a key")?;
        let event: OrderEvent = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        by_key.entry(key).or_default().push(Arrived {
            partition: msg.partition(),
            step: event.step,
        });
    }
    println!("read {TOPIC} back:");
    let mut held = 0;
    for (key, events) in &by_key {
        let partition = events[0].partition;
        let steps: Vec<&str> = events.iter().map(|e| e.step.as_str()).collect();
        let one_partition = events.iter().all(|e| e.partition == partition);
        let in_order = steps == STEPS;
        println!(
            "  {key} (partition {partition}): {}{}",
            steps.join(" -> "),
            match (in_order, one_partition) {
                (true, true) => "",
                (false, _) => "  <- OUT OF ORDER",
                (true, false) => "  <- SPREAD OVER PARTITIONS",
            }
        );
        held += usize::from(in_order && one_partition);
    }
    println!("per-key order held for {held} of {ORDERS} orders");
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
    // Adds the ordering_key column to an outbox table made by an older version.
    outbox.migrate().await?;

    let kafka = KafkaBroker::new(bootstrap());
    // 3 partitions, 1 replica (the local broker is a single node): the record
    // key (the ordering key) picks the partition, so a key stays on one.
    kafka.ensure_topic(TOPIC, 3, 1).await?;

    App::new(outbox.clone())
        .state(Run(uuid::Uuid::new_v4().simple().to_string()))
        .on_startup(kafka.connect())
        .after_startup(publish_events)
        .after_startup(read_back)
        .run()
        .await?;

    let mut conn = pool.acquire().await?;
    let left = outbox
        .fetch_unprocessed(Some(QUEUE), 10, &mut conn)
        .await?
        .len();
    println!("{left} rows left in the outbox");
    Ok(())
}
