//! Behaviour that had no test of its own (issue 19 item 7), on real
//! PostgreSQL: one NOTIFY per transaction and queue, the buffer's refill
//! threshold, the LISTEN connection's recovery (a killed backend, and a hung
//! one found by the health probe), several subscribers draining together,
//! and the warning for two subscribers on one queue.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::{ClaimMode, Engine, Message, Subscriber, SubscriberBuilder};
use sqlx::postgres::{PgConnectOptions, PgListener};
use tests::proxy::TcpProxy;
use tests::{TestDb, captured, database_url, metrics_capture, suffix, wait_until};

type R = anyhow::Result<()>;

fn engine(db: &TestDb, subs: Vec<Subscriber>) -> Engine {
    let mut e = Engine::new(db.broker.clone()).application_name(format!("test-{}", db.schema));
    for s in subs {
        e = e.subscriber(s);
    }
    e
}

/// Every notification that arrives within `quiet` of the previous one (the
/// first within 10 s): what one commit sent.
async fn drain_notifications(l: &mut PgListener, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut wait = Duration::from_secs(10);
    while let Ok(Ok(n)) = tokio::time::timeout(wait, l.recv()).await {
        got.push(n.payload().to_owned());
        wait = quiet;
    }
    got
}

// ---------------------------------------------------------------------------
// NOTIFY

/// PostgreSQL folds identical notifications of one transaction: however many
/// rows a transaction publishes to a queue (one by one, in batches, or
/// both), the listener hears that queue once at commit; two queues, once
/// each; a second transaction, again.
#[tokio::test]
async fn one_notify_per_transaction_and_queue() -> R {
    let db = TestDb::new().await?;
    let mut listener = PgListener::connect_with(&db.pool).await?;
    listener.listen(&db.table.channel()).await?;
    let quiet = Duration::from_millis(500);

    // Five single publishes and a batch of ten, one queue, one transaction.
    let mut tx = db.pool.begin().await?;
    for i in 0..5 {
        db.broker.publish(&i, "a", &mut *tx).await?;
    }
    db.broker.publish_batch(0..10, "a", &mut *tx).await?;
    tx.commit().await?;
    assert_eq!(db.count().await?, 15);
    assert_eq!(drain_notifications(&mut listener, quiet).await, ["a"]);

    // Two queues, interleaved, one transaction: one NOTIFY per queue.
    let mut tx = db.pool.begin().await?;
    for i in 0..4 {
        db.broker.publish(&i, "a", &mut *tx).await?;
        db.broker.publish(&i, "b", &mut *tx).await?;
    }
    db.broker.publish_batch(0..3, "b", &mut *tx).await?;
    tx.commit().await?;
    let got = drain_notifications(&mut listener, quiet).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );

    // Two transactions on one queue: one NOTIFY each.
    for _ in 0..2 {
        let mut tx = db.pool.begin().await?;
        db.broker.publish(&1, "a", &mut *tx).await?;
        db.broker.publish(&2, "a", &mut *tx).await?;
        tx.commit().await?;
    }
    assert_eq!(drain_notifications(&mut listener, quiet).await, ["a", "a"]);
    Ok(())
}

// ---------------------------------------------------------------------------
// The buffer's refill threshold

/// A lease-mode subscriber refills its buffer once half of it is free, not
/// when it is empty and not for every free slot: with a buffer of 10, one
/// slow worker and 30 rows waiting, the claims take 10 rows, then about 5
/// at a time (claimed while 5 still wait in the buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_is_refilled_when_half_of_it_is_free() -> R {
    metrics_capture::install();
    let db = TestDb::new().await?;
    let name = format!("refill-{}", suffix());
    let mut conn = db.pool.acquire().await?;
    db.broker.publish_batch(0..30, "refill", &mut conn).await?;
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let sub = Subscriber::builder(["refill"])
        .name(name.clone())
        .claim_mode(ClaimMode::Lease)
        .fetch_batch_size(10)
        .fetch_concurrency(1)
        .max_workers(1)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .build(move |_m: Message| {
            let h = h.clone();
            async move {
                // Slow enough that the buffer never runs dry between claims.
                tokio::time::sleep(Duration::from_millis(100)).await;
                h.fetch_add(1, Ordering::SeqCst);
            }
        })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    assert!(
        db.drained(Duration::from_secs(30)).await,
        "{} handled",
        handled.load(Ordering::SeqCst)
    );
    e.stop().await;
    let labels = [("subscriber", name.as_str())];
    let fetched = metrics_capture::counter("outbox_fetched_total", &labels);
    let batches = metrics_capture::counter(
        "outbox_fetch_batches_total",
        &[("subscriber", name.as_str()), ("non_empty", "true")],
    );
    println!("{batches} non-empty claims");
    assert_eq!(fetched, 30);
    // Refilling only when empty: 3 claims (10 + 10 + 10). For every free
    // slot: about 21 (10, then one at a time). At half: 10 + 5 × 4 (a claim
    // may take one more slot when the worker took the next row meanwhile).
    assert!(
        (4..=5).contains(&batches),
        "{batches} non-empty claims for 30 rows with a buffer of 10"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The LISTEN connection

/// The backend pids of the sessions LISTENing on the table's channel.
async fn listen_pids(db: &TestDb) -> anyhow::Result<Vec<i32>> {
    let listen = format!("LISTEN \"{}\"", db.table.channel());
    Ok(
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE query = $1 ORDER BY pid")
            .bind(&listen)
            .fetch_all(&db.pool)
            .await?,
    )
}

/// A subscriber that polls only every 60 s: a row handled within seconds
/// was found through a NOTIFY.
fn notified_only(queue: &str, seen: Arc<Mutex<Vec<i64>>>) -> anyhow::Result<Subscriber> {
    Ok(Subscriber::builder([queue])
        .min_fetch_interval(Duration::from_secs(60))
        .max_fetch_interval(Duration::from_secs(60))
        .lease_ttl(Duration::from_secs(120))
        .build(move |m: Message| {
            seen.lock().unwrap().push(m.id());
            async {}
        })?)
}

/// Publishes one row and waits up to 10 s for the subscriber (which polls
/// every 60 s) to handle it; whether it did.
async fn delivered_by_notify(db: &TestDb, queue: &str, seen: &Arc<Mutex<Vec<i64>>>) -> bool {
    // Let the catch-up look that follows a (re)connected LISTEN pass, so
    // that only a NOTIFY can find the next row.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut tx = db.pool.begin().await.unwrap();
    let id = db.broker.publish(&1, queue, &mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    wait_until(Duration::from_secs(10), || async {
        seen.lock().unwrap().contains(&id)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_backend_is_replaced_and_notifies_again() -> R {
    let db = TestDb::new().await?;
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let e = engine(&db, vec![notified_only("q", seen.clone())?]);
    e.start().await?;
    assert!(
        db.listening(Duration::from_secs(10)).await,
        "the engine LISTENs"
    );
    assert!(
        delivered_by_notify(&db, "q", &seen).await,
        "NOTIFY works to begin with"
    );
    let before = listen_pids(&db).await?;
    assert_eq!(before.len(), 1, "{before:?}");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .fetch_one(&db.pool)
        .await?;
    assert!(killed);
    // A new session LISTENs in its place.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let now = listen_pids(&db).await.unwrap();
            now.len() == 1 && now[0] != before[0]
        })
        .await,
        "no new LISTEN session: {:?}",
        listen_pids(&db).await?
    );
    assert!(
        delivered_by_notify(&db, "q", &seen).await,
        "a NOTIFY wakes the subscriber again"
    );
    e.stop().await;
    Ok(())
}

/// A LISTEN connection that hangs (no error, no answer: a dead network
/// path) is found by the probe the loop sends after 30 s without a
/// notification, replaced once the server answers again, and NOTIFY wakes
/// the subscriber again. Takes about 40 s (the probe's fixed interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_listen_connection_is_found_by_the_probe_and_replaced() -> R {
    let db = TestDb::new().await?;
    let proxy = TcpProxy::start("127.0.0.1:5432").await?;
    let direct: PgConnectOptions = database_url().parse()?;
    let through_proxy = direct.host("127.0.0.1").port(proxy.addr().port());
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let e = engine(&db, vec![notified_only("q", seen.clone())?]).listen_with(through_proxy);
    e.start().await?;
    assert!(
        db.listening(Duration::from_secs(10)).await,
        "the engine LISTENs"
    );
    let before = listen_pids(&db).await?;
    assert_eq!(before.len(), 1, "{before:?}");
    let channel = db.table.channel();
    let unresponsive = || {
        !captured(|c| {
            c.message.contains("LISTEN connection unresponsive")
                && c.fields.get("channel").is_some_and(|ch| *ch == channel)
        })
        .is_empty()
    };

    // The path hangs: the probe, 30 s after the last notification, gets no
    // answer within 5 s.
    proxy.pause();
    let paused = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || async { unresponsive() }).await,
        "the hung LISTEN connection was not reported"
    );
    println!("reported after {:?}", paused.elapsed());
    proxy.restore();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            listen_pids(&db)
                .await
                .unwrap()
                .iter()
                .any(|p| !before.contains(p))
        })
        .await,
        "no new LISTEN session: {:?}",
        listen_pids(&db).await?
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !captured(|c| {
                c.message == "LISTEN restored"
                    && c.fields.get("channel").is_some_and(|ch| *ch == channel)
            })
            .is_empty()
        })
        .await,
        "no INFO for the restored LISTEN"
    );
    assert!(
        delivered_by_notify(&db, "q", &seen).await,
        "a NOTIFY wakes the subscriber again"
    );
    e.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Several subscribers stopping together

/// A lease-mode subscriber of `queue` named `name`, with two workers.
fn lease_sub(queue: &str, name: &str) -> SubscriberBuilder {
    Subscriber::builder([queue])
        .name(name)
        .claim_mode(ClaimMode::Lease)
        .max_workers(2)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

/// Three subscribers on three queues, each with handlers in flight and
/// rows waiting in its buffer: `stop` lets every in-flight handler finish,
/// releases every unstarted row (their leases cleared, so another relay can
/// take them at once), and returns once all three are drained, within one
/// graceful timeout, not one per subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_subscribers_drain_concurrently_and_stop_together() -> R {
    let db = TestDb::new().await?;
    let queues = ["drain_a", "drain_b", "drain_c"];
    let started: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let finished: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut subs = Vec::new();
    for q in queues {
        let (s, f) = (started.clone(), finished.clone());
        let queue = q.to_owned();
        subs.push(lease_sub(q, q).build(move |m: Message| {
            let (s, f, queue) = (s.clone(), f.clone(), queue.clone());
            async move {
                s.lock().unwrap().push((queue.clone(), m.id()));
                tokio::time::sleep(Duration::from_millis(1500)).await;
                f.lock().unwrap().push((queue, m.id()));
            }
        })?);
    }
    let mut conn = db.pool.acquire().await?;
    for q in queues {
        db.broker.publish_batch(0..20, q, &mut conn).await?;
    }
    let e = engine(&db, subs);
    e.start().await?;
    // Every subscriber has its two workers busy.
    assert!(
        wait_until(Duration::from_secs(15), || async {
            let s = started.lock().unwrap();
            queues
                .iter()
                .all(|q| s.iter().filter(|(sq, _)| sq == q).count() >= 2)
        })
        .await,
        "started: {:?}",
        started.lock().unwrap()
    );
    let stopping = Instant::now();
    let report = e.stop().await;
    let took = stopping.elapsed();
    println!("stop took {took:?}: {report:?}");
    assert!(report.timed_out.is_empty(), "{report:?}");

    // Every handler that started also finished, before stop returned.
    let started = started.lock().unwrap().clone();
    let finished = finished.lock().unwrap().clone();
    assert_eq!(
        started.iter().collect::<BTreeSet<_>>(),
        finished.iter().collect::<BTreeSet<_>>(),
        "a handler was cut off"
    );
    // Handled rows are gone; the others are waiting, unleased: exactly the
    // rows stop released, plus those never claimed.
    for q in queues {
        let handled = finished.iter().filter(|(fq, _)| fq == q).count() as i64;
        let left = db
            .scalar(format!(
                "SELECT count(*) FROM {} WHERE queue = '{q}'",
                db.t()
            ))
            .await?;
        assert_eq!(left, 20 - handled, "{q}");
    }
    let leased = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
            db.t()
        ))
        .await?;
    assert_eq!(leased, 0, "a lease was left behind");
    assert!(report.released > 0, "{report:?}");
    Ok(())
}

/// With handlers that outlive the graceful timeout in all three
/// subscribers, `stop` names all three and returns after one timeout: the
/// subscribers' drains run at the same time (one after the other would take
/// three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_subscribers_time_out_together() -> R {
    let db = TestDb::new().await?;
    let broker = db.broker.clone().graceful_timeout(Duration::from_secs(4));
    let queues = ["stuck_a", "stuck_b", "stuck_c"];
    let started = Arc::new(AtomicUsize::new(0));
    let mut e = Engine::new(broker).application_name(format!("test-{}", db.schema));
    for q in queues {
        let s = started.clone();
        e = e.subscriber(lease_sub(q, q).max_workers(1).build(move |_m: Message| {
            s.fetch_add(1, Ordering::SeqCst);
            // Far longer than the graceful timeout.
            tokio::time::sleep(Duration::from_secs(60))
        })?);
    }
    let mut conn = db.pool.acquire().await?;
    for q in queues {
        db.broker.publish(&1, q, &mut conn).await?;
    }
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(15), || async {
            started.load(Ordering::SeqCst) == 3
        })
        .await
    );
    let stopping = Instant::now();
    let report = e.stop().await;
    let took = stopping.elapsed();
    let mut timed_out = report.timed_out.clone();
    timed_out.sort();
    assert_eq!(timed_out, queues, "{report:?}");
    // One 4 s timeout for all three; sequential drains would need 12 s
    // (the 4 s of slack keep a loaded machine from failing it).
    assert!(
        took < Duration::from_secs(8),
        "stop took {took:?}: the drains did not run concurrently"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Two subscribers on one queue

#[tokio::test]
async fn two_subscribers_on_one_queue_are_warned_about() -> R {
    let _db = TestDb::new().await?; // installs the log capture
    let q = format!("shared_{}", suffix());
    let first = Subscriber::builder([q.clone(), format!("{q}_own")])
        .name(format!("{q}_first"))
        .build(|_m: Message| async {})?;
    let second = Subscriber::builder([q.clone()])
        .name(format!("{q}_second"))
        .build(|_m: Message| async {})?;
    let third = Subscriber::builder([format!("{q}_other")])
        .name(format!("{q}_third"))
        .build(|_m: Message| async {})?;
    let _e = Engine::new(_db.broker.clone())
        .subscriber(first)
        .subscriber(second)
        .subscriber(third);
    let warns = captured(|c| c.level == tracing::Level::WARN && c.message.contains(&q));
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert_eq!(
        warns[0].message,
        format!(
            "subscribers `{q}_first` and `{q}_second` both serve [\"{q}\"]: their workers will \
             compete for the rows"
        )
    );
    Ok(())
}
