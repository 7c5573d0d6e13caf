//! Exactly-once lanes: the seam between the engine's lane loops and a
//! transport that publishes a lot of records plus the lane's progress in one
//! bus transaction (`outbox-kafka` with `KafkaBroker::transactional`).
//!
//! Design and proof: `docs/exactly-once.md`. In short: a subscriber with
//! `exactly_once(U)` splits its rows into `U` lanes; a relay owns a lane
//! while it holds a PostgreSQL session advisory lock on it, opens the lane
//! on the transport ([`Lanes::open`]: fences every older owner, returns the
//! ids of the lane's last committed lot), deletes those ids, then commits
//! lot after lot ([`Lane::commit`]) and deletes each committed lot's rows.
//!
//! While a lane's handlers run, a route's publish does not go to the bus: it
//! is staged in the task's [`Stage`] (a task-local, as queue chaining's
//! follow-on rows are), and the lane loop hands the staged records of the
//! lot's successful rows to [`Lane::commit`] in row-id order.

use std::sync::{Arc, Mutex};

use super::Outgoing;
use crate::error::BoxError;
use futures_util::future::BoxFuture;

/// Which lane a [`Lanes::open`] call is for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LaneId {
    /// The outbox table (`schema.table` or `table`).
    pub table: String,
    /// The subscriber's name.
    pub subscriber: String,
    /// This lane, `0..lanes`.
    pub lane: u32,
    /// How many lanes the subscriber has (`U`).
    pub lanes: u32,
}

impl LaneId {
    /// The lane `lane` of `lanes` of `subscriber` on `table`.
    ///
    /// ```
    /// use outbox_core::transport::LaneId;
    ///
    /// let id = LaneId::new("outbox", "relay", 2, 4);
    /// assert_eq!(id.unit(), "outbox.relay");
    /// ```
    pub fn new(
        table: impl Into<String>,
        subscriber: impl Into<String>,
        lane: u32,
        lanes: u32,
    ) -> Self {
        Self {
            table: table.into(),
            subscriber: subscriber.into(),
            lane,
            lanes,
        }
    }

    /// `<table>.<subscriber>`: what a transport prefixes with the
    /// application to name the lane's transactional id and progress topic.
    pub fn unit(&self) -> String {
        format!("{}.{}", self.table, self.subscriber)
    }
}

/// What became of one lot given to [`Lane::commit`] (the lane itself is
/// still usable; a lost lane is the `Err` of `commit`).
#[derive(Debug)]
#[non_exhaustive]
pub enum LotOutcome {
    /// The records and the progress committed together.
    Committed,
    /// The bus refused record `index` of the lot; the transaction was
    /// aborted, nothing of the lot is visible. `error` is the bus's (a
    /// [`BusRejection`](super::BusRejection) when retrying cannot help).
    Refused {
        /// The index of the refused record in the lot.
        index: usize,
        /// Why.
        error: BoxError,
    },
    /// The transaction was aborted for a reason that is no record's (the bus
    /// asked for an abort); nothing of the lot is visible: the lot can be
    /// tried again.
    Aborted(BoxError),
}

/// What [`Lanes::open`] gives: the opened lane, and the ids of the lane's
/// last committed lot (empty when there is none).
pub type Opened = (Box<dyn Lane>, Vec<i64>);

/// A transport that can open **exactly-once lanes**: what a route with
/// [`exactly_once(lanes)`](crate::RouteBuilder::exactly_once) publishes
/// through (`outbox-kafka`: `KafkaBroker::transactional`).
///
/// A subscriber with `U` lanes splits its rows into lanes (a key's rows
/// into one); a relay owns a lane while it holds a PostgreSQL session
/// advisory lock on it, and then calls [`open`](Self::open): the transport
/// fences every older owner of the lane (aborting its open transaction for
/// good) and returns the ids of the lane's last committed lot, which the
/// relay deletes before it claims. Each lot then goes through
/// [`Lane::commit`]: the records of its successful rows, in row-id order,
/// and its ids as the lane's progress, in one bus transaction; the rows are
/// deleted after it. While a lane's handlers run, a route's results are not
/// given to [`Transport::publish`](super::Transport::publish): they are
/// staged and handed to `commit`. Design and proofs: `docs/exactly-once.md`.
pub trait Lanes: Send + Sync + 'static {
    /// Opens `id` for this process: fences every older owner of the lane
    /// (its open transaction is aborted for good) and returns the lane with
    /// the ids of the lane's last committed lot (empty when there is none).
    /// Called only while the caller holds the lane's lock.
    fn open(&self, id: LaneId) -> BoxFuture<'static, Result<Opened, BoxError>>;
}

/// One opened lane: one transaction at a time.
pub trait Lane: Send + 'static {
    /// Publishes `records` (in this order) and the progress record `ids` in
    /// one transaction; resolves once it committed or was aborted. `Err`:
    /// the lane is lost (fenced, a fatal error, or the commit's outcome is
    /// unknown); the caller must drop it and give up the lane's lock, so the
    /// next owner learns from the bus what committed.
    fn commit(
        &mut self,
        records: Vec<Outgoing>,
        ids: Vec<i64>,
    ) -> BoxFuture<'_, Result<LotOutcome, BoxError>>;
}

/// The records a delivery's handler published while it ran in a lane.
#[derive(Debug, Default)]
pub(crate) struct Stage {
    staged: Mutex<Vec<(String, Outgoing)>>,
}

impl Stage {
    /// Stages `msg` for the transport named `transport`.
    pub(crate) fn push(&self, transport: &str, msg: Outgoing) {
        self.lock().push((transport.to_owned(), msg));
    }

    /// The staged records, in the order they were staged (leaves none).
    pub(crate) fn take(&self) -> Vec<(String, Outgoing)> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Outgoing)>> {
        self.staged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

tokio::task_local! {
    /// The stage of the delivery whose handler runs in this task, in a lane.
    static STAGE: Arc<Stage>;
}

/// Runs `f` (a delivery's handler) with `stage` as its lane stage.
pub(crate) async fn scope<F: Future>(stage: Arc<Stage>, f: F) -> F::Output {
    STAGE.scope(stage, f).await
}

/// The stage of the handler running in this task, if it runs in a lane.
pub(crate) fn current() -> Option<Arc<Stage>> {
    STAGE.try_with(Arc::clone).ok()
}
