//! The exactly-once Kafka relay (issue 17; design: docs/exactly-once.md):
//! routes with `exactly_once(lanes)` on a `KafkaBroker::transactional`
//! transport, against noida-db (`NOIDA_KAFKA_BOOTSTRAP`, scripts/noida.sh),
//! the local broker that implements Kafka transactions with fencing (Tansu
//! does not, see tests/kafka_transactions.rs), and a real PostgreSQL.
//!
//! Every read-back is a `read_committed` consumer (`read_committed`: one
//! consumer per partition, from the beginning to the partition's end) and
//! every assertion is "each row exactly once":
//! - `every_row_once_with_keys_and_failures`: an in-process App; keyed and
//!   keyless rows; handlers failing once are retried, and their records
//!   are never in a committed transaction before their success;
//! - `two_relays_share_the_lanes_and_the_survivor_takes_over`: two relay
//!   processes; each lane locked by one session; one is SIGKILLed
//!   mid-stream and the other takes its lanes over;
//! - `sigkill_storm`: the item 4, relay processes SIGKILLed at
//!   random points while 50,000 rows are relayed.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox_core::retry::ConstantRetry;
use outbox_core::{App, BoxError, Message, PublishOptions, Response, Route};
use outbox_kafka::KafkaBroker;
use rand::Rng as _;
use tests::TestDb;
use tests::crash::{QUEUE, RelayChild};
use tests::kafka::{Record, create_topic, to_record};

type R = anyhow::Result<()>;

/// Partitions of the data topics.
const PARTITIONS: i32 = 4;

/// `NOIDA_KAFKA_BOOTSTRAP`, or a panic that says how to get the broker.
fn bootstrap() -> String {
    match std::env::var("NOIDA_KAFKA_BOOTSTRAP") {
        Ok(b) if !b.trim().is_empty() => b,
        _ => panic!(
            "NOIDA_KAFKA_BOOTSTRAP is not set: the exactly-once tests need a broker that \
             implements Kafka transactions (Tansu does not). Run `bash scripts/test.sh` (it \
             starts one), or `bash scripts/noida.sh start` and \
             `export NOIDA_KAFKA_BOOTSTRAP=127.0.0.1:9392`"
        ),
    }
}

fn unique(prefix: &str) -> String {
    format!("eo-{prefix}-{}", tests::suffix())
}

/// Every record of `topic` a read_committed consumer gets, each partition
/// read from the beginning to its end (the partition-EOF event, at the last
/// stable offset) by a consumer of its own.
///
/// Not `tests::kafka::TopicReader` (read_uncommitted, no end: it reads
/// until the expected records came). One `StreamConsumer` assigned all four
/// partitions stopped delivering some partitions of noida-db's topics after
/// a few thousand records (their last stable offset was their high
/// watermark: nothing was pinned), while a `BaseConsumer` per partition reads
/// each to its end in half a second (`diagnose_topic`); `TopicReader` now
/// also reads each partition with a consumer of its own.
fn read_partitions(boot: &str, topic: &str) -> anyhow::Result<Vec<Record>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let mut out = Vec::new();
    for part in 0..PARTITIONS {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", boot)
            .set("group.id", unique("reader"))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, part, rdkafka::Offset::Beginning)?;
        c.assign(&tpl)?;
        let t0 = Instant::now();
        loop {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "{topic}[{part}]: no end within 60 s"
            );
            match c.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => eprintln!("{topic}[{part}]: {e}"),
                Some(Ok(m)) => out.push(to_record(&m).map_err(anyhow::Error::msg)?),
            }
        }
    }
    Ok(out)
}

/// Reads `topic` with read_committed, each partition to its end, until every
/// id of `ids` arrived (at most `timeout`); returns the records of the last
/// read.
async fn read_committed(
    boot: &str,
    topic: &str,
    ids: &BTreeSet<i64>,
    timeout: Duration,
) -> anyhow::Result<Vec<Record>> {
    let t0 = Instant::now();
    loop {
        let (b, t) = (boot.to_owned(), topic.to_owned());
        let records = tokio::task::spawn_blocking(move || read_partitions(&b, &t)).await??;
        let seen: BTreeSet<i64> = records.iter().map(Record::outbox_id).collect();
        if ids.is_subset(&seen) {
            return Ok(records);
        }
        assert!(
            t0.elapsed() < timeout,
            "read_committed: {} of {} rows arrived within {timeout:?} ({} records); first \
             missing: {:?}",
            seen.len(),
            ids.len(),
            records.len(),
            ids.difference(&seen).take(10).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asserts that the records are exactly one per id of `ids`; returns how
/// many records there were.
fn assert_exactly_once(ids: &BTreeSet<i64>, records: &[Record]) -> usize {
    let mut per_id: BTreeMap<i64, usize> = BTreeMap::new();
    for r in records {
        *per_id.entry(r.outbox_id()).or_default() += 1;
    }
    let dups: Vec<(i64, usize)> = per_id
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .take(10)
        .collect();
    assert!(
        dups.is_empty(),
        "duplicates seen by a read_committed consumer (id, copies): {dups:?}"
    );
    let seen: BTreeSet<i64> = per_id.keys().copied().collect();
    assert_eq!(&seen, ids, "every row, and only these rows, arrive");
    records.len()
}

/// The advisory locks of lanes held now (`(objid, objsubid=2)` is the
/// two-key form the lanes use): (backend pid, lane) pairs.
async fn lane_locks(db: &TestDb) -> anyhow::Result<Vec<(i32, i64)>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT pid, objid::int8 FROM pg_locks \
         WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND database = \
         (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid::int8 = (hashtext($1)::int8 & 4294967295)",
    )
    .bind(format!(
        "{}.{}/{}",
        db.schema,
        db.table.name(),
        "kafka_relay"
    ))
    .fetch_all(&db.pool)
    .await?;
    Ok(rows)
}

/// Keyed and keyless rows, some of whose handlers fail once (retried after
/// 100 ms): every row arrives exactly once, keyed rows in publish order per
/// key, nothing is dead-lettered, the outbox ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_once_with_keys_and_failures() -> R {
    let boot = bootstrap();
    let db = TestDb::new().await?;
    let topic = unique("basic");
    create_topic(&boot, &topic, PARTITIONS).await?;
    let fail_once: Arc<Mutex<HashSet<i64>>> = Arc::new(Mutex::new(HashSet::new()));
    let failed = fail_once.clone();
    let kafka = KafkaBroker::new(&boot)
        .client_id("outbox-tests-eo")
        .set("reconnect.backoff.max.ms", "1000")
        .transactional(unique("app"));
    let route = Route::builder(["orders"])
        .name("relay")
        .exactly_once(3)
        .fetch_batch_size(50)
        .retry(ConstantRetry::new(Duration::from_millis(100)))
        .publish_to("kafka", topic.clone())
        .handler(move |msg: Message, _ctx| {
            let failed = failed.clone();
            async move {
                let v: i64 = msg.decode()?;
                if v % 7 == 3 && failed.lock().unwrap().insert(msg.id()) {
                    return Err::<Response<i64>, BoxError>("fails once".into());
                }
                Ok(Response::new(v))
            }
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .subscriber(route)
        .on_startup(kafka.connect());
    let stop = app.handle();
    let run = tokio::spawn(app.run());

    let mut ids = BTreeSet::new();
    let mut keyed: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for chunk in 0..10i64 {
        let mut tx = db.pool.begin().await?;
        for i in 0..40i64 {
            let v = chunk * 40 + i;
            let id = if v % 2 == 0 {
                let key = format!("key-{}", v % 10);
                let opts = PublishOptions::new().key(key.clone());
                let id = db
                    .broker
                    .publish_with(&v, "orders", &opts, &mut *tx)
                    .await?
                    .context("a row id")?;
                keyed.entry(key).or_default().push(id);
                id
            } else {
                db.broker.publish(&v, "orders", &mut *tx).await?
            };
            ids.insert(id);
        }
        tx.commit().await?;
    }
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left: {}",
        db.count().await?
    );
    stop.shutdown();
    run.await??;

    let records = read_committed(&boot, &topic, &ids, Duration::from_secs(30)).await?;
    assert_exactly_once(&ids, &records);
    assert_eq!(db.dlq_count().await?, 0);
    assert!(
        fail_once.lock().unwrap().len() >= 50,
        "the failing handlers ran: {}",
        fail_once.lock().unwrap().len()
    );
    // A key's rows: one partition, in publish (id) order.
    for (key, want) in &keyed {
        let mut got: Vec<&Record> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
            .collect();
        let parts: BTreeSet<i32> = got.iter().map(|r| r.partition).collect();
        assert_eq!(parts.len(), 1, "key {key} on partitions {parts:?}");
        got.sort_by_key(|r| r.offset);
        let order: Vec<i64> = got.iter().map(|r| r.outbox_id()).collect();
        assert_eq!(&order, want, "key {key}: records out of publish order");
    }
    Ok(())
}

/// The command of an exactly-once relay child on `db` relaying to `topic`
/// through `lanes` lanes of the application `app`, `batch` rows per lot.
fn eo_relay(db: &TestDb, boot: &str, topic: &str, app: &str, lanes: u32, batch: u32) -> Command {
    let mut cmd = RelayChild::command(env!("CARGO_BIN_EXE_kafka_relay"), db);
    cmd.env("KAFKA_BOOTSTRAP", boot)
        .env("RELAY_TOPIC", topic)
        .env("RELAY_TRANSACTIONAL", app)
        .env("RELAY_EXACTLY_ONCE", lanes.to_string())
        .env("RELAY_DELAY_MS", "0")
        .env("RELAY_BATCH", batch.to_string())
        .env("RELAY_LEASE_MS", "6000");
    cmd
}

/// Publishes the JSON values `from..to` to [`QUEUE`] in one transaction
/// (every third row keyed `k<v % 16>`); returns their ids.
async fn publish_range(db: &TestDb, from: i64, to: i64) -> anyhow::Result<Vec<i64>> {
    let mut tx = db.pool.begin().await?;
    let mut ids = Vec::with_capacity(usize::try_from(to - from)?);
    for v in from..to {
        let opts = if v % 3 == 0 {
            PublishOptions::new().key(format!("k{}", v % 16))
        } else {
            PublishOptions::new()
        };
        let id = db
            .broker
            .publish_with(&v, QUEUE, &opts, &mut *tx)
            .await?
            .context("a row id")?;
        ids.push(id);
    }
    tx.commit().await?;
    Ok(ids)
}

/// Two relay processes share the lanes (every lane locked by exactly one
/// session); one is SIGKILLed mid-stream; the survivor takes its lanes over
/// (fencing its producers) and the rows arrive exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_lanes_and_the_survivor_takes_over() -> R {
    let boot = bootstrap();
    let db = TestDb::new().await?;
    let topic = unique("takeover");
    create_topic(&boot, &topic, PARTITIONS).await?;
    let app = unique("app");
    const LANES: u32 = 4;
    let ids: BTreeSet<i64> = publish_range(&db, 0, 3000).await?.into_iter().collect();
    let a = RelayChild::spawn(&mut eo_relay(&db, &boot, &topic, &app, LANES, 50))?;
    let b = RelayChild::spawn(&mut eo_relay(&db, &boot, &topic, &app, LANES, 50))?;
    // Every lane owned, each by one session.
    let owned = tests::wait_until(Duration::from_secs(30), || async {
        lane_locks(&db).await.unwrap().len() == LANES as usize
    })
    .await;
    let locks = lane_locks(&db).await?;
    assert!(owned, "lanes locked: {locks:?}");
    let lanes: BTreeSet<i64> = locks.iter().map(|(_, l)| *l).collect();
    assert_eq!(lanes.len(), LANES as usize, "each lane once: {locks:?}");
    let holders: BTreeSet<i32> = locks.iter().map(|(pid, _)| *pid).collect();
    println!("lanes held by {} sessions: {locks:?}", holders.len());
    assert!(
        tests::wait_until(Duration::from_secs(60), || async {
            db.count().await.unwrap() <= 2000
        })
        .await,
        "no progress"
    );
    a.sigkill()?;
    println!("killed relay a with {} rows left", db.count().await?);
    assert!(
        db.count().await? > 0,
        "the relays finished before the kill; raise N"
    );
    assert!(
        db.drained(Duration::from_secs(90)).await,
        "the survivor left rows: {}",
        db.count().await?
    );
    let locks = lane_locks(&db).await?;
    assert_eq!(
        locks.len(),
        LANES as usize,
        "the survivor holds every lane: {locks:?}"
    );
    let status = b.sigterm()?;
    assert!(status.success(), "relay b exited with {status}");
    let records = read_committed(&boot, &topic, &ids, Duration::from_secs(30)).await?;
    assert_exactly_once(&ids, &records);
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

/// Issue 17, item 4: relay processes SIGKILLed at `KILLS` random points
/// while `ROWS` rows are relayed (the rows are published in `KILLS` waves,
/// one before each relay starts, so every kill lands mid-stream); then one
/// relay drains the rest. A read_committed consumer sees every row exactly
/// once, none lost, and the outbox ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_storm() -> R {
    let kills: i64 = std::env::var("EO_KILLS").map_or(Ok(200), |v| v.parse())?;
    let rows: i64 = std::env::var("EO_ROWS").map_or(Ok(50_000), |v| v.parse())?;
    let boot = bootstrap();
    let db = TestDb::new().await?;
    let topic = unique("storm");
    create_topic(&boot, &topic, PARTITIONS).await?;
    let app = unique("app");
    const LANES: u32 = 4;
    let per_wave = rows / kills;
    let started = Instant::now();
    let mut ids = BTreeSet::new();
    let mut mid_stream = 0;
    let mut rng = rand::rng();
    for k in 0..kills {
        let from = k * per_wave;
        let to = if k == kills - 1 {
            rows
        } else {
            from + per_wave
        };
        ids.extend(publish_range(&db, from, to).await?);
        let before = db.count().await?;
        let relay = RelayChild::spawn(&mut eo_relay(&db, &boot, &topic, &app, LANES, 25))?;
        // A random point in the relay's life: one kill in four while it
        // starts (takes its lanes: fencing, reading the progress), the
        // others once it relayed a random number of rows (at least one, and
        // at most all but a quarter of a wave, so that the kill, 0-20 ms
        // later, lands mid-stream), plus 0-20 ms.
        if k % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        } else {
            let most = before.saturating_sub((per_wave / 4).max(1)).max(1);
            let target = before - rng.random_range(1..=most).min(before);
            let relaying = tests::wait_until(Duration::from_secs(30), || async {
                db.count().await.unwrap() <= target
            })
            .await;
            assert!(relaying, "relay {k} did not relay {} rows", before - target);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        }
        relay.sigkill()?;
        if db.count().await? > 0 {
            mid_stream += 1;
        }
    }
    let killed_in = started.elapsed();
    let left = db.count().await?;
    println!(
        "{kills} SIGKILLs in {killed_in:?} ({mid_stream} with rows left); {left} of {rows} rows \
         left for the last relay"
    );
    let relay = RelayChild::spawn(&mut eo_relay(&db, &boot, &topic, &app, LANES, 25))?;
    // Its lanes taken, its App runs (and listens for SIGTERM): when the
    // storm left no row, the drain below is immediate, and a SIGTERM during
    // the start would end the process before it installed its handler.
    let running = tests::wait_until(Duration::from_secs(60), || async {
        lane_locks(&db)
            .await
            .is_ok_and(|l| l.len() == LANES as usize)
    })
    .await;
    assert!(
        running,
        "the last relay took its lanes: {:?}",
        lane_locks(&db).await?
    );
    assert!(
        db.drained(Duration::from_secs(300)).await,
        "rows left after the last relay: {}",
        db.count().await?
    );
    let status = relay.sigterm()?;
    assert!(status.success(), "the last relay exited with {status}");
    assert_eq!(db.count().await?, 0, "the outbox ends empty");
    assert_eq!(db.dlq_count().await?, 0);
    let records = read_committed(&boot, &topic, &ids, Duration::from_secs(120)).await?;
    let n = assert_exactly_once(&ids, &records);
    println!(
        "sigkill_storm: {kills} kills ({mid_stream} mid-stream), {rows} rows, {n} records read \
         with read_committed, each row exactly once; total {:?}",
        started.elapsed()
    );
    assert!(
        mid_stream * 2 >= kills,
        "most kills must land mid-stream: {mid_stream} of {kills}"
    );
    Ok(())
}

/// Diagnosis (ignored): reads `EO_TOPIC` partition by partition with
/// read_committed, printing every consumer error and where each partition
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "diagnosis of a stored topic"]
async fn diagnose_topic() -> R {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let boot = bootstrap();
    let topic = std::env::var("EO_TOPIC")?;
    for isolation in ["read_committed", "read_uncommitted"] {
        for part in 0..PARTITIONS {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &boot)
                .set("group.id", unique("diag"))
                .set("isolation.level", isolation)
                .set("enable.partition.eof", "true")
                .set("debug", "fetch,msg")
                .create()?;
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(&topic, part, rdkafka::Offset::Beginning)?;
            c.assign(&tpl)?;
            let t0 = Instant::now();
            let (mut n, mut last) = (0, -1);
            while t0.elapsed() < Duration::from_secs(20) {
                match c.poll(Duration::from_millis(200)) {
                    None => {}
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => println!("[{part}] {isolation}: error {e}"),
                    Some(Ok(m)) => {
                        n += 1;
                        last = m.offset();
                    }
                }
            }
            println!(
                "[{part}] {isolation}: {n} records, last offset {last}, {:?}",
                t0.elapsed()
            );
        }
    }
    Ok(())
}
