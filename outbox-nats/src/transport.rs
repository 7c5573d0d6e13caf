//! [`NatsTransport`]: the [`Transport`] implementation.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures_util::future::BoxFuture;
use outbox_core::transport::ServerInfo;
use outbox_core::{BoxError, BusRejection, OUTBOX_ID, Outgoing, Transport};
use tokio::time::Instant;

use crate::config::Delivery;
use crate::error::{Error, Result};
use crate::subject::{check_subject, suggested_stream};

/// The header that carries [`Response::key`](outbox_core::Response::key)
/// (NATS messages have no key).
pub const KEY_HEADER: &str = "outbox-key";
/// The header FastStream reads as the message id (`msg.message_id`): set to
/// the `outbox-id` unless the message already has one.
pub const MESSAGE_ID_HEADER: &str = "message_id";
/// JetStream's deduplication header: `<source>:<outbox-id>` (the message's
/// [`Outgoing::source`]); the [`msg_id_prefix`](crate::NatsBroker::msg_id_prefix)
/// followed by the `outbox-id` when a prefix is set; the bare `outbox-id`
/// for a message without a source. See [`NatsTransport::msg_id`].
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// The counter of publishes JetStream acknowledged as duplicates (dropped
/// within the stream's duplicate window), labelled `transport` and `subject`.
pub const DUPLICATES_METRIC: &str = "outbox_nats_duplicates_total";

/// A connected NATS transport: publishes each [`Outgoing`] as one NATS
/// message, with JetStream (default: resolves on the stream's PubAck) or,
/// opted in, core NATS (resolves once flushed; at most once).
///
/// Get one from [`NatsBroker::connect`](crate::NatsBroker::connect) (a
/// startup hook that registers it) or
/// [`NatsBroker::connect_transport`](crate::NatsBroker::connect_transport).
/// Cheap to clone: clones share one connection. Publishes run concurrently;
/// none waits for another.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    delivery: Delivery,
    publish_timeout: Duration,
    flush_timeout: Duration,
    msg_id_prefix: Option<String>,
    duplicates: AtomicU64,
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("NatsTransport")
            .field("name", &i.name)
            .field("url", &i.url)
            .field("delivery", &i.delivery)
            .field("publish_timeout", &i.publish_timeout)
            .field("flush_timeout", &i.flush_timeout)
            .field("msg_id_prefix", &i.msg_id_prefix)
            .field("duplicates", &i.duplicates.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What [`NatsTransport::new`] needs besides the client.
pub(crate) struct Options {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) delivery: Delivery,
    pub(crate) publish_timeout: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) msg_id_prefix: Option<String>,
}

impl NatsTransport {
    pub(crate) fn new(client: async_nats::Client, o: Options) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(o.publish_timeout)
            .build(client.clone());
        Self {
            inner: Arc::new(Inner {
                name: o.name,
                url: o.url,
                client,
                js,
                delivery: o.delivery,
                publish_timeout: o.publish_timeout,
                flush_timeout: o.flush_timeout,
                msg_id_prefix: o.msg_id_prefix,
                duplicates: AtomicU64::new(0),
            }),
        }
    }

    /// The server URL(s), passwords and tokens redacted.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// How publishes are confirmed ([`Delivery::JetStream`] by default).
    pub fn delivery(&self) -> Delivery {
        self.inner.delivery
    }

    /// The longest one publish takes (the publish timeout, 30 s by
    /// default): what [`Transport::max_publish_time`] reports.
    pub fn max_publish_time(&self) -> Duration {
        self.inner.publish_timeout
    }

    /// The server's `max_payload` (from its INFO; 1 MiB by default): the
    /// largest message (payload plus headers) it takes.
    pub fn max_payload(&self) -> usize {
        self.inner.client.server_info().max_payload
    }

    /// How many publishes JetStream acknowledged as duplicates of a message
    /// it already had (same `Nats-Msg-Id` within the stream's duplicate
    /// window): redeliveries the server dropped. Also counted in the metric
    /// [`DUPLICATES_METRIC`].
    pub fn duplicates(&self) -> u64 {
        self.inner.duplicates.load(Ordering::Relaxed)
    }

    /// The `Nats-Msg-Id` this transport gives `msg` (JetStream only; `None`
    /// without an `outbox-id` header). In order of precedence:
    ///
    /// 1. with a [`msg_id_prefix`](crate::NatsBroker::msg_id_prefix):
    ///    `prefix` + `outbox-id` (the source is not used; `""` gives the bare
    ///    id);
    /// 2. with a [source](Outgoing::source) (every message the `App`
    ///    relays): `<source>:<outbox-id>`, e.g.
    ///    `7716180956082555048/16384/billing.outbox:42`;
    /// 3. otherwise the bare `outbox-id`.
    ///
    /// JetStream drops a second message with the same id within the
    /// stream's duplicate window, so the id must be unique across every
    /// outbox table publishing into the stream: the outbox id is unique
    /// within one table only.
    pub fn msg_id(&self, msg: &Outgoing) -> Option<String> {
        let id = msg.headers.get(OUTBOX_ID)?;
        Some(msg_id(
            self.inner.msg_id_prefix.as_deref(),
            msg.source.as_deref(),
            id,
        ))
    }

    /// The underlying client (shared by every clone of this transport).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Checks that `subject` can take this transport's publishes: what
    /// [`Transport::verify_destination`] does when `App::run` starts.
    ///
    /// With [`Delivery::JetStream`] it asks JetStream for the streams that
    /// capture the subject (the `$JS.API.STREAM.NAMES` request with a
    /// subject filter; a stream capturing `orders.>` captures
    /// `orders.created`), bounded by the publish timeout. `Ok` names the
    /// first such stream. `Err` is the reason, with the fix: no stream
    /// captures the subject (create one: `nats.ensure_stream("ORDERS",
    /// ["orders.>"])`), or the request failed or timed out (`could not
    /// check ...`).
    ///
    /// With [`Delivery::Core`] there is nothing to check (core NATS has no
    /// destination: a subject exists as soon as one publishes to it) and
    /// the answer is `Ok(None)` without a request.
    pub async fn verify_subject(
        &self,
        subject: &str,
    ) -> std::result::Result<Option<String>, String> {
        self.inner.verify_subject(subject).await
    }

    /// Publishes one message and waits for its confirmation (what
    /// [`Transport::publish`] does, with this crate's error type; a
    /// permanent refusal is not wrapped in a [`BusRejection`] here).
    ///
    /// One deadline, the publish timeout, bounds the whole call (queueing
    /// in the client during a reconnect, sending, the PubAck or the flush):
    /// past it the call fails with [`Error::Timeout`]; the message may still
    /// reach the server later (the row is retried: at least once, and
    /// `Nats-Msg-Id` drops the copy within the duplicate window).
    pub async fn send(&self, msg: Outgoing) -> Result<Option<PublishAck>> {
        self.inner.send(msg).await
    }

    /// Flushes the connection (what [`Transport::close`] does), bounded by
    /// the flush timeout.
    pub async fn flush(&self) -> Result<()> {
        let i = &self.inner;
        match tokio::time::timeout(i.flush_timeout, i.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Flush {
                transport: i.name.clone(),
                timeout: i.flush_timeout,
                source: Some(Box::new(e)),
            }),
            Err(_) => Err(Error::Flush {
                transport: i.name.clone(),
                timeout: i.flush_timeout,
                source: None,
            }),
        }
    }
}

/// `e` and its sources, outermost first.
fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The `Nats-Msg-Id` of outbox id `id` (see [`NatsTransport::msg_id`]):
/// the explicit prefix wins, then the source, then the bare id.
fn msg_id(prefix: Option<&str>, source: Option<&str>, id: &str) -> String {
    match (prefix, source) {
        (Some(prefix), _) => format!("{prefix}{id}"),
        (None, Some(source)) => format!("{source}:{id}"),
        (None, None) => id.to_owned(),
    }
}

/// The NATS headers of `msg`: every header 1:1, the key in [`KEY_HEADER`],
/// the `outbox-id` in [`MESSAGE_ID_HEADER`] (unless set), and the
/// `Nats-Msg-Id` (returned, JetStream only; see [`msg_id`]).
fn nats_headers(
    subject: &str,
    key: Option<Vec<u8>>,
    headers: &outbox_core::Headers,
    prefix: Option<&str>,
    source: Option<&str>,
) -> Result<(HeaderMap, Option<String>)> {
    let invalid = |reason: String| Error::InvalidMessage {
        subject: subject.to_owned(),
        reason,
    };
    let mut map = HeaderMap::new();
    let mut put = |name: &str, value: &str| -> Result<()> {
        let n: HeaderName = name.parse().map_err(|_| {
            invalid(format!(
                "the header name {name:?} is not a valid NATS header name (printable ASCII, no \
                 ':' or whitespace)"
            ))
        })?;
        let v: HeaderValue = value.parse().map_err(|_| {
            invalid(format!(
                "the value of header {name:?} holds a line break, which NATS headers cannot carry"
            ))
        })?;
        map.insert(n, v);
        Ok(())
    };
    for (k, v) in headers {
        put(k, v)?;
    }
    if let Some(key) = key
        && !headers.contains_key(KEY_HEADER)
    {
        let key = String::from_utf8(key).map_err(|_| {
            invalid(format!(
                "the key is not UTF-8; NATS has no message key, this transport sends it as the \
                 text header {KEY_HEADER:?}"
            ))
        })?;
        put(KEY_HEADER, &key)?;
    }
    let id = headers.get(OUTBOX_ID);
    if let Some(id) = id
        && !headers.contains_key(MESSAGE_ID_HEADER)
    {
        put(MESSAGE_ID_HEADER, id)?;
    }
    let msg_id = id.map(|id| msg_id(prefix, source, id));
    if let Some(m) = &msg_id
        && m.parse::<HeaderValue>().is_err()
    {
        return Err(invalid(format!(
            "the {NATS_MSG_ID} {m:?} holds a line break, which NATS headers cannot carry"
        )));
    }
    Ok((map, msg_id))
}

impl Inner {
    async fn send(&self, msg: Outgoing) -> Result<Option<PublishAck>> {
        let Outgoing {
            destination: subject,
            key,
            payload,
            headers,
            source,
            ..
        } = msg;
        check_subject(&subject).map_err(|reason| Error::InvalidSubject {
            subject: subject.clone(),
            reason,
        })?;
        let (map, msg_id) = nats_headers(
            &subject,
            key,
            &headers,
            self.msg_id_prefix.as_deref(),
            source.as_deref(),
        )?;
        let deadline = Instant::now() + self.publish_timeout;
        let timeout = || Error::Timeout {
            subject: subject.clone(),
            timeout: self.publish_timeout,
        };
        match self.delivery {
            Delivery::JetStream => {
                let mut p = PublishMessage::build().payload(payload.into()).headers(map);
                if let Some(id) = &msg_id {
                    p = p.message_id(id);
                }
                let publish = async {
                    let ack = self.js.send_publish(subject.clone(), p).await?;
                    ack.await
                };
                let ack = match tokio::time::timeout_at(deadline, publish).await {
                    Err(_elapsed) => return Err(timeout()),
                    Ok(Err(e)) => return Err(self.js_error(&subject, e)),
                    Ok(Ok(ack)) => ack,
                };
                if ack.duplicate {
                    self.duplicates.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(
                        DUPLICATES_METRIC,
                        "transport" => self.name.clone(),
                        "subject" => subject.clone()
                    )
                    .increment(1);
                    tracing::debug!(
                        transport = %self.name,
                        subject = %subject,
                        stream = %ack.stream,
                        sequence = ack.sequence,
                        msg_id = msg_id.as_deref().unwrap_or(""),
                        "JetStream already had this Nats-Msg-Id within the duplicate window: \
                         the redelivered copy was dropped"
                    );
                }
                Ok(Some(ack))
            }
            Delivery::Core => {
                let publish = async {
                    self.client
                        .publish_with_headers(subject.clone(), map, payload.into())
                        .await
                        .map_err(|e| match e.kind() {
                            async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                                Error::TooLarge {
                                    subject: subject.clone(),
                                    max: self.client.server_info().max_payload,
                                    source: Box::new(e),
                                }
                            }
                            _ => Error::Publish {
                                subject: subject.clone(),
                                source: Box::new(e),
                            },
                        })?;
                    self.client.flush().await.map_err(|e| Error::Publish {
                        subject: subject.clone(),
                        source: Box::new(e),
                    })
                };
                match tokio::time::timeout_at(deadline, publish).await {
                    Err(_elapsed) => Err(timeout()),
                    Ok(r) => r.map(|()| None),
                }
            }
        }
    }

    /// The body of [`NatsTransport::verify_subject`].
    async fn verify_subject(&self, subject: &str) -> std::result::Result<Option<String>, String> {
        if self.delivery == Delivery::Core {
            return Ok(None);
        }
        let could_not = |cause: String| {
            format!(
                "could not check whether a JetStream stream captures the subject `{subject}`: \
                 {cause}"
            )
        };
        let no_answer = || {
            could_not(format!(
                "JetStream did not answer within {:?} (the publish timeout; is the server \
                 reachable?)",
                self.publish_timeout
            ))
        };
        // async-nats sends `$JS.API.STREAM.NAMES` with `{"subject": ...}`
        // and reads the first page (nats-server 2.9 answers it).
        let lookup = self.js.stream_by_subject(subject);
        let answer = match tokio::time::timeout(self.publish_timeout, lookup).await {
            Err(_elapsed) => return Err(no_answer()),
            Ok(answer) => answer,
        };
        match answer {
            Ok(stream) => {
                tracing::debug!(
                    transport = %self.name,
                    subject,
                    stream = %stream,
                    "a JetStream stream captures the subject"
                );
                Ok(Some(stream))
            }
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                let (name, captured) = suggested_stream(subject);
                Err(format!(
                    "no JetStream stream captures the subject `{subject}`, so every publish to \
                     it would fail (no responders); create a stream capturing it before App::run \
                     or in an on_startup hook, e.g. \
                     `nats.ensure_stream(\"{name}\", [\"{captured}\"])` \
                     (NatsBroker::ensure_stream) or `nats stream add {name} --subjects \
                     '{captured}'`"
                ))
            }
            Err(e) => {
                // The request's own kind lies under the page's `Other`.
                let kind = chain(&e)
                    .filter_map(|s| s.downcast_ref::<jetstream::context::RequestError>())
                    .map(|r| r.kind())
                    .find(|k| *k != jetstream::context::RequestErrorKind::Other);
                Err(match kind {
                    Some(jetstream::context::RequestErrorKind::TimedOut) => no_answer(),
                    Some(jetstream::context::RequestErrorKind::NoResponders) => could_not(
                        "JetStream does not answer (no responders: is JetStream enabled on the \
                         server, nats-server -js?)"
                            .to_owned(),
                    ),
                    _ => could_not(e.to_string()),
                })
            }
        }
    }

    fn js_error(&self, subject: &str, e: jetstream::context::PublishError) -> Error {
        let subject = subject.to_owned();
        match e.kind() {
            PublishErrorKind::StreamNotFound => Error::NoStream { subject },
            PublishErrorKind::TimedOut => Error::Timeout {
                subject,
                timeout: self.publish_timeout,
            },
            PublishErrorKind::MaxPayloadExceeded => Error::TooLarge {
                subject,
                max: self.client.server_info().max_payload,
                source: Box::new(e),
            },
            _ => {
                let api = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<jetstream::Error>());
                match api {
                    Some(j) => Error::StreamRefused {
                        subject,
                        code: j.code(),
                        err_code: j.error_code().0,
                        detail: j.to_string(),
                    },
                    None => Error::Publish {
                        subject,
                        source: Box::new(e),
                    },
                }
            }
        }
    }

    /// `e` as [`Transport::publish`] returns it: a permanent refusal
    /// wrapped in a [`BusRejection`] naming this transport; a transient
    /// failure as it is.
    fn publish_error(&self, e: Error) -> BoxError {
        if e.is_retryable() {
            Box::new(e)
        } else {
            Box::new(BusRejection::new(self.name.clone(), e))
        }
    }
}

/// Where the servers are, for the AsyncAPI document: every host of the
/// URL list (never user, password or token).
pub(crate) fn server_info(url: &str) -> ServerInfo {
    ServerInfo::from_url("nats", url).description("NATS server (JetStream)")
}

impl Transport for NatsTransport {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn server(&self) -> Option<ServerInfo> {
        Some(server_info(&self.inner.url))
    }

    /// Publishes `msg` to the subject `msg.destination` (payload byte for
    /// byte, headers 1:1, the key in [`KEY_HEADER`], `Nats-Msg-Id` from the
    /// source and the `outbox-id`: [`NatsTransport::msg_id`]) and resolves once JetStream acknowledged it (or, with
    /// [`Delivery::Core`], once it was flushed). A permanent refusal
    /// ([`Error::is_retryable`] false: over `max_payload` or the stream's
    /// `max_msg_size`, an invalid subject or header) comes wrapped in a
    /// [`BusRejection`] whose source is the [`enum@Error`].
    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.send(msg).await {
                Ok(_) => Ok(()),
                Err(e) => Err(inner.publish_error(e)),
            }
        })
    }

    /// The publish timeout: the one deadline of a publish.
    fn max_publish_time(&self) -> Option<Duration> {
        Some(self.inner.publish_timeout)
    }

    /// NATS's publish-subject rules (not empty, no whitespace, no empty or
    /// wildcard token): a bad subject in `#[publish_to]` fails `App::run`.
    /// Whether a stream captures the subject is
    /// [`verify_destination`](Transport::verify_destination)'s part.
    fn check_destination(&self, destination: &str) -> Result<(), String> {
        check_subject(destination)
    }

    /// The client's connection state: `Connected`, else the state
    /// (`Disconnected`, `Pending`) while the client reconnects by itself.
    fn health(&self) -> BoxFuture<'static, std::result::Result<(), String>> {
        let state = self.inner.client.connection_state();
        let url = self.inner.url.clone();
        Box::pin(async move {
            match state {
                async_nats::connection::State::Connected => Ok(()),
                other => Err(format!(
                    "not connected to NATS ({other:?}); the client reconnects by itself ({})",
                    server_info(&url).host
                )),
            }
        })
    }

    /// [`NatsTransport::verify_subject`]: with JetStream, `App::run` fails
    /// at startup, before anything is consumed, when no stream captures the
    /// subject (the reason names the subject and the `ensure_stream` call
    /// that fixes it), or when JetStream does not answer within the publish
    /// timeout (`could not check ...`). With core NATS every subject is
    /// accepted: there is no destination to check.
    ///
    /// A stream deleted after startup is still met at publish:
    /// [`Error::NoStream`], transient, the row is retried until a stream
    /// captures the subject again.
    fn verify_destination(&self, destination: &str) -> BoxFuture<'static, Result<(), String>> {
        let inner = self.inner.clone();
        let subject = destination.to_owned();
        Box::pin(async move { inner.verify_subject(&subject).await.map(|_| ()) })
    }

    /// Flushes the connection (bounded by the flush timeout).
    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let this = self.clone();
        Box::pin(async move { this.flush().await.map_err(BoxError::from) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_map_one_to_one_with_the_key_and_the_ids() {
        let mut h = outbox_core::Headers::new();
        h.insert("content-type".into(), "application/json".into());
        h.insert("correlation_id".into(), "c-1".into());
        h.insert(OUTBOX_ID.into(), "42".into());
        h.insert("x-tenant".into(), "acme".into());
        let (map, id) = nats_headers("s", Some(b"k1".to_vec()), &h, Some("billing:"), Some("src"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            id.as_deref(),
            Some("billing:42"),
            "the explicit prefix wins"
        );
        let get = |n: &str| map.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("correlation_id").as_deref(), Some("c-1"));
        assert_eq!(get(OUTBOX_ID).as_deref(), Some("42"));
        assert_eq!(get(MESSAGE_ID_HEADER).as_deref(), Some("42"));
        assert_eq!(get(KEY_HEADER).as_deref(), Some("k1"));
        assert_eq!(get("x-tenant").as_deref(), Some("acme"));
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused_permanently() {
        let mut h = outbox_core::Headers::new();
        h.insert("x".into(), "a\r\nb".into());
        let e = nats_headers("s", None, &h, None, None).err();
        assert!(matches!(&e, Some(Error::InvalidMessage { .. })), "{e:?}");
        let mut h = outbox_core::Headers::new();
        h.insert("bad name".into(), "v".into());
        assert!(nats_headers("s", None, &h, None, None).is_err());
        let e = nats_headers(
            "s",
            Some(vec![0xff]),
            &outbox_core::Headers::new(),
            None,
            None,
        )
        .err();
        assert!(
            e.as_ref().is_some_and(|e| !e.is_retryable()),
            "a non-UTF-8 key: {e:?}"
        );
    }

    #[test]
    fn the_msg_id_combines_the_source_with_the_outbox_id_unless_a_prefix_is_set() {
        let src = Some("7716180956082555048/16384/billing.outbox");
        assert_eq!(
            msg_id(None, src, "42"),
            "7716180956082555048/16384/billing.outbox:42",
            "the default: unique across outbox tables"
        );
        assert_eq!(
            msg_id(Some("billing:"), src, "42"),
            "billing:42",
            "explicit wins"
        );
        assert_eq!(
            msg_id(Some(""), src, "42"),
            "42",
            "an empty prefix: the bare id"
        );
        assert_eq!(msg_id(None, None, "42"), "42", "no source, no prefix");
        assert_eq!(msg_id(Some("p-"), None, "42"), "p-42");

        let mut h = outbox_core::Headers::new();
        h.insert(OUTBOX_ID.into(), "7".into());
        let (map, id) = nats_headers("s", None, &h, None, Some("orders-service"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.as_deref(), Some("orders-service:7"));
        assert_eq!(
            map.get(MESSAGE_ID_HEADER)
                .map(|v| v.as_str().to_owned())
                .as_deref(),
            Some("7"),
            "FastStream's message_id stays the outbox id"
        );
        assert!(
            map.get(NATS_MSG_ID).is_none(),
            "set by the publish, not here"
        );
        let e = nats_headers("s", None, &h, Some("a\nb"), None).err();
        assert!(
            matches!(&e, Some(Error::InvalidMessage { .. })),
            "a Nats-Msg-Id with a line break: {e:?}"
        );
    }
}
