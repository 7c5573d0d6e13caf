//! The harness attached to a broker under test: the in-memory backend (if
//! any), the engines to dispatch to or wake, and the journal of what the
//! engine did ([`Step`], [`History`], [`Call`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::engine::SubShared;
use crate::engine::message::FailureReason;
use crate::error::Result;
use crate::store::OutboxRow;
use crate::store::memory::MemoryStore;

/// One thing the engine did with a row, as recorded by a test harness.
///
/// Recorded by the engine itself (the fetch loop, the workers, the acker, or
/// synchronous dispatch), after the corresponding write landed, identically
/// on the in-memory and the PostgreSQL backend.
///
/// ```
/// use outbox_core::FailureReason;
/// use outbox_core::testing::Step;
///
/// let step = Step::DeadLettered { reason: FailureReason::RetryTerminal, last_exception: None };
/// assert_eq!(step.to_string(), "dead_lettered(retry_terminal)");
/// assert!(step.is_outcome());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// A claim leased the row; `deliveries_count` is the row's count after it.
    Claimed {
        /// Claims so far, this one included.
        deliveries_count: i64,
    },
    /// Handled: the row was deleted.
    Acked,
    /// Nacked: rescheduled `delay` later, lease released.
    Retried {
        /// The retry strategy's delay.
        delay: Duration,
    },
    /// Failed for good and moved to the dead-letter table.
    DeadLettered {
        /// Why (`failure_reason`).
        reason: FailureReason,
        /// The rendered error (`last_exception`).
        last_exception: Option<String>,
    },
    /// Failed for good and deleted (no dead-letter table configured).
    Deleted {
        /// Why.
        reason: FailureReason,
    },
    /// The outcome's write found the lease taken by another claim (`phase`:
    /// `retry` or `terminal`, which also covers acks): nothing was written.
    LeaseLost {
        /// Which write.
        phase: &'static str,
    },
    /// Claimed but never started: the lease was given back at a graceful stop.
    Released,
    /// The outcome could not be written; the row is redelivered after its
    /// lease expires.
    Abandoned,
}

impl Step {
    /// Whether this step ends a delivery (everything but [`Step::Claimed`]).
    ///
    /// ```
    /// use outbox_core::testing::Step;
    /// assert!(!Step::Claimed { deliveries_count: 1 }.is_outcome());
    /// assert!(Step::Acked.is_outcome());
    /// ```
    pub fn is_outcome(&self) -> bool {
        !matches!(self, Step::Claimed { .. })
    }
}

/// Compact and stable (no retry delay, no error text): `claimed(1)`,
/// `acked`, `retried`, `dead_lettered(retry_terminal)`, `deleted(rejected)`,
/// `lease_lost(retry)`, `released`, `abandoned`.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Claimed { deliveries_count } => write!(f, "claimed({deliveries_count})"),
            Step::Acked => f.write_str("acked"),
            Step::Retried { .. } => f.write_str("retried"),
            Step::DeadLettered { reason, .. } => write!(f, "dead_lettered({reason})"),
            Step::Deleted { reason } => write!(f, "deleted({reason})"),
            Step::LeaseLost { phase } => write!(f, "lease_lost({phase})"),
            Step::Released => f.write_str("released"),
            Step::Abandoned => f.write_str("abandoned"),
        }
    }
}

/// What the engine did with one row, in order (see
/// [`TestApp::history`](super::TestApp::history)).
///
/// Its [`Display`](fmt::Display) is the steps, comma-separated, which reads
/// well in an assertion:
///
/// ```
/// use outbox_core::testing::{History, Step};
///
/// let h = History::new(7, vec![
///     Step::Claimed { deliveries_count: 1 },
///     Step::Retried { delay: std::time::Duration::from_secs(1) },
///     Step::Claimed { deliveries_count: 2 },
///     Step::Acked,
/// ]);
/// assert_eq!(h.to_string(), "claimed(1), retried, claimed(2), acked");
/// assert_eq!((h.deliveries(), h.retries()), (2, 1));
/// assert_eq!(h.outcome(), Some(&Step::Acked));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    row_id: i64,
    steps: Vec<Step>,
}

impl History {
    /// A history of `row_id` (for comparisons in tests).
    ///
    /// ```
    /// let h = outbox_core::testing::History::new(1, vec![]);
    /// assert!(h.is_empty());
    /// ```
    pub fn new(row_id: i64, steps: Vec<Step>) -> Self {
        Self { row_id, steps }
    }

    /// The row.
    ///
    /// ```
    /// assert_eq!(outbox_core::testing::History::new(3, vec![]).row_id(), 3);
    /// ```
    pub fn row_id(&self) -> i64 {
        self.row_id
    }

    /// Every step, oldest first.
    ///
    /// ```
    /// use outbox_core::testing::{History, Step};
    /// assert_eq!(History::new(1, vec![Step::Acked]).steps(), [Step::Acked]);
    /// ```
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Whether nothing happened to the row (yet).
    ///
    /// ```
    /// assert!(outbox_core::testing::History::new(1, vec![]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// How many times the row was claimed.
    ///
    /// ```
    /// use outbox_core::testing::{History, Step};
    /// let h = History::new(1, vec![Step::Claimed { deliveries_count: 1 }, Step::Acked]);
    /// assert_eq!(h.deliveries(), 1);
    /// ```
    pub fn deliveries(&self) -> usize {
        self.count(|s| matches!(s, Step::Claimed { .. }))
    }

    /// How many retries were scheduled.
    ///
    /// ```
    /// use outbox_core::testing::{History, Step};
    /// let h = History::new(1, vec![Step::Retried { delay: Default::default() }]);
    /// assert_eq!(h.retries(), 1);
    /// ```
    pub fn retries(&self) -> usize {
        self.count(|s| matches!(s, Step::Retried { .. }))
    }

    fn count(&self, f: impl Fn(&Step) -> bool) -> usize {
        self.steps.iter().filter(|s| f(s)).count()
    }

    /// The latest outcome (the last step, unless the row is claimed right now).
    ///
    /// ```
    /// use outbox_core::testing::{History, Step};
    /// let h = History::new(1, vec![Step::Acked, Step::Claimed { deliveries_count: 2 }]);
    /// assert_eq!(h.outcome(), None);
    /// ```
    pub fn outcome(&self) -> Option<&Step> {
        self.steps.last().filter(|s| s.is_outcome())
    }

    /// Why the row failed for good (dead-lettered or deleted), if it did.
    ///
    /// ```
    /// use outbox_core::FailureReason;
    /// use outbox_core::testing::{History, Step};
    /// let h = History::new(1, vec![Step::Deleted { reason: FailureReason::Rejected }]);
    /// assert_eq!(h.failure_reason(), Some(FailureReason::Rejected));
    /// ```
    pub fn failure_reason(&self) -> Option<FailureReason> {
        match self.outcome()? {
            Step::DeadLettered { reason, .. } | Step::Deleted { reason } => Some(*reason),
            _ => None,
        }
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// One handler invocation: the subscriber and the row as its handler got it
/// (see [`TestApp::calls`](super::TestApp::calls)).
///
/// ```
/// # fn demo(call: outbox_core::testing::Call) -> Result<(), outbox_core::DecodeError> {
/// let order_id: i64 = call.row.decode()?;
/// println!("{} got order {order_id} (delivery {})", call.subscriber, call.row.deliveries_count);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Call {
    /// The subscriber's name.
    pub subscriber: String,
    /// The row, as claimed for this delivery.
    pub row: OutboxRow,
}

#[derive(Default)]
struct Journal {
    steps: Vec<(i64, Step)>,
    calls: Vec<Call>,
}

/// Attached to an [`OutboxBroker`](crate::OutboxBroker) under test.
pub(crate) struct Harness {
    store: Option<Arc<MemoryStore>>,
    sync: bool,
    journal: Mutex<Journal>,
    engines: Mutex<Vec<(u64, Vec<Weak<SubShared>>)>>,
    next_engine: AtomicU64,
    changed: Notify,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("memory", &self.store.is_some())
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Harness {
    /// A harness with the in-memory backend `store` (PostgreSQL if `None`),
    /// dispatching synchronously or not.
    pub(crate) fn new(store: Option<Arc<MemoryStore>>, sync: bool) -> Arc<Self> {
        Arc::new(Self {
            store,
            sync,
            journal: Mutex::default(),
            engines: Mutex::default(),
            next_engine: AtomicU64::new(1),
            changed: Notify::new(),
        })
    }

    pub(crate) fn store(&self) -> Option<&Arc<MemoryStore>> {
        self.store.as_ref()
    }

    pub(crate) fn is_sync(&self) -> bool {
        self.sync
    }

    /// Registers the subscribers of a starting engine.
    pub(crate) fn attach(&self, subs: Vec<Arc<SubShared>>) -> u64 {
        let id = self.next_engine.fetch_add(1, Ordering::SeqCst);
        let weak = subs.iter().map(Arc::downgrade).collect();
        lock(&self.engines).push((id, weak));
        id
    }

    /// Forgets a stopping engine.
    pub(crate) fn detach(&self, id: u64) {
        lock(&self.engines).retain(|(e, _)| *e != id);
        self.changed();
    }

    /// The subscribers of every running engine, in registration order.
    pub(crate) fn subscribers(&self) -> Vec<Arc<SubShared>> {
        lock(&self.engines)
            .iter()
            .flat_map(|(_, subs)| subs.iter().filter_map(Weak::upgrade))
            .collect()
    }

    /// A row was inserted (or a timer extended) on the in-memory backend:
    /// wakes the fetch loops serving `queue`, as a NOTIFY would.
    pub(crate) fn inserted(&self, queue: &str, any: bool) {
        if !any {
            return;
        }
        for s in self.subscribers() {
            if s.sub.queues().iter().any(|q| q == queue) {
                s.wake.notify_one();
            }
        }
        self.changed();
    }

    /// Wakes every fetch loop (after the clock moved).
    pub(crate) fn wake_all(&self) {
        for s in self.subscribers() {
            s.wake.notify_one();
        }
    }

    pub(crate) fn record(&self, row_id: i64, step: Step) {
        lock(&self.journal).steps.push((row_id, step));
    }

    pub(crate) fn record_call(&self, subscriber: &str, row: &OutboxRow) {
        lock(&self.journal).calls.push(Call {
            subscriber: subscriber.to_owned(),
            row: row.clone(),
        });
    }

    /// Something changed: wakes whoever waits in [`notified`](Self::notified).
    pub(crate) fn changed(&self) {
        self.changed.notify_waiters();
    }

    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Claims running plus deliveries in flight, over every engine.
    pub(crate) fn busy(&self) -> usize {
        self.subscribers().iter().map(|s| s.busy()).sum()
    }

    pub(crate) fn history(&self, row_id: i64) -> History {
        let steps = lock(&self.journal)
            .steps
            .iter()
            .filter(|(id, _)| *id == row_id)
            .map(|(_, s)| s.clone())
            .collect();
        History::new(row_id, steps)
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        lock(&self.journal).calls.clone()
    }

    /// Synchronous dispatch of everything due, in the caller's task.
    pub(crate) async fn dispatch_due(&self) -> Result<usize> {
        crate::engine::dispatch_due(&self.subscribers()).await
    }
}
