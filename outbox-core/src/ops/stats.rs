//! Queue statistics: [`OutboxBroker::stats`] and
//! [`OutboxBroker::stats_for`] (the query is the storage layer's).

use crate::broker::OutboxBroker;
use crate::error::Result;
use crate::store::QueueStats;

impl OutboxBroker {
    /// Counts every queue present in the outbox or the dead-letter table:
    /// ready, leased and scheduled rows, the age of the oldest ready row (the
    /// relay lag) and the dead letters. Sorted by queue name.
    ///
    /// Two statements (one per table), each using the tables' indexes; the
    /// counts are exact, so the cost grows with the number of rows (an
    /// index-only scan of the outbox's partial indexes when the visibility
    /// map allows it). Without a dead-letter table, `dead_letters` is 0.
    ///
    /// ```no_run
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// for q in outbox.stats().await? {
    ///     let lag = q.oldest_ready_age.map_or(0.0, |d| d.as_secs_f64());
    ///     println!("{:<20} ready={} leased={} scheduled={} lag={lag:.1}s dlq={}",
    ///         q.queue, q.ready, q.leased, q.scheduled, q.dead_letters);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self) -> Result<Vec<QueueStats>> {
        self.queue_stats(None).await
    }

    /// [`stats`](Self::stats) for the given queues only: one entry per
    /// distinct queue, sorted by name, with zeros for a queue that has no rows.
    /// Errors with [`Error::InvalidArgument`](crate::Error::InvalidArgument) on an empty or over-long name.
    pub async fn stats_for(&self, queues: &[&str]) -> Result<Vec<QueueStats>> {
        self.queue_stats(Some(queues)).await
    }
}
