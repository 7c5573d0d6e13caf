//! The buses other than Kafka (RabbitMQ, NATS, Redis) for the `bus`
//! scenario: each file gives the transport under test and the bus's own
//! ceiling, measured with the bus's plain client publishing the same
//! payloads with the same confirm settings.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use outbox_core::Transport;

/// What the plain client achieved: `n` confirmed publishes.
#[derive(Debug, Clone)]
pub(crate) struct CeilingRun {
    /// First publish to last confirmation.
    pub(crate) elapsed: Duration,
    /// Per message: publish call -> the bus's confirmation.
    pub(crate) confirm_latencies: Vec<Duration>,
}

/// One bus in the benchmark harness.
pub(crate) trait Bus: Send + Sync {
    /// The transport name (`rabbit`, `nats`, `redis`).
    fn name(&self) -> &'static str;

    /// Creates `destination` (queue, stream, ...) so publishes to it are confirmed.
    fn prepare(&self, destination: &str) -> BoxFuture<'_, anyhow::Result<()>>;

    /// The connected transport, with the crate's default (confirmed) settings.
    fn transport(&self) -> BoxFuture<'_, anyhow::Result<Arc<dyn Transport>>>;

    /// The plain client publishing `n` copies of `payload` to `destination`,
    /// at most `in_flight` unconfirmed at once, with the confirm settings
    /// the transport uses.
    fn ceiling(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> BoxFuture<'_, anyhow::Result<CeilingRun>>;

    /// Messages that arrived at `destination` (to check nothing is missing).
    fn count(&self, destination: &str) -> BoxFuture<'_, anyhow::Result<u64>>;

    /// Deletes `destination`, best effort.
    fn cleanup(&self, destination: &str) -> BoxFuture<'_, ()>;
}

pub(crate) mod nats;
pub(crate) mod rabbitmq;
pub(crate) mod redis;
