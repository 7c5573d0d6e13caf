//! The engine's gauge sampler: every
//! [`gauge_interval`](crate::Engine::gauge_interval) it reads the per-queue
//! counts of the served queues and sets the `outbox_*_rows` gauges of
//! [`telemetry`].

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::OutboxBroker;
use crate::error::Result;
use crate::instrument;
use crate::store::QueueStats;

/// Reads [`OutboxBroker::stats_for`] once
/// and sets the per-queue gauges from it (what the engine does every
/// [`gauge_interval`](crate::Engine::gauge_interval)); returns the stats.
pub async fn sample_gauges(broker: &OutboxBroker, queues: &[&str]) -> Result<Vec<QueueStats>> {
    let stats = broker.queue_stats(Some(queues)).await?;
    for s in &stats {
        instrument::queue_gauges(
            &s.queue,
            s.ready,
            s.scheduled,
            s.leased,
            s.oldest_ready_age,
            s.dead_letters,
        );
    }
    Ok(stats)
}

/// The engine's sampling loop.
pub(crate) async fn sample_gauges_every(
    broker: OutboxBroker,
    queues: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) {
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    loop {
        if let Err(e) = sample_gauges(&broker, &names).await {
            // The log target this message has always had (RUST_LOG filters).
            tracing::debug!(
                target: "outbox_core::telemetry",
                "sampling the outbox gauges failed: {e}"
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
