//! [`RedisBroker`]: the transport's typed builder and its connect step (the
//! startup hook that checks the server and registers the transport).

use std::fmt;
use std::time::Duration;

use outbox_core::transport::{BoxFuture, TransportBroker};
use outbox_core::{BoxError, Hook, IntoHook};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisError};

use crate::config::Settings;
use crate::error::{Error, Result, is_auth_failure};
use crate::transport::RedisTransport;

/// The configuration of a Redis transport; [`connect`](Self::connect) turns
/// it into a startup hook that registers the transport.
///
/// | setter | default | what |
/// |---|---|---|
/// | [`new`](Self::new) | (required) | `redis://[[user]:password@]host[:port][/db]` |
/// | [`name`](Self::name) | `redis` | the name in `publish_to(name, "destination")` |
/// | [`connect_timeout`](Self::connect_timeout) | 10 s | startup check and each (re)connect attempt |
/// | [`publish_timeout`](Self::publish_timeout) | 10 s | the one deadline of a publish ([`max_publish_time`](outbox_core::Transport::max_publish_time)) |
/// | [`stream_maxlen`](Self::stream_maxlen) | none | `XADD … MAXLEN ~ n`: trim streams to about `n` entries |
/// | [`max_message_bytes`](Self::max_message_bytes) | 512 MiB | larger encoded messages are refused (permanent) |
/// | [`allow_no_subscribers`](Self::allow_no_subscribers) | `false` | whether a `PUBLISH` that reached nobody is confirmed |
///
/// The password in the URL is redacted (`redis://user:***@host`) in the
/// `Debug` output and in every error.
///
/// ```
/// use std::time::Duration;
/// use outbox_redis::RedisBroker;
///
/// let redis = RedisBroker::new("redis://relay:s3cret@cache:6379/0")
///     .publish_timeout(Duration::from_secs(5))
///     .stream_maxlen(1_000_000)
///     .max_message_bytes(1024 * 1024);
/// assert!(!format!("{redis:?}").contains("s3cret"));
/// assert_eq!(redis.get_name(), "redis");
/// ```
#[derive(Clone)]
pub struct RedisBroker {
    settings: Settings,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("RedisBroker")
            .field("name", &s.name)
            .field("url", &s.redacted_url())
            .field("connect_timeout", &s.connect_timeout)
            .field("publish_timeout", &s.publish_timeout)
            .field("stream_maxlen", &s.stream_maxlen)
            .field("max_message_bytes", &s.max_message_bytes)
            .field("allow_no_subscribers", &s.allow_no_subscribers)
            .finish()
    }
}

impl RedisBroker {
    /// A transport named `redis` for the server at `url`
    /// (`redis://[[user]:password@]host[:port][/db]`), with the defaults
    /// listed above.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            settings: Settings::new(url.into()),
        }
    }

    /// The name routes use in `publish_to(name, "destination")` (default
    /// `redis`); give each transport of an application its own.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// How long [`connect`](Self::connect) waits for the server (connect,
    /// authenticate, `PING`) before startup fails, and how long each
    /// reconnect attempt may take (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// The one deadline of a publish (default 10 s): reconnecting, sending
    /// and the reply. A publish not confirmed by then fails (the row is
    /// retried). Keep the subscribers' `lease_ttl` above it.
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.settings.publish_timeout = d;
        self
    }

    /// Trims every stream this transport writes to about `n` entries
    /// (`XADD key MAXLEN ~ n * …`, as FastStream's `StreamSub(maxlen=n)`
    /// publisher does; `~` lets Redis trim whole nodes, so a stream may
    /// hold somewhat more). Default: no trimming. Trimmed entries are gone
    /// even if no consumer read them: size `n` to the longest consumer lag
    /// you want to survive.
    pub fn stream_maxlen(mut self, n: u64) -> Self {
        self.settings.stream_maxlen = Some(n);
        self
    }

    /// The largest encoded message (FastStream frame: headers and body) a
    /// publish sends (default 512 MiB, Redis's default
    /// `proto-max-bulk-len`). A larger one fails with [`Error::TooLarge`],
    /// a permanent refusal (the row is dead-lettered as `rejected`). Set it
    /// to what your consumers and your server's memory can take: Redis
    /// keeps every value in memory, and a multi-megabyte value stalls the
    /// server and every client while it is copied.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.settings.max_message_bytes = n;
        self
    }

    /// Whether a `PUBLISH` to a channel nobody subscribes to is confirmed
    /// (default `false`: it fails with [`Error::NoSubscriber`] and the row
    /// is retried until a subscriber listens, then dead-lettered by the
    /// retry strategy). Turn it on for notifications that may be missed.
    pub fn allow_no_subscribers(mut self, allow: bool) -> Self {
        self.settings.allow_no_subscribers = allow;
        self
    }

    /// The transport name.
    pub fn get_name(&self) -> &str {
        &self.settings.name
    }

    /// The server URL, password redacted.
    pub fn url(&self) -> String {
        self.settings.redacted_url()
    }

    /// The publish timeout (the transport's `max_publish_time`).
    pub fn get_publish_timeout(&self) -> Duration {
        self.settings.publish_timeout
    }

    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }

    /// A startup hook that connects (see
    /// [`connect_transport`](Self::connect_transport)) and registers the
    /// transport in the application.
    ///
    /// ```no_run
    /// use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
    /// use outbox_redis::RedisBroker;
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let redis = RedisBroker::new("redis://127.0.0.1:6379");
    /// let relay = Route::builder(["orders"])
    ///     .publish_to("redis", "stream:orders")
    ///     .handler(|msg: Message, _| async move {
    ///         Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
    ///     });
    /// App::new(outbox)
    ///     .subscriber(relay)
    ///     .on_startup(redis.connect())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    ///
    /// This is [`TransportBroker::connect`], the registration step every
    /// transport shares (here so that it needs no import): the hook is
    /// named `redis.connect` (after [`name`](Self::name)), and a failure
    /// aborts `App::run` with `on_startup hook `redis.connect` failed:
    /// transport `redis` could not connect: cannot reach Redis at <url> …`.
    pub fn connect(&self) -> Hook {
        TransportBroker::connect(self).into_hook()
    }

    /// Connects, checks that the server answers `PING` within
    /// [`connect_timeout`](Self::connect_timeout) with the URL's
    /// credentials, and returns the transport: for tests and for embedding
    /// without an `App`.
    ///
    /// Fails with [`Error::Unreachable`] (no answer, refused connection),
    /// [`Error::Auth`] (`WRONGPASS`, `NOAUTH`) or [`Error::InvalidConfig`],
    /// each naming the URL with its password redacted.
    ///
    /// ```no_run
    /// use outbox_core::Outgoing;
    /// use outbox_redis::{Confirmed, RedisBroker};
    ///
    /// # async fn demo() -> Result<(), outbox_core::BoxError> {
    /// let redis = RedisBroker::new("redis://127.0.0.1:6379").connect_transport().await?;
    /// let reply = redis.send(Outgoing::new("stream:orders", b"42".to_vec())).await?;
    /// assert!(matches!(reply, Confirmed::StreamEntry(_)));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_transport(&self) -> Result<RedisTransport> {
        let s = &self.settings;
        let client = s.client()?;
        let timeout = s.connect_timeout;
        // One attempt, so that refused credentials fail at once (the
        // connection manager would retry them).
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let check = async {
            let mut conn: MultiplexedConnection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return Err(self.connect_error(Some(e))),
            Err(_) => return Err(self.connect_error(None)),
        }
        let manager = tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(client.clone(), s.manager_config()),
        )
        .await
        .map_err(|_| self.connect_error(None))?
        .map_err(|e| self.connect_error(Some(e)))?;
        tracing::info!(transport = %s.name, url = %s.redacted_url(), "connected to Redis");
        Ok(RedisTransport::new(s, client, manager))
    }

    fn connect_error(&self, e: Option<RedisError>) -> Error {
        let s = &self.settings;
        match e {
            Some(e) if is_auth_failure(&e) => Error::Auth {
                transport: s.name.clone(),
                url: s.redacted_url(),
                source: Box::new(e),
            },
            e => Error::Unreachable {
                transport: s.name.clone(),
                url: s.redacted_url(),
                timeout: s.connect_timeout,
                source: e.map(Box::new),
            },
        }
    }
}

/// How the application connects and registers the Redis transport: the
/// provided [`TransportBroker::connect`] (also [`RedisBroker::connect`]).
impl TransportBroker for RedisBroker {
    type Transport = RedisTransport;

    fn server(&self) -> Option<outbox_core::transport::ServerInfo> {
        Some(crate::transport::server_info(&self.settings.url))
    }

    fn transport_name(&self) -> &str {
        &self.settings.name
    }

    /// [`RedisBroker::connect_transport`], with the error boxed.
    fn connect_transport(
        &self,
    ) -> BoxFuture<'static, std::result::Result<RedisTransport, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            RedisBroker::connect_transport(&this)
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
        let r = RedisBroker::new("redis://127.0.0.1:6379");
        assert_eq!(r.get_name(), "redis");
        assert_eq!(r.get_publish_timeout(), Duration::from_secs(10));
        assert_eq!(r.get_connect_timeout(), Duration::from_secs(10));
        assert!(
            r.get_publish_timeout() < outbox_core::SubscriberOptions::default().get_lease_ttl()
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_naming_the_redacted_url() {
        let r = RedisBroker::new("redis://relay:hunter2@127.0.0.1:1")
            .connect_timeout(Duration::from_secs(2));
        let err = r
            .connect_transport()
            .await
            .expect_err("nothing listens on port 1");
        let text = format!("{err} {err:?}");
        assert!(matches!(err, Error::Unreachable { .. }), "{text}");
        assert!(text.contains("redis://relay:***@127.0.0.1:1"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(err.is_retryable());
    }
}
