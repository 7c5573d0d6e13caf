//! The recording side of [`crate::telemetry`]: metric names, the per
//! subscriber handles and the functions the layers call. A leaf module: the
//! public `telemetry` module re-exports what users see.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};

use crate::error::{BoxError, DecodeError, Error, HandlerPanic};

/// Metric names (stable; part of the public contract).
pub mod names {
    /// See the [module docs](crate::telemetry).
    pub const PUBLISHED: &str = "outbox_published_total";
    /// See the [module docs](crate::telemetry).
    pub const FETCHED: &str = "outbox_fetched_total";
    /// See the [module docs](crate::telemetry).
    pub const FETCH_BATCHES: &str = "outbox_fetch_batches_total";
    /// See the [module docs](crate::telemetry).
    pub const DISPATCHED: &str = "outbox_dispatched_total";
    /// See the [module docs](crate::telemetry).
    pub const ACKED: &str = "outbox_acked_total";
    /// See the [module docs](crate::telemetry).
    pub const NACKED_RETRIED: &str = "outbox_nacked_retried_total";
    /// See the [module docs](crate::telemetry).
    pub const NACKED_TERMINAL: &str = "outbox_nacked_terminal_total";
    /// See the [module docs](crate::telemetry).
    pub const DLQ_WRITTEN: &str = "outbox_dlq_written_total";
    /// See the [module docs](crate::telemetry).
    pub const LEASE_LOST: &str = "outbox_lease_lost_total";
    /// See the [module docs](crate::telemetry).
    pub const DISPATCH_ABANDONED: &str = "outbox_dispatch_abandoned_total";
    /// See the [module docs](crate::telemetry).
    pub const DRAIN_TIMEOUT: &str = "outbox_drain_timeout_total";
    /// See the [module docs](crate::telemetry).
    pub const HANDLER_DURATION: &str = "outbox_handler_duration_seconds";
    /// See the [module docs](crate::telemetry).
    pub const TRANSPORT_DURATION: &str = "outbox_transport_publish_duration_seconds";
    /// See the [module docs](crate::telemetry).
    pub const READY_ROWS: &str = "outbox_ready_rows";
    /// See the [module docs](crate::telemetry).
    pub const SCHEDULED_ROWS: &str = "outbox_scheduled_rows";
    /// See the [module docs](crate::telemetry).
    pub const LEASED_ROWS: &str = "outbox_leased_rows";
    /// See the [module docs](crate::telemetry).
    pub const OLDEST_READY_AGE: &str = "outbox_oldest_ready_age_seconds";
    /// See the [module docs](crate::telemetry).
    pub const DEAD_LETTER_ROWS: &str = "outbox_dead_letter_rows";

    /// FastStream's names ([`MetricsNaming::FastStream`](crate::telemetry::MetricsNaming::FastStream)),
    /// without the `faststream_` prefix.
    pub mod faststream {
        /// Rows handed to a handler (`dispatched`).
        pub const RECEIVED: &str = "received_messages_total";
        /// Handler runs in flight (a gauge).
        pub const IN_PROCESS: &str = "received_messages_in_process";
        /// Closed deliveries by `status` (`acked`, `nacked`, `error`).
        pub const PROCESSED: &str = "received_processed_messages_total";
        /// Handler run time.
        pub const PROCESSED_DURATION: &str = "received_processed_messages_duration_seconds";
        /// Handler errors by `exception_type`.
        pub const PROCESSED_EXCEPTIONS: &str = "received_processed_messages_exceptions_total";
        /// Rows published by `status` (`success`, `error`).
        pub const PUBLISHED: &str = "published_messages_total";
        /// Claim statements by `non_empty`.
        pub const FETCH_BATCHES: &str = "outbox_fetch_batches_total";
        /// Terminal failures by `reason`.
        pub const TERMINAL: &str = "outbox_terminal_total";
        /// Writes that found the lease gone, by `phase`.
        pub const LEASE_LOST: &str = "outbox_lease_lost_total";
        /// Rows moved to the dead-letter table, by `reason`.
        pub const DLQ_WRITTEN: &str = "outbox_dlq_written_total";
        /// Graceful stops that hit the timeout.
        pub const DRAIN_TIMEOUT: &str = "outbox_drain_timeout_total";
    }
}

/// FastStream's `received_processed_messages_duration_seconds` buckets.
#[cfg(feature = "prometheus")]
pub(crate) const FASTSTREAM_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// How the metrics are named (see [`crate::telemetry`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricsNaming {
    /// The `outbox_*` names of the [table](crate::telemetry).
    #[default]
    Outbox,
    /// The names and labels of the Python package's `PrometheusRecorder`
    /// (prefix `faststream`): `faststream_received_messages_total`,
    /// `faststream_received_processed_messages_total{status}`,
    /// `faststream_outbox_fetch_batches_total{non_empty}`, … with the labels
    /// `app_name`, `broker="outbox"` and `handler` (the subscriber's name)
    /// on consume families, `destination` (the queue) on publish families.
    /// Metrics FastStream has no family for (the sampled gauges, the
    /// transport's publish duration, rows fetched, abandoned outcomes) keep
    /// their `outbox_*` names.
    FastStream {
        /// The `app_name` label (FastStream's `app_name` argument).
        app_name: String,
    },
}

impl MetricsNaming {
    /// FastStream's names, with `app_name`.
    pub fn faststream(app_name: impl Into<String>) -> Self {
        Self::FastStream {
            app_name: app_name.into(),
        }
    }
}

static NAMING: OnceLock<MetricsNaming> = OnceLock::new();

/// Chooses the metric names for the whole process (the metrics recorder is
/// process-wide too). Call it once, before anything is published or the
/// engine starts ([`App::metrics_naming`](crate::App::metrics_naming) does,
/// first thing in `run`); metrics recorded before keep the `outbox_*` names.
/// Setting the naming already in force again is fine; another one fails.
pub fn set_metrics_naming(naming: MetricsNaming) -> crate::error::Result<()> {
    let current = NAMING.get_or_init(|| naming.clone());
    if *current == naming {
        Ok(())
    } else {
        Err(Error::config(format!(
            "the metrics naming is already {current:?} in this process; it cannot become \
             {naming:?} (set it once, before the engine starts)"
        )))
    }
}

fn naming() -> &'static MetricsNaming {
    static DEFAULT: MetricsNaming = MetricsNaming::Outbox;
    NAMING.get().unwrap_or(&DEFAULT)
}

/// Every metric the crate records, whatever its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Published,
    TransportDuration,
    Fetched,
    FetchBatches,
    Dispatched,
    InProcess,
    Acked,
    Retried,
    Terminal,
    TerminalProcessed,
    Exception,
    DlqWritten,
    LeaseLost,
    LeaseLostProcessed,
    Abandoned,
    DrainTimeout,
    HandlerDuration,
}

/// One metric's names: the `outbox_*` family, and FastStream's.
struct Family {
    /// The `outbox_*` name; `None`: only FastStream has it.
    outbox: Option<&'static str>,
    /// FastStream's family; `None`: it keeps the `outbox_*` name.
    faststream: Option<FsFamily>,
}

/// A FastStream family: its name (after `faststream_`), whether it carries
/// the consume labels (`handler`) or the publish labels (`destination`),
/// its fixed labels, and the call's labels it keeps (`(ours, theirs)`).
struct FsFamily {
    name: &'static str,
    consume: bool,
    fixed: &'static [(&'static str, &'static str)],
    keep: &'static [(&'static str, &'static str)],
}

const fn fs(
    name: &'static str,
    consume: bool,
    fixed: &'static [(&'static str, &'static str)],
    keep: &'static [(&'static str, &'static str)],
) -> Option<FsFamily> {
    Some(FsFamily {
        name,
        consume,
        fixed,
        keep,
    })
}

/// THE table: every event's name in each naming.
fn family(e: Event) -> Family {
    use names::faststream as f;
    let (outbox, faststream) = match e {
        Event::Published => (
            Some(PUBLISHED),
            fs(f::PUBLISHED, false, &[], &[("status", "status")]),
        ),
        Event::TransportDuration => (Some(TRANSPORT_DURATION), None),
        Event::Fetched => (Some(FETCHED), None),
        Event::FetchBatches => (
            Some(FETCH_BATCHES),
            fs(f::FETCH_BATCHES, true, &[], &[("non_empty", "non_empty")]),
        ),
        Event::Dispatched => (Some(DISPATCHED), fs(f::RECEIVED, true, &[], &[])),
        Event::InProcess => (None, fs(f::IN_PROCESS, true, &[], &[])),
        Event::Acked => (
            Some(ACKED),
            fs(f::PROCESSED, true, &[("status", "acked")], &[]),
        ),
        Event::Retried => (
            Some(NACKED_RETRIED),
            fs(f::PROCESSED, true, &[("status", "nacked")], &[]),
        ),
        Event::Terminal => (
            Some(NACKED_TERMINAL),
            fs(f::TERMINAL, true, &[], &[("reason", "reason")]),
        ),
        Event::TerminalProcessed => (None, fs(f::PROCESSED, true, &[("status", "nacked")], &[])),
        Event::Exception => (
            None,
            fs(
                f::PROCESSED_EXCEPTIONS,
                true,
                &[],
                &[("error_kind", "exception_type")],
            ),
        ),
        Event::DlqWritten => (
            Some(DLQ_WRITTEN),
            fs(f::DLQ_WRITTEN, true, &[], &[("failure_reason", "reason")]),
        ),
        Event::LeaseLost => (
            Some(LEASE_LOST),
            fs(f::LEASE_LOST, true, &[], &[("phase", "phase")]),
        ),
        Event::LeaseLostProcessed => (None, fs(f::PROCESSED, true, &[("status", "error")], &[])),
        Event::Abandoned => (Some(DISPATCH_ABANDONED), None),
        Event::DrainTimeout => (Some(DRAIN_TIMEOUT), fs(f::DRAIN_TIMEOUT, true, &[], &[])),
        Event::HandlerDuration => (
            Some(HANDLER_DURATION),
            fs(f::PROCESSED_DURATION, true, &[], &[]),
        ),
    };
    Family { outbox, faststream }
}

/// The name and labels of `e` recorded with `labels` in the current naming
/// (`None`: not recorded in it). `labels` are the `outbox_*` labels.
fn key(e: Event, labels: &[(&'static str, &str)]) -> Option<(String, Vec<Label>)> {
    let fam = family(e);
    let own = || {
        fam.outbox.map(|n| {
            let l = labels
                .iter()
                .map(|(k, v)| Label::new(*k, (*v).to_owned()))
                .collect();
            (n.to_owned(), l)
        })
    };
    let MetricsNaming::FastStream { app_name } = naming() else {
        return own();
    };
    let Some(f) = fam.faststream else {
        return own();
    };
    let get = |k: &str| {
        labels
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    };
    let mut out = vec![
        Label::new("app_name", app_name.clone()),
        Label::new("broker", "outbox"),
    ];
    if f.consume {
        out.push(Label::new("handler", get("subscriber").unwrap_or_default()));
    } else {
        out.push(Label::new("destination", get("queue").unwrap_or_default()));
    }
    out.extend(f.fixed.iter().map(|(k, v)| Label::new(*k, *v)));
    out.extend(
        f.keep
            .iter()
            .filter_map(|(ours, theirs)| get(ours).map(|v| Label::new(*theirs, v))),
    );
    Some((format!("faststream_{}", f.name), out))
}

/// The counter of `e` with `labels` (a no-op one if the naming has none).
fn counter(e: Event, labels: &[(&'static str, &str)]) -> Counter {
    match key(e, labels) {
        Some((name, labels)) => metrics::counter!(name, labels),
        None => Counter::noop(),
    }
}

fn histogram(e: Event, labels: &[(&'static str, &str)]) -> Histogram {
    match key(e, labels) {
        Some((name, labels)) => metrics::histogram!(name, labels),
        None => Histogram::noop(),
    }
}

fn gauge(e: Event, labels: &[(&'static str, &str)]) -> Gauge {
    match key(e, labels) {
        Some((name, labels)) => metrics::gauge!(name, labels),
        None => Gauge::noop(),
    }
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
    let mut builder =
        metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr);
    if matches!(naming(), MetricsNaming::FastStream { .. }) {
        // FastStream's histogram buckets (else the exporter renders a
        // summary, which a dashboard's histogram_quantile cannot read).
        let name = format!("faststream_{}", names::faststream::PROCESSED_DURATION);
        builder = builder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name),
                FASTSTREAM_DURATION_BUCKETS,
            )
            .map_err(|e| Error::config(format!("cannot set the histogram buckets: {e}")))?;
    }
    builder
        .install()
        .map_err(|e| {
            Error::config(format!(
                "cannot start the Prometheus exporter on {addr}: {e} (is the port free, and is no other metrics recorder installed?)"
            ))
        })
}

pub(crate) fn published(queue: &str, status: &'static str, count: u64) {
    counter(Event::Published, &[("queue", queue), ("status", status)]).increment(count);
}

pub(crate) fn transport_duration(transport: &str, destination: &str, ok: bool, d: Duration) {
    let status = if ok { "success" } else { "error" };
    histogram(
        Event::TransportDuration,
        &[
            ("transport", transport),
            ("destination", destination),
            ("status", status),
        ],
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
    in_process: Gauge,
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
        let s = subscriber;
        Self {
            fetched: counter(Event::Fetched, &[("subscriber", s)]),
            batches_empty: counter(
                Event::FetchBatches,
                &[("subscriber", s), ("non_empty", "false")],
            ),
            batches_non_empty: counter(
                Event::FetchBatches,
                &[("subscriber", s), ("non_empty", "true")],
            ),
            queues: queues
                .iter()
                .map(|q| {
                    let labels = [("queue", q.as_str()), ("subscriber", s)];
                    (
                        q.clone(),
                        QueueHandles {
                            dispatched: counter(Event::Dispatched, &labels),
                            acked: counter(Event::Acked, &labels),
                            duration: histogram(Event::HandlerDuration, &labels),
                            in_process: gauge(Event::InProcess, &labels),
                        },
                    )
                })
                .collect(),
            subscriber: s.to_owned(),
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
            h.in_process.increment(1.0);
        }
    }

    /// A delivery that was dispatched closed after `d` (in the handler's
    /// time histogram; no longer in process).
    fn closed(&self, q: &str, d: Option<Duration>) {
        if let (Some(h), Some(d)) = (self.queue(q), d) {
            h.duration.record(d.as_secs_f64());
            h.in_process.decrement(1.0);
        }
    }

    fn exception(&self, q: &str, kind: &'static str) {
        if kind != "none" {
            counter(
                Event::Exception,
                &[
                    ("queue", q),
                    ("subscriber", &self.subscriber),
                    ("error_kind", kind),
                ],
            )
            .increment(1);
        }
    }

    pub(crate) fn acked(&self, q: &str, d: Option<Duration>) {
        if let Some(h) = self.queue(q) {
            h.acked.increment(1);
        }
        self.closed(q, d);
    }

    pub(crate) fn retried(&self, q: &str, kind: &'static str, d: Option<Duration>) {
        counter(
            Event::Retried,
            &[
                ("queue", q),
                ("subscriber", &self.subscriber),
                ("error_kind", kind),
            ],
        )
        .increment(1);
        self.exception(q, kind);
        self.closed(q, d);
    }

    pub(crate) fn terminal(
        &self,
        q: &str,
        reason: &'static str,
        kind: &'static str,
        d: Option<Duration>,
        dead_lettered: bool,
    ) {
        let s = self.subscriber.as_str();
        counter(
            Event::Terminal,
            &[
                ("queue", q),
                ("subscriber", s),
                ("reason", reason),
                ("error_kind", kind),
            ],
        )
        .increment(1);
        if d.is_some() {
            // A handler ran (not a row past max_deliveries): FastStream
            // counts it as a processed message, nacked.
            counter(Event::TerminalProcessed, &[("queue", q), ("subscriber", s)]).increment(1);
            self.exception(q, kind);
        }
        if dead_lettered {
            counter(
                Event::DlqWritten,
                &[("queue", q), ("subscriber", s), ("failure_reason", reason)],
            )
            .increment(1);
        }
        self.closed(q, d);
    }

    pub(crate) fn lease_lost(&self, q: &str, phase: &'static str) {
        let s = self.subscriber.as_str();
        counter(
            Event::LeaseLost,
            &[("queue", q), ("subscriber", s), ("phase", phase)],
        )
        .increment(1);
        if phase != "buffered" {
            // A dispatched delivery closed by the lost lease.
            counter(
                Event::LeaseLostProcessed,
                &[("queue", q), ("subscriber", s)],
            )
            .increment(1);
            if let Some(h) = self.queue(q) {
                h.in_process.decrement(1.0);
            }
        }
    }

    pub(crate) fn abandoned(&self, q: &str) {
        counter(
            Event::Abandoned,
            &[("queue", q), ("subscriber", &self.subscriber)],
        )
        .increment(1);
        if let Some(h) = self.queue(q) {
            h.in_process.decrement(1.0);
        }
    }

    pub(crate) fn drain_timeout(&self) {
        counter(Event::DrainTimeout, &[("subscriber", &self.subscriber)]).increment(1);
    }
}
