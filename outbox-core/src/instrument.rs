//! The recording side of [`crate::telemetry`]: metric names, the per
//! subscriber handles and the functions the layers call. A leaf module: the
//! public `telemetry` module re-exports what users see.

use std::collections::HashMap;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};

use crate::error::{BoxError, DecodeError, Error, HandlerPanic};

/// Metric names (stable; part of the public contract).
pub mod names {
    /// See the [module docs](super).
    pub const PUBLISHED: &str = "outbox_published_total";
    /// See the [module docs](super).
    pub const FETCHED: &str = "outbox_fetched_total";
    /// See the [module docs](super).
    pub const FETCH_BATCHES: &str = "outbox_fetch_batches_total";
    /// See the [module docs](super).
    pub const DISPATCHED: &str = "outbox_dispatched_total";
    /// See the [module docs](super).
    pub const ACKED: &str = "outbox_acked_total";
    /// See the [module docs](super).
    pub const NACKED_RETRIED: &str = "outbox_nacked_retried_total";
    /// See the [module docs](super).
    pub const NACKED_TERMINAL: &str = "outbox_nacked_terminal_total";
    /// See the [module docs](super).
    pub const DLQ_WRITTEN: &str = "outbox_dlq_written_total";
    /// See the [module docs](super).
    pub const LEASE_LOST: &str = "outbox_lease_lost_total";
    /// See the [module docs](super).
    pub const DISPATCH_ABANDONED: &str = "outbox_dispatch_abandoned_total";
    /// See the [module docs](super).
    pub const DRAIN_TIMEOUT: &str = "outbox_drain_timeout_total";
    /// See the [module docs](super).
    pub const HANDLER_DURATION: &str = "outbox_handler_duration_seconds";
    /// See the [module docs](super).
    pub const TRANSPORT_DURATION: &str = "outbox_transport_publish_duration_seconds";
    /// See the [module docs](super).
    pub const READY_ROWS: &str = "outbox_ready_rows";
    /// See the [module docs](super).
    pub const SCHEDULED_ROWS: &str = "outbox_scheduled_rows";
    /// See the [module docs](super).
    pub const LEASED_ROWS: &str = "outbox_leased_rows";
    /// See the [module docs](super).
    pub const OLDEST_READY_AGE: &str = "outbox_oldest_ready_age_seconds";
    /// See the [module docs](super).
    pub const DEAD_LETTER_ROWS: &str = "outbox_dead_letter_rows";
}

use names::*;

/// Classifies a handler error for the `error_kind` label.
pub(crate) fn error_kind(e: Option<&BoxError>) -> &'static str {
    let Some(e) = e else { return "none" };
    if e.is::<DecodeError>() {
        return "decode";
    }
    if e.is::<HandlerPanic>() {
        return "panic";
    }
    match e.downcast_ref::<Error>() {
        Some(Error::Decode(_)) => "decode",
        Some(Error::Transport { .. }) => "transport",
        _ => "handler",
    }
}

/// Installs a Prometheus exporter serving `GET /metrics` on `addr` as the
/// process-wide metrics recorder (feature `prometheus`). Call it once, from
/// within the Tokio runtime, before the engine starts.
#[cfg(feature = "prometheus")]
pub fn install_prometheus(addr: std::net::SocketAddr) -> crate::error::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| {
            Error::config(format!(
                "cannot start the Prometheus exporter on {addr}: {e} (is the port free, and is no other metrics recorder installed?)"
            ))
        })
}

pub(crate) fn published(queue: &str, status: &'static str, count: u64) {
    counter!(PUBLISHED, "queue" => queue.to_owned(), "status" => status).increment(count);
}

pub(crate) fn transport_duration(transport: &str, destination: &str, ok: bool, d: Duration) {
    histogram!(
        TRANSPORT_DURATION,
        "transport" => transport.to_owned(),
        "destination" => destination.to_owned(),
        "status" => if ok { "success" } else { "error" }
    )
    .record(d.as_secs_f64());
}

/// Sets the sampled gauges of `queue` (what the engine's sampler reads every
/// [`gauge_interval`](crate::Engine::gauge_interval)).
pub(crate) fn queue_gauges(
    queue: &str,
    ready: u64,
    scheduled: u64,
    leased: u64,
    oldest_ready_age: Option<Duration>,
    dead_letters: u64,
) {
    let q = queue.to_owned();
    metrics::gauge!(READY_ROWS, "queue" => q.clone()).set(ready as f64);
    metrics::gauge!(SCHEDULED_ROWS, "queue" => q.clone()).set(scheduled as f64);
    metrics::gauge!(LEASED_ROWS, "queue" => q.clone()).set(leased as f64);
    metrics::gauge!(OLDEST_READY_AGE, "queue" => q.clone())
        .set(oldest_ready_age.map_or(0.0, |d| d.as_secs_f64()));
    metrics::gauge!(DEAD_LETTER_ROWS, "queue" => q).set(dead_letters as f64);
}

/// Pre-registered handles of one queue of one subscriber (the hot path).
#[derive(Debug)]
struct QueueHandles {
    dispatched: Counter,
    acked: Counter,
    duration: Histogram,
}

/// The metric handles of one subscriber.
#[derive(Debug)]
pub(crate) struct SubMetrics {
    subscriber: String,
    fetched: Counter,
    batches_empty: Counter,
    batches_non_empty: Counter,
    queues: HashMap<String, QueueHandles>,
}

impl SubMetrics {
    pub(crate) fn new(subscriber: &str, queues: &[String]) -> Self {
        let s = subscriber.to_owned();
        Self {
            fetched: counter!(FETCHED, "subscriber" => s.clone()),
            batches_empty: counter!(FETCH_BATCHES, "subscriber" => s.clone(), "non_empty" => "false"),
            batches_non_empty: counter!(FETCH_BATCHES, "subscriber" => s.clone(), "non_empty" => "true"),
            queues: queues
                .iter()
                .map(|q| {
                    let labels = [("queue", q.clone()), ("subscriber", s.clone())];
                    (
                        q.clone(),
                        QueueHandles {
                            dispatched: counter!(DISPATCHED, &labels),
                            acked: counter!(ACKED, &labels),
                            duration: histogram!(HANDLER_DURATION, &labels),
                        },
                    )
                })
                .collect(),
            subscriber: s,
        }
    }

    pub(crate) fn fetched(&self, n: usize) {
        if n == 0 {
            self.batches_empty.increment(1);
        } else {
            self.batches_non_empty.increment(1);
            self.fetched.increment(n as u64);
        }
    }

    fn queue(&self, q: &str) -> Option<&QueueHandles> {
        self.queues.get(q)
    }

    pub(crate) fn dispatched(&self, q: &str) {
        if let Some(h) = self.queue(q) {
            h.dispatched.increment(1);
        }
    }

    fn duration(&self, q: &str, d: Option<Duration>) {
        if let (Some(h), Some(d)) = (self.queue(q), d) {
            h.duration.record(d.as_secs_f64());
        }
    }

    pub(crate) fn acked(&self, q: &str, d: Option<Duration>) {
        if let Some(h) = self.queue(q) {
            h.acked.increment(1);
        }
        self.duration(q, d);
    }

    pub(crate) fn retried(&self, q: &str, kind: &'static str, d: Option<Duration>) {
        counter!(NACKED_RETRIED, "queue" => q.to_owned(), "subscriber" => self.subscriber.clone(), "error_kind" => kind)
            .increment(1);
        self.duration(q, d);
    }

    pub(crate) fn terminal(
        &self,
        q: &str,
        reason: &'static str,
        kind: &'static str,
        d: Option<Duration>,
        dead_lettered: bool,
    ) {
        counter!(NACKED_TERMINAL, "queue" => q.to_owned(), "subscriber" => self.subscriber.clone(),
            "reason" => reason, "error_kind" => kind)
        .increment(1);
        if dead_lettered {
            counter!(DLQ_WRITTEN, "queue" => q.to_owned(), "subscriber" => self.subscriber.clone(),
                "failure_reason" => reason)
            .increment(1);
        }
        self.duration(q, d);
    }

    pub(crate) fn lease_lost(&self, q: &str, phase: &'static str) {
        counter!(LEASE_LOST, "queue" => q.to_owned(), "subscriber" => self.subscriber.clone(), "phase" => phase)
            .increment(1);
    }

    pub(crate) fn abandoned(&self, q: &str) {
        counter!(DISPATCH_ABANDONED, "queue" => q.to_owned(), "subscriber" => self.subscriber.clone())
            .increment(1);
    }

    pub(crate) fn drain_timeout(&self) {
        counter!(DRAIN_TIMEOUT, "subscriber" => self.subscriber.clone()).increment(1);
    }
}
