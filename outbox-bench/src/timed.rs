//! [`Timed`]: a [`Transport`] wrapper (for every bus the relay scenarios
//! drive) that timestamps every confirmed publish, and the log it keeps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use outbox_core::{BoxError, OUTBOX_ID, Outgoing, Transport};

use crate::drain::Progress;

/// Header carrying the row's `created_at` (µs since the epoch) to the
/// transport, for the lag of the steady-state relay.
pub(crate) const CREATED_HEADER: &str = "x-bench-created-us";

/// One confirmed publish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Confirm {
    pub(crate) id: i64,
    pub(crate) started: Instant,
    pub(crate) confirmed: Instant,
    /// Now minus the row's `created_at` at confirmation, ms (when the handler
    /// sent [`CREATED_HEADER`]).
    pub(crate) lag_ms: Option<f64>,
}

/// Shared by the transport wrapper and the scenario.
#[derive(Debug)]
pub(crate) struct Confirms {
    pub(crate) progress: Arc<Progress>,
    pub(crate) failed: AtomicU64,
    pub(crate) log: Option<Mutex<Vec<Confirm>>>,
}

/// A transport (outbox-kafka's, or another bus's), timestamping each
/// confirmation. Publishes are passed through untouched; the wrapper costs
/// two clock reads and a counter.
#[derive(Clone)]
pub(crate) struct Timed {
    inner: Arc<dyn Transport>,
    shared: Arc<Confirms>,
}

impl std::fmt::Debug for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed")
            .field("inner", &self.inner.name())
            .finish()
    }
}

impl Timed {
    pub(crate) fn new(inner: Arc<dyn Transport>, shared: Arc<Confirms>) -> Self {
        Self { inner, shared }
    }
}

impl Transport for Timed {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let shared = self.shared.clone();
        let started = Instant::now();
        let logged = shared.log.is_some().then(|| {
            let id = msg
                .headers
                .get(OUTBOX_ID)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(-1);
            let created = msg
                .headers
                .get(CREATED_HEADER)
                .and_then(|v| v.parse::<i64>().ok());
            (id, created)
        });
        let fut = self.inner.publish(msg);
        Box::pin(async move {
            let res = fut.await;
            if res.is_ok() {
                shared.progress.hit();
                if let (Some(log), Some((id, created))) = (&shared.log, logged) {
                    let lag_ms = created
                        .map(|us| (chrono::Utc::now().timestamp_micros() - us) as f64 / 1000.0);
                    let c = Confirm {
                        id,
                        started,
                        confirmed: Instant::now(),
                        lag_ms,
                    };
                    if let Ok(mut l) = log.lock() {
                        l.push(c);
                    }
                }
            } else {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            res
        })
    }

    fn max_publish_time(&self) -> Option<Duration> {
        self.inner.max_publish_time()
    }

    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        self.inner.close()
    }
}

/// The confirmation log as a map from row id.
pub(crate) fn by_id(log: &[Confirm]) -> HashMap<i64, Confirm> {
    log.iter().map(|c| (c.id, *c)).collect()
}
