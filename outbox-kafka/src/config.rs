//! [`KafkaBroker`]: the transport's configuration and its connect step.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{AppContext, BoxError, Hook};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};

use crate::context::KafkaContext;
use crate::error::{Error, Result};
use crate::transport::KafkaTransport;

/// The default transport name, as used in `publish_to("kafka", "topic")`.
pub const DEFAULT_NAME: &str = "kafka";
/// The default `client.id`.
pub const DEFAULT_CLIENT_ID: &str = "outbox-kafka";
/// The default `linger.ms`.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);
/// The default `message.timeout.ms`: below the subscribers' default
/// `lease_ttl` (60 s), so that a publish gives up before its row's lease
/// expires and another worker claims the row.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`KafkaBroker::connect`] waits for the cluster's metadata.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Transport::close`](outbox_core::Transport::close) waits for
/// queued records.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Which acknowledgement the producer waits for (`acks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// `acks=all`: every in-sync replica has the record. The default, and the
    /// only value compatible with idempotence.
    #[default]
    All,
    /// `acks=1`: the partition leader has the record (lost if the leader dies
    /// before replicating it). Requires [`KafkaBroker::idempotence`]`(false)`.
    Leader,
    /// `acks=0`: no acknowledgement at all: the delivery report is positive
    /// as soon as the record is sent. Defeats the outbox guarantee; requires
    /// [`KafkaBroker::idempotence`]`(false)`.
    None,
}

impl Acks {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

/// Record batch compression (`compression.type`).
///
/// `Zstd` needs librdkafka built with zstd: add
/// `rdkafka = { version = "0.39", features = ["zstd"] }` to your
/// `Cargo.toml` (cargo unifies the features).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// No compression (the default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard (needs rdkafka's `zstd` feature).
    Zstd,
}

impl Compression {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

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
    name: String,
    bootstrap: String,
    client_id: String,
    acks: Acks,
    idempotence: bool,
    compression: Compression,
    linger: Duration,
    message_timeout: Duration,
    connect_timeout: Duration,
    flush_timeout: Duration,
    extra: BTreeMap<String, String>,
}

/// True for librdkafka properties whose values must never be printed.
pub(crate) fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "passphrase", "private.key", "key.pem"]
        .iter()
        .any(|s| k.contains(s))
        || k == "sasl.oauthbearer.config"
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Extra<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Extra<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, v)| {
                        let v = if is_secret_key(k) { "<redacted>" } else { v };
                        (k, v)
                    }))
                    .finish()
            }
        }
        f.debug_struct("KafkaBroker")
            .field("name", &self.name)
            .field("bootstrap", &self.bootstrap)
            .field("client_id", &self.client_id)
            .field("acks", &self.acks)
            .field("idempotence", &self.idempotence)
            .field("compression", &self.compression)
            .field("linger", &self.linger)
            .field("message_timeout", &self.message_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("flush_timeout", &self.flush_timeout)
            .field("extra", &Extra(&self.extra))
            .finish()
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl KafkaBroker {
    /// A transport named `kafka` for the cluster at `bootstrap`
    /// (`bootstrap.servers`: `host:port[,host:port…]`), with the defaults
    /// listed above.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            bootstrap: bootstrap.into(),
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            acks: Acks::All,
            idempotence: true,
            compression: Compression::None,
            linger: DEFAULT_LINGER,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            extra: BTreeMap::new(),
        }
    }

    /// The name routes use in `publish_to(name, "topic")` (default `kafka`);
    /// give each transport of an application its own.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// `client.id` (default `outbox-kafka`): shows up in broker logs,
    /// metrics and quotas.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// `acks` (default [`Acks::All`]).
    pub fn acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }

    /// `enable.idempotence` (default `true`): the producer's own retries never
    /// duplicate or reorder records within a partition. Needs `acks=all`.
    pub fn idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// `compression.type` (default none).
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    /// `linger.ms` (default 5 ms): how long the producer waits to batch
    /// records. Adds up to that much latency per row.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// `message.timeout.ms` (default 30 s): how long the producer tries to
    /// deliver a record (retrying internally, and waiting for room in a full
    /// queue) before the publish fails and the row is nacked. A publish
    /// takes at most this plus [`DELIVERY_REPORT_MARGIN`](crate::DELIVERY_REPORT_MARGIN)
    /// (1 s); keep the subscribers' `lease_ttl` above that.
    pub fn message_timeout(mut self, d: Duration) -> Self {
        self.message_timeout = d;
        self
    }

    /// How long [`connect`](Self::connect) waits for the cluster to answer a
    /// metadata request before startup fails (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// How long closing the transport waits for queued records (default 10 s).
    pub fn flush_timeout(mut self, d: Duration) -> Self {
        self.flush_timeout = d;
        self
    }

    /// Sets any librdkafka producer property (`reconnect.backoff.max.ms`,
    /// `security.protocol`, `sasl.*`, `ssl.*`, …); wins over the typed
    /// setters. Unknown keys and bad values fail at connect time.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The transport name.
    pub fn get_name(&self) -> &str {
        &self.name
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        self.bootstrap.as_str()
    }

    /// The effective `message.timeout.ms` (a `set("message.timeout.ms")` or
    /// `set("delivery.timeout.ms")` wins over [`message_timeout`](Self::message_timeout)).
    pub fn get_message_timeout(&self) -> Duration {
        ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|k| self.extra.get(*k)?.trim().parse::<u64>().ok())
            .map_or(self.message_timeout, Duration::from_millis)
    }

    /// The connect check's budget.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The flush budget at shutdown.
    pub fn get_flush_timeout(&self) -> Duration {
        self.flush_timeout
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            transport: self.name.clone(),
            reason: reason.into(),
            source: None,
        }
    }

    /// The librdkafka configuration the producer is created from (typed
    /// settings, then the [`set`](Self::set) overrides). Checks the typed
    /// settings; librdkafka checks the rest when the producer is created.
    ///
    /// The result holds secret values in clear and its `Debug` prints them:
    /// do not log it.
    pub fn client_config(&self) -> Result<ClientConfig> {
        self.check_addressing()?;
        if self.get_message_timeout().is_zero() {
            return Err(self.invalid(
                "message.timeout.ms is 0, which makes librdkafka retry forever: a publish would \
                 then never fail and its row would stay leased; use a value below the \
                 subscribers' lease_ttl",
            ));
        }
        Ok(self.config_with(|c| {
            c.set("acks", self.acks.as_str())
                .set("enable.idempotence", self.idempotence.to_string())
                .set("compression.type", self.compression.as_str())
                .set("linger.ms", ms(self.linger))
                .set("message.timeout.ms", ms(self.message_timeout));
        }))
    }

    /// The configuration of an admin client: the bootstrap address,
    /// `client.id` and the [`set`](Self::set) properties (security settings),
    /// without the producer's typed settings.
    pub(crate) fn admin_config(&self) -> Result<ClientConfig> {
        self.check_addressing()?;
        Ok(self.config_with(|_| {}))
    }

    /// `bootstrap.servers` and `client.id`, then `typed`, then the
    /// [`set`](Self::set) overrides (which win).
    fn config_with(&self, typed: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", &self.client_id);
        typed(&mut c);
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// What every client needs: a name, a bootstrap address, a timeout.
    fn check_addressing(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(self.invalid("the transport name is empty"));
        }
        if self.bootstrap.trim().is_empty() {
            return Err(self.invalid(
                "the bootstrap address is empty: pass `host:port[,host:port…]` to KafkaBroker::new",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(self.invalid("connect_timeout must be > 0"));
        }
        Ok(())
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
    pub fn connect(&self) -> Hook {
        let this = self.clone();
        Hook::new(
            format!("{}.connect", self.name),
            move |ctx: AppContext| async move {
                let transport = this.connect_transport().await?;
                ctx.add_transport(Arc::new(transport))?;
                Ok::<_, BoxError>(())
            },
        )
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
        let config = self.client_config()?;
        let context = KafkaContext::new(&self.name);
        let producer: FutureProducer<KafkaContext> = config
            .create_with_context(context)
            .map_err(|e| self.config_error(e))?;
        let timeout = self.connect_timeout;
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
            transport: self.name.clone(),
            bootstrap: self.bootstrap.clone(),
            timeout,
            source: Box::new(source),
        };
        let (producer, brokers, topics) = match checked {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => return Err(unreachable(KafkaError::Canceled)),
        };
        tracing::info!(
            transport = %self.name,
            bootstrap = %self.bootstrap,
            brokers,
            topics,
            "connected to Kafka"
        );
        Ok(KafkaTransport::new(
            self.name.clone(),
            self.bootstrap.clone(),
            config,
            producer,
            self.get_message_timeout(),
            self.flush_timeout,
        ))
    }

    /// Maps a producer-creation error, without echoing secret values.
    pub(crate) fn config_error(&self, e: KafkaError) -> Error {
        config_error(&self.name, e)
    }
}

pub(crate) fn config_error(transport: &str, e: KafkaError) -> Error {
    let (reason, source) = match &e {
        KafkaError::ClientConfig(_, _, key, _) if is_secret_key(key) => {
            (format!("invalid value for `{key}` (value redacted)"), None)
        }
        KafkaError::ClientConfig(_, desc, key, _) => {
            (format!("`{key}`: {desc}"), Some(Box::new(e.clone())))
        }
        other => (
            format!("the producer could not be created: {other}"),
            Some(Box::new(e.clone())),
        ),
    };
    Error::InvalidConfig {
        transport: transport.to_owned(),
        reason,
        source,
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

    #[test]
    fn a_config_error_for_a_secret_key_does_not_echo_the_value() {
        let e = config_error(
            "kafka",
            KafkaError::ClientConfig(
                rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                "Invalid value \"hunter2\" for sasl.password".into(),
                "sasl.password".into(),
                "hunter2".into(),
            ),
        );
        let text = format!("{e} {e:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("sasl.password"), "{text}");
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
