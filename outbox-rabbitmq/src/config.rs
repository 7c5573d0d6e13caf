//! The transport's settings and their defaults, the check of the broker URL
//! and the redaction of its password.
//! [`RabbitBroker`](crate::RabbitBroker) is the public builder over
//! [`Settings`].

use std::time::Duration;

use lapin::uri::AMQPUri;

use crate::error::{Error, Result};

/// The default transport name, as used in `#[publish_to(rabbit, "orders")]`.
pub const DEFAULT_NAME: &str = "rabbit";
/// How long [`RabbitBroker::connect`](crate::RabbitBroker::connect) (and a
/// reconnect) waits for the AMQP handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The one deadline of a publish (reconnecting if needed, sending, waiting
/// for the confirm): below the subscribers' default `lease_ttl` (60 s).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Transport::close`](outbox_core::Transport::close) waits for
/// outstanding confirms and the connection's close.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default client-side size limit of a message body: 128 MiB, the
/// default `max_message_size` of RabbitMQ 3.8 to 3.13 (RabbitMQ 4 lowered
/// its default to 16 MiB: set [`RabbitBroker::max_message_bytes`](crate::RabbitBroker::max_message_bytes)
/// to your broker's value).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
/// The connection name shown in RabbitMQ's management UI.
pub const DEFAULT_CONNECTION_NAME: &str = "outbox-rabbitmq";

/// What a [`RabbitBroker`](crate::RabbitBroker) holds.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    /// The URL as given (may hold a password: never print it).
    pub(crate) url: String,
    pub(crate) connection_name: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) max_message_bytes: Option<usize>,
}

impl Settings {
    /// The defaults, for the broker at `url`.
    pub(crate) fn new(url: String) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            url,
            connection_name: DEFAULT_CONNECTION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            max_message_bytes: Some(DEFAULT_MAX_MESSAGE_BYTES),
        }
    }

    /// The URL with its password replaced by `***`, for logs and errors.
    pub(crate) fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            transport: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Checks the settings and parses the URL.
    pub(crate) fn check(&self) -> Result<AMQPUri> {
        if self.name.trim().is_empty() {
            return Err(self.invalid("the transport name is empty"));
        }
        if self.connect_timeout.is_zero() {
            return Err(self.invalid("connect_timeout must be > 0"));
        }
        if self.publish_timeout.is_zero() {
            return Err(
                self.invalid("publish_timeout must be > 0: a publish would never be confirmed")
            );
        }
        if self.max_message_bytes == Some(0) {
            return Err(self.invalid("max_message_bytes must be > 0 (or None for no limit)"));
        }
        self.url.parse::<AMQPUri>().map_err(|e| {
            self.invalid(format!(
                "the URL `{}` is not an AMQP URL ({e}); expected \
                 amqp://user:password@host:5672/vhost (vhost `/` is written %2f)",
                self.redacted_url()
            ))
        })
    }
}

/// `url` with the password of its user info replaced by `***`
/// (`amqp://guest:***@host:5672/%2f`).
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..rest_start],
        &userinfo[..colon],
        &url[rest_start + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:hunter2@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://u:p@ss@h/v?heartbeat=5"),
            "amqps://u:***@h/v?heartbeat=5"
        );
        assert_eq!(redact_url("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(redact_url("amqp://user@h/%2f"), "amqp://user@h/%2f");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn bad_settings_are_refused_without_echoing_the_password() {
        let mut s = Settings::new("http://u:hunter2@h".into());
        s.url = "amqp://u:hunter2@h:notaport/%2f".into();
        let e = s.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("not an AMQP URL") && !e.contains("hunter2"),
            "{e}"
        );
        let mut s = Settings::new("amqp://h".into());
        s.publish_timeout = Duration::ZERO;
        assert!(s.check().is_err());
        assert!(
            Settings::new("amqp://guest:guest@h:5672/%2f".into())
                .check()
                .is_ok()
        );
    }
}
