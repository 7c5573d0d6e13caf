//! [`KafkaTransport`]: the [`Transport`] implementation.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use outbox_core::{BoxError, Outgoing, Transport};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::time::Instant;

use crate::context::KafkaContext;
use crate::error::{Error, Result};

/// Wait between two enqueue attempts while the producer's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(20);

type KafkaProducer = FutureProducer<KafkaContext>;

/// A connected Kafka transport: publishes each [`Outgoing`] as one record
/// and resolves only on a positive delivery report.
///
/// Get one from [`KafkaBroker::connect`](crate::KafkaBroker::connect) (a
/// startup hook that registers it in the application) or
/// [`KafkaBroker::connect_transport`](crate::KafkaBroker::connect_transport).
/// Cheap to clone: clones share one producer. Publishes run concurrently
/// (the producer batches them); none waits for another.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    bootstrap: String,
    config: ClientConfig,
    message_timeout: Duration,
    flush_timeout: Duration,
    current: RwLock<Current>,
}

/// The live producer and how many times it was replaced after fatal errors.
#[derive(Clone)]
struct Current {
    generation: u64,
    producer: KafkaProducer,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Enqueue,
    Delivery,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("name", &self.inner.name)
            .field("bootstrap", &self.inner.bootstrap)
            .field("message_timeout", &self.inner.message_timeout)
            .field("flush_timeout", &self.inner.flush_timeout)
            .field("producer_generation", &self.inner.current().generation)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    pub(crate) fn new(
        name: String,
        bootstrap: String,
        config: ClientConfig,
        producer: KafkaProducer,
        message_timeout: Duration,
        flush_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                bootstrap,
                config,
                message_timeout,
                flush_timeout,
                current: RwLock::new(Current {
                    generation: 0,
                    producer,
                }),
            }),
        }
    }

    /// The cluster's bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.inner.bootstrap
    }

    /// The effective `message.timeout.ms`: the longest a publish waits for
    /// its delivery report.
    pub fn message_timeout(&self) -> Duration {
        self.inner.message_timeout
    }

    /// Records queued in the producer or awaiting their delivery report.
    pub fn in_flight_count(&self) -> i32 {
        self.inner.current().producer.in_flight_count()
    }

    /// Sends one record and waits for its delivery report (what
    /// [`Transport::publish`] does, with this crate's error type).
    pub async fn send(&self, msg: Outgoing) -> Result<()> {
        self.inner.clone().send(msg).await
    }

    /// Flushes the producer: waits up to the flush timeout for every queued
    /// record's delivery report (what [`Transport::close`] does).
    pub async fn flush(&self) -> Result<()> {
        let inner = self.inner.clone();
        let producer = inner.current().producer;
        let timeout = inner.flush_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        let source = match flushed {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => KafkaError::Canceled,
        };
        Err(Error::Flush {
            transport: inner.name.clone(),
            timeout,
            source: Box::new(source),
        })
    }
}

impl Inner {
    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn send(self: Arc<Self>, msg: Outgoing) -> Result<()> {
        let Outgoing {
            destination: topic,
            key,
            payload,
            headers,
            ..
        } = msg;
        let Current {
            generation,
            producer,
        } = self.current();
        // The runtime already assembled every header (content-type,
        // correlation_id, outbox-id, explicit and propagated ones): map 1:1.
        let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in &headers {
            kafka_headers = kafka_headers.insert(Header {
                key: k.as_str(),
                value: Some(v.as_str()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
            .payload(&payload[..])
            .headers(kafka_headers);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        let enqueue_deadline = Instant::now() + self.message_timeout;
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < enqueue_deadline =>
                {
                    record = r;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, _)) => {
                    return Err(self.failed(generation, producer, &topic, e, Stage::Enqueue));
                }
            }
        };
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.failed(generation, producer, &topic, e, Stage::Delivery)),
            Err(_canceled) => Err(Error::Canceled { topic }),
        }
    }

    fn failed(
        &self,
        generation: u64,
        producer: KafkaProducer,
        topic: &str,
        e: KafkaError,
        stage: Stage,
    ) -> Error {
        let topic = topic.to_owned();
        let code = e.rdkafka_error_code();
        let fatal = producer.client().fatal_error();
        // A fenced producer id (non-transactional idempotent producer) does
        // not recover by itself either: every later record of this producer
        // is refused the same way. Seen against Tansu after an epoch bump
        // caused by timed-out in-flight requests.
        let fenced = matches!(
            code,
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
        );
        if fatal.is_some() || fenced || code == Some(RDKafkaErrorCode::Fatal) {
            let reason = fatal.map_or_else(|| e.to_string(), |(code, r)| format!("{code}: {r}"));
            self.replace_producer(generation, &reason);
            drop_off_runtime(producer);
            return Error::Fatal {
                topic,
                reason,
                source: Box::new(e),
            };
        }
        match (stage, code) {
            (_, Some(RDKafkaErrorCode::MessageTimedOut)) => Error::DeliveryTimeout {
                topic,
                timeout: self.message_timeout,
                source: Box::new(e),
            },
            (Stage::Enqueue, _) => Error::Produce {
                topic,
                source: Box::new(e),
            },
            (Stage::Delivery, _) => Error::Delivery {
                topic,
                source: Box::new(e),
            },
        }
    }

    /// Swaps in a fresh producer unless another publish already did.
    fn replace_producer(&self, failed_generation: u64, reason: &str) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.generation != failed_generation {
            return;
        }
        match self
            .config
            .create_with_context::<_, KafkaProducer>(KafkaContext::new(&self.name))
        {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *current,
                    Current {
                        generation: failed_generation + 1,
                        producer: fresh,
                    },
                );
                drop(current);
                tracing::error!(
                    transport = %self.name,
                    "the Kafka producer became unusable ({reason}); replaced it with a new producer"
                );
                drop_off_runtime(old.producer);
            }
            Err(e) => tracing::error!(
                transport = %self.name,
                "the Kafka producer became unusable ({reason}) and a new one could not be \
                 created: {e}"
            ),
        }
    }
}

/// Dropping the last handle of a producer joins its polling thread and
/// flushes: keep that off the async workers.
fn drop_off_runtime(producer: KafkaProducer) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || drop(producer));
        }
        Err(_) => drop(producer),
    }
}

impl Transport for KafkaTransport {
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Produces `msg` to the topic `msg.destination` (payload, optional key,
    /// every header) and resolves once the cluster acknowledged it (with
    /// `acks=all`: written to every in-sync replica), or with an
    /// [`enum@Error`] (boxed).
    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(msg).await.map_err(BoxError::from) })
    }

    /// `message.timeout.ms` (plus the enqueue wait it also bounds).
    fn max_publish_time(&self) -> Option<Duration> {
        Some(self.inner.message_timeout)
    }

    /// Kafka's topic name rules (1 to 249 characters of `a-z A-Z 0-9 . _ -`,
    /// not `.` or `..`): a bad name in `#[publish_to]` fails `App::run`
    /// instead of every publish.
    fn check_destination(&self, destination: &str) -> Result<(), String> {
        crate::admin::check_topic_name(destination)
    }

    /// Flushes queued records (bounded by the flush timeout).
    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let this = self.clone();
        Box::pin(async move { this.flush().await.map_err(BoxError::from) })
    }
}
