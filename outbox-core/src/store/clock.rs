//! [`TestClock`]: the clock of the in-memory store (feature `testing`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// The clock of a [`MemoryStore`](super::memory::MemoryStore): what `now()` is in
/// the store's statements (eligibility, leases, retry schedules, timers),
/// as the database clock is for PostgreSQL.
///
/// Two kinds, both movable with [`advance`](Self::advance):
///
/// - [`TestClock::system`] (the default): the wall clock plus the total
///   advance, so time also passes by itself;
/// - [`TestClock::frozen`]: stands still until advanced, for tests that
///   must not depend on how long they take.
///
/// Times are kept to the microsecond, as PostgreSQL's `timestamptz` does.
/// Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::testing::TestClock;
///
/// let clock = TestClock::frozen();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(clock.now() - t0, chrono::TimeDelta::seconds(90));
/// ```
#[derive(Clone)]
pub struct TestClock {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where a frozen clock stands (before the offset); `None`: the wall clock.
    frozen: Option<DateTime<Utc>>,
    /// The total advance, in microseconds.
    offset_us: AtomicI64,
}

impl fmt::Debug for TestClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClock")
            .field("frozen", &self.inner.frozen.is_some())
            .field("now", &self.now())
            .finish()
    }
}

impl Default for TestClock {
    fn default() -> Self {
        Self::system()
    }
}

impl TestClock {
    /// The wall clock, movable forward with [`advance`](Self::advance).
    ///
    /// ```
    /// use outbox_core::testing::TestClock;
    /// let clock = TestClock::system();
    /// assert!(!clock.is_frozen());
    /// ```
    pub fn system() -> Self {
        Self::with(None)
    }

    /// A clock standing still at the current time until advanced.
    ///
    /// ```
    /// use outbox_core::testing::TestClock;
    /// let clock = TestClock::frozen();
    /// assert_eq!(clock.now(), clock.now());
    /// ```
    pub fn frozen() -> Self {
        Self::frozen_at(Utc::now())
    }

    /// A clock standing still at `at` (kept to the microsecond) until advanced.
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    /// use outbox_core::testing::TestClock;
    /// let at = Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap();
    /// assert_eq!(TestClock::frozen_at(at).now(), at);
    /// ```
    pub fn frozen_at(at: DateTime<Utc>) -> Self {
        Self::with(Some(micros(at)))
    }

    fn with(frozen: Option<DateTime<Utc>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                frozen,
                offset_us: AtomicI64::new(0),
            }),
        }
    }

    /// Whether the clock only moves when advanced.
    ///
    /// ```
    /// use outbox_core::testing::TestClock;
    /// assert!(TestClock::frozen().is_frozen());
    /// ```
    pub fn is_frozen(&self) -> bool {
        self.inner.frozen.is_some()
    }

    /// The current time, to the microsecond.
    ///
    /// ```
    /// use outbox_core::testing::TestClock;
    /// let clock = TestClock::system();
    /// assert!((chrono::Utc::now() - clock.now()).num_seconds().abs() < 5);
    /// ```
    pub fn now(&self) -> DateTime<Utc> {
        let base = self.inner.frozen.unwrap_or_else(Utc::now);
        micros(base) + TimeDelta::microseconds(self.inner.offset_us.load(Ordering::SeqCst))
    }

    /// Moves the clock forward by `by` (rounded to the microsecond). Rows
    /// whose schedule or lease expiry falls in between become due. With a
    /// running [`TestApp`](crate::testing::TestApp), prefer
    /// [`TestApp::advance`](crate::testing::TestApp::advance), which also delivers (or
    /// wakes the subscribers for) what became due.
    ///
    /// ```
    /// use std::time::Duration;
    /// use outbox_core::testing::TestClock;
    /// let clock = TestClock::frozen();
    /// let before = clock.now();
    /// clock.advance(Duration::from_millis(1500));
    /// assert_eq!((clock.now() - before).num_milliseconds(), 1500);
    /// ```
    pub fn advance(&self, by: Duration) {
        let us = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.inner.offset_us.fetch_add(us, Ordering::SeqCst);
    }
}

/// `at` truncated to the microsecond (what PostgreSQL stores).
pub(crate) fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// A `make_interval(secs => s)`: `s` seconds, rounded to the microsecond
/// half to even, as PostgreSQL does.
pub(crate) fn interval_secs(s: f64) -> TimeDelta {
    #[allow(clippy::cast_possible_truncation)]
    let us = (s * 1_000_000.0).round_ties_even() as i64;
    TimeDelta::microseconds(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_truncate_and_intervals_round_like_postgres() {
        let at = DateTime::from_timestamp(1_700_000_000, 123_456_789).expect("valid");
        assert_eq!(micros(at).timestamp_subsec_nanos(), 123_456_000);
        // make_interval(secs => s) rounds half to even (rint).
        assert_eq!(interval_secs(0.0000005), TimeDelta::zero());
        assert_eq!(interval_secs(0.0000015), TimeDelta::microseconds(2));
        assert_eq!(interval_secs(0.001_500_499), TimeDelta::microseconds(1500));
        assert_eq!(interval_secs(30.0), TimeDelta::seconds(30));
    }

    #[test]
    fn frozen_clocks_move_only_when_advanced_and_clones_share_time() {
        let clock = TestClock::frozen();
        let other = clock.clone();
        let t0 = clock.now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(clock.now(), t0);
        other.advance(Duration::from_micros(1_500_001));
        assert_eq!(clock.now() - t0, TimeDelta::microseconds(1_500_001));
        let system = TestClock::system();
        system.advance(Duration::from_secs(3600));
        assert!((system.now() - Utc::now()).num_seconds() >= 3599);
    }
}
