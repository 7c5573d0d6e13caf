//! Health of a running [`App`](crate::App): [`AppHandle::health`] and the
//! opt-in `/healthz` and `/readyz` endpoints
//! ([`App::health_endpoint`](crate::App::health_endpoint)) for Kubernetes
//! probes; and the engine's [connection budget](crate::Engine::connection_budget).
//!
//! | endpoint | 200 when | 503 when |
//! |---|---|---|
//! | `GET /healthz` (liveness) | no subscriber loop died (also while starting and stopping) | a loop died (a panic): restart the process |
//! | `GET /readyz` (readiness) | the engine runs, the database answers `SELECT 1`, every transport reports its bus reachable ([`Transport::health`](crate::Transport::health)) | starting, stopping, a loop died, the database or a transport does not answer |
//!
//! Both answer a small JSON body (`application/json`), the same for 200
//! and 503:
//!
//! ```json
//! {"status":"unavailable","live":true,"ready":false,"stopping":false,
//!  "problems":["database: PostgreSQL does not answer: ..."],
//!  "database":{"ok":false,"error":"PostgreSQL does not answer: ..."},
//!  "listen":{"state":"connected","backend_pid":4242,"reconnects":0},
//!  "subscribers":[{"name":"orders","queues":["orders"],"claim_mode":"lease",
//!                  "state":"running","loops_running":3,"loops_total":3}],
//!  "transports":[{"name":"kafka","ok":true}]}
//! ```
//!
//! `/healthz` runs no query (a probe must not fail because the database is
//! slow, and a database outage is no reason to restart): its body has only
//! `status`, `live`, `stopping` and `subscribers`.
//!
//! A Kubernetes probe configuration:
//!
//! ```yaml
//! livenessProbe:
//!   httpGet: { path: /healthz, port: 8081 }
//!   periodSeconds: 10
//!   failureThreshold: 3
//! readinessProbe:
//!   httpGet: { path: /readyz, port: 8081 }
//!   periodSeconds: 5
//!   timeoutSeconds: 6     # the database and transport probes take up to 5 s
//! ```

//!
//! # Connection budget
//!
//! The engine's loops do not take their connections from the broker's
//! pool: each opens its own, with the pool's connect options.
//! [`Engine::connection_budget`] counts them ([`subscriber_connections`]
//! per subscriber):
//!
//! | claim mode | connections per subscriber |
//! |---|---|
//! | [`Lease`](crate::ClaimMode::Lease) | `fetch_concurrency` (claims) + `min(max_workers, 4)` (the workers' retry and dead-letter writes) + 1 (the acker's deletes) |
//! | [`Transaction`](crate::ClaimMode::Transaction) | `fetch_concurrency` (one per lot) + `min(max_workers, 4)` (rows that outlive `max_hold` finish under a lease) |
//!
//! plus one LISTEN connection per engine (none with
//! [`Engine::without_listen`]). The broker's pool comes on top, up to its
//! `max_connections`. [`Engine::start`] compares them with the server's
//! `max_connections` minus its reserved and in-use connections and logs
//! each of [`ConnectionBudget::problems`] at WARN.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub use crate::engine::budget::{ConnectionBudget, subscriber_connections};
pub use crate::engine::health::{
    DATABASE_PROBE_TIMEOUT, EngineHealth, ListenHealth, ListenState, LoopState, SubscriberHealth,
};

use super::{AppContext, AppHandle};
use crate::engine::Engine;
use crate::engine::subscriber::ClaimMode;
use crate::error::{Error, Result};

/// The longest [`AppHandle::health`] waits for one transport's
/// [`health`](crate::Transport::health).
pub const TRANSPORT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The running engine, shared by the App and its handles.
#[derive(Debug, Clone, Default)]
pub(crate) struct EngineSlot(Arc<std::sync::Mutex<Option<Engine>>>);

impl EngineSlot {
    pub(crate) fn set(&self, engine: Option<Engine>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = engine;
    }

    fn get(&self) -> Option<Engine> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// One transport in a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportHealth {
    /// The transport's name.
    pub name: String,
    /// What its [`health`](crate::Transport::health) answered (within
    /// [`TRANSPORT_PROBE_TIMEOUT`]).
    pub status: std::result::Result<(), String>,
}

/// What [`AppHandle::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Liveness: no subscriber loop died. True while starting and
    /// stopping.
    pub live: bool,
    /// Readiness: running (not starting, not stopping), every loop alive,
    /// the database answers, every transport is healthy.
    pub ready: bool,
    /// Shutdown was requested.
    pub stopping: bool,
    /// The engine (subscribers, LISTEN, database); `None` before it
    /// started (startup hooks, destination checks) and after it stopped.
    pub engine: Option<EngineHealth>,
    /// Each registered transport.
    pub transports: Vec<TransportHealth>,
}

impl HealthReport {
    /// What is wrong, one line each (empty: ready).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.stopping {
            out.push("the app is stopping".to_owned());
        }
        match &self.engine {
            None if !self.stopping => out.push("the engine is not running yet".to_owned()),
            None => {}
            Some(e) => {
                if let Err(why) = &e.database {
                    out.push(format!("database: {why}"));
                }
                for s in e
                    .subscribers
                    .iter()
                    .filter(|s| s.state != LoopState::Running)
                {
                    out.push(format!(
                        "subscriber {}: {} ({} of {} loops running)",
                        s.name,
                        s.state.as_str(),
                        s.loops_running,
                        s.loops_total
                    ));
                }
            }
        }
        for t in &self.transports {
            if let Err(why) = &t.status {
                out.push(format!("transport {}: {why}", t.name));
            }
        }
        out
    }

    /// The JSON body of the `/readyz` endpoint (see the [module docs](self)).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "status": if self.ready { "ok" } else { "unavailable" },
            "live": self.live,
            "ready": self.ready,
            "stopping": self.stopping,
            "problems": self.problems(),
            "transports": self.transports.iter().map(|t| match &t.status {
                Ok(()) => json!({"name": t.name, "ok": true}),
                Err(e) => json!({"name": t.name, "ok": false, "error": e}),
            }).collect::<Vec<_>>(),
        });
        if let Some(e) = &self.engine {
            v["database"] = match &e.database {
                Ok(()) => json!({"ok": true}),
                Err(why) => json!({"ok": false, "error": why}),
            };
            v["listen"] = listen_json(&e.listen);
            v["subscribers"] = subscribers_json(&e.subscribers);
        }
        v
    }
}

fn listen_json(l: &ListenHealth) -> Value {
    let mut v = json!({"state": l.state.as_str(), "reconnects": l.reconnects});
    if let Some(pid) = l.backend_pid {
        v["backend_pid"] = json!(pid);
    }
    if let Some(e) = &l.error {
        v["error"] = json!(e);
    }
    v
}

fn subscribers_json(subs: &[SubscriberHealth]) -> Value {
    subs.iter()
        .map(|s| {
            json!({
                "name": s.name,
                "queues": s.queues,
                "claim_mode": match s.claim_mode {
                    ClaimMode::Transaction => "transaction",
                    _ => "lease",
                },
                "state": s.state.as_str(),
                "loops_running": s.loops_running,
                "loops_total": s.loops_total,
            })
        })
        .collect()
}

impl AppHandle {
    /// The app's health: each subscriber's loops, the LISTEN connection,
    /// the database (`SELECT 1` within [`DATABASE_PROBE_TIMEOUT`]) and
    /// every transport ([`Transport::health`](crate::Transport::health),
    /// within [`TRANSPORT_PROBE_TIMEOUT`]), probed concurrently. What
    /// `/readyz` serves ([`App::health_endpoint`](crate::App::health_endpoint)).
    ///
    /// ```no_run
    /// # async fn demo(app: outbox_core::App) {
    /// let handle = app.handle();
    /// tokio::spawn(app.run());
    /// let report = handle.health().await;
    /// if !report.ready {
    ///     eprintln!("not ready: {:?}", report.problems());
    /// }
    /// # }
    /// ```
    pub async fn health(&self) -> HealthReport {
        let engine = self.engine.get();
        let transports = self.ctx.transports();
        let probes = transports.iter().map(|t| {
            let name = t.name().to_owned();
            let fut = t.health();
            async move {
                let status = tokio::time::timeout(TRANSPORT_PROBE_TIMEOUT, fut)
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("no answer within {TRANSPORT_PROBE_TIMEOUT:?}"))
                    });
                TransportHealth { name, status }
            }
        });
        let engine_health = async {
            match &engine {
                Some(e) => Some(e.health().await),
                None => None,
            }
        };
        let (transports, engine) = tokio::join!(join_all(probes), engine_health);
        let engine = engine.filter(|e| e.running);
        let stopping = self.ctx.stop_token().is_cancelled();
        let live = engine
            .as_ref()
            .is_none_or(|e| e.subscribers.iter().all(|s| s.state != LoopState::Failed));
        let ready = !stopping
            && engine.as_ref().is_some_and(EngineHealth::is_ready)
            && transports.iter().all(|t| t.status.is_ok());
        HealthReport {
            live,
            ready,
            stopping,
            engine,
            transports,
        }
    }

    /// Liveness only, without a query: the body of `/healthz`.
    async fn liveness(&self) -> (bool, Value) {
        let stopping = self.ctx.stop_token().is_cancelled();
        let Some(engine) = self.engine.get() else {
            return (
                true,
                json!({"status": "ok", "live": true, "stopping": stopping}),
            );
        };
        let subs = engine.loop_health().await;
        let live = subs.iter().all(|s| s.state != LoopState::Failed);
        let body = json!({
            "status": if live { "ok" } else { "unavailable" },
            "live": live,
            "stopping": stopping,
            "subscribers": subscribers_json(&subs),
        });
        (live, body)
    }
}

/// What the App keeps for health and metrics: the running engine, the
/// health endpoint's address, the metrics naming to set at `run`.
#[derive(Debug, Default)]
pub(crate) struct Ops {
    pub(crate) slot: EngineSlot,
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) naming: Option<crate::instrument::MetricsNaming>,
}

/// The health endpoint's task; stops serving when dropped.
#[derive(Debug)]
pub(crate) struct Server(tokio::task::JoinHandle<()>);

impl Server {
    /// Binds `addr` (a port in use fails `App::run` at once) and serves.
    pub(crate) async fn start(addr: SocketAddr, handle: AppHandle) -> Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            Error::config(format!(
                "cannot start the health endpoint on {addr}: {e} (is the port free?)"
            ))
        })?;
        tracing::info!(%addr, "health endpoint: GET /healthz (liveness), GET /readyz (readiness)");
        Ok(Self(tokio::spawn(serve(listener, handle))))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `/healthz` and `/readyz` on `listener` until the task is aborted.
async fn serve(listener: TcpListener, handle: AppHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            // A client that sends nothing does not hold a task forever.
            let _ = tokio::time::timeout(Duration::from_secs(30), respond(stream, handle)).await;
        });
    }
}

/// One HTTP/1.x request: reads its head, answers, closes.
async fn respond(mut stream: TcpStream, handle: AppHandle) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let (code, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz" | "/livez") => {
            let (live, body) = handle.liveness().await;
            (if live { 200 } else { 503 }, body)
        }
        ("GET" | "HEAD", "/readyz") => {
            let report = handle.health().await;
            (if report.ready { 200 } else { 503 }, report.to_json())
        }
        ("GET" | "HEAD", _) => (404, json!({"error": "not found: try /healthz or /readyz"})),
        _ => (405, json!({"error": "method not allowed"})),
    };
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// The context's stop token and the handle of the slot, for `App`.
pub(crate) fn handle(ctx: &AppContext, engine: &EngineSlot) -> AppHandle {
    AppHandle {
        ctx: ctx.clone(),
        engine: engine.clone(),
    }
}
