//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: nothing
//! is exported unless the application installs a recorder (for example
//! `metrics-exporter-prometheus`, or [`App::prometheus`](crate::App::prometheus)
//! with the `prometheus` feature).
//!
//! Every outcome metric is emitted only after its database write landed; a
//! write that lost its lease emits `outbox_lease_lost_total` instead.
//!
//! | metric | kind | labels | when |
//! |---|---|---|---|
//! | `outbox_published_total` | counter | `queue`, `status` | rows inserted by `publish*` (`status=error`: a failed insert, +1) |
//! | `outbox_fetched_total` | counter | `subscriber` | rows claimed |
//! | `outbox_fetch_batches_total` | counter | `subscriber`, `non_empty` | claim statements |
//! | `outbox_dispatched_total` | counter | `queue`, `subscriber` | handler runs started |
//! | `outbox_acked_total` | counter | `queue`, `subscriber` | rows deleted after success |
//! | `outbox_nacked_retried_total` | counter | `queue`, `subscriber`, `error_kind` | retries scheduled |
//! | `outbox_nacked_terminal_total` | counter | `queue`, `subscriber`, `reason`, `error_kind` | terminal failures written |
//! | `outbox_dlq_written_total` | counter | `queue`, `subscriber`, `failure_reason` | rows moved to the dead-letter table |
//! | `outbox_lease_lost_total` | counter | `queue`, `subscriber`, `phase` | writes that found the lease gone (`retry`, `terminal`), or rows not started because they waited in the buffer past their lease (`buffered`) |
//! | `outbox_dispatch_abandoned_total` | counter | `queue`, `subscriber` | outcomes that could not be written (left to lease expiry) |
//! | `outbox_drain_timeout_total` | counter | `subscriber` | graceful stops that hit the timeout |
//! | `outbox_handler_duration_seconds` | histogram | `queue`, `subscriber` | handler run time, on the closing write |
//! | `outbox_transport_publish_duration_seconds` | histogram | `transport`, `destination`, `status` | transport confirmation time |
//! | `outbox_ready_rows` | gauge | `queue` | sampled: unleased rows that are due |
//! | `outbox_scheduled_rows` | gauge | `queue` | sampled: unleased rows not yet due |
//! | `outbox_leased_rows` | gauge | `queue` | sampled: rows being handled |
//! | `outbox_oldest_ready_age_seconds` | gauge | `queue` | sampled: how late the oldest due row is (relay lag) |
//! | `outbox_dead_letter_rows` | gauge | `queue` | sampled: rows in the dead-letter table |
//!
//! `error_kind` is `decode` (the payload did not decode), `panic`, `transport`
//! (a `#[publish_to]` publish failed), `handler` (any other error) or `none`
//! (a `nack()`/`reject()` without an error).
//!
//! With [`MetricsNaming::FastStream`] ([`App::metrics_naming`](crate::App::metrics_naming)
//! or [`set_metrics_naming`]) the same events are exported under the names
//! and labels of the Python package's Prometheus recorder
//! (`faststream_received_processed_messages_total{app_name, broker="outbox",
//! handler, status}`, `faststream_outbox_dlq_written_total{…, reason}`, …), so
//! that its dashboards keep working; the families it has no equivalent for
//! keep the names above. The mapping is in docs/operations.md, "Metrics for
//! FastStream dashboards".
//!
//! Besides the metrics, every subscriber logs an **activity summary** at
//! INFO (target [`SUMMARY_TARGET`]), every [`DEFAULT_SUMMARY_INTERVAL`] in
//! which it finished rows and once more at stop: the rows acked (handled,
//! and relayed to every target), retried, dead-lettered and deleted as
//! failed since the previous line. [`set_activity_summary_interval`] changes
//! the interval or turns it off. Transports log one DEBUG line per relayed
//! message (`outbox-kafka`: topic, partition, offset, outbox id).

// The public façade: the names and recording helpers live in the leaf
// module `instrument` (every layer records metrics), the one-shot gauge
// sampler in the engine (it runs a query). This module only gathers them
// under one public path, so no layer below depends on one above.
pub use crate::engine::gauges::sample_gauges;
pub use crate::engine::summary::{
    DEFAULT_SUMMARY_INTERVAL, SUMMARY_TARGET, activity_summary_interval,
    set_activity_summary_interval,
};
#[cfg(feature = "prometheus")]
pub use crate::instrument::install_prometheus;
pub use crate::instrument::names;
pub use crate::instrument::{MetricsNaming, set_metrics_naming};
