//! The storage contract, run twice: every scenario here runs against the
//! in-memory store of `outbox_core::testing` and against real PostgreSQL
//! (`TestDb`), and must give the same result on both. A divergence is a bug
//! in one of them.
//!
//! Two layers, both written once against the [`Backend`] trait:
//!
//! - the store itself, statement by statement, through
//!   `outbox_core::testing::StoreOps` (the engine's own storage seam): claim
//!   (eligibility, order, limit, tokens, expired leases), the token-guarded
//!   writes, the lease release, the dead-letter move, publish, timers,
//!   cancel, batches, validation;
//! - the engine on top of it, through `TestApp` (synchronous dispatch and
//!   the real loops): ack, retry schedule, `max_deliveries`, dead letters,
//!   transport failures, timers, lease loss.
//!
//! Time: the memory backend runs on a frozen `TestClock` that the scenario
//! advances; PostgreSQL's clock cannot move, so there "advancing by d" shifts
//! every stored time back by d, which is the same for every comparison the
//! SQL makes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use outbox_core::retry::ConstantRetry;
use outbox_core::testing::{
    MemoryStore, OutgoingExt, StoreOps, TestApp, TestAppBuilder, TestClock,
};
use outbox_core::{
    AckPolicy, BoxError, ClaimMode, FailureReason, MemoryTransport, Message, OutboxBroker,
    PublishOptions, Response, Route, RouteBuilder, TimerConflict,
};
use tests::TestDb;
use uuid::Uuid;

type R = anyhow::Result<()>;

const TTL: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The two backends

/// What a scenario needs from a backend.
trait Backend {
    /// The engine's storage operations on this backend.
    fn ops(&self) -> &StoreOps;
    /// The operations on this backend's storage without a dead-letter table.
    fn ops_without_dead_letters(&self) -> StoreOps;
    /// The store's `now()`.
    async fn now(&self) -> anyhow::Result<DateTime<Utc>>;
    /// Moves the store's time forward by `by`.
    async fn advance(&self, by: Duration) -> R;
    /// A `TestApp` builder on this backend (its own storage, no discovery).
    fn app(&self) -> TestAppBuilder;
    /// The same, without a dead-letter table.
    fn app_without_dead_letters(&self) -> TestAppBuilder;
    /// How the engine scenarios' subscribers claim.
    fn claim(&self) -> ClaimMode;
    /// A route on `queues` in this run's claim mode.
    fn route<const N: usize>(&self, queues: [&str; N]) -> RouteBuilder {
        Route::builder(queues).claim_mode(self.claim())
    }
}

struct Memory {
    clock: TestClock,
    store: Arc<MemoryStore>,
    ops: StoreOps,
    claim: ClaimMode,
}

impl Memory {
    fn new(claim: ClaimMode) -> anyhow::Result<Self> {
        let clock = TestClock::frozen();
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let ops = StoreOps::memory(store.clone())?;
        Ok(Self {
            clock,
            store,
            ops,
            claim,
        })
    }
}

impl Backend for Memory {
    fn ops(&self) -> &StoreOps {
        &self.ops
    }
    fn ops_without_dead_letters(&self) -> StoreOps {
        StoreOps::memory_without_dead_letters(self.store.clone()).unwrap()
    }
    async fn now(&self) -> anyhow::Result<DateTime<Utc>> {
        Ok(self.clock.now())
    }
    async fn advance(&self, by: Duration) -> R {
        self.clock.advance(by);
        Ok(())
    }
    fn app(&self) -> TestAppBuilder {
        TestApp::builder()
            .without_discovery()
            .clock(TestClock::frozen())
    }
    fn app_without_dead_letters(&self) -> TestAppBuilder {
        self.app().without_dead_letter_table()
    }
    fn claim(&self) -> ClaimMode {
        self.claim
    }
}

struct Postgres {
    db: TestDb,
    ops: StoreOps,
    claim: ClaimMode,
}

impl Postgres {
    async fn new(claim: ClaimMode) -> anyhow::Result<Self> {
        let db = TestDb::new().await?;
        let ops = StoreOps::postgres(db.broker.clone());
        Ok(Self { db, ops, claim })
    }
}

impl Backend for Postgres {
    fn ops(&self) -> &StoreOps {
        &self.ops
    }
    fn ops_without_dead_letters(&self) -> StoreOps {
        StoreOps::postgres(OutboxBroker::new(
            self.db.pool.clone(),
            self.db.table.clone(),
        ))
    }
    async fn now(&self) -> anyhow::Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.db.pool)
            .await?)
    }
    async fn advance(&self, by: Duration) -> R {
        let i = format!("make_interval(secs => {})", by.as_secs_f64());
        self.db
            .exec(format!(
                "UPDATE {} SET created_at = created_at - {i}, next_attempt_at = next_attempt_at - {i}, \
                 first_attempt_at = first_attempt_at - {i}, last_attempt_at = last_attempt_at - {i}, \
                 acquired_at = acquired_at - {i}",
                self.db.t()
            ))
            .await?;
        self.db
            .exec(format!(
                "UPDATE {} SET created_at = created_at - {i}, failed_at = failed_at - {i}",
                self.db.d()
            ))
            .await?;
        Ok(())
    }
    fn app(&self) -> TestAppBuilder {
        TestApp::builder()
            .without_discovery()
            .postgres(self.db.broker.clone())
    }
    fn app_without_dead_letters(&self) -> TestAppBuilder {
        TestApp::builder()
            .without_discovery()
            .postgres(OutboxBroker::new(
                self.db.pool.clone(),
                self.db.table.clone(),
            ))
    }
    fn claim(&self) -> ClaimMode {
        self.claim
    }
}

/// Each scenario becomes `scenario::memory` and `scenario::postgres`
/// (engine scenarios in [`ClaimMode::Lease`]).
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use outbox_core::ClaimMode::Lease;
                #[tokio::test]
                async fn memory() -> super::R {
                    super::$name(&super::Memory::new(Lease)?).await
                }
                #[tokio::test]
                async fn postgres() -> super::R {
                    super::$name(&super::Postgres::new(Lease).await?).await
                }
            }
        )*
    };
}

/// An engine scenario whose result is the same in both claim modes: it
/// also runs as `scenario::memory_lots` and `scenario::postgres_lots`, its
/// subscribers in [`ClaimMode::Transaction`].
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use outbox_core::ClaimMode::{Lease, Transaction};
                #[tokio::test]
                async fn memory() -> super::R {
                    super::$name(&super::Memory::new(Lease)?).await
                }
                #[tokio::test]
                async fn postgres() -> super::R {
                    super::$name(&super::Postgres::new(Lease).await?).await
                }
                #[tokio::test]
                async fn memory_lots() -> super::R {
                    super::$name(&super::Memory::new(Transaction)?).await
                }
                #[tokio::test]
                async fn postgres_lots() -> super::R {
                    super::$name(&super::Postgres::new(Transaction).await?).await
                }
            }
        )*
    };
}

// Storage scenarios, and engine scenarios particular to leases.
contract!(
    publish_then_claim_leases_the_row,
    claims_follow_next_attempt_then_id_within_the_limit,
    multi_queue_claims_respect_the_limit,
    acks_need_the_lease_token,
    batched_acks_delete_only_what_still_holds,
    retries_reschedule_on_the_store_clock,
    expired_leases_are_reclaimed_and_the_old_token_loses,
    dead_letters_copy_the_projection,
    dead_letter_writes_need_a_dead_letter_table,
    timer_ignore_keeps_one_live_row,
    timer_extend_keeps_the_later_deadline,
    timer_extend_leaves_a_leased_row_alone,
    cancel_timer_deletes_only_unleased_rows,
    batch_publish_inserts_every_row,
    release_gives_the_claim_back,
    invalid_arguments_fail_the_same_way,
    unprocessed_reads_by_id_including_future_rows,
    timestamps_are_kept_to_the_microsecond,
    keys_are_stored_and_batches_keep_their_order,
    ordered_claims_take_only_the_head_of_each_key,
    ordered_claims_walk_the_keys_from_the_cursor,
    a_retrying_head_keeps_its_key_back,
    an_expired_head_is_reclaimed_before_its_successor,
    dead_letters_keep_the_key,
    app_loop_mode_lease_loss_is_a_no_op_write,
    lot_claims_lock_rows_without_writing_a_lease,
    a_rolled_back_lot_leaves_its_rows_as_they_were,
    lot_dead_letters_count_the_delivery,
    ordered_lots_skip_locked_heads,
    lot_leases_hand_overdue_rows_to_the_lease_writes,
);

// Engine scenarios that hold in both claim modes.
both_modes!(
    app_acks_and_relays,
    app_retries_on_schedule_then_dead_letters,
    app_max_deliveries_stops_without_running_the_handler,
    app_transport_failures_are_retried,
    app_rejects_are_dead_lettered,
    app_timers_fire_when_due_and_cancel,
    app_batch_publish_delivers_every_row,
    app_without_dead_letter_table_deletes_terminal_rows,
    app_loop_mode_drains_and_retries,
    app_ordered_block_policy_waits_for_the_head,
    app_ordered_dead_letter_and_continue_moves_on,
    app_relays_the_row_key_as_the_message_key,
);

// ---------------------------------------------------------------------------
// Helpers

fn opts() -> PublishOptions {
    PublishOptions::new()
}

fn past(now: DateTime<Utc>, secs: i64) -> PublishOptions {
    opts().activate_at(now - TimeDelta::seconds(secs))
}

async fn publish<B: Backend>(
    b: &B,
    body: &str,
    queue: &str,
    o: &PublishOptions,
) -> anyhow::Result<i64> {
    Ok(b.ops()
        .publish(&body.to_owned(), queue, o)
        .await?
        .expect("inserted"))
}

async fn row<B: Backend>(b: &B, id: i64) -> anyhow::Result<outbox_core::OutboxRow> {
    Ok(b.ops()
        .rows()
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .expect("row present"))
}

fn body(r: &outbox_core::OutboxRow) -> String {
    r.decode::<String>().unwrap()
}

fn secs(d: TimeDelta) -> f64 {
    d.num_microseconds().unwrap() as f64 / 1e6
}

// ---------------------------------------------------------------------------
// The store

async fn publish_then_claim_leases_the_row<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let id = ops
        .publish(&1_i64, "q", &opts().header("x-tenant", "acme"))
        .await?
        .unwrap();
    let stored = row(b, id).await?;
    assert_eq!(stored.payload, b"1");
    assert_eq!(stored.headers["content-type"], "application/json");
    assert_eq!(stored.headers["x-tenant"], "acme");
    assert_eq!(stored.headers["correlation_id"].len(), 36);
    assert_eq!(
        (stored.attempts_count, stored.deliveries_count),
        (0, 0),
        "fresh row"
    );
    assert_eq!(stored.next_attempt_at, stored.created_at);
    assert!(stored.acquired_at.is_none() && stored.acquired_token.is_none());

    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(claim.ids(), [id]);
    let r = &claim.rows[0];
    assert_eq!(r.acquired_token, Some(claim.token));
    assert_eq!(r.deliveries_count, 1);
    assert_eq!(r.attempts_count, 0);
    assert!(r.acquired_at.unwrap() >= r.created_at);
    assert_eq!(r.headers, stored.headers);
    assert_eq!(r.payload, stored.payload);
    assert!(r.first_attempt_at.is_none() && r.last_attempt_at.is_none());
    assert_eq!(row(b, id).await?, *r, "the claim returns the row as stored");

    assert!(ops.claim(&["q"], 10, TTL).await?.rows.is_empty(), "leased");
    assert!(ops.claim(&["other"], 10, TTL).await?.rows.is_empty());
    Ok(())
}

async fn claims_follow_next_attempt_then_id_within_the_limit<B: Backend>(b: &B) -> R {
    let now = b.now().await?;
    let a = publish(b, "a", "q", &past(now, 10)).await?;
    let bb = publish(b, "b", "q", &past(now, 30)).await?;
    let c = publish(b, "c", "q", &past(now, 10)).await?;
    publish(
        b,
        "future",
        "q",
        &opts().activate_in(Duration::from_secs(3600)),
    )
    .await?;
    let x = publish(b, "x", "x", &opts()).await?;
    let ops = b.ops();
    let first = ops.claim(&["q"], 2, TTL).await?;
    assert_eq!(first.ids(), [bb, a], "(next_attempt_at, id) order, limit 2");
    let second = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(second.ids(), [c], "the rest; the future row waits");
    assert_ne!(first.token, second.token, "a token per claim");
    assert!(ops.claim(&["q"], 10, TTL).await?.rows.is_empty());
    assert_eq!(ops.claim(&["x", "x"], 10, TTL).await?.ids(), [x]);
    Ok(())
}

async fn multi_queue_claims_respect_the_limit<B: Backend>(b: &B) -> R {
    let now = b.now().await?;
    let mut expected = Vec::new();
    for i in 0..4 {
        // q1 rows are older than q2 rows of the same index.
        expected.push(publish(b, "1", "q1", &past(now, 100 - 2 * i)).await?);
        expected.push(publish(b, "2", "q2", &past(now, 99 - 2 * i)).await?);
    }
    let ops = b.ops();
    let pending = ops.claim_pending(&["q1", "q2"], 3).await?;
    assert_eq!(
        pending.ids(),
        expected[..3],
        "the pending-only claim takes the oldest 3 over both queues"
    );
    let full = ops.claim(&["q1", "q2"], 3, TTL).await?;
    assert_eq!(full.ids(), expected[3..6]);
    let rest = ops.claim(&["q2", "q1"], 10, TTL).await?;
    assert_eq!(rest.ids(), expected[6..]);
    Ok(())
}

async fn acks_need_the_lease_token<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let id = publish(b, "a", "q", &opts()).await?;
    assert!(
        !ops.ack(id, Uuid::new_v4()).await?,
        "unleased: no token matches"
    );
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert!(!ops.ack(id, Uuid::new_v4()).await?, "another token");
    assert!(ops.ack(id, claim.token).await?);
    assert!(!ops.ack(id, claim.token).await?, "already deleted");
    assert!(ops.rows().await?.is_empty());
    assert!(
        ops.dead_letters().await?.is_empty(),
        "an ack archives nothing"
    );
    Ok(())
}

async fn batched_acks_delete_only_what_still_holds<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    for body in ["a", "b", "c"] {
        publish(b, body, "q", &opts()).await?;
    }
    let claim = ops.claim(&["q"], 10, TTL).await?;
    let [x, y, z] = claim.ids()[..] else {
        panic!("three rows")
    };
    let deleted = ops
        .ack_batch(&[
            (x, claim.token),
            (y, Uuid::new_v4()),
            (z, claim.token),
            (x, claim.token),
        ])
        .await?;
    assert_eq!(deleted, [x, z]);
    let left = ops.rows().await?;
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].id, left[0].acquired_token),
        (y, Some(claim.token)),
        "still leased"
    );
    assert!(ops.ack_batch(&[]).await?.is_empty());
    Ok(())
}

async fn retries_reschedule_on_the_store_clock<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let id = publish(b, "a", "q", &opts()).await?;
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert!(
        !ops.retry(id, Uuid::new_v4(), Duration::from_secs(30))
            .await?
    );
    assert!(ops.retry(id, claim.token, Duration::from_secs(30)).await?);
    let r = row(b, id).await?;
    assert_eq!(r.attempts_count, 1);
    assert_eq!(r.deliveries_count, 1);
    assert!(
        r.acquired_at.is_none() && r.acquired_token.is_none(),
        "lease released"
    );
    let (first, last) = (r.first_attempt_at.unwrap(), r.last_attempt_at.unwrap());
    let created = r.created_at;
    assert_eq!(first, last);
    assert_eq!(
        r.next_attempt_at - last,
        TimeDelta::seconds(30),
        "now + delay"
    );
    assert!(
        !ops.retry(id, claim.token, Duration::from_secs(30)).await?,
        "the lease is gone"
    );

    assert!(ops.claim(&["q"], 10, TTL).await?.rows.is_empty(), "not due");
    b.advance(Duration::from_secs(29)).await?;
    assert!(
        ops.claim(&["q"], 10, TTL).await?.rows.is_empty(),
        "still not due"
    );
    b.advance(Duration::from_secs(2)).await?;
    let again = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(again.ids(), [id]);
    assert_eq!(
        (again.rows[0].deliveries_count, again.rows[0].attempts_count),
        (2, 1)
    );
    assert!(
        ops.retry(id, again.token, Duration::from_millis(1500))
            .await?
    );
    let r = row(b, id).await?;
    assert_eq!(r.attempts_count, 2);
    let first_now = r.first_attempt_at.unwrap();
    let last_now = r.last_attempt_at.unwrap();
    assert_eq!(
        first_now - r.created_at,
        first - created,
        "the first attempt is kept"
    );
    assert!(
        (secs(last_now - first_now) - 31.0).abs() < 0.5,
        "last attempt moved: {}",
        secs(last_now - first_now)
    );
    assert_eq!(r.next_attempt_at - last_now, TimeDelta::milliseconds(1500));
    Ok(())
}

async fn expired_leases_are_reclaimed_and_the_old_token_loses<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let ttl = Duration::from_secs(10);
    let id = publish(b, "a", "q", &opts()).await?;
    let old = ops.claim(&["q"], 10, ttl).await?;
    b.advance(Duration::from_secs(5)).await?;
    assert!(
        ops.claim(&["q"], 10, ttl).await?.rows.is_empty(),
        "lease alive"
    );
    b.advance(Duration::from_secs(6)).await?;
    assert!(
        ops.claim_pending(&["q"], 10).await?.rows.is_empty(),
        "the pending-only claim never takes leased rows"
    );
    let new = ops.claim(&["q"], 10, ttl).await?;
    assert_eq!(new.ids(), [id], "expired lease reclaimed");
    assert_eq!(new.rows[0].deliveries_count, 2);
    assert_ne!(new.token, old.token);

    assert!(!ops.ack(id, old.token).await?, "lease lost");
    assert!(!ops.retry(id, old.token, Duration::from_secs(1)).await?);
    assert!(
        !ops.dead_letter(id, old.token, FailureReason::Rejected, None)
            .await?
    );
    assert_eq!(ops.release(&[(id, old.token)]).await?, 0);
    assert!(ops.dead_letters().await?.is_empty());
    let r = row(b, id).await?;
    assert_eq!(
        (r.acquired_token, r.deliveries_count, r.attempts_count),
        (Some(new.token), 2, 0),
        "the late writes changed nothing"
    );
    assert!(ops.ack(id, new.token).await?);
    Ok(())
}

async fn dead_letters_copy_the_projection<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let id = publish(b, "a", "q", &opts().timer_id("t1").header("x-h", "v")).await?;
    let stored = row(b, id).await?;
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert!(
        !ops.dead_letter(id, Uuid::new_v4(), FailureReason::Rejected, Some("x"))
            .await?
    );
    assert!(ops.dead_letters().await?.is_empty());
    assert!(
        ops.dead_letter(
            id,
            claim.token,
            FailureReason::RetryTerminal,
            Some("boom: disk on fire")
        )
        .await?
    );
    assert!(ops.rows().await?.is_empty());
    let dead = ops.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.original_id, id);
    assert_eq!(d.queue, "q");
    assert_eq!(d.payload, stored.payload);
    assert_eq!(d.headers, stored.headers);
    assert_eq!(d.deliveries_count, 1);
    assert_eq!(d.created_at, stored.created_at);
    assert_eq!(d.timer_id.as_deref(), Some("t1"));
    assert_eq!(d.failure_reason, "retry_terminal");
    assert_eq!(d.last_exception.as_deref(), Some("boom: disk on fire"));
    assert!(d.failed_at >= d.created_at);
    assert_eq!(d.decode::<String>()?, "a");
    // The timer id is free again once the row left the outbox.
    let again = publish(b, "b", "q", &opts().timer_id("t1")).await?;
    assert!(again > id);
    // A second dead letter without an error text.
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert!(
        ops.dead_letter(again, claim.token, FailureReason::MaxDeliveries, None)
            .await?
    );
    let dead = ops.dead_letters().await?;
    assert_eq!(dead.len(), 2);
    assert!(dead[1].id > dead[0].id);
    assert_eq!(
        (
            dead[1].failure_reason.as_str(),
            dead[1].last_exception.as_deref()
        ),
        ("max_deliveries", None)
    );
    Ok(())
}

async fn dead_letter_writes_need_a_dead_letter_table<B: Backend>(b: &B) -> R {
    let ops = b.ops_without_dead_letters();
    let id = ops.publish(&1, "q", &opts()).await?.unwrap();
    let claim = ops.claim(&["q"], 10, TTL).await?;
    let err = ops
        .dead_letter(id, claim.token, FailureReason::Rejected, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a dead-letter write without a dead-letter table"),
        "{err}"
    );
    assert_eq!(
        ops.rows().await?[0].acquired_token,
        Some(claim.token),
        "row kept"
    );
    assert!(ops.dead_letters().await?.is_empty());
    Ok(())
}

async fn timer_ignore_keeps_one_live_row<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let t = opts()
        .timer_id("reminder")
        .activate_in(Duration::from_secs(60));
    let id = publish(b, "first", "q", &t).await?;
    assert_eq!(ops.publish(&"second", "q", &t).await?, None, "ignored");
    assert_eq!(
        ops.publish(&"now", "q", &opts().timer_id("reminder"))
            .await?,
        None,
        "whatever the schedule"
    );
    let other = publish(b, "other queue", "q2", &t).await?;
    assert_eq!(
        other,
        id + 3,
        "each conflict consumed an id, as BIGSERIAL does"
    );
    let rows = ops.rows().await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(body(&rows[0]), "first");
    Ok(())
}

async fn timer_extend_keeps_the_later_deadline<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let ext = |secs: u64| {
        opts()
            .timer_id("t")
            .timer_conflict(TimerConflict::Extend)
            .activate_in(Duration::from_secs(secs))
    };
    let id = publish(b, "a", "q", &ext(60)).await?;
    let before = row(b, id).await?;
    assert_eq!(
        ops.publish(&"b", "q", &ext(120)).await?,
        Some(id),
        "extended"
    );
    let r = row(b, id).await?;
    assert_eq!(body(&r), "b", "payload replaced");
    let moved = secs(r.next_attempt_at - before.next_attempt_at);
    assert!((60.0..61.0).contains(&moved), "deadline moved by {moved}");
    assert_eq!(r.created_at, before.created_at);
    assert_eq!(
        ops.publish(&"c", "q", &ext(30)).await?,
        Some(id),
        "still the id"
    );
    let r2 = row(b, id).await?;
    assert_eq!(body(&r2), "b", "an earlier deadline changes nothing");
    assert_eq!(r2.next_attempt_at, r.next_attempt_at);
    assert_eq!(r2.headers, r.headers);

    // A later deadline resets the retry history, keeps deliveries_count.
    let id2 = publish(
        b,
        "x",
        "q",
        &opts().timer_id("t2").timer_conflict(TimerConflict::Extend),
    )
    .await?;
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(claim.ids(), [id2]);
    assert!(ops.retry(id2, claim.token, Duration::from_secs(5)).await?);
    let retried = row(b, id2).await?;
    assert_eq!(retried.attempts_count, 1);
    let y = opts()
        .timer_id("t2")
        .timer_conflict(TimerConflict::Extend)
        .activate_in(Duration::from_secs(3600));
    assert_eq!(ops.publish(&"y", "q", &y).await?, Some(id2));
    let reset = row(b, id2).await?;
    assert_eq!(body(&reset), "y");
    assert_eq!(
        (reset.attempts_count, reset.deliveries_count),
        (0, 1),
        "history reset, claims kept"
    );
    assert!(reset.first_attempt_at.is_none() && reset.last_attempt_at.is_none());
    Ok(())
}

async fn timer_extend_leaves_a_leased_row_alone<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let ext = opts().timer_id("t").timer_conflict(TimerConflict::Extend);
    let id = publish(b, "a", "q", &ext).await?;
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(claim.ids(), [id]);
    let leased = row(b, id).await?;
    let later = ext.clone().activate_in(Duration::from_secs(3600));
    assert_eq!(ops.publish(&"b", "q", &later).await?, None, "leased: no-op");
    assert_eq!(row(b, id).await?, leased, "untouched");
    assert_eq!(ops.publish(&"c", "q", &opts().timer_id("t")).await?, None);
    assert!(ops.ack(id, claim.token).await?);
    assert!(ops.publish(&"d", "q", &ext).await?.is_some(), "free again");
    Ok(())
}

async fn cancel_timer_deletes_only_unleased_rows<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let t = |id: &str| opts().timer_id(id).activate_in(Duration::from_secs(60));
    publish(b, "a", "q", &t("a")).await?;
    assert!(ops.cancel_timer("q", "a").await?);
    assert!(!ops.cancel_timer("q", "a").await?, "gone");
    assert!(!ops.cancel_timer("q", "unknown").await?);
    assert!(ops.rows().await?.is_empty());
    let id = publish(b, "b", "q", &opts().timer_id("b")).await?;
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(claim.ids(), [id]);
    assert!(!ops.cancel_timer("q", "b").await?, "leased: being handled");
    assert!(!ops.cancel_timer("other", "b").await?, "per queue");
    assert_eq!(ops.rows().await?.len(), 1);
    assert!(
        ops.publish(&"a2", "q", &t("a")).await?.is_some(),
        "reusable"
    );
    Ok(())
}

async fn batch_publish_inserts_every_row<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let n = ops
        .publish_batch([1_i64, 2, 3], "q", &opts().header("x-batch", "yes"))
        .await?;
    assert_eq!(n, 3);
    let rows = ops.rows().await?;
    assert_eq!(rows.len(), 3);
    let bodies: Vec<i64> = rows.iter().map(|r| r.decode().unwrap()).collect();
    assert_eq!(bodies, [1, 2, 3], "in order");
    let mut correlations: Vec<&str> = rows
        .iter()
        .map(|r| r.headers["correlation_id"].as_str())
        .collect();
    correlations.dedup();
    assert_eq!(correlations.len(), 3, "a correlation id each");
    assert!(rows.iter().all(|r| r.headers["x-batch"] == "yes"
        && r.headers["content-type"] == "application/json"
        && r.created_at == rows[0].created_at
        && r.next_attempt_at == r.created_at
        && r.timer_id.is_none()));
    assert!(rows.windows(2).all(|w| w[1].id == w[0].id + 1));

    let later = opts().activate_in(Duration::from_secs(60));
    assert_eq!(ops.publish_batch(["a", "b"], "later", &later).await?, 2);
    assert!(ops.claim(&["later"], 10, TTL).await?.rows.is_empty());
    b.advance(Duration::from_secs(60)).await?;
    assert_eq!(ops.claim(&["later"], 10, TTL).await?.rows.len(), 2);
    assert_eq!(ops.publish_batch(Vec::<i64>::new(), "q", &opts()).await?, 0);
    assert_eq!(ops.claim(&["q"], 2, TTL).await?.rows.len(), 2);
    Ok(())
}

async fn release_gives_the_claim_back<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let x = publish(b, "x", "q", &opts()).await?;
    let y = publish(b, "y", "q", &opts()).await?;
    let claim = ops.claim(&["q"], 10, TTL).await?;
    let released = ops
        .release(&[(x, claim.token), (y, Uuid::new_v4()), (x, claim.token)])
        .await?;
    assert_eq!(released, 1);
    let rx = row(b, x).await?;
    assert!(rx.acquired_token.is_none() && rx.acquired_at.is_none());
    assert_eq!(rx.deliveries_count, 0, "the claim is given back");
    assert_eq!(row(b, y).await?.acquired_token, Some(claim.token));
    let again = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(again.ids(), [x]);
    assert_eq!(again.rows[0].deliveries_count, 1);
    Ok(())
}

async fn invalid_arguments_fail_the_same_way<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let err = |r: outbox_core::Result<Option<i64>>| r.unwrap_err().to_string();
    assert_eq!(
        err(ops.publish(&1, "", &opts()).await),
        "queue must be a non-empty string"
    );
    assert_eq!(
        err(ops.publish(&1, &"q".repeat(256), &opts()).await),
        "queue must be at most 255 characters (got 256)"
    );
    assert!(
        err(ops
            .publish(
                &1,
                "q",
                &opts()
                    .activate_in(Duration::from_secs(1))
                    .activate_at(Utc::now())
            )
            .await)
        .contains("at most one of activate_in / activate_at")
    );
    assert!(
        err(ops
            .publish(&1, "q", &opts().timer_conflict(TimerConflict::Extend))
            .await)
        .contains("requires a timer_id")
    );
    assert!(
        err(ops
            .publish(&1, "q", &opts().header("content-type", "text/plain"))
            .await)
        .contains("conflicts with the body's encoding")
    );
    let batch_err = ops
        .publish_batch([1], "q", &opts().timer_id("t"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        batch_err.contains("not supported for batch publishes"),
        "{batch_err}"
    );
    assert_eq!(
        ops.cancel_timer("q", "").await.unwrap_err().to_string(),
        "timer_id must be a non-empty string"
    );
    assert_eq!(
        ops.unprocessed(None, 0).await.unwrap_err().to_string(),
        "limit must be >= 1, got 0"
    );
    assert!(ops.rows().await?.is_empty(), "nothing was written");
    Ok(())
}

async fn unprocessed_reads_by_id_including_future_rows<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a = publish(b, "a", "q", &opts().activate_in(Duration::from_secs(3600))).await?;
    let x = publish(b, "x", "other", &opts()).await?;
    let c = publish(b, "c", "q", &opts()).await?;
    assert_eq!(
        ops.unprocessed(None, 10)
            .await?
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [a, x, c]
    );
    assert_eq!(
        ops.unprocessed(Some("q"), 1)
            .await?
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [a]
    );
    // Returned rows are copies: changing them changes nothing stored.
    let mut copy = ops.unprocessed(Some("q"), 10).await?;
    copy[0].headers.insert("mutated".into(), "yes".into());
    copy[0].payload.clear();
    let fresh = row(b, a).await?;
    assert!(!fresh.headers.contains_key("mutated"));
    assert_eq!(body(&fresh), "a");
    Ok(())
}

async fn timestamps_are_kept_to_the_microsecond<B: Backend>(b: &B) -> R {
    let now = b.now().await?;
    let at = now - TimeDelta::seconds(5) + TimeDelta::nanoseconds(123_456_789);
    let id = publish(b, "a", "q", &opts().activate_at(at)).await?;
    let r = row(b, id).await?;
    assert_eq!(r.next_attempt_at.timestamp_subsec_nanos() % 1000, 0);
    assert_eq!(
        r.next_attempt_at,
        at - TimeDelta::nanoseconds(i64::from(at.timestamp_subsec_nanos() % 1000))
    );
    let claim = b.ops().claim(&["q"], 1, TTL).await?;
    assert!(
        b.ops()
            .retry(id, claim.token, Duration::from_nanos(1_500_499))
            .await?
    );
    let r = row(b, id).await?;
    assert_eq!(
        r.next_attempt_at - r.last_attempt_at.unwrap(),
        TimeDelta::microseconds(1500),
        "make_interval rounds to the microsecond"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The engine on top of it (TestApp)

fn seed_route<B: Backend>(b: &B) -> Route {
    b.route(["orders"])
        .publish_to("kafka", "orders.kafka")
        .handler(|msg: Message, _| async move {
            let order_id: i64 = msg.decode()?;
            Ok::<_, BoxError>(Response::new(order_id))
        })
}

fn always_failing(
    calls: Arc<AtomicUsize>,
) -> impl Fn(Message, outbox_core::AppContext) -> std::future::Ready<Result<(), BoxError>>
+ Send
+ Sync
+ 'static {
    move |msg: Message, _| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(
            format!("boom on attempt {}", msg.attempts_count() + 1).into()
        ))
    }
}

async fn app_acks_and_relays<B: Backend>(b: &B) -> R {
    let kafka = MemoryTransport::new("kafka");
    let app = b
        .app()
        .subscriber(seed_route(b))
        .transport(kafka.clone())
        .start()
        .await?;
    let id = app
        .publish_with(
            &1_i64,
            "orders",
            &opts().header("x-tenant", "acme").correlation_id("c-1"),
        )
        .await?
        .unwrap();
    let sent = kafka.messages_to("orders.kafka");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].value::<i64>().unwrap(), 1);
    assert_eq!(sent[0].header("outbox-id"), Some(id.to_string().as_str()));
    assert_eq!(sent[0].correlation_id(), Some("c-1"));
    assert_eq!(sent[0].header("content-type"), Some("application/json"));
    assert_eq!(
        sent[0].header("x-tenant"),
        Some("acme"),
        "propagated by default"
    );
    assert_eq!(app.history(id).to_string(), "claimed(1), acked");
    assert_eq!(app.handled_bodies::<i64>("orders")?, [1]);
    assert_eq!(app.handled("orders")[0].headers["x-tenant"], "acme");
    assert!(app.rows().await?.is_empty());
    assert!(app.dead_letters().await?.is_empty());
    app.stop().await?;
    assert!(kafka.is_closed());
    Ok(())
}

async fn app_retries_on_schedule_then_dead_letters<B: Backend>(b: &B) -> R {
    let calls = Arc::new(AtomicUsize::new(0));
    let route = b
        .route(["q"])
        .retry(ConstantRetry::new(Duration::from_secs(10)).max_attempts(3))
        .handler(always_failing(calls.clone()));
    let app = b.app().subscriber(route).start().await?;
    let id = app.publish(&1, "q").await?;
    assert_eq!(app.history(id).to_string(), "claimed(1), retried");
    let r = app.row(id).await?.unwrap();
    assert_eq!(r.attempts_count, 1);
    assert_eq!(
        r.next_attempt_at - r.last_attempt_at.unwrap(),
        TimeDelta::seconds(10)
    );
    app.advance(Duration::from_secs(9)).await?;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not due yet");
    app.advance(Duration::from_secs(1)).await?;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    app.advance(Duration::from_secs(10)).await?;
    let h = app.history(id);
    assert_eq!(
        h.to_string(),
        "claimed(1), retried, claimed(2), retried, claimed(3), dead_lettered(retry_terminal)"
    );
    assert_eq!(
        (h.retries(), h.failure_reason()),
        (2, Some(FailureReason::RetryTerminal))
    );
    let dead = app.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].original_id, id);
    assert_eq!(dead[0].failure_reason, "retry_terminal");
    assert_eq!(dead[0].last_exception.as_deref(), Some("boom on attempt 3"));
    assert_eq!(dead[0].deliveries_count, 3);
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

async fn app_max_deliveries_stops_without_running_the_handler<B: Backend>(b: &B) -> R {
    let calls = Arc::new(AtomicUsize::new(0));
    let route = b
        .route(["q"])
        .retry(ConstantRetry::new(Duration::from_secs(1)))
        .max_deliveries(2)
        .handler(always_failing(calls.clone()));
    let app = b.app().subscriber(route).start().await?;
    let id = app.publish(&1, "q").await?;
    app.advance(Duration::from_secs(1)).await?;
    app.advance(Duration::from_secs(1)).await?;
    assert_eq!(
        app.history(id).to_string(),
        "claimed(1), retried, claimed(2), retried, claimed(3), dead_lettered(max_deliveries)"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the third claim ran no handler"
    );
    let dead = app.dead_letters().await?;
    assert_eq!(
        (
            dead[0].failure_reason.as_str(),
            dead[0].last_exception.as_deref(),
            dead[0].deliveries_count
        ),
        ("max_deliveries", None, 3)
    );
    app.stop().await?;
    Ok(())
}

async fn app_transport_failures_are_retried<B: Backend>(b: &B) -> R {
    let kafka = MemoryTransport::new("kafka");
    let route = b
        .route(["orders"])
        .retry(ConstantRetry::new(Duration::from_secs(5)))
        .publish_to("kafka", "orders.kafka")
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(
                Response::new(msg.decode::<i64>()?)
                    .key("k1")
                    .header("h", "v"),
            )
        });
    let app = b
        .app()
        .subscriber(route)
        .transport(kafka.clone())
        .start()
        .await?;
    kafka.fail_next(2);
    let id = app.publish(&7_i64, "orders").await?;
    app.advance(Duration::from_secs(5)).await?;
    assert!(kafka.messages().is_empty());
    app.advance(Duration::from_secs(5)).await?;
    assert_eq!(
        app.history(id).to_string(),
        "claimed(1), retried, claimed(2), retried, claimed(3), acked"
    );
    let sent = kafka.messages_to("orders.kafka");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].key_str(), sent[0].header("h")),
        (Some("k1"), Some("v"))
    );
    assert_eq!(sent[0].value::<i64>().unwrap(), 7);
    app.stop().await?;
    Ok(())
}

async fn app_rejects_are_dead_lettered<B: Backend>(b: &B) -> R {
    let manual =
        b.route(["manual"])
            .ack_policy(AckPolicy::Manual)
            .handler(|msg: Message, _| async move {
                msg.reject();
            });
    let strict = b
        .route(["strict"])
        .ack_policy(AckPolicy::RejectOnError)
        .handler(|_msg: Message, _| async move { Err::<(), BoxError>("invalid order".into()) });
    let app = b
        .app()
        .subscriber(manual)
        .subscriber(strict)
        .start()
        .await?;
    let a = app.publish(&1, "manual").await?;
    let s = app.publish(&2, "strict").await?;
    assert_eq!(
        app.history(a).to_string(),
        "claimed(1), dead_lettered(rejected)"
    );
    assert_eq!(
        app.history(s).to_string(),
        "claimed(1), dead_lettered(rejected)"
    );
    let dead = app.dead_letters().await?;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[1].last_exception.as_deref(), Some("invalid order"));
    app.stop().await?;
    Ok(())
}

async fn app_timers_fire_when_due_and_cancel<B: Backend>(b: &B) -> R {
    let route = b.route(["reminders"]).handler(|_m: Message, _| async {});
    let app = b.app().subscriber(route).start().await?;
    let ext = |secs: u64| {
        opts()
            .timer_id("order-7")
            .timer_conflict(TimerConflict::Extend)
            .activate_in(Duration::from_secs(secs))
    };
    let id = app
        .publish_with(&"v1", "reminders", &ext(60))
        .await?
        .unwrap();
    assert!(app.handled("reminders").is_empty(), "not due");
    assert_eq!(
        app.publish_with(&"v2", "reminders", &ext(120)).await?,
        Some(id)
    );
    app.advance(Duration::from_secs(60)).await?;
    assert!(app.handled("reminders").is_empty(), "extended to 120 s");
    assert!(app.cancel_timer("reminders", "order-7").await?);
    app.advance(Duration::from_secs(120)).await?;
    assert!(app.handled("reminders").is_empty(), "cancelled");
    let id2 = app
        .publish_with(&"v3", "reminders", &ext(30))
        .await?
        .unwrap();
    assert_ne!(id2, id);
    app.advance(Duration::from_secs(30)).await?;
    assert_eq!(app.handled_bodies::<String>("reminders")?, ["v3"]);
    assert_eq!(app.history(id2).to_string(), "claimed(1), acked");
    app.stop().await?;
    Ok(())
}

async fn app_batch_publish_delivers_every_row<B: Backend>(b: &B) -> R {
    let route = b
        .route(["q"])
        .fetch_batch_size(2)
        .handler(|_m: Message, _| async {});
    let app = b.app().subscriber(route).start().await?;
    assert_eq!(app.publish_batch(1..=5_i64, "q").await?, 5);
    assert_eq!(app.handled_bodies::<i64>("q")?, [1, 2, 3, 4, 5]);
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

async fn app_without_dead_letter_table_deletes_terminal_rows<B: Backend>(b: &B) -> R {
    let route = b
        .route(["q"])
        .ack_policy(AckPolicy::RejectOnError)
        .handler(|_m: Message, _| async { Err::<(), BoxError>("no".into()) });
    let app = b
        .app_without_dead_letters()
        .subscriber(route)
        .start()
        .await?;
    let id = app.publish(&1, "q").await?;
    assert_eq!(app.history(id).to_string(), "claimed(1), deleted(rejected)");
    assert!(app.rows().await?.is_empty());
    assert!(app.dead_letters().await?.is_empty());
    app.stop().await?;
    Ok(())
}

async fn app_loop_mode_drains_and_retries<B: Backend>(b: &B) -> R {
    let kafka = MemoryTransport::new("kafka");
    let route = b
        .route(["orders"])
        .max_workers(4)
        .retry(ConstantRetry::new(Duration::from_secs(30)))
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("kafka", "orders.kafka")
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let app = b
        .app()
        .loop_mode()
        .subscriber(route)
        .transport(kafka.clone())
        .start()
        .await?;
    kafka.fail_next(1);
    assert_eq!(app.publish_batch(1..=20_i64, "orders").await?, 20);
    app.settle().await?;
    assert_eq!(kafka.messages().len(), 19, "one publish failed");
    let left = app.rows().await?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].attempts_count, 1);
    assert_eq!(app.history(left[0].id).to_string(), "claimed(1), retried");
    app.advance(Duration::from_secs(30)).await?;
    app.settle().await?;
    assert_eq!(kafka.messages().len(), 20);
    assert!(app.rows().await?.is_empty());
    let mut values: Vec<i64> = kafka
        .messages()
        .iter()
        .map(|m| m.value().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (1..=20).collect::<Vec<_>>());
    app.stop().await?;
    Ok(())
}

async fn app_loop_mode_lease_loss_is_a_no_op_write<B: Backend>(b: &B) -> R {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let route = b
        .route(["q"])
        .max_workers(2)
        .lease_ttl(Duration::from_secs(30))
        // No heartbeat: the lease is lost while the process lives (the
        // clock jumps past it), which a heartbeat would prevent.
        .lease_heartbeat(None)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .handler(move |msg: Message, _| {
            let g = g.clone();
            async move {
                if msg.deliveries_count() == 1 {
                    // The first delivery hangs until the test lets it go.
                    let _ = g.acquire().await;
                }
            }
        });
    let app = b.app().loop_mode().subscriber(route).start().await?;
    let id = app.publish(&1, "q").await?;
    assert!(
        tests::wait_until(Duration::from_secs(10), || async {
            app.handled("q").len() == 1
        })
        .await
    );
    app.advance(Duration::from_secs(31)).await?;
    assert!(
        tests::wait_until(Duration::from_secs(10), || async {
            app.history(id).to_string() == "claimed(1), claimed(2), acked"
        })
        .await,
        "{}",
        app.history(id)
    );
    gate.add_permits(1);
    app.settle().await?;
    assert_eq!(
        app.history(id).to_string(),
        "claimed(1), claimed(2), acked, lease_lost(terminal)"
    );
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Lots: the claims of ClaimMode::Transaction

async fn lot_claims_lock_rows_without_writing_a_lease<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a = publish(b, "1", "q", &opts()).await?;
    let c = publish(b, "2", "q", &opts()).await?;
    let e = publish(b, "3", "q", &opts()).await?;
    let before = ops.rows().await?;
    let lot = ops.claim_lot(&["q"], 2, None).await?;
    assert_eq!(lot.ids(), [a, c]);
    assert_eq!(ops.rows().await?, before, "a lot's claim writes nothing");
    assert!(
        lot.rows
            .iter()
            .all(|r| r.acquired_token.is_none() && r.deliveries_count == 0)
    );
    // Its rows are locked: other claims skip them.
    assert_eq!(ops.claim(&["q"], 10, TTL).await?.ids(), [e]);
    assert!(ops.claim_lot(&["q"], 10, None).await?.rows.is_empty());
    // (No `advance` while a lot is open: on PostgreSQL it would wait for
    // the lot's row locks.)
    lot.ack(a).retry(c, Duration::from_secs(5)).commit().await?;
    assert!(
        !ops.rows().await?.iter().any(|r| r.id == a),
        "acked: deleted"
    );
    let r = row(b, c).await?;
    assert_eq!((r.attempts_count, r.deliveries_count), (1, 1));
    assert_eq!(
        r.next_attempt_at - r.last_attempt_at.unwrap(),
        TimeDelta::seconds(5)
    );
    assert!(r.acquired_token.is_none());
    b.advance(Duration::from_secs(5)).await?;
    let again = ops.claim_lot(&["q"], 10, None).await?;
    assert_eq!(again.ids(), [c], "unlocked and due after the commit");
    again.rollback().await?;
    Ok(())
}

async fn a_rolled_back_lot_leaves_its_rows_as_they_were<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a = publish(b, "1", "q", &opts()).await?;
    let before = ops.rows().await?;
    let lot = ops.claim_lot(&["q"], 10, None).await?;
    lot.ack(a).rollback().await?;
    assert_eq!(ops.rows().await?, before);
    // Dropped without an end (a crashed relay): the same.
    let lot = ops.claim_lot(&["q"], 10, None).await?;
    assert_eq!(lot.ids(), [a], "claimable again at once");
    drop(lot);
    assert!(
        tests::wait_until(Duration::from_secs(5), || async {
            ops.claim_lot(&["q"], 10, None)
                .await
                .is_ok_and(|l| l.ids() == [a])
        })
        .await,
        "a dropped lot's rows are claimable again"
    );
    assert_eq!(ops.rows().await?, before);
    Ok(())
}

async fn lot_dead_letters_count_the_delivery<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a = publish(b, "1", "q", &opts().key("k")).await?;
    let lot = ops.claim_lot(&["q"], 10, None).await?;
    lot.dead_letter(a, FailureReason::Rejected, Some("bad"))
        .commit()
        .await?;
    assert!(ops.rows().await?.is_empty());
    let dead = ops.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (
            d.original_id,
            d.failure_reason.as_str(),
            d.last_exception.as_deref()
        ),
        (a, "rejected", Some("bad"))
    );
    assert_eq!(
        (d.deliveries_count, d.ordering_key.as_deref()),
        (1, Some("k"))
    );
    // Without a dead-letter table the move is refused, and nothing is lost.
    let bare = b.ops_without_dead_letters();
    bare.publish(&2_i64, "q", &opts()).await?;
    let c = bare.rows().await?[0].id;
    let lot = bare.claim_lot(&["q"], 10, None).await?;
    assert!(
        lot.dead_letter(c, FailureReason::Rejected, None)
            .commit()
            .await
            .is_err()
    );
    assert_eq!(bare.rows().await?.len(), 1);
    Ok(())
}

async fn ordered_lots_skip_locked_heads<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a1 = publish(b, "a1", "q", &keyed("a")).await?;
    let a2 = publish(b, "a2", "q", &keyed("a")).await?;
    let b1 = publish(b, "b1", "q", &keyed("b")).await?;
    let first = ops.claim_lot(&["q"], 10, Some("")).await?;
    assert_eq!(first.ids(), [a1, b1], "the heads");
    let second = ops.claim_lot(&["q"], 10, Some("")).await?;
    assert!(
        second.rows.is_empty(),
        "locked heads keep their keys back: {:?}",
        second.ids()
    );
    first.ack(a1).commit().await?;
    let third = ops.claim_lot(&["q"], 10, Some("")).await?;
    assert_eq!(third.ids(), [a2, b1], "a's next row is its head now");
    third.rollback().await?;
    Ok(())
}

async fn lot_leases_hand_overdue_rows_to_the_lease_writes<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a = publish(b, "1", "q", &opts()).await?;
    let token = Uuid::new_v4();
    ops.claim_lot(&["q"], 10, None)
        .await?
        .lease(a, token)
        .commit()
        .await?;
    let r = row(b, a).await?;
    assert_eq!((r.acquired_token, r.deliveries_count), (Some(token), 1));
    assert!(
        ops.claim_lot(&["q"], 10, None).await?.rows.is_empty(),
        "leased"
    );
    assert!(!ops.ack(a, Uuid::new_v4()).await?);
    assert!(ops.ack(a, token).await?);
    assert!(ops.rows().await?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------
// Ordering keys and ordered claims

fn keyed(key: &str) -> PublishOptions {
    opts().key(key)
}

/// `(body, key)` of each claimed row, in claim order.
fn bodies_and_keys(c: &outbox_core::testing::Claim) -> Vec<(String, Option<String>)> {
    c.rows
        .iter()
        .map(|r| (body(r), r.ordering_key.clone()))
        .collect()
}

fn s(x: &str) -> String {
    x.to_owned()
}

async fn keys_are_stored_and_batches_keep_their_order<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let plain = publish(b, "plain", "q", &opts()).await?;
    let one = publish(b, "one", "q", &keyed("k1")).await?;
    let n = ops
        .publish_batch(["b1", "b2", "b3"].map(s), "q", &keyed("k2"))
        .await?;
    assert_eq!(n, 3);
    let rows = ops.rows().await?;
    let got: Vec<_> = rows
        .iter()
        .map(|r| (body(r), r.ordering_key.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (s("plain"), None),
            (s("one"), Some("k1")),
            (s("b1"), Some("k2")),
            (s("b2"), Some("k2")),
            (s("b3"), Some("k2")),
        ],
        "ids follow the batch's order"
    );
    assert!(rows[0].id == plain && rows[1].id == one);
    // Keys combine with timers and schedules.
    let timer = keyed("k3")
        .timer_id("t")
        .timer_conflict(TimerConflict::Extend)
        .activate_in(Duration::from_secs(60));
    let t = ops.publish(&s("timer"), "q", &timer).await?.unwrap();
    let later = timer.clone().activate_in(Duration::from_secs(120));
    assert_eq!(ops.publish(&s("timer2"), "q", &later).await?, Some(t));
    assert_eq!(row(b, t).await?.ordering_key.as_deref(), Some("k3"));
    // An unordered claim ignores keys: every due row.
    let claim = ops.claim(&["q"], 10, TTL).await?;
    assert_eq!(claim.rows.len(), 5);
    Ok(())
}

async fn ordered_claims_take_only_the_head_of_each_key<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a1 = publish(b, "a1", "q", &keyed("a")).await?;
    publish(b, "a2", "q", &keyed("a")).await?;
    publish(b, "b1", "q", &keyed("b")).await?;
    publish(b, "n1", "q", &opts()).await?;
    publish(b, "n2", "q", &opts()).await?;
    publish(b, "other", "q2", &keyed("a")).await?;
    let first = ops.claim_ordered(&["q"], 10, TTL, "").await?;
    assert_eq!(
        bodies_and_keys(&first),
        [
            (s("a1"), Some(s("a"))),
            (s("b1"), Some(s("b"))),
            (s("n1"), None),
            (s("n2"), None),
        ],
        "one head per key (keys are per queue), every row without a key"
    );
    let again = ops.claim_ordered(&["q"], 10, TTL, "").await?;
    assert!(
        again.rows.is_empty(),
        "a leased head keeps its key back: {:?}",
        bodies_and_keys(&again)
    );
    assert!(ops.ack(a1, first.token).await?);
    let next = ops.claim_ordered(&["q"], 10, TTL, "").await?;
    assert_eq!(bodies_and_keys(&next), [(s("a2"), Some(s("a")))]);
    let q2 = ops.claim_ordered(&["q2"], 10, TTL, "").await?;
    assert_eq!(bodies_and_keys(&q2), [(s("other"), Some(s("a")))]);
    Ok(())
}

async fn ordered_claims_walk_the_keys_from_the_cursor<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    // Keys compare as bytes ("B" < "a" < "b" < "é").
    for k in ["b", "a", "é", "B"] {
        publish(b, k, "q", &keyed(k)).await?;
    }
    let take = async |cursor: &str| -> anyhow::Result<String> {
        let c = ops.claim_ordered(&["q"], 1, TTL, cursor).await?;
        let [r] = &c.rows[..] else {
            panic!("one row, got {:?}", bodies_and_keys(&c))
        };
        // Give it back, so the next walk sees every key again.
        assert_eq!(ops.release(&c.pairs()).await?, 1);
        Ok(body(r))
    };
    assert_eq!(take("").await?, "B");
    assert_eq!(take("B").await?, "a");
    assert_eq!(take("a").await?, "b");
    assert_eq!(take("b").await?, "é");
    assert_eq!(
        take("é").await?,
        "B",
        "past the last key the walk wraps round"
    );
    assert_eq!(take("c").await?, "é");
    Ok(())
}

async fn a_retrying_head_keeps_its_key_back<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let a1 = publish(b, "a1", "q", &keyed("a")).await?;
    publish(b, "a2", "q", &keyed("a")).await?;
    let first = ops.claim_ordered(&["q"], 10, TTL, "").await?;
    assert_eq!(first.ids(), [a1]);
    assert!(ops.retry(a1, first.token, Duration::from_secs(30)).await?);
    assert!(
        ops.claim_ordered(&["q"], 10, TTL, "")
            .await?
            .rows
            .is_empty(),
        "a2 is due but must not overtake its retrying head"
    );
    b.advance(Duration::from_secs(31)).await?;
    let retried = ops.claim_ordered(&["q"], 10, TTL, "").await?;
    assert_eq!(bodies_and_keys(&retried), [(s("a1"), Some(s("a")))]);
    assert_eq!(retried.rows[0].attempts_count, 1);
    Ok(())
}

async fn an_expired_head_is_reclaimed_before_its_successor<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let ttl = Duration::from_secs(10);
    let a1 = publish(b, "a1", "q", &keyed("a")).await?;
    publish(b, "a2", "q", &keyed("a")).await?;
    let old = ops.claim_ordered(&["q"], 10, ttl, "").await?;
    assert_eq!(old.ids(), [a1]);
    b.advance(Duration::from_secs(11)).await?;
    let new = ops.claim_ordered(&["q"], 10, ttl, "").await?;
    assert_eq!(
        bodies_and_keys(&new),
        [(s("a1"), Some(s("a")))],
        "the dead relay's head is handed over; its successor still waits"
    );
    assert_ne!(new.token, old.token);
    assert!(!ops.ack(a1, old.token).await?, "the old lease lost");
    Ok(())
}

async fn dead_letters_keep_the_key<B: Backend>(b: &B) -> R {
    let ops = b.ops();
    let id = publish(b, "a1", "q", &keyed("a")).await?;
    let c = ops.claim_ordered(&["q"], 10, TTL, "").await?;
    assert!(
        ops.dead_letter(id, c.token, FailureReason::RetryTerminal, None)
            .await?
    );
    let dead = ops.dead_letters().await?;
    assert_eq!(dead[0].ordering_key.as_deref(), Some("a"));
    Ok(())
}

/// An ordered route on `q` whose handler fails every attempt of `poison`
/// and records the bodies it handled successfully.
fn ordered_route<B: Backend>(
    b: &B,
    policy: outbox_core::PoisonPolicy,
    handled: Arc<std::sync::Mutex<Vec<String>>>,
) -> Route {
    b.route(["q"])
        .ordered(true)
        .poison_policy(policy)
        .max_workers(4)
        .retry(ConstantRetry::new(Duration::from_secs(10)).max_attempts(3))
        .handler(move |msg: Message, _| {
            let handled = handled.clone();
            async move {
                let body: String = msg.decode()?;
                if body == "poison" {
                    return Err::<(), BoxError>("poisoned".into());
                }
                handled.lock().unwrap().push(body);
                Ok(())
            }
        })
}

async fn app_ordered_block_policy_waits_for_the_head<B: Backend>(b: &B) -> R {
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = b
        .app()
        .subscriber(ordered_route(
            b,
            outbox_core::PoisonPolicy::Block,
            handled.clone(),
        ))
        .start()
        .await?;
    for (body, key) in [
        ("poison", "a"),
        ("a2", "a"),
        ("b1", "b"),
        ("a3", "a"),
        ("b2", "b"),
    ] {
        app.publish_with(&s(body), "q", &keyed(key)).await?;
    }
    app.settle().await?;
    assert_eq!(
        *handled.lock().unwrap(),
        ["b1", "b2"],
        "key a waits for its failing head; key b goes on"
    );
    // Two more attempts (10 s apart), then the strategy gives up: the head
    // is dead-lettered and key a resumes, in order.
    for _ in 0..2 {
        app.advance(Duration::from_secs(11)).await?;
        app.settle().await?;
    }
    assert_eq!(*handled.lock().unwrap(), ["b1", "b2", "a2", "a3"]);
    let dead = app.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].failure_reason.as_str(),
            dead[0].ordering_key.as_deref()
        ),
        ("retry_terminal", Some("a"))
    );
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

async fn app_ordered_dead_letter_and_continue_moves_on<B: Backend>(b: &B) -> R {
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = b
        .app()
        .subscriber(ordered_route(
            b,
            outbox_core::PoisonPolicy::DeadLetterAndContinue,
            handled.clone(),
        ))
        .start()
        .await?;
    for (body, key) in [("poison", "a"), ("a2", "a"), ("a3", "a")] {
        app.publish_with(&s(body), "q", &keyed(key)).await?;
    }
    app.settle().await?;
    assert_eq!(*handled.lock().unwrap(), ["a2", "a3"]);
    let dead = app.dead_letters().await?;
    assert_eq!(dead.len(), 1, "dead-lettered at the first failure");
    assert_eq!(dead[0].deliveries_count, 1);
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

async fn app_relays_the_row_key_as_the_message_key<B: Backend>(b: &B) -> R {
    let kafka = MemoryTransport::new("kafka");
    let explicit = b
        .route(["explicit"])
        .publish_to("kafka", "explicit.kafka")
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?).key("mine"))
        });
    let app = b
        .app()
        .subscriber(seed_route(b))
        .subscriber(explicit)
        .transport(kafka.clone())
        .start()
        .await?;
    app.publish_with(&1_i64, "orders", &keyed("order-1"))
        .await?;
    app.publish_with(&2_i64, "orders", &opts()).await?;
    app.publish_with(&3_i64, "explicit", &keyed("order-3"))
        .await?;
    app.settle().await?;
    let keys: Vec<Option<Vec<u8>>> = kafka
        .messages_to("orders.kafka")
        .iter()
        .map(|m| m.key.clone())
        .collect();
    assert_eq!(keys, [Some(b"order-1".to_vec()), None]);
    let sent = kafka.messages_to("explicit.kafka");
    assert_eq!(
        sent[0].key.as_deref(),
        Some(&b"mine"[..]),
        "the handler's key wins"
    );
    app.stop().await?;
    Ok(())
}
