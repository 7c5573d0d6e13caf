//! The Kafka-transaction semantics the transactional relay of issue 17
//! relies on (design: docs/exactly-once.md), checked against a broker that
//! implements them: noida-db at `NOIDA_KAFKA_BOOTSTRAP` (scripts/noida.sh;
//! scripts/test.sh starts it next to Tansu). Tansu, the broker of the other
//! Kafka tests, neither fences a zombie producer nor hides records aborted
//! after their acknowledgement (the four semantics tests below fail there),
//! and rdkafka's `MockCluster` neither fences (a second `init_transactions`
//! gets a new producer id) nor hides aborted records (its Fetch reports no
//! aborted transactions), so these tests need noida. No PostgreSQL: broker semantics only.
//!
//! A "zombie" here is a transactional producer that is alive but idle with
//! an open transaction: from the broker's side that is exactly a relay
//! SIGKILLed in the middle of a lot (neither sends anything more).
//!
//! Reading to the end of a partition (the relay reads its lane's progress
//! to the end after `init_transactions`): `enable.partition.eof` on a
//! `read_committed` consumer. librdkafka reports the end when its fetch
//! position reaches the last stable offset (LSO) the broker returns, so the
//! end is reported after the last committed record even though the log
//! ends with a commit marker (never delivered), and it is reported at the
//! first open transaction's first record while one is open (what comes
//! after it, committed or not, is not delivered until that transaction
//! ends). The log's high watermark is not that end (it counts control
//! markers and open transactions' records), but `fetch_watermarks` asked by
//! a read_committed consumer returns the LSO as its high mark. See
//! `read_committed_ends_at_the_last_stable_offset`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tests::kafka::create_topic;

type R = anyhow::Result<()>;

/// Budget of every blocking transactional call and of every read to the end.
const BUDGET: Duration = Duration::from_secs(20);

/// `NOIDA_KAFKA_BOOTSTRAP`, or a panic that says how to get the broker: these
/// tests never skip silently.
fn bootstrap() -> String {
    match std::env::var("NOIDA_KAFKA_BOOTSTRAP") {
        Ok(b) if !b.trim().is_empty() => b,
        _ => panic!(
            "NOIDA_KAFKA_BOOTSTRAP is not set: the Kafka transaction tests need a broker that \
             implements Kafka transactions (Tansu does not). Run `bash scripts/test.sh` (it \
             starts one), or `bash scripts/noida.sh start` and \
             `export NOIDA_KAFKA_BOOTSTRAP=127.0.0.1:9392`"
        ),
    }
}

/// A name no other test uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", tests::suffix())
}

/// An idempotent producer (`acks=all`), transactional when `transactional_id`
/// is given.
fn producer(boot: &str, transactional_id: Option<&str>) -> anyhow::Result<FutureProducer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", boot)
        .set("client.id", "outbox-tests-tx")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("reconnect.backoff.max.ms", "1000");
    if let Some(id) = transactional_id {
        c.set("transactional.id", id)
            .set("transaction.timeout.ms", "60000");
    }

    c.create().context("creating a producer")
}

/// A transactional producer; its blocking calls run on the blocking pool,
/// each on a clone of the producer.
#[derive(Clone)]
struct Tx {
    p: FutureProducer,
}

impl Tx {
    /// Creates the producer and calls `init_transactions`: this fences every
    /// older producer of `transactional_id` and aborts its open transaction.
    async fn init(boot: &str, transactional_id: &str) -> anyhow::Result<Self> {
        let tx = Self {
            p: producer(boot, Some(transactional_id))?,
        };
        tx.blocking(|p| p.init_transactions(BUDGET))
            .await
            .with_context(|| format!("init_transactions of {transactional_id}"))?;
        Ok(tx)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&FutureProducer) -> KafkaResult<T> + Send + 'static,
    ) -> KafkaResult<T> {
        let p = self.p.clone();
        match tokio::task::spawn_blocking(move || f(&p)).await {
            Ok(r) => r,
            Err(e) => panic!("blocking producer call failed: {e}"),
        }
    }

    async fn begin(&self) -> KafkaResult<()> {
        self.blocking(|p| p.begin_transaction()).await
    }

    async fn commit(&self) -> KafkaResult<()> {
        self.blocking(|p| p.commit_transaction(BUDGET)).await
    }

    async fn abort(&self) -> KafkaResult<()> {
        self.blocking(|p| p.abort_transaction(BUDGET)).await
    }
}

/// Produces `values` to `topic` (to `partition`, else by key = value) and
/// waits until the broker acknowledged each: the records are in the log,
/// whatever later happens to their transaction.
async fn send_acked(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    values: &[String],
) -> anyhow::Result<Vec<Delivery>> {
    let mut pending = Vec::with_capacity(values.len());
    for v in values {
        let mut rec = FutureRecord::to(topic)
            .key(v.as_bytes())
            .payload(v.as_bytes());
        if let Some(n) = partition {
            rec = rec.partition(n);
        }
        pending.push(p.send_result(rec).map_err(|(e, _)| e)?);
    }
    let mut acked = Vec::with_capacity(pending.len());
    for d in pending {
        acked.push(d.await?.map_err(|(e, _)| e)?);
    }
    Ok(acked)
}

fn strings(prefix: &str, range: std::ops::Range<i64>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    Committed,
    Uncommitted,
}

impl Isolation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "read_committed",
            Self::Uncommitted => "read_uncommitted",
        }
    }
}

/// One record read back.
#[derive(Debug, Clone)]
struct Rec {
    partition: i32,
    offset: i64,
    value: String,
}

/// What a read to the end found.
#[derive(Debug)]
struct ReadEnd {
    records: Vec<Rec>,
    /// The consumer's position of each partition after its end was reported.
    positions: Vec<i64>,
    /// `fetch_watermarks` (low, high) of each partition, asked by the same
    /// consumer after the end.
    watermarks: Vec<(i64, i64)>,
}

impl ReadEnd {
    /// The values, partition by partition, in offset order.
    fn values(&self) -> Vec<String> {
        let mut recs = self.records.clone();
        recs.sort_by_key(|r| (r.partition, r.offset));
        recs.into_iter().map(|r| r.value).collect()
    }

    fn set(&self) -> BTreeSet<String> {
        self.records.iter().map(|r| r.value.clone()).collect()
    }
}

/// Reads partitions `0..partitions` of `topic` from the beginning until the
/// end of each was reported (`enable.partition.eof`); an error when an end
/// does not come within [`BUDGET`] (with read_committed: an open
/// transaction before the records that are expected is not an error here,
/// the end is then reported at its first record).
async fn read_to_end(
    boot: &str,
    topic: &str,
    partitions: i32,
    isolation: Isolation,
) -> anyhow::Result<ReadEnd> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", boot)
        .set("group.id", unique("outbox-tests-tx-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation.as_str())
        .set("reconnect.backoff.max.ms", "1000")
        .create()
        .context("creating the reader")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + BUDGET;
        let mut ended = BTreeSet::new();
        let mut records = Vec::new();
        while ended.len() < partitions as usize {
            if Instant::now() > deadline {
                bail!(
                    "{topic} ({}): partitions {ended:?} of 0..{partitions} reached their end \
                     within {BUDGET:?}, after {} records",
                    isolation.as_str(),
                    records.len()
                );
            }
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    ended.insert(p);
                }
                Some(Err(e)) => eprintln!("reader of {topic}: {e}"),
                Some(Ok(m)) => records.push(Rec {
                    partition: m.partition(),
                    offset: m.offset(),
                    value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                }),
            }
        }
        let pos = consumer.position()?;
        let mut positions = Vec::new();
        let mut watermarks = Vec::new();
        for p in 0..partitions {
            let at = pos
                .find_partition(&topic, p)
                .map(|e| e.offset().to_raw().unwrap_or(-1))
                .unwrap_or(-1);
            positions.push(at);
            watermarks.push(consumer.fetch_watermarks(&topic, p, BUDGET)?);
        }
        Ok(ReadEnd {
            records,
            positions,
            watermarks,
        })
    })
    .await?
}

/// Asserts that `r` is the fatal "fenced" error librdkafka raises in a
/// producer whose `transactional.id` was taken over by a newer producer.
fn assert_fenced(r: KafkaResult<()>, what: &str) {
    match r {
        Err(KafkaError::Transaction(e)) => {
            assert_eq!(
                e.code(),
                RDKafkaErrorCode::Fenced,
                "{what}: expected the fatal _FENCED error, got {e}"
            );
            assert!(e.is_fatal(), "{what}: _FENCED must be fatal: {e}");
        }
        other => panic!("{what}: expected the fatal _FENCED error, got {other:?}"),
    }
}

/// (a) Committed records are visible to read_committed; records of an
/// aborted transaction are not, even though they were acknowledged (written
/// to the log) before the abort: read_uncommitted sees them, so they were
/// filtered, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_sees_committed_records_and_not_records_aborted_after_their_ack() -> R {
    let boot = bootstrap();
    let topic = unique("tx.visibility");
    create_topic(&boot, &topic, 1).await?;
    let tx = Tx::init(&boot, &unique("tx.visibility")).await?;

    tx.begin().await?;
    send_acked(&tx.p, &topic, Some(0), &strings("c", 0..5)).await?;
    tx.commit().await?;
    tx.begin().await?;
    send_acked(&tx.p, &topic, Some(0), &strings("a", 0..3)).await?;
    tx.abort().await?;
    tx.begin().await?;
    send_acked(&tx.p, &topic, Some(0), &strings("c", 5..6)).await?;
    tx.commit().await?;

    let committed = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert_eq!(committed.values(), strings("c", 0..6));
    let all = read_to_end(&boot, &topic, 1, Isolation::Uncommitted).await?;
    let expected: Vec<String> =
        [strings("c", 0..5), strings("a", 0..3), strings("c", 5..6)].concat();
    assert_eq!(all.values(), expected);
    Ok(())
}

/// (b) Fencing: producer A opens a transaction and its records are
/// acknowledged; producer B with the same `transactional.id` calls
/// `init_transactions`. A's records never become visible to read_committed,
/// A's commit fails with the fatal `_FENCED` error, B commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_transactions_fences_the_older_producer_and_aborts_its_open_transaction() -> R {
    let boot = bootstrap();
    let topic = unique("tx.fence");
    create_topic(&boot, &topic, 1).await?;
    let id = unique("tx.fence");

    let a = Tx::init(&boot, &id).await?;
    a.begin().await?;
    send_acked(&a.p, &topic, Some(0), &strings("a", 0..3)).await?;

    let b = Tx::init(&boot, &id).await?;
    b.begin().await?;
    send_acked(&b.p, &topic, Some(0), &strings("b", 0..2)).await?;
    b.commit().await?;
    // B's records come after A's in the log: read_committed reaching them
    // means A's transaction ended (aborted), not that it is still pending.
    let committed = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert_eq!(committed.values(), strings("b", 0..2));

    assert_fenced(a.commit().await, "A's commit after B's init_transactions");
    let fatal = a.p.client().fatal_error();
    assert!(
        matches!(fatal, Some((RDKafkaErrorCode::Fenced, _))),
        "A's client has no fatal _FENCED error: {fatal:?}"
    );
    // A cannot start over either: a fenced producer is dead for good.
    assert_fenced(a.begin().await, "A's begin_transaction after being fenced");

    let committed = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert_eq!(committed.values(), strings("b", 0..2));
    let all = read_to_end(&boot, &topic, 1, Isolation::Uncommitted).await?;
    assert_eq!(
        all.values(),
        [strings("a", 0..3), strings("b", 0..2)].concat()
    );
    Ok(())
}

/// The progress record of a lot: the relay's lane and the ids it published.
fn progress(lane: u32, ids: &[i64]) -> String {
    json!({ "lane": lane, "ids": ids }).to_string()
}

/// Data records of the ids `ids` (keyed by value, spread over partitions)
/// and the lot's progress record, in the producer's open transaction.
async fn lot(tx: &Tx, data: &str, progress_topic: &str, ids: &[i64]) -> anyhow::Result<()> {
    let values: Vec<String> = ids.iter().map(|i| format!("row{i}")).collect();
    send_acked(&tx.p, data, None, &values).await?;
    send_acked(&tx.p, progress_topic, Some(0), &[progress(0, ids)]).await?;
    Ok(())
}

fn rows(ids: std::ops::RangeInclusive<i64>) -> BTreeSet<String> {
    ids.map(|i| format!("row{i}")).collect()
}

/// (c) A transaction carrying records on a data topic (3 partitions) and a
/// progress record on a second topic commits or aborts as one: both visible
/// or neither. Then the takeover a relay does when it acquires a lane whose
/// previous owner died mid-lot: `init_transactions` (aborts the dead
/// owner's open lot), read the lane's progress to the end, resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_progress_records_commit_and_abort_together() -> R {
    let boot = bootstrap();
    let data = unique("tx.data");
    let prog = unique("tx.progress");
    create_topic(&boot, &data, 3).await?;
    create_topic(&boot, &prog, 1).await?;
    let id = unique("app.outbox.sub.0");

    let a = Tx::init(&boot, &id).await?;
    let lot1: Vec<i64> = (1..=6).collect();
    let lot2: Vec<i64> = (7..=12).collect();
    let lot3: Vec<i64> = (13..=18).collect();
    let lot4: Vec<i64> = (19..=24).collect();
    a.begin().await?;
    lot(&a, &data, &prog, &lot1).await?;
    a.commit().await?;
    a.begin().await?;
    lot(&a, &data, &prog, &lot2).await?;
    a.abort().await?;
    a.begin().await?;
    lot(&a, &data, &prog, &lot3).await?;
    a.commit().await?;
    // Lot 4 acknowledged, never ended: A "dies" here (stays silent).
    a.begin().await?;
    lot(&a, &data, &prog, &lot4).await?;

    let got = read_to_end(&boot, &data, 3, Isolation::Committed).await?;
    let want: BTreeSet<String> = rows(1..=6).union(&rows(13..=18)).cloned().collect();
    assert_eq!(got.set(), want, "committed data while lot 4 is open");
    assert_eq!(got.records.len(), want.len(), "a data record twice");
    let got = read_to_end(&boot, &prog, 1, Isolation::Committed).await?;
    assert_eq!(got.values(), [progress(0, &lot1), progress(0, &lot3)]);

    // The next owner of the lane.
    let b = Tx::init(&boot, &id).await?;
    let progress_read = read_to_end(&boot, &prog, 1, Isolation::Committed).await?;
    assert_eq!(
        progress_read.values().last(),
        Some(&progress(0, &lot3)),
        "the last committed lot after the takeover"
    );
    let all = read_to_end(&boot, &data, 3, Isolation::Uncommitted).await?;
    assert_eq!(all.set(), rows(1..=24), "read_uncommitted sees every lot");
    // Lot 4's rows were never deleted: the new owner publishes them again.
    b.begin().await?;
    lot(&b, &data, &prog, &lot4).await?;
    b.commit().await?;
    assert_fenced(a.commit().await, "the dead owner's commit");

    let got = read_to_end(&boot, &data, 3, Isolation::Committed).await?;
    let want: BTreeSet<String> = rows(1..=6).union(&rows(13..=24)).cloned().collect();
    assert_eq!(got.set(), want);
    assert_eq!(got.records.len(), want.len(), "a data record twice");
    let got = read_to_end(&boot, &prog, 1, Isolation::Committed).await?;
    assert_eq!(
        got.values(),
        [progress(0, &lot1), progress(0, &lot3), progress(0, &lot4)]
    );
    Ok(())
}

/// (d) How a read_committed reader knows it reached the end of a partition
/// (the relay reads its lane's progress to the end after taking the lane
/// over). What works on noida, as on Kafka:
/// * `enable.partition.eof`: the end is reported once the reader's position
///   reaches the last stable offset (LSO): right after the last committed
///   record although the log ends with a commit marker, and at the first
///   record of an open transaction while one is open (committed records
///   after it, transactional or not, are held back until it ends);
/// * `fetch_watermarks` asked by a read_committed consumer returns the LSO
///   as its high mark (librdkafka's ListOffsets carries the isolation level),
///   and the position after the end equals it (the position moves past
///   control markers); a read_uncommitted consumer gets the log end. An
///   empty partition ends at once with position `Invalid` (-1001) and
///   watermarks (0, 0), so "read until position >= high watermark" needs a
///   special case: the relay uses the end-of-partition event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_ends_at_the_last_stable_offset() -> R {
    let boot = bootstrap();
    let topic = unique("tx.end");
    create_topic(&boot, &topic, 1).await?;
    let id = unique("tx.end");

    let empty = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert!(empty.records.is_empty(), "{empty:?}");
    assert_eq!(empty.watermarks, [(0, 0)], "{empty:?}");

    let a = Tx::init(&boot, &id).await?;
    a.begin().await?;
    let c = send_acked(&a.p, &topic, Some(0), &strings("c", 0..3)).await?;
    a.commit().await?;
    let offsets = |ds: &[Delivery]| ds.iter().map(|d| d.offset).collect::<Vec<_>>();
    assert_eq!(offsets(&c), [0, 1, 2]);
    let end = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert_eq!(end.values(), strings("c", 0..3));
    // offset 3 is the commit marker: the LSO is 4
    assert_eq!(
        (end.positions[0], end.watermarks[0]),
        (4, (0, 4)),
        "{end:?}"
    );

    // An open transaction (offsets 4, 5), then plain records (6, 7).
    a.begin().await?;
    let open = send_acked(&a.p, &topic, Some(0), &strings("open", 0..2)).await?;
    let plain = producer(&boot, None)?;
    let p = send_acked(&plain, &topic, Some(0), &strings("p", 0..2)).await?;
    assert_eq!((offsets(&open), offsets(&p)), (vec![4, 5], vec![6, 7]));
    let end = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert_eq!(
        end.values(),
        strings("c", 0..3),
        "read_committed while open"
    );
    assert_eq!(
        (end.positions[0], end.watermarks[0]),
        (4, (0, 4)),
        "{end:?}"
    );
    let end = read_to_end(&boot, &topic, 1, Isolation::Uncommitted).await?;
    let all = [
        strings("c", 0..3),
        strings("open", 0..2),
        strings("p", 0..2),
    ]
    .concat();
    assert_eq!(end.values(), all, "read_uncommitted while open");
    assert_eq!(
        (end.positions[0], end.watermarks[0]),
        (8, (0, 8)),
        "{end:?}"
    );

    // The takeover aborts it (abort marker at 8): the end moves past the
    // plain records, which become visible; the open ones never do.
    let _b = Tx::init(&boot, &id).await?;
    let end = read_to_end(&boot, &topic, 1, Isolation::Committed).await?;
    assert_eq!(
        end.values(),
        [strings("c", 0..3), strings("p", 0..2)].concat()
    );
    assert_eq!(
        (end.positions[0], end.watermarks[0]),
        (9, (0, 9)),
        "{end:?}"
    );
    Ok(())
}

/// Enqueues `recs` (key, value) to `topic`; the delivery futures.
fn enqueue_all(
    p: &FutureProducer,
    topic: &str,
    recs: &[(String, String)],
) -> anyhow::Result<Vec<DeliveryFuture>> {
    let mut pending = Vec::with_capacity(recs.len());
    for (k, v) in recs {
        let rec = FutureRecord::to(topic).key(k.as_str()).payload(v.as_str());
        pending.push(p.send_result(rec).map_err(|(e, _)| e)?);
    }
    Ok(pending)
}

async fn all_acked(pending: Vec<DeliveryFuture>) -> anyhow::Result<()> {
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The cost of a transaction of 1,000 records (plus the lot's progress
/// record) against the idempotent producer sending the same 1,000 records
/// and waiting for their acknowledgements, on noida: a first figure for the
/// <= 15 % target of issue 17. Printed as JSON, not asserted (no timed
/// assertions); what is asserted is that every record is visible once.
///
/// Three ways per round, alternating: `idempotent` (send, await every
/// acknowledgement); `transactional` (begin, send, await every
/// acknowledgement, then commit: the relay's way); `commit_in_flight`
/// (begin, send, commit at once). The last one is slow with rdkafka 0.39:
/// `commit_transaction` first runs the crate's `flush`, which, while
/// records are in flight, polls the event queue for up to 100 ms at a time
/// in competition with the `FutureProducer`'s own polling thread, so it
/// typically waits ~100 ms. The relay must await its lot's deliveries
/// before committing (it needs them anyway, to know which records failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_of_a_transaction_of_1000_records_against_the_idempotent_producer() -> R {
    const N: usize = 1000;
    const ROUNDS: usize = 10;
    let boot = bootstrap();
    let data = unique("tx.cost");
    let prog = unique("tx.cost.progress");
    create_topic(&boot, &data, 4).await?;
    create_topic(&boot, &prog, 1).await?;
    let tx = Tx::init(&boot, &unique("tx.cost")).await?;
    let idem = producer(&boot, None)?;

    let payload = "x".repeat(100);
    let mut next_id = 0_i64;
    let mut lot = || -> (Vec<i64>, Vec<(String, String)>) {
        let ids: Vec<i64> = (next_id + 1..=next_id + N as i64).collect();
        next_id += N as i64;
        let recs = ids
            .iter()
            .map(|i| (format!("k{i}"), format!("{i}:{payload}")))
            .collect();
        (ids, recs)
    };

    let mut t_idem = Vec::new();
    let mut t_tx = Vec::new();
    let mut t_in_flight = Vec::new();
    // Round 0 warms the producers up (connections, producer ids, partitions
    // added to the transaction); it is not counted.
    for round in 0..=ROUNDS {
        let (_, recs) = lot();
        let t0 = Instant::now();
        all_acked(enqueue_all(&idem, &data, &recs)?).await?;
        let idem_time = t0.elapsed();

        for await_acks in [true, false] {
            let (ids, recs) = lot();
            let prog_rec = progress(0, &ids);
            let t0 = Instant::now();
            tx.begin().await?;
            let mut pending = enqueue_all(&tx.p, &data, &recs)?;
            let rec = FutureRecord::<(), _>::to(&prog)
                .partition(0)
                .payload(&prog_rec);
            pending.push(tx.p.send_result(rec).map_err(|(e, _)| e)?);
            if await_acks {
                all_acked(pending).await?;
                tx.commit().await?;
            } else {
                tx.commit().await?;
                all_acked(pending).await?;
            }
            let took = t0.elapsed();
            if round > 0 {
                if await_acks {
                    &mut t_tx
                } else {
                    &mut t_in_flight
                }
                .push(took);
            }
        }
        if round > 0 {
            t_idem.push(idem_time);
        }
    }

    let got = read_to_end(&boot, &data, 4, Isolation::Committed).await?;
    assert_eq!(got.records.len(), 3 * N * (ROUNDS + 1));
    assert_eq!(got.set().len(), 3 * N * (ROUNDS + 1), "a record twice");

    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let total: f64 = v.iter().map(ms).sum();
        json!({ "median": ms(&v[v.len() / 2]), "min": ms(&v[0]), "max": ms(&v[v.len() - 1]), "total": total })
    };
    let (si, st, sf) = (
        stats(&mut t_idem),
        stats(&mut t_tx),
        stats(&mut t_in_flight),
    );
    let pct = |a: &serde_json::Value, b: &serde_json::Value, k: &str| {
        let (a, b) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
        ((a / b - 1.0) * 1000.0).round() / 10.0
    };
    println!(
        "{}",
        json!({
            "broker": "noida-db 0.2.3",
            "records_per_lot": N,
            "payload_bytes": payload.len(),
            "rounds": ROUNDS,
            "idempotent_ms": si,
            "transactional_ms": st,
            "commit_in_flight_ms": sf,
            "transactional_overhead_pct": { "median": pct(&st, &si, "median"), "total": pct(&st, &si, "total") },
        })
    );
    Ok(())
}

/// (f) Opening a lane reads only the tail of its progress partition
/// (`outbox_kafka`'s `read_last`, through `KafkaBroker::read_lane_progress`):
/// a busy lane writes one record per lot, and reading from the beginning
/// made a lane slower to open the longer it had run. The window starts 64
/// offsets before the last stable offset; when it holds no committed record
/// (here: 100 aborted lots after the last committed one), it grows 8 times
/// until it does, or reaches the start. The aborted records are not ids, so
/// taking one for the last lot would fail the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lanes_progress_is_read_from_its_tail() -> R {
    let boot = bootstrap();
    let prog = unique("tx.tail");
    create_topic(&boot, &prog, 1).await?;
    let kafka = outbox_kafka::KafkaBroker::new(&boot);
    assert_eq!(kafka.read_lane_progress(&prog, 0).await?, (vec![], 0));

    let a = Tx::init(&boot, &unique("app.tail.0")).await?;
    let lots = 200;
    for i in 1..=lots {
        a.begin().await?;
        send_acked(&a.p, &prog, Some(0), &[i.to_string()]).await?;
        a.commit().await?;
    }
    let (ids, read) = kafka.read_lane_progress(&prog, 0).await?;
    assert_eq!(ids, [lots]);
    assert!(
        (1..=32).contains(&read),
        "{read} records read: the first window holds 32 lots"
    );

    for _ in 0..100 {
        a.begin().await?;
        send_acked(&a.p, &prog, Some(0), &["aborted".to_owned()]).await?;
        a.abort().await?;
    }
    let (ids, read) = kafka.read_lane_progress(&prog, 0).await?;
    assert_eq!(
        ids,
        [lots],
        "the last committed lot, behind 100 aborted ones"
    );
    assert!(
        read < usize::try_from(lots)?,
        "{read} records read: not the whole partition"
    );
    println!("{read} of {lots} committed records read behind 100 aborted lots");
    Ok(())
}
