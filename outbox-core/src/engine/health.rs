//! What a running engine reports about itself ([`Engine::health`]): each
//! subscriber's loops, the LISTEN connection, the database.

use std::sync::Arc;
use std::time::Duration;

use super::{Engine, SubRuntime};
use crate::engine::subscriber::ClaimMode;

/// The longest [`Engine::health`] waits for the database (`SELECT 1`).
pub const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The state of one subscriber's loops (fetch or lot loops, workers, acker,
/// lease heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoopState {
    /// Every loop runs.
    Running,
    /// At least one loop ended while the engine runs (it panicked: the
    /// loops only end when the engine stops). The subscriber is degraded:
    /// restart the process (the liveness probe fails).
    Failed,
    /// The engine is not running.
    Stopped,
}

impl LoopState {
    /// `running`, `failed`, `stopped` (the JSON body of the probes).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// One subscriber in an [`EngineHealth`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriberHealth {
    /// The subscriber's name.
    pub name: String,
    /// The queues it serves.
    pub queues: Vec<String>,
    /// How it claims rows.
    pub claim_mode: ClaimMode,
    /// Its loops, as a whole.
    pub state: LoopState,
    /// Loops alive (fetch or lot loops, workers, acker, lease heartbeat).
    pub loops_running: usize,
    /// Loops started.
    pub loops_total: usize,
}

/// The state of the engine's LISTEN connection (the NOTIFY wake-ups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenState {
    /// Not connected yet (the engine just started).
    Connecting,
    /// Listening: a publish wakes the subscribers at once.
    Connected,
    /// The connection failed or was lost: the subscribers poll (between
    /// `min_fetch_interval` and `max_fetch_interval`) while it reconnects.
    Polling,
    /// No LISTEN ([`Engine::without_listen`], the in-memory backend, or the
    /// engine is not running).
    Off,
}

impl ListenState {
    /// `connecting`, `connected`, `polling`, `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Polling => "polling",
            Self::Off => "off",
        }
    }
}

/// The LISTEN connection in an [`EngineHealth`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenHealth {
    /// Connected, polling meanwhile, or off.
    pub state: ListenState,
    /// The server process of the connection (`pg_backend_pid()`) while
    /// connected: the one to find in `pg_stat_activity`.
    pub backend_pid: Option<i32>,
    /// Why it is not connected (the last error), while polling.
    pub error: Option<String>,
    /// How many times the connection was re-established after it had
    /// worked.
    pub reconnects: u64,
}

impl ListenHealth {
    pub(crate) fn off() -> Self {
        Self {
            state: ListenState::Off,
            backend_pid: None,
            error: None,
            reconnects: 0,
        }
    }
}

/// Shared between the LISTEN loop (writer) and [`Engine::health`]: the
/// report, and whether a connection ever worked (a reconnect is counted
/// only after one did).
#[derive(Debug)]
pub(crate) struct ListenStatus(std::sync::Mutex<(ListenHealth, bool)>);

impl ListenStatus {
    pub(crate) fn new() -> Arc<Self> {
        let h = ListenHealth {
            state: ListenState::Connecting,
            ..ListenHealth::off()
        };
        Arc::new(Self(std::sync::Mutex::new((h, false))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (ListenHealth, bool)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Listening on the server process `pid`.
    pub(crate) fn connected(&self, pid: Option<i32>) {
        let (h, worked) = &mut *self.lock();
        let replaced =
            h.state == ListenState::Polling || h.backend_pid.is_some_and(|p| Some(p) != pid);
        if *worked && replaced {
            h.reconnects += 1;
        }
        *worked = true;
        h.state = ListenState::Connected;
        h.backend_pid = pid;
        h.error = None;
    }

    /// Not listening (never connected, or lost): `error` says why.
    pub(crate) fn down(&self, error: String) {
        let (h, _) = &mut *self.lock();
        h.state = ListenState::Polling;
        h.backend_pid = None;
        h.error = Some(error);
    }

    pub(crate) fn get(&self) -> ListenHealth {
        self.lock().0.clone()
    }
}

/// What [`Engine::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineHealth {
    /// Whether the engine runs (started, not stopped).
    pub running: bool,
    /// `SELECT 1` on the broker's pool within
    /// [`DATABASE_PROBE_TIMEOUT`]: `Err` says why not. `Ok` on the
    /// in-memory backend.
    pub database: Result<(), String>,
    /// The LISTEN connection.
    pub listen: ListenHealth,
    /// Each subscriber, in registration order.
    pub subscribers: Vec<SubscriberHealth>,
}

impl EngineHealth {
    /// Liveness: the engine runs and no subscriber's loop died. A database
    /// outage or a lost LISTEN connection does not make it fail (the loops
    /// reconnect by themselves; a restart would not help).
    pub fn is_live(&self) -> bool {
        self.running
            && self
                .subscribers
                .iter()
                .all(|s| s.state == LoopState::Running)
    }

    /// Readiness: [`is_live`](Self::is_live) and the database answers.
    /// A LISTEN connection that is down does not count (the subscribers
    /// poll meanwhile).
    pub fn is_ready(&self) -> bool {
        self.is_live() && self.database.is_ok()
    }
}

impl SubRuntime {
    /// Every task of this subscriber that must run while the engine runs:
    /// fetch loops, workers, the acker and the lease heartbeat.
    pub(super) fn loops(&self) -> impl Iterator<Item = &tokio::task::JoinHandle<()>> {
        self.fetch
            .iter()
            .chain(&self.workers)
            .chain(&self.acker)
            .chain(self.heartbeat.as_ref().map(|(_, t)| t))
    }

    fn health(&self, running: bool) -> SubscriberHealth {
        let sub = &self.shared.sub;
        let loops: Vec<bool> = self.loops().map(|t| !t.is_finished()).collect();
        let alive = loops.iter().filter(|a| **a).count();
        SubscriberHealth {
            name: sub.name().to_owned(),
            queues: sub.queues().to_vec(),
            claim_mode: sub.options().get_claim_mode(),
            state: if !running {
                LoopState::Stopped
            } else if alive == loops.len() {
                LoopState::Running
            } else {
                LoopState::Failed
            },
            loops_running: alive,
            loops_total: loops.len(),
        }
    }
}

impl Engine {
    /// What the engine is doing: each subscriber's loops (running, or
    /// failed: a loop died), the LISTEN connection (connected with its
    /// server process id, or polling with the last error), and whether the
    /// database answers `SELECT 1` on the broker's pool (within
    /// [`DATABASE_PROBE_TIMEOUT`]). [`ping`](Self::ping) is the yes/no
    /// summary; `App` serves this as `/healthz` and `/readyz`
    /// ([`App::health_endpoint`](crate::App::health_endpoint)).
    ///
    /// ```no_run
    /// # async fn demo(engine: outbox_core::Engine) {
    /// let health = engine.health().await;
    /// for s in &health.subscribers {
    ///     println!("{}: {} ({}/{} loops)", s.name, s.state.as_str(), s.loops_running, s.loops_total);
    /// }
    /// println!("LISTEN: {}", health.listen.state.as_str());
    /// assert!(health.is_ready());
    /// # }
    /// ```
    pub async fn health(&self) -> EngineHealth {
        let (running, subscribers, listen) = self.snapshot().await;
        let database = self.probe_database(DATABASE_PROBE_TIMEOUT).await;
        EngineHealth {
            running,
            database,
            listen,
            subscribers,
        }
    }

    /// The subscribers' loops only (no query): what liveness needs.
    pub(crate) async fn loop_health(&self) -> Vec<SubscriberHealth> {
        self.snapshot().await.1
    }

    /// Whether it runs, its subscribers, its LISTEN connection.
    async fn snapshot(&self) -> (bool, Vec<SubscriberHealth>, ListenHealth) {
        {
            let state = self.state.lock().await;
            match &*state {
                None => (
                    false,
                    self.subscribers
                        .iter()
                        .map(|s| SubscriberHealth {
                            name: s.name().to_owned(),
                            queues: s.queues().to_vec(),
                            claim_mode: s.options().get_claim_mode(),
                            state: LoopState::Stopped,
                            loops_running: 0,
                            loops_total: 0,
                        })
                        .collect(),
                    ListenHealth::off(),
                ),
                Some(r) => {
                    let mut listen = r
                        .listen_status
                        .as_ref()
                        .map_or_else(ListenHealth::off, |s| s.get());
                    if r.listener.as_ref().is_some_and(|(_, t)| t.is_finished()) {
                        listen.state = ListenState::Polling;
                        listen.backend_pid = None;
                        listen.error = Some("the LISTEN loop ended".to_owned());
                    }
                    (
                        true,
                        r.subs.iter().map(|s| s.health(true)).collect(),
                        listen,
                    )
                }
            }
        }
    }

    /// `SELECT 1` on the broker's pool within `timeout`.
    pub(crate) async fn probe_database(&self, timeout: Duration) -> Result<(), String> {
        let Ok(pool) = self.broker.backend().pool_for("health") else {
            return Ok(()); // an in-process store always answers
        };
        let probe = sqlx::query("SELECT 1").execute(pool);
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("PostgreSQL does not answer: {e}")),
            Err(_) => Err(format!(
                "PostgreSQL did not answer `SELECT 1` within {timeout:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_count_only_replacements_of_a_connection_that_worked() {
        let s = ListenStatus::new();
        assert_eq!(s.get().state, ListenState::Connecting);
        s.down("refused".into());
        assert_eq!(s.get().state, ListenState::Polling);
        assert_eq!(s.get().error.as_deref(), Some("refused"));
        s.connected(Some(10));
        let h = s.get();
        assert_eq!(
            (h.state, h.backend_pid, h.reconnects),
            (ListenState::Connected, Some(10), 0)
        );
        assert_eq!(h.error, None);
        s.down("lost".into());
        assert_eq!(s.get().backend_pid, None);
        s.connected(Some(11));
        assert_eq!(s.get().reconnects, 1);
        // Replaced without a reported gap (sqlx reconnected by itself).
        s.connected(Some(12));
        assert_eq!(s.get().reconnects, 2);
        s.connected(Some(12));
        assert_eq!(s.get().reconnects, 2);
    }
}
