//! The harness attached to a broker under test: the in-memory backend (if
//! any), the engines to dispatch to or wake, and the journal of what the
//! engine did ([`Step`], [`History`], [`Call`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;

pub use crate::broker::Step;
use crate::broker::{EngineHandle, Observer};
use crate::engine::message::FailureReason;
use crate::error::Result;
use crate::store::OutboxRow;
use crate::store::memory::MemoryStore;

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

/// What the engine did with one row, in order (see
/// [`TestApp::history`](super::TestApp::history)).
///
/// Its [`Display`](fmt::Display) is the steps, comma-separated, which reads
/// well in an assertion:
///
/// ```
/// use outbox_core::FailureReason;
/// use outbox_core::testing::{History, Step};
///
/// // A step prints compactly (no retry delay, no error text).
/// let step = Step::DeadLettered { reason: FailureReason::RetryTerminal, last_exception: None };
/// assert_eq!(step.to_string(), "dead_lettered(retry_terminal)");
/// assert!(step.is_outcome() && !Step::Claimed { deliveries_count: 1 }.is_outcome());
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
    engines: Mutex<Vec<(u64, Weak<dyn EngineHandle>)>>,
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

    /// Every running engine, in registration order.
    fn engines(&self) -> Vec<Arc<dyn EngineHandle>> {
        lock(&self.engines)
            .iter()
            .filter_map(|(_, e)| e.upgrade())
            .collect()
    }

    /// The queues and lease of every subscriber of every running engine.
    pub(crate) fn subscriptions(&self) -> Vec<(Vec<String>, Duration, bool)> {
        self.engines()
            .iter()
            .flat_map(|e| e.subscriptions())
            .collect()
    }

    /// Wakes every fetch loop (after the clock moved).
    pub(crate) fn wake_all(&self) {
        for e in self.engines() {
            e.wake(None);
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
        self.engines().iter().map(|e| e.busy()).sum()
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

    /// Synchronous dispatch of everything due, in the caller's task: rounds
    /// over every engine until none delivers anything. Returns how many
    /// deliveries ran.
    pub(crate) async fn dispatch_due(&self) -> Result<usize> {
        /// A guard against handlers that keep feeding their own queue.
        const MAX_DELIVERIES: usize = 100_000;
        let mut total = 0;
        loop {
            let mut round = 0;
            for e in self.engines() {
                round += e.dispatch_round().await?;
            }
            total += round;
            if round == 0 {
                return Ok(total);
            }
            if total >= MAX_DELIVERIES {
                tracing::warn!(
                    "synchronous dispatch stopped after {total} deliveries: a handler keeps publishing due rows to the queues it serves"
                );
                return Ok(total);
            }
        }
    }
}

/// The engine reports to the harness.
impl Observer for Harness {
    fn synchronous(&self) -> bool {
        self.sync
    }

    /// A row was inserted (or a timer extended) on the in-memory backend:
    /// wakes the fetch loops serving `queue`, as a NOTIFY would.
    fn inserted(&self, queue: &str) {
        for e in self.engines() {
            e.wake(Some(queue));
        }
        self.changed();
    }

    fn engine_started(&self, engine: Weak<dyn EngineHandle>) -> u64 {
        let id = self.next_engine.fetch_add(1, Ordering::SeqCst);
        lock(&self.engines).push((id, engine));
        id
    }

    fn engine_stopped(&self, id: u64) {
        lock(&self.engines).retain(|(e, _)| *e != id);
        self.changed();
    }

    fn step(&self, row_id: i64, step: Step) {
        self.record(row_id, step);
    }

    fn changed(&self) {
        Harness::changed(self);
    }

    fn handler_called(&self, subscriber: &str, row: &OutboxRow) {
        self.record_call(subscriber, row);
    }
}
