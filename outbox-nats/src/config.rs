//! The transport's settings and their defaults, the delivery mode
//! ([`Delivery`]), the client's `ConnectOptions`, and the redaction of
//! secrets in server URLs. [`NatsBroker`](crate::NatsBroker) is the public
//! builder over [`Settings`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};

use crate::error::{Error, Result};

/// The default transport name, as used in `#[publish_to(nats, "subject")]`.
pub const DEFAULT_NAME: &str = "nats";
/// The default client name (shown in the server's connection list).
pub const DEFAULT_CLIENT_NAME: &str = "outbox-nats";
/// How long [`NatsBroker::connect`](crate::NatsBroker::connect) waits for the
/// server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The one deadline of a publish (sending plus the JetStream ack): below the
/// subscribers' default `lease_ttl` (60 s).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits to flush the connection.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// JetStream's default duplicate window (`duplicate_window` of a stream
/// created without one): a second message with the same `Nats-Msg-Id` within
/// it is dropped by the server.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How a publish is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Delivery {
    /// JetStream publish (the default): resolves on the stream's PubAck,
    /// with `Nats-Msg-Id` set from the `outbox-id` header, so the server
    /// drops a redelivered copy within the stream's duplicate window. At
    /// least once; no duplicates within the window.
    #[default]
    JetStream,
    /// Core NATS publish: no acknowledgement. The publish resolves once the
    /// message was flushed to the socket; a message the server drops (no
    /// subscriber, slow consumer, a crash) is lost. **At most once**: opt in
    /// only for subjects where losing messages is acceptable.
    Core,
}

/// Credentials beyond the URL (`nats://user:password@host`,
/// `nats://token@host` also work).
#[derive(Clone, Default)]
pub(crate) enum Auth {
    #[default]
    None,
    Token(String),
    UserPassword(String, String),
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::UserPassword(u, _) => write!(f, "UserPassword({u:?}, <redacted>)"),
            Auth::CredentialsFile(p) => write!(f, "CredentialsFile({p:?})"),
        }
    }
}

/// The settings of [`NatsBroker`](crate::NatsBroker).
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) client_name: String,
    pub(crate) delivery: Delivery,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) auth: Auth,
    /// The explicit `Nats-Msg-Id` prefix; `None`: the message's source.
    pub(crate) msg_id_prefix: Option<String>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("client_name", &self.client_name)
            .field("delivery", &self.delivery)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("flush_timeout", &self.flush_timeout)
            .field("auth", &self.auth)
            .field("msg_id_prefix", &self.msg_id_prefix)
            .finish()
    }
}

impl Settings {
    pub(crate) fn new(url: String) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            url,
            client_name: DEFAULT_CLIENT_NAME.to_owned(),
            delivery: Delivery::JetStream,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            auth: Auth::None,
            msg_id_prefix: None,
        }
    }

    /// The URL(s) with passwords and tokens replaced by `<redacted>`.
    pub(crate) fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            transport: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// The server addresses: the URL split at commas.
    pub(crate) fn server_addrs(&self) -> Result<Vec<ServerAddr>> {
        let mut addrs = Vec::new();
        for part in self.url.split(',').map(str::trim) {
            if part.is_empty() {
                continue;
            }
            let addr = part.parse::<ServerAddr>().map_err(|e| {
                self.invalid(format!(
                    "cannot parse the server URL {:?} ({e}); expected nats://host:port",
                    redact_url(part)
                ))
            })?;
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err(self.invalid("the server URL is empty; expected nats://host:port"));
        }
        Ok(addrs)
    }

    /// Checks the settings (before anything is sent).
    pub(crate) fn check(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(self.invalid("the transport name is empty"));
        }
        for (what, d) in [
            ("connect_timeout", self.connect_timeout),
            ("publish_timeout", self.publish_timeout),
            ("flush_timeout", self.flush_timeout),
        ] {
            if d.is_zero() {
                return Err(self.invalid(format!("{what} is zero")));
            }
        }
        if let Some(p) = &self.msg_id_prefix
            && p.contains(['\r', '\n'])
        {
            return Err(self.invalid("msg_id_prefix holds a line break"));
        }
        self.server_addrs().map(|_| ())
    }

    /// The client's options: name, timeouts, credentials, logging of
    /// connection events under the transport's name.
    pub(crate) async fn connect_options(&self) -> Result<ConnectOptions> {
        // async-nats ignores credentials embedded in the URL: take them from
        // there unless set explicitly (`user:password@` or `token@`).
        let from_url = self.server_addrs()?.iter().find_map(|a| {
            let user = a.username().filter(|u| !u.is_empty())?.to_owned();
            Some(match a.password().filter(|p| !p.is_empty()) {
                Some(p) => Auth::UserPassword(user, p.to_owned()),
                None => Auth::Token(user),
            })
        });
        let auth = match (&self.auth, from_url) {
            (Auth::None, Some(url_auth)) => url_auth,
            (auth, _) => auth.clone(),
        };
        let opts = match &auth {
            Auth::None => ConnectOptions::new(),
            Auth::Token(t) => ConnectOptions::with_token(t.clone()),
            Auth::UserPassword(u, p) => {
                ConnectOptions::with_user_and_password(u.clone(), p.clone())
            }
            Auth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    self.invalid(format!(
                        "cannot read the credentials file {}: {e}",
                        path.display()
                    ))
                })?,
        };
        let name = self.name.clone();
        Ok(opts
            .name(&self.client_name)
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.publish_timeout))
            .event_callback(move |event| {
                let name = name.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(transport = %name, "NATS connection (re)established");
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(
                                transport = %name,
                                "NATS connection lost; the client reconnects, publishes wait \
                                 (up to publish_timeout)"
                            );
                        }
                        async_nats::Event::Closed | async_nats::Event::Draining => {
                            tracing::debug!(transport = %name, "NATS connection {event}");
                        }
                        other => tracing::warn!(transport = %name, "NATS client event: {other}"),
                    }
                }
            }))
    }
}

/// `url` with the password (`user:password@`) or token (`token@`) of each
/// comma-separated server replaced by `<redacted>`.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let (scheme, rest) = match part.find("://") {
                Some(i) => part.split_at(i + 3),
                None => ("", part),
            };
            let host_start = rest.find(['/', '?']).unwrap_or(rest.len());
            let Some(at) = rest[..host_start].rfind('@') else {
                return part.to_owned();
            };
            let userinfo = &rest[..at];
            let redacted = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>"),
                None => "<redacted>".to_owned(),
            };
            format!("{scheme}{redacted}{}", &rest[at..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_redacted() {
        assert_eq!(
            redact_url("nats://relay:s3cret@h:4222"),
            "nats://relay:<redacted>@h:4222"
        );
        assert_eq!(
            redact_url("nats://t0ken@h:4222"),
            "nats://<redacted>@h:4222"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            redact_url("nats://a:b@h1:1,nats://h2:2"),
            "nats://a:<redacted>@h1:1,nats://h2:2"
        );
        assert_eq!(redact_url("u:p@h:1"), "u:<redacted>@h:1");
    }

    #[test]
    fn bad_settings_are_refused_early() {
        assert!(
            Settings::new("nats://127.0.0.1:4222".into())
                .check()
                .is_ok()
        );
        assert!(Settings::new(" ".into()).check().is_err());
        let mut s = Settings::new("nats://h:1".into());
        s.publish_timeout = Duration::ZERO;
        assert!(s.check().is_err());
        let mut s = Settings::new("nats://h:1".into());
        s.name = String::new();
        assert!(s.check().is_err());
    }

    #[test]
    fn an_unparsable_url_is_named_redacted() {
        let s = Settings::new("nats://u:pw@h:notaport".into());
        let err = s.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cannot parse") && !err.contains("pw"), "{err}");
    }
}
