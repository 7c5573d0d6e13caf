//! [`MemoryStore`]: the outbox and dead-letter tables in memory, with the
//! semantics of the engine's SQL.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::clock::{TestClock, interval_secs, micros};
use super::conn::{ClaimArgs, LotWrites, Write, Written};
use super::dead_letter::DeadLetter;
use super::producer::{BatchInsert, Insert, Schedule, TimerConflict};
use super::row::OutboxRow;
use crate::envelope::Headers;

/// The outbox table and its dead-letter table, in memory.
///
/// It implements the storage contract of the engine statement by statement,
/// with the same semantics as the SQL the engine runs on PostgreSQL (the
/// workspace's contract suite runs one set of scenarios against both):
///
/// - **claim**: rows of the served queues with `next_attempt_at <= now` that
///   are unleased, or (when the claim looks for them) leased with
///   `acquired_at < now - lease_ttl`; in `(next_attempt_at, id)` order, at
///   most `limit`; each gets the claim's token, `acquired_at = now` and
///   `deliveries_count + 1`;
/// - **token-guarded writes** (ack, batched ack, retry, dead-letter move,
///   release) touch a row only if it holds that token (an unleased row never
///   matches); a retry sets `next_attempt_at = now + delay`,
///   `attempts_count + 1`, the first/last attempt times, and clears the
///   lease; a release gives the claim back (`deliveries_count - 1`); a
///   lease extension (the heartbeat) sets `acquired_at = now`;
/// - **dead letters** copy `id` (as `original_id`), queue, payload, headers,
///   `deliveries_count`, `created_at` and `timer_id`, and add
///   `failure_reason`, `last_exception` and `failed_at = now`;
/// - **timers**: one live row per `(queue, timer_id)`;
///   [`TimerConflict::Ignore`] keeps the existing row, `Extend` keeps the
///   later deadline (replacing payload and headers and resetting the retry
///   history only when the new one is later) and leaves a leased row alone;
///   a cancel deletes only an unleased row;
/// - ids come from one sequence that, like `BIGSERIAL`, also advances on
///   timer conflicts.
///
/// `now` is the store's [`TestClock`] (the wall clock by default). Rows and
/// headers are copied in and out: nothing returned aliases the store.
///
/// A [`TestApp`](crate::testing::TestApp) creates one for you; read it with
/// [`TestApp::store`](crate::testing::TestApp::store), or use the backend-neutral
/// [`TestApp::rows`](crate::testing::TestApp::rows) and
/// [`TestApp::dead_letters`](crate::testing::TestApp::dead_letters).
///
/// ```
/// use std::time::Duration;
/// use outbox_core::testing::{MemoryStore, TestClock};
///
/// let store = MemoryStore::with_clock(TestClock::frozen());
/// assert!(store.is_empty());
/// store.clock().advance(Duration::from_secs(1));
/// assert!(store.rows().is_empty() && store.dead_letters().is_empty());
/// ```
pub struct MemoryStore {
    clock: TestClock,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last id the outbox "sequence" handed out.
    last_id: i64,
    /// The last id of the dead-letter "sequence".
    last_dlq_id: i64,
    rows: BTreeMap<i64, OutboxRow>,
    dead: Vec<DeadLetter>,
    /// Rows locked by an open lot (row id -> lot id): what `FOR UPDATE`
    /// holds in a lot's transaction on PostgreSQL. Claims skip them.
    locks: std::collections::HashMap<i64, u64>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("MemoryStore")
            .field("clock", &self.clock)
            .field("rows", &s.rows.len())
            .field("dead_letters", &s.dead.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the wall clock ([`TestClock::system`]).
    ///
    /// ```
    /// let store = outbox_core::testing::MemoryStore::new();
    /// assert_eq!(store.len(), 0);
    /// ```
    pub fn new() -> Self {
        Self::with_clock(TestClock::system())
    }

    /// An empty store on `clock`.
    ///
    /// ```
    /// use outbox_core::testing::{MemoryStore, TestClock};
    /// let clock = TestClock::frozen();
    /// let store = MemoryStore::with_clock(clock.clone());
    /// assert_eq!(store.now(), clock.now());
    /// ```
    pub fn with_clock(clock: TestClock) -> Self {
        Self {
            clock,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's clock.
    ///
    /// ```
    /// let store = outbox_core::testing::MemoryStore::new();
    /// assert!(!store.clock().is_frozen());
    /// ```
    pub fn clock(&self) -> &TestClock {
        &self.clock
    }

    /// The store's `now()`.
    ///
    /// ```
    /// let store = outbox_core::testing::MemoryStore::new();
    /// assert!(store.now() <= chrono::Utc::now());
    /// ```
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Every row of the outbox, by id (copies).
    ///
    /// ```
    /// assert!(outbox_core::testing::MemoryStore::new().rows().is_empty());
    /// ```
    pub fn rows(&self) -> Vec<OutboxRow> {
        self.lock().rows.values().cloned().collect()
    }

    /// The row `id`, if it is in the outbox (a copy).
    ///
    /// ```
    /// assert!(outbox_core::testing::MemoryStore::new().row(1).is_none());
    /// ```
    pub fn row(&self, id: i64) -> Option<OutboxRow> {
        self.lock().rows.get(&id).cloned()
    }

    /// Every dead letter, by id (copies).
    ///
    /// ```
    /// assert!(outbox_core::testing::MemoryStore::new().dead_letters().is_empty());
    /// ```
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.clone()
    }

    /// How many rows are in the outbox.
    ///
    /// ```
    /// assert_eq!(outbox_core::testing::MemoryStore::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// Whether the outbox is empty.
    ///
    /// ```
    /// assert!(outbox_core::testing::MemoryStore::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.lock().rows.is_empty()
    }

    // -----------------------------------------------------------------------
    // The producer's statements.

    fn deadline(schedule: Schedule, now: DateTime<Utc>) -> DateTime<Utc> {
        match schedule {
            Schedule::Now => now,
            Schedule::In(d) => now + interval_secs(d.as_secs_f64()),
            Schedule::At(at) => micros(at),
        }
    }

    /// `INSERT ... [ON CONFLICT (queue, timer_id) ...] RETURNING id`.
    pub(crate) fn insert(&self, ins: Insert) -> Option<i64> {
        let now = self.now();
        let next_attempt_at = Self::deadline(ins.schedule, now);
        let mut s = self.lock();
        // `id` defaults to nextval(): consumed before the conflict check.
        s.last_id += 1;
        let id = s.last_id;
        if let Some((timer_id, mode)) = &ins.timer
            && let Some(live) = s
                .rows
                .values_mut()
                .find(|r| r.queue == ins.queue && r.timer_id.as_deref() == Some(timer_id))
        {
            return match mode {
                TimerConflict::Ignore => None,
                TimerConflict::Extend if live.acquired_token.is_some() => None,
                TimerConflict::Extend => {
                    if next_attempt_at > live.next_attempt_at {
                        live.payload = ins.payload;
                        live.headers = ins.headers;
                        live.attempts_count = 0;
                        live.next_attempt_at = next_attempt_at;
                        live.first_attempt_at = None;
                        live.last_attempt_at = None;
                    }
                    Some(live.id)
                }
            };
        }
        s.rows.insert(
            id,
            OutboxRow {
                timer_id: ins.timer.map(|(t, _)| t),
                ordering_key: ins.key,
                ..new_row(
                    id,
                    ins.queue,
                    ins.payload,
                    ins.headers,
                    now,
                    next_attempt_at,
                )
            },
        );
        Some(id)
    }

    /// The batch insert: one row per body, all with the same `now`.
    pub(crate) fn insert_batch(&self, batch: BatchInsert) -> u64 {
        let now = self.now();
        let next_attempt_at = Self::deadline(batch.schedule, now);
        let mut s = self.lock();
        let mut n = 0;
        for (payload, headers) in batch.payloads.into_iter().zip(batch.headers) {
            s.last_id += 1;
            let id = s.last_id;
            let row = OutboxRow {
                ordering_key: batch.key.clone(),
                ..new_row(
                    id,
                    batch.queue.clone(),
                    payload,
                    headers,
                    now,
                    next_attempt_at,
                )
            };
            s.rows.insert(id, row);
            n += 1;
        }
        n
    }

    /// `DELETE ... WHERE queue AND timer_id AND acquired_token IS NULL`.
    pub(crate) fn cancel_timer(&self, queue: &str, timer_id: &str) -> bool {
        let mut s = self.lock();
        let found = s
            .rows
            .values()
            .find(|r| {
                r.queue == queue
                    && r.timer_id.as_deref() == Some(timer_id)
                    && r.acquired_token.is_none()
            })
            .map(|r| r.id);
        found.is_some_and(|id| s.rows.remove(&id).is_some())
    }

    /// `SELECT ... [WHERE queue] ORDER BY id LIMIT`.
    pub(crate) fn fetch_unprocessed(&self, queue: Option<&str>, limit: i64) -> Vec<OutboxRow> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.lock()
            .rows
            .values()
            .filter(|r| queue.is_none_or(|q| r.queue == q))
            .take(limit)
            .cloned()
            .collect()
    }

    // -----------------------------------------------------------------------
    // The engine's statements.

    fn eligible(
        r: &OutboxRow,
        queues: &[String],
        now: DateTime<Utc>,
        expired_before: Option<DateTime<Utc>>,
    ) -> bool {
        if r.next_attempt_at > now || !queues.contains(&r.queue) {
            return false;
        }
        match (r.acquired_token, r.acquired_at, expired_before) {
            (None, _, _) => true,
            (Some(_), Some(at), Some(before)) => at < before,
            _ => false,
        }
    }

    /// The claim (see the type's docs); returns the claimed rows in
    /// `(next_attempt_at, id)` order. An ordered claim takes, of the rows
    /// with a key, only each `(queue, key)`'s head: its oldest row, leased
    /// or not.
    pub(crate) fn claim(&self, args: &ClaimArgs<'_>) -> Vec<OutboxRow> {
        let (limit, token) = (args.limit, args.token);
        let now = self.now();
        let expired_before = Self::expired_before(args, now);
        let mut s = self.lock();
        let ready = Self::claimable(&s, args, now, expired_before);
        ready
            .into_iter()
            .take(limit)
            .filter_map(|(_, id)| {
                let r = s.rows.get_mut(&id)?;
                r.deliveries_count += 1;
                r.acquired_at = Some(now);
                r.acquired_token = Some(token);
                Some(r.clone())
            })
            .collect()
    }

    /// What a claim would take, in `(next_attempt_at, id)` order, before
    /// its limit. An unordered claim: every eligible row. An ordered one, as
    /// the PostgreSQL statement: the heads of the keys (a key's oldest row,
    /// leased or not) that are unleased and due, at most `limit` of them in
    /// walk order (the keys after the cursor, then from the first key);
    /// unleased due rows without a key by id; expired leases.
    fn claimable(
        s: &State,
        args: &ClaimArgs<'_>,
        now: DateTime<Utc>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Vec<(DateTime<Utc>, i64)> {
        let queues = args.queues;
        let Some(cursor) = args.ordered else {
            let mut ready: Vec<(DateTime<Utc>, i64)> = s
                .rows
                .values()
                .filter(|r| !s.locks.contains_key(&r.id))
                .filter(|r| Self::eligible(r, queues, now, expired_before))
                .map(|r| (r.next_attempt_at, r.id))
                .collect();
            ready.sort_unstable();
            return ready;
        };
        let limit = args.limit;
        // `rows` is a BTreeMap by id: the first row seen of a key is its head.
        let mut heads = std::collections::HashSet::new();
        let (mut keyed, mut keyless, mut expired) = (Vec::new(), Vec::new(), Vec::new());
        for r in s.rows.values().filter(|r| queues.contains(&r.queue)) {
            if let Some(k) = &r.ordering_key
                && !heads.insert((r.queue.as_str(), k.as_str()))
            {
                continue;
            }
            // A locked head is skipped, its key's later rows wait.
            if s.locks.contains_key(&r.id) || !Self::eligible(r, queues, now, expired_before) {
                continue;
            }
            let at = (r.next_attempt_at, r.id);
            match (&r.ordering_key, r.acquired_token) {
                (_, Some(_)) => expired.push(at),
                (Some(k), None) => keyed.push(((k.as_str() <= cursor, k.as_str()), at)),
                (None, None) => keyless.push(at),
            }
        }
        keyed.sort_unstable();
        expired.sort_unstable();
        let mut ready: Vec<(DateTime<Utc>, i64)> = keyed
            .into_iter()
            .take(limit)
            .map(|(_, at)| at)
            .chain(keyless.into_iter().take(limit))
            .chain(expired.into_iter().take(limit))
            .collect();
        ready.sort_unstable();
        ready
    }

    /// Whether a claim for `queues` with `lease_ttl` (`ordered` or not)
    /// would return a row now.
    pub(crate) fn has_claimable(
        &self,
        queues: &[String],
        lease_ttl: Duration,
        ordered: bool,
    ) -> bool {
        let now = self.now();
        let before = now - interval_secs(lease_ttl.as_secs_f64());
        let args = ClaimArgs {
            queues,
            limit: 1,
            lease_ttl,
            token: Uuid::nil(),
            with_expired: true,
            ordered: ordered.then_some(""),
        };
        !Self::claimable(&self.lock(), &args, now, Some(before)).is_empty()
    }

    fn holds(s: &State, id: i64, token: Uuid) -> bool {
        s.rows
            .get(&id)
            .is_some_and(|r| r.acquired_token == Some(token))
    }

    /// One token-guarded write.
    pub(crate) fn execute(&self, write: &Write) -> Written {
        let now = self.now();
        let mut s = self.lock();
        match write {
            Write::Delete { id, token } => {
                let hit = Self::holds(&s, *id, *token);
                if hit {
                    s.rows.remove(id);
                }
                Written::Rows(u64::from(hit))
            }
            Write::DeleteBatch { ids, tokens } => {
                let mut done = Vec::new();
                for (id, token) in ids.iter().zip(tokens) {
                    if Self::holds(&s, *id, *token) {
                        s.rows.remove(id);
                        done.push(*id);
                    }
                }
                Written::Ids(done)
            }
            Write::Extend { ids, tokens } => {
                let mut kept = Vec::new();
                for (id, token) in ids.iter().zip(tokens) {
                    if Self::holds(&s, *id, *token)
                        && let Some(r) = s.rows.get_mut(id)
                    {
                        r.acquired_at = Some(now);
                        kept.push(*id);
                    }
                }
                Written::Ids(kept)
            }
            Write::Retry { id, token, delay } => {
                if !Self::holds(&s, *id, *token) {
                    return Written::Rows(0);
                }
                let Some(r) = s.rows.get_mut(id) else {
                    return Written::Rows(0);
                };
                r.attempts_count += 1;
                r.next_attempt_at = now + interval_secs(delay.as_secs_f64());
                r.first_attempt_at = Some(r.first_attempt_at.unwrap_or(now));
                r.last_attempt_at = Some(now);
                r.acquired_at = None;
                r.acquired_token = None;
                Written::Rows(1)
            }
            Write::DeadLetter {
                id,
                token,
                reason,
                last_exception,
            } => {
                if !Self::holds(&s, *id, *token) {
                    return Written::Rows(0);
                }
                let Some(r) = s.rows.remove(id) else {
                    return Written::Rows(0);
                };
                Self::bury(&mut s, r, reason, last_exception.clone(), now);
                Written::Rows(1)
            }
        }
    }

    /// Leases taken before this are expired, if the claim looks for them.
    fn expired_before(args: &ClaimArgs<'_>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        args.with_expired
            .then(|| now - interval_secs(args.lease_ttl.as_secs_f64()))
    }

    /// A lot's claim: what [`claim`](Self::claim) would take, locked by
    /// `lot` instead of leased (nothing on the rows changes).
    pub(crate) fn claim_locked(&self, args: &ClaimArgs<'_>, lot: u64) -> Vec<OutboxRow> {
        let now = self.now();
        let expired_before = Self::expired_before(args, now);
        let mut s = self.lock();
        let ready = Self::claimable(&s, args, now, expired_before);
        let rows: Vec<OutboxRow> = ready
            .into_iter()
            .take(args.limit)
            .filter_map(|(_, id)| s.rows.get(&id).cloned())
            .collect();
        for r in &rows {
            s.locks.insert(r.id, lot);
        }
        rows
    }

    /// Ends a lot: applies `writes` (its commit) or nothing (rollback), and
    /// drops its locks. The writes touch only rows the lot locked.
    pub(crate) fn end_lot(&self, lot: u64, writes: Option<&LotWrites>) {
        let now = self.now();
        let mut s = self.lock();
        let mine: std::collections::HashSet<i64> = s
            .locks
            .iter()
            .filter(|(_, l)| **l == lot)
            .map(|(id, _)| *id)
            .collect();
        s.locks.retain(|_, l| *l != lot);
        let Some(w) = writes else { return };
        for id in w.delete.iter().filter(|id| mine.contains(id)) {
            s.rows.remove(id);
        }
        for (id, delay) in w.retry.iter().filter(|(id, _)| mine.contains(id)) {
            if let Some(r) = s.rows.get_mut(id) {
                r.attempts_count += 1;
                r.deliveries_count += 1;
                r.next_attempt_at = now + interval_secs(delay.as_secs_f64());
                r.first_attempt_at = Some(r.first_attempt_at.unwrap_or(now));
                r.last_attempt_at = Some(now);
                r.acquired_at = None;
                r.acquired_token = None;
            }
        }
        for (id, reason, text) in w.dead_letter.iter().filter(|(id, ..)| mine.contains(id)) {
            if let Some(mut r) = s.rows.remove(id) {
                r.deliveries_count += 1;
                Self::bury(&mut s, r, reason, text.clone(), now);
            }
        }
        for id in w.lease.iter().filter(|id| mine.contains(id)) {
            if let Some(r) = s.rows.get_mut(id) {
                r.deliveries_count += 1;
                r.acquired_at = Some(now);
                r.acquired_token = Some(w.token);
            }
        }
    }

    /// Appends `r` to the dead letters.
    fn bury(
        s: &mut State,
        r: OutboxRow,
        reason: &str,
        last_exception: Option<String>,
        now: DateTime<Utc>,
    ) {
        s.last_dlq_id += 1;
        let dead = DeadLetter {
            id: s.last_dlq_id,
            original_id: r.id,
            queue: r.queue,
            payload: r.payload,
            headers: r.headers,
            deliveries_count: r.deliveries_count,
            created_at: r.created_at,
            failed_at: now,
            failure_reason: reason.to_owned(),
            last_exception,
            timer_id: r.timer_id,
            ordering_key: r.ordering_key,
        };
        s.dead.push(dead);
    }

    /// Releases the leases of `(id, token)` pairs and gives their claims back.
    pub(crate) fn release(&self, ids: &[i64], tokens: &[Uuid]) -> u64 {
        let mut s = self.lock();
        let mut n = 0;
        for (id, token) in ids.iter().zip(tokens) {
            // A released row holds no token: a repeated pair cannot match twice.
            if !Self::holds(&s, *id, *token) {
                continue;
            }
            if let Some(r) = s.rows.get_mut(id) {
                r.acquired_at = None;
                r.acquired_token = None;
                r.deliveries_count = (r.deliveries_count - 1).max(0);
                n += 1;
            }
        }
        n
    }

    /// Moves the clock (what [`TestApp::advance`](crate::testing::TestApp::advance)
    /// does on this backend).
    pub(crate) fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

fn new_row(
    id: i64,
    queue: String,
    payload: Vec<u8>,
    headers: Headers,
    now: DateTime<Utc>,
    next_attempt_at: DateTime<Utc>,
) -> OutboxRow {
    OutboxRow {
        id,
        queue,
        payload,
        headers,
        attempts_count: 0,
        deliveries_count: 0,
        created_at: now,
        next_attempt_at,
        first_attempt_at: None,
        last_attempt_at: None,
        acquired_at: None,
        acquired_token: None,
        timer_id: None,
        ordering_key: None,
    }
}

/// The engine's and the broker's view of the store (see [`LocalStore`]).
impl super::conn::LocalStore for MemoryStore {
    fn now(&self) -> DateTime<Utc> {
        MemoryStore::now(self)
    }

    fn insert(&self, insert: Insert) -> Option<i64> {
        MemoryStore::insert(self, insert)
    }

    fn insert_batch(&self, batch: BatchInsert) -> u64 {
        MemoryStore::insert_batch(self, batch)
    }

    fn cancel_timer(&self, queue: &str, timer_id: &str) -> bool {
        MemoryStore::cancel_timer(self, queue, timer_id)
    }

    fn fetch_unprocessed(&self, queue: Option<&str>, limit: i64) -> Vec<OutboxRow> {
        MemoryStore::fetch_unprocessed(self, queue, limit)
    }

    fn claim(&self, args: &ClaimArgs<'_>) -> Vec<OutboxRow> {
        MemoryStore::claim(self, args)
    }

    fn execute(&self, write: &Write) -> Written {
        MemoryStore::execute(self, write)
    }

    fn release(&self, ids: &[i64], tokens: &[Uuid]) -> u64 {
        MemoryStore::release(self, ids, tokens)
    }

    fn claim_locked(&self, args: &ClaimArgs<'_>, lot: u64) -> Vec<OutboxRow> {
        MemoryStore::claim_locked(self, args, lot)
    }

    fn end_lot(&self, lot: u64, writes: Option<&LotWrites>) {
        MemoryStore::end_lot(self, lot, writes);
    }
}
