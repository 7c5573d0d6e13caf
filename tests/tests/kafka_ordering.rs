//! Keys, partitions and per-key order of `outbox-kafka` against a real
//! Kafka-protocol broker (`KAFKA_BOOTSTRAP`; scripts/test.sh starts Tansu)
//! and real PostgreSQL.
//!
//! - A relayed row's record key is its ordering key (`PublishOptions::key`)
//!   unless the handler sets `Response::key`.
//! - The partition is the Java client's default partitioner's:
//!   `toPositive(murmur2(key)) % partitions` (librdkafka `murmur2_random`,
//!   outbox-kafka's default), so Java, Python and Rust producers agree.
//! - The records of one key reach their partition in publish (commit) order
//!   through an ordered subscriber.

#![allow(clippy::unwrap_used)]

use tests::kafka as support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{App, BoxError, Message, PublishOptions, Response, Route};
use outbox_kafka::KafkaBroker;
use serde::{Deserialize, Serialize};
use support::{Record, bootstrap, broker_lock, create_topic};
use tests::TestDb;

type R = anyhow::Result<()>;

const PARTITIONS: i32 = 6;

/// The Java client's `Utils.murmur2` (org.apache.kafka.common.utils.Utils):
/// MurmurHash2, 32 bit, seed 0x9747b28c, little-endian 4-byte blocks.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h = SEED ^ u32::try_from(len).unwrap();
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// The Java producer's partition for a keyed record
/// (`BuiltInPartitioner.partitionForKey`): `toPositive(murmur2(key)) % n`
/// with `toPositive(x) = x & 0x7fffffff`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Apache Kafka's own vectors: `UtilsTest.testMurmur2`
/// (apache/kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java).
#[test]
fn murmur2_matches_the_java_client() {
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];
    for (data, want) in cases {
        assert_eq!(murmur2(data), want, "{}", String::from_utf8_lossy(data));
    }
    // Negative hashes are masked, not negated (toPositive, not abs).
    assert_eq!(java_partition(b"21", 1 << 30), -973_932_308 & 0x3fff_ffff);
}

/// What the tests publish: which key the row carries and its place in the
/// key's sequence; `explicit` asks the handler for its own `Response::key`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Event {
    key: Option<String>,
    seq: u32,
    explicit: bool,
}

/// The key the handler sets for an `explicit` event.
fn explicit_key(seq: u32) -> String {
    format!("explicit-{seq}")
}

fn event_of(r: &Record) -> Event {
    serde_json::from_slice(&r.payload)
        .unwrap_or_else(|e| panic!("payload {:?} is not an Event: {e}", r.payload))
}

/// An ordered relay of `queue` to `topic` with 4 workers: each handler
/// waits 0..=4 ms (so that concurrent workers would finish out of order),
/// rows whose id is in `fail_once` fail on their first attempt (retried
/// after 100 ms; the key waits meanwhile), `explicit` events get
/// `Response::key(explicit_key(seq))`, the others no key.
fn relay(
    db: &TestDb,
    queue: &str,
    topic: &str,
    kafka: KafkaBroker,
    fail_once: Arc<Mutex<HashSet<i64>>>,
) -> App {
    let route = Route::builder([queue])
        .ordered(true)
        .max_workers(4)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(100)))
        .publish_to("kafka", topic)
        .handler(move |msg: Message, _ctx| {
            let fail_once = fail_once.clone();
            async move {
                let ev: Event = msg.decode()?;
                tokio::time::sleep(Duration::from_millis(msg.id().rem_euclid(5).unsigned_abs()))
                    .await;
                if msg.attempts_count() == 0 && fail_once.lock().unwrap().remove(&msg.id()) {
                    return Err(BoxError::from(format!(
                        "injected failure of row {}",
                        msg.id()
                    )));
                }
                let explicit = ev.explicit.then(|| explicit_key(ev.seq));
                let resp = Response::new(ev);
                Ok::<_, BoxError>(match explicit {
                    Some(k) => resp.key(k),
                    None => resp,
                })
            }
        });
    App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(kafka.connect())
}

/// Publishes `ev` in its own transaction, with its key as the ordering key.
async fn publish(db: &TestDb, queue: &str, ev: &Event) -> anyhow::Result<i64> {
    let mut opts = PublishOptions::new();
    if let Some(k) = &ev.key {
        opts = opts.key(k.clone());
    }
    let mut tx = db.pool.begin().await?;
    let id = db
        .broker
        .publish_with(ev, queue, &opts, &mut *tx)
        .await?
        .expect("a publish without a timer returns its row id");
    tx.commit().await?;
    Ok(id)
}

/// Reads `topic` until every row of `ids` arrived, then 1 s more.
async fn read_all(boot: &str, topic: &str, ids: &BTreeSet<i64>) -> anyhow::Result<Vec<Record>> {
    support::read_ids(
        boot,
        topic,
        ids,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await
}

/// Keyed rows are relayed with their ordering key as the record key, on the
/// Java client's murmur2 partition; a handler's `Response::key` replaces the
/// row's key (and so the partition); keyless rows stay keyless; the records
/// of each key are on one partition in publish order, although the relay
/// runs 4 workers with random handler times and some heads fail once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_ordering_key_on_the_java_partition_in_publish_order() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("ordering");
    create_topic(&boot, &topic, PARTITIONS).await?;

    const KEYS: u32 = 12;
    const PER_KEY: u32 = 10;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("order-{k}")).collect();
    assert!(keys.iter().any(|k| k == "order-7"));
    // The keys cover several partitions, so a wrong partitioner shows.
    let spread: BTreeSet<i32> = keys
        .iter()
        .map(|k| java_partition(k.as_bytes(), PARTITIONS))
        .collect();
    assert!(spread.len() >= 3, "keys on partitions {spread:?} only");

    let fail_once = Arc::new(Mutex::new(HashSet::new()));
    let app = relay(
        &db,
        "orders",
        &topic,
        support::test_kafka(&boot),
        fail_once.clone(),
    );
    let stop = app.handle();
    let run = tokio::spawn(app.run());

    // Round robin over the keys, one transaction per event, while the relay
    // runs; the third event of every third key fails once.
    let mut sent: BTreeMap<i64, Event> = BTreeMap::new();
    for seq in 0..PER_KEY {
        for (i, key) in keys.iter().enumerate() {
            let ev = Event {
                key: Some(key.clone()),
                seq,
                explicit: false,
            };
            let id = publish(&db, "orders", &ev).await?;
            if seq == 2 && i % 3 == 0 {
                fail_once.lock().unwrap().insert(id);
            }
            sent.insert(id, ev);
        }
        // A row with an ordering key whose handler sets its own key.
        let ev = Event {
            key: Some("order-explicit".to_owned()),
            seq,
            explicit: true,
        };
        sent.insert(publish(&db, "orders", &ev).await?, ev);
        if seq % 2 == 0 {
            let ev = Event {
                key: None,
                seq,
                explicit: false,
            };
            sent.insert(publish(&db, "orders", &ev).await?, ev);
        }
    }

    let ids: BTreeSet<i64> = sent.keys().copied().collect();
    let records = read_all(&boot, &topic, &ids).await?;
    assert!(
        db.drained(Duration::from_secs(10)).await,
        "rows left in the table: {}",
        db.count().await?
    );
    assert_eq!(db.dlq_count().await?, 0);
    assert!(
        fail_once.lock().unwrap().is_empty(),
        "some injected failures never happened"
    );
    stop.shutdown();
    run.await??;

    // key -> the sequence numbers in offset order on its partition
    let mut per_key: BTreeMap<String, Vec<(i32, i64, u32)>> = BTreeMap::new();
    let mut keyless = BTreeSet::new();
    for r in &records {
        let ev = event_of(r);
        assert_eq!(sent.get(&r.outbox_id()), Some(&ev), "record {r:?}");
        let want_key = match (&ev.key, ev.explicit) {
            (_, true) => Some(explicit_key(ev.seq)),
            (Some(k), false) => Some(k.clone()),
            (None, false) => None,
        };
        assert_eq!(
            r.key.as_deref().map(String::from_utf8_lossy).as_deref(),
            want_key.as_deref(),
            "record key of {ev:?}"
        );
        let Some(key) = want_key else {
            keyless.insert(r.outbox_id());
            continue;
        };
        assert_eq!(
            r.partition,
            java_partition(key.as_bytes(), PARTITIONS),
            "partition of key {key} ({ev:?})"
        );
        if !ev.explicit {
            per_key
                .entry(key)
                .or_default()
                .push((r.partition, r.offset, ev.seq));
        }
    }
    assert_eq!(keyless.len(), usize::try_from(PER_KEY.div_ceil(2))?);
    assert_eq!(per_key.len(), keys.len());
    for (key, mut got) in per_key {
        got.sort_unstable();
        let seqs: Vec<u32> = got.iter().map(|(_, _, s)| *s).collect();
        // At least once: a copy may repeat, but nothing comes before an
        // earlier event of its key.
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "key {key} out of publish order: {seqs:?}"
        );
        let distinct: Vec<u32> = seqs
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(distinct, (0..PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
    println!("{} records, keys on partitions {spread:?}", records.len());
    Ok(())
}

/// `set("partitioner", ..)` replaces the murmur2 default: with librdkafka's
/// own `consistent_random` (CRC32) each key still stays on one partition,
/// but not on the Java client's for every key. Also shows that the test
/// above tells the partitioners apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioner_set_by_the_user_wins() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("ordering-crc");
    create_topic(&boot, &topic, PARTITIONS).await?;

    let kafka = support::test_kafka(&boot).set("partitioner", "consistent_random");
    let app = relay(
        &db,
        "orders",
        &topic,
        kafka,
        Arc::new(Mutex::new(HashSet::new())),
    );
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut ids = BTreeSet::new();
    for seq in 0..2 {
        for k in 0..12 {
            let ev = Event {
                key: Some(format!("order-{k}")),
                seq,
                explicit: false,
            };
            ids.insert(publish(&db, "orders", &ev).await?);
        }
    }
    let records = read_all(&boot, &topic, &ids).await?;
    stop.shutdown();
    run.await??;

    let mut partitions: BTreeMap<Vec<u8>, BTreeSet<i32>> = BTreeMap::new();
    for r in &records {
        let key = r.key.clone().expect("every record has a key");
        partitions.entry(key).or_default().insert(r.partition);
    }
    assert_eq!(partitions.len(), 12);
    let mut off_java = 0;
    for (key, parts) in &partitions {
        assert_eq!(parts.len(), 1, "{key:?} on partitions {parts:?}");
        if !parts.contains(&java_partition(key, PARTITIONS)) {
            off_java += 1;
        }
    }
    assert!(
        off_java > 0,
        "consistent_random put every key on its murmur2 partition: {partitions:?}"
    );
    Ok(())
}
