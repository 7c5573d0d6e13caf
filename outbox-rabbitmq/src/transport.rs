//! [`RabbitTransport`]: the [`Transport`] implementation, with its own
//! reconnection (lapin does not reconnect by itself).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use outbox_core::transport::ServerInfo;
use outbox_core::{BoxError, BusRejection, Outgoing, Transport};
use tokio::time::Instant;

use crate::config::Settings;
use crate::connection::{
    ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED, RESOURCE_LOCKED, amqp_reply, open,
};
use crate::destination::{Address, check_destination, parse};
use crate::error::{Error, LapinError, Result};

/// The AMQP header that carries [`Response::key`](outbox_core::Response::key)
/// (RabbitMQ has no message key; the routing key comes from the
/// destination).
pub const KEY_HEADER: &str = "outbox-key";

/// The runtime's content type header (AMQP `content_type`).
const CONTENT_TYPE: &str = "content-type";
/// The runtime's correlation id header (AMQP `correlation_id`).
const CORRELATION_ID: &str = "correlation_id";

/// `delivery_mode` 2: the broker writes the message to disk (in a durable
/// queue) before it confirms it.
const PERSISTENT: u8 = 2;

/// A connected RabbitMQ transport: publishes each [`Outgoing`] with
/// `mandatory` on a channel in confirm mode, and resolves only on the
/// broker's `basic.ack` for a routed message.
///
/// Get one from [`RabbitBroker::connect`](crate::RabbitBroker::connect) (a
/// startup hook that registers it in the application) or
/// [`RabbitBroker::connect_transport`](crate::RabbitBroker::connect_transport).
/// Cheap to clone: clones share one connection and one confirm channel, on
/// which any number of publishes wait for their confirms at once.
///
/// After a lost connection (broker restart, network failure, a publish that
/// timed out) the next publish opens a new connection and channel; after a
/// channel error (a missing exchange) it opens a new channel.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    /// The link publishes use; replaced after failures.
    current: Mutex<Option<Link>>,
    /// One (re)connect at a time (never held while a confirm is awaited).
    reconnect: tokio::sync::Mutex<()>,
}

/// A connection and its confirm channel.
#[derive(Clone)]
struct Link {
    generation: u64,
    connection: Arc<Connection>,
    channel: Channel,
    /// Set after a publish timed out on this link: the connection may hang
    /// although lapin still reports it open.
    suspect: Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    fn usable(&self) -> bool {
        !self.suspect.load(std::sync::atomic::Ordering::Relaxed)
            && self.connection.status().connected()
            && self.channel.status().connected()
    }
}

impl fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.settings;
        f.debug_struct("RabbitTransport")
            .field("name", &s.name)
            .field("url", &s.redacted_url())
            .field("publish_timeout", &s.publish_timeout)
            .field("max_message_bytes", &s.max_message_bytes)
            .field("generation", &self.inner.current().map(|l| l.generation))
            .finish_non_exhaustive()
    }
}

impl RabbitTransport {
    /// Connects (connection + confirm channel) within the connect timeout.
    pub(crate) async fn connect(settings: Settings) -> Result<Self> {
        settings.check()?;
        let inner = Arc::new(Inner {
            settings,
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(()),
        });
        let deadline = Instant::now() + inner.settings.connect_timeout;
        inner.link(deadline, "").await?;
        tracing::info!(
            transport = %inner.settings.name,
            url = %inner.settings.redacted_url(),
            "connected to RabbitMQ"
        );
        Ok(Self { inner })
    }

    /// The broker URL, password redacted.
    pub fn url(&self) -> String {
        self.inner.settings.redacted_url()
    }

    /// The longest one publish takes (reconnecting, sending and waiting for
    /// the confirm): the publish timeout.
    pub fn max_publish_time(&self) -> Duration {
        self.inner.settings.publish_timeout
    }

    /// Sends one message and waits for its confirm (what
    /// [`Transport::publish`] does, with this crate's error type; a
    /// permanent refusal is not wrapped in a
    /// [`BusRejection`](outbox_core::BusRejection) here).
    pub async fn send(&self, msg: Outgoing) -> Result<()> {
        self.inner.send(msg).await
    }

    /// Closes the connection (waiting at most the close timeout). A later
    /// publish would open a new one.
    pub async fn shutdown(&self) -> Result<()> {
        let link = self
            .inner
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(link) = link else { return Ok(()) };
        let timeout = self.inner.settings.close_timeout;
        let closed = tokio::time::timeout(
            timeout,
            link.connection.close(200, "outbox shutdown".into()),
        )
        .await;
        match closed {
            Ok(Err(e)) if link.connection.status().connected() => Err(Error::Close {
                transport: self.inner.settings.name.clone(),
                source: Box::new(e),
            }),
            _ => Ok(()),
        }
    }
}

impl Inner {
    fn current(&self) -> Option<Link> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current link, or a new one when it is gone: a new channel when
    /// only the channel closed, a new connection otherwise.
    async fn link(&self, deadline: Instant, destination: &str) -> Result<Link> {
        if let Some(l) = self.current().filter(Link::usable) {
            return Ok(l);
        }
        let _one = self.reconnect.lock().await;
        let old = self.current();
        if let Some(l) = old.clone().filter(Link::usable) {
            return Ok(l);
        }
        let generation = old.as_ref().map_or(0, |l| l.generation + 1);
        let reuse = old.as_ref().filter(|l| {
            !l.suspect.load(std::sync::atomic::Ordering::Relaxed)
                && l.connection.status().connected()
        });
        let connection = match reuse {
            Some(l) => l.connection.clone(),
            None => {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = self.settings.connect_timeout.min(left);
                if timeout.is_zero() {
                    return Err(Error::Timeout {
                        destination: destination.to_owned(),
                        timeout: self.settings.publish_timeout,
                    });
                }
                Arc::new(open(&self.settings, timeout).await?)
            }
        };
        let channel = tokio::time::timeout_at(deadline, async {
            let ch = connection.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, LapinError>(ch)
        })
        .await;
        if !matches!(channel, Ok(Ok(_)))
            && let Some(o) = old
                .as_ref()
                .filter(|o| Arc::ptr_eq(&o.connection, &connection))
        {
            // A connection that cannot open a channel is replaced next time.
            o.suspect.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let channel = match channel {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => {
                return Err(Error::Publish {
                    destination: destination.to_owned(),
                    stage: "opening a confirm channel",
                    source: Box::new(e),
                });
            }
            Err(_) => {
                return Err(Error::Timeout {
                    destination: destination.to_owned(),
                    timeout: self.settings.publish_timeout,
                });
            }
        };
        let link = Link {
            generation,
            connection: connection.clone(),
            channel,
            suspect: Arc::default(),
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
        if let Some(old) = old {
            if Arc::ptr_eq(&old.connection, &connection) {
                tracing::warn!(
                    transport = %self.settings.name,
                    "the RabbitMQ channel was closed; opened a new confirm channel"
                );
            } else {
                tracing::warn!(
                    transport = %self.settings.name,
                    url = %self.settings.redacted_url(),
                    "the RabbitMQ connection was lost; reconnected"
                );
                // Close the old connection in the background (it may hang).
                let timeout = self.settings.close_timeout;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        timeout,
                        old.connection
                            .close(320, "replaced by a new connection".into()),
                    )
                    .await;
                });
            }
        }
        Ok(link)
    }

    async fn send(&self, msg: Outgoing) -> Result<()> {
        let Outgoing {
            destination,
            key,
            payload,
            headers,
            ..
        } = msg;
        let address = parse(&destination).map_err(|reason| Error::InvalidDestination {
            destination: destination.clone(),
            reason,
        })?;
        if let Some(limit) = self.settings.max_message_bytes
            && payload.len() > limit
        {
            return Err(Error::MessageTooLarge {
                destination,
                size: payload.len(),
                limit: format!("max_message_bytes = {limit}"),
            });
        }
        let properties = properties(&destination, key, headers)?;
        let timeout = self.settings.publish_timeout;
        let deadline = Instant::now() + timeout;
        let mut used = None;
        let attempt = self.publish_once(
            deadline,
            &destination,
            address,
            &payload,
            properties,
            &mut used,
        );
        let done = tokio::time::timeout_at(deadline, attempt).await;
        match done {
            Ok(r) => r,
            Err(_) => {
                // The broker may hang while lapin still reports the link
                // open: the next publish replaces the link this one used.
                if let Some(suspect) = used {
                    suspect.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(Error::Timeout {
                    destination,
                    timeout,
                })
            }
        }
    }

    async fn publish_once(
        &self,
        deadline: Instant,
        destination: &str,
        address: Address<'_>,
        payload: &[u8],
        properties: BasicProperties,
        used: &mut Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<()> {
        let link = self.link(deadline, destination).await?;
        *used = Some(link.suspect.clone());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // Both names were checked by `parse` (at most 255 bytes).
        let confirm = link
            .channel
            .basic_publish(
                address.exchange.into(),
                address.routing_key.into(),
                options,
                payload,
                properties,
            )
            .await
            .map_err(|e| self.failed(destination, address, payload.len(), "publish", e))?;
        // No lock is held here: other publishes share the channel meanwhile.
        let confirmation = confirm
            .await
            .map_err(|e| self.failed(destination, address, payload.len(), "confirm", e))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(Error::Unroutable {
                    destination: destination.to_owned(),
                    exchange: address.exchange.to_owned(),
                    routing_key: address.routing_key.to_owned(),
                    reply: format!("{} {}", returned.reply_code, returned.reply_text),
                })
            }
            Confirmation::Nack(None) => Err(Error::Nacked {
                destination: destination.to_owned(),
            }),
            // The channel is in confirm mode: this cannot be a success.
            Confirmation::NotRequested => Err(Error::Nacked {
                destination: destination.to_owned(),
            }),
        }
    }

    /// What a lapin error on the way means (the link is replaced by the next
    /// publish when lapin reports it closed).
    fn failed(
        &self,
        destination: &str,
        address: Address<'_>,
        size: usize,
        stage: &'static str,
        e: LapinError,
    ) -> Error {
        let destination = destination.to_owned();
        match amqp_reply(&e) {
            Some((NOT_FOUND, text)) if text.contains("exchange") => {
                // The channel is closed; a concurrent publish may have caused
                // it: name the exchange only when the broker's text does.
                let ours = !address.exchange.is_empty()
                    && text.contains(&format!("'{}'", address.exchange));
                if ours {
                    Error::ExchangeNotFound {
                        destination,
                        exchange: address.exchange.to_owned(),
                        reason: text,
                    }
                } else {
                    Error::Publish {
                        destination,
                        stage,
                        source: Box::new(e),
                    }
                }
            }
            Some((PRECONDITION_FAILED, text)) if text.contains("max size") => {
                Error::MessageTooLarge {
                    destination,
                    size,
                    limit: format!("the broker's max_message_size ({text})"),
                }
            }
            Some((ACCESS_REFUSED, text)) => Error::Refused {
                destination,
                reason: format!("403 ACCESS_REFUSED: {text}"),
                source: Some(Box::new(e)),
            },
            _ => Error::Publish {
                destination,
                stage,
                source: Box::new(e),
            },
        }
    }

    /// [`Transport::verify_destination`]: a passive declare of the
    /// destination's queue (default exchange) or exchange on a throwaway
    /// channel of the current connection (a connection of its own when there
    /// is no usable one), all within the connect timeout. A missing one makes
    /// the broker close that channel (`404`); the confirm channel publishes
    /// use is never involved.
    async fn verify(&self, destination: &str) -> std::result::Result<(), String> {
        let address = parse(destination)?;
        let target = if address.exchange.is_empty() {
            Target::Queue(address.routing_key)
        } else {
            Target::Exchange(address.exchange)
        };
        let timeout = self.settings.connect_timeout;
        let deadline = Instant::now() + timeout;
        let could_not = |cause: String| format!("could not check {target} on RabbitMQ: {cause}");
        let shared = self.current().filter(|l| {
            !l.suspect.load(std::sync::atomic::Ordering::Relaxed)
                && l.connection.status().connected()
        });
        let (connection, shared) = match shared {
            Some(l) => (l.connection.clone(), Some(l)),
            None => {
                let opened = open(&self.settings, timeout)
                    .await
                    .map_err(|e| could_not(outbox_core::render_error_chain(&e)))?;
                (Arc::new(opened), None)
            }
        };
        let checked = tokio::time::timeout_at(deadline, passive_declare(&connection, target)).await;
        match &shared {
            // The connection did not answer: the next publish replaces it.
            Some(l) if checked.is_err() => {
                l.suspect.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Some(_) => {}
            None => {
                let close = self.settings.close_timeout;
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(close, connection.close(200, "checked".into())).await;
                });
            }
        }
        let e = match checked {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(could_not(format!(
                    "no answer from `{}` within {timeout:?} (connect_timeout)",
                    self.settings.redacted_url()
                )));
            }
        };
        match amqp_reply(&e) {
            Some((NOT_FOUND, _)) => Err(target.missing()),
            // An exclusive queue of another connection: it exists, and the
            // default exchange routes to it.
            Some((RESOURCE_LOCKED, _)) if matches!(target, Target::Queue(_)) => Ok(()),
            Some((ACCESS_REFUSED, text)) => Err(format!(
                "RabbitMQ refused to let the user of `{}` check {target} ({text}): grant the \
                 user access to it on the virtual host",
                self.settings.redacted_url()
            )),
            _ => Err(could_not(outbox_core::render_error_chain(&e))),
        }
    }

    /// `e` as [`Transport::publish`] returns it: a permanent refusal wrapped
    /// in a [`BusRejection`] naming this transport.
    fn publish_error(&self, e: Error) -> BoxError {
        if e.is_retryable() {
            Box::new(e)
        } else {
            Box::new(BusRejection::new(self.settings.name.clone(), e))
        }
    }
}

/// What [`Inner::verify`] looks for: the queue of a default-exchange
/// destination, or the exchange of an `exchange/routing.key` one.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Queue(q) => write!(f, "the queue `{q}`"),
            Target::Exchange(x) => write!(f, "the exchange `{x}`"),
        }
    }
}

impl Target<'_> {
    /// Why startup fails when the broker has no such queue or exchange, and
    /// how to declare it.
    fn missing(&self) -> String {
        match self {
            Target::Queue(q) => format!(
                "RabbitMQ has no queue `{q}` (a destination without an exchange goes through \
                 the default exchange to the queue of that name); declare it, e.g. \
                 `rabbit.ensure_queue({q:?})` in an on_startup hook or before App::run"
            ),
            Target::Exchange(x) => format!(
                "RabbitMQ has no exchange `{x}`; declare it, e.g. \
                 `rabbit.ensure_exchange({x:?}, ExchangeKind::Topic)` (the kind your routing \
                 needs) in an on_startup hook or before App::run, and bind queues to it with \
                 `rabbit.ensure_binding(queue, {x:?}, routing_key)` (bindings are not checked \
                 at startup: a message no queue is bound for fails its publish as unroutable)"
            ),
        }
    }
}

/// A passive declare of `target` on a channel of its own, closed afterwards
/// (the broker closes it itself when `target` does not exist).
async fn passive_declare(connection: &Connection, target: Target<'_>) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    let declared = match target {
        Target::Queue(q) => channel
            .queue_declare(
                q.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ()),
        Target::Exchange(x) => {
            channel
                .exchange_declare(
                    x.into(),
                    // Ignored by a passive declare.
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
        }
    };
    if channel.status().connected() {
        let _ = channel.close(200, "checked".into()).await;
    }
    declared
}

/// The AMQP properties of a message: `content-type`, `correlation_id` and
/// `outbox-id` become `content_type`, `correlation_id` and `message_id`
/// (a value longer than 255 bytes stays in the headers table instead), the
/// key becomes the [`KEY_HEADER`] header, every other header a long-string
/// entry of the headers table; persistent, timestamped.
fn properties(
    destination: &str,
    key: Option<Vec<u8>>,
    headers: outbox_core::Headers,
) -> Result<BasicProperties> {
    let mut props = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        props = props.with_timestamp(now.as_secs());
    }
    let mut table = FieldTable::default();
    let put = |table: &mut FieldTable, k: String, v: LongString| {
        let name = ShortString::try_new(k).map_err(|e| Error::InvalidMessage {
            destination: destination.to_owned(),
            reason: format!("a header name is too long for AMQP ({e})"),
        })?;
        table.insert(name, AMQPValue::LongString(v));
        Ok::<_, Error>(())
    };
    for (k, v) in headers {
        let property = match k.as_str() {
            CONTENT_TYPE => Some(0),
            CORRELATION_ID => Some(1),
            outbox_core::OUTBOX_ID => Some(2),
            _ => None,
        };
        match (property, ShortString::try_new(v.clone())) {
            (Some(0), Ok(s)) => props = props.with_content_type(s),
            (Some(1), Ok(s)) => props = props.with_correlation_id(s),
            (Some(_), Ok(s)) => props = props.with_message_id(s),
            _ => put(&mut table, k, v.into())?,
        }
    }
    if let Some(key) = key {
        put(&mut table, KEY_HEADER.to_owned(), key.into())?;
    }
    Ok(props.with_headers(table))
}

/// Where the broker is, for the AsyncAPI document: host, port and vhost of
/// the AMQP URL (never the user or password).
pub(crate) fn server_info(url: &str) -> ServerInfo {
    ServerInfo::from_url("amqp", url).description("RabbitMQ broker (AMQP 0-9-1)")
}

impl Transport for RabbitTransport {
    fn name(&self) -> &str {
        &self.inner.settings.name
    }

    fn server(&self) -> Option<ServerInfo> {
        Some(server_info(&self.inner.settings.url))
    }

    /// Publishes `msg` to the destination's exchange and routing key with
    /// `mandatory` and persistent delivery, and resolves once the broker
    /// confirmed it (`basic.ack`, not returned as unroutable), or with an
    /// [`enum@Error`] (boxed). A permanent refusal (message too large, an
    /// invalid name, access refused: [`Error::is_retryable`] is false) comes
    /// wrapped in a [`BusRejection`] whose source is the [`enum@Error`].
    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let sent = inner.send(msg).await;
            sent.map_err(|e| inner.publish_error(e))
        })
    }

    /// The publish timeout: the one deadline of a publish, reconnecting
    /// included.
    fn max_publish_time(&self) -> Option<Duration> {
        Some(RabbitTransport::max_publish_time(self))
    }

    /// The destination syntax (`queue`, `exchange/routing.key`,
    /// `exchange/`, `/queue/with/slashes`) and AMQP's name rules.
    fn check_destination(&self, destination: &str) -> Result<(), String> {
        check_destination(destination)
    }

    /// Checks on the broker that the destination's queue (`orders`,
    /// `/odd/queue`: the default exchange routes to the queue of that name)
    /// or exchange (`billing/orders.created`) exists: a passive declare on a
    /// throwaway channel of the transport's connection (or a connection of
    /// its own when that one is gone), within the connect timeout. A missing
    /// one fails startup naming it and the `ensure_queue` /
    /// `ensure_exchange` call that declares it; a broker that cannot be
    /// reached or does not answer fails it too (`could not check …`).
    /// Bindings cannot be checked: a message no queue is bound for stays a
    /// publish error ([`Error::Unroutable`], retried, then dead-lettered).
    fn verify_destination(&self, destination: &str) -> BoxFuture<'static, Result<(), String>> {
        let inner = self.inner.clone();
        let destination = destination.to_owned();
        Box::pin(async move { inner.verify(&destination).await })
    }

    /// The publishing connection and its confirm channel are open, or can
    /// be opened again within the connect timeout (a probe after an outage
    /// reconnects, as the next publish would).
    fn health(&self) -> BoxFuture<'static, std::result::Result<(), String>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let deadline = Instant::now() + inner.settings.connect_timeout;
            match inner.link(deadline, "(health check)").await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!(
                    "not connected to `{}`: {}",
                    inner.settings.redacted_url(),
                    outbox_core::render_error_chain(&e)
                )),
            }
        })
    }

    /// Closes the connection (bounded by the close timeout).
    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let this = self.clone();
        Box::pin(async move { this.shutdown().await.map_err(BoxError::from) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(p: &'a BasicProperties, k: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(k)
    }

    #[test]
    fn headers_map_to_amqp_properties() {
        let mut h = outbox_core::Headers::new();
        h.insert("content-type".into(), "application/json".into());
        h.insert("correlation_id".into(), "c-1".into());
        h.insert("outbox-id".into(), "42".into());
        h.insert("x-tenant".into(), "acme".into());
        let p = properties("orders", Some(b"k1".to_vec()), h).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        assert_eq!(
            p.correlation_id().as_ref().map(ShortString::as_str),
            Some("c-1")
        );
        assert_eq!(p.message_id().as_ref().map(ShortString::as_str), Some("42"));
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            header(&p, "x-tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        assert_eq!(
            header(&p, KEY_HEADER),
            Some(&AMQPValue::LongString(b"k1".to_vec().into()))
        );
        assert_eq!(header(&p, "content-type"), None);
    }

    #[test]
    fn long_values_stay_in_the_table_and_long_names_are_refused() {
        let mut h = outbox_core::Headers::new();
        h.insert("correlation_id".into(), "c".repeat(300));
        let p = properties("orders", None, h).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.correlation_id(), &None);
        assert!(header(&p, "correlation_id").is_some());
        let mut h = outbox_core::Headers::new();
        h.insert("h".repeat(300), "v".into());
        let e = properties("orders", None, h).err();
        assert!(matches!(e, Some(Error::InvalidMessage { .. })), "{e:?}");
    }
}
