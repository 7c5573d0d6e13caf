//! Outage visibility: one WARN when a bus stops confirming while messages
//! wait for it, one INFO when it confirms again.
//!
//! Each (transport, destination) pair of an [`App`](crate::App) has a
//! [`Tracker`], fed by every publish of a route (`RouteHandler::handle`):
//! a publish in flight, a confirmation, a failure. Those updates are a few
//! relaxed atomic operations, shared by all workers but with no lock and no
//! allocation, so the relay's hot path stays as it was. A task started by
//! [`App::run`](crate::App::run) looks at every tracker a few times per
//! threshold (at most once a second) and logs:
//!
//! - **WARN**, once per outage, when the transport has confirmed nothing
//!   for the threshold while messages wait for it (publishes in flight, or
//!   publishes that failed recently and whose rows wait for their retry);
//! - **INFO**, once, when it confirms again a publish that began after the
//!   warning (a late confirmation of an older one, e.g. a delivery report a
//!   busy machine processed late, is no recovery): how long the outage
//!   lasted, how many publishes failed during it and how many were
//!   confirmed since.
//!
//! Transport-agnostic: it sees only what the [`Transport`](crate::Transport)
//! trait reports. A permanent refusal
//! ([`BusRejection`](crate::BusRejection)) is an answer from the bus, not an
//! outage: it neither counts as a failure nor as a confirmation.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::BoxError;
use crate::transport::BusRejection;

/// Shortest and longest pause between two looks at the trackers.
const MIN_TICK: Duration = Duration::from_millis(50);
const MAX_TICK: Duration = Duration::from_secs(1);

/// The trackers of one application, one per (transport, destination), and
/// the threshold; `after == None` turns the whole thing off.
pub(crate) struct Watch {
    after: Option<Duration>,
    epoch: Instant,
    trackers: Mutex<HashMap<(String, String), Arc<Tracker>>>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Warns after `after` without a confirmation (`None`: never).
    pub(crate) fn new(after: Option<Duration>) -> Self {
        Self {
            after,
            epoch: Instant::now(),
            trackers: Mutex::default(),
        }
    }

    /// The tracker of `destination` on `transport` (shared by every route
    /// that publishes there), or `None` when the warning is off.
    pub(crate) fn tracker(&self, transport: &str, destination: &str) -> Option<Arc<Tracker>> {
        self.after?;
        let mut trackers = self.trackers.lock().unwrap_or_else(PoisonError::into_inner);
        let tracker = trackers
            .entry((transport.to_owned(), destination.to_owned()))
            .or_insert_with(|| {
                Arc::new(Tracker::new(
                    transport.to_owned(),
                    destination.to_owned(),
                    self.epoch,
                ))
            });
        Some(tracker.clone())
    }

    /// Starts the task that looks at the trackers; it stops when the
    /// returned guard is dropped. `None` when there is nothing to watch.
    pub(crate) fn start(&self) -> Option<Watching> {
        let after = self.after?;
        let trackers: Vec<Arc<Tracker>> = self
            .trackers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        if trackers.is_empty() {
            return None;
        }
        let tick = (after / 4).clamp(MIN_TICK, MAX_TICK);
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                for t in &trackers {
                    if let Some(event) = t.check(after, t.now()) {
                        event.log(t);
                    }
                }
            }
        });
        Some(Watching(task.abort_handle()))
    }
}

/// Stops the watch task when dropped (at shutdown, or when startup fails).
#[derive(Debug)]
pub(crate) struct Watching(tokio::task::AbortHandle);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the publishes to one destination of one transport did. Times are
/// milliseconds since the App's watch was created.
pub(crate) struct Tracker {
    transport: String,
    destination: String,
    epoch: Instant,
    /// Publishes started and not finished.
    in_flight: AtomicU64,
    /// Failed publishes (not permanent refusals) since the last confirmation.
    failed_since_confirm: AtomicU64,
    /// Every failed publish (not permanent refusals).
    failed_total: AtomicU64,
    /// Every confirmed publish.
    confirmed_total: AtomicU64,
    last_confirm: AtomicU64,
    last_failure: AtomicU64,
    /// The later of the last confirmation and the last moment a publish
    /// started with nothing waiting before it: the bus has been silent
    /// since then.
    quiet_since: AtomicU64,
    /// Set while an outage was reported and not yet over.
    in_outage: AtomicBool,
    /// When the current outage was reported (0: none reported).
    declared_at: AtomicU64,
    /// The first confirmation, during a reported outage, of a publish that
    /// began after the report (0: none yet). A late confirmation of a
    /// publish that began before it (a delivery report the relay had not
    /// processed yet, e.g. on a machine too busy to run it) is no recovery.
    recovered_at: AtomicU64,
    outage: Mutex<Option<Outage>>,
}

/// An outage that was reported.
#[derive(Debug, Clone, Copy)]
struct Outage {
    since: u64,
    confirmed_before: u64,
    failed_before: u64,
}

/// What [`Tracker::check`] found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// Nothing confirmed for `silent` while `waiting` publishes are in
    /// flight and `failed` failed since the last confirmation.
    Outage {
        silent: Duration,
        waiting: u64,
        failed: u64,
    },
    /// Confirmations again after an outage of `lasted`, with `failed`
    /// failed publishes during it and `confirmed` confirmations since.
    Recovered {
        lasted: Duration,
        failed: u64,
        confirmed: u64,
    },
}

/// How a publish ended, for its tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Confirmed,
    Failed,
    /// A permanent refusal: the bus answered, but will never take it.
    Rejected,
}

impl Ended {
    /// How `result` (what [`Transport::publish`](crate::Transport::publish)
    /// resolved with) ended.
    pub(crate) fn of(result: &Result<(), BoxError>) -> Self {
        match result {
            Ok(()) => Ended::Confirmed,
            Err(e) => {
                let e: &(dyn std::error::Error + 'static) = &**e;
                if BusRejection::find(e).is_some() {
                    Ended::Rejected
                } else {
                    Ended::Failed
                }
            }
        }
    }
}

impl Tracker {
    fn new(transport: String, destination: String, epoch: Instant) -> Self {
        Self {
            transport,
            destination,
            epoch,
            in_flight: AtomicU64::new(0),
            failed_since_confirm: AtomicU64::new(0),
            failed_total: AtomicU64::new(0),
            confirmed_total: AtomicU64::new(0),
            last_confirm: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            quiet_since: AtomicU64::new(0),
            in_outage: AtomicBool::new(false),
            declared_at: AtomicU64::new(0),
            recovered_at: AtomicU64::new(0),
            outage: Mutex::new(None),
        }
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// A publish starts; end it with [`InFlight::end`] (dropping it counts
    /// as neither a confirmation nor a failure).
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        let began = self.now();
        self.begin_at(began);
        InFlight {
            tracker: Some(self.clone()),
            began,
        }
    }

    fn begin_at(&self, now: u64) {
        let before = self.in_flight.fetch_add(1, Relaxed);
        // Nothing was waiting (no publish in flight, no failure since the
        // last confirmation): the bus cannot have been silent before now.
        if before == 0 && self.failed_since_confirm.load(Relaxed) == 0 {
            self.quiet_since.fetch_max(now, Relaxed);
        }
    }

    /// A publish that began at `began` ended at `now`.
    fn end_at(&self, ended: Ended, began: u64, now: u64) {
        self.in_flight.fetch_sub(1, Relaxed);
        match ended {
            Ended::Confirmed => {
                self.confirmed_total.fetch_add(1, Relaxed);
                self.last_confirm.fetch_max(now, Relaxed);
                self.quiet_since.fetch_max(now, Relaxed);
                if self.failed_since_confirm.load(Relaxed) != 0 {
                    self.failed_since_confirm.store(0, Relaxed);
                }
                if self.in_outage.load(Relaxed) && began >= self.declared_at.load(Relaxed) {
                    // Only the first confirmation of a publish that began
                    // after the outage was reported.
                    let _ = self
                        .recovered_at
                        .compare_exchange(0, now.max(1), Relaxed, Relaxed);
                }
            }
            Ended::Failed => {
                self.failed_since_confirm.fetch_add(1, Relaxed);
                self.failed_total.fetch_add(1, Relaxed);
                self.last_failure.fetch_max(now, Relaxed);
            }
            Ended::Rejected => {}
        }
    }

    /// Reports an outage that reached `after`, or the end of a reported
    /// one, as of `now`; `None` when there is nothing new.
    pub(crate) fn check(&self, after: Duration, now: u64) -> Option<Event> {
        let after_ms = millis(after);
        let mut outage = self.outage.lock().unwrap_or_else(PoisonError::into_inner);
        let confirmed = self.confirmed_total.load(Relaxed);
        let failed_total = self.failed_total.load(Relaxed);
        match *outage {
            None => {
                let waiting = self.in_flight.load(Relaxed);
                let failed = self.failed_since_confirm.load(Relaxed);
                // Rows whose publish failed wait in the outbox for their
                // retry; count them while failures keep coming.
                let failing =
                    failed > 0 && now.saturating_sub(self.last_failure.load(Relaxed)) < after_ms;
                let since = self.quiet_since.load(Relaxed);
                let silent = now.saturating_sub(since);
                if (waiting == 0 && !failing) || silent < after_ms {
                    return None;
                }
                *outage = Some(Outage {
                    since,
                    confirmed_before: confirmed,
                    failed_before: failed_total,
                });
                self.recovered_at.store(0, Relaxed);
                self.declared_at.store(now.max(1), Relaxed);
                self.in_outage.store(true, Relaxed);
                Some(Event::Outage {
                    silent: Duration::from_millis(silent),
                    waiting,
                    failed,
                })
            }
            Some(o) => {
                let recovered_at = self.recovered_at.load(Relaxed);
                if recovered_at == 0 {
                    return None;
                }
                *outage = None;
                self.in_outage.store(false, Relaxed);
                self.declared_at.store(0, Relaxed);
                self.recovered_at.store(0, Relaxed);
                Some(Event::Recovered {
                    lasted: Duration::from_millis(recovered_at.saturating_sub(o.since)),
                    failed: failed_total - o.failed_before,
                    confirmed: confirmed - o.confirmed_before,
                })
            }
        }
    }
}

impl Event {
    fn log(&self, t: &Tracker) {
        let (transport, destination) = (t.transport.as_str(), t.destination.as_str());
        match *self {
            Event::Outage {
                silent,
                waiting,
                failed,
            } => {
                let since = wall_clock_ago(silent);
                let failures = match failed {
                    0 => String::new(),
                    n => format!("; {n} publish(es) failed since the last confirmation"),
                };
                tracing::warn!(
                    transport,
                    destination,
                    waiting,
                    failed,
                    since = %since,
                    "transport `{transport}` has confirmed nothing sent to {destination:?} for \
                     {:.1}s (since {since}) while {waiting} message(s) wait for it{failures}; \
                     the rows stay in the outbox and are delivered once it recovers",
                    silent.as_secs_f64()
                );
            }
            Event::Recovered {
                lasted,
                failed,
                confirmed,
            } => {
                tracing::info!(
                    transport,
                    destination,
                    outage_secs = lasted.as_secs_f64(),
                    failed,
                    confirmed,
                    "transport `{transport}` confirms messages sent to {destination:?} again, \
                     after {:.1}s without a confirmation; {failed} publish(es) failed during \
                     the outage, {confirmed} confirmed since it ended",
                    lasted.as_secs_f64()
                );
            }
        }
    }
}

/// A publish in flight on a [`Tracker`].
#[derive(Debug)]
pub(crate) struct InFlight {
    tracker: Option<Arc<Tracker>>,
    began: u64,
}

impl InFlight {
    /// The publish ended with `result`.
    pub(crate) fn end(mut self, result: &Result<(), BoxError>) {
        if let Some(t) = self.tracker.take() {
            t.end_at(Ended::of(result), self.began, t.now());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Cancelled (the handler was dropped): no longer in flight.
        if let Some(t) = self.tracker.take() {
            t.in_flight.fetch_sub(1, Relaxed);
        }
    }
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("transport", &self.transport)
            .field("destination", &self.destination)
            .field("in_flight", &self.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The UTC time `ago` before now, to the millisecond.
fn wall_clock_ago(ago: Duration) -> String {
    let now = chrono::Utc::now();
    let then = chrono::Duration::from_std(ago)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(now);
    then.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(5);

    fn tracker() -> Tracker {
        Tracker::new("kafka".into(), "orders.kafka".into(), Instant::now())
    }

    #[test]
    fn a_bus_that_keeps_confirming_is_never_reported() {
        let t = tracker();
        for now in (0..60_000).step_by(100) {
            t.begin_at(now);
            t.end_at(Ended::Confirmed, now, now + 80);
            assert_eq!(t.check(AFTER, now + 90), None);
        }
        // Idle for a minute, then one slow publish: silent only since it began.
        t.begin_at(120_000);
        assert_eq!(t.check(AFTER, 124_000), None);
        t.end_at(Ended::Confirmed, 120_000, 124_500);
        assert_eq!(t.check(AFTER, 200_000), None, "nothing waits");
    }

    #[test]
    fn one_warning_while_messages_wait_then_one_recovery() {
        let t = tracker();
        t.begin_at(1_000);
        t.end_at(Ended::Confirmed, 1_000, 1_010);
        for i in 0..3 {
            t.begin_at(2_000 + i);
        }
        assert_eq!(t.check(AFTER, 6_000), None, "4 s is below the threshold");
        let Some(Event::Outage {
            silent, waiting, ..
        }) = t.check(AFTER, 7_100)
        else {
            panic!("no outage reported")
        };
        assert_eq!(waiting, 3);
        assert_eq!(silent, Duration::from_millis(5_100));
        // Exactly one warning, however long it lasts.
        for now in (7_200..30_000).step_by(100) {
            assert_eq!(t.check(AFTER, now), None);
        }
        // Two publishes time out and are retried; then the bus is back.
        t.end_at(Ended::Failed, 2_000, 30_000);
        t.end_at(Ended::Failed, 2_001, 30_000);
        t.begin_at(30_200);
        // A late confirmation of a publish that began before the warning
        // (its delivery report was not processed in time) is no recovery.
        t.end_at(Ended::Confirmed, 2_002, 31_000);
        assert_eq!(t.check(AFTER, 31_020), None);
        t.end_at(Ended::Confirmed, 30_200, 31_050);
        assert_eq!(
            t.check(AFTER, 31_500),
            Some(Event::Recovered {
                lasted: Duration::from_millis(29_050),
                failed: 2,
                confirmed: 2,
            })
        );
        assert_eq!(t.check(AFTER, 40_000), None);
        // A later outage is reported again.
        t.begin_at(50_000);
        assert!(matches!(
            t.check(AFTER, 56_000),
            Some(Event::Outage { waiting: 1, .. })
        ));
    }

    /// A bus that fails fast (no publish stays in flight long) is an outage
    /// too, while its failures keep coming; a permanent refusal is not.
    #[test]
    fn fast_failures_count_as_waiting_but_permanent_refusals_do_not() {
        let t = tracker();
        for now in (0..7_000).step_by(500) {
            t.begin_at(now);
            t.end_at(Ended::Failed, now, now + 10);
        }
        assert!(matches!(
            t.check(AFTER, 7_000),
            Some(Event::Outage {
                waiting: 0,
                failed: 14,
                ..
            })
        ));

        let t = tracker();
        for now in (0..7_000).step_by(500) {
            t.begin_at(now);
            t.end_at(Ended::Rejected, now, now + 10);
        }
        assert_eq!(t.check(AFTER, 7_000), None);
        // Old failures of rows that are gone since do not make a warning.
        let t = tracker();
        t.begin_at(0);
        t.end_at(Ended::Failed, 0, 10);
        assert_eq!(t.check(AFTER, 60_000), None);
    }

    #[test]
    fn a_cancelled_publish_is_no_longer_waiting() {
        let t = Arc::new(tracker());
        let publishing = t.begin();
        assert_eq!(t.in_flight.load(Relaxed), 1);
        drop(publishing);
        assert_eq!(t.in_flight.load(Relaxed), 0);
        t.begin().end(&Err("down".into()));
        assert_eq!(t.failed_total.load(Relaxed), 1);
        let rejected: BoxError = Box::new(BusRejection::new("kafka", "too large"));
        t.begin().end(&Err(rejected));
        assert_eq!(t.failed_total.load(Relaxed), 1);
        t.begin().end(&Ok(()));
        assert_eq!(t.confirmed_total.load(Relaxed), 1);
        assert_eq!(t.in_flight.load(Relaxed), 0);
    }

    #[test]
    fn the_watch_shares_one_tracker_per_destination_and_can_be_off() {
        let w = Watch::new(Some(AFTER));
        let a = w.tracker("kafka", "a").expect("on");
        let b = w.tracker("kafka", "a").expect("on");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &w.tracker("kafka", "b").expect("on")));
        assert!(Watch::new(None).tracker("kafka", "a").is_none());
    }
}
