//! The crate's error type.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// `Result` with this crate's [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the Kafka transport can report.
///
/// Every variant that concerns one record names its topic; the librdkafka
/// error is kept as the [`source`](std::error::Error::source). Use
/// [`Error::is_retryable`] to tell a transient failure (broker down, timeout,
/// leader election, topic not created yet: retrying the row later may
/// succeed) from a permanent one (record too large, not authorized, invalid
/// topic or record). [`Transport::publish`](outbox_core::Transport::publish)
/// wraps a permanent one in an [`outbox_core::BusRejection`] (this error is
/// its source), so the row is dead-lettered at once under the default retry
/// strategy.
///
/// Each message ends with the librdkafka error it is about (when it includes
/// it), so a rendered chain of sources names each text once.
///
/// ```
/// use outbox_kafka::Error;
///
/// fn should_retry(e: &(dyn std::error::Error + 'static)) -> bool {
///     // Walk the source chain: the runtime may wrap the transport's error.
///     let mut cur = Some(e);
///     while let Some(err) = cur {
///         if let Some(kafka) = err.downcast_ref::<Error>() {
///             return kafka.is_retryable();
///         }
///         cur = err.source();
///     }
///     true
/// }
/// # let _ = should_retry;
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused before anything was sent: an unknown
    /// librdkafka property, a bad value, or contradicting settings (e.g.
    /// idempotence without `acks=all`). Fix the configuration.
    #[error("invalid Kafka configuration for transport `{transport}`: {reason}")]
    InvalidConfig {
        /// The transport's registered name.
        transport: String,
        /// What is wrong and how to fix it (secret values are never included).
        reason: String,
        /// The librdkafka error, when there is one (omitted when it would
        /// echo a secret value).
        #[source]
        source: Option<Box<KafkaError>>,
    },

    /// The cluster did not answer a metadata request in time at startup.
    #[error(
        "cannot reach the Kafka cluster at `{bootstrap}` (transport `{transport}`): no answer to a \
         metadata request within {timeout:?}. Check that the brokers are running and reachable \
         from this host, that the bootstrap address is right, that the brokers' advertised \
         listeners resolve and are reachable from here, and that `security.protocol` / SASL \
         settings match the listener. librdkafka said: {source}"
    )]
    Unreachable {
        /// The transport's registered name.
        transport: String,
        /// The configured `bootstrap.servers`.
        bootstrap: String,
        /// How long the check waited.
        timeout: Duration,
        /// The librdkafka error.
        #[source]
        source: Box<KafkaError>,
    },

    /// The producer refused to enqueue the record (nothing was sent): the
    /// local queue stayed full for `message.timeout.ms`, the record is larger
    /// than `message.max.bytes`…
    #[error(
        "the Kafka producer refused the record for topic {topic:?} before sending it: {source}"
    )]
    Produce {
        /// The destination topic.
        topic: String,
        /// The librdkafka error.
        #[source]
        source: Box<KafkaError>,
    },

    /// The record was not confirmed within `message.timeout.ms` (brokers
    /// unreachable or too slow). It may or may not have been written: the
    /// row is retried, so the record may arrive twice.
    #[error(
        "Kafka did not confirm the record for topic {topic:?} within message.timeout.ms \
         ({timeout:?}; are the brokers reachable?): {source}"
    )]
    DeliveryTimeout {
        /// The destination topic.
        topic: String,
        /// The effective `message.timeout.ms`.
        timeout: Duration,
        /// The librdkafka error.
        #[source]
        source: Box<KafkaError>,
    },

    /// The cluster answered the produce request with an error (after the
    /// producer's own retries, for retriable ones).
    #[error("Kafka refused the record for topic {topic:?}: {source}")]
    Delivery {
        /// The destination topic.
        topic: String,
        /// The librdkafka error.
        #[source]
        source: Box<KafkaError>,
    },

    /// The producer cannot be used any more: librdkafka raised a fatal error
    /// (e.g. an idempotence guarantee could not be kept), or the cluster
    /// fenced its producer id (`ProducerFenced`, `InvalidProducerEpoch`). The
    /// transport replaced it with a fresh producer; retrying the row is safe.
    #[error(
        "the Kafka producer became unusable while producing to topic {topic:?} and was \
         replaced by a new producer: {reason}"
    )]
    Fatal {
        /// The destination topic.
        topic: String,
        /// librdkafka's description of the fatal error.
        reason: String,
        /// The librdkafka error.
        #[source]
        source: Box<KafkaError>,
    },

    /// librdkafka reported the record delivered without an offset: the
    /// request that carried it failed, and a later batch of the same
    /// partition succeeded, from which librdkafka infers ("implicitly
    /// acks") that this record was written too. The inference holds only on
    /// brokers that check the idempotent producer's sequence numbers, so the
    /// transport does not count the record as confirmed and the row is
    /// retried: a possible duplicate (deduplicate on `outbox-id`), never a
    /// loss.
    #[error(
        "the record for topic {topic:?} (partition {partition}) counts as unconfirmed: \
         librdkafka reported it delivered without an offset, inferred from a later batch after \
         this record's request failed; publishing it again (a possible duplicate, deduplicated \
         by outbox-id)"
    )]
    Unconfirmed {
        /// The destination topic.
        topic: String,
        /// The partition librdkafka reported.
        partition: i32,
    },

    /// The producer was shut down before it reported on the record.
    #[error("the Kafka producer was closed before confirming the record for topic {topic:?}")]
    Canceled {
        /// The destination topic.
        topic: String,
    },

    /// Flushing at shutdown did not finish in time: records still queued
    /// were not confirmed (their rows are retried by the next relay).
    #[error(
        "flushing the Kafka producer of transport `{transport}` did not finish within \
         {timeout:?}: {source}"
    )]
    Flush {
        /// The transport's registered name.
        transport: String,
        /// The flush budget.
        timeout: Duration,
        /// The librdkafka error.
        #[source]
        source: Box<KafkaError>,
    },

    /// [`KafkaBroker::ensure_topic`](crate::KafkaBroker::ensure_topic) could
    /// not create the topic: an invalid name or count (nothing was sent), no
    /// answer from the cluster, or a refusal (not authorized, replication
    /// above the number of brokers…).
    #[error(
        "cannot create Kafka topic {topic:?} on `{bootstrap}`: {reason}{}",
        .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default()
    )]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The configured `bootstrap.servers`.
        bootstrap: String,
        /// What went wrong and what to check (the message appends the
        /// librdkafka error, when there is one).
        reason: String,
        /// The librdkafka error; `None` when the request was not sent.
        #[source]
        source: Option<Box<KafkaError>>,
    },

    /// A step of an exactly-once lane failed (`KafkaBroker::transactional`):
    /// `init_transactions`, reading the lane's progress, committing or
    /// aborting a lot. The lane is given up and taken again, which fences
    /// this producer and resumes after the last committed lot.
    #[error("exactly-once lane `{transactional_id}`: {step} failed: {reason}")]
    Transaction {
        /// The lane's `transactional.id`.
        transactional_id: String,
        /// The step (`init_transactions`, `read progress`, `commit_transaction`…).
        step: &'static str,
        /// What went wrong.
        reason: String,
        /// The librdkafka error, if any.
        #[source]
        source: Option<Box<KafkaError>>,
    },
}

impl Error {
    /// True when retrying later may succeed (broker down, timeouts, leader
    /// changes, a replaced producer…); false for failures that will repeat
    /// until the configuration or the record changes (invalid configuration,
    /// record too large, authorization…). A missing topic counts as
    /// retryable: the row can go through once the topic is created.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidConfig { .. } => false,
            Error::Unreachable { .. }
            | Error::DeliveryTimeout { .. }
            | Error::Fatal { .. }
            | Error::Unconfirmed { .. }
            | Error::Canceled { .. }
            | Error::Flush { .. }
            | Error::Transaction { .. } => true,
            Error::Produce { source, .. } | Error::Delivery { source, .. } => {
                source.rdkafka_error_code().is_none_or(code_is_retryable)
            }
            Error::CreateTopic { source, .. } => source
                .as_deref()
                .and_then(code_of)
                .is_some_and(code_is_retryable),
        }
    }

    /// The destination topic, for the variants about one record or topic.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Error::Produce { topic, .. }
            | Error::DeliveryTimeout { topic, .. }
            | Error::Delivery { topic, .. }
            | Error::Fatal { topic, .. }
            | Error::Unconfirmed { topic, .. }
            | Error::Canceled { topic }
            | Error::CreateTopic { topic, .. } => Some(topic),
            Error::InvalidConfig { .. }
            | Error::Unreachable { .. }
            | Error::Flush { .. }
            | Error::Transaction { .. } => None,
        }
    }

    /// The librdkafka error code, if any.
    pub fn rdkafka_error_code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            Error::InvalidConfig { source, .. }
            | Error::CreateTopic { source, .. }
            | Error::Transaction { source, .. } => source.as_deref().and_then(code_of),
            Error::Unreachable { source, .. }
            | Error::Produce { source, .. }
            | Error::DeliveryTimeout { source, .. }
            | Error::Delivery { source, .. }
            | Error::Fatal { source, .. }
            | Error::Flush { source, .. } => source.rdkafka_error_code(),
            Error::Unconfirmed { .. } | Error::Canceled { .. } => None,
        }
    }
}

/// The error code of `e`, including that of an admin operation (which
/// [`KafkaError::rdkafka_error_code`] does not report).
fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

/// Codes that will repeat on retry unless the record, the topic or the
/// configuration changes. Everything else is treated as transient: wrongly
/// retrying a permanent error costs a few attempts before the retry strategy
/// gives up, wrongly giving up on a transient one dead-letters a good row
/// (a permanent error is dead-lettered at once, see
/// [`BusRejection`](outbox_core::BusRejection)).
///
/// Deliberately transient: `UnknownTopicOrPartition` and the local
/// `UnknownTopic` (the topic may be created later), `InvalidMessage`
/// (Kafka's `CORRUPT_MESSAGE`: a CRC mismatch on the way, which librdkafka
/// and the Java client retry), timeouts, leader changes and a full queue.
fn code_is_retryable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    !matches!(
        code,
        // The record is too large for the producer's `message.max.bytes`
        // (refused locally) or for the broker or topic.
        C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessageSize
            // Not authorized.
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::UnsupportedSASLMechanism
            // An invalid destination, or a record the broker will never take.
            | C::InvalidTopic
            | C::InvalidRecord
            | C::InvalidTimestamp
            | C::PolicyViolation
            | C::BadMessage
            | C::BadCompression
            | C::KeySerialization
            | C::ValueSerialization
            // Configuration or client/broker capabilities.
            | C::InvalidArgument
            | C::InvalidConfig
            | C::InvalidRequest
            | C::InvalidRequiredAcks
            | C::UnsupportedFeature
            | C::NotImplemented
            | C::UnsupportedVersion
            | C::UnsupportedForMessageFormat
            | C::UnsupportedCompressionType
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(code: RDKafkaErrorCode) -> Error {
        Error::Delivery {
            topic: "t".into(),
            source: Box::new(KafkaError::MessageProduction(code)),
        }
    }

    fn produce(code: RDKafkaErrorCode) -> Error {
        Error::Produce {
            topic: "t".into(),
            source: Box::new(KafkaError::MessageProduction(code)),
        }
    }

    /// What the runtime writes into logs and `last_exception`.
    fn render_chain(e: &(dyn std::error::Error + 'static)) -> String {
        outbox_core::render_error_chain(e)
    }

    #[test]
    fn permanent_refusals_are_the_ones_retrying_cannot_fix() {
        use RDKafkaErrorCode as C;
        // Record too large (locally, for the broker, for the batch), not
        // authorized, invalid destination or record: permanent.
        for code in [
            C::MessageSizeTooLarge,
            C::MessageBatchTooLarge,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::InvalidTopic,
            C::InvalidRecord,
            C::PolicyViolation,
        ] {
            assert!(!delivery(code).is_retryable(), "{code:?} is permanent");
            assert!(!produce(code).is_retryable(), "{code:?} is permanent");
        }
        // A topic that does not exist yet may be created later; the rest is
        // an outage, a leader change, a full queue or a corrupted transfer.
        for code in [
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::InvalidMessage,
            C::QueueFull,
            C::MessageTimedOut,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::NotEnoughReplicas,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::RequestTimedOut,
        ] {
            assert!(delivery(code).is_retryable(), "{code:?} is transient");
            assert!(produce(code).is_retryable(), "{code:?} is transient");
        }
    }

    /// Each variant ends with its source's text (or leaves it out), so a
    /// rendered chain names every error text once: a 45 s outage used to
    /// log "Local: Message timed out" twice in one line.
    #[test]
    fn a_rendered_chain_names_each_error_text_once() {
        let kafka = |code| Box::new(KafkaError::MessageProduction(code));
        let errors = [
            Error::Unreachable {
                transport: "kafka".into(),
                bootstrap: "b:9092".into(),
                timeout: Duration::from_secs(10),
                source: Box::new(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::OperationTimedOut,
                )),
            },
            produce(RDKafkaErrorCode::MessageSizeTooLarge),
            Error::DeliveryTimeout {
                topic: "t".into(),
                timeout: Duration::from_secs(30),
                source: kafka(RDKafkaErrorCode::MessageTimedOut),
            },
            delivery(RDKafkaErrorCode::TopicAuthorizationFailed),
            Error::Fatal {
                topic: "t".into(),
                reason: KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced).to_string(),
                source: kafka(RDKafkaErrorCode::ProducerFenced),
            },
            Error::Flush {
                transport: "kafka".into(),
                timeout: Duration::from_secs(10),
                source: Box::new(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)),
            },
            Error::CreateTopic {
                topic: "t".into(),
                bootstrap: "b:9092".into(),
                reason: "the cluster refused it".into(),
                source: Some(Box::new(KafkaError::AdminOp(
                    RDKafkaErrorCode::TopicAuthorizationFailed,
                ))),
            },
        ];
        for e in errors {
            // As the runtime wraps it: transport error -> this error.
            let outer = outbox_core::Error::Transport {
                transport: "kafka".into(),
                destination: "t".into(),
                source: Box::new(e),
            };
            let line = render_chain(&outer);
            let mut cur = std::error::Error::source(&outer);
            while let Some(err) = cur {
                let text = err.to_string();
                assert_eq!(line.matches(&text).count(), 1, "{text:?} in {line:?}");
                cur = err.source();
            }
        }
        let line = render_chain(&Error::DeliveryTimeout {
            topic: "orders".into(),
            timeout: Duration::from_secs(30),
            source: kafka(RDKafkaErrorCode::MessageTimedOut),
        });
        assert_eq!(
            line,
            "Kafka did not confirm the record for topic \"orders\" within message.timeout.ms \
             (30s; are the brokers reachable?): Message production error: MessageTimedOut \
             (Local: Message timed out)"
        );
    }

    #[test]
    fn classifies_transient_and_permanent_errors() {
        assert!(delivery(RDKafkaErrorCode::NotEnoughReplicas).is_retryable());
        assert!(delivery(RDKafkaErrorCode::AllBrokersDown).is_retryable());
        assert!(delivery(RDKafkaErrorCode::RequestTimedOut).is_retryable());
        assert!(!delivery(RDKafkaErrorCode::MessageSizeTooLarge).is_retryable());
        assert!(!delivery(RDKafkaErrorCode::TopicAuthorizationFailed).is_retryable());
        let timeout = Error::DeliveryTimeout {
            topic: "orders".into(),
            timeout: Duration::from_secs(30),
            source: Box::new(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )),
        };
        assert!(timeout.is_retryable());
        assert_eq!(timeout.topic(), Some("orders"));
        assert_eq!(
            timeout.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageTimedOut)
        );
        let msg = timeout.to_string();
        assert!(msg.contains("\"orders\"") && msg.contains("30s"), "{msg}");
        let config = Error::InvalidConfig {
            transport: "kafka".into(),
            reason: "bad".into(),
            source: None,
        };
        assert!(!config.is_retryable());
    }
}
