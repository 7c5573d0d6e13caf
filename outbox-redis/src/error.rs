//! The crate's one error enum, [`enum@Error`], and its classification
//! ([`Error::is_retryable`]): which failures are permanent refusals.

use std::time::Duration;

use redis::RedisError;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to Redis.
///
/// Every variant about one message names its destination as the route wrote
/// it (`stream:orders`, `list:jobs`, `channel:events` or a bare stream name);
/// every variant about the server names its URL with the password redacted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work (an unparsable URL, a zero timeout, an
    /// empty name); nothing was sent.
    #[error("invalid configuration of Redis transport `{transport}`: {reason}")]
    InvalidConfig {
        /// The transport's registered name.
        transport: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// The server did not answer the startup check (connect, `PING`) within
    /// the connect timeout, or refused the connection.
    #[error(
        "cannot reach Redis at {url} within {timeout:?} (is the server running and the address \
         right?){}",
        .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default()
    )]
    Unreachable {
        /// The transport's registered name.
        transport: String,
        /// The server URL, password redacted.
        url: String,
        /// The connect timeout.
        timeout: Duration,
        /// The client's error; `None` when the check timed out.
        #[source]
        source: Option<Box<RedisError>>,
    },

    /// The server refused the credentials at connect time (`WRONGPASS`,
    /// `NOAUTH`: it requires a password the URL does not give).
    #[error(
        "Redis at {url} refused the credentials of transport `{transport}` (put the right \
         user and password in the URL: redis://user:password@host:port/db): {source}"
    )]
    Auth {
        /// The transport's registered name.
        transport: String,
        /// The server URL, password redacted.
        url: String,
        /// The server's reply.
        #[source]
        source: Box<RedisError>,
    },

    /// The destination is not one this transport can publish to (see
    /// [`check_destination`](crate::check_destination)).
    #[error("invalid Redis destination {destination:?}: {reason}")]
    InvalidDestination {
        /// The destination as the route wrote it.
        destination: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// The message cannot be written in FastStream's binary format: a
    /// header name or value longer than 65,535 bytes, more than 65,535
    /// headers, or a key ([`Response::key`](outbox_core::Response::key))
    /// that is not UTF-8. Retrying cannot change that.
    #[error(
        "cannot encode the message{} in FastStream's Redis format: {reason}",
        .destination.as_ref().map(|d| format!(" for {d:?}")).unwrap_or_default()
    )]
    InvalidMessage {
        /// The destination, when known.
        destination: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// The encoded message is larger than
    /// [`max_message_bytes`](crate::RedisBroker::max_message_bytes); nothing
    /// was sent.
    #[error(
        "the message for {destination:?} is {size} bytes encoded, over the transport's \
         max_message_bytes ({limit}); Redis refuses bulk strings over its \
         proto-max-bulk-len (512 MB by default) and large values hurt its latency: send a \
         reference instead, or raise both limits"
    )]
    TooLarge {
        /// The destination.
        destination: String,
        /// The encoded size (FastStream frame: headers and body).
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// The destination key exists and holds another type (Redis's
    /// `WRONGTYPE`): e.g. an `XADD` to a key that is a list.
    #[error(
        "Redis key {key:?} holds a {actual}, not a {expected} (destination {destination:?}): \
         delete or rename the key, or name the right kind in the route \
         (`stream:`, `list:`): {source}"
    )]
    WrongType {
        /// The destination as the route wrote it.
        destination: String,
        /// The Redis key.
        key: String,
        /// The type the command needs (`stream`, `list`).
        expected: &'static str,
        /// The key's type as `TYPE` reported it (`unknown` when that
        /// failed).
        actual: String,
        /// The server's reply.
        #[source]
        source: Box<RedisError>,
    },

    /// A `PUBLISH` reached no subscriber (Pub/Sub keeps nothing): the
    /// message is not delivered, so the publish fails and the row is retried
    /// until a subscriber listens, unless
    /// [`allow_no_subscribers`](crate::RedisBroker::allow_no_subscribers)
    /// is on.
    #[error(
        "no subscriber listens on Redis channel {channel:?} (PUBLISH reached 0 clients; Pub/Sub \
         keeps nothing, so the row is kept and retried; use a stream or a list for durable \
         delivery, or allow_no_subscribers(true))"
    )]
    NoSubscriber {
        /// The channel.
        channel: String,
    },

    /// The command was not answered within the publish timeout (server
    /// down, paused, overloaded or unreachable). It may still have been
    /// executed: the row is retried, so the message may arrive twice.
    #[error(
        "Redis did not confirm the publish to {destination:?} within {timeout:?} (is the server \
         reachable?){}",
        .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default()
    )]
    Timeout {
        /// The destination.
        destination: String,
        /// The publish timeout.
        timeout: Duration,
        /// The client's last error (e.g. the refused reconnect), if any.
        #[source]
        source: Option<Box<RedisError>>,
    },

    /// The command failed: the connection broke, or the server answered
    /// with an error (`OOM`, `READONLY`, `NOPERM`, `LOADING`…).
    #[error("Redis failed the publish to {destination:?}: {source}")]
    Command {
        /// The destination.
        destination: String,
        /// The client's error or the server's reply.
        #[source]
        source: Box<RedisError>,
    },
}

impl Error {
    /// True when retrying later may succeed (server down, timeouts, a
    /// connection lost, `OOM` under `maxmemory`, a replica after a
    /// failover, no Pub/Sub subscriber yet); false for failures that repeat
    /// until the configuration, the key or the message changes (invalid
    /// configuration or destination, refused credentials, a message too
    /// large or not encodable, `WRONGTYPE`, `NOPERM`).
    ///
    /// `OOM` counts as transient: consumers trimming or deleting entries, or
    /// a raised `maxmemory`, make room. Wrongly retrying a permanent error
    /// costs a few attempts; wrongly giving up on a transient one
    /// dead-letters a good row.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidConfig { .. }
            | Error::Auth { .. }
            | Error::InvalidDestination { .. }
            | Error::InvalidMessage { .. }
            | Error::TooLarge { .. }
            | Error::WrongType { .. } => false,
            Error::Unreachable { .. } | Error::NoSubscriber { .. } | Error::Timeout { .. } => true,
            Error::Command { source, .. } => !is_permanent_reply(source),
        }
    }

    /// The destination, for the variants about one message.
    pub fn destination(&self) -> Option<&str> {
        match self {
            Error::InvalidDestination { destination, .. }
            | Error::TooLarge { destination, .. }
            | Error::WrongType { destination, .. }
            | Error::Timeout { destination, .. }
            | Error::Command { destination, .. } => Some(destination),
            Error::NoSubscriber { channel } => Some(channel),
            Error::InvalidMessage { destination, .. } => destination.as_deref(),
            Error::InvalidConfig { .. } | Error::Unreachable { .. } | Error::Auth { .. } => None,
        }
    }

    /// The server's error code (`WRONGTYPE`, `OOM`, `NOPERM`…), when the
    /// server answered with an error.
    pub fn server_code(&self) -> Option<&str> {
        match self {
            Error::Auth { source, .. }
            | Error::WrongType { source, .. }
            | Error::Command { source, .. } => source.code(),
            Error::Unreachable { source, .. } | Error::Timeout { source, .. } => {
                source.as_deref().and_then(RedisError::code)
            }
            _ => None,
        }
    }
}

/// Server replies that repeat on every retry of the same command: an ACL
/// that denies the command or the key (`NOPERM`), a key of another type
/// (`WRONGTYPE`, normally mapped to [`Error::WrongType`]).
fn is_permanent_reply(e: &RedisError) -> bool {
    matches!(e.code(), Some("NOPERM" | "WRONGTYPE"))
}

/// True when `e` is the server refusing the credentials (`WRONGPASS`,
/// `NOAUTH`, or the client's authentication failure).
pub(crate) fn is_auth_failure(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &'static str) -> Box<RedisError> {
        let text = format!("{code} {detail}");
        Box::new(
            redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).map_or_else(
                |e| e,
                |v| match v {
                    redis::Value::ServerError(se) => RedisError::from(se),
                    other => panic!("not an error: {other:?}"),
                },
            ),
        )
    }

    #[test]
    fn classifies_transient_and_permanent_errors() {
        let cmd = |code, detail| Error::Command {
            destination: "orders".into(),
            source: server(code, detail),
        };
        let noperm = cmd(
            "NOPERM",
            "this user has no permissions to access one of the keys",
        );
        assert_eq!(noperm.server_code(), Some("NOPERM"));
        assert!(!noperm.is_retryable());
        for (code, detail) in [
            ("OOM", "command not allowed when used memory > 'maxmemory'."),
            ("READONLY", "You can't write against a read only replica."),
            ("LOADING", "Redis is loading the dataset in memory"),
        ] {
            let e = cmd(code, detail);
            assert_eq!(e.server_code(), Some(code));
            assert!(e.is_retryable(), "{code} is transient");
        }
        let too_large = Error::TooLarge {
            destination: "orders".into(),
            size: 10,
            limit: 5,
        };
        assert!(!too_large.is_retryable());
        assert!(too_large.to_string().contains("max_message_bytes (5)"));
        assert!(
            Error::NoSubscriber {
                channel: "c".into()
            }
            .is_retryable()
        );
        assert!(
            Error::Timeout {
                destination: "orders".into(),
                timeout: Duration::from_secs(1),
                source: None,
            }
            .is_retryable()
        );
    }

    #[test]
    fn auth_failures_are_recognised() {
        assert!(is_auth_failure(&server(
            "WRONGPASS",
            "invalid username-password pair or user is disabled."
        )));
        assert!(is_auth_failure(&server(
            "NOAUTH",
            "Authentication required."
        )));
        assert!(!is_auth_failure(&server("OOM", "no memory")));
    }
}
