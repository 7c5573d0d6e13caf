//! [`RabbitBroker`]: the builder users configure, its [`TransportBroker`]
//! impl and the declare helpers.

use std::fmt;
use std::time::Duration;

use lapin::ExchangeKind;
use outbox_core::transport::{BoxFuture, TransportBroker};
use outbox_core::{BoxError, Hook, IntoHook};

use crate::config::Settings;
use crate::destination::{Declare, declare};
use crate::error::Result;
use crate::transport::RabbitTransport;

/// The RabbitMQ transport's builder: where the broker is and how to publish.
///
/// ```no_run
/// use std::time::Duration;
/// use outbox_core::{App, OutboxBroker};
/// use outbox_rabbitmq::RabbitBroker;
///
/// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
/// let rabbit = RabbitBroker::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .publish_timeout(Duration::from_secs(20));
/// App::new(outbox).on_startup(rabbit.connect()).run().await
/// # }
/// ```
///
/// Destinations (`#[publish_to(rabbit, "…")]`):
///
/// | destination | exchange | routing key |
/// |---|---|---|
/// | `orders` | the default exchange | `orders`: the queue `orders` |
/// | `billing/orders.created` | `billing` | `orders.created` |
/// | `billing/` | `billing` | empty (fanout and headers exchanges) |
/// | `/odd/queue` | the default exchange | `odd/queue` |
///
/// The first `/` separates the exchange (AMQP exchange names have no `/`:
/// `a-z A-Z 0-9 - _ . :`) from the routing key; names and routing keys are
/// at most 255 bytes. `App::run` refuses other destinations at startup.
#[derive(Clone)]
pub struct RabbitBroker {
    settings: Settings,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("RabbitBroker")
            .field("name", &s.name)
            .field("url", &s.redacted_url())
            .field("connection_name", &s.connection_name)
            .field("connect_timeout", &s.connect_timeout)
            .field("publish_timeout", &s.publish_timeout)
            .field("close_timeout", &s.close_timeout)
            .field("max_message_bytes", &s.max_message_bytes)
            .finish()
    }
}

impl RabbitBroker {
    /// A broker at `url` (`amqp://user:password@host:5672/vhost`, vhost `/`
    /// written `%2f`; `amqps://` for TLS), with the defaults: name `rabbit`,
    /// connect timeout 10 s, publish timeout 30 s, close timeout 10 s,
    /// `max_message_bytes` 128 MiB.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            settings: Settings::new(url.into()),
        }
    }

    /// The transport name handlers use in `#[publish_to(name, "…")]`
    /// (default `rabbit`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// The connection name shown in RabbitMQ's management UI (default
    /// `outbox-rabbitmq`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.settings.connection_name = name.into();
        self
    }

    /// How long connecting (at startup, and each reconnect) may take
    /// (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// The one deadline of a publish: reconnecting if needed, sending and
    /// waiting for the broker's confirm (default 30 s). Keep the
    /// subscribers' `lease_ttl` above it.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.settings.publish_timeout = timeout;
        self
    }

    /// How long closing at shutdown may take (default 10 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.settings.close_timeout = timeout;
        self
    }

    /// The largest body the transport sends (default 128 MiB, RabbitMQ
    /// 3.x's default `max_message_size`); a larger one is refused before it
    /// is sent, as a permanent [`BusRejection`](outbox_core::BusRejection).
    /// `None` leaves the check to the broker (whose refusal is a
    /// `BusRejection` too). Match it to your broker's `max_message_size`.
    pub fn max_message_bytes(mut self, limit: Option<usize>) -> Self {
        self.settings.max_message_bytes = limit;
        self
    }

    /// The transport name.
    pub fn get_name(&self) -> &str {
        &self.settings.name
    }

    /// The broker URL, password redacted.
    pub fn url(&self) -> String {
        self.settings.redacted_url()
    }

    /// The publish timeout.
    pub fn get_publish_timeout(&self) -> Duration {
        self.settings.publish_timeout
    }

    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }

    /// The client-side size limit.
    pub fn get_max_message_bytes(&self) -> Option<usize> {
        self.settings.max_message_bytes
    }

    /// The startup hook that connects and registers the transport under its
    /// name (the shared registration step,
    /// [`TransportBroker::connect`]). It fails `App::run` before anything is
    /// consumed when the broker cannot be reached or refuses the login,
    /// naming the URL (password redacted): `on_startup hook `rabbit.connect`
    /// failed: transport `rabbit` could not connect: …`.
    pub fn connect(&self) -> Hook {
        TransportBroker::connect(self).into_hook()
    }

    /// Opens the connection and the confirm channel within the connect
    /// timeout and returns the transport: for tests and for embedding
    /// without an `App`.
    ///
    /// ```no_run
    /// use outbox_core::{Outgoing, Transport};
    /// use outbox_rabbitmq::RabbitBroker;
    ///
    /// # async fn demo() -> Result<(), outbox_core::BoxError> {
    /// let rabbit = RabbitBroker::new("amqp://guest:guest@127.0.0.1:5672/%2f");
    /// rabbit.ensure_queue("orders").await?;
    /// let transport = rabbit.connect_transport().await?;
    /// transport.publish(Outgoing::new("orders", b"42".to_vec())).await?; // confirmed
    /// transport.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_transport(&self) -> Result<RabbitTransport> {
        RabbitTransport::connect(self.settings.clone()).await
    }

    /// Declares a durable queue (nothing happens if it exists with the same
    /// settings; a queue declared with other settings is an error). Plain
    /// destinations (`"orders"`) need their queue: without it `App::run`
    /// fails at startup (the startup check of destinations), and a queue
    /// deleted later makes the publish fail as unroutable (retried).
    ///
    /// ```no_run
    /// use outbox_core::{App, AppContext, BoxError, Hook, OutboxBroker};
    /// use outbox_rabbitmq::RabbitBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let rabbit = RabbitBroker::new("amqp://guest:guest@127.0.0.1:5672/%2f");
    /// let topology = rabbit.clone();
    /// App::new(outbox)
    ///     .on_startup(Hook::new("topology", move |_: AppContext| async move {
    ///         topology.ensure_queue("orders").await?;
    ///         Ok::<_, BoxError>(())
    ///     }))
    ///     .on_startup(rabbit.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub async fn ensure_queue(&self, queue: &str) -> Result<()> {
        declare(&self.settings, Declare::Queue(queue)).await
    }

    /// Declares a durable exchange of `kind` (nothing happens if it exists
    /// with the same settings). `exchange/routing.key` destinations need
    /// their exchange: without it `App::run` fails at startup.
    ///
    /// ```no_run
    /// use outbox_rabbitmq::{ExchangeKind, RabbitBroker};
    ///
    /// # async fn demo() -> outbox_rabbitmq::Result<()> {
    /// let rabbit = RabbitBroker::new("amqp://guest:guest@127.0.0.1:5672/%2f");
    /// rabbit.ensure_exchange("billing", ExchangeKind::Topic).await?;
    /// rabbit.ensure_queue("invoices").await?;
    /// rabbit.ensure_binding("invoices", "billing", "orders.*").await?;
    /// // now `#[publish_to(rabbit, "billing/orders.created")]` reaches `invoices`
    /// # Ok(()) }
    /// ```
    pub async fn ensure_exchange(&self, exchange: &str, kind: ExchangeKind) -> Result<()> {
        declare(&self.settings, Declare::Exchange(exchange, kind)).await
    }

    /// Binds `queue` to `exchange` with `routing_key` (both must exist).
    pub async fn ensure_binding(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        declare(
            &self.settings,
            Declare::Binding {
                queue,
                exchange,
                routing_key,
            },
        )
        .await
    }
}

/// How the application connects and registers the RabbitMQ transport: the
/// provided [`TransportBroker::connect`] (also [`RabbitBroker::connect`]).
impl TransportBroker for RabbitBroker {
    type Transport = RabbitTransport;

    fn server(&self) -> Option<outbox_core::transport::ServerInfo> {
        Some(crate::transport::server_info(&self.settings.url))
    }

    fn transport_name(&self) -> &str {
        &self.settings.name
    }

    /// [`RabbitBroker::connect_transport`], with the error boxed.
    fn connect_transport(
        &self,
    ) -> BoxFuture<'static, std::result::Result<RabbitTransport, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            RabbitBroker::connect_transport(&this)
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
        let r = RabbitBroker::new("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(r.get_name(), "rabbit");
        assert_eq!(r.get_publish_timeout(), Duration::from_secs(30));
        assert_eq!(r.get_connect_timeout(), Duration::from_secs(10));
        assert_eq!(r.get_max_message_bytes(), Some(128 * 1024 * 1024));
    }

    #[test]
    fn the_password_is_redacted_in_debug() {
        let r = RabbitBroker::new("amqp://relay:hunter2@h:5672/%2f");
        let dbg = format!("{r:?} {}", r.url());
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("relay:***@h"), "{dbg}");
    }

    #[tokio::test]
    async fn an_unreachable_broker_fails_to_connect_naming_the_url() {
        let err = RabbitBroker::new("amqp://u:hunter2@127.0.0.1:1/%2f")
            .connect_timeout(Duration::from_secs(2))
            .connect_transport()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("amqp://u:***@127.0.0.1:1/%2f"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
