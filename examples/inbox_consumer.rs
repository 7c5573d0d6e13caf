//! A consuming service that processes every relayed order exactly once,
//! although Kafka delivers at least once: an [`Inbox`] records each
//! message's id in the same PostgreSQL transaction as the service's own
//! write (an invoice row).
//!
//! It reads `orders.kafka` (what `kafka_relay` relays) as the consumer group
//! `billing`, from the group's committed offsets. For each batch: BEGIN; for
//! every record, `inbox.accept(&mut *tx, id)` and, if the id is new, INSERT
//! the invoice; COMMIT; then commit the offsets to Kafka. Killed anywhere,
//! it is still correct: before the database commit nothing of the batch is
//! kept, and the batch is read again; after it, the re-read records find
//! their ids in the inbox and are skipped. The same holds for duplicates the
//! relay itself produced (a relay killed between Kafka's confirmation and
//! its delete). It stops after 5 s without records and prints what it did
//! and how many invoices have a duplicate (always 0).
//!
//! ```sh
//! cargo run -p examples --example kafka_relay     # relays 3 orders to orders.kafka
//! cargo run -p examples --example inbox_consumer  # 3 new
//! INBOX_REWIND=1 cargo run -p examples --example inbox_consumer  # read again: 0 new
//! ```
//!
//! Environment: `DATABASE_URL`, `KAFKA_BOOTSTRAP` (as `kafka_relay`);
//! `INBOX_TOPIC` (default `orders.kafka`), `INBOX_GROUP` (default `billing`),
//! `INBOX_REWIND=1` (read from the beginning, as a rewound consumer group
//! would), `INBOX_IDLE_EXIT_SECS` (default 5), `INBOX_BATCH` (records per
//! transaction, default 100), `INBOX_BATCH_PAUSE_MS` (pause after each batch,
//! default 0: the crash test of `tests/tests/inbox.rs` uses it to spread a
//! run over time).

use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_core::inbox::Inbox;
use outbox_kafka::rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use outbox_kafka::rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use outbox_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_num(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The record's `outbox-id` header (the relayed row's id).
fn outbox_id(msg: &BorrowedMessage<'_>) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == outbox_core::OUTBOX_ID)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let url = env_or(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/outbox_demo",
    );
    let bootstrap = env_or("KAFKA_BOOTSTRAP", "localhost:9092");
    let topic = env_or("INBOX_TOPIC", "orders.kafka");
    let group = env_or("INBOX_GROUP", "billing");
    let rewind = env_or("INBOX_REWIND", "0") == "1";
    let idle_exit = Duration::from_secs(env_num("INBOX_IDLE_EXIT_SECS", 5)?);
    let batch_size = env_num("INBOX_BATCH", 100)?.max(1) as usize;
    let pause = Duration::from_millis(env_num("INBOX_BATCH_PAUSE_MS", 0)?);

    let pool = sqlx::PgPool::connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url} (set DATABASE_URL)"))?;
    // One inbox table can serve several consumers: the consumer name is part
    // of its key.
    let inbox = Inbox::new("inbox", &group)?.retention(Duration::from_secs(7 * 24 * 3600));
    inbox.migrate(&pool).await?;
    // The service's own table. No unique constraint on purpose: the inbox
    // alone keeps it free of duplicates, and the summary counts them.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS inbox_demo_invoices (\
         id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, topic TEXT NOT NULL, \
         order_id BIGINT, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    // Old records go after a week (a real service runs this in the
    // background all the time: Inbox::spawn_cleanup).
    let cleanup = inbox.spawn_cleanup(pool.clone(), Duration::from_secs(3600));

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the Kafka consumer")?;
    // Partitions are assigned (not subscribed): no group rebalance to wait
    // for; offsets still come from and go to the group.
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let start = if rewind {
                Offset::Beginning
            } else {
                Offset::Stored
            };
            tpl.add_partition_offset(&topic, p.id(), start)?;
        }
    }
    anyhow::ensure!(tpl.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&tpl)?;
    println!(
        "consuming {topic} as {group} ({} partitions{})",
        tpl.count(),
        if rewind { ", from the beginning" } else { "" }
    );

    let (mut new, mut skipped, mut consumed) = (0_u64, 0_u64, 0_u64);
    let mut last_record = Instant::now();
    loop {
        // One batch: up to batch_size records, or what arrives within 200 ms.
        let mut batch = Vec::new();
        let until = Instant::now() + Duration::from_millis(200);
        while batch.len() < batch_size {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    eprintln!("kafka: {e}");
                    break;
                }
                Ok(Ok(m)) => batch.push(m),
            }
        }
        if batch.is_empty() {
            if last_record.elapsed() >= idle_exit {
                break;
            }
            continue;
        }
        last_record = Instant::now();
        let mut tx = pool.begin().await?;
        let mut offsets = TopicPartitionList::new();
        for msg in &batch {
            consumed += 1;
            offsets.add_partition_offset(
                msg.topic(),
                msg.partition(),
                Offset::Offset(msg.offset() + 1),
            )?;
            let Some(id) = outbox_id(msg) else {
                eprintln!(
                    "record {}/{}@{} has no outbox-id header: skipped",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                );
                continue;
            };
            // The outbox-id is unique within one outbox table; the topic
            // names where it was relayed from here (one outbox per topic).
            let message_id = format!("{}:{id}", msg.topic());
            if inbox.accept(&mut *tx, &message_id).await? {
                let order_id: Option<i64> =
                    msg.payload().and_then(|p| serde_json::from_slice(p).ok());
                sqlx::query(
                    "INSERT INTO inbox_demo_invoices (message_id, topic, order_id) VALUES ($1, $2, $3)",
                )
                .bind(&message_id)
                .bind(msg.topic())
                .bind(order_id)
                .execute(&mut *tx)
                .await?;
                new += 1;
            } else {
                skipped += 1;
            }
        }
        tx.commit().await?;
        // Only after the commit: a crash before it re-reads the batch.
        if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
            eprintln!("committing the offsets failed (the batch will be read again): {e}");
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    cleanup.abort();
    let (invoices, duplicates): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) - count(DISTINCT message_id) FROM inbox_demo_invoices WHERE topic = $1",
    )
    .bind(&topic)
    .fetch_one(&pool)
    .await?;
    println!("consumed {consumed} records: {new} new, {skipped} already processed");
    println!("{invoices} invoices for {topic}, {duplicates} duplicates");
    Ok(())
}
