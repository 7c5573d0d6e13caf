//! [`KafkaBroker`]: the transport's typed builder, its connect step (the
//! startup hook that creates the producer and registers the transport) and
//! topic creation.

use std::fmt;
use std::time::Duration;

use outbox_core::transport::{BoxFuture, TransportBroker};
use outbox_core::{BoxError, Hook, IntoHook};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::{Acks, Compression, Redacted, Settings};
use crate::context::KafkaContext;
use crate::error::{Error, Result};
use crate::topic;
use crate::transport::KafkaTransport;

/// The configuration of a Kafka transport; [`connect`](Self::connect) turns it
/// into a startup hook that registers the transport.
///
/// Typed settings and their librdkafka keys (see the [crate docs](crate) for
/// why these defaults):
///
/// | setter | librdkafka key | default |
/// |---|---|---|
/// | [`new`](Self::new) | `bootstrap.servers` | (required) |
/// | [`client_id`](Self::client_id) | `client.id` | `outbox-kafka` |
/// | [`acks`](Self::acks) | `acks` | `all` |
/// | [`idempotence`](Self::idempotence) | `enable.idempotence` | `true` |
/// | [`compression`](Self::compression) | `compression.type` | `none` |
/// | [`linger`](Self::linger) | `linger.ms` | 5 ms |
/// | [`set`](Self::set)`("partitioner", ..)` | `partitioner` | `murmur2_random` (Java's) |
/// | [`message_timeout`](Self::message_timeout) | `message.timeout.ms` | 30 s |
/// | [`name`](Self::name) | (transport name) | `kafka` |
/// | [`connect_timeout`](Self::connect_timeout) | (startup metadata check) | 10 s |
/// | [`flush_timeout`](Self::flush_timeout) | (flush at shutdown) | 10 s |
///
/// Any other librdkafka producer property goes through [`set`](Self::set)
/// (and wins over the typed setters). Secret values (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, any key containing
/// `password`, `secret`, `passphrase` or a private key) are redacted in the
/// `Debug` output and in error messages.
///
/// ```no_run
/// use std::time::Duration;
/// use outbox_kafka::{Compression, KafkaBroker};
///
/// let kafka = KafkaBroker::new("localhost:9092")
///     .client_id("billing-relay")
///     .compression(Compression::Lz4)
///     .message_timeout(Duration::from_secs(20))
///     .set("security.protocol", "SASL_PLAINTEXT")
///     .set("sasl.mechanism", "PLAIN")
///     .set("sasl.username", "relay")
///     .set("sasl.password", "s3cret");
/// assert!(!format!("{kafka:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct KafkaBroker {
    settings: Settings,
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("KafkaBroker")
            .field("name", &s.name)
            .field("bootstrap", &s.bootstrap)
            .field("client_id", &s.client_id)
            .field("acks", &s.acks)
            .field("idempotence", &s.idempotence)
            .field("compression", &s.compression)
            .field("linger", &s.linger)
            .field("message_timeout", &s.message_timeout)
            .field("connect_timeout", &s.connect_timeout)
            .field("flush_timeout", &s.flush_timeout)
            .field("extra", &Redacted(&s.extra))
            .field("transactional", &s.transactional)
            .finish()
    }
}

impl KafkaBroker {
    /// A transport named `kafka` for the cluster at `bootstrap`
    /// (`bootstrap.servers`: `host:port[,host:port…]`), with the defaults
    /// listed above.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            settings: Settings::new(bootstrap.into()),
        }
    }

    /// The name routes use in `publish_to(name, "topic")` (default `kafka`);
    /// give each transport of an application its own.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// `client.id` (default `outbox-kafka`): shows up in broker logs,
    /// metrics and quotas.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.settings.client_id = id.into();
        self
    }

    /// `acks` (default [`Acks::All`]).
    pub fn acks(mut self, acks: Acks) -> Self {
        self.settings.acks = acks;
        self
    }

    /// `enable.idempotence` (default `true`): the producer's own retries never
    /// duplicate or reorder records within a partition. Needs `acks=all`;
    /// librdkafka then also caps `max.in.flight.requests.per.connection` at 5
    /// and retries until `message.timeout.ms`.
    ///
    /// Turned off (here or with `set("enable.idempotence", "false")`), a
    /// retried record can be written twice or after a record sent later to
    /// the same partition; [`connect`](Self::connect) logs a WARN saying so,
    /// unless `max.in.flight.requests.per.connection` is 1.
    pub fn idempotence(mut self, on: bool) -> Self {
        self.settings.idempotence = on;
        self
    }

    /// `compression.type` (default none).
    pub fn compression(mut self, c: Compression) -> Self {
        self.settings.compression = c;
        self
    }

    /// `linger.ms` (default 5 ms): how long the producer waits to batch
    /// records. Adds up to that much latency per row.
    pub fn linger(mut self, d: Duration) -> Self {
        self.settings.linger = d;
        self
    }

    /// `message.timeout.ms` (default 30 s): how long the producer tries to
    /// deliver a record (retrying internally, and waiting for room in a full
    /// queue) before the publish fails and the row is nacked. A publish
    /// takes at most this plus [`DELIVERY_REPORT_MARGIN`](crate::DELIVERY_REPORT_MARGIN)
    /// (1 s); keep the subscribers' `lease_ttl` above that.
    pub fn message_timeout(mut self, d: Duration) -> Self {
        self.settings.message_timeout = d;
        self
    }

    /// How long [`connect`](Self::connect) waits for the cluster to answer a
    /// metadata request before startup fails (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// How long closing the transport waits for queued records (default 10 s).
    pub fn flush_timeout(mut self, d: Duration) -> Self {
        self.settings.flush_timeout = d;
        self
    }

    /// Sets any librdkafka producer property (`reconnect.backoff.max.ms`,
    /// `security.protocol`, `sasl.*`, `ssl.*`, …); wins over the typed
    /// setters. Unknown keys and bad values fail at connect time.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.extra.insert(key.into(), value.into());
        self
    }

    /// Turns on **exactly-once lanes** for routes with
    /// [`exactly_once`](outbox_core::RouteBuilder::exactly_once): each lane
    /// gets a transactional producer, `transactional.id` =
    /// `<app_id>.<table>.<subscriber>.<lane>`, and each lot's records commit
    /// with the lane's progress (topic `<app_id>.<table>.<subscriber>.progress`,
    /// one partition per lane, compacted, created when missing) in one Kafka
    /// transaction. A `read_committed` consumer then sees every row exactly
    /// once, through crashes, restarts and takeovers (`docs/exactly-once.md`).
    /// `app_id` must be the same on every replica of the application and
    /// unique among applications on the cluster. Routes without
    /// `exactly_once` keep publishing at least once, through the
    /// transport's idempotent producer.
    ///
    /// Needs a broker with Kafka transactions (Kafka, Redpanda, noida-db;
    /// not Tansu 0.6) and idempotence (the default).
    ///
    /// ```no_run
    /// use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
    /// use outbox_kafka::KafkaBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let kafka = KafkaBroker::new("localhost:9092").transactional("billing");
    /// let relay = Route::builder(["orders"])
    ///     .publish_to("kafka", "orders.kafka")
    ///     .exactly_once(4)
    ///     .fetch_batch_size(500)
    ///     .handler(|msg: Message, _| async move {
    ///         Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
    ///     });
    /// App::new(outbox)
    ///     .subscriber(relay)
    ///     .on_startup(kafka.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub fn transactional(mut self, app_id: impl Into<String>) -> Self {
        self.settings.transactional = Some(app_id.into());
        self
    }

    /// The transport name.
    pub fn get_name(&self) -> &str {
        &self.settings.name
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        self.settings.bootstrap.as_str()
    }

    /// The effective `message.timeout.ms` (a `set("message.timeout.ms")` or
    /// `set("delivery.timeout.ms")` wins over [`message_timeout`](Self::message_timeout)).
    pub fn get_message_timeout(&self) -> Duration {
        self.settings.effective_message_timeout()
    }

    /// The connect check's budget.
    pub fn get_connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }

    /// The flush budget at shutdown.
    pub fn get_flush_timeout(&self) -> Duration {
        self.settings.flush_timeout
    }

    /// The librdkafka configuration the producer is created from (typed
    /// settings, then the [`set`](Self::set) overrides). Checks the typed
    /// settings; librdkafka checks the rest when the producer is created.
    ///
    /// The result holds secret values in clear and its `Debug` prints them:
    /// do not log it.
    pub fn client_config(&self) -> Result<ClientConfig> {
        self.settings.producer_config()
    }

    /// What opening an exactly-once lane reads from its progress: the ids of
    /// the last committed record of `partition` of the progress topic
    /// `topic` (empty when there is none), and how many records were read
    /// to find them (only the partition's tail is read). For tests.
    #[doc(hidden)]
    pub async fn read_lane_progress(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<(Vec<i64>, usize)> {
        let group = format!("{topic}.{partition}.progress-check");
        crate::lanes::read_last(&self.settings, &group, topic, partition)
            .await
            .map(|found| (found.ids, found.records_read))
            .map_err(|(reason, source)| Error::Transaction {
                transactional_id: group,
                step: "reading the lane's progress",
                reason,
                source: source.map(Box::new),
            })
    }

    /// A startup hook that connects (see
    /// [`connect_transport`](Self::connect_transport)) and registers the
    /// transport in the application.
    ///
    /// ```no_run
    /// use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
    /// use outbox_kafka::KafkaBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let kafka = KafkaBroker::new("localhost:9092");
    /// let relay = Route::builder(["orders"])
    ///     .publish_to("kafka", "orders.kafka")
    ///     .handler(|msg: Message, _| async move {
    ///         Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
    ///     });
    /// App::new(outbox)
    ///     .subscriber(relay)
    ///     .on_startup(kafka.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    ///
    /// This is [`TransportBroker::connect`], the registration step every
    /// transport shares (here so that it needs no import): the hook is
    /// named `kafka.connect` (after [`name`](Self::name)), and a failure
    /// aborts `App::run` with `on_startup hook `kafka.connect` failed:
    /// transport `kafka` could not connect: cannot reach the Kafka cluster
    /// at <bootstrap> …`.
    pub fn connect(&self) -> Hook {
        TransportBroker::connect(self).into_hook()
    }

    /// Creates the producer, checks that the cluster answers a metadata
    /// request within [`connect_timeout`](Self::connect_timeout), and returns
    /// the transport: for tests and for embedding without an `App`.
    ///
    /// ```no_run
    /// use outbox_core::{Outgoing, Transport};
    /// use outbox_kafka::KafkaBroker;
    ///
    /// # async fn demo() -> Result<(), outbox_core::BoxError> {
    /// let kafka = KafkaBroker::new("localhost:9092").connect_transport().await?;
    /// kafka.publish(Outgoing::new("orders.kafka", b"42".to_vec())).await?; // confirmed
    /// kafka.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_transport(&self) -> Result<KafkaTransport> {
        let s = &self.settings;
        let config = s.producer_config()?;
        if s.retries_may_reorder() {
            tracing::warn!(
                transport = %s.name,
                "enable.idempotence is off: librdkafka's internal retries can duplicate records \
                 and write them out of order within a partition, so ordered delivery per \
                 partition is not guaranteed across retries (keep idempotence on, or set \
                 max.in.flight.requests.per.connection=1)"
            );
        }
        let context = KafkaContext::new(&s.name);
        let producer: FutureProducer<KafkaContext> = config
            .create_with_context(context)
            .map_err(|e| s.config_error(e))?;
        let timeout = s.connect_timeout;
        let checked = tokio::task::spawn_blocking(move || {
            match producer.client().fetch_metadata(None, timeout) {
                Ok(md) => Ok((producer, md.brokers().len(), md.topics().len())),
                Err(e) => {
                    // Dropping a producer blocks (it joins its polling thread):
                    // do it here, off the async runtime.
                    drop(producer);
                    Err(e)
                }
            }
        })
        .await;
        let unreachable = |source| Error::Unreachable {
            transport: s.name.clone(),
            bootstrap: s.bootstrap.clone(),
            timeout,
            source: Box::new(source),
        };
        let (producer, brokers, topics) = match checked {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => return Err(unreachable(KafkaError::Canceled)),
        };
        tracing::info!(
            transport = %s.name,
            bootstrap = %s.bootstrap,
            brokers,
            topics,
            "connected to Kafka"
        );
        let transport = KafkaTransport::new(
            s.name.clone(),
            s.bootstrap.clone(),
            config.clone(),
            producer,
            s.effective_message_timeout(),
            s.flush_timeout,
        );
        Ok(match &s.transactional {
            Some(app) => transport.with_lanes(crate::lanes::KafkaLanes::new(
                app.clone(),
                s.clone(),
                config,
            )),
            None => transport,
        })
    }

    /// Creates `topic` with `partitions` partitions, each on `replication`
    /// brokers, unless it exists. Returns `true` when this call created it,
    /// `false` when it was already there (its partition count is then left
    /// as it is).
    ///
    /// The admin client uses the broker's bootstrap address, `client.id` and
    /// [`set`](Self::set) properties (so TLS/SASL settings apply), and waits
    /// at most [`connect_timeout`](Self::connect_timeout) for the cluster.
    /// Call it before the relay starts when the cluster does not create
    /// topics on first use (`auto.create.topics.enable=false`, the usual
    /// production setting), or to choose the partition count.
    ///
    /// The name and the counts are checked before anything is sent: a topic
    /// name is 1 to 249 characters of `a-z A-Z 0-9 . _ -` and is not `.` or
    /// `..`; both counts are at least 1.
    ///
    /// ```no_run
    /// use outbox_core::{App, AppContext, BoxError, Hook, OutboxBroker};
    /// use outbox_kafka::KafkaBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let kafka = KafkaBroker::new("localhost:9092");
    /// let topics = kafka.clone();
    /// App::new(outbox)
    ///     .on_startup(Hook::new("topics", move |_: AppContext| async move {
    ///         topics.ensure_topic("orders.kafka", 6, 3).await?;
    ///         Ok::<_, BoxError>(())
    ///     }))
    ///     .on_startup(kafka.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub async fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
    ) -> Result<bool> {
        topic::ensure_topic(&self.settings, topic, partitions, replication).await
    }
}

/// How the application connects and registers the Kafka transport: the
/// provided [`TransportBroker::connect`] (also [`KafkaBroker::connect`]).
impl TransportBroker for KafkaBroker {
    type Transport = KafkaTransport;

    fn server(&self) -> Option<outbox_core::transport::ServerInfo> {
        let s = &self.settings;
        let security = s.extra.get("security.protocol").map(String::as_str);
        Some(crate::transport::server_info(&s.bootstrap, security))
    }

    fn transport_name(&self) -> &str {
        &self.settings.name
    }

    /// [`KafkaBroker::connect_transport`], with the error boxed.
    fn connect_transport(
        &self,
    ) -> BoxFuture<'static, std::result::Result<KafkaTransport, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            KafkaBroker::connect_transport(&this)
                .await
                .map_err(BoxError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_suit_an_outbox() {
        let k = KafkaBroker::new("localhost:9092");
        let c = k.client_config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.get("bootstrap.servers"), Some("localhost:9092"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("message.timeout.ms"), Some("30000"));
        assert_eq!(c.get("linger.ms"), Some("5"));
        assert_eq!(c.get("client.id"), Some("outbox-kafka"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(k.get_name(), "kafka");
        assert_eq!(k.get_connect_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn set_wins_and_feeds_the_effective_timeout() {
        let k = KafkaBroker::new("b:1")
            .message_timeout(Duration::from_secs(5))
            .set("message.timeout.ms", "1500")
            .set("reconnect.backoff.max.ms", "1000");
        let c = k.client_config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.get("message.timeout.ms"), Some("1500"));
        assert_eq!(c.get("reconnect.backoff.max.ms"), Some("1000"));
        assert_eq!(k.get_message_timeout(), Duration::from_millis(1500));
    }

    #[test]
    fn the_partitioner_can_be_overridden() {
        let c = KafkaBroker::new("b:1")
            .set("partitioner", "consistent_random")
            .client_config()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.get("partitioner"), Some("consistent_random"));
    }

    #[test]
    fn retries_may_reorder_only_without_idempotence() {
        let reorder = |k: KafkaBroker| k.settings.retries_may_reorder();
        assert!(!reorder(KafkaBroker::new("b:1")));
        assert!(reorder(KafkaBroker::new("b:1").idempotence(false)));
        assert!(reorder(
            KafkaBroker::new("b:1").set("enable.idempotence", "False")
        ));
        assert!(!reorder(
            KafkaBroker::new("b:1")
                .idempotence(false)
                .set("enable.idempotence", "true")
        ));
        assert!(!reorder(
            KafkaBroker::new("b:1")
                .idempotence(false)
                .set("max.in.flight.requests.per.connection", "1")
        ));
        assert!(!reorder(
            KafkaBroker::new("b:1")
                .set("enable.idempotence", "0")
                .set("max.in.flight", "1")
        ));
        assert!(reorder(
            KafkaBroker::new("b:1")
                .idempotence(false)
                .set("max.in.flight", "5")
        ));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let k = KafkaBroker::new("b:1")
            .set("sasl.username", "relay")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "hunter3")
            .set("sasl.oauthbearer.client.secret", "hunter4")
            .set("ssl.keystore.password", "hunter5")
            .set("ssl.key.pem", "-----BEGIN PRIVATE KEY-----");
        let dbg = format!("{k:?}");
        for s in ["hunter2", "hunter3", "hunter4", "hunter5", "BEGIN PRIVATE"] {
            assert!(!dbg.contains(s), "{s} leaked in {dbg}");
        }
        assert!(dbg.contains("relay"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
    }

    #[test]
    fn bad_settings_are_refused_early() {
        assert!(KafkaBroker::new(" ").client_config().is_err());
        assert!(
            KafkaBroker::new("b:1")
                .message_timeout(Duration::ZERO)
                .client_config()
                .is_err()
        );
        assert!(KafkaBroker::new("b:1").name("").client_config().is_err());
    }

    #[tokio::test]
    async fn unknown_properties_fail_at_connect_with_the_key() {
        let err = KafkaBroker::new("127.0.0.1:1")
            .set("no.such.property", "1")
            .connect_transport()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no.such.property"), "{err}");
    }
}
