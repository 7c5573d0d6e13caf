//! The transport's settings and what librdkafka makes of them: the
//! defaults, [`Acks`] and [`Compression`], the producer's and the admin
//! client's [`ClientConfig`], and the redaction of secret values.
//! [`KafkaBroker`](crate::KafkaBroker) is the public builder over [`Settings`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use crate::error::{Error, Result};

/// The default transport name, as used in `publish_to("kafka", "topic")`.
pub const DEFAULT_NAME: &str = "kafka";
/// The default `client.id`.
pub const DEFAULT_CLIENT_ID: &str = "outbox-kafka";
/// The default `partitioner`: librdkafka's `murmur2_random`, the Java
/// client's default partitioner for keyed records
/// (`toPositive(murmur2(key)) % partitions`), so a key lands on the same
/// partition whichever client (Java, kafka-python / aiokafka, librdkafka
/// with this setting, Kafka Streams) produced it; records without a key go
/// to a random partition. librdkafka's own default (`consistent_random`,
/// CRC32) places keys differently.
pub const DEFAULT_PARTITIONER: &str = "murmur2_random";
/// The default `linger.ms`.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);
/// The default `message.timeout.ms`: below the subscribers' default
/// `lease_ttl` (60 s), so that a publish gives up before its row's lease
/// expires and another worker claims the row.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`KafkaBroker::connect`](crate::KafkaBroker::connect) waits for
/// the cluster's metadata.
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
    /// before replicating it). Requires [`KafkaBroker::idempotence`](crate::KafkaBroker::idempotence)`(false)`.
    Leader,
    /// `acks=0`: no acknowledgement at all: the delivery report is positive
    /// as soon as the record is sent. Defeats the outbox guarantee; requires
    /// [`KafkaBroker::idempotence`](crate::KafkaBroker::idempotence)`(false)`.
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

/// What a [`KafkaBroker`](crate::KafkaBroker) holds: the typed settings and
/// the [`set`](crate::KafkaBroker::set) overrides.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) bootstrap: String,
    pub(crate) client_id: String,
    pub(crate) acks: Acks,
    pub(crate) idempotence: bool,
    pub(crate) compression: Compression,
    pub(crate) linger: Duration,
    pub(crate) message_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) extra: BTreeMap<String, String>,
    /// The application id of exactly-once lanes, if on.
    pub(crate) transactional: Option<String>,
}

/// True for librdkafka properties whose values must never be printed.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "passphrase", "private.key", "key.pem"]
        .iter()
        .any(|s| k.contains(s))
        || k == "sasl.oauthbearer.config"
}

/// Librdkafka properties as `Debug` prints them: secret values redacted.
pub(crate) struct Redacted<'a>(pub(crate) &'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let v = if is_secret_key(k) { "<redacted>" } else { v };
                (k, v)
            }))
            .finish()
    }
}

/// A librdkafka boolean (`true`/`false`, `t`/`f`, `1`/`0`, any case).
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" => Some(true),
        "false" | "f" | "0" => Some(false),
        _ => None,
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl Settings {
    /// The defaults, for the cluster at `bootstrap`.
    pub(crate) fn new(bootstrap: String) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            bootstrap,
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            acks: Acks::All,
            idempotence: true,
            compression: Compression::None,
            linger: DEFAULT_LINGER,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            extra: BTreeMap::new(),
            transactional: None,
        }
    }

    /// The effective `message.timeout.ms` (a `set("message.timeout.ms")` or
    /// `set("delivery.timeout.ms")` wins over the typed setting).
    pub(crate) fn effective_message_timeout(&self) -> Duration {
        ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|k| self.extra.get(*k)?.trim().parse::<u64>().ok())
            .map_or(self.message_timeout, Duration::from_millis)
    }

    /// The effective `enable.idempotence` (a `set("enable.idempotence")`
    /// wins over the typed setting; a value librdkafka would refuse counts
    /// as the typed one, the producer's creation then fails anyway).
    pub(crate) fn effective_idempotence(&self) -> bool {
        self.extra
            .get("enable.idempotence")
            .and_then(|v| parse_bool(v))
            .unwrap_or(self.idempotence)
    }

    /// True when librdkafka may reorder records within a partition on its
    /// internal retries: idempotence off and more than one request in flight
    /// per connection (`max.in.flight.requests.per.connection`, alias
    /// `max.in.flight`, librdkafka's default 1000000).
    pub(crate) fn retries_may_reorder(&self) -> bool {
        if self.effective_idempotence() {
            return false;
        }
        let in_flight = ["max.in.flight.requests.per.connection", "max.in.flight"]
            .iter()
            .find_map(|k| self.extra.get(*k)?.trim().parse::<u64>().ok());
        in_flight != Some(1)
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            transport: self.name.clone(),
            reason: reason.into(),
            source: None,
        }
    }

    /// The producer's configuration (typed settings, then the `set`
    /// overrides). Checks the typed settings; librdkafka checks the rest when
    /// the producer is created.
    pub(crate) fn producer_config(&self) -> Result<ClientConfig> {
        self.check_addressing()?;
        if self.effective_message_timeout().is_zero() {
            return Err(self.invalid(
                "message.timeout.ms is 0, which makes librdkafka retry forever: a publish would \
                 then never fail and its row would stay leased; use a value below the \
                 subscribers' lease_ttl",
            ));
        }
        Ok(self.config_with(|c| {
            c.set("acks", self.acks.as_str())
                .set("enable.idempotence", self.idempotence.to_string())
                .set("partitioner", DEFAULT_PARTITIONER)
                .set("compression.type", self.compression.as_str())
                .set("linger.ms", ms(self.linger))
                .set("message.timeout.ms", ms(self.message_timeout));
        }))
    }

    /// The configuration of an admin client: the bootstrap address,
    /// `client.id` and the `set` properties (security settings), without the
    /// producer's typed settings.
    pub(crate) fn admin_config(&self) -> Result<ClientConfig> {
        self.check_addressing()?;
        Ok(self.config_with(|_| {}))
    }

    /// `bootstrap.servers` and `client.id`, then `typed`, then the `set`
    /// overrides (which win).
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

    /// Maps a client-creation error, without echoing secret values.
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
}
