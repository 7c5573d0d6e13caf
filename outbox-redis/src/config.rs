//! The transport's settings and their defaults, the client configuration
//! built from them, and the redaction of the URL's password.
//! [`RedisBroker`](crate::RedisBroker) is the public builder over
//! [`Settings`].

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;

use crate::error::{Error, Result};

/// The default transport name, as used in `publish_to("redis", "orders")`.
pub const DEFAULT_NAME: &str = "redis";
/// The default server URL.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
/// How long [`RedisBroker::connect`](crate::RedisBroker::connect) waits for
/// the server to answer (connect, authenticate, `PING`); also the budget of
/// each reconnect attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The one deadline of a publish (reconnecting included): below the
/// subscribers' default `lease_ttl` (60 s).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest encoded message (FastStream frame: headers and body) a
/// publish sends: 512 MiB, Redis's default `proto-max-bulk-len`. A larger
/// bulk string makes the server reply `Protocol error: invalid bulk length`
/// and drop the connection, which would look like an outage; the client
/// check turns it into a permanent refusal instead.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// Reconnect attempts per reconnection (then the next command starts
/// another reconnection); each waits up to [`MAX_RECONNECT_DELAY`] before
/// trying.
const RECONNECT_RETRIES: usize = 4;
/// The longest wait between two reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What a [`RedisBroker`](crate::RedisBroker) holds.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) stream_maxlen: Option<u64>,
    pub(crate) max_message_bytes: usize,
    pub(crate) allow_no_subscribers: bool,
}

impl Settings {
    /// The defaults, for the server at `url`.
    pub(crate) fn new(url: String) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            url,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            stream_maxlen: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            allow_no_subscribers: false,
        }
    }

    /// The URL with its password redacted, for logs and errors.
    pub(crate) fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            transport: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Checks the settings and opens the (not yet connected) client.
    pub(crate) fn client(&self) -> Result<redis::Client> {
        if self.name.trim().is_empty() {
            return Err(self.invalid("the transport name is empty"));
        }
        if self.connect_timeout.is_zero() {
            return Err(self.invalid("connect_timeout must be > 0"));
        }
        if self.publish_timeout.is_zero() {
            return Err(self.invalid(
                "publish_timeout must be > 0: it is the one deadline of a publish, below the \
                 subscribers' lease_ttl",
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(self.invalid("max_message_bytes must be > 0"));
        }
        if self.stream_maxlen == Some(0) {
            return Err(self.invalid(
                "stream_maxlen(0) would trim every stream to nothing: give a positive length, \
                 or leave it unset to keep every entry",
            ));
        }
        redis::Client::open(self.url.as_str()).map_err(|e| {
            // The client's error may quote the URL: leave it out.
            self.invalid(format!(
                "cannot use the URL {} ({:?}): expected redis://[[user]:password@]host[:port][/db] \
                 (rediss:// needs a TLS feature of the redis crate, e.g. tokio-rustls-comp)",
                self.redacted_url(),
                e.kind()
            ))
        })
    }

    /// The connection manager's configuration: the connect timeout per
    /// attempt, quick reconnects, and the publish timeout per reply.
    pub(crate) fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.publish_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(MAX_RECONNECT_DELAY)
    }
}

/// `url` with the password of its user-info (`redis://user:password@host`)
/// and any `password=` query value replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            // `redis://secret@host`: the client takes it as a user name;
            // redact it too, as it may be a password written without `:`.
            None => format!("***@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://relay:hunter2@cache:6380/2"),
            "redis://relay:***@cache:6380/2"
        );
        assert_eq!(redact_url("redis://:hunter2@cache"), "redis://:***@cache");
        assert_eq!(redact_url("redis://hunter2@cache"), "redis://***@cache");
        assert_eq!(
            redact_url("redis://cache/0?password=hunter2&protocol=resp3"),
            "redis://cache/0?password=***&protocol=resp3"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[test]
    fn settings_are_checked() {
        let mut s = Settings::new("redis://u:hunter2@[bad".into());
        let err = s.client().expect_err("a bad URL");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("hunter2"), "{text}");
        s.url = DEFAULT_URL.into();
        s.client().unwrap_or_else(|e| panic!("{e}"));
        s.stream_maxlen = Some(0);
        assert!(s.client().is_err());
        s.stream_maxlen = None;
        s.publish_timeout = Duration::ZERO;
        assert!(s.client().is_err());
    }
}
