//! [`RedisTransport`]: the [`Transport`] implementation: one command per
//! message (`XADD`, `RPUSH` or `PUBLISH`), confirmed by its reply, within
//! one deadline; the startup check of a destination key's type (`TYPE`).

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use outbox_core::transport::ServerInfo;
use outbox_core::{BoxError, BusRejection, Outgoing, Transport};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, RedisError};
use tokio::time::Instant;

use crate::config::Settings;
use crate::destination::{Destination, Kind};
use crate::error::{Error, Result};
use crate::faststream::{self, DATA_FIELD};

/// Wait between two attempts of a command whose connection failed (the
/// connection manager reconnects meanwhile).
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// What Redis answered to a confirmed publish.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Confirmed {
    /// `XADD`: the new entry's id (`1700000000000-0`).
    StreamEntry(String),
    /// `RPUSH`: the list's length after the push.
    ListLength(u64),
    /// `PUBLISH`: how many subscribers received the message.
    Receivers(u64),
}

/// A connected Redis transport: publishes each [`Outgoing`] as one
/// FastStream message with one command, and resolves only on the command's
/// successful reply.
///
/// Get one from [`RedisBroker::connect`](crate::RedisBroker::connect) (a
/// startup hook that registers it in the application) or
/// [`RedisBroker::connect_transport`](crate::RedisBroker::connect_transport).
/// Cheap to clone: clones share one multiplexed connection (a
/// [`ConnectionManager`] that reconnects after a failure); publishes run
/// concurrently, pipelined on that connection, and none waits for another.
#[derive(Clone)]
pub struct RedisTransport {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    url: String,
    client: Client,
    config: ConnectionManagerConfig,
    current: RwLock<Current>,
    publish_timeout: Duration,
    stream_maxlen: Option<u64>,
    max_message_bytes: usize,
    allow_no_subscribers: bool,
}

/// The live connection and how many times it was replaced after timeouts.
#[derive(Clone)]
struct Current {
    generation: u64,
    manager: ConnectionManager,
}

impl fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisTransport")
            .field("name", &i.name)
            .field("url", &i.url)
            .field("publish_timeout", &i.publish_timeout)
            .field("stream_maxlen", &i.stream_maxlen)
            .field("max_message_bytes", &i.max_message_bytes)
            .field("allow_no_subscribers", &i.allow_no_subscribers)
            .finish_non_exhaustive()
    }
}

impl RedisTransport {
    pub(crate) fn new(settings: &Settings, client: Client, manager: ConnectionManager) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: settings.name.clone(),
                url: settings.redacted_url(),
                client,
                config: settings.manager_config(),
                current: RwLock::new(Current {
                    generation: 0,
                    manager,
                }),
                publish_timeout: settings.publish_timeout,
                stream_maxlen: settings.stream_maxlen,
                max_message_bytes: settings.max_message_bytes,
                allow_no_subscribers: settings.allow_no_subscribers,
            }),
        }
    }

    /// The server URL, password redacted.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The longest one publish takes (the publish timeout, reconnecting
    /// included): what [`Transport::max_publish_time`] reports.
    pub fn max_publish_time(&self) -> Duration {
        self.inner.publish_timeout
    }

    /// The connection the transport publishes on (a clone shares it): for
    /// reading back in tests, or other commands.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.current().manager
    }

    /// Sends one message and waits for Redis's reply (what
    /// [`Transport::publish`] does, with this crate's error type and the
    /// reply; a permanent refusal is not wrapped in a
    /// [`BusRejection`](outbox_core::BusRejection) here).
    ///
    /// One deadline, the publish timeout, bounds the whole call: a command
    /// whose connection fails is sent again on the reconnected connection
    /// until then, and a command still unanswered then fails with
    /// [`Error::Timeout`] (it may still have been executed: the row is
    /// retried, so the message may arrive twice).
    pub async fn send(&self, msg: Outgoing) -> Result<Confirmed> {
        self.inner.send(msg).await
    }
}

impl Inner {
    async fn send(&self, msg: Outgoing) -> Result<Confirmed> {
        let destination = Destination::parse(&msg.destination)?;
        let frame = faststream::encode_outgoing(&msg).map_err(|e| match e {
            Error::InvalidMessage { reason, .. } => Error::InvalidMessage {
                destination: Some(msg.destination.clone()),
                reason,
            },
            other => other,
        })?;
        if frame.len() > self.max_message_bytes {
            return Err(Error::TooLarge {
                destination: msg.destination,
                size: frame.len(),
                limit: self.max_message_bytes,
            });
        }
        let cmd = self.command(&destination, frame);
        let deadline = Instant::now() + self.publish_timeout;
        let Current {
            generation,
            manager: mut conn,
        } = self.current();
        let mut last: Option<RedisError> = None;
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, query(&cmd, destination.kind(), &mut conn));
            let err = match attempt.await {
                Ok(Ok(reply)) => return self.confirmed(&msg.destination, &destination, reply),
                Ok(Err(e)) => e,
                Err(_elapsed) => return Err(self.timed_out(generation, msg.destination, last)),
            };
            // A connection that failed (refused, dropped, reset, timed
            // out): the manager reconnects; try again within the deadline.
            // A server reply is final.
            let connection_failed = err.kind() == redis::ErrorKind::Io && err.code().is_none();
            if connection_failed {
                let left = deadline.saturating_duration_since(Instant::now());
                if left <= RETRY_BACKOFF {
                    return Err(self.timed_out(generation, msg.destination, Some(err)));
                }
                tracing::debug!(
                    transport = %self.name,
                    destination = %msg.destination,
                    error = %err,
                    "Redis command failed on its connection; retrying on a new one"
                );
                last = Some(err);
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
            return Err(self
                .failed(&msg.destination, &destination, err, deadline)
                .await);
        }
    }

    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A publish not confirmed by its deadline: the connection it used is
    /// replaced (unless another publish already did), so that a connection
    /// that hangs without failing (a half-open TCP connection after a
    /// network partition, a server that stopped answering) is not used
    /// again; commands still pending on it finish or fail on their own.
    fn timed_out(&self, generation: u64, destination: String, last: Option<RedisError>) -> Error {
        self.replace_connection(
            generation,
            &destination,
            "a Redis publish was not confirmed",
        );
        Error::Timeout {
            destination,
            timeout: self.publish_timeout,
            source: last.map(Box::new),
        }
    }

    /// Replaces the connection of `generation` (unless another caller
    /// already did) after `what` did not finish within the publish
    /// timeout.
    fn replace_connection(&self, generation: u64, destination: &str, what: &str) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.generation != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => {
                tracing::warn!(
                    transport = %self.name,
                    destination = %destination,
                    "{what} within {:?}; replacing the connection",
                    self.publish_timeout
                );
                *current = Current {
                    generation: generation + 1,
                    manager,
                };
            }
            Err(e) => tracing::warn!(
                transport = %self.name,
                error = %e,
                "could not replace the Redis connection after a timeout"
            ),
        }
    }

    /// [`Transport::verify_destination`]: `TYPE <key>` for a stream or a
    /// list, within the publish timeout (a failed connection is retried
    /// on the reconnected one until then, as a publish is); a channel
    /// has nothing to check.
    async fn verify(&self, route: &str) -> std::result::Result<(), String> {
        let destination = Destination::parse(route).map_err(|e| match e {
            Error::InvalidDestination { reason, .. } => reason,
            other => other.to_string(),
        })?;
        let kind = destination.kind();
        if kind == Kind::Channel {
            // Pub/Sub channels are not keys: nothing exists before a
            // PUBLISH, and whether anyone listens is a publish-time matter.
            return Ok(());
        }
        let key = destination.name();
        let mut cmd = redis::cmd("TYPE");
        cmd.arg(key);
        let deadline = Instant::now() + self.publish_timeout;
        let Current {
            generation,
            manager: mut conn,
        } = self.current();
        let could_not = |cause: &dyn fmt::Display| {
            format!(
                "could not check the type of Redis key {key:?} on {} within {:?} (is the server \
                 reachable? the check is bounded by publish_timeout): {cause}",
                self.url, self.publish_timeout
            )
        };
        let mut last: Option<RedisError> = None;
        let actual = loop {
            let attempt = tokio::time::timeout_at(deadline, cmd.query_async::<String>(&mut conn));
            let err = match attempt.await {
                Ok(Ok(actual)) => break actual,
                Ok(Err(e)) => e,
                Err(_elapsed) => {
                    self.replace_connection(
                        generation,
                        route,
                        "the startup check of a Redis key did not finish",
                    );
                    return Err(match last {
                        Some(e) => could_not(&e),
                        None => could_not(&"no reply"),
                    });
                }
            };
            if err.code() == Some("NOPERM") {
                // An ACL that allows XADD/RPUSH but not TYPE: the check
                // cannot tell; a key of another type stays a publish-time
                // WRONGTYPE rejection.
                tracing::warn!(
                    transport = %self.name,
                    destination = %route,
                    error = %err,
                    "cannot check the type of a Redis destination key at startup (TYPE denied)"
                );
                return Ok(());
            }
            // A failed connection, or a server still loading its dataset:
            // try again within the deadline. Another reply is final.
            let transient = (err.kind() == redis::ErrorKind::Io && err.code().is_none())
                || err.code() == Some("LOADING");
            let left = deadline.saturating_duration_since(Instant::now());
            if !transient || left <= RETRY_BACKOFF {
                return Err(could_not(&err));
            }
            last = Some(err);
            tokio::time::sleep(RETRY_BACKOFF).await;
        };
        wrong_type(key, kind, &actual).map_or(Ok(()), Err)
    }

    /// The command for `frame`: `XADD key [MAXLEN ~ n] * __data__ frame`,
    /// `RPUSH key frame` or `PUBLISH channel frame`.
    fn command(&self, destination: &Destination, frame: Vec<u8>) -> Cmd {
        let name = destination.name();
        match destination.kind() {
            Kind::Stream => {
                let mut c = redis::cmd("XADD");
                c.arg(name);
                if let Some(n) = self.stream_maxlen {
                    c.arg("MAXLEN").arg("~").arg(n);
                }
                c.arg("*").arg(DATA_FIELD).arg(frame);
                c
            }
            Kind::List => {
                let mut c = redis::cmd("RPUSH");
                c.arg(name).arg(frame);
                c
            }
            Kind::Channel => {
                let mut c = redis::cmd("PUBLISH");
                c.arg(name).arg(frame);
                c
            }
        }
    }

    fn confirmed(
        &self,
        route: &str,
        destination: &Destination,
        reply: Confirmed,
    ) -> Result<Confirmed> {
        if reply == Confirmed::Receivers(0) && !self.allow_no_subscribers {
            return Err(Error::NoSubscriber {
                channel: route.to_owned(),
            });
        }
        tracing::trace!(transport = %self.name, destination = destination.name(), ?reply, "confirmed");
        Ok(reply)
    }

    /// Maps a failed command; for `WRONGTYPE`, asks the key's type (within
    /// what is left of the deadline) to name it.
    async fn failed(
        &self,
        route: &str,
        destination: &Destination,
        err: RedisError,
        deadline: Instant,
    ) -> Error {
        if err.code() != Some("WRONGTYPE") {
            return Error::Command {
                destination: route.to_owned(),
                source: Box::new(err),
            };
        }
        let mut conn = self.current().manager;
        let mut type_cmd = redis::cmd("TYPE");
        type_cmd.arg(destination.name());
        let actual = tokio::time::timeout_at(deadline, type_cmd.query_async::<String>(&mut conn))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_else(|| "value of another type".to_owned());
        Error::WrongType {
            destination: route.to_owned(),
            key: destination.name().to_owned(),
            expected: destination.kind().redis_type(),
            actual,
            source: Box::new(err),
        }
    }

    /// `e` as [`Transport::publish`] returns it: a permanent refusal (see
    /// [`Error::is_retryable`]) wrapped in a [`BusRejection`] naming this
    /// transport, with `e` as its source; a transient failure as it is.
    fn publish_error(&self, e: Error) -> BoxError {
        if e.is_retryable() {
            Box::new(e)
        } else {
            Box::new(BusRejection::new(self.name.clone(), e))
        }
    }
}

/// Why a key of type `actual` (as `TYPE` names it) cannot take `kind`'s
/// command, with the fix; `None` when it can (`none`: the first `XADD` or
/// `RPUSH` creates the key).
fn wrong_type(key: &str, kind: Kind, actual: &str) -> Option<String> {
    let expected = kind.redis_type();
    if actual == "none" || actual == expected {
        return None;
    }
    let command = match kind {
        Kind::List => "RPUSH",
        _ => "XADD",
    };
    let other_kind = [Kind::Stream, Kind::List]
        .into_iter()
        .find(|k| k.redis_type() == actual)
        .map(|k| {
            format!(
                ", or name the right kind in the route (`{}{key}`)",
                k.prefix()
            )
        })
        .unwrap_or_default();
    Some(format!(
        "Redis key {key:?} holds a {actual}, not a {expected} ({command} would fail with \
         WRONGTYPE): delete or rename the key (DEL / RENAME){other_kind}, or publish to \
         another key"
    ))
}

/// Runs `cmd` and reads its reply as the kind's confirmation.
async fn query(
    cmd: &Cmd,
    kind: Kind,
    conn: &mut ConnectionManager,
) -> redis::RedisResult<Confirmed> {
    Ok(match kind {
        Kind::Stream => Confirmed::StreamEntry(cmd.query_async::<String>(conn).await?),
        Kind::List => Confirmed::ListLength(cmd.query_async::<u64>(conn).await?),
        Kind::Channel => Confirmed::Receivers(cmd.query_async::<u64>(conn).await?),
    })
}

/// Where the server is, for the AsyncAPI document: host, port and
/// database of the URL (never the password).
pub(crate) fn server_info(url: &str) -> ServerInfo {
    ServerInfo::from_url("redis", url).description("Redis server")
}

impl Transport for RedisTransport {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn server(&self) -> Option<ServerInfo> {
        Some(server_info(&self.inner.url))
    }

    /// `PING` on the publishing connection, within the publish timeout
    /// (the connection manager reconnects after a failure, as for a
    /// publish).
    fn health(&self) -> BoxFuture<'static, std::result::Result<(), String>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut conn = inner.current().manager;
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut conn);
            match tokio::time::timeout(inner.publish_timeout, ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!(
                    "`PING` to {} failed: {e}",
                    server_info(&inner.url).host
                )),
                Err(_) => Err(format!(
                    "no answer to `PING` from {} within {:?} (publish_timeout)",
                    server_info(&inner.url).host,
                    inner.publish_timeout
                )),
            }
        })
    }

    /// Resolves `Ok` once Redis replied to the command: the `XADD` entry
    /// id, the `RPUSH` length, or a `PUBLISH` count of at least one
    /// subscriber (or any count with `allow_no_subscribers`). A permanent
    /// refusal ([`Error::is_retryable`] false: `WRONGTYPE`, too large,
    /// `NOPERM`…) comes wrapped in a [`BusRejection`] whose source is the
    /// [`enum@Error`], so that the row is dead-lettered at once under the
    /// default retry strategy.
    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.send(msg).await {
                Ok(_) => Ok(()),
                Err(e) => Err(inner.publish_error(e)),
            }
        })
    }

    /// The publish timeout: the one deadline of a publish, reconnects
    /// included.
    fn max_publish_time(&self) -> Option<Duration> {
        Some(self.inner.publish_timeout)
    }

    /// [`check_destination`](crate::check_destination): `stream:<key>` (or
    /// a bare key), `list:<key>`, `channel:<name>`, not empty.
    fn check_destination(&self, destination: &str) -> Result<(), String> {
        crate::destination::check_destination(destination)
    }

    /// For a stream or a list, `TYPE <key>`: a missing key is fine (the
    /// first `XADD` or `RPUSH` creates it), a key of the expected type too;
    /// a key holding another type is refused, naming the key, both types
    /// and the fix (delete or rename the key, or name the right kind). A
    /// channel has nothing to check. The check is bounded by the publish
    /// timeout; a server that does not answer by then is refused with
    /// `could not check …: <cause>`. An ACL denying `TYPE` (`NOPERM`)
    /// skips the check, with a warning. A key whose type changes later is
    /// still refused at publish ([`Error::WrongType`]).
    fn verify_destination(&self, destination: &str) -> BoxFuture<'static, Result<(), String>> {
        let inner = self.inner.clone();
        let destination = destination.to_owned();
        Box::pin(async move { inner.verify(&destination).await })
    }

    /// Nothing to flush: every publish waited for its reply. The connection
    /// closes when the last clone is dropped.
    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport as `RedisBroker::connect_transport` makes it, without
    /// the startup check: nothing listens at the address.
    fn transport(configure: impl FnOnce(&mut Settings)) -> RedisTransport {
        let mut settings = Settings::new("redis://relay:hunter2@127.0.0.1:1".into());
        configure(&mut settings);
        let client = settings.client().expect("valid settings");
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), settings.manager_config())
                .expect("a lazy manager needs no connection");
        RedisTransport::new(&settings, client, manager)
    }

    fn rejection(e: &BoxError) -> Option<&Error> {
        let r = BusRejection::find(&**e)?;
        assert_eq!(r.bus(), "redis");
        std::error::Error::source(r)?.downcast_ref::<Error>()
    }

    #[tokio::test]
    async fn refusals_known_before_sending_are_rejections() {
        let t = transport(|s| s.max_message_bytes = 64);
        assert_eq!(
            Transport::max_publish_time(&t),
            Some(Duration::from_secs(10))
        );
        assert!(Transport::check_destination(&t, "list:").is_err());
        assert!(Transport::check_destination(&t, "orders:eu").is_ok());

        let err = Transport::publish(&t, Outgoing::new("orders", vec![b'x'; 100]))
            .await
            .expect_err("too large");
        assert!(
            matches!(rejection(&err), Some(Error::TooLarge { limit: 64, .. })),
            "{err}"
        );

        let mut bad_key = Outgoing::new("orders", b"x".to_vec());
        bad_key.key = Some(vec![0xff, 0xfe]);
        let err = Transport::publish(&t, bad_key).await.expect_err("bad key");
        assert!(
            matches!(rejection(&err), Some(Error::InvalidMessage { .. })),
            "{err}"
        );

        let err = Transport::publish(&t, Outgoing::new("channel:", b"x".to_vec()))
            .await
            .expect_err("no channel name");
        assert!(
            matches!(rejection(&err), Some(Error::InvalidDestination { .. })),
            "{err}"
        );
    }

    /// Nothing listens: the publish retries its connection until the one
    /// deadline, then fails with a retryable `Timeout` (no rejection) that
    /// does not leak the password.
    #[tokio::test]
    async fn an_unreachable_server_is_a_timeout_by_the_deadline() {
        let t = transport(|s| s.publish_timeout = Duration::from_millis(800));
        let err = t
            .send(Outgoing::new("orders", b"x".to_vec()))
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.is_retryable());
        assert!(!format!("{err} {err:?} {t:?}").contains("hunter2"));
        let boxed = Transport::publish(&t, Outgoing::new("orders", b"x".to_vec()))
            .await
            .expect_err("nothing listens");
        assert!(BusRejection::find(&*boxed).is_none(), "{boxed}");
    }

    /// The startup check: a channel needs no server; a stream or a list
    /// key on a server that does not answer is refused by the publish
    /// timeout, saying it could not check and why, password redacted.
    #[tokio::test]
    async fn verify_destination_is_bounded_and_says_why_it_could_not_check() {
        let t = transport(|s| s.publish_timeout = Duration::from_millis(800));
        Transport::verify_destination(&t, "channel:events")
            .await
            .expect("a channel has nothing to check");
        for dest in ["orders", "list:jobs"] {
            let started = std::time::Instant::now();
            let err = Transport::verify_destination(&t, dest)
                .await
                .expect_err("nothing listens");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
            assert!(err.starts_with("could not check"), "{err}");
            assert!(err.contains("redis://relay:***@127.0.0.1:1"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn wrong_types_name_the_key_both_types_and_the_fix() {
        assert_eq!(wrong_type("k", Kind::Stream, "none"), None);
        assert_eq!(wrong_type("k", Kind::Stream, "stream"), None);
        assert_eq!(wrong_type("k", Kind::List, "list"), None);
        let err = wrong_type("k", Kind::Stream, "list").expect("a list is not a stream");
        assert!(
            err.contains(r#"key "k" holds a list, not a stream"#),
            "{err}"
        );
        assert!(err.contains("delete or rename the key"), "{err}");
        assert!(err.contains("`list:k`"), "{err}");
        let err = wrong_type("k", Kind::List, "string").expect("a string is not a list");
        assert!(err.contains("holds a string, not a list"), "{err}");
        assert!(err.contains("RPUSH would fail with WRONGTYPE"), "{err}");
        assert!(!err.contains("`stream:"), "{err}");
    }
}
