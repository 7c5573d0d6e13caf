//! Exactly-once lanes on Kafka ([`KafkaBroker::transactional`](crate::KafkaBroker::transactional)):
//! a transactional producer per lane, each lot's records plus one progress
//! record in one Kafka transaction (`docs/exactly-once.md`).
//!
//! - `transactional.id` = `<app>.<table>.<subscriber>.<lane>`: stable, so
//!   the next owner of a lane fences the previous one (`init_transactions`
//!   aborts its open transaction for good);
//! - the progress topic `<app>.<table>.<subscriber>.progress` has one
//!   partition per lane (a read_committed reader stops at the first open
//!   transaction of any producer of a partition), `cleanup.policy=compact`,
//!   record key = the lane, value = the lot's ids (`1,2,3`), and is created
//!   when missing;
//! - opening a lane reads its partition's tail to the end with
//!   `read_committed` after `init_transactions` ([`read_last`]): the last
//!   record's ids are the lane's last committed lot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use outbox_core::transport::{Lane, LaneId, Lanes, LotOutcome, Opened};
use outbox_core::{BoxError, BusRejection, Outgoing};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Settings;
use crate::context::KafkaContext;
use crate::error::{Error, Result};

type KafkaProducer = FutureProducer<KafkaContext>;

/// Wait between two enqueue attempts while the producer's queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(20);

/// How much longer than `message.timeout.ms` a lot waits for its delivery
/// reports (as a plain publish: [`DELIVERY_REPORT_MARGIN`](crate::DELIVERY_REPORT_MARGIN)).
const REPORT_MARGIN: Duration = Duration::from_secs(1);

/// `transaction.timeout.ms` of the lanes' producers (Kafka aborts a
/// transaction left open longer; noida-db does not, fencing does).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The lanes of one transactional Kafka transport.
#[derive(Clone)]
pub(crate) struct KafkaLanes {
    inner: Arc<Inner>,
}

struct Inner {
    /// The application id ([`KafkaBroker::transactional`](crate::KafkaBroker::transactional)).
    app: String,
    settings: Settings,
    /// The producer configuration (without `transactional.id`).
    config: ClientConfig,
}

impl KafkaLanes {
    pub(crate) fn new(app: String, settings: Settings, config: ClientConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                app,
                settings,
                config,
            }),
        }
    }
}

/// `name` with every character Kafka does not allow in a topic or
/// transactional id (`a-z A-Z 0-9 . _ -`) replaced by `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The lane's `transactional.id` and its progress topic.
pub(crate) fn names(app: &str, id: &LaneId) -> (String, String) {
    let unit = sanitize(&format!("{app}.{}", id.unit()));
    (format!("{unit}.{}", id.lane), format!("{unit}.progress"))
}

impl Lanes for KafkaLanes {
    fn open(&self, id: LaneId) -> BoxFuture<'static, std::result::Result<Opened, BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.open(id).await {
                Ok((lane, ids)) => Ok((Box::new(lane) as Box<dyn Lane>, ids)),
                Err(e) => Err(Box::new(e) as BoxError),
            }
        })
    }
}

impl Inner {
    async fn open(self: Arc<Self>, id: LaneId) -> Result<(KafkaLane, Vec<i64>)> {
        let (txid, progress) = names(&self.app, &id);
        let fail =
            |step: &'static str, reason: String, source: Option<KafkaError>| Error::Transaction {
                transactional_id: txid.clone(),
                step,
                reason,
                source: source.map(Box::new),
            };
        let t0 = Instant::now();
        let partitions = i32::try_from(id.lanes).unwrap_or(i32::MAX);
        let partition = i32::try_from(id.lane).unwrap_or(i32::MAX);
        self.ensure_progress(&progress, partitions)
            .await
            .map_err(|(reason, e)| fail("creating the progress topic", reason, e))?;
        let mut config = self.config.clone();
        config
            .set("transactional.id", &txid)
            .set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            // A lane enqueues its whole lot, then waits for it: lingering
            // would only hold the lot back (5 ms of every lot by default).
            .set("linger.ms", "0");
        let producer: KafkaProducer = config
            .create_with_context(KafkaContext::new(&self.settings.name))
            .map_err(|e| self.settings.config_error(e))?;
        let ensured = t0.elapsed();
        let budget = self.settings.connect_timeout;
        let p = producer.clone();
        match tokio::task::spawn_blocking(move || p.init_transactions(budget)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                drop_off_runtime(producer);
                return Err(fail("init_transactions", e.to_string(), Some(e)));
            }
            Err(e) => {
                drop_off_runtime(producer);
                return Err(fail("init_transactions", e.to_string(), None));
            }
        }
        let inited = t0.elapsed();
        let LastProgress { ids, records_read } = match read_last(
            &self.settings,
            &format!("{txid}.progress-reader"),
            &progress,
            partition,
        )
        .await
        {
            Ok(found) => found,
            Err((reason, e)) => {
                drop_off_runtime(producer);
                return Err(fail("reading the lane's progress", reason, e));
            }
        };
        tracing::debug!(
            transactional_id = %txid, last_lot = ids.len(), progress_records_read = records_read,
            progress_topic_ms = ensured.as_secs_f64() * 1000.0,
            init_transactions_ms = (inited - ensured).as_secs_f64() * 1000.0,
            progress_read_ms = (t0.elapsed() - inited).as_secs_f64() * 1000.0,
            "Kafka lane opened"
        );
        Ok((
            KafkaLane {
                producer: Some(producer),
                txid,
                progress,
                partition,
                lane: id.lane,
                transport: self.settings.name.clone(),
                message_timeout: self.settings.effective_message_timeout(),
                budget,
            },
            ids,
        ))
    }

    /// Creates the progress topic (`partitions` partitions, compacted)
    /// unless it exists, and checks it has at least that many partitions.
    async fn ensure_progress(
        &self,
        topic: &str,
        partitions: i32,
    ) -> std::result::Result<(), (String, Option<KafkaError>)> {
        let admin: Admin = Arc::new(
            self.settings
                .admin_config()
                .map_err(|e| (e.to_string(), None))?
                .create()
                .map_err(|e| (e.to_string(), Some(e)))?,
        );
        let timeout = self.settings.connect_timeout;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
            .set("cleanup.policy", "compact");
        let opts = AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout));
        let answer = tokio::time::timeout(timeout, admin.create_topics([&new], &opts)).await;
        // Asked only after the creation: a metadata request for a missing
        // topic can create it with the broker's default partition count
        // (auto.create.topics.enable; noida-db does).
        let counted = count_partitions(&admin, topic, timeout).await;
        drop_admin(admin);
        // A topic that exists with enough partitions is fine even when the
        // creation failed (no permission for CreateTopics, a cluster that
        // does not implement it, as rdkafka's MockCluster).
        if matches!(counted, Ok(n) if n >= partitions) {
            return Ok(());
        }
        match answer {
            Ok(Ok(results)) => {
                for r in results {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((_, code)) => {
                            return Err((format!("the cluster refused it: {code}"), None));
                        }
                    }
                }
            }
            Ok(Err(e)) => return Err((e.to_string(), Some(e))),
            Err(_) => return Err((format!("no answer within {timeout:?}"), None)),
        }
        match counted {
            Ok(n) if n >= partitions => Ok(()),
            Ok(n) => Err((
                format!(
                    "it has {n} partitions and the subscriber has {partitions} lanes (one \
                     partition per lane); add partitions or give the subscriber as many lanes"
                ),
                None,
            )),
            Err(e) => Err((e.to_string(), Some(e))),
        }
    }
}

/// What [`read_last`] found: the ids of the last committed progress record
/// (empty when there is none) and how many records it read to find them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LastProgress {
    pub(crate) ids: Vec<i64>,
    pub(crate) records_read: usize,
}

/// The first window [`read_last`] reads at the end of a progress partition,
/// in offsets; each further window is 8 times larger. A committed lot takes
/// two offsets (its progress record and the commit marker).
const TAIL_WINDOW: i64 = 64;

/// The ids of the last record of `partition` of `topic` read with
/// `read_committed`, reading only the partition's tail: from `TAIL_WINDOW`
/// offsets before the end (the high watermark; the last stable offset with
/// `read_committed`) to the end itself (the partition-EOF event), then from
/// further back while that window held no committed record (only aborted
/// lots, or nothing), down to the start. The window's start comes from the
/// watermarks, the end from the read: a broker whose watermark is wrong
/// (Tansu's lags behind its last batch) only makes the window larger, and
/// without watermarks the read starts at the beginning. A busy lane writes
/// one record per lot, and compaction only cleans closed segments: reading
/// from the beginning made opening a lane slower the longer it had run.
pub(crate) async fn read_last(
    settings: &Settings,
    group: &str,
    topic: &str,
    partition: i32,
) -> std::result::Result<LastProgress, (String, Option<KafkaError>)> {
    let mut c = settings.admin_config().map_err(|e| (e.to_string(), None))?;
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // The end of an empty partition is known from a Fetch answer,
        // which the broker holds for up to `fetch.wait.max.ms` (500 ms by
        // default) waiting for data: a lane took that much longer to open
        // than its neighbours.
        .set("fetch.wait.max.ms", "20");
    let consumer: BaseConsumer<ProgressReader> = c
        .create_with_context(ProgressReader)
        .map_err(|e| (e.to_string(), Some(e)))?;
    let topic = topic.to_owned();
    let budget = settings.connect_timeout * 3;
    let read = tokio::task::spawn_blocking(move || -> KafkaResult<(Option<Vec<u8>>, usize)> {
        let deadline = Instant::now() + budget;
        let marks = match consumer.fetch_watermarks(&topic, partition, budget) {
            Ok(marks) => Some(marks),
            Err(e) => {
                tracing::debug!(
                    "progress reader of {topic}: no watermarks ({e}); reading from the start"
                );
                None
            }
        };
        let mut window = TAIL_WINDOW;
        let mut records_read = 0;
        loop {
            let start = match marks {
                Some((low, high)) if high.saturating_sub(window) > low => {
                    Offset::Offset(high.saturating_sub(window))
                }
                _ => Offset::Beginning,
            };
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, start)?;
            consumer.assign(&tpl)?;
            let mut last = None;
            let read_before = records_read;
            loop {
                if Instant::now() > deadline {
                    return Err(KafkaError::MessageConsumption(
                        RDKafkaErrorCode::OperationTimedOut,
                    ));
                }
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break,
                    Some(Err(KafkaError::PartitionEOF(_))) => {}
                    Some(Err(e)) => {
                        tracing::debug!("progress reader of {topic}: {e}");
                    }
                    Some(Ok(m)) if m.partition() == partition => {
                        records_read += 1;
                        last = m.payload().map(<[u8]>::to_vec);
                    }
                    Some(Ok(_)) => {}
                }
            }
            if records_read > read_before || start == Offset::Beginning {
                drop(consumer);
                return Ok((last, records_read));
            }
            window = window.saturating_mul(8);
        }
    })
    .await;
    let (last, records_read) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Err((format!("no end within {budget:?}: {e}"), Some(e))),
        Err(e) => return Err((e.to_string(), None)),
    };
    let Some(bytes) = last else {
        return Ok(LastProgress {
            ids: Vec::new(),
            records_read,
        });
    };
    let ids = parse_ids(&bytes).ok_or_else(|| {
        (
            format!(
                "the last progress record is not a list of ids: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            None,
        )
    })?;
    Ok(LastProgress { ids, records_read })
}

type Admin = Arc<AdminClient<DefaultClientContext>>;

/// The partitions of `topic` (0 when it does not exist), asked on the
/// blocking pool.
async fn count_partitions(admin: &Admin, topic: &str, timeout: Duration) -> KafkaResult<i32> {
    let (admin, topic) = (admin.clone(), topic.to_owned());
    let asked = tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(Some(&topic), timeout)
            .map(|md| {
                md.topics()
                    .first()
                    .filter(|t| t.error().is_none())
                    .map_or(0, |t| {
                        i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)
                    })
            })
    })
    .await;
    asked.unwrap_or(Err(KafkaError::Canceled))
}

/// Dropping an admin client joins its thread: off the async workers.
fn drop_admin(admin: Admin) {
    tokio::task::spawn_blocking(move || drop(admin));
}

/// The context of the progress reader: the end of the partition is what it
/// waits for, not an error to log (librdkafka also reports it globally).
struct ProgressReader;

impl ClientContext for ProgressReader {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::PartitionEOF) => {}
            _ => tracing::warn!("progress reader: {error}: {reason}"),
        }
    }
}

impl ConsumerContext for ProgressReader {}

/// The value of a progress record: the lot's ids, comma-separated.
fn format_ids(ids: &[i64]) -> String {
    let mut s = String::with_capacity(ids.len() * 8);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s
}

/// The ids of a progress record's value; `None` if it is not such a list.
fn parse_ids(bytes: &[u8]) -> Option<Vec<i64>> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse::<i64>().ok())
        .collect()
}

/// One opened Kafka lane: its transactional producer.
struct KafkaLane {
    /// `None` only while dropping.
    producer: Option<KafkaProducer>,
    txid: String,
    progress: String,
    partition: i32,
    lane: u32,
    transport: String,
    message_timeout: Duration,
    /// The budget of each blocking transactional call.
    budget: Duration,
}

impl Drop for KafkaLane {
    fn drop(&mut self) {
        if let Some(p) = self.producer.take() {
            drop_off_runtime(p);
        }
    }
}

/// Dropping the last handle of a producer joins its threads: off the
/// async workers when there is a runtime.
fn drop_off_runtime(producer: KafkaProducer) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || drop(producer));
        }
        Err(_) => drop(producer),
    }
}

/// A transactional call's failure that only an abort fixes.
fn requires_abort(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd) if rd.txn_requires_abort())
}

/// Delivery errors that are a consequence of another record's failure (the
/// transaction entered an error state and purged the rest).
fn is_consequence(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::PurgeQueue
                | RDKafkaErrorCode::PurgeInflight
                | RDKafkaErrorCode::State
                | RDKafkaErrorCode::Fatal
        )
    )
}

impl KafkaLane {
    fn lost(&self, step: &'static str, e: KafkaError) -> BoxError {
        Box::new(Error::Transaction {
            transactional_id: self.txid.clone(),
            step,
            reason: e.to_string(),
            source: Some(Box::new(e)),
        })
    }

    async fn blocking(
        &self,
        f: impl FnOnce(&KafkaProducer) -> KafkaResult<()> + Send + 'static,
    ) -> KafkaResult<()> {
        let Some(p) = self.producer.clone() else {
            return Err(KafkaError::Canceled);
        };
        match tokio::task::spawn_blocking(move || f(&p)).await {
            Ok(r) => r,
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    /// Aborts the open transaction; `Err`: the lane is lost.
    async fn abort(&self) -> std::result::Result<(), BoxError> {
        let budget = self.budget;
        self.blocking(move |p| p.abort_transaction(budget))
            .await
            .map_err(|e| self.lost("abort_transaction", e))
    }

    /// `e`, a refused record's delivery error, as the engine takes it: a
    /// [`BusRejection`] when retrying cannot help.
    fn refusal(&self, topic: &str, e: KafkaError) -> BoxError {
        let err = Error::Delivery {
            topic: topic.to_owned(),
            source: Box::new(e),
        };
        if err.is_retryable() {
            Box::new(err)
        } else {
            Box::new(BusRejection::new(self.transport.clone(), err))
        }
    }

    async fn commit_lot(
        &mut self,
        records: Vec<Outgoing>,
        ids: Vec<i64>,
    ) -> std::result::Result<LotOutcome, BoxError> {
        let Some(producer) = self.producer.clone() else {
            return Err("the lane's producer is closed".into());
        };
        let began = tokio::time::Instant::now();
        producer
            .begin_transaction()
            .map_err(|e| self.lost("begin_transaction", e))?;
        let deadline = tokio::time::Instant::now() + self.message_timeout;
        let progress_value = format_ids(&ids);
        let lane_key = self.lane.to_string();
        let mut pending = Vec::with_capacity(records.len() + 1);
        let mut enqueue_failed: Option<(usize, KafkaError)> = None;
        for i in 0..=records.len() {
            let mut headers = OwnedHeaders::new();
            let record: FutureRecord<'_, [u8], [u8]> = match records.get(i) {
                Some(m) => {
                    let mut h = OwnedHeaders::new_with_capacity(m.headers.len());
                    for (k, v) in &m.headers {
                        h = h.insert(Header {
                            key: k.as_str(),
                            value: Some(v.as_str()),
                        });
                    }
                    headers = h;
                    let r = FutureRecord::to(&m.destination).payload(&m.payload[..]);
                    match m.key.as_deref() {
                        Some(k) => r.key(k),
                        None => r,
                    }
                }
                None => FutureRecord::to(&self.progress)
                    .partition(self.partition)
                    .key(lane_key.as_bytes())
                    .payload(progress_value.as_bytes()),
            };
            let mut record = record.headers(headers);
            let delivery = loop {
                match producer.send_result(record) {
                    Ok(d) => break Ok(d),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if tokio::time::Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            match delivery {
                Ok(d) => pending.push(d),
                Err(e) => {
                    enqueue_failed = Some((i, e));
                    break;
                }
            }
        }
        // Every delivery report before the commit (a commit with records in
        // flight costs ~100 ms: docs/exactly-once.md, "Measured").
        let mut failed: Option<(usize, KafkaError)> = enqueue_failed;
        let reports = tokio::time::timeout_at(
            deadline + REPORT_MARGIN,
            futures_util::future::join_all(pending),
        )
        .await;
        let Ok(reports) = reports else {
            return Err(self.lost(
                "awaiting the delivery reports",
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            ));
        };
        for (i, r) in reports.into_iter().enumerate() {
            let e = match r {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            };
            let better = match &failed {
                None => true,
                Some((_, prev)) => is_consequence(prev) && !is_consequence(&e),
            };
            if better {
                failed = Some((i, e));
            }
        }
        if let Some((i, e)) = failed {
            tracing::warn!(
                transactional_id = %self.txid,
                "a record of the lot failed ({e}); aborting the lot's transaction"
            );
            self.abort().await?;
            return Ok(match records.get(i) {
                Some(m) => LotOutcome::Refused {
                    index: i,
                    error: self.refusal(&m.destination, e),
                },
                None => LotOutcome::Aborted(self.lost("producing the progress record", e)),
            });
        }
        let budget = self.budget;
        let reported = tokio::time::Instant::now();
        match self.blocking(move |p| p.commit_transaction(budget)).await {
            Ok(()) => {
                tracing::debug!(
                    transactional_id = %self.txid,
                    records = records.len(),
                    produce_ms = (reported - began).as_secs_f64() * 1000.0,
                    commit_ms = reported.elapsed().as_secs_f64() * 1000.0,
                    "Kafka lane lot committed"
                );
                Ok(LotOutcome::Committed)
            }
            Err(e) if requires_abort(&e) => {
                self.abort().await?;
                Ok(LotOutcome::Aborted(self.lost("commit_transaction", e)))
            }
            Err(e) => Err(self.lost("commit_transaction", e)),
        }
    }
}

impl Lane for KafkaLane {
    fn commit(
        &mut self,
        records: Vec<Outgoing>,
        ids: Vec<i64>,
    ) -> BoxFuture<'_, std::result::Result<LotOutcome, BoxError>> {
        Box::pin(self.commit_lot(records, ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_values_round_trip() {
        assert_eq!(
            parse_ids(format_ids(&[1, 22, 333]).as_bytes()),
            Some(vec![1, 22, 333])
        );
        assert_eq!(parse_ids(b""), Some(vec![]));
        assert_eq!(parse_ids(b"1,x"), None);
    }

    #[test]
    fn lane_names_follow_the_design() {
        let id = LaneId::new("public.outbox", "relay", 3, 4);
        let (txid, progress) = names("billing", &id);
        assert_eq!(txid, "billing.public.outbox.relay.3");
        assert_eq!(progress, "billing.public.outbox.relay.progress");
        let odd = LaneId::new("\"my table\"", "a::b", 0, 1);
        assert_eq!(names("x", &odd).0, "x._my_table_.a__b.0");
    }
}
