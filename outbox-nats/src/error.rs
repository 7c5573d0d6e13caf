//! The crate's one error type, [`enum@Error`], and its classification:
//! [`Error::is_retryable`] says which errors are permanent refusals (the
//! transport wraps those in a [`BusRejection`](outbox_core::BusRejection)).

use std::time::Duration;

/// A boxed error from the NATS client (or I/O), kept as the source.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The JetStream API error code (`err_code`) of "message size exceeds
/// maximum allowed": the stream's `max_msg_size` refused the message.
pub const JS_ERR_MESSAGE_SIZE: u64 = 10054;

/// Everything that can go wrong in this crate. Each variant names the bus
/// (NATS), the subject or stream and, where there is one, the fix.
///
/// The error chain (`source()`) ends with the client's own error where there
/// is one; each variant's text leaves that text out, so a rendered chain
/// names every text once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid (empty name or URL, zero timeout, unreadable
    /// credentials file…); nothing was sent.
    #[error("invalid NATS transport `{transport}` settings: {reason}")]
    InvalidConfig {
        /// The transport name.
        transport: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// No NATS server answered at the URL within the connect timeout.
    #[error(
        "transport `{transport}`: cannot reach the NATS server at {url} within {timeout:?} \
         (connect_timeout); is nats-server running there and the URL right?"
    )]
    Unreachable {
        /// The transport name.
        transport: String,
        /// The server URL(s), passwords and tokens redacted.
        url: String,
        /// The connect timeout.
        timeout: Duration,
        /// The client's error.
        #[source]
        source: Source,
    },

    /// The NATS server refused the credentials (authorization violation,
    /// failed nkey/JWT signature).
    #[error(
        "transport `{transport}`: the NATS server at {url} refused the credentials; check the \
         user/password or token in the URL, NatsBroker::token/user_password/credentials_file"
    )]
    Refused {
        /// The transport name.
        transport: String,
        /// The server URL(s), passwords and tokens redacted.
        url: String,
        /// The client's error.
        #[source]
        source: Source,
    },

    /// JetStream does not answer (the server runs without `-js`, or the
    /// account has no JetStream).
    #[error(
        "transport `{transport}`: JetStream does not answer at {url}; start nats-server with -js \
         (or enable JetStream for the account), or opt in to core NATS with \
         NatsBroker::core_publish"
    )]
    NoJetStream {
        /// The transport name.
        transport: String,
        /// The server URL(s), passwords and tokens redacted.
        url: String,
        /// The client's error.
        #[source]
        source: Source,
    },

    /// The subject is not a valid NATS publish subject.
    #[error("invalid NATS subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The subject as given.
        subject: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// The message cannot be written as a NATS message (a header name or
    /// value NATS does not allow, a key that is not UTF-8).
    #[error("the message for NATS subject {subject:?} cannot be sent: {reason}")]
    InvalidMessage {
        /// The subject.
        subject: String,
        /// What NATS does not allow.
        reason: String,
    },

    /// The message (payload plus headers) is larger than the server's
    /// `max_payload` (1 MiB by default, from the server's INFO).
    #[error(
        "the message for NATS subject {subject:?} is larger than the server's max_payload \
         ({max} bytes); NATS never takes it"
    )]
    TooLarge {
        /// The subject.
        subject: String,
        /// The server's `max_payload`.
        max: usize,
        /// The client's error (with both sizes).
        #[source]
        source: Source,
    },

    /// No JetStream stream captures the subject: the server answered "no
    /// responders". Transient: a stream may be created later (the row is
    /// retried).
    #[error(
        "no JetStream stream captures NATS subject {subject:?} (no responders); create one \
         (NatsBroker::ensure_stream or `nats stream add`) or publish with core NATS"
    )]
    NoStream {
        /// The subject.
        subject: String,
    },

    /// JetStream answered the publish with an API error (stream full,
    /// message larger than the stream's `max_msg_size`, …).
    #[error("JetStream refused the message for NATS subject {subject:?}: {detail}")]
    StreamRefused {
        /// The subject.
        subject: String,
        /// The status code (400, 503, …).
        code: usize,
        /// The JetStream error code ([`JS_ERR_MESSAGE_SIZE`], …).
        err_code: u64,
        /// The server's answer (description and both codes).
        detail: String,
    },

    /// The publish was not confirmed within the publish timeout (server
    /// down or unreachable, JetStream slow). The message may still be
    /// stored; the row is retried and `Nats-Msg-Id` drops the copy.
    #[error(
        "NATS did not confirm the message for subject {subject:?} within {timeout:?} \
         (publish_timeout); is the server reachable?"
    )]
    Timeout {
        /// The subject.
        subject: String,
        /// The publish timeout.
        timeout: Duration,
    },

    /// The publish failed on the way (connection lost, client closed).
    #[error("publishing to NATS subject {subject:?} failed")]
    Publish {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: Source,
    },

    /// Closing: the client could not flush within the flush timeout.
    #[error("transport `{transport}`: flushing the NATS connection failed within {timeout:?}")]
    Flush {
        /// The transport name.
        transport: String,
        /// The flush timeout.
        timeout: Duration,
        /// The client's error, if it gave one (none on a timeout).
        #[source]
        source: Option<Source>,
    },

    /// Creating or checking a JetStream stream failed.
    #[error("JetStream stream {stream:?}: {reason}")]
    Stream {
        /// The stream name.
        stream: String,
        /// What failed, and what to check.
        reason: String,
        /// The client's error, if any.
        #[source]
        source: Option<Source>,
    },
}

/// `Result` with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying may succeed. `false` for permanent refusals: an
    /// invalid setting, subject or message, refused credentials, a message
    /// over the server's `max_payload` or the stream's `max_msg_size`
    /// ([`JS_ERR_MESSAGE_SIZE`]). Everything else (timeouts, a lost
    /// connection, no stream yet, a full stream) is transient.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidConfig { .. }
            | Error::Refused { .. }
            | Error::InvalidSubject { .. }
            | Error::InvalidMessage { .. }
            | Error::TooLarge { .. } => false,
            Error::StreamRefused { err_code, .. } => *err_code != JS_ERR_MESSAGE_SIZE,
            Error::Unreachable { .. }
            | Error::NoJetStream { .. }
            | Error::NoStream { .. }
            | Error::Timeout { .. }
            | Error::Publish { .. }
            | Error::Flush { .. }
            | Error::Stream { .. } => true,
        }
    }

    /// The subject the error is about, if it is about one.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Error::InvalidSubject { subject, .. }
            | Error::InvalidMessage { subject, .. }
            | Error::TooLarge { subject, .. }
            | Error::NoStream { subject }
            | Error::StreamRefused { subject, .. }
            | Error::Timeout { subject, .. }
            | Error::Publish { subject, .. } => Some(subject),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(err_code: u64) -> Error {
        Error::StreamRefused {
            subject: "s".into(),
            code: 400,
            err_code,
            detail: "d".into(),
        }
    }

    #[test]
    fn permanent_refusals_are_the_ones_retrying_cannot_fix() {
        assert!(!refused(JS_ERR_MESSAGE_SIZE).is_retryable());
        assert!(refused(10077).is_retryable(), "a full stream may drain");
        let too_large = Error::TooLarge {
            subject: "s".into(),
            max: 1,
            source: "big".into(),
        };
        assert!(!too_large.is_retryable());
        assert!(
            Error::NoStream {
                subject: "s".into()
            }
            .is_retryable()
        );
        let timeout = Error::Timeout {
            subject: "orders".into(),
            timeout: Duration::from_secs(30),
        };
        assert!(timeout.is_retryable());
        assert_eq!(timeout.subject(), Some("orders"));
        assert!(timeout.to_string().contains("30s"), "{timeout}");
    }

    /// The rendered chain names each text once (the variant leaves its
    /// source's text out).
    #[test]
    fn a_rendered_chain_names_each_error_text_once() {
        let errors = [
            Error::Unreachable {
                transport: "nats".into(),
                url: "nats://127.0.0.1:1".into(),
                timeout: Duration::from_secs(2),
                source: "connection refused".into(),
            },
            Error::TooLarge {
                subject: "s".into(),
                max: 1_048_576,
                source: "Payload size limit of 1048576 exceeded by message size of 2000000".into(),
            },
            Error::Publish {
                subject: "s".into(),
                source: "broken pipe".into(),
            },
        ];
        for e in errors {
            let outer = outbox_core::Error::Transport {
                transport: "nats".into(),
                destination: "s".into(),
                source: Box::new(e),
            };
            let line = outbox_core::render_error_chain(&outer);
            let mut cur = std::error::Error::source(&outer);
            while let Some(err) = cur {
                let text = err.to_string();
                assert_eq!(line.matches(&text).count(), 1, "{text:?} in {line:?}");
                cur = err.source();
            }
        }
    }
}
