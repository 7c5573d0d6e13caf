//! Helpers shared by the rabbitmq test binaries (`tests/tests/*rabbitmq*.rs`):
//! the broker URL, queues with unique names that expire by themselves, a
//! reader that reads a queue back without consuming it for good, and an
//! in-test proxy in front of the broker for outages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox_rabbitmq::RabbitBroker;

use crate::proxy::TcpProxy;

/// How long a test queue lives unused before RabbitMQ deletes it
/// (`x-expires`): tests that panic leave nothing behind for long.
pub const QUEUE_EXPIRES: Duration = Duration::from_secs(600);

/// The broker URL (`RABBITMQ_URL`, default
/// `amqp://guest:guest@127.0.0.1:5672/%2f`).
pub fn url() -> String {
    std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `host:port` of [`url()`] (for a [`TcpProxy`]).
pub fn upstream() -> String {
    let u = url();
    let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    }
}

/// [`url()`] with its `host:port` replaced by `addr` (a proxy).
pub fn url_via(addr: &str) -> String {
    url().replacen(&upstream(), addr, 1)
}

/// A unique lowercase name: `<prefix>.<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", crate::suffix())
}

/// A connection to the broker; panics with how to fix it when the broker
/// does not answer.
pub async fn connect() -> Connection {
    let u = url();
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&u, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "RabbitMQ at {u} (RABBITMQ_URL) refused the test connection: {e}. Start it \
             (scripts/test.sh checks it) or set RABBITMQ_URL"
        ),
        Err(_) => panic!(
            "RabbitMQ at {u} (RABBITMQ_URL) did not answer within 10 s. Start it \
             (scripts/test.sh checks it) or set RABBITMQ_URL"
        ),
    }
}

/// Declares a durable test queue that RabbitMQ deletes after
/// [`QUEUE_EXPIRES`] unused.
pub async fn declare_queue(queue: &str) -> anyhow::Result<()> {
    let conn = connect().await;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongInt(i32::try_from(QUEUE_EXPIRES.as_millis())?),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .with_context(|| format!("declaring the test queue {queue}"))?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Deletes a queue (best effort).
pub async fn delete_queue(queue: &str) {
    let conn = connect().await;
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// A message read back from a queue, its AMQP properties mapped back to the
/// App's header names (`content-type`, `correlation_id`, `outbox-id`) and
/// the `outbox-key` header to [`Msg::key`].
#[derive(Debug, Clone)]
pub struct Msg {
    /// The exchange it was published to (`""`: the default exchange).
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The body.
    pub payload: Vec<u8>,
    /// `outbox-key`.
    pub key: Option<Vec<u8>>,
    /// The headers table plus the mapped properties.
    pub headers: BTreeMap<String, String>,
    /// The raw AMQP properties.
    pub properties: BasicProperties,
}

impl Msg {
    /// The `outbox-id` (AMQP `message_id`) as a row id.
    pub fn outbox_id(&self) -> Option<i64> {
        self.headers.get("outbox-id")?.parse().ok()
    }

    /// The body as a JSON `i64`.
    pub fn value(&self) -> Option<i64> {
        serde_json::from_slice(&self.payload).ok()
    }
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

fn to_msg(d: lapin::message::Delivery) -> Msg {
    let p = &d.properties;
    let mut headers = BTreeMap::new();
    let mut key = None;
    if let Some(t) = p.headers() {
        for (k, v) in t {
            if k.as_str() == outbox_rabbitmq::KEY_HEADER {
                key = Some(match v {
                    AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                    other => text(other).into_bytes(),
                });
            } else {
                headers.insert(k.as_str().to_owned(), text(v));
            }
        }
    }
    for (name, value) in [
        ("content-type", p.content_type()),
        ("correlation_id", p.correlation_id()),
        ("outbox-id", p.message_id()),
    ] {
        if let Some(v) = value {
            headers.insert(name.to_owned(), v.as_str().to_owned());
        }
    }
    Msg {
        exchange: d.exchange.as_str().to_owned(),
        routing_key: d.routing_key.as_str().to_owned(),
        payload: d.data,
        key,
        headers,
        properties: d.properties,
    }
}

/// Everything in `queue`, read without consuming it: the messages are
/// received unacknowledged and go back to the queue when the reader's
/// channel closes. Reads until `done(messages so far)` or `timeout`.
pub async fn read_queue(
    queue: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Msg]) -> bool,
) -> anyhow::Result<Vec<Msg>> {
    let conn = connect().await;
    let ch = conn.create_channel().await?;
    ch.basic_qos(0, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            format!("reader-{}", crate::suffix()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming {queue}"))?;
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => got.push(to_msg(d)),
            Ok(Some(Err(e))) => return Err(e).context("reading the queue"),
            Ok(None) | Err(_) => break,
        }
    }
    // Not acknowledged: closing the connection puts every message back.
    drop(consumer);
    let _ = conn.close(200, "read".into()).await;
    Ok(got)
}

/// How many messages `queue` holds (ready ones; a passive declare).
pub async fn queue_len(queue: &str) -> anyhow::Result<u32> {
    let conn = connect().await;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(q.message_count())
}

/// A [`RabbitBroker`] for tests: the given URL, short timeouts.
pub fn test_rabbit(url: &str) -> RabbitBroker {
    RabbitBroker::new(url)
        .connection_name("outbox-tests")
        .connect_timeout(Duration::from_secs(5))
        .publish_timeout(Duration::from_secs(10))
}

/// A [`TcpProxy`] in front of the broker and the URL through it.
pub async fn proxy() -> anyhow::Result<(TcpProxy, String)> {
    let proxy = TcpProxy::start(&upstream()).await?;
    let via = url_via(&proxy.addr().to_string());
    Ok((proxy, via))
}
