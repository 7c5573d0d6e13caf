//! An in-test TCP proxy for outage tests against the machine's shared
//! servers (RabbitMQ, NATS, Redis, PostgreSQL): the client under test
//! connects through the proxy, and the test cuts or pauses the traffic
//! without touching the shared server.
//!
//! - [`TcpProxy::cut`]: closes every open connection and drops new ones at
//!   once (the server looks dead: connection reset / refused).
//! - [`TcpProxy::pause`]: keeps the connections open but stops forwarding
//!   bytes in both directions (the server looks hung: nothing answers, no
//!   error either); [`TcpProxy::restore`] forwards what was held back.
//! - [`TcpProxy::restore`]: back to normal; new connections go through.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let proxy = tests::proxy::TcpProxy::start("127.0.0.1:5672").await?;
//! let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
//! // ... connect the client under test to `url` ...
//! proxy.cut(); // outage
//! proxy.restore(); // recovery
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use outbox_conformance::Cut;
use outbox_core::BoxError;
use outbox_core::transport::BoxFuture;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards bytes both ways.
    Open,
    /// Holds bytes back (connections stay open).
    Paused,
    /// Closes connections, drops new ones.
    Cut,
}

/// A TCP proxy on `127.0.0.1:<random port>` in front of one upstream
/// address. Stops (closing its connections) when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: String,
    mode: Arc<watch::Sender<Mode>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `upstream` (`host:port`), in [`Mode::Open`].
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the test proxy")?;
        let addr = listener.local_addr()?;
        let (tx, _) = watch::channel(Mode::Open);
        let mode = Arc::new(tx);
        let upstream_addr = upstream.to_owned();
        let m = Arc::clone(&mode);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *m.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                let rx = m.subscribe();
                let up = upstream_addr.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&up).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Either direction ending (EOF, error, cut) closes both.
                    tokio::select! {
                        () = pump(cr, sw, rx.clone()) => {}
                        () = pump(sr, cw, rx) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            upstream: upstream.to_owned(),
            mode,
            accept,
        })
    }

    /// The proxy's address (`127.0.0.1:<port>`): point the client here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Closes every connection and drops new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.remote().cut();
    }

    /// Stops forwarding (connections stay open) until [`restore`](Self::restore).
    pub fn pause(&self) {
        self.remote().pause();
    }

    /// Forwards again (held-back bytes first); new connections go through.
    pub fn restore(&self) {
        self.remote().restore();
    }

    /// A handle that can restore the proxy from elsewhere (e.g. the
    /// conformance kit's `Cut`), without owning it.
    pub fn remote(&self) -> ProxyRemote {
        ProxyRemote {
            mode: Arc::clone(&self.mode),
        }
    }

    /// The conformance kit's outage through this proxy, as
    /// [`BusProbe::cut`](outbox_conformance::BusProbe::cut) returns it: cuts
    /// the proxy when awaited; the [`Cut`] restores it (also when dropped).
    /// Only the probe's own connections are cut, never the shared server.
    pub fn cut_until_restored(&self) -> BoxFuture<'static, Result<Cut, BoxError>> {
        let remote = self.remote();
        Box::pin(async move {
            remote.cut();
            Ok(Cut::new(move || {
                remote.restore();
                Ok(())
            }))
        })
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Controls a [`TcpProxy`] (cut, pause, restore) from another owner.
#[derive(Debug, Clone)]
pub struct ProxyRemote {
    mode: Arc<watch::Sender<Mode>>,
}

impl ProxyRemote {
    /// As [`TcpProxy::cut`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// As [`TcpProxy::pause`].
    pub fn pause(&self) {
        self.mode.send_replace(Mode::Paused);
    }

    /// As [`TcpProxy::restore`].
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

/// Copies `from` to `to` while the mode allows; returns on EOF, an error or
/// a cut.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if *mode.borrow_and_update() == Mode::Cut {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Hold the bytes while paused; drop them (and the connection) on a cut.
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Open => break,
                Mode::Cut => return,
                Mode::Paused => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut b = vec![0u8; msg.len()];
        match tokio::time::timeout(wait, s.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(b),
            _ => None,
        }
    }

    #[tokio::test]
    async fn forwards_pauses_cuts_and_restores() {
        let up = echo_server().await;
        let proxy = TcpProxy::start(&up.to_string()).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let short = Duration::from_millis(300);
        let long = Duration::from_secs(5);
        assert_eq!(
            roundtrip(&mut s, b"one", long).await.as_deref(),
            Some(&b"one"[..])
        );

        // Paused: nothing comes back, the connection stays; restore releases it.
        proxy.pause();
        assert_eq!(roundtrip(&mut s, b"two", short).await, None);
        proxy.restore();
        let mut b = [0u8; 3];
        tokio::time::timeout(long, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"two");

        // Cut: the open connection is closed, new ones are dropped.
        proxy.cut();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(long, s.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s2, b"x", short).await, None);

        // Restored: new connections work again.
        proxy.remote().restore();
        let mut s3 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s3, b"three", long).await.as_deref(),
            Some(&b"three"[..])
        );
    }
}
