//! Helpers shared by the Kafka test binaries (`tests/tests/kafka*.rs`).

#![allow(clippy::unwrap_used, missing_debug_implementations)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::time::{Duration, Instant};

use crate::{TestDb, captured};
use anyhow::{Context as _, bail};
use outbox_core::retry::ConstantRetry;
use outbox_core::{App, AppHandle, BoxError, Message, Response, Route};
use outbox_kafka::KafkaBroker;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::task::JoinHandle;

/// `KAFKA_BOOTSTRAP`, or a panic that says how to get a broker. These tests
/// do not skip silently when there is no broker.
pub fn bootstrap() -> String {
    match std::env::var("KAFKA_BOOTSTRAP") {
        Ok(b) if !b.trim().is_empty() => b,
        _ => panic!(
            "KAFKA_BOOTSTRAP is not set: the Kafka tests need a Kafka-protocol broker. Run \
             `bash scripts/test.sh` (it starts one), or `bash scripts/kafka.sh start` and \
             `export KAFKA_BOOTSTRAP=127.0.0.1:9092 OUTBOX_KAFKA_SH=$PWD/scripts/kafka.sh`"
        ),
    }
}

/// `OUTBOX_KAFKA_SH` (path of scripts/kafka.sh), or a panic that says how to set it.
pub fn kafka_sh() -> String {
    match std::env::var("OUTBOX_KAFKA_SH") {
        Ok(p) if !p.trim().is_empty() => p,
        _ => panic!(
            "OUTBOX_KAFKA_SH is not set: the outage tests pause the broker with \
             `scripts/kafka.sh pause|resume`. Run `bash scripts/test.sh`, or \
             `export OUTBOX_KAFKA_SH=$PWD/scripts/kafka.sh`"
        ),
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}.{}", crate::suffix())
}

/// The transport configuration the tests use: quick reconnects (librdkafka's
/// default back-off grows to 10 s, which makes recovery times jumpy).
pub fn test_kafka(bootstrap: &str) -> KafkaBroker {
    KafkaBroker::new(bootstrap)
        .client_id("outbox-tests")
        .set("reconnect.backoff.max.ms", "1000")
}

/// Creates `topic` with `partitions` partitions (replication 1); an existing
/// topic is fine.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    test_kafka(bootstrap)
        .ensure_topic(topic, partitions, 1)
        .await?;
    Ok(())
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    /// The payload as a JSON `i64`.
    pub fn value(&self) -> i64 {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("payload {:?} is not an i64: {e}", self.payload))
    }

    /// The `outbox-id` header as a row id.
    pub fn outbox_id(&self) -> i64 {
        self.headers
            .get("outbox-id")
            .unwrap_or_else(|| panic!("record without outbox-id: {self:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("bad outbox-id in {self:?}: {e}"))
    }
}

/// Reads a topic from the beginning of every partition with `assign()` (no
/// consumer group: Tansu's group joins are slow, and its high watermarks are
/// wrong, so we read until we have what we expect instead).
pub struct TopicReader {
    /// Every partition reader's messages: a record (or why it is malformed),
    /// or the consumer's error.
    rx: tokio::sync::mpsc::UnboundedReceiver<rdkafka::error::KafkaResult<Result<Record, String>>>,
    _readers: Readers,
    pub records: Vec<Record>,
    config: ClientConfig,
    topic: String,
    partitions: Vec<i32>,
}

/// The partition readers' tasks, aborted when the reader is dropped.
struct Readers(Vec<JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for r in &self.0 {
            r.abort();
        }
    }
}

impl TopicReader {
    /// One consumer per partition: a `StreamConsumer` assigned several
    /// partitions was seen to stop delivering some of them under load
    /// (records missing after 30 s while the same read alone took 2 s).
    pub async fn new(bootstrap: &str, topic: &str) -> anyhow::Result<Self> {
        let config = {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", bootstrap)
                .set("group.id", format!("outbox-tests-{}", crate::suffix()))
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .set("reconnect.backoff.max.ms", "1000");
            c
        };
        let probe: StreamConsumer = config.create().context("creating the test consumer")?;
        let t = topic.to_owned();
        let partitions = tokio::task::spawn_blocking(move || {
            let md = probe.fetch_metadata(Some(&t), Duration::from_secs(15))?;
            let parts: Vec<i32> = md
                .topics()
                .iter()
                .filter(|mt| mt.name() == t)
                .flat_map(|mt| mt.partitions().iter().map(|p| p.id()))
                .collect();
            Ok::<_, rdkafka::error::KafkaError>(parts)
        })
        .await?
        .context("fetching the topic's metadata")?;
        if partitions.is_empty() {
            bail!("topic {topic} has no partitions (not created?)");
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut readers = Vec::with_capacity(partitions.len());
        for &p in &partitions {
            let consumer: StreamConsumer = config.create().context("creating the test consumer")?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            consumer.assign(&tpl)?;
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                loop {
                    let got = consumer.recv().await.map(|m| to_record(&m));
                    let failed = got.is_err();
                    if tx.send(got).is_err() {
                        return;
                    }
                    if failed {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        Ok(Self {
            rx,
            _readers: Readers(readers),
            records: Vec::new(),
            config,
            topic: topic.to_owned(),
            partitions,
        })
    }

    /// What a failed read saw: per partition, the records read and the
    /// broker's watermarks (so a record the broker lacks is told apart from
    /// one the reader missed).
    pub async fn report(&self) -> String {
        let probe: StreamConsumer = match self.config.create() {
            Ok(c) => c,
            Err(e) => return format!("(no watermarks: {e})"),
        };
        let (topic, partitions) = (self.topic.clone(), self.partitions.clone());
        let marks = tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .map(|&p| (p, probe.fetch_watermarks(&topic, p, Duration::from_secs(5))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut out = Vec::new();
        for (p, mark) in marks {
            let read: Vec<i64> = self
                .records
                .iter()
                .filter(|r| r.partition == p)
                .map(|r| r.offset)
                .collect();
            out.push(format!(
                "partition {p}: read offsets {read:?}, watermarks {mark:?}"
            ));
        }
        out.join("; ")
    }

    /// Reads until `done(records so far)` or `timeout`; returns whether
    /// `done` became true.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Record]) -> bool,
    ) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.records) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            match tokio::time::timeout(left, self.rx.recv()).await {
                Err(_) => return Ok(done(&self.records)),
                Ok(None) => bail!("every partition reader of the test consumer ended"),
                Ok(Some(Err(e))) => tracing::warn!("test consumer: {e}"),
                Ok(Some(Ok(Err(bad)))) => bail!("malformed record: {bad}"),
                Ok(Some(Ok(Ok(r)))) => self.records.push(r),
            }
        }
    }

    /// Keeps reading for `quiet` and returns how many more records came.
    pub async fn read_for(&mut self, quiet: Duration) -> anyhow::Result<usize> {
        let before = self.records.len();
        self.read_until(quiet, |_| false).await?;
        Ok(self.records.len() - before)
    }
}

/// A consumed message as a [`Record`]; `Err` when a header appears twice.
pub fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> Result<Record, String> {
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for hd in h.iter() {
            let v = hd.value.map(|v| String::from_utf8_lossy(v).into_owned());
            if headers
                .insert(hd.key.to_owned(), v.unwrap_or_default())
                .is_some()
            {
                return Err(format!("header {} appears twice", hd.key));
            }
        }
    }
    Ok(Record {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    })
}

/// Reads until every id of `ids` was seen in an `outbox-id` header.
pub fn has_all_ids(ids: &BTreeSet<i64>) -> impl FnMut(&[Record]) -> bool + '_ {
    move |recs: &[Record]| {
        let seen: BTreeSet<i64> = recs.iter().map(Record::outbox_id).collect();
        ids.is_subset(&seen)
    }
}

/// A lock shared by every Kafka test on this machine: the outage tests take
/// it exclusively (they pause the one broker), the others shared. Released
/// when the returned file is dropped.
pub async fn broker_lock(exclusive: bool) -> anyhow::Result<File> {
    let path = std::env::temp_dir().join("outbox-kafka-tests.lock");
    tokio::task::spawn_blocking(move || {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if exclusive {
            f.lock()?;
        } else {
            f.lock_shared()?;
        }
        Ok(f)
    })
    .await?
}

/// Runs `scripts/kafka.sh ARG`.
pub fn kafka_sh_run(arg: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("bash")
        .arg(kafka_sh())
        .arg(arg)
        .status()
        .with_context(|| format!("running kafka.sh {arg}"))?;
    if !status.success() {
        bail!("kafka.sh {arg} failed: {status}");
    }
    Ok(())
}

/// Pauses the broker (SIGSTOP); resumes it when dropped, even if the test
/// panics, so that a failing test never leaves the shared broker hung.
pub struct Paused(bool);

impl Paused {
    pub fn pause() -> anyhow::Result<Self> {
        kafka_sh_run("pause")?;
        Ok(Self(true))
    }

    pub fn resume(mut self) -> anyhow::Result<()> {
        self.0 = false;
        kafka_sh_run("resume")
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if self.0 {
            let _ = kafka_sh_run("resume");
        }
    }
}

/// An in-process relay `App`.
pub struct Relay {
    pub stop: AppHandle,
    pub run: JoinHandle<outbox_core::Result<()>>,
}

impl Relay {
    /// Relays `queue` to `topic`: 4 workers, retry every 200 ms, forever.
    pub fn start(db: &TestDb, queue: &str, topic: &str, kafka: KafkaBroker) -> Self {
        Self::start_with(db, queue, topic, kafka, |app| app)
    }

    /// [`start`](Self::start), with `configure` applied to the `App`.
    pub fn start_with(
        db: &TestDb,
        queue: &str,
        topic: &str,
        kafka: KafkaBroker,
        configure: impl FnOnce(App) -> App,
    ) -> Self {
        let route = Route::builder([queue])
            .max_workers(4)
            .min_fetch_interval(Duration::from_millis(20))
            .max_fetch_interval(Duration::from_millis(200))
            .retry(ConstantRetry::new(Duration::from_millis(200)))
            .publish_to("kafka", topic)
            .handler(|msg: Message, _ctx| async move {
                let v: i64 = msg.decode()?;
                Ok::<_, BoxError>(Response::new(v).key(format!("k{v}")))
            });
        let app = configure(
            App::new(db.broker.clone())
                .without_discovery()
                .without_signals()
                .subscriber(route)
                .on_startup(kafka.connect()),
        );
        let stop = app.handle();
        Self {
            stop,
            run: tokio::spawn(app.run()),
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.shutdown();
        self.run.await??;
        Ok(())
    }
}

/// Publishes `values` to `queue` in one transaction; returns the row ids.
pub async fn publish(
    db: &TestDb,
    queue: &str,
    values: std::ops::Range<i64>,
) -> anyhow::Result<Vec<i64>> {
    let mut tx = db.pool.begin().await?;
    let mut ids = Vec::new();
    for v in values {
        ids.push(db.broker.publish(&v, queue, &mut *tx).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

/// "outbox handler failed; retrying" warnings of `queue`, with their text.
pub fn retries_of(queue: &str) -> Vec<String> {
    captured(|c| {
        c.fields.get("queue").map(String::as_str) == Some(queue)
            && c.message.starts_with("outbox handler failed; retrying")
    })
    .into_iter()
    .map(|c| c.message)
    .collect()
}

/// Every record of `topic`, read until each id of `ids` arrived (panics
/// after `timeout` otherwise), then for `quiet` more (late duplicates).
pub async fn read_ids(
    bootstrap: &str,
    topic: &str,
    ids: &BTreeSet<i64>,
    timeout: Duration,
    quiet: Duration,
) -> anyhow::Result<Vec<Record>> {
    let mut reader = TopicReader::new(bootstrap, topic).await?;
    if !reader.read_until(timeout, has_all_ids(ids)).await? {
        let seen: BTreeSet<i64> = reader.records.iter().map(Record::outbox_id).collect();
        panic!(
            "records missing: got {} for {} rows; ids missing {:?}; {}",
            reader.records.len(),
            ids.len(),
            ids.difference(&seen).collect::<Vec<_>>(),
            reader.report().await
        );
    }
    reader.read_for(quiet).await?;
    Ok(reader.records)
}

/// Records per outbox id; panics if an id of `ids` is missing.
pub async fn read_back(
    bootstrap: &str,
    topic: &str,
    ids: &BTreeSet<i64>,
) -> anyhow::Result<BTreeMap<i64, usize>> {
    let records = read_ids(
        bootstrap,
        topic,
        ids,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await?;
    let mut per_id = BTreeMap::new();
    for r in &records {
        assert_eq!(r.key, Some(format!("k{}", r.value()).into_bytes()));
        *per_id.entry(r.outbox_id()).or_insert(0) += 1;
    }
    let seen: BTreeSet<i64> = per_id.keys().copied().collect();
    assert_eq!(&seen, ids, "records for rows that were never published");
    Ok(per_id)
}
