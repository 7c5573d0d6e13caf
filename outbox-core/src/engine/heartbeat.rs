//! The lease heartbeat: extends the leases of the rows a subscriber holds
//! while they are in flight, so a handler (or a bus confirmation) may run
//! longer than `lease_ttl` without another claim taking its row.
//!
//! [`Leases`] tracks every row this subscriber holds a lease on, from its
//! claim (or, in [`ClaimMode::Transaction`](crate::ClaimMode::Transaction),
//! from the lease a lot gives a row that outlived `max_hold`) until its
//! delivery is [finished](super::SubShared::finished): buffered rows,
//! running handlers, outcomes waiting for their write. Every
//! [`lease_heartbeat`](crate::SubscriberOptions::lease_heartbeat) interval,
//! [`run`] writes one statement for those whose lease is at least half an
//! interval old (`acquired_at = now()`, the claim's clock, on each `(id,
//! token)` that still holds its token; nothing when none is due: a row
//! finished within half an interval is never extended, and a lease is at
//! most 1.5 intervals old when extended, half of `lease_ttl` by default), on a connection of the workers' write
//! pool (no connection of its own: the subscriber's connection count is
//! unchanged).
//!
//! A row missing from the statement's result either lost its lease
//! (another claim took it after an expiry, or an operator cleared it) or
//! has just been finished by its own outcome's write (an ack deleted it, a
//! retry cleared its token) between the snapshot and the statement. The
//! two cannot be told apart from the database, so a missing row is
//! suspect: it is no longer extended, and if its delivery is still not
//! finished at the next beat (an outcome's write reports its row at once),
//! it is reported as `lease_lost` with phase `heartbeat`. A buffered row
//! that is suspect is not handled (phase `buffered`).
//!
//! The heartbeat stops after the subscriber's drain (a stop), or with its
//! tasks (an abort).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::SubShared;
use super::message::Delivery;
use crate::broker::Step;
use crate::store::conn::{self as store, Write, Written};

/// The leases one subscriber holds, by row id. Inert (tracks nothing) when
/// the heartbeat is off.
#[derive(Debug)]
pub(crate) struct Leases {
    on: bool,
    held: std::sync::Mutex<HashMap<i64, Held>>,
}

/// One tracked lease.
#[derive(Debug)]
struct Held {
    token: Uuid,
    queue: String,
    deliveries_count: i64,
    /// When the lease last started (the claim, or the last extension's
    /// statement being sent: never later than the database's `now()`).
    renewed: Instant,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Extended at each beat.
    Live,
    /// Missing from the last extension's result: lost, unless its delivery
    /// finishes before the next beat.
    Missed,
    /// Reported lost; never extended again.
    Lost,
}

/// A lease the heartbeat found lost, to report.
#[derive(Debug)]
struct Lost {
    id: i64,
    queue: String,
    deliveries_count: i64,
}

impl Leases {
    /// `on`: the subscriber runs a heartbeat (else nothing is tracked).
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on,
            held: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<i64, Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts tracking `d`'s lease, which started at `since`. A row already
    /// tracked under an older token (its lease expired and this subscriber
    /// claimed it again) is tracked under the new one.
    pub(crate) fn track(&self, d: &Delivery, since: Instant) {
        if !self.on {
            return;
        }
        let held = Held {
            token: d.token,
            queue: d.row.queue.clone(),
            deliveries_count: d.row.deliveries_count,
            renewed: since,
            state: State::Live,
        };
        self.held().insert(d.row.id, held);
    }

    /// Stops tracking `d`'s lease: its delivery is finished (its final write
    /// landed, or it was released, abandoned or found lost).
    ///
    /// By id and token: when this subscriber claimed the row again while
    /// an older delivery of it still ran (the older lease was lost), the
    /// older delivery's end leaves the newer lease tracked.
    pub(crate) fn untrack(&self, d: &Delivery) {
        if !self.on {
            return;
        }
        let mut held = self.held();
        if held.get(&d.row.id).is_some_and(|h| h.token == d.token) {
            held.remove(&d.row.id);
        }
    }

    /// How many leases are tracked.
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the unit tests"))]
    pub(crate) fn len(&self) -> usize {
        self.held().len()
    }

    /// When `d`'s lease last started: its last extension, else its claim.
    pub(crate) fn since(&self, d: &Delivery) -> Instant {
        match self.held().get(&d.row.id) {
            Some(h) if h.token == d.token => h.renewed,
            _ => d.claimed_at,
        }
    }

    /// Whether `d`'s lease is over: `lease_ttl` passed since it last
    /// started, or an extension found it taken.
    pub(crate) fn expired(&self, d: &Delivery, lease_ttl: Duration) -> bool {
        let held = self.held();
        match held.get(&d.row.id) {
            Some(h) if h.token == d.token => {
                h.state != State::Live || h.renewed.elapsed() >= lease_ttl
            }
            _ => d.claimed_at.elapsed() >= lease_ttl,
        }
    }

    /// Starts a beat: the leases missed by the previous beat and still
    /// tracked are lost (returned to be reported, never extended again);
    /// returns them and the `(id, token)` pairs to extend now: the live
    /// leases at least `min_age` old.
    fn begin(&self, min_age: Duration) -> (Vec<(i64, Uuid)>, Vec<Lost>) {
        let mut extend = Vec::new();
        let mut lost = Vec::new();
        for (id, h) in self.held().iter_mut() {
            match h.state {
                State::Live if h.renewed.elapsed() >= min_age => extend.push((*id, h.token)),
                State::Live => {}
                State::Missed => {
                    h.state = State::Lost;
                    lost.push(Lost {
                        id: *id,
                        queue: h.queue.clone(),
                        deliveries_count: h.deliveries_count,
                    });
                }
                State::Lost => {}
            }
        }
        (extend, lost)
    }

    /// Ends a beat that asked to extend `asked` (the statement was sent at
    /// `sent`) and extended `kept`: those start their lease again, the
    /// others still tracked under the same token are suspect.
    fn end(&self, asked: &[(i64, Uuid)], kept: &HashSet<i64>, sent: Instant) {
        let mut held = self.held();
        for (id, token) in asked {
            let Some(h) = held.get_mut(id) else { continue };
            if h.token != *token || h.state != State::Live {
                continue;
            }
            if kept.contains(id) {
                h.renewed = sent;
            } else {
                h.state = State::Missed;
            }
        }
    }
}

/// One subscriber's heartbeat: every `every`, extends the leases it holds,
/// until `stop`.
pub(crate) async fn run(shared: Arc<SubShared>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = beat(&shared, every) => {}
        }
    }
}

/// One beat: reports the leases found lost, extends the others (one
/// statement; none when nothing is tracked).
async fn beat(shared: &SubShared, every: Duration) {
    let (asked, lost) = shared.leases.begin(every / 2);
    for l in lost {
        report(shared, &l);
    }
    if asked.is_empty() {
        return;
    }
    let pool = &shared.write_pool;
    let Ok(_permit) = pool.permits.acquire().await else {
        return; // never closed
    };
    let idle = pool.idle().pop();
    let mut conn = match idle {
        Some(c) => c,
        None => match shared.broker.store_conn(&shared.conn_opts).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    subscriber = %shared.sub.name(),
                    "outbox lease heartbeat cannot connect ({e}); {} leases not extended, \
                     retrying in {every:.1?}",
                    asked.len()
                );
                return;
            }
        },
    };
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = asked.iter().copied().unzip();
    let sent = Instant::now();
    let w = Write::Extend { ids, tokens };
    let result = store::execute(shared.broker.stmts(), &mut conn, &w).await;
    if !matches!(&result, Err(e) if store::is_connection_error(e)) {
        pool.idle().push(conn);
    }
    match result {
        Ok(Written::Ids(kept)) => {
            tracing::trace!(
                subscriber = %shared.sub.name(),
                asked = asked.len(),
                extended = kept.len(),
                "outbox leases extended"
            );
            shared.leases.end(&asked, &kept.into_iter().collect(), sent);
        }
        Ok(Written::Rows(_)) => {}
        Err(e) => tracing::warn!(
            subscriber = %shared.sub.name(),
            "outbox lease heartbeat failed ({e}); {} leases not extended, retrying in \
             {every:.1?} (a lease expires lease_ttl after its last extension)",
            asked.len()
        ),
    }
}

/// Reports a lease an extension found taken: the `lease_lost` metric
/// (phase `heartbeat`), a WARN, and the observer's step.
fn report(shared: &SubShared, l: &Lost) {
    shared.metrics.lease_lost(&l.queue, "heartbeat");
    tracing::warn!(
        event = "lease_lost",
        phase = "heartbeat",
        row_id = l.id,
        queue = %l.queue,
        deliveries_count = l.deliveries_count,
        "outbox row {} lost its lease: the heartbeat could not extend it (another claim took \
         it, or it was released); its outcome will not be written",
        l.id
    );
    shared
        .observer
        .step(l.id, Step::LeaseLost { phase: "heartbeat" });
    shared.observer.changed();
}

/// Starts `shared`'s heartbeat, if it has one.
pub(super) fn spawn(shared: &Arc<SubShared>) -> Option<(CancellationToken, JoinHandle<()>)> {
    let every = shared.opts().get_lease_heartbeat()?;
    let token = CancellationToken::new();
    let task = tokio::spawn(run(shared.clone(), every, token.clone()));
    Some((token, task))
}

/// Stops a heartbeat started by [`spawn`] and waits for it (a statement in
/// flight is abandoned: the leases it extends are given back or expire).
pub(super) async fn stop(heartbeat: Option<(CancellationToken, JoinHandle<()>)>) {
    if let Some((token, task)) = heartbeat {
        token.cancel();
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxRow;

    fn delivery(id: i64, token: Uuid) -> Delivery {
        let now = chrono::Utc::now();
        let row = OutboxRow {
            id,
            queue: "q".into(),
            payload: Vec::new(),
            headers: Default::default(),
            attempts_count: 0,
            deliveries_count: 1,
            created_at: now,
            next_attempt_at: now,
            first_attempt_at: None,
            last_attempt_at: None,
            acquired_at: Some(now),
            acquired_token: Some(token),
            timer_id: None,
            ordering_key: None,
        };
        Delivery::new(row, token)
    }

    #[test]
    fn off_tracks_nothing() {
        let leases = Leases::new(false);
        leases.track(&delivery(1, Uuid::new_v4()), Instant::now());
        assert_eq!(leases.len(), 0);
        assert!(leases.begin(Duration::ZERO).0.is_empty());
    }

    #[test]
    fn extended_rows_restart_their_lease_and_missed_ones_are_lost_a_beat_later() {
        let leases = Leases::new(true);
        let (a, b, c) = (
            delivery(1, Uuid::new_v4()),
            delivery(2, Uuid::new_v4()),
            delivery(3, Uuid::new_v4()),
        );
        let claim = Instant::now() - Duration::from_secs(10);
        for d in [&a, &b, &c] {
            leases.track(d, claim);
        }
        assert!(leases.expired(&a, Duration::from_secs(5)));
        let (mut asked, lost) = leases.begin(Duration::from_secs(5));
        asked.sort();
        assert_eq!(asked, [(1, a.token), (2, b.token), (3, c.token)]);
        assert!(lost.is_empty());
        // Row 1 is extended; 2 and 3 are missing (2 was acked meanwhile and
        // finishes before the next beat; 3 was taken by another claim).
        let sent = Instant::now();
        leases.end(&asked, &HashSet::from([1]), sent);
        assert_eq!(leases.since(&a), sent);
        assert!(!leases.expired(&a, Duration::from_secs(5)));
        assert!(leases.expired(&c, Duration::from_secs(60)), "suspect");
        leases.untrack(&b);
        // Row 1 was just extended: not due yet.
        let (asked, lost) = leases.begin(Duration::from_secs(5));
        assert!(asked.is_empty(), "{asked:?}");
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].id, 3);
        // Reported once; row 1 is due once its lease is old enough.
        let (asked, lost) = leases.begin(Duration::ZERO);
        assert_eq!(asked, [(1, a.token)], "a lost lease is not extended");
        assert!(lost.is_empty());
        leases.untrack(&a);
        leases.untrack(&c);
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn a_row_claimed_again_is_tracked_under_its_new_token() {
        let leases = Leases::new(true);
        let old = delivery(7, Uuid::new_v4());
        let new = delivery(7, Uuid::new_v4());
        leases.track(&old, Instant::now());
        let (asked, _) = leases.begin(Duration::ZERO);
        leases.track(&new, Instant::now());
        // The old token's miss does not mark the new lease.
        leases.end(&asked, &HashSet::new(), Instant::now());
        assert_eq!(leases.begin(Duration::ZERO).0, [(7, new.token)]);
        // The old delivery's lease is not the tracked one.
        assert_eq!(leases.since(&old), old.claimed_at);
        // The old delivery ends: the new lease stays tracked (extended).
        leases.untrack(&old);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases.begin(Duration::ZERO).0, [(7, new.token)]);
        leases.untrack(&new);
        assert_eq!(leases.len(), 0);
    }

    /// An engine on the in-memory store extends the lease of a row whose
    /// handler runs past `lease_ttl`, handles it once, and tracks nothing
    /// once the row is finished.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn a_long_handler_keeps_its_lease_and_nothing_stays_tracked() {
        use crate::broker::OutboxBroker;
        use crate::engine::Engine;
        use crate::engine::message::Message;
        use crate::engine::subscriber::Subscriber;
        use crate::store::OutboxTable;
        use crate::store::memory::MemoryStore;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let store = Arc::new(MemoryStore::new());
        let table = OutboxTable::new("outbox").expect("valid name");
        let broker = OutboxBroker::local(store.clone(), table);
        let calls = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (c, r) = (calls.clone(), release.clone());
        let lease_ttl = Duration::from_millis(300);
        let sub = Subscriber::builder(["q"])
            .lease_ttl(lease_ttl)
            .max_workers(2)
            .min_fetch_interval(Duration::from_millis(10))
            .max_fetch_interval(Duration::from_millis(20))
            .build(move |_: Message| {
                let (c, r) = (c.clone(), r.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    let _ = r.acquire().await.map(|p| p.forget());
                }
            })
            .expect("valid subscriber");
        let engine = Engine::new(broker.clone()).subscriber(sub);
        engine.start().await.expect("starts");
        let id = broker
            .publish_on(&1, "q", &Default::default(), None)
            .await
            .expect("published")
            .expect("a row");
        let tracked = || async {
            let state = engine.state.lock().await;
            state.as_ref().map_or(0, |r| r.subs[0].shared.leases.len())
        };
        async fn until(
            store: &MemoryStore,
            id: i64,
            what: &str,
            done: impl Fn(Option<OutboxRow>) -> bool,
        ) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(store.row(id)) {
                assert!(Instant::now() < deadline, "row {id} never {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        until(&store, id, "claimed", |r| {
            r.is_some_and(|r| r.acquired_at.is_some())
        })
        .await;
        let first = store.row(id).and_then(|r| r.acquired_at).expect("leased");
        // Three leases long: another claim would take an unextended row.
        tokio::time::sleep(lease_ttl * 3).await;
        let row = store.row(id).expect("still there");
        assert!(
            row.acquired_at.expect("still leased") > first,
            "the heartbeat moved acquired_at"
        );
        assert_eq!(row.deliveries_count, 1, "never claimed again");
        assert_eq!(tracked().await, 1);
        release.add_permits(1);
        until(&store, id, "gone", |r| r.is_none()).await;
        // Finished: untracked (the delete's report follows the statement).
        let deadline = Instant::now() + Duration::from_secs(5);
        while tracked().await != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tracked().await, 0, "nothing stays tracked");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        engine.stop().await;
    }
}
