//! What a Kafka relay logs, against the real broker (`KAFKA_BOOTSTRAP`) and
//! PostgreSQL: one DEBUG line per relayed record (topic, partition, offset,
//! outbox id, inside the `outbox.deliver` span that names the queue) and
//! the engine's INFO activity summary (acked, retried, dead-lettered per
//! subscriber), the counterpart of FastStream's `Received` / `Processed`.
//!
//! The lines are read as a user sees them: the `tracing_subscriber::fmt`
//! output, captured in memory.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{BoxError, Message, Response, Route};
use tests::kafka::{self as support, TopicReader, bootstrap, broker_lock, create_topic};
use tests::{RunningApp, TestDb, wait_until};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

type R = anyhow::Result<()>;

/// Everything the fmt layer wrote.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the process's tracing subscriber (each test runs in its own
/// process under nextest): the fmt output of `filter`, into a buffer.
fn capture(filter: &str) -> Buffer {
    let buf = Buffer::default();
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(buf.clone()),
        )
        .init();
    buf
}

/// The value of `name=` in a fmt line (up to the next space).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split([' ', '}', ':']).next()
}

/// The sum of the numeric field `name` over `lines`.
fn total(lines: &[&String], name: &str) -> u64 {
    lines
        .iter()
        .filter_map(|l| field(l, name))
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_logs_each_record_at_debug_and_a_summary_at_info() -> R {
    let logs = capture("info,outbox_kafka=debug");
    outbox_core::telemetry::set_activity_summary_interval(Some(Duration::from_millis(500)));
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("logs");
    create_topic(&boot, &topic, 1).await?;

    // 1, 4, 5: relayed at once. 2: fails once, then relayed. 3: fails
    // twice and goes to the dead-letter table (two attempts at most).
    let route = Route::builder(["orders"])
        .name("log_relay")
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(100)).max_attempts(2))
        .publish_to("kafka", topic.clone())
        .handler(|msg: Message, _ctx| async move {
            let v: i64 = msg.decode()?;
            if v == 3 || (v == 2 && msg.deliveries_count() == 1) {
                return Err::<Response<i64>, BoxError>(format!("failing {v}").into());
            }
            Ok(Response::new(v))
        });
    let running = RunningApp::start(
        db.app()
            .subscriber(route)
            .on_startup(support::test_kafka(&boot).connect()),
    );

    let mut ids = Vec::new();
    let mut tx = db.pool.begin().await?;
    for v in 1..=5_i64 {
        ids.push(db.broker.publish(&v, "orders", &mut *tx).await?);
    }
    tx.commit().await?;

    let mut reader = TopicReader::new(&boot, &topic).await?;
    assert!(
        reader
            .read_until(Duration::from_secs(60), |r| r.len() >= 4)
            .await?,
        "only {} of 4 records arrived",
        reader.records.len()
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            db.count().await.unwrap() == 0 && db.dlq_count().await.unwrap() == 1
        })
        .await,
        "rows left: {}, dead letters: {}",
        db.count().await?,
        db.dlq_count().await?
    );
    // A periodic summary line comes while the app runs.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            logs.lines()
                .iter()
                .any(|l| l.contains("outbox activity") && l.contains("last=false"))
        })
        .await,
        "no periodic summary:\n{}",
        logs.lines().join("\n")
    );
    running.stop().await?;

    let lines = logs.lines();
    let all = lines.join("\n");

    // DEBUG: one line per relayed record, with where Kafka put it.
    let relayed: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("relayed to Kafka"))
        .collect();
    assert_eq!(relayed.len(), 4, "{all}");
    let mut relayed_ids: Vec<i64> = Vec::new();
    for l in &relayed {
        assert!(l.contains(" DEBUG "), "{l}");
        assert_eq!(field(l, "topic"), Some(topic.as_str()), "{l}");
        assert_eq!(field(l, "partition"), Some("0"), "{l}");
        assert!(field(l, "offset").unwrap().parse::<i64>().is_ok(), "{l}");
        assert_eq!(field(l, "transport"), Some("kafka"), "{l}");
        // The span of the delivery names the queue and the subscriber.
        assert!(l.contains("outbox.deliver{"), "{l}");
        assert_eq!(field(l, "queue"), Some("orders"), "{l}");
        relayed_ids.push(field(l, "outbox_id").unwrap().parse()?);
    }
    relayed_ids.sort_unstable();
    let mut expected: Vec<i64> = vec![ids[0], ids[1], ids[3], ids[4]];
    expected.sort_unstable();
    assert_eq!(relayed_ids, expected, "{all}");
    // Each line's offset is the one its record has on the topic.
    let offsets: std::collections::BTreeMap<i64, i64> = reader
        .records
        .iter()
        .map(|r| (r.outbox_id(), r.offset))
        .collect();
    for l in &relayed {
        let id: i64 = field(l, "outbox_id").unwrap().parse()?;
        let o: i64 = field(l, "offset").unwrap().parse()?;
        assert_eq!(offsets.get(&id), Some(&o), "{l}");
    }

    // INFO: the summaries add up to what happened, the last one at stop.
    let summaries: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("outbox activity"))
        .collect();
    assert!(!summaries.is_empty(), "{all}");
    for l in &summaries {
        assert!(l.contains(" INFO "), "{l}");
        assert!(l.contains("outbox_core::summary"), "{l}");
        assert_eq!(field(l, "subscriber"), Some("log_relay"), "{l}");
    }
    assert_eq!(total(&summaries, "acked"), 4, "{all}");
    assert_eq!(total(&summaries, "retried"), 2, "{all}");
    assert_eq!(total(&summaries, "dead_lettered"), 1, "{all}");
    assert_eq!(total(&summaries, "deleted"), 0, "{all}");
    // Nothing to say, nothing said: no summary line has only zeros.
    for l in &summaries {
        let sum: u64 = ["acked", "retried", "dead_lettered", "deleted"]
            .iter()
            .map(|f| field(l, f).unwrap().parse::<u64>().unwrap())
            .sum();
        assert!(sum > 0, "{l}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_logs_no_summary_and_none_when_turned_off() -> R {
    let logs = capture("warn,outbox_core::summary=info");
    outbox_core::telemetry::set_activity_summary_interval(Some(Duration::from_millis(200)));
    let db = TestDb::new().await?;
    let seen = Arc::new(Mutex::new(0));
    let s = seen.clone();
    let idle = Route::builder(["idle"])
        .name("idle_sub")
        .handler(move |_m: Message, _ctx| {
            *s.lock().unwrap() += 1;
            async { Ok::<_, BoxError>(()) }
        });
    let running = RunningApp::start(db.app().subscriber(idle));
    // Several intervals without a row.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    running.stop().await?;
    let lines = logs.lines();
    assert!(
        !lines.iter().any(|l| l.contains("outbox activity")),
        "{}",
        lines.join("\n")
    );

    // Turned off: rows handled, no summary either (not even at stop).
    outbox_core::telemetry::set_activity_summary_interval(None);
    let running = RunningApp::start(
        db.app().subscriber(
            Route::builder(["off"])
                .name("off_sub")
                .min_fetch_interval(Duration::from_millis(20))
                .handler(|_m: Message, _ctx| async { Ok::<_, BoxError>(()) }),
        ),
    );
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, "off", &mut conn).await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    running.stop().await?;
    let lines = logs.lines();
    assert!(
        !lines.iter().any(|l| l.contains("outbox activity")),
        "{}",
        lines.join("\n")
    );
    assert_eq!(*seen.lock().unwrap(), 0);
    Ok(())
}
