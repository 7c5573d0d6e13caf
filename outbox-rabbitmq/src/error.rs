//! The crate's error type.

use std::time::Duration;

/// `Result` with this crate's [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The lapin error an [`enum@Error`] keeps as its source.
pub type LapinError = lapin::Error;

/// Everything the RabbitMQ transport can report.
///
/// Every variant that concerns one message names its destination; URLs are
/// always shown with the password redacted. Use [`Error::is_retryable`] to
/// tell a transient failure (broker down, timeout, a queue or exchange that
/// may be created later, a nack) from a permanent one (message too large,
/// access refused, an invalid name): [`Transport::publish`](outbox_core::Transport::publish)
/// wraps a permanent one in an [`outbox_core::BusRejection`] (this error is
/// its source), so the row is dead-lettered at once under the default retry
/// strategy.
///
/// ```
/// use outbox_rabbitmq::Error;
///
/// fn should_retry(e: &(dyn std::error::Error + 'static)) -> bool {
///     // Walk the source chain: the runtime may wrap the transport's error.
///     let mut cur = Some(e);
///     while let Some(err) = cur {
///         if let Some(rabbit) = err.downcast_ref::<Error>() {
///             return rabbit.is_retryable();
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
    /// The settings were refused before anything was sent (an unparsable
    /// URL, an empty name, a zero timeout). Fix the configuration.
    #[error("invalid RabbitMQ configuration for transport `{transport}`: {reason}")]
    InvalidConfig {
        /// The transport's registered name.
        transport: String,
        /// What is wrong and how to fix it (secrets are never included).
        reason: String,
    },

    /// No AMQP connection could be opened: the broker is down or
    /// unreachable, or did not complete the handshake in time.
    #[error(
        "cannot connect to RabbitMQ at `{url}` (transport `{transport}`): {reason}; is the broker \
         running and reachable from here (connect_timeout {timeout:?})?"
    )]
    Connect {
        /// The transport's registered name.
        transport: String,
        /// The broker URL, password redacted.
        url: String,
        /// The connect timeout that applied.
        timeout: Duration,
        /// What happened (timeout, I/O error, …).
        reason: String,
        /// lapin's error, when there is one.
        #[source]
        source: Option<Box<LapinError>>,
    },

    /// The broker refused the credentials or the virtual host
    /// (`ACCESS_REFUSED` / `NOT_ALLOWED`): check the user, the password and
    /// the user's permissions on the vhost of the URL.
    #[error(
        "RabbitMQ at `{url}` refused the login (transport `{transport}`): check the user name, \
         the password and that the user may access the virtual host of the URL: {source}"
    )]
    AccessRefused {
        /// The transport's registered name.
        transport: String,
        /// The broker URL, password redacted.
        url: String,
        /// lapin's error.
        #[source]
        source: Box<LapinError>,
    },

    /// A destination breaks the naming rules (see
    /// [`RabbitBroker`](crate::RabbitBroker)'s destination syntax).
    #[error("invalid RabbitMQ destination `{destination}`: {reason}")]
    InvalidDestination {
        /// The destination as written in `publish_to`.
        destination: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// The message is larger than the transport's
    /// [`max_message_bytes`](crate::RabbitBroker::max_message_bytes), or
    /// RabbitMQ refused it as larger than its `max_message_size`.
    #[error(
        "the message for `{destination}` is {size} bytes, over RabbitMQ's limit of {limit}: \
         raise max_message_bytes (and the broker's max_message_size) or send smaller messages"
    )]
    MessageTooLarge {
        /// The destination.
        destination: String,
        /// The body's size in bytes.
        size: usize,
        /// The limit, as text (`max_message_bytes = N` or the broker's words).
        limit: String,
    },

    /// The exchange of the destination does not exist: RabbitMQ closed the
    /// channel with `404 NOT_FOUND`. Create it (e.g. with
    /// [`RabbitBroker::ensure_exchange`](crate::RabbitBroker::ensure_exchange));
    /// the row is retried until it exists.
    #[error(
        "RabbitMQ has no exchange `{exchange}` (destination `{destination}`): declare it, e.g. \
         with RabbitBroker::ensure_exchange, before relaying to it; the row is retried: {reason}"
    )]
    ExchangeNotFound {
        /// The destination.
        destination: String,
        /// The missing exchange.
        exchange: String,
        /// The broker's reply text.
        reason: String,
    },

    /// The broker returned the message as unroutable (`basic.return`,
    /// `312 NO_ROUTE`): no queue is bound to the exchange with that routing
    /// key (for a plain queue name: the queue does not exist). Declare the
    /// queue or binding (e.g. with
    /// [`RabbitBroker::ensure_queue`](crate::RabbitBroker::ensure_queue)); the
    /// row is retried.
    #[error(
        "RabbitMQ could not route the message for `{destination}` (exchange `{exchange}`, \
         routing key `{routing_key}`) to any queue and returned it: declare the queue or a \
         binding for that routing key; the row is retried ({reply})"
    )]
    Unroutable {
        /// The destination.
        destination: String,
        /// The exchange (`""` for the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's reply code and text.
        reply: String,
    },

    /// The broker negatively acknowledged the message (`basic.nack`): it
    /// could not take responsibility for it (e.g. a queue's `overflow =
    /// reject-publish` limit). The row is retried.
    #[error("RabbitMQ refused (nacked) the message for `{destination}`; the row is retried")]
    Nacked {
        /// The destination.
        destination: String,
    },

    /// The message cannot be expressed in AMQP (a header name longer than
    /// 255 bytes): permanent, fix the handler.
    #[error("the message for `{destination}` cannot be sent over AMQP: {reason}")]
    InvalidMessage {
        /// The destination.
        destination: String,
        /// What is wrong.
        reason: String,
    },

    /// The broker refused the publish permanently: `403 ACCESS_REFUSED` on
    /// the exchange, or another channel error that no retry fixes.
    #[error("RabbitMQ refused the message for `{destination}` for good: {reason}")]
    Refused {
        /// The destination.
        destination: String,
        /// The broker's reply text.
        reason: String,
        /// lapin's error.
        #[source]
        source: Option<Box<LapinError>>,
    },

    /// The publish failed on the way (connection or channel lost, the
    /// broker closed the channel): transient, the row is retried and the
    /// next publish opens a new connection or channel.
    #[error("publishing to RabbitMQ failed for `{destination}` ({stage})")]
    Publish {
        /// The destination.
        destination: String,
        /// What was under way (`publish`, `confirm`, `open channel`, …).
        stage: &'static str,
        /// lapin's error.
        #[source]
        source: Box<LapinError>,
    },

    /// No confirm arrived within the publish timeout (the broker is slow or
    /// unreachable). The message may still have been written: the row is
    /// retried (at least once).
    #[error(
        "RabbitMQ did not confirm the message for `{destination}` within {timeout:?} \
         (publish_timeout; is the broker reachable?)"
    )]
    Timeout {
        /// The destination.
        destination: String,
        /// The publish timeout.
        timeout: Duration,
    },

    /// Declaring a queue, an exchange or a binding failed.
    #[error("could not declare {what} on RabbitMQ at `{url}`: {reason}")]
    Declare {
        /// What was declared (`queue "orders"`, …).
        what: String,
        /// The broker URL, password redacted.
        url: String,
        /// What went wrong.
        reason: String,
        /// lapin's error, when there is one.
        #[source]
        source: Option<Box<LapinError>>,
    },

    /// Closing the connection at shutdown failed.
    #[error("closing the RabbitMQ connection of transport `{transport}` failed")]
    Close {
        /// The transport's registered name.
        transport: String,
        /// lapin's error.
        #[source]
        source: Box<LapinError>,
    },
}

impl Error {
    /// Whether retrying the same message later may succeed: `false` for
    /// permanent refusals (message too large, access refused, an invalid
    /// name or configuration), `true` for the rest (broker down, timeout,
    /// missing exchange or queue, nack).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Error::InvalidConfig { .. }
                | Error::InvalidDestination { .. }
                | Error::MessageTooLarge { .. }
                | Error::InvalidMessage { .. }
                | Error::Refused { .. }
        )
    }

    /// The destination the error is about, if it concerns one message.
    pub fn destination(&self) -> Option<&str> {
        match self {
            Error::InvalidDestination { destination, .. }
            | Error::MessageTooLarge { destination, .. }
            | Error::InvalidMessage { destination, .. }
            | Error::ExchangeNotFound { destination, .. }
            | Error::Unroutable { destination, .. }
            | Error::Nacked { destination }
            | Error::Refused { destination, .. }
            | Error::Publish { destination, .. }
            | Error::Timeout { destination, .. } => Some(destination),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the engine renders an error: each text of the chain once.
    fn render_chain(e: &(dyn std::error::Error + 'static)) -> String {
        outbox_core::render_error_chain(e)
    }

    fn io(text: &str) -> Box<LapinError> {
        Box::new(LapinError::from(std::io::Error::other(text.to_owned())))
    }

    /// Each variant leaves its source's text to the source, so a rendered
    /// chain names every error text once.
    #[test]
    fn a_rendered_chain_names_each_error_text_once() {
        let errors = [
            Error::Connect {
                transport: "rabbit".into(),
                url: "amqp://u:***@h:5672/%2f".into(),
                timeout: Duration::from_secs(10),
                reason: "the handshake failed".into(),
                source: Some(io("connection refused")),
            },
            Error::AccessRefused {
                transport: "rabbit".into(),
                url: "amqp://u:***@h:5672/%2f".into(),
                source: io("ACCESS_REFUSED"),
            },
            Error::Publish {
                destination: "orders".into(),
                stage: "confirm",
                source: io("connection reset"),
            },
            Error::Refused {
                destination: "orders".into(),
                reason: "403 ACCESS_REFUSED: no write access".into(),
                source: None,
            },
        ];
        for e in errors {
            let outer = outbox_core::Error::Transport {
                transport: "rabbit".into(),
                destination: "orders".into(),
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
        let line = render_chain(&Error::Connect {
            transport: "rabbit".into(),
            url: "amqp://u:***@h:5672/%2f".into(),
            timeout: Duration::from_secs(10),
            reason: "the handshake failed".into(),
            source: Some(io("connection refused")),
        });
        assert_eq!(
            line,
            "cannot connect to RabbitMQ at `amqp://u:***@h:5672/%2f` (transport `rabbit`): the \
             handshake failed; is the broker running and reachable from here (connect_timeout \
             10s)?: IO error: connection refused"
        );
    }

    #[test]
    fn classifies_transient_and_permanent_errors() {
        let d = || "orders".to_owned();
        assert!(
            !Error::MessageTooLarge {
                destination: d(),
                size: 2,
                limit: "1".into()
            }
            .is_retryable()
        );
        assert!(
            !Error::InvalidDestination {
                destination: d(),
                reason: "r".into()
            }
            .is_retryable()
        );
        assert!(Error::Nacked { destination: d() }.is_retryable());
        let unroutable = Error::Unroutable {
            destination: d(),
            exchange: String::new(),
            routing_key: d(),
            reply: "312 NO_ROUTE".into(),
        };
        assert!(unroutable.is_retryable());
        assert_eq!(unroutable.destination(), Some("orders"));
        assert!(
            Error::ExchangeNotFound {
                destination: d(),
                exchange: "x".into(),
                reason: "r".into()
            }
            .is_retryable()
        );
        assert!(
            Error::Timeout {
                destination: d(),
                timeout: Duration::from_secs(1)
            }
            .is_retryable()
        );
    }
}
