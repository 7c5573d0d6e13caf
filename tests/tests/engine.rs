//! The subscriber engine against real PostgreSQL: outcomes, ack policies,
//! retries, dead letters, leases, crash and restart safety, LISTEN.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use outbox_core::retry::{ConstantRetry, NoRetry, RetryContext, RetryStrategy};
use outbox_core::{
    AckPolicy, BoxError, Engine, Message, OutboxBroker, PublishOptions, Subscriber,
    SubscriberBuilder,
};
use serde_json::json;
use sqlx::Row;
use tests::{TestDb, captured, suffix, wait_until};

type R = anyhow::Result<()>;

/// Short polling intervals so tests do not wait on the defaults.
fn fast(b: SubscriberBuilder) -> SubscriberBuilder {
    b.min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

fn engine(db: &TestDb, subs: Vec<Subscriber>) -> Engine {
    let mut e = Engine::new(db.broker.clone()).application_name(format!("test-{}", db.schema));
    for s in subs {
        e = e.subscriber(s);
    }
    e
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(i64, String)>>>);

impl Seen {
    fn push(&self, m: &Message) {
        let body = String::from_utf8_lossy(m.payload()).into_owned();
        self.0.lock().unwrap().push((m.id(), body));
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn ids(&self) -> Vec<i64> {
        self.0.lock().unwrap().iter().map(|x| x.0).collect()
    }
}

async fn publish_n(db: &TestDb, queue: &str, n: usize) -> anyhow::Result<()> {
    let mut conn = db.pool.acquire().await?;
    let bodies: Vec<usize> = (0..n).collect();
    for chunk in bodies.chunks(5000) {
        db.broker
            .publish_batch(chunk.iter().copied(), queue, &mut conn)
            .await?;
    }
    Ok(())
}

async fn dlq_rows(db: &TestDb) -> anyhow::Result<Vec<(i64, String, Option<String>, i64)>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT original_id, failure_reason::text, last_exception::text, deliveries_count FROM {} ORDER BY id",
        db.d()
    )))
    .fetch_all(&db.pool)
    .await?)
}

#[tokio::test]
async fn ack_deletes_the_row() -> R {
    let db = TestDb::new().await?;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["orders"])).build(move |m: Message| {
        s.push(&m);
        async {}
    })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    publish_n(&db, "orders", 25).await?;
    publish_n(&db, "other", 3).await?; // not served
    assert!(wait_until(Duration::from_secs(10), || async { seen.len() == 25 }).await);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            db.count().await.unwrap() == 3
        })
        .await
    );
    e.stop().await;
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn claims_are_fifo_by_next_attempt_then_id() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let past =
        |s: i64| PublishOptions::new().activate_at(Utc::now() - chrono::Duration::seconds(s));
    let a = db
        .broker
        .publish_with(&"a", "q", &past(10), &mut conn)
        .await?
        .unwrap();
    let b = db
        .broker
        .publish_with(&"b", "q", &past(30), &mut conn)
        .await?
        .unwrap();
    let c = db
        .broker
        .publish_with(&"c", "q", &past(10), &mut conn)
        .await?
        .unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["q"])).build(move |m: Message| {
        s.push(&m);
        async {}
    })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    assert!(wait_until(Duration::from_secs(10), || async { seen.len() == 3 }).await);
    e.stop().await;
    assert_eq!(seen.ids(), [b, a, c]);
    Ok(())
}

#[tokio::test]
async fn error_retries_with_the_strategy_on_the_database_clock() -> R {
    let db = TestDb::new().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let sub = fast(Subscriber::builder(["q"]))
        .retry(ConstantRetry::new(Duration::from_secs(3600)))
        .build(move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>("transient failure".into()) }
        })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.scalar(format!(
                "SELECT attempts_count FROM {} WHERE id = {id}",
                db.t()
            ))
            .await
            .unwrap_or(0)
                == 1
        })
        .await
    );
    e.stop().await;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT extract(epoch FROM next_attempt_at - last_attempt_at)::int8 AS d, acquired_token IS NULL AS free, \
         first_attempt_at = last_attempt_at AS same, deliveries_count FROM {} WHERE id = {id}",
        db.t()
    )))
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(row.get::<i64, _>("d"), 3600, "delay on the database clock");
    assert!(row.get::<bool, _>("free"), "lease released");
    assert!(row.get::<bool, _>("same"), "first attempt recorded");
    assert_eq!(row.get::<i64, _>("deliveries_count"), 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "not retried before the delay"
    );
    // The retry warning carries the row's fields.
    let warns = captured(|c| {
        c.fields.get("row_id") == Some(&id.to_string()) && c.message.contains("retrying in")
    });
    assert!(!warns.is_empty());
    assert_eq!(warns[0].fields["queue"], "q");
    assert!(warns[0].fields.contains_key("correlation_id"));
    assert!(warns[0].message.contains("transient failure"));
    Ok(())
}

#[tokio::test]
async fn retries_then_dead_letters_with_the_last_error() -> R {
    let db = TestDb::new().await?;
    let sub = fast(Subscriber::builder(["q"]))
        .retry(ConstantRetry::new(Duration::from_millis(10)).max_attempts(3))
        .build(|m: Message| async move {
            Err::<(), BoxError>(format!("boom on attempt {}", m.attempts_count() + 1).into())
        })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.dlq_count().await.unwrap() == 1
        })
        .await
    );
    e.stop().await;
    assert_eq!(db.count().await?, 0);
    let rows = dlq_rows(&db).await?;
    assert_eq!(rows[0].0, id);
    assert_eq!(rows[0].1, "retry_terminal");
    assert_eq!(rows[0].2.as_deref(), Some("boom on attempt 3"));
    assert_eq!(rows[0].3, 3, "three claims");
    Ok(())
}

#[tokio::test]
async fn no_dead_letter_table_means_terminal_rows_are_deleted() -> R {
    let db = TestDb::new().await?;
    let broker = OutboxBroker::new(db.pool.clone(), db.table.clone());
    let sub = fast(Subscriber::builder(["q"]))
        .retry(NoRetry)
        .build(|_m: Message| async { Err::<(), BoxError>("nope".into()) })?;
    let e = Engine::new(broker).subscriber(sub);
    e.start().await?;
    publish_n(&db, "q", 3).await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    e.stop().await;
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn reject_on_error_is_terminal_whatever_the_strategy() -> R {
    let db = TestDb::new().await?;
    let sub = fast(Subscriber::builder(["q"]))
        .ack_policy(AckPolicy::RejectOnError)
        .build(|_m: Message| async { Err::<(), BoxError>("bad order".into()) })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    publish_n(&db, "q", 1).await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.dlq_count().await.unwrap() == 1
        })
        .await
    );
    e.stop().await;
    let rows = dlq_rows(&db).await?;
    assert_eq!(rows[0].1, "rejected");
    assert_eq!(rows[0].2.as_deref(), Some("bad order"));
    Ok(())
}

#[tokio::test]
async fn manual_policy_decisions_and_fallbacks() -> R {
    let db = TestDb::new().await?;
    let sub = fast(Subscriber::builder(["q"]))
        .ack_policy(AckPolicy::Manual)
        .retry(ConstantRetry::new(Duration::from_secs(3600)))
        .build(|m: Message| async move {
            let what: String = m.decode()?;
            match what.as_str() {
                "ack" => {
                    assert!(m.ack());
                    assert!(!m.reject(), "first decision wins");
                }
                "nack" => {
                    m.nack();
                }
                "reject" => {
                    m.reject();
                }
                "error" => return Err::<(), BoxError>("failed undecided".into()),
                "ack-then-error" => {
                    m.ack();
                    return Err("ignored: already acked".into());
                }
                _ => {} // silent return: rejected as fallback
            }
            Ok(())
        })?;
    let e = engine(&db, vec![sub]);
    let mut conn = db.pool.acquire().await?;
    let mut ids = HashMap::new();
    for w in ["ack", "nack", "reject", "error", "ack-then-error", "silent"] {
        ids.insert(w, db.broker.publish(&w, "q", &mut conn).await?);
    }
    e.start().await?;
    // ack, reject, ack-then-error, silent leave the table; nack and error stay for retry.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.scalar(format!(
                "SELECT count(*) FROM {} WHERE attempts_count = 1 AND acquired_token IS NULL",
                db.t()
            ))
            .await
            .unwrap()
                == 2
                && db.count().await.unwrap() == 2
                && db.dlq_count().await.unwrap() == 2
        })
        .await
    );
    e.stop().await;
    let dlq: HashMap<i64, String> = dlq_rows(&db)
        .await?
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(dlq[&ids["reject"]], "rejected");
    assert_eq!(dlq[&ids["silent"]], "rejected");
    let fallback = captured(|c| c.message.contains("under AckPolicy::Manual; rejecting"));
    assert!(
        !fallback.is_empty(),
        "the silent-return fallback is logged loudly"
    );
    Ok(())
}

#[tokio::test]
async fn max_deliveries_goes_terminal_without_running_the_handler() -> R {
    let db = TestDb::new().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let sub = fast(Subscriber::builder(["q"]))
        .max_deliveries(3)
        .build(move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async {}
        })?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    // Three claims already happened (crashes); the next one exceeds the cap.
    db.exec(format!(
        "UPDATE {} SET deliveries_count = 3 WHERE id = {id}",
        db.t()
    ))
    .await?;
    let ok = db.broker.publish(&2, "q", &mut conn).await?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    e.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the healthy row ran");
    let rows = dlq_rows(&db).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0, rows[0].1.as_str(), rows[0].3),
        (id, "max_deliveries", 4)
    );
    assert_ne!(rows[0].0, ok);
    Ok(())
}

#[tokio::test]
async fn a_failing_dead_letter_insert_rolls_back_the_delete() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "ALTER TABLE {} ADD CONSTRAINT refuse_all CHECK (false) NOT VALID",
        db.d()
    ))
    .await?;
    let sub = fast(Subscriber::builder(["q"]))
        .retry(NoRetry)
        .lease_ttl(Duration::from_secs(600))
        .build(|_m: Message| async { Err::<(), BoxError>("poison".into()) })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !captured(|c| c.message.contains("failed") && c.message.contains("refuse_all"))
                .is_empty()
        })
        .await,
        "the failed write is logged"
    );
    e.stop().await;
    assert_eq!(db.dlq_count().await?, 0);
    let still = db
        .scalar(format!("SELECT count(*) FROM {} WHERE id = {id}", db.t()))
        .await?;
    assert_eq!(
        still, 1,
        "the row is still in the outbox (leased, redelivered later)"
    );
    Ok(())
}

#[tokio::test]
async fn a_panicking_handler_is_an_error_and_the_worker_survives() -> R {
    let db = TestDb::new().await?;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["q"]))
        .retry(ConstantRetry::new(Duration::from_secs(3600)))
        .build(move |m: Message| {
            let s = s.clone();
            async move {
                let n: i64 = m.decode()?;
                if n == 0 {
                    panic!("handler bug");
                }
                s.push(&m);
                Ok::<(), BoxError>(())
            }
        })?;
    let e = engine(&db, vec![sub]);
    let mut conn = db.pool.acquire().await?;
    let bad = db.broker.publish(&0, "q", &mut conn).await?;
    db.broker.publish_batch([1, 2, 3], "q", &mut conn).await?;
    e.start().await?;
    assert!(wait_until(Duration::from_secs(10), || async { seen.len() == 3 }).await);
    assert!(
        e.ping(Duration::from_secs(2)).await,
        "every loop still alive"
    );
    e.stop().await;
    let attempts = db
        .scalar(format!(
            "SELECT attempts_count FROM {} WHERE id = {bad}",
            db.t()
        ))
        .await?;
    assert_eq!(
        attempts, 1,
        "the panic was recorded as a failed attempt (nack)"
    );
    Ok(())
}

#[derive(Debug)]
struct Broken(bool);

impl RetryStrategy for Broken {
    fn next_delay(&self, _: &RetryContext<'_>) -> Result<Option<Duration>, BoxError> {
        if self.0 {
            panic!("strategy bug");
        }
        Err("strategy error".into())
    }
}

#[tokio::test]
async fn a_failing_or_panicking_strategy_gives_retry_terminal() -> R {
    for panics in [false, true] {
        let db = TestDb::new().await?;
        let sub = fast(Subscriber::builder(["q"]))
            .retry(Broken(panics))
            .build(|_m: Message| async { Err::<(), BoxError>("handler error".into()) })?;
        let e = engine(&db, vec![sub]);
        e.start().await?;
        publish_n(&db, "q", 1).await?;
        assert!(
            wait_until(Duration::from_secs(10), || async {
                db.dlq_count().await.unwrap() == 1
            })
            .await
        );
        e.stop().await;
        let rows = dlq_rows(&db).await?;
        assert_eq!(rows[0].1, "retry_terminal");
        assert_eq!(rows[0].2.as_deref(), Some("handler error"));
    }
    Ok(())
}

#[tokio::test]
async fn undecodable_payloads_fail_clearly_without_blocking_other_rows() -> R {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        order_id: i64,
    }
    let db = TestDb::new().await?;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["orders"]))
        .retry(NoRetry)
        .build(move |m: Message| {
            let s = s.clone();
            async move {
                let _order: Order = m.decode()?;
                s.push(&m);
                Ok::<(), BoxError>(())
            }
        })?;
    let mut conn = db.pool.acquire().await?;
    let bad_json = db
        .broker
        .publish(&json!({"order_id": "seven"}), "orders", &mut conn)
        .await?;
    let not_json = db
        .broker
        .publish(&"plain text", "orders", &mut conn)
        .await?;
    db.broker
        .publish_batch(
            [json!({"order_id": 1}), json!({"order_id": 2})],
            "orders",
            &mut conn,
        )
        .await?;
    // A foreign writer's garbage: invalid UTF-8 labelled as text, headers not an object.
    db.exec(format!(
        "INSERT INTO {} (queue, payload, headers) VALUES ('orders', '\\xff00'::bytea, '[1,2]'::jsonb)",
        db.t()
    ))
    .await?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.dlq_count().await.unwrap() == 3
        })
        .await
    );
    assert!(wait_until(Duration::from_secs(5), || async { seen.len() == 2 }).await);
    e.stop().await;
    let rows: HashMap<i64, Option<String>> = dlq_rows(&db)
        .await?
        .into_iter()
        .map(|r| (r.0, r.2))
        .collect();
    let text = rows[&bad_json].clone().unwrap();
    assert!(
        text.contains(&format!("cannot decode the payload of row {bad_json}"))
            && text.contains("invalid type: string \"seven\", expected i64"),
        "{text}"
    );
    let text = rows[&not_json].clone().unwrap();
    assert!(text.contains("content-type text/plain"), "{text}");
    assert_eq!(db.count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn batched_acks_delete_everything_in_few_statements() -> R {
    let db = TestDb::new().await?;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["q"]))
        .fetch_batch_size(100)
        .terminal_flush_batch_size(50)
        .max_workers(2)
        .build(move |m: Message| {
            s.push(&m);
            async {}
        })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    publish_n(&db, "q", 1000).await?;
    assert!(db.drained(Duration::from_secs(20)).await);
    e.stop().await;
    assert_eq!(seen.len(), 1000);
    Ok(())
}

#[tokio::test]
async fn batched_terminals_without_dlq_are_deleted_and_partial_batches_flush_when_idle() -> R {
    let db = TestDb::new().await?;
    let broker = OutboxBroker::new(db.pool.clone(), db.table.clone());
    let sub = fast(Subscriber::builder(["q"]))
        .terminal_flush_batch_size(1000) // never full: flushed when the buffer runs dry
        .ack_policy(AckPolicy::RejectOnError)
        .build(|m: Message| async move {
            let n: i64 = m.decode()?;
            if n % 2 == 0 {
                Err::<(), BoxError>("even".into())
            } else {
                Ok(())
            }
        })?;
    let e = Engine::new(broker).subscriber(sub);
    e.start().await?;
    publish_n(&db, "q", 30).await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    e.stop().await;
    Ok(())
}

#[tokio::test]
async fn lease_expiry_hands_the_row_to_another_engine_and_the_late_ack_is_a_no_op() -> R {
    let db = TestDb::new().await?;
    let slow_started = Arc::new(tokio::sync::Notify::new());
    let started = slow_started.clone();
    let slow = fast(Subscriber::builder(["q"]))
        .name("slow")
        .lease_ttl(Duration::from_secs(2))
        // No heartbeat: the lease expires under the running handler.
        .without_lease_heartbeat()
        .build(move |_m: Message| {
            started.notify_one();
            // A handler that outlives its 2 s lease (the behaviour under test).
            async { tokio::time::sleep(Duration::from_secs(5)).await }
        })?;
    let fresh_seen = Seen::default();
    let s = fresh_seen.clone();
    // The claimer's lease_ttl decides when a lease has expired. 2 s (not 1):
    // B's claim, handling and batched ack fit in it on a loaded CI machine.
    let fresh = fast(Subscriber::builder(["q"]))
        .name("fresh")
        .lease_ttl(Duration::from_secs(2))
        .build(move |m: Message| {
            s.push(&m);
            async {}
        })?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    let a = engine(&db, vec![slow]);
    a.start().await?;
    slow_started.notified().await;
    let b = engine(&db, vec![fresh]);
    b.start().await?;
    // After 2 s the lease expires and engine B claims and handles the row.
    assert!(wait_until(Duration::from_secs(10), || async { fresh_seen.len() == 1 }).await);
    assert_eq!(fresh_seen.ids(), [id]);
    // The slow handler's late ack finds the lease gone.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !captured(|c| {
                c.fields.get("event").map(String::as_str) == Some("lease_lost")
                    && c.fields.get("row_id") == Some(&id.to_string())
            })
            .is_empty()
        })
        .await,
        "lease_lost is logged"
    );
    // Engine A may also have claimed the expired row again itself while its
    // handler slept; such a copy waits in its buffer past the lease and is
    // skipped (phase `buffered`) or, picked up in time, is handled and finds
    // the row gone as well. The late ack of the first delivery is the
    // `terminal` one with deliveries_count 1.
    let late_ack = || {
        captured(|c| {
            c.fields.get("event").map(String::as_str) == Some("lease_lost")
                && c.fields.get("row_id") == Some(&id.to_string())
                && c.fields.get("phase").map(String::as_str) == Some("terminal")
                && c.fields.get("deliveries_count").map(String::as_str) == Some("1")
        })
    };
    assert!(
        wait_until(Duration::from_secs(15), || async { !late_ack().is_empty() }).await,
        "the late ack's lease_lost is logged"
    );
    let lost = late_ack();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].level, tracing::Level::WARN);
    assert_eq!(lost[0].fields["phase"], "terminal");
    assert_eq!(lost[0].fields["queue"], "q");
    assert_eq!(lost[0].fields["deliveries_count"], "1");
    a.stop().await;
    b.stop().await;
    assert_eq!(db.count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn two_engines_drain_twenty_thousand_rows_without_double_handling() -> R {
    let db = TestDb::new().await?;
    publish_n(&db, "q", 20_000).await?;
    let counts: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let mk = |name: &str| {
        let c = counts.clone();
        fast(Subscriber::builder(["q"]))
            .name(name)
            .max_workers(4)
            .fetch_batch_size(200)
            .terminal_flush_batch_size(50)
            .build(move |m: Message| {
                *c.lock().unwrap().entry(m.id()).or_default() += 1;
                async {}
            })
    };
    let a = engine(&db, vec![mk("a")?]);
    let b = engine(&db, vec![mk("b")?]);
    a.start().await?;
    b.start().await?;
    assert!(db.drained(Duration::from_secs(120)).await);
    a.stop().await;
    b.stop().await;
    let counts = counts.lock().unwrap();
    assert_eq!(counts.len(), 20_000);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    Ok(())
}

#[tokio::test]
async fn a_crash_mid_batch_loses_nothing() -> R {
    let db = TestDb::new().await?;
    publish_n(&db, "q", 200).await?;
    let handled: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let mk = |slow: bool| {
        let h = handled.clone();
        fast(Subscriber::builder(["q"]))
            .fetch_batch_size(50)
            .terminal_flush_batch_size(10)
            .lease_ttl(Duration::from_secs(2))
            .build(move |m: Message| {
                let h = h.clone();
                async move {
                    if slow {
                        // Slow work: the crash comes mid-batch.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    *h.lock().unwrap().entry(m.id()).or_default() += 1;
                }
            })
    };
    let first = engine(&db, vec![mk(true)?]);
    first.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handled.lock().unwrap().len() >= 60
        })
        .await
    );
    first.abort().await; // kill -9: no release, no flush
    let leased = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
            db.t()
        ))
        .await?;
    assert!(leased > 0, "the crash left leased rows behind");
    let second = engine(&db, vec![mk(false)?]);
    second.start().await?;
    assert!(db.drained(Duration::from_secs(30)).await);
    second.stop().await;
    assert_eq!(db.dlq_count().await?, 0);
    assert_eq!(
        handled.lock().unwrap().len(),
        200,
        "every row delivered at least once"
    );
    Ok(())
}

#[tokio::test]
async fn graceful_stop_releases_unstarted_rows_for_immediate_pickup() -> R {
    let db = TestDb::new().await?;
    publish_n(&db, "q", 40).await?;
    let started = Arc::new(tokio::sync::Notify::new());
    let st = started.clone();
    let slow = fast(Subscriber::builder(["q"]))
        .fetch_batch_size(40)
        .lease_ttl(Duration::from_secs(600)) // without the release, rows would wait 10 minutes
        .build(move |_m: Message| {
            st.notify_one();
            // Slow work: the other rows are still unstarted at the stop.
            async { tokio::time::sleep(Duration::from_millis(300)).await }
        })?;
    let a = engine(&db, vec![slow]);
    a.start().await?;
    started.notified().await;
    let report = a.stop().await;
    assert!(report.released >= 35, "{report:?}");
    assert!(report.timed_out.is_empty(), "{report:?}");
    let leased = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
            db.t()
        ))
        .await?;
    assert_eq!(leased, 0, "nothing left leased");
    let max_claims = db
        .scalar(format!(
            "SELECT coalesce(max(deliveries_count), 0) FROM {}",
            db.t()
        ))
        .await?;
    assert_eq!(max_claims, 0, "released claims are given back");
    let seen = Seen::default();
    let s = seen.clone();
    let b = engine(
        &db,
        vec![fast(Subscriber::builder(["q"])).build(move |m: Message| {
            s.push(&m);
            async {}
        })?],
    );
    let t = Instant::now();
    b.start().await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "picked up at once, not after the lease"
    );
    b.stop().await;
    assert_eq!(seen.len(), report.released);
    Ok(())
}

#[tokio::test]
async fn drain_timeout_abandons_wedged_handlers_to_lease_expiry() -> R {
    let db = TestDb::new().await?;
    let broker = db
        .broker
        .clone()
        .graceful_timeout(Duration::from_millis(300));
    let started = Arc::new(tokio::sync::Notify::new());
    let st = started.clone();
    let sub = fast(Subscriber::builder(["q"])).build(move |_m: Message| {
        st.notify_one();
        std::future::pending::<()>()
    })?;
    let e = Engine::new(broker).subscriber(sub);
    e.start().await?;
    publish_n(&db, "q", 1).await?;
    started.notified().await;
    let t = Instant::now();
    let report = e.stop().await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(report.timed_out, ["q"]);
    assert_eq!(db.count().await?, 1, "the wedged row is not deleted");
    assert!(
        !captured(|c| c.fields.get("event").map(String::as_str) == Some("drain_timeout"))
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn stop_then_start_works_and_ping_follows_the_state() -> R {
    let db = TestDb::new().await?;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["q"])).build(move |m: Message| {
        s.push(&m);
        async {}
    })?;
    let e = engine(&db, vec![sub]);
    assert!(!e.ping(Duration::from_secs(1)).await);
    e.start().await?;
    assert!(e.start().await.is_err(), "already running");
    assert!(e.ping(Duration::from_secs(2)).await);
    publish_n(&db, "q", 2).await?;
    assert!(wait_until(Duration::from_secs(10), || async { seen.len() == 2 }).await);
    e.stop().await;
    assert!(!e.ping(Duration::from_secs(1)).await);
    publish_n(&db, "q", 3).await?;
    e.start().await?;
    assert!(wait_until(Duration::from_secs(10), || async { seen.len() == 5 }).await);
    e.stop().await;
    Ok(())
}

#[tokio::test]
async fn notify_wakes_an_idle_subscriber_long_before_polling_would() -> R {
    let db = TestDb::new().await?;
    let handled_at: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let h = handled_at.clone();
    let sub = Subscriber::builder(["q"])
        .min_fetch_interval(Duration::from_secs(10))
        .max_fetch_interval(Duration::from_secs(10))
        .lease_ttl(Duration::from_secs(60))
        .build(move |m: Message| {
            h.lock().unwrap().insert(m.id(), Instant::now());
            async {}
        })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    // Ready once the engine LISTENs: from then on a commit wakes it.
    assert!(
        db.listening(Duration::from_secs(10)).await,
        "the engine LISTENs"
    );
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let mut tx = db.pool.begin().await?;
        let id = db.broker.publish(&1, "q", &mut *tx).await?;
        tx.commit().await?;
        let committed = Instant::now();
        assert!(
            wait_until(Duration::from_secs(3), || async {
                handled_at.lock().unwrap().contains_key(&id)
            })
            .await,
            "handled without waiting for the 10 s poll"
        );
        let at = handled_at.lock().unwrap()[&id];
        latencies.push(at.saturating_duration_since(committed));
        // Spacing, not readiness: each publish finds the subscriber idle again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.stop().await;
    latencies.sort();
    println!("commit -> handler latencies: {latencies:?}");
    // Polling would take at least 5 s (0.5 x the 10 s interval); NOTIFY takes
    // milliseconds, and well under a second on a loaded 2-core CI machine.
    assert!(
        latencies[2] < Duration::from_secs(1),
        "median {:?}",
        latencies[2]
    );
    Ok(())
}

#[tokio::test]
async fn broken_listen_falls_back_to_polling() -> R {
    let db = TestDb::new().await?;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = Subscriber::builder(["q"])
        .min_fetch_interval(Duration::from_millis(100))
        .max_fetch_interval(Duration::from_millis(300))
        .build(move |m: Message| {
            s.push(&m);
            async {}
        })?;
    // LISTEN goes to a port where nothing listens.
    let dead: sqlx::postgres::PgConnectOptions =
        "postgres://postgres@127.0.0.1:1/nowhere".parse()?;
    let e = engine(&db, vec![sub]).listen_with(dead);
    e.start().await?;
    // The failure is reported once the connection attempt gives up; rows
    // published after it can only be found by polling.
    let channel = db.table.channel();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !captured(|c| {
                c.message
                    .contains("LISTEN setup failed; falling back to polling")
                    && c.fields.get("channel") == Some(&channel)
            })
            .is_empty()
        })
        .await
    );
    publish_n(&db, "q", 3).await?;
    assert!(wait_until(Duration::from_secs(10), || async { seen.len() == 3 }).await);
    e.stop().await;
    Ok(())
}

#[tokio::test]
async fn deliveries_survive_killed_connections_mid_run() -> R {
    let db = TestDb::new().await?;
    let app = format!("kill-{}", suffix());
    let handled: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let h = handled.clone();
    let sub = fast(Subscriber::builder(["q"]))
        .fetch_batch_size(20)
        .max_workers(2)
        .lease_ttl(Duration::from_secs(3))
        .build(move |m: Message| {
            let h = h.clone();
            async move {
                // Some work per row: the kills land while rows are in flight.
                tokio::time::sleep(Duration::from_millis(2)).await;
                *h.lock().unwrap().entry(m.id()).or_default() += 1;
            }
        })?;
    let e = Engine::new(db.broker.clone())
        .application_name(app.clone())
        .subscriber(sub);
    publish_n(&db, "q", 1500).await?;
    e.start().await?;
    // Ready once rows are being delivered: the engine's connections are open.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !handled.lock().unwrap().is_empty()
        })
        .await
    );
    // Three rounds of "the server dropped every connection of the engine".
    let mut kills = 0;
    for round in 0..3 {
        if round > 0 {
            // Spacing, not readiness: separate incidents, with deliveries
            // (and reconnects) between them.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        kills += db
            .scalar(format!(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name LIKE '{app}-%') t"
            ))
            .await?;
    }
    assert!(kills >= 3, "connections were killed ({kills})");
    assert!(db.drained(Duration::from_secs(60)).await);
    assert!(e.ping(Duration::from_secs(5)).await, "loops reconnected");
    e.stop().await;
    assert_eq!(handled.lock().unwrap().len(), 1500, "every row delivered");
    assert_eq!(db.dlq_count().await?, 0, "error paths deleted nothing");
    Ok(())
}

#[tokio::test]
async fn the_claim_uses_the_partial_indexes_at_200k_rows() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "INSERT INTO {} (queue, payload, headers, next_attempt_at, acquired_token, acquired_at) \
         SELECT CASE WHEN g % 4 = 0 THEN 'a' WHEN g % 4 = 1 THEN 'b' ELSE 'c' END, '\\x00'::bytea, '{{}}'::jsonb, \
         now() - (g || ' seconds')::interval, \
         CASE WHEN g % 10 = 0 THEN gen_random_uuid() END, CASE WHEN g % 10 = 0 THEN now() END \
         FROM generate_series(1, 200000) g",
        db.t()
    ))
    .await?;
    db.exec(format!("ANALYZE {}", db.t())).await?;
    let claim = outbox_core::__private::engine_sql(&db.table, "claim").unwrap();
    let explain = format!(
        "EXPLAIN (FORMAT TEXT) {}",
        claim
            .replace("$1::varchar[]", "ARRAY['a','b']::varchar[]")
            .replace("$2", "100")
            .replace("$3", "60")
            .replace("$4", "gen_random_uuid()")
    );
    let mut tx = db.pool.begin().await?;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(plan.contains("_pending_idx"), "{plan}");
    assert!(plan.contains("_leased_idx"), "{plan}");
    Ok(())
}

#[tokio::test]
async fn the_ordered_claim_walks_the_key_index_at_200k_rows() -> R {
    let db = TestDb::new().await?;
    // 1,000 keys interleaved in id order, every tenth row leased, a tenth
    // of the rows without a key.
    db.exec(format!(
        "INSERT INTO {} (queue, payload, headers, next_attempt_at, acquired_token, acquired_at, ordering_key) \
         SELECT CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, '\\x00'::bytea, '{{}}'::jsonb, \
         now() - (g || ' seconds')::interval, \
         CASE WHEN g % 10 = 0 THEN gen_random_uuid() END, CASE WHEN g % 10 = 0 THEN now() END, \
         CASE WHEN g % 10 <> 3 THEN 'k' || (g % 1000) END \
         FROM generate_series(1, 200000) g",
        db.t()
    ))
    .await?;
    db.exec(format!("ANALYZE {}", db.t())).await?;
    for which in ["claim_ordered", "claim_ordered_pending"] {
        let claim = outbox_core::__private::engine_sql(&db.table, which).unwrap();
        let sql = claim
            .replace("$1", "'a'::varchar")
            .replace("$2", "100")
            .replace("$3", "60")
            .replace("$4", "gen_random_uuid()")
            .replace("$5::text", "'k5'::text");
        let mut tx = db.pool.begin().await?;
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .fetch_all(&mut *tx)
            .await?;
        // And it runs: heads only, at most one per key.
        let keys: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH c AS ({sql}) SELECT ordering_key FROM c"
        )))
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan"), "{which}: {plan}");
        assert!(plan.contains("_key_idx"), "{which}: {plan}");
        assert!(!keys.is_empty() && keys.len() <= 100, "{which}: {keys:?}");
        let mut keyed: Vec<&String> = keys.iter().flatten().collect();
        let n = keyed.len();
        keyed.sort();
        keyed.dedup();
        assert_eq!(keyed.len(), n, "{which}: one row per key: {keys:?}");
    }
    Ok(())
}

#[tokio::test]
async fn expired_leases_are_reclaimed_in_fifo_order_and_counted() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    // A crashed holder: leased ten minutes ago.
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() - interval '10 minutes', \
         deliveries_count = 1 WHERE id = {id}",
        db.t()
    ))
    .await?;
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let s = seen.clone();
    let sub = fast(Subscriber::builder(["q"])).build(move |m: Message| {
        s.lock().unwrap().push(m.deliveries_count());
        async {}
    })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    e.stop().await;
    assert_eq!(
        *seen.lock().unwrap(),
        [2],
        "the reclaim counts as a delivery"
    );
    Ok(())
}

#[tokio::test]
async fn last_exception_renderer_redacts_and_long_errors_are_capped() -> R {
    let db = TestDb::new().await?;
    let redacting = db.broker.clone().last_exception_renderer(|e| {
        let text = e.to_string();
        if text.contains("secret") {
            None
        } else {
            Some(text.replace("card=4111", "card=****"))
        }
    });
    let sub = fast(Subscriber::builder(["q"]))
        .retry(NoRetry)
        .build(|m: Message| async move {
            let what: String = m.decode()?;
            Err::<(), BoxError>(match what.as_str() {
                "pii" => "charge failed for card=4111".into(),
                "secret" => "secret token leaked".into(),
                _ => "x".repeat(20_000).into(),
            })
        })?;
    let e = Engine::new(redacting).subscriber(sub);
    let mut conn = db.pool.acquire().await?;
    let pii = db.broker.publish("pii", "q", &mut conn).await?;
    let secret = db.broker.publish("secret", "q", &mut conn).await?;
    let long = db.broker.publish("long", "q", &mut conn).await?;
    e.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.dlq_count().await.unwrap() == 3
        })
        .await
    );
    e.stop().await;
    let rows: HashMap<i64, Option<String>> = dlq_rows(&db)
        .await?
        .into_iter()
        .map(|r| (r.0, r.2))
        .collect();
    assert_eq!(rows[&pii].as_deref(), Some("charge failed for card=****"));
    assert_eq!(rows[&secret], None, "the renderer may store nothing");
    let capped = rows[&long].clone().unwrap();
    assert_eq!(
        capped.chars().count(),
        outbox_core::LAST_EXCEPTION_MAX_CHARS
    );
    assert!(capped.ends_with("…[truncated]"));
    Ok(())
}

#[tokio::test]
async fn batched_deletes_flush_at_half_a_lease_when_the_buffer_never_empties() -> R {
    let db = TestDb::new().await?;
    publish_n(&db, "q", 10).await?;
    let counts: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let c = counts.clone();
    // 10 rows x 300 ms = 3 s of work under a 2 s lease, and the buffer is
    // refilled while each handler runs, so it never runs dry: only the
    // half-lease trigger flushes in time.
    let sub = fast(Subscriber::builder(["q"]))
        .fetch_batch_size(2)
        .terminal_flush_batch_size(100)
        .lease_ttl(Duration::from_secs(2))
        .build(move |m: Message| {
            *c.lock().unwrap().entry(m.id()).or_default() += 1;
            async { tokio::time::sleep(Duration::from_millis(300)).await }
        })?;
    let e = engine(&db, vec![sub]);
    e.start().await?;
    assert!(
        wait_until(Duration::from_millis(2500), || async {
            db.count().await.unwrap() <= 8
        })
        .await,
        "rows are deleted while the run goes on"
    );
    assert!(db.drained(Duration::from_secs(15)).await);
    e.stop().await;
    let counts = counts.lock().unwrap();
    assert_eq!(counts.len(), 10);
    assert!(
        counts.values().all(|n| *n == 1),
        "handled once each: {counts:?}"
    );
    Ok(())
}

#[tokio::test]
async fn token_guarded_writes_use_the_primary_key_even_when_statistics_say_nothing_is_leased() -> R
{
    let db = TestDb::new().await?;
    publish_n(&db, "q", 20_000).await?;
    db.exec(format!("ANALYZE {}", db.t())).await?; // statistics: no leased row at all
    // ... while in fact many rows are leased (as during a drain).
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE id % 2 = 0",
        db.t()
    ))
    .await?;
    let ids = "(SELECT array_agg(id) FROM generate_series(1, 1000) id)::int8[]";
    let tokens = "(SELECT array_agg(gen_random_uuid()) FROM generate_series(1, 1000))::uuid[]";
    for (which, args) in [
        ("ack", ["5::int8", "gen_random_uuid()", ""]),
        ("retry", ["5::int8", "gen_random_uuid()", "1.0::float8"]),
        ("ack_batch", [ids, tokens, ""]),
        ("release", [ids, tokens, ""]),
    ] {
        let mut sql = outbox_core::__private::engine_sql(&db.table, which).unwrap();
        for (i, a) in args.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            sql = sql.replace(&format!("${}", i + 1), a);
        }
        let mut tx = db.pool.begin().await?;
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .fetch_all(&mut *tx)
            .await?;
        tx.rollback().await?;
        let plan = plan.join("\n");
        assert!(
            plan.contains("_pkey"),
            "{which} must look rows up by primary key:\n{plan}"
        );
        assert!(
            !plan.contains("_leased_idx") && !plan.contains("Seq Scan"),
            "{which}:\n{plan}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn relay_writes_commit_asynchronously_without_touching_other_transactions() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    let ack = outbox_core::__private::engine_sql(&db.table, "ack").unwrap();
    let mut tx = db.pool.begin().await?;
    let before: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(ack))
        .bind(id)
        .bind(uuid::Uuid::new_v4())
        .execute(&mut *tx)
        .await?;
    let during: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *tx)
        .await?;
    tx.rollback().await?;
    let after: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *conn)
        .await?;
    assert_eq!(before, "on");
    assert_eq!(
        during, "off",
        "the relay's write turned it off for its own transaction"
    );
    assert_eq!(
        after, "on",
        "transaction-local: nothing leaks to the session"
    );
    Ok(())
}

#[tokio::test]
async fn the_pending_only_claim_uses_the_pending_index() -> R {
    let db = TestDb::new().await?;
    publish_n(&db, "a", 50_000).await?;
    db.exec(format!("ANALYZE {}", db.t())).await?;
    let claim = outbox_core::__private::engine_sql(&db.table, "claim_pending").unwrap();
    let sql = claim
        .replace("$1::varchar[]", "ARRAY['a']::varchar[]")
        .replace("$2", "100")
        .replace("$4", "gen_random_uuid()");
    let mut tx = db.pool.begin().await?;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let plan = plan.join("\n");
    assert!(
        plan.contains("_pending_idx") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    assert!(
        !plan.contains("_leased_idx"),
        "no expired-lease branch: {plan}"
    );
    Ok(())
}
