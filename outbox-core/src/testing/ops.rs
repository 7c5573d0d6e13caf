//! [`StoreOps`]: the engine's storage statements, callable one by one on
//! either backend (what the contract suite drives).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use super::harness::Harness;
use crate::broker::OutboxBroker;
use crate::engine::message::FailureReason;
use crate::error::Result;
use crate::ops::{DeadLetter, DlqFilter};
use crate::publish::PublishOptions;
use crate::store::OutboxRow;
use crate::store::conn::{self as store, Conn, LotWrites, Write, Written};
use crate::store::memory::MemoryStore;

/// What a claim returned: the lease token and the claimed rows, in
/// `(next_attempt_at, id)` order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Claim {
    /// The token every claimed row now holds.
    pub token: Uuid,
    /// The claimed rows, as the claim returned them.
    pub rows: Vec<OutboxRow>,
}

impl Claim {
    /// The ids of the claimed rows, in claim order.
    ///
    /// ```
    /// # fn demo(claim: outbox_core::testing::Claim) {
    /// println!("claimed {:?}", claim.ids());
    /// # }
    /// ```
    pub fn ids(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// `(id, token)` of every claimed row, for the batched writes.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps, claim: outbox_core::testing::Claim) -> Result<(), outbox_core::Error> {
    /// ops.release(&claim.pairs()).await?;
    /// # Ok(()) }
    /// ```
    pub fn pairs(&self) -> Vec<(i64, Uuid)> {
        self.rows.iter().map(|r| (r.id, self.token)).collect()
    }
}

/// An open lot of [`StoreOps::claim_lot`]: its rows stay locked until
/// [`commit`](Self::commit) writes the recorded outcomes, or
/// [`rollback`](Self::rollback) (or a drop) gives them back unchanged.
#[derive(Debug)]
pub struct Lot {
    broker: OutboxBroker,
    conn: Option<Conn>,
    id: u64,
    ended: bool,
    /// The claimed rows, in `(next_attempt_at, id)` order, as stored (the
    /// claim wrote nothing on them).
    pub rows: Vec<OutboxRow>,
    writes: LotWrites,
}

impl Lot {
    /// The ids of the claimed rows, in claim order.
    pub fn ids(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// Deletes `id` at the commit.
    pub fn ack(mut self, id: i64) -> Self {
        self.writes.delete.push(id);
        self
    }

    /// Reschedules `id` `delay` from now at the commit (one more attempt and
    /// delivery).
    pub fn retry(mut self, id: i64, delay: Duration) -> Self {
        self.writes.retry.push((id, delay));
        self
    }

    /// Moves `id` to the dead-letter table at the commit.
    pub fn dead_letter(
        mut self,
        id: i64,
        reason: FailureReason,
        last_exception: Option<&str>,
    ) -> Self {
        self.writes
            .dead_letter
            .push((id, reason.as_str(), last_exception.map(str::to_owned)));
        self
    }

    /// Leases `id` with `token` at the commit (what `max_hold` does to a row
    /// whose handler still runs).
    pub fn lease(mut self, id: i64, token: Uuid) -> Self {
        self.writes.lease.push(id);
        self.writes.token = token;
        self
    }

    /// Writes the recorded outcomes and commits.
    pub async fn commit(mut self) -> Result<()> {
        self.end(true).await
    }

    /// Ends the lot without writing anything: its rows are claimable again.
    pub async fn rollback(mut self) -> Result<()> {
        self.end(false).await
    }

    async fn end(&mut self, commit: bool) -> Result<()> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let writes = commit.then_some(&self.writes);
        store::lot_end(self.broker.stmts(), conn, self.id, writes).await?;
        Ok(())
    }
}

impl Drop for Lot {
    fn drop(&mut self) {
        // PostgreSQL rolls back when the connection closes; an in-process
        // store is told.
        if !self.ended
            && let Some(conn) = &self.conn
        {
            conn.abandon_lot(self.id);
        }
    }
}

/// The engine's storage operations one by one: publish (the producer's
/// insert, timers, batch, cancel), claim, the token-guarded writes and the
/// lease release, on the in-memory backend or on PostgreSQL, through the
/// very seam the engine uses (the same Rust code up to the statement).
///
/// This is what the workspace's contract suite drives to prove that
/// [`MemoryStore`] and the PostgreSQL statements behave the same; it is
/// public so that a test of your own can pin a storage behaviour on both.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use outbox_core::testing::{MemoryStore, StoreOps, TestClock};
/// use outbox_core::PublishOptions;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), outbox_core::Error> {
/// let store = Arc::new(MemoryStore::with_clock(TestClock::frozen()));
/// let ops = StoreOps::memory(store.clone())?;
/// let id = ops.publish(&1_i64, "orders", &PublishOptions::new()).await?.expect("inserted");
/// let claim = ops.claim(&["orders"], 10, Duration::from_secs(60)).await?;
/// assert_eq!(claim.ids(), [id]);
/// assert!(ops.retry(id, claim.token, Duration::from_secs(5)).await?);
/// assert!(ops.claim(&["orders"], 10, Duration::from_secs(60)).await?.rows.is_empty());
/// store.clock().advance(Duration::from_secs(5));
/// assert_eq!(ops.claim(&["orders"], 10, Duration::from_secs(60)).await?.rows[0].attempts_count, 1);
/// # Ok(()) }
/// ```
pub struct StoreOps {
    broker: OutboxBroker,
    /// The in-memory store, on that backend.
    store: Option<Arc<MemoryStore>>,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

impl fmt::Debug for StoreOps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOps")
            .field("broker", &self.broker)
            .field("memory", &self.broker.backend().is_local())
            .finish_non_exhaustive()
    }
}

fn queues(q: &[&str]) -> Vec<String> {
    q.iter().map(|s| (*s).to_owned()).collect()
}

impl StoreOps {
    /// On `store`, with a dead-letter table.
    ///
    /// ```
    /// let ops = outbox_core::testing::StoreOps::memory(Default::default())?;
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    pub fn memory(store: Arc<MemoryStore>) -> Result<Self> {
        Self::on_memory(store, true)
    }

    /// On `store`, without a dead-letter table (terminal failures are deleted;
    /// a dead-letter write is refused).
    ///
    /// ```
    /// let ops = outbox_core::testing::StoreOps::memory_without_dead_letters(Default::default())?;
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    pub fn memory_without_dead_letters(store: Arc<MemoryStore>) -> Result<Self> {
        Self::on_memory(store, false)
    }

    fn on_memory(store: Arc<MemoryStore>, dead_letters: bool) -> Result<Self> {
        let harness = Harness::new(Some(store.clone()), false);
        let broker = super::memory_broker(store.clone(), harness, dead_letters)?;
        Ok(Self {
            store: Some(store),
            ..Self::on(broker)
        })
    }

    fn on(broker: OutboxBroker) -> Self {
        Self {
            broker,
            store: None,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// On PostgreSQL, with `broker`'s pool and tables: the engine's
    /// statements on a dedicated connection (like the engine's), publishes
    /// and reads on pool connections (each its own transaction).
    ///
    /// ```no_run
    /// # fn demo(broker: outbox_core::OutboxBroker) {
    /// let ops = outbox_core::testing::StoreOps::postgres(broker);
    /// # let _ = ops; }
    /// ```
    pub fn postgres(broker: OutboxBroker) -> Self {
        Self::on(broker)
    }

    /// The broker (on the in-memory backend, one whose pool never connects).
    ///
    /// ```
    /// let ops = outbox_core::testing::StoreOps::memory(Default::default())?;
    /// assert!(ops.broker().dlq().is_some());
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    pub fn broker(&self) -> &OutboxBroker {
        &self.broker
    }

    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut Conn) -> std::result::Result<T, sqlx::Error>,
    ) -> Result<T> {
        let mut slot = self.conn.lock().await;
        let conn = match &mut *slot {
            Some(c) => c,
            empty => {
                let opts = self.broker.backend().connect_options();
                empty.insert(self.broker.store_conn(&opts).await?)
            }
        };
        match f(conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if store::is_connection_error(&e) {
                    *slot = None;
                }
                Err(e.into())
            }
        }
    }

    async fn write(&self, w: Write) -> Result<Written> {
        let stmts = self.broker.stmts();
        self.with_conn(async |c| store::execute(stmts, c, &w).await)
            .await
    }

    /// The producer's insert, as [`OutboxBroker::publish_with`] (on a pool
    /// connection of its own on PostgreSQL).
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// let opts = outbox_core::PublishOptions::new().timer_id("t");
    /// assert!(ops.publish(&1, "q", &opts).await?.is_some());
    /// assert!(ops.publish(&2, "q", &opts).await?.is_none(), "the timer exists");
    /// # Ok(()) }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        body: &T,
        queue: &str,
        opts: &PublishOptions,
    ) -> Result<Option<i64>> {
        let b = &self.broker;
        b.on_own_conn(async |c| b.publish_on(body, queue, opts, c).await)
            .await
    }

    /// The batch insert, as [`OutboxBroker::publish_batch_with`].
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// assert_eq!(ops.publish_batch([1, 2], "q", &Default::default()).await?, 2);
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch<T, I>(
        &self,
        bodies: I,
        queue: &str,
        opts: &PublishOptions,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        let b = &self.broker;
        b.on_own_conn(async |c| b.publish_batch_on(bodies, queue, opts, c).await)
            .await
    }

    /// The timer cancellation, as [`OutboxBroker::cancel_timer`].
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// assert!(!ops.cancel_timer("q", "unknown").await?);
    /// # Ok(()) }
    /// ```
    pub async fn cancel_timer(&self, queue: &str, timer_id: &str) -> Result<bool> {
        let b = &self.broker;
        b.on_own_conn(async |c| b.cancel_timer_on(queue, timer_id, c).await)
            .await
    }

    /// The engine's full claim (unleased rows and expired leases) with a
    /// fresh token.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// let claim = ops.claim(&["orders", "refunds"], 10, std::time::Duration::from_secs(60)).await?;
    /// # let _ = claim; Ok(()) }
    /// ```
    pub async fn claim(&self, queues: &[&str], limit: usize, lease_ttl: Duration) -> Result<Claim> {
        self.claim_inner(queues, limit, lease_ttl, true, None).await
    }

    /// The engine's claim without the expired-lease branch (what a busy
    /// fetch loop runs between expired-lease scans).
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// let claim = ops.claim_pending(&["orders"], 10).await?;
    /// # let _ = claim; Ok(()) }
    /// ```
    pub async fn claim_pending(&self, queues: &[&str], limit: usize) -> Result<Claim> {
        self.claim_inner(queues, limit, Duration::from_secs(60), false, None)
            .await
    }

    /// The claim of an [ordered](crate::SubscriberOptions::ordered)
    /// subscriber: of the rows with a key, only each key's head (its oldest
    /// row, leased or not) when it is unleased and due; rows without a key
    /// and expired leases as in [`claim`](Self::claim). The walk over the
    /// keys starts after `cursor` (`""`: the first key) and wraps round.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// let claim = ops.claim_ordered(&["orders"], 10, std::time::Duration::from_secs(60), "").await?;
    /// # let _ = claim; Ok(()) }
    /// ```
    pub async fn claim_ordered(
        &self,
        queues: &[&str],
        limit: usize,
        lease_ttl: Duration,
        cursor: &str,
    ) -> Result<Claim> {
        self.claim_inner(queues, limit, lease_ttl, true, Some(cursor))
            .await
    }

    async fn claim_inner(
        &self,
        q: &[&str],
        limit: usize,
        lease_ttl: Duration,
        with_expired: bool,
        ordered: Option<&str>,
    ) -> Result<Claim> {
        let token = Uuid::new_v4();
        let queues = queues(q);
        let stmts = self.broker.stmts();
        let args = store::ClaimArgs {
            queues: &queues,
            limit,
            lease_ttl,
            token,
            with_expired,
            ordered,
        };
        let rows = self
            .with_conn(async |c| store::claim(stmts, c, &args).await)
            .await?;
        Ok(Claim { token, rows })
    }

    /// The claim of a lot ([`ClaimMode::Transaction`](crate::ClaimMode::Transaction)),
    /// on a connection of its own: the rows the engine's claim would take
    /// (only the heads of keys with `ordered`, walking from that cursor),
    /// locked until the lot ends, with nothing written on them.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// let lot = ops.claim_lot(&["orders"], 10, None).await?;
    /// let first = lot.ids()[0];
    /// lot.ack(first).commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn claim_lot(&self, q: &[&str], limit: usize, ordered: Option<&str>) -> Result<Lot> {
        let queues = queues(q);
        let args = store::ClaimArgs {
            queues: &queues,
            limit,
            lease_ttl: Duration::from_secs(60),
            token: Uuid::nil(),
            with_expired: true,
            ordered,
        };
        let opts = self.broker.backend().connect_options();
        let mut conn = self.broker.store_conn(&opts).await?;
        let (id, rows) = store::lot_claim(self.broker.stmts(), &mut conn, &args).await?;
        Ok(Lot {
            broker: self.broker.clone(),
            conn: Some(conn),
            id,
            ended: rows.is_empty(),
            rows,
            writes: LotWrites::default(),
        })
    }

    /// The ack: deletes `id` if it holds `token`; `false` means the lease
    /// was lost.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps, c: outbox_core::testing::Claim) -> Result<(), outbox_core::Error> {
    /// assert!(ops.ack(c.rows[0].id, c.token).await?);
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self, id: i64, token: Uuid) -> Result<bool> {
        Ok(matches!(
            self.write(Write::Delete { id, token }).await?,
            Written::Rows(n) if n > 0
        ))
    }

    /// The batched ack: deletes every `(id, token)` pair that still holds;
    /// returns the ids deleted.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps, c: outbox_core::testing::Claim) -> Result<(), outbox_core::Error> {
    /// let deleted = ops.ack_batch(&c.pairs()).await?;
    /// # let _ = deleted; Ok(()) }
    /// ```
    pub async fn ack_batch(&self, pairs: &[(i64, Uuid)]) -> Result<Vec<i64>> {
        let w = Write::DeleteBatch {
            ids: pairs.iter().map(|p| p.0).collect(),
            tokens: pairs.iter().map(|p| p.1).collect(),
        };
        Ok(match self.write(w).await? {
            Written::Ids(mut ids) => {
                ids.sort_unstable();
                ids
            }
            Written::Rows(_) => Vec::new(),
        })
    }

    /// The retry: reschedules `id` `delay` from now and releases its lease,
    /// if it holds `token`.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps, c: outbox_core::testing::Claim) -> Result<(), outbox_core::Error> {
    /// assert!(ops.retry(c.rows[0].id, c.token, std::time::Duration::from_secs(30)).await?);
    /// # Ok(()) }
    /// ```
    pub async fn retry(&self, id: i64, token: Uuid, delay: Duration) -> Result<bool> {
        Ok(matches!(
            self.write(Write::Retry { id, token, delay }).await?,
            Written::Rows(n) if n > 0
        ))
    }

    /// The dead-letter move: deletes `id` and archives it with `reason` and
    /// `last_exception`, in one statement, if it holds `token`. An error
    /// without a dead-letter table.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps, c: outbox_core::testing::Claim) -> Result<(), outbox_core::Error> {
    /// use outbox_core::FailureReason;
    /// assert!(ops.dead_letter(c.rows[0].id, c.token, FailureReason::Rejected, Some("bad order")).await?);
    /// # Ok(()) }
    /// ```
    pub async fn dead_letter(
        &self,
        id: i64,
        token: Uuid,
        reason: FailureReason,
        last_exception: Option<&str>,
    ) -> Result<bool> {
        let w = Write::DeadLetter {
            id,
            token,
            reason: reason.as_str(),
            last_exception: last_exception.map(str::to_owned),
        };
        Ok(matches!(self.write(w).await?, Written::Rows(n) if n > 0))
    }

    /// The lease release of a graceful stop: gives claimed rows back
    /// (`deliveries_count - 1`); returns how many were released.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps, c: outbox_core::testing::Claim) -> Result<(), outbox_core::Error> {
    /// assert_eq!(ops.release(&c.pairs()).await?, c.rows.len() as u64);
    /// # Ok(()) }
    /// ```
    pub async fn release(&self, pairs: &[(i64, Uuid)]) -> Result<u64> {
        let ids: Vec<i64> = pairs.iter().map(|p| p.0).collect();
        let tokens: Vec<Uuid> = pairs.iter().map(|p| p.1).collect();
        let stmts = self.broker.stmts();
        self.with_conn(async |c| store::release(stmts, c, ids, tokens).await)
            .await
    }

    /// Every row of the outbox, by id, as
    /// [`OutboxBroker::fetch_unprocessed`] reads them.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// println!("{} rows", ops.rows().await?.len());
    /// # Ok(()) }
    /// ```
    pub async fn rows(&self) -> Result<Vec<OutboxRow>> {
        self.unprocessed(None, i64::MAX).await
    }

    /// [`OutboxBroker::fetch_unprocessed`]: up to `limit` rows (of `queue`),
    /// by id.
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// let first = ops.unprocessed(Some("orders"), 1).await?;
    /// # let _ = first; Ok(()) }
    /// ```
    pub async fn unprocessed(&self, queue: Option<&str>, limit: i64) -> Result<Vec<OutboxRow>> {
        let b = &self.broker;
        b.on_own_conn(async |c| b.fetch_unprocessed_on(queue, limit, c).await)
            .await
    }

    /// Every dead letter, by id (empty without a dead-letter table).
    ///
    /// ```
    /// # async fn demo(ops: outbox_core::testing::StoreOps) -> Result<(), outbox_core::Error> {
    /// for d in ops.dead_letters().await? {
    ///     println!("{} failed: {}", d.original_id, d.failure_reason);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        if let Some(store) = &self.store {
            if self.broker.dlq().is_none() {
                return Ok(Vec::new());
            }
            return Ok(store.dead_letters());
        }
        if self.broker.dlq().is_none() {
            return Ok(Vec::new());
        }
        self.broker.dlq_list(&DlqFilter::all()).await
    }
}
