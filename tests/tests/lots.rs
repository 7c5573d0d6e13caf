//! `ClaimMode::Transaction` against real PostgreSQL, in process: a lot
//! holds its rows locked in an open transaction while its handlers run,
//! writes no lease, commits every outcome together; `max_hold` leases what
//! still runs; a graceful stop releases what never started; the startup
//! warning about an untuned autovacuum. (The process-level faults: SIGKILL,
//! killed backends, a paused Kafka, the Python peer: `lots_chaos.rs`,
//! `interop.rs`.)

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::{BoxError, ClaimMode, Engine, Message, Subscriber, SubscriberBuilder};
use tests::{TestDb, captured, wait_until};
use tokio::sync::Semaphore;

type R = anyhow::Result<()>;

fn lots(queue: &str) -> SubscriberBuilder {
    Subscriber::builder([queue])
        .claim_mode(ClaimMode::Transaction)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

fn engine(db: &TestDb, name: &str, sub: Subscriber) -> Engine {
    Engine::new(db.broker.clone())
        .application_name(format!("{name}-{}", db.schema))
        .subscriber(sub)
}

async fn publish(db: &TestDb, queue: &str, n: i64) -> anyhow::Result<()> {
    let mut conn = db.pool.acquire().await?;
    db.broker.publish_batch(0..n, queue, &mut conn).await?;
    Ok(())
}

/// A handler that waits for a permit of `gate` (kept) on the rows whose
/// JSON body `blocks` accepts, and counts every call in `calls`.
fn gated(
    gate: &Arc<Semaphore>,
    calls: &Arc<AtomicUsize>,
    blocks: fn(i64) -> bool,
) -> impl Fn(Message) -> std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>
+ Send
+ Sync
+ 'static {
    let (gate, calls) = (gate.clone(), calls.clone());
    move |m: Message| {
        let (gate, calls) = (gate.clone(), calls.clone());
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if blocks(m.decode::<i64>()?) {
                gate.acquire().await?.forget();
            }
            Ok(())
        })
    }
}

/// Rows another transaction could lock now (what a second relay could claim).
async fn lockable(db: &TestDb) -> anyhow::Result<i64> {
    let mut tx = db.pool.begin().await?;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM (SELECT id FROM {} FOR UPDATE SKIP LOCKED) l",
        db.t()
    )))
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(n)
}

async fn leased(db: &TestDb) -> anyhow::Result<i64> {
    db.scalar(format!(
        "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
        db.t()
    ))
    .await
}

/// While a lot's handlers run, its rows are locked and unchanged (no lease,
/// no `deliveries_count` written), every handler runs at once whatever
/// `max_workers` says, and the outcomes land together at the commit.
#[tokio::test]
async fn a_lot_holds_its_rows_locked_and_writes_only_at_the_commit() -> R {
    let db = TestDb::new().await?;
    publish(&db, "q", 20).await?;
    let gate = Arc::new(Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let counts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (g, r, c) = (gate.clone(), running.clone(), counts.clone());
    let sub = lots("q")
        .fetch_batch_size(20)
        .max_workers(2)
        .build(move |m: Message| {
            let (g, r, c) = (g.clone(), r.clone(), c.clone());
            async move {
                c.lock().unwrap().push(m.deliveries_count());
                r.fetch_add(1, Ordering::SeqCst);
                g.acquire().await?.forget();
                Ok::<_, BoxError>(())
            }
        })?;
    let e = engine(&db, "lots", sub);
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            running.load(Ordering::SeqCst) == 20
        })
        .await,
        "all 20 handlers of the lot run at once ({} did), max_workers 2 notwithstanding",
        running.load(Ordering::SeqCst)
    );
    assert_eq!(lockable(&db).await?, 0, "the lot holds every row locked");
    assert_eq!(leased(&db).await?, 0, "no lease written");
    let written: i64 = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE deliveries_count > 0",
            db.t()
        ))
        .await?;
    assert_eq!(written, 0, "nothing written before the commit");
    assert_eq!(db.count().await?, 20);
    // Half the handlers finish: still nothing is written (one commit).
    gate.add_permits(10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db.count().await?, 20, "no row leaves before the whole lot");
    gate.add_permits(10);
    assert!(db.drained(Duration::from_secs(10)).await);
    assert!(
        counts.lock().unwrap().iter().all(|n| *n == 1),
        "each handler saw its delivery counted: {:?}",
        counts.lock().unwrap()
    );
    e.stop().await;
    Ok(())
}

/// Failures are recorded in the lot's transaction: a retry counts the
/// attempt and the delivery, a rejection moves the row to the dead-letter
/// table with its delivery counted.
#[tokio::test]
async fn retries_and_dead_letters_commit_with_the_lot() -> R {
    let db = TestDb::new().await?;
    publish(&db, "q", 3).await?;
    let sub = lots("q")
        .retry(outbox_core::retry::ConstantRetry::new(Duration::from_secs(
            3600,
        )))
        .build(|m: Message| async move {
            match m.decode::<i64>()? {
                0 => Ok(()),
                1 => Err::<(), BoxError>("try later".into()),
                _ => {
                    m.reject();
                    Err("bad row".into())
                }
            }
        })?;
    let e = engine(&db, "lots", sub);
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.count().await.unwrap() == 1 && db.dlq_count().await.unwrap() == 1
        })
        .await
    );
    e.stop().await;
    let (attempts, deliveries, leased, delay): (i64, i64, bool, f64) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT attempts_count, deliveries_count, acquired_token IS NOT NULL, \
             extract(epoch FROM next_attempt_at - last_attempt_at)::float8 FROM {}",
            db.t()
        )))
        .fetch_one(&db.pool)
        .await?;
    assert_eq!((attempts, deliveries, leased), (1, 1, false));
    assert!((delay - 3600.0).abs() < 1.0, "{delay}");
    let (reason, text, deliveries): (String, Option<String>, i64) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT failure_reason, last_exception, deliveries_count FROM {}",
            db.d()
        )))
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(reason, "rejected");
    assert!(text.unwrap_or_default().contains("bad row"));
    assert_eq!(deliveries, 1);
    Ok(())
}

/// A handler that outlives `max_hold`: the lot leases its row and commits
/// the others; the transaction is not held any longer; the slow handler's
/// ack lands later under the lease.
#[tokio::test]
async fn max_hold_leases_the_rows_still_running_and_commits_the_rest() -> R {
    let db = TestDb::new().await?;
    publish(&db, "q", 5).await?;
    let gate = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let sub = lots("q")
        .max_hold(Duration::from_millis(300))
        .lease_ttl(Duration::from_secs(60))
        .build(gated(&gate, &calls, |v| v == 3))?;
    let e = engine(&db, "lots", sub);
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.count().await.unwrap() == 1
        })
        .await,
        "the other four rows commit at max_hold"
    );
    assert_eq!(leased(&db).await?, 1, "the running row got a lease");
    let open: i64 = db
        .scalar(format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lots-{}-fetch' \
             AND now() - xact_start > interval '1 second'",
            db.schema
        ))
        .await?;
    // (Idle lot loops poll: a claim's transaction lives for a millisecond.)
    assert_eq!(open, 0, "no transaction held past max_hold");
    assert!(
        !captured(|c| c.message.contains("reached max_hold")).is_empty(),
        "the lease is logged"
    );
    gate.add_permits(1);
    assert!(
        db.drained(Duration::from_secs(10)).await,
        "acked under its lease"
    );
    e.stop().await;
    Ok(())
}

/// A graceful stop lets a started lot finish and commit; rows of a lot
/// claimed as the stop began are released unstarted (counted in the
/// report), and nothing is left leased.
#[tokio::test]
async fn a_graceful_stop_commits_the_open_lot() -> R {
    let db = TestDb::new().await?;
    publish(&db, "q", 10).await?;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let sub = lots("q").fetch_batch_size(10).build(move |_m: Message| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, BoxError>(())
        }
    })?;
    let e = engine(&db, "lots", sub);
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            started.load(Ordering::SeqCst) > 0
        })
        .await
    );
    let report = e.stop().await;
    assert!(report.timed_out.is_empty());
    assert_eq!(
        db.count().await?,
        0,
        "the started lot finished and committed"
    );
    assert_eq!(leased(&db).await?, 0);
    Ok(())
}

/// A lot whose backend is killed rolls back: its rows are claimable at once
/// by another engine (no lease to wait for), and the first engine's late
/// outcomes are not written.
#[tokio::test]
async fn a_killed_backend_hands_the_lot_to_another_engine_at_once() -> R {
    let db = TestDb::new().await?;
    publish(&db, "q", 8).await?;
    let gate = Arc::new(Semaphore::new(0));
    let first_calls = Arc::new(AtomicUsize::new(0));
    let first =
        lots("q")
            .lease_ttl(Duration::from_secs(600))
            .build(gated(&gate, &first_calls, |_| true))?;
    let a = engine(&db, "first", first);
    a.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            lockable(&db).await.unwrap() == 0
        })
        .await,
        "the first engine's lot holds the rows"
    );
    let handled = Arc::new(AtomicUsize::new(0));
    let second =
        lots("q")
            .lease_ttl(Duration::from_secs(600))
            .build(gated(&gate, &handled, |_| false))?;
    let b = engine(&db, "second", second);
    b.start().await?;
    let killed = db
        .scalar(format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'first-{}-fetch'",
            db.schema
        ))
        .await?;
    assert!(killed >= 1);
    assert!(
        db.drained(Duration::from_secs(10)).await,
        "the second engine delivered the rolled-back rows without waiting for a lease"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 8);
    gate.add_permits(100);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(db.dlq_count().await?, 0);
    a.stop().await;
    b.stop().await;
    Ok(())
}

/// The engine warns at start when the outbox table's autovacuum is not
/// tuned, with the DDL that tunes it; not once it is.
#[tokio::test]
async fn an_untuned_autovacuum_is_reported_at_start() -> R {
    let db = TestDb::new().await?;
    let mine = |c: &tests::Captured| {
        c.message.contains("autovacuum is not tuned") && c.message.contains(&db.t())
    };
    let sub = lots("q").build(|_m: Message| async {})?;
    let e = engine(&db, "lots", sub.clone());
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            !captured(mine).is_empty()
        })
        .await,
        "warned"
    );
    e.stop().await;
    let warning = captured(mine).remove(0);
    assert!(
        warning.message.contains("ALTER TABLE"),
        "{}",
        warning.message
    );
    let before = captured(mine).len();
    db.exec(outbox_core::ops::autovacuum_sql(
        db.broker.table(),
        outbox_core::ops::AutovacuumOptions::default(),
    ))
    .await?;
    let e = engine(&db, "lots", sub);
    e.start().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    e.stop().await;
    assert_eq!(captured(mine).len(), before, "tuned: no warning");
    Ok(())
}

/// A dead-letter move the dead-letter table refuses (a drifted table,
/// permissions) does not roll the lot back: the acks commit, the refused
/// row keeps a lease and is delivered again after it expires, as a leased
/// row's failed dead-letter write.
#[tokio::test]
async fn a_refused_dead_letter_move_leases_its_row_and_the_acks_commit() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "ALTER TABLE {} ADD CONSTRAINT no_rejects CHECK (failure_reason <> 'rejected')",
        db.d()
    ))
    .await?;
    publish(&db, "q", 4).await?;
    let sub = lots("q").build(|m: Message| async move {
        if m.decode::<i64>()? == 2 {
            m.reject();
        }
        Ok::<_, BoxError>(())
    })?;
    let e = engine(&db, "lots", sub);
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.count().await.unwrap() == 1
        })
        .await,
        "the three acks committed"
    );
    e.stop().await;
    assert_eq!(leased(&db).await?, 1, "the refused row is leased");
    assert_eq!(db.dlq_count().await?, 0);
    assert!(
        !captured(|c| c.message.contains("the dead-letter table refused it")).is_empty(),
        "logged"
    );
    Ok(())
}
