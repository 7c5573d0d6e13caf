//! Broker outages against the real broker (`KAFKA_BOOTSTRAP`): the broker
//! is hung with `scripts/kafka.sh pause` (SIGSTOP) mid-stream, then resumed.
//!
//! Pausing the shared broker stalls every other Kafka test, so these tests
//! take the Kafka test lock exclusively (the others take it shared), and a
//! guard resumes the broker even if a test fails.

#![allow(clippy::unwrap_used)]

use tests::kafka as support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use support::{
    Paused, Relay, bootstrap, broker_lock, create_topic, kafka_sh, read_back, retries_of,
    test_kafka,
};
use tests::{Captured, TestDb, captured, wait_until};

type R = anyhow::Result<()>;

const N: i64 = 120;

/// Publishes `N` rows, one every 25 ms, from a background task.
struct Stream {
    committed: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<BTreeSet<i64>>,
}

impl Stream {
    fn start(db: &TestDb, queue: &'static str) -> Self {
        let (pool, broker) = (db.pool.clone(), db.broker.clone());
        let committed = Arc::new(AtomicI64::new(0));
        let c = committed.clone();
        let task = tokio::spawn(async move {
            let mut ids = BTreeSet::new();
            for v in 0..N {
                let mut tx = pool.begin().await.unwrap();
                ids.insert(broker.publish(&v, queue, &mut *tx).await.unwrap());
                tx.commit().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(25)).await; // a steady stream
            }
            ids
        });
        Self { committed, task }
    }

    /// Waits until at least `n` rows were relayed (committed and deleted).
    async fn relayed_at_least(&self, db: &TestDb, n: i64) {
        let ok = wait_until(Duration::from_secs(30), || async {
            let committed = self.committed.load(Ordering::SeqCst);
            committed - db.count().await.unwrap() >= n
        })
        .await;
        assert!(ok, "the relay did not get going before the outage");
    }

    async fn ids(self) -> anyhow::Result<BTreeSet<i64>> {
        Ok(self.task.await?)
    }
}

/// A 5 s hang shorter than `message.timeout.ms` (30 s): librdkafka holds the
/// records and delivers them after the broker resumes; no nack, no loss, no
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_hang_shorter_than_the_message_timeout_only_delays_delivery() -> R {
    let boot = bootstrap();
    kafka_sh();
    let _lock = broker_lock(true).await?;
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let topic = support::unique_topic("outage.short");
    create_topic(&boot, &topic, 4).await?;
    let queue = "outage_short";

    let relay = Relay::start(&db, queue, &topic, test_kafka(&boot));
    let stream = Stream::start(&db, queue);
    stream.relayed_at_least(&db, 20).await;
    let paused = Paused::pause()?;
    let paused_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await; // the hang under test
    let left_during = db.count().await?;
    paused.resume()?;
    let outage = paused_at.elapsed();

    let ids = stream.ids().await?;
    assert!(left_during > 0, "nothing was waiting during the outage");
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left after the broker resumed: {}",
        db.count().await?
    );
    assert_eq!(db.dlq_count().await?, 0);
    let per_id = read_back(&boot, &topic, &ids).await?;
    assert!(
        per_id.values().all(|n| *n == 1),
        "duplicates after a hang shorter than message.timeout.ms"
    );
    assert_eq!(
        retries_of(queue),
        Vec::<String>::new(),
        "no row should be nacked"
    );
    relay.stop().await?;
    println!(
        "hang of {outage:?} with {left_during} rows waiting: {} rows, no nack, {:?}",
        ids.len(),
        t0.elapsed()
    );
    Ok(())
}

/// A 5 s hang longer than `message.timeout.ms` (1.5 s): publishes time out,
/// rows are nacked and retried every 200 ms, and all arrive once the broker
/// resumes (duplicates allowed: a timed-out record may have been written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_hang_longer_than_the_message_timeout_is_ridden_out_by_retries() -> R {
    let boot = bootstrap();
    kafka_sh();
    let _lock = broker_lock(true).await?;
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let topic = support::unique_topic("outage.long");
    create_topic(&boot, &topic, 4).await?;
    let queue = "outage_long";

    let kafka = test_kafka(&boot).message_timeout(Duration::from_millis(1500));
    let relay = Relay::start(&db, queue, &topic, kafka);
    let stream = Stream::start(&db, queue);
    stream.relayed_at_least(&db, 20).await;
    let paused = Paused::pause()?;
    let paused_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await; // the hang under test
    let nacks_during = retries_of(queue).len();
    paused.resume()?;
    let outage = paused_at.elapsed();

    let ids = stream.ids().await?;
    assert!(nacks_during > 0, "no publish timed out during a 5 s hang");
    // Each error text once per line (a delivery timeout used to repeat
    // librdkafka's text).
    let retries = retries_of(queue);
    assert!(
        retries.iter().any(|l| l.contains("Message timed out")),
        "{retries:#?}"
    );
    for line in retries {
        for text in ["Message production error", "Message timed out"] {
            assert!(line.matches(text).count() <= 1, "{text:?} twice in {line}");
        }
    }
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left after the broker resumed: {}",
        db.count().await?
    );
    assert_eq!(db.dlq_count().await?, 0);
    let per_id = read_back(&boot, &topic, &ids).await?;
    let dups: usize = per_id.values().map(|n| n - 1).sum();
    relay.stop().await?;
    println!(
        "hang of {outage:?}: {} nacks, {} rows, {dups} duplicates, {:?}",
        retries_of(queue).len(),
        ids.len(),
        t0.elapsed()
    );
    Ok(())
}

/// Outage visibility: an ~8 s hang with `outage_warning_after(2 s)` logs
/// exactly one WARN naming the transport, the topic and how many messages
/// wait, then exactly one INFO once the broker confirms again; nothing is
/// lost. (The hang is shorter than `message.timeout.ms`, 30 s: the
/// publishes wait in flight the whole time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_hang_logs_one_outage_warning_then_one_recovery() -> R {
    let boot = bootstrap();
    kafka_sh();
    let _lock = broker_lock(true).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("outage.watch");
    create_topic(&boot, &topic, 4).await?;
    let queue = "outage_watch";

    let relay = Relay::start_with(&db, queue, &topic, test_kafka(&boot), |app| {
        app.outage_warning_after(Duration::from_secs(2))
    });
    let of_topic = |c: &Captured| c.fields.get("destination") == Some(&topic);
    let warnings = || {
        captured(|c| {
            c.level == tracing::Level::WARN
                && of_topic(c)
                && c.message.contains("has confirmed nothing")
        })
    };
    let recoveries = || {
        captured(|c| c.level == tracing::Level::INFO && of_topic(c) && c.message.contains("again"))
    };
    let stream = Stream::start(&db, queue);
    stream.relayed_at_least(&db, 20).await;
    assert!(warnings().is_empty(), "a warning while the broker was up");

    let paused = Paused::pause()?;
    let paused_at = Instant::now();
    let warned = wait_until(Duration::from_secs(20), || async { !warnings().is_empty() }).await;
    // The hang under test lasts 8 s, whenever the warning came.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(paused_at.elapsed())).await;
    let recovered_during = recoveries().len();
    paused.resume()?;
    let outage = paused_at.elapsed();
    assert!(warned, "no outage warning during a hang of {outage:?}");
    assert_eq!(recovered_during, 0, "recovered while the broker was paused");

    let ids = stream.ids().await?;
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left after the broker resumed: {}",
        db.count().await?
    );
    let recovered = wait_until(Duration::from_secs(10), || async {
        !recoveries().is_empty()
    })
    .await;
    assert!(recovered, "no recovery INFO after the broker resumed");
    assert_eq!(db.dlq_count().await?, 0);
    read_back(&boot, &topic, &ids).await?;
    relay.stop().await?;

    let warnings = warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let w = &warnings[0];
    println!("{}\n{}", w.message, recoveries()[0].message);
    assert_eq!(w.fields.get("transport").map(String::as_str), Some("kafka"));
    let waiting: u64 = w.fields["waiting"].parse()?;
    assert!(waiting >= 1, "{w:?}");
    assert!(w.fields.contains_key("since"), "{w:?}");
    assert!(
        w.message.contains("transport `kafka`") && w.message.contains(&topic),
        "{w:?}"
    );
    assert!(
        w.message.contains(&format!("{waiting} message(s) wait")),
        "{w:?}"
    );
    let recoveries = recoveries();
    assert_eq!(recoveries.len(), 1, "{recoveries:#?}");
    assert_eq!(
        recoveries[0].fields.get("transport").map(String::as_str),
        Some("kafka")
    );
    let lasted: f64 = recoveries[0].fields["outage_secs"].parse()?;
    assert!(lasted >= 2.0, "{recoveries:?}");
    Ok(())
}
