//! The librdkafka client context: routes librdkafka's logs and global errors
//! to `tracing`.

use std::borrow::Cow;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// Forwards librdkafka's log lines (target `librdkafka`) and global error
/// callbacks (broker down, all brokers down, authentication…) to `tracing`,
/// tagged with the transport name, with librdkafka's misleading guesses
/// replaced by an explanation (see [`explain`]).
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
        let log_message = explain(log_message);
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
            "Kafka client error: {}",
            explain(reason)
        );
    }
}

/// What the connection's first request failing usually means, in place of
/// librdkafka's guess that the broker is older than Kafka 0.10 (2016).
const NO_ANSWER: &str = "the broker accepted the connection but did not answer its first \
     request in time: it is down, paused, overloaded or still starting (librdkafka's guess \
     \"broker version < 0.10\" almost never applies)";

/// What a connection closed during its first request usually means.
const CLOSED: &str = "the broker closed the connection during its first request: it is \
     restarting or shutting down, or this is a TLS listener and `security.protocol` is not \
     SSL (librdkafka's guess \"broker version < 0.10\" almost never applies)";

/// librdkafka's guesses about a first request (ApiVersion) that failed, and
/// what replaces each.
const GUESSES: [(&str, &str); 3] = [
    (
        "probably due to broker version < 0.10 (see api.version.request configuration)",
        NO_ANSWER,
    ),
    (
        "might be caused by incorrect security.protocol configuration (connecting to a SSL \
         listener?) or broker version is < 0.10 (see api.version.request)",
        CLOSED,
    ),
    (
        "might be caused by broker version < 0.10 (see api.version.request)",
        CLOSED,
    ),
];

/// `message` with librdkafka's "broker version < 0.10" guesses replaced by
/// what usually happened. Against any broker of the last years the first
/// request of a connection fails because the broker is unreachable, hung or
/// restarting (a 45 s outage logs it on every reconnect), not because of its
/// version; the rest of the line (the error, the state) is kept.
pub(crate) fn explain(message: &str) -> Cow<'_, str> {
    if !message.contains("< 0.10") {
        return Cow::Borrowed(message);
    }
    let mut out = message.to_owned();
    for (guess, explanation) in GUESSES {
        out = out.replace(guess, explanation);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafkas_version_guess_is_replaced_by_an_explanation() {
        // As librdkafka 2.12 logs them (rdkafka_broker.c), with its suffix.
        let timed_out = "127.0.0.1:9092/1: ApiVersionRequest failed: Local: Timed out: \
             probably due to broker version < 0.10 (see api.version.request configuration) \
             (after 10009ms in state APIVERSION_QUERY, 4 identical error(s) suppressed)";
        let text = explain(timed_out);
        assert!(
            text.starts_with("127.0.0.1:9092/1: ApiVersionRequest failed: Local: Timed out: "),
            "{text}"
        );
        assert!(text.contains("did not answer its first request"), "{text}");
        assert!(!text.contains("probably due to"), "{text}");
        assert!(
            text.ends_with(
                "(after 10009ms in state APIVERSION_QUERY, 4 identical error(s) suppressed)"
            ),
            "{text}"
        );

        let closed = "127.0.0.1:9092/bootstrap: Disconnected while requesting ApiVersion: \
             might be caused by incorrect security.protocol configuration (connecting to a SSL \
             listener?) or broker version is < 0.10 (see api.version.request) (after 0ms in \
             state APIVERSION_QUERY)";
        let text = explain(closed);
        assert!(
            text.contains("closed the connection during its first request"),
            "{text}"
        );
        assert!(!text.contains("might be caused"), "{text}");
        let ssl = "b:9093/1: Disconnected while requesting ApiVersion: might be caused by \
             broker version < 0.10 (see api.version.request) (after 1ms in state APIVERSION_QUERY)";
        assert!(
            !explain(ssl).contains("might be caused"),
            "{}",
            explain(ssl)
        );

        let other = "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused";
        assert!(matches!(explain(other), Cow::Borrowed(t) if t == other));
    }
}
