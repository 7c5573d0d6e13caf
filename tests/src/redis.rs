//! Helpers shared by the Redis test binaries (`tests/tests/*redis*.rs`):
//! the server's URL (`REDIS_URL`), unique keys deleted after the test,
//! reading streams and lists back and decoding FastStream's format.

#![allow(clippy::unwrap_used, missing_debug_implementations)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use outbox_redis::RedisBroker;
use outbox_redis::faststream::{KEY, MESSAGE_ID, decode};
use redis::aio::MultiplexedConnection;

/// `REDIS_URL` (default `redis://127.0.0.1:6379`, as scripts/test.sh
/// exports it).
pub fn url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// The `host:port` of [`url()`] (for the test proxy).
pub fn addr() -> String {
    let u = url();
    let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:6379")
    }
}

/// [`url()`] with its `host:port` replaced by `addr` (credentials and
/// database kept): the URL of the server through a proxy.
pub fn url_via(addr: &str) -> String {
    url().replacen(&self::addr(), addr, 1)
}

/// A key no other test uses.
pub fn unique_key(prefix: &str) -> String {
    format!("outbox-test:{prefix}:{}", crate::suffix())
}

/// The transport configuration the tests use: short timeouts.
pub fn test_redis(url: &str) -> RedisBroker {
    RedisBroker::new(url)
        .connect_timeout(Duration::from_secs(5))
        .publish_timeout(Duration::from_secs(5))
}

/// A connection to the server at [`url()`], or a panic saying how to get
/// one. These tests do not skip silently when there is no server.
pub async fn conn() -> MultiplexedConnection {
    let u = url();
    let connect = async {
        let client = redis::Client::open(u.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok::<_, redis::RedisError>(c)
    };
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "Redis at {u} does not answer ({e}): the Redis tests need a server. Start it \
             (`redis-server`, or the machine's service) or set REDIS_URL"
        ),
        Err(_) => panic!("Redis at {u} did not answer within 10 s: start it or set REDIS_URL"),
    }
}

/// Deletes its keys when dropped (best effort, on a blocking connection).
#[derive(Default)]
pub struct Keys(Vec<String>);

impl Keys {
    /// Nothing to delete yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh key (see [`unique_key`]), deleted with the others.
    pub fn key(&mut self, prefix: &str) -> String {
        let k = unique_key(prefix);
        self.0.push(k.clone());
        k
    }

    /// Deletes `key` too when dropped.
    pub fn add(&mut self, key: impl Into<String>) {
        self.0.push(key.into());
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.0);
        // Drop may run inside the runtime: do the blocking delete on a
        // thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(client) = redis::Client::open(url().as_str()) else {
                return;
            };
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) {
                let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query(&mut c);
            }
        })
        .join();
    }
}

/// One message read back and decoded from FastStream's format, with the
/// headers under the names of `docs/transports.md`: `outbox-key` is the
/// key, `message_id` is dropped when it equals `outbox-id` (it is derived
/// from it).
#[derive(Debug, Clone)]
pub struct Msg {
    /// The stream entry id (empty for list elements and channel messages).
    pub id: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// The headers exactly as in the frame (`message_id` and `outbox-key`
    /// included).
    pub raw_headers: BTreeMap<String, String>,
}

impl Msg {
    /// Decodes one FastStream frame.
    pub fn decode(id: String, frame: &[u8]) -> anyhow::Result<Self> {
        let (headers, payload) = decode(frame).context("not a FastStream v1 frame")?;
        let raw_headers: BTreeMap<String, String> = headers.into_iter().collect();
        let mut headers = raw_headers.clone();
        let key = headers.remove(KEY).map(String::into_bytes);
        if headers.get(MESSAGE_ID) == headers.get(outbox_core::OUTBOX_ID) {
            headers.remove(MESSAGE_ID);
        }
        Ok(Self {
            id,
            key,
            payload,
            headers,
            raw_headers,
        })
    }

    /// The header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One `XRANGE` entry: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Every entry of the stream `key` (`XRANGE key - +`), decoded from the
/// `__data__` field.
pub async fn read_stream(c: &mut MultiplexedConnection, key: &str) -> anyhow::Result<Vec<Msg>> {
    let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(c)
        .await
        .with_context(|| format!("XRANGE {key}"))?;
    entries
        .into_iter()
        .map(|(id, fields)| {
            let data = fields
                .into_iter()
                .find(|(f, _)| f == outbox_redis::faststream::DATA_FIELD)
                .map(|(_, v)| v)
                .with_context(|| format!("entry {id} of {key} has no __data__ field"))?;
            Msg::decode(id, &data)
        })
        .collect()
}

/// Every element of the list `key` (`LRANGE key 0 -1`), decoded.
pub async fn read_list(c: &mut MultiplexedConnection, key: &str) -> anyhow::Result<Vec<Msg>> {
    let elements: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(c)
        .await
        .with_context(|| format!("LRANGE {key}"))?;
    elements
        .into_iter()
        .map(|e| Msg::decode(String::new(), &e))
        .collect()
}

/// Reads the stream `key` until `done` holds or `timeout` passes; returns
/// what it read.
pub async fn read_stream_until(
    key: &str,
    timeout: Duration,
    done: impl Fn(&[Msg]) -> bool,
) -> anyhow::Result<Vec<Msg>> {
    let mut c = conn().await;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = read_stream(&mut c, key).await?;
        if done(&got) || std::time::Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
