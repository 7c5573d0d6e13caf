//! Helpers shared by the nats test binaries (`tests/tests/*nats*.rs`): the
//! server URL (`NATS_URL`, failing loudly when nothing answers), unique
//! streams and subjects, creating and deleting streams, and reading a
//! stream back message by message (`STREAM.MSG.GET`, which nats-server 2.9
//! answers).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};

/// The NATS server of the tests: `NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// `host:port` of [`url`] (for the TCP proxy).
pub fn addr() -> String {
    let u = url();
    let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.trim_end_matches('/').to_owned()
}

/// Connects to [`url`]; panics with how to fix it when nothing answers
/// (the tests never skip silently).
pub async fn connect() -> async_nats::Client {
    let u = url();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(3))
            .connect(u.as_str()),
    )
    .await;
    match res {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "the NATS tests need nats-server with JetStream at {u} (NATS_URL): {e}; start it \
             (`nats-server -js`) or set NATS_URL"
        ),
        Err(_) => panic!(
            "the NATS tests need nats-server with JetStream at {u} (NATS_URL): no answer within \
             5 s; start it (`nats-server -js`) or set NATS_URL"
        ),
    }
}

/// A JetStream context on a fresh connection to [`url`].
pub async fn js() -> jetstream::Context {
    jetstream::new(connect().await)
}

/// A fresh `(stream, subject)` pair: `T_<LABEL>_<suffix>` capturing
/// `t.<label>.<suffix>`.
pub fn unique(label: &str) -> (String, String) {
    let s = crate::suffix();
    let label: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    (
        format!("T_{}_{s}", label.to_uppercase()),
        format!("t.{label}.{s}"),
    )
}

/// Creates `stream` capturing `subjects`, with the server's defaults (2 min
/// duplicate window) and `max_msg_size` if given.
pub async fn create_stream(
    stream: &str,
    subjects: &[&str],
    max_msg_size: Option<i32>,
) -> anyhow::Result<()> {
    let js = js().await;
    js.create_stream(stream::Config {
        name: stream.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        max_message_size: max_msg_size.unwrap_or(-1),
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {stream}"))?;
    Ok(())
}

/// Deletes `stream` (ignores a missing one).
pub async fn delete_stream(stream: &str) {
    let js = js().await;
    let _ = js.delete_stream(stream).await;
}

/// Deletes `streams` from a synchronous context (a `Drop`): on a thread of
/// its own with its own runtime.
pub fn delete_streams_blocking(streams: Vec<String>) {
    if streams.is_empty() {
        return;
    }
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(Ok(client)) =
                tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url())).await
            else {
                return;
            };
            let js = jetstream::new(client);
            for s in streams {
                let _ = tokio::time::timeout(Duration::from_secs(5), js.delete_stream(&s)).await;
            }
        });
    })
    .join();
}

/// Deletes its streams when dropped (also when a test fails).
#[derive(Debug, Default)]
pub struct Streams(std::sync::Mutex<Vec<String>>);

impl Streams {
    /// Deletes `name` at drop.
    pub fn add(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_owned());
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        delete_streams_blocking(names);
    }
}

/// One message of a stream, as stored.
#[derive(Debug, Clone)]
pub struct StoredMsg {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its subject.
    pub subject: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Every header (first value), names as sent.
    pub headers: BTreeMap<String, String>,
}

impl StoredMsg {
    /// The `outbox-id` header as a number.
    pub fn outbox_id(&self) -> Option<i64> {
        self.headers.get("outbox-id")?.parse().ok()
    }

    /// The header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Every message of `stream` from its first sequence, read until
/// `done(messages)` holds or `timeout` passes (then what it has).
pub async fn read_stream(
    stream: &str,
    timeout: Duration,
    done: impl Fn(&[StoredMsg]) -> bool,
) -> anyhow::Result<Vec<StoredMsg>> {
    let js = js().await;
    let s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("stream {stream}"))?;
    let deadline = Instant::now() + timeout;
    let mut got: Vec<StoredMsg> = Vec::new();
    let mut next = 1_u64;
    loop {
        let info = s.get_info().await?;
        let last = info.state.last_sequence;
        next = next.max(info.state.first_sequence);
        while next <= last {
            match s.get_raw_message(next).await {
                Ok(m) => got.push(StoredMsg {
                    sequence: m.sequence,
                    subject: m.subject.to_string(),
                    payload: m.payload.to_vec(),
                    headers: m
                        .headers
                        .iter()
                        .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_owned())))
                        .collect(),
                }),
                // A deleted sequence (interior gap): skip it.
                Err(e) if e.to_string().contains("no message found") => {}
                Err(e) => return Err(e).context("reading a stream message"),
            }
            next += 1;
        }
        if done(&got) || Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The message count of `stream` (`state.messages`).
pub async fn stream_len(stream: &str) -> anyhow::Result<u64> {
    let js = js().await;
    let s = js.get_stream(stream).await?;
    Ok(s.get_info().await?.state.messages)
}

/// The `nats-server` binary for tests that run a private server (refused
/// credentials): `NATS_SERVER_BIN`, else `nats-server` on `PATH`, else
/// `/usr/sbin/nats-server`; panics with how to fix it.
pub fn server_bin() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.exists() {
                return p;
            }
        }
    }
    let p = std::path::PathBuf::from("/usr/sbin/nats-server");
    if p.exists() {
        return p;
    }
    panic!("this test runs a private nats-server: install it or set NATS_SERVER_BIN")
}

/// A private nats-server (killed when dropped) on a free port, started with
/// `args` (e.g. `--user u --pass p`).
#[derive(Debug)]
pub struct PrivateServer {
    child: std::process::Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

impl PrivateServer {
    /// Starts it and waits until it accepts TCP connections.
    pub async fn start(args: &[&str]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new(server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting a private nats-server")?;
        let s = Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let up = crate::wait_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(&s.addr).await.is_ok()
        })
        .await;
        anyhow::ensure!(up, "the private nats-server did not start on {}", s.addr);
        Ok(s)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
