//! [`NatsBroker`]: the builder users configure, its [`TransportBroker`]
//! impl (connects and registers the transport), and
//! [`ensure_stream`](NatsBroker::ensure_stream).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::ConnectErrorKind;
use outbox_core::transport::{BoxFuture, TransportBroker};
use outbox_core::{BoxError, Hook, IntoHook};

use crate::config::{Auth, Delivery, Settings};
use crate::error::{Error, Result};
use crate::subject;
use crate::transport::{NatsTransport, Options};

/// The NATS transport's builder: where the server is and how to publish.
///
/// | setting | default |
/// |---|---|
/// | [`name`](Self::name) | `nats` (as in `#[publish_to(nats, "subject")]`) |
/// | [`delivery`](Self::delivery) / [`core_publish`](Self::core_publish) | [`Delivery::JetStream`]: wait for the stream's PubAck |
/// | [`publish_timeout`](Self::publish_timeout) | 30 s: the one deadline of a publish |
/// | [`connect_timeout`](Self::connect_timeout) | 10 s |
/// | [`flush_timeout`](Self::flush_timeout) | 10 s (closing) |
/// | [`msg_id_prefix`](Self::msg_id_prefix) | none: `Nats-Msg-Id` = `<source>:<outbox-id>` (the outbox's [source identity](outbox_core::Outgoing::source)) |
/// | [`client_name`](Self::client_name) | `outbox-nats` |
/// | credentials | none, or in the URL (`nats://user:password@host`, `nats://token@host`); [`token`](Self::token), [`user_password`](Self::user_password), [`credentials_file`](Self::credentials_file) |
///
/// Passwords and tokens are redacted in the `Debug` output and in errors.
///
/// ```
/// use std::time::Duration;
/// use outbox_nats::NatsBroker;
///
/// let nats = NatsBroker::new("nats://relay:s3cret@127.0.0.1:4222")
///     .publish_timeout(Duration::from_secs(20))
///     .msg_id_prefix("billing:");
/// assert!(!format!("{nats:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct NatsBroker {
    settings: Settings,
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("settings", &self.settings)
            .finish()
    }
}

impl NatsBroker {
    /// A transport named `nats` for the server at `url`
    /// (`nats://host:port`; several servers separated by commas;
    /// `nats://user:password@host:port` or `nats://token@host:port` for
    /// credentials), with the defaults listed above.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            settings: Settings::new(url.into()),
        }
    }

    /// The name routes use in `publish_to(name, "subject")` (default `nats`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// The client name the server shows for the connection (default
    /// `outbox-nats`).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.settings.client_name = name.into();
        self
    }

    /// How publishes are confirmed (default [`Delivery::JetStream`]).
    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.settings.delivery = delivery;
        self
    }

    /// Opts in to core NATS publishing ([`Delivery::Core`]): no
    /// acknowledgement, a publish resolves once flushed to the socket.
    /// **At most once**: a message the server drops (no subscriber online,
    /// a slow consumer, a server crash) is lost, and the row is already
    /// deleted.
    pub fn core_publish(self) -> Self {
        self.delivery(Delivery::Core)
    }

    /// The one deadline of a publish (default 30 s): queueing while the
    /// client reconnects, sending, and waiting for the PubAck (or the
    /// flush). Past it the publish fails and the row is retried. Keep the
    /// subscribers' `lease_ttl` above it.
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.settings.publish_timeout = d;
        self
    }

    /// How long [`connect`](Self::connect) waits for the server (default
    /// 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// How long closing the transport waits for the flush (default 10 s).
    pub fn flush_timeout(mut self, d: Duration) -> Self {
        self.settings.flush_timeout = d;
        self
    }

    /// An explicit prefix for `Nats-Msg-Id`, which then is `prefix` +
    /// `outbox-id` and **replaces** the default `<source>:<outbox-id>`.
    ///
    /// By default (no prefix) the id combines the outbox's source identity
    /// ([`Outgoing::source`](outbox_core::Outgoing::source): the cluster,
    /// database and table, or [`OutboxBroker::source_id`](outbox_core::OutboxBroker::source_id))
    /// with the outbox id, so the outbox tables that publish into one stream
    /// never deduplicate each other's rows; that needs no setting. With a
    /// prefix, **you** keep it unique per outbox table: JetStream
    /// deduplicates per stream, and two tables under one prefix lose the
    /// row of one whose id the other published within the duplicate window.
    /// Use it to keep the ids of an existing deployment (`"billing:"`), or
    /// prefer [`OutboxBroker::source_id`](outbox_core::OutboxBroker::source_id)
    /// for readable ids.
    ///
    /// `msg_id_prefix("")` sends the bare `outbox-id` (the ids before the
    /// source existed): only safe when a single outbox table publishes into
    /// the stream. Messages without a source (not built by an `App`) always
    /// get `prefix` + `outbox-id`, i.e. the bare id without a prefix.
    pub fn msg_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.msg_id_prefix = Some(prefix.into());
        self
    }

    /// Authenticates with a token (like `nats://token@host`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with a user and a password (like
    /// `nats://user:password@host`).
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.settings.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Authenticates with a `.creds` file (JWT and nkey seed, as `nsc`
    /// writes it); read at connect time.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// The transport name.
    pub fn get_name(&self) -> &str {
        &self.settings.name
    }

    /// The server URL(s), passwords and tokens redacted.
    pub fn url(&self) -> String {
        self.settings.redacted_url()
    }

    /// The delivery mode.
    pub fn get_delivery(&self) -> Delivery {
        self.settings.delivery
    }

    /// The publish deadline.
    pub fn get_publish_timeout(&self) -> Duration {
        self.settings.publish_timeout
    }

    /// The connect budget.
    pub fn get_connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }

    /// A startup hook that connects (see
    /// [`connect_transport`](Self::connect_transport)) and registers the
    /// transport in the application.
    ///
    /// ```no_run
    /// use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
    /// use outbox_nats::NatsBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let nats = NatsBroker::new("nats://127.0.0.1:4222");
    /// let relay = Route::builder(["orders"])
    ///     .publish_to("nats", "orders.created")
    ///     .handler(|msg: Message, _| async move {
    ///         Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
    ///     });
    /// App::new(outbox)
    ///     .subscriber(relay)
    ///     .on_startup(nats.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    ///
    /// This is [`TransportBroker::connect`], the registration step every
    /// transport shares: the hook is named `nats.connect` (after
    /// [`name`](Self::name)), and a failure aborts `App::run` with
    /// `on_startup hook `nats.connect` failed: transport `nats` could not
    /// connect: …` naming the URL.
    pub fn connect(&self) -> Hook {
        TransportBroker::connect(self).into_hook()
    }

    /// Connects within [`connect_timeout`](Self::connect_timeout), checks
    /// (in JetStream mode) that JetStream answers, and returns the
    /// transport: for tests and for embedding without an `App`.
    ///
    /// ```no_run
    /// use outbox_core::{Outgoing, Transport};
    /// use outbox_nats::NatsBroker;
    ///
    /// # async fn demo() -> Result<(), outbox_core::BoxError> {
    /// let nats = NatsBroker::new("nats://127.0.0.1:4222").connect_transport().await?;
    /// nats.publish(Outgoing::new("orders.created", b"42".to_vec())).await?; // acknowledged
    /// nats.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_transport(&self) -> Result<NatsTransport> {
        let s = &self.settings;
        let client = connect_client(s).await?;
        if s.delivery == Delivery::JetStream {
            // The account info request: "no responders" from a server
            // without JetStream, an API error for an account without it.
            // (async-nats' query_account does not parse 2.9's answer.)
            let answer = tokio::time::timeout(
                s.connect_timeout,
                client.request("$JS.API.INFO", Default::default()),
            )
            .await;
            let failed: Option<crate::error::Source> = match answer {
                Ok(Ok(reply)) => {
                    let body = String::from_utf8_lossy(&reply.payload);
                    body.contains("\"error\"").then(|| body.into_owned().into())
                }
                Ok(Err(e)) => Some(Box::new(e)),
                Err(e) => Some(Box::new(e)),
            };
            if let Some(source) = failed {
                return Err(Error::NoJetStream {
                    transport: s.name.clone(),
                    url: s.redacted_url(),
                    source,
                });
            }
        }
        let info = client.server_info();
        tracing::info!(
            transport = %s.name,
            url = %s.redacted_url(),
            server = %info.server_name,
            version = %info.version,
            max_payload = info.max_payload,
            delivery = ?s.delivery,
            "connected to NATS"
        );
        Ok(NatsTransport::new(
            client,
            Options {
                name: s.name.clone(),
                url: s.redacted_url(),
                delivery: s.delivery,
                publish_timeout: s.publish_timeout,
                flush_timeout: s.flush_timeout,
                msg_id_prefix: s.msg_id_prefix.clone(),
            },
        ))
    }

    /// Creates the JetStream stream `name` capturing `subjects` (wildcards
    /// allowed: `orders.>`) unless a stream of that name exists. Returns
    /// `true` when this call created it, `false` when it was there (its
    /// configuration is then left as it is).
    ///
    /// The stream gets the server's defaults: file storage, limits
    /// retention, one replica, and a **2-minute duplicate window** (a second
    /// message with the same `Nats-Msg-Id` within 2 minutes is dropped). It
    /// connects with this builder's URL and credentials and waits at most
    /// [`connect_timeout`](Self::connect_timeout). For other settings
    /// (replicas, limits, a longer window) create the stream yourself (the
    /// `nats` CLI, or [`async_nats::jetstream`]).
    ///
    /// ```no_run
    /// use outbox_core::{App, AppContext, BoxError, Hook, OutboxBroker};
    /// use outbox_nats::NatsBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let nats = NatsBroker::new("nats://127.0.0.1:4222");
    /// let streams = nats.clone();
    /// App::new(outbox)
    ///     .on_startup(Hook::new("streams", move |_: AppContext| async move {
    ///         streams.ensure_stream("ORDERS", ["orders.>"]).await?;
    ///         Ok::<_, BoxError>(())
    ///     }))
    ///     .on_startup(nats.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub async fn ensure_stream<I, S>(&self, name: &str, subjects: I) -> Result<bool>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let subjects = subjects.into_iter().map(Into::into).collect();
        subject::ensure_stream(&self.settings, name, subjects).await
    }
}

/// Connects a client with `s`, bounded by the connect timeout.
async fn connect_client(s: &Settings) -> Result<async_nats::Client> {
    s.check()?;
    let addrs = s.server_addrs()?;
    let opts = s.connect_options().await?;
    let unreachable = |source: crate::error::Source| Error::Unreachable {
        transport: s.name.clone(),
        url: s.redacted_url(),
        timeout: s.connect_timeout,
        source,
    };
    match tokio::time::timeout(s.connect_timeout, opts.connect(addrs)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Err(Error::Refused {
                    transport: s.name.clone(),
                    url: s.redacted_url(),
                    source: Box::new(e),
                })
            }
            _ => Err(unreachable(Box::new(e))),
        },
        Err(elapsed) => Err(unreachable(Box::new(elapsed))),
    }
}

/// How the application connects and registers the NATS transport: the
/// provided [`TransportBroker::connect`] (also [`NatsBroker::connect`]).
impl TransportBroker for NatsBroker {
    type Transport = NatsTransport;

    fn server(&self) -> Option<outbox_core::transport::ServerInfo> {
        Some(crate::transport::server_info(&self.settings.url))
    }

    fn transport_name(&self) -> &str {
        &self.settings.name
    }

    /// [`NatsBroker::connect_transport`], with the error boxed.
    fn connect_transport(
        &self,
    ) -> BoxFuture<'static, std::result::Result<NatsTransport, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            NatsBroker::connect_transport(&this)
                .await
                .map_err(BoxError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_suit_an_outbox() {
        let n = NatsBroker::new("nats://127.0.0.1:4222");
        assert_eq!(n.get_name(), "nats");
        assert_eq!(n.get_delivery(), Delivery::JetStream);
        assert_eq!(n.get_publish_timeout(), Duration::from_secs(30));
        assert_eq!(n.get_connect_timeout(), Duration::from_secs(10));
        assert_eq!(n.clone().core_publish().get_delivery(), Delivery::Core);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let dbg = format!(
            "{:?} {:?} {:?}",
            NatsBroker::new("nats://relay:hunter2@h:4222"),
            NatsBroker::new("nats://h:1").token("hunter3"),
            NatsBroker::new("nats://h:1").user_password("relay", "hunter4"),
        );
        for s in ["hunter2", "hunter3", "hunter4"] {
            assert!(!dbg.contains(s), "{s} leaked in {dbg}");
        }
        assert!(dbg.contains("relay") && dbg.contains("<redacted>"), "{dbg}");
    }

    #[tokio::test]
    async fn nothing_listening_fails_within_the_connect_timeout_naming_the_url() {
        let err = NatsBroker::new("nats://u:pw@127.0.0.1:1")
            .connect_timeout(Duration::from_secs(2))
            .connect_transport()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("127.0.0.1:1") && err.contains("cannot reach") && !err.contains("pw"),
            "{err}"
        );
    }
}
