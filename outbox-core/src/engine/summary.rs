//! The activity summary: one INFO line per subscriber, every
//! [`activity_summary_interval`] (30 s by default) in which something
//! happened, counting the rows it acked, retried, dead-lettered and
//! deleted as failed since the previous line; a last line when the
//! subscriber stops. It is the production-sized counterpart of
//! FastStream's per-message `Received` / `Processed` lines: a relay handling
//! thousands of rows a second logs one line per subscriber and interval,
//! and an idle one logs nothing. Transports add a DEBUG line per message
//! they relay (`outbox-kafka`: topic, partition, offset, outbox id).
//!
//! The counts come from the outcomes the engine wrote (the steps every
//! subscriber reports when a row is finished), so every transport, and a
//! subscriber with none, gets the same summary. Logged under the target
//! [`SUMMARY_TARGET`], which a filter can silence on its own
//! (`RUST_LOG=info,outbox_core::summary=off`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::broker::Step;

/// The `tracing` target of the summary lines.
pub const SUMMARY_TARGET: &str = "outbox_core::summary";

/// The default interval between two summary lines of a subscriber.
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(30);

/// The interval in milliseconds; 0: off. Read when a subscriber starts.
static INTERVAL_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets how often every subscriber started from now on logs its activity
/// summary (`None`: never, not even at stop). Process-wide, like a metrics
/// recorder; default [`DEFAULT_SUMMARY_INTERVAL`]. A filter on
/// [`SUMMARY_TARGET`] silences the lines without changing this.
///
/// ```
/// use std::time::Duration;
/// outbox_core::telemetry::set_activity_summary_interval(Some(Duration::from_secs(60)));
/// assert_eq!(
///     outbox_core::telemetry::activity_summary_interval(),
///     Some(Duration::from_secs(60))
/// );
/// ```
pub fn set_activity_summary_interval(every: Option<Duration>) {
    let ms = every.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    });
    INTERVAL_MS.store(ms, Relaxed);
}

/// The interval set by [`set_activity_summary_interval`] (`None`: off).
pub fn activity_summary_interval() -> Option<Duration> {
    match INTERVAL_MS.load(Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// The counts of one subscriber since its last summary line.
#[derive(Debug)]
struct Counts {
    subscriber: String,
    queues: Vec<String>,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    deleted: AtomicU64,
    since: Mutex<Instant>,
}

impl Counts {
    /// Logs and resets the counts, if any is non-zero.
    fn flush(&self, last: bool) {
        let acked = self.acked.swap(0, Relaxed);
        let retried = self.retried.swap(0, Relaxed);
        let dead_lettered = self.dead_lettered.swap(0, Relaxed);
        let deleted = self.deleted.swap(0, Relaxed);
        let now = Instant::now();
        let window = {
            let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *since, now)
        };
        if acked + retried + dead_lettered + deleted == 0 {
            return;
        }
        tracing::info!(
            target: SUMMARY_TARGET,
            subscriber = %self.subscriber,
            queues = ?self.queues,
            acked,
            retried,
            dead_lettered,
            deleted,
            window = %format_args!("{:.1?}", now.duration_since(window)),
            last,
            "outbox activity (acked: handled, and relayed to every target)"
        );
    }
}

/// A subscriber's activity summary: counts the finished rows, logs them
/// periodically (a task holding only a weak reference) and once more when
/// dropped, with the subscriber.
#[derive(Debug)]
pub(crate) struct Summary {
    counts: Option<Arc<Counts>>,
}

impl Summary {
    /// The summary of `subscriber` (serving `queues`), at the interval set
    /// now; its periodic task runs on the current Tokio runtime, if any.
    pub(crate) fn new(subscriber: &str, queues: &[String]) -> Self {
        let Some(every) = activity_summary_interval() else {
            return Self { counts: None };
        };
        let counts = Arc::new(Counts {
            subscriber: subscriber.to_owned(),
            queues: queues.to_vec(),
            acked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            since: Mutex::new(Instant::now()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Counts> = Arc::downgrade(&counts);
            rt.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(c) = weak.upgrade() else { return };
                    c.flush(false);
                }
            });
        }
        Self {
            counts: Some(counts),
        }
    }

    /// Counts a finished row.
    pub(crate) fn finished(&self, step: &Step) {
        let Some(c) = &self.counts else { return };
        let counter = match step {
            Step::Acked => &c.acked,
            Step::Retried { .. } => &c.retried,
            Step::DeadLettered { .. } => &c.dead_lettered,
            Step::Deleted { .. } => &c.deleted,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }
}

impl Drop for Summary {
    fn drop(&mut self) {
        if let Some(c) = &self.counts {
            c.flush(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_can_be_turned_off() {
        let before = activity_summary_interval();
        set_activity_summary_interval(None);
        assert_eq!(activity_summary_interval(), None);
        assert!(Summary::new("s", &["q".to_owned()]).counts.is_none());
        set_activity_summary_interval(Some(Duration::from_millis(0)));
        assert_eq!(activity_summary_interval(), Some(Duration::from_millis(1)));
        set_activity_summary_interval(before);
    }
}
