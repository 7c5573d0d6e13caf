//! The librdkafka client context: routes librdkafka's logs and global errors
//! to `tracing`.

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// Forwards librdkafka's log lines (target `librdkafka`) and global error
/// callbacks (broker down, all brokers down, authentication…) to `tracing`,
/// tagged with the transport name.
#[derive(Debug, Clone)]
pub(crate) struct KafkaContext {
    transport: String,
}

impl KafkaContext {
    pub(crate) fn new(transport: &str) -> Self {
        Self {
            transport: transport.to_owned(),
        }
    }
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let transport = self.transport.as_str();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", transport, facility = fac, "{log_message}");
            }
            // librdkafka logs every failed connection attempt at "error"
            // level; these are transient and also reported through `error`.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", transport, facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", transport, facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", transport, facility = fac, "{log_message}");
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(
            target: "librdkafka",
            transport = %self.transport,
            error = %error,
            "Kafka client error: {reason}"
        );
    }
}
