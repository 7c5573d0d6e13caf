//! The operations API (`outbox_core::ops`) against real PostgreSQL: queue
//! statistics, dead-letter listing, replay (delivery afterwards, dry run,
//! atomicity, timer ids, batches) and purge.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use outbox_core::ops::{
    AutovacuumOptions, DlqFilter, REPLAYED_FROM_HEADER, ReplayOptions, ReplayTimers, SkipReason,
    autovacuum_sql,
};
use outbox_core::{
    AckPolicy, BoxError, Engine, Error, Message, OutboxBroker, PublishOptions, Subscriber,
};
use serde_json::json;
use sqlx::Row;
use sqlx::types::Json;
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;

/// A handled message: id, decoded body, correlation id, headers.
type Seen = (i64, serde_json::Value, String, BTreeMap<String, String>);

/// Inserts a dead letter directly: payload `{"n": original_id}` (JSON),
/// correlation id `corr-<original_id>`, failed `failed_ago` seconds ago.
async fn dead_letter(
    db: &TestDb,
    original_id: i64,
    queue: &str,
    reason: &str,
    failed_ago: i64,
    timer_id: Option<&str>,
) -> anyhow::Result<i64> {
    let headers = json!({
        "content-type": "application/json",
        "correlation_id": format!("corr-{original_id}"),
        "x-tenant": "acme",
    });
    let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failed_at, failure_reason, last_exception, timer_id) \
         VALUES ($1, $2, $3, $4, 2, now() - interval '1 day', now() - make_interval(secs => $5), \
         $6, 'ValueError: boom', $7) RETURNING id",
        db.d()
    )))
    .bind(original_id)
    .bind(queue)
    .bind(serde_json::to_vec(&json!({ "n": original_id }))?)
    .bind(Json(headers))
    .bind(failed_ago as f64)
    .bind(reason)
    .bind(timer_id)
    .fetch_one(&db.pool)
    .await?;
    Ok(id)
}

/// `(queue, payload, headers, timer_id, attempts, deliveries)` of every outbox row, by id.
#[allow(clippy::type_complexity)]
async fn outbox_rows(
    db: &TestDb,
) -> anyhow::Result<Vec<(String, Vec<u8>, serde_json::Value, Option<String>, i64, i64)>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT queue::text, payload, headers, timer_id::text, attempts_count, deliveries_count \
         FROM {} ORDER BY id",
        db.t()
    )))
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get::<i64, _>(4),
                r.get::<i64, _>(5),
            )
        })
        .collect())
}

fn is_invalid_argument(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_))
}

#[tokio::test]
async fn stats_count_each_state_per_queue() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let b = &db.broker;
    let ago = |s: i64| PublishOptions::new().activate_at(Utc::now() - chrono::Duration::seconds(s));
    // queue a: 3 ready (the oldest due 120 s ago), 2 scheduled, 1 leased.
    b.publish_with(&1, "a", &ago(120), &mut conn).await?;
    b.publish_with(&2, "a", &ago(10), &mut conn).await?;
    b.publish(&3, "a", &mut conn).await?;
    let later = PublishOptions::new().activate_in(Duration::from_secs(3600));
    b.publish_with(&4, "a", &later, &mut conn).await?;
    b.publish_with(&5, "a", &later, &mut conn).await?;
    let leased_a = b.publish(&6, "a", &mut conn).await?;
    // queue b: only a leased row (due long ago: a lease still counts as leased).
    let leased_b = b
        .publish_with(&7, "b", &ago(600), &mut conn)
        .await?
        .unwrap();
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE id IN ({leased_a}, {leased_b})",
        db.t()
    ))
    .await?;
    // dead letters: 2 of a, 1 of c (a queue that only exists in the DLQ).
    dead_letter(&db, 100, "a", "rejected", 0, None).await?;
    dead_letter(&db, 101, "a", "retry_terminal", 0, None).await?;
    dead_letter(&db, 102, "c", "max_deliveries", 0, None).await?;

    let stats = b.stats().await?;
    let names: Vec<&str> = stats.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = &stats[0];
    assert_eq!(
        (a.ready, a.scheduled, a.leased, a.dead_letters),
        (3, 2, 1, 2)
    );
    assert_eq!(a.in_outbox(), 6);
    let age = a.oldest_ready_age.unwrap();
    assert!(
        age >= Duration::from_secs(119) && age < Duration::from_secs(180),
        "{age:?}"
    );
    let bq = &stats[1];
    assert_eq!(
        (bq.ready, bq.scheduled, bq.leased, bq.dead_letters),
        (0, 0, 1, 0)
    );
    assert_eq!(bq.oldest_ready_age, None, "a leased row is not ready");
    let c = &stats[2];
    assert_eq!(
        (c.ready, c.scheduled, c.leased, c.dead_letters),
        (0, 0, 0, 1)
    );

    // Selected queues: in name order, unknown ones with zeros.
    let some = b.stats_for(&["zzz", "a", "a"]).await?;
    assert_eq!(some.len(), 2);
    assert_eq!(some[0].queue, "a");
    assert_eq!(some[0].ready, 3);
    assert_eq!(some[1].queue, "zzz");
    assert_eq!(some[1].in_outbox() + some[1].dead_letters, 0);
    assert!(b.stats_for(&[]).await?.is_empty());
    assert!(is_invalid_argument(&b.stats_for(&[""]).await.unwrap_err()));

    // Without a dead-letter table: no DLQ counts, no DLQ-only queues.
    let plain = OutboxBroker::new(db.pool.clone(), db.table.clone());
    let stats = plain.stats().await?;
    assert_eq!(stats.len(), 2);
    assert!(stats.iter().all(|q| q.dead_letters == 0));
    Ok(())
}

#[tokio::test]
async fn an_empty_outbox_has_no_queues() -> R {
    let db = TestDb::new().await?;
    assert!(db.broker.stats().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn dlq_list_filters_and_get() -> R {
    let db = TestDb::new().await?;
    let b = &db.broker;
    let d1 = dead_letter(&db, 1, "orders", "rejected", 7200, None).await?;
    let d2 = dead_letter(&db, 2, "orders", "retry_terminal", 60, Some("t")).await?;
    let d3 = dead_letter(&db, 3, "mail", "retry_terminal", 30, None).await?;
    let d4 = dead_letter(&db, 4, "orders", "max_deliveries", 10, None).await?;
    let ids =
        |v: Vec<outbox_core::ops::DeadLetter>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();

    assert_eq!(ids(b.dlq_list(&DlqFilter::new()).await?), [d1, d2, d3, d4]);
    assert_eq!(
        ids(b.dlq_list(&DlqFilter::new().queue("orders")).await?),
        [d1, d2, d4]
    );
    assert_eq!(
        ids(b
            .dlq_list(&DlqFilter::new().reason("retry_terminal"))
            .await?),
        [d2, d3]
    );
    let hour_ago = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(
        ids(b.dlq_list(&DlqFilter::new().since(hour_ago)).await?),
        [d2, d3, d4]
    );
    assert_eq!(
        ids(b.dlq_list(&DlqFilter::new().until(hour_ago)).await?),
        [d1]
    );
    assert_eq!(
        ids(b
            .dlq_list(&DlqFilter::new().queue("orders").since(hour_ago).limit(1))
            .await?),
        [d2]
    );
    assert_eq!(
        ids(b.dlq_list(&DlqFilter::new().ids([d4, d1, 999_999])).await?),
        [d1, d4]
    );
    assert!(b.dlq_list(&DlqFilter::new().ids([])).await?.is_empty());
    assert!(
        b.dlq_list(&DlqFilter::new().queue("nope"))
            .await?
            .is_empty()
    );
    assert_eq!(b.dlq_count(&DlqFilter::new().queue("orders")).await?, 3);
    assert_eq!(
        b.dlq_count(&DlqFilter::new().queue("orders").limit(2))
            .await?,
        2
    );
    assert!(is_invalid_argument(
        &b.dlq_list(&DlqFilter::new().limit(0)).await.unwrap_err()
    ));

    let dl = b.dlq_get(d2).await?.unwrap();
    assert_eq!(dl.original_id, 2);
    assert_eq!(dl.queue, "orders");
    assert_eq!(dl.failure_reason, "retry_terminal");
    assert_eq!(dl.last_exception.as_deref(), Some("ValueError: boom"));
    assert_eq!(dl.timer_id.as_deref(), Some("t"));
    assert_eq!(dl.deliveries_count, 2);
    assert_eq!(dl.correlation_id(), "corr-2");
    assert_eq!(dl.content_type(), Some("application/json"));
    assert_eq!(dl.headers["x-tenant"], "acme");
    assert_eq!(dl.decode::<serde_json::Value>()?, json!({"n": 2}));
    let err = dl.decode::<String>().unwrap_err().to_string();
    assert!(err.contains(&format!("dead letter {d2}")), "{err}");
    assert!(b.dlq_get(999_999).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn without_a_dead_letter_table_dlq_operations_name_the_fix() -> R {
    let db = TestDb::new().await?;
    let plain = OutboxBroker::new(db.pool.clone(), db.table.clone());
    let errs = [
        plain.dlq_list(&DlqFilter::new()).await.unwrap_err(),
        plain.dlq_get(1).await.unwrap_err(),
        plain.dlq_replay(&DlqFilter::all()).await.unwrap_err(),
        plain.dlq_purge(&DlqFilter::all()).await.unwrap_err(),
    ];
    for e in errs {
        assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
        assert!(
            e.to_string().contains("OutboxBroker::dead_letter_table"),
            "{e}"
        );
    }
    Ok(())
}

/// Three rows fail for good through the engine, are replayed, and are then
/// handled by a relay woken by the replay's NOTIFY.
#[tokio::test]
async fn replayed_dead_letters_are_delivered_with_their_payload_and_headers() -> R {
    let db = TestDb::new().await?;
    let failing = Subscriber::builder(["orders"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .ack_policy(AckPolicy::RejectOnError)
        .build(|_m: Message| async { Err::<(), BoxError>("downstream is down".into()) })?;
    let e = Engine::new(db.broker.clone()).subscriber(failing);
    e.start().await?;
    let mut conn = db.pool.acquire().await?;
    let mut originals = Vec::new();
    for n in 1..=3 {
        let opts = PublishOptions::new()
            .correlation_id(format!("order-{n}"))
            .header("x-tenant", "acme");
        let id = db
            .broker
            .publish_with(&json!({ "order": n }), "orders", &opts, &mut conn)
            .await?
            .unwrap();
        originals.push(id);
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.dlq_count().await.unwrap() == 3
        })
        .await
    );
    e.stop().await;
    let dead = db.broker.dlq_list(&DlqFilter::new()).await?;
    let mut dead_originals: Vec<i64> = dead.iter().map(|d| d.original_id).collect();
    dead_originals.sort_unstable();
    assert_eq!(dead_originals, originals);
    assert!(dead.iter().all(|d| d.failure_reason == "rejected"));

    // An idle relay that polls only every 10 s: only the NOTIFY wakes it quickly.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let ok = Subscriber::builder(["orders"])
        .min_fetch_interval(Duration::from_secs(10))
        .max_fetch_interval(Duration::from_secs(10))
        .build(move |m: Message| {
            let body: serde_json::Value = m.decode().unwrap();
            s.lock()
                .unwrap()
                .push((m.id(), body, m.correlation_id(), m.headers().clone()));
            async {}
        })?;
    let e = Engine::new(db.broker.clone()).subscriber(ok);
    e.start().await?;
    // Ready once the relay LISTENs: the replay's NOTIFY then wakes it.
    assert!(
        db.listening(Duration::from_secs(10)).await,
        "the relay LISTENs"
    );

    let ids: Vec<i64> = dead.iter().map(|d| d.id).collect();
    let report = db
        .broker
        .dlq_replay(&DlqFilter::new().ids(ids.clone()))
        .await?;
    assert!(!report.dry_run);
    assert!(report.skipped.is_empty());
    assert_eq!(report.replayed.len(), 3);
    assert_eq!(report.batches, 1);
    assert_eq!(report.per_queue()["orders"], 3);
    for (r, d) in report.replayed.iter().zip(&dead) {
        assert_eq!(r.dead_letter_id, d.id);
        assert_eq!(r.original_id, d.original_id);
        assert!(r.new_id.unwrap() > *originals.last().unwrap(), "new ids");
    }
    assert_eq!(db.dlq_count().await?, 0, "moved, not copied");

    assert!(
        wait_until(Duration::from_secs(3), || async {
            seen.lock().unwrap().len() == 3
        })
        .await,
        "delivered without waiting for the 10 s poll"
    );
    assert!(db.drained(Duration::from_secs(5)).await);
    e.stop().await;
    let seen = seen.lock().unwrap().clone();
    let new_ids: Vec<Option<i64>> = report.replayed.iter().map(|r| r.new_id).collect();
    for (id, body, corr, headers) in &seen {
        assert!(new_ids.contains(&Some(*id)));
        let n = body["order"].as_i64().unwrap();
        let original = originals[usize::try_from(n - 1).unwrap()];
        assert_eq!(*corr, format!("order-{n}"), "same correlation id");
        assert_eq!(headers["x-tenant"], "acme");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers[REPLAYED_FROM_HEADER], original.to_string());
        let r = report
            .replayed
            .iter()
            .find(|r| r.new_id == Some(*id))
            .unwrap();
        assert_eq!(r.original_id, original, "report pairs new and original ids");
    }
    Ok(())
}

#[tokio::test]
async fn replay_resets_the_row_and_keeps_the_envelope() -> R {
    let db = TestDb::new().await?;
    dead_letter(&db, 41, "orders", "retry_terminal", 0, None).await?;
    // A foreign writer's row without headers: gets the correlation id its
    // handler saw (the original row id).
    db.exec(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, failure_reason) \
         VALUES (42, 'orders', 'raw', NULL, 9, now(), 'rejected')",
        db.d()
    ))
    .await?;
    db.broker
        .dlq_replay(&DlqFilter::new().queue("orders"))
        .await?;
    let rows = outbox_rows(&db).await?;
    assert_eq!(rows.len(), 2);
    let (queue, payload, headers, timer, attempts, deliveries) = &rows[0];
    assert_eq!(queue, "orders");
    assert_eq!(payload, br#"{"n":41}"#);
    assert_eq!(
        *headers,
        json!({
            "content-type": "application/json",
            "correlation_id": "corr-41",
            "x-tenant": "acme",
            REPLAYED_FROM_HEADER: "41",
        })
    );
    assert_eq!((timer.as_deref(), *attempts, *deliveries), (None, 0, 0));
    assert_eq!(rows[1].1, b"raw");
    assert_eq!(
        rows[1].2,
        json!({"correlation_id": "42", REPLAYED_FROM_HEADER: "42"})
    );
    let due: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT bool_and(next_attempt_at <= now() AND acquired_token IS NULL AND created_at > now() - interval '1 minute') FROM {}",
        db.t()
    )))
    .fetch_one(&db.pool)
    .await?;
    assert!(due, "due now, unleased, created now");
    Ok(())
}

/// A keyed row dead-lettered by an ordered subscriber comes back with its
/// key (at the end of its key: a new id).
#[tokio::test]
async fn replay_keeps_the_ordering_key() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failure_reason, ordering_key) VALUES (5, 'orders', '1', '{{}}', 1, now(), 'retry_terminal', 'order-5')",
        db.d()
    ))
    .await?;
    let report = db
        .broker
        .dlq_replay(&DlqFilter::new().queue("orders"))
        .await?;
    assert_eq!(report.replayed.len(), 1);
    let keys: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT ordering_key FROM {}",
        db.t()
    )))
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(keys, [Some("order-5".to_owned())]);
    Ok(())
}

/// A foreign writer may have archived two rows with the same original id:
/// the report still pairs each dead letter with its own new row.
#[tokio::test]
async fn new_ids_pair_up_even_with_repeated_original_ids() -> R {
    let db = TestDb::new().await?;
    for body in ["first", "second", "third"] {
        db.exec(format!(
            "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, failure_reason) \
             VALUES (7, 'q', convert_to('{body}', 'UTF8'), '{{}}', 1, now(), 'rejected')",
            db.d()
        ))
        .await?;
    }
    let before: Vec<(i64, Vec<u8>)> = db
        .broker
        .dlq_list(&DlqFilter::new())
        .await?
        .into_iter()
        .map(|d| (d.id, d.payload))
        .collect();
    let report = db.broker.dlq_replay(&DlqFilter::new().queue("q")).await?;
    assert_eq!(report.replayed.len(), 3);
    for r in &report.replayed {
        let want = &before.iter().find(|b| b.0 == r.dead_letter_id).unwrap().1;
        let got: Vec<u8> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT payload FROM {} WHERE id = $1",
            db.t()
        )))
        .bind(r.new_id.unwrap())
        .fetch_one(&db.pool)
        .await?;
        assert_eq!(&got, want);
    }
    Ok(())
}

#[tokio::test]
async fn dry_run_moves_nothing() -> R {
    let db = TestDb::new().await?;
    for n in 1..=3 {
        dead_letter(&db, n, "orders", "rejected", 0, None).await?;
    }
    let report = db
        .broker
        .dlq_replay_with(
            &DlqFilter::new().queue("orders"),
            &ReplayOptions::new().dry_run(true),
            |_| {},
        )
        .await?;
    assert!(report.dry_run);
    assert_eq!(report.replayed.len(), 3);
    assert!(report.replayed.iter().all(|r| r.new_id.is_none()));
    assert_eq!(db.dlq_count().await?, 3);
    assert_eq!(db.count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn replay_and_purge_refuse_an_empty_filter() -> R {
    let db = TestDb::new().await?;
    dead_letter(&db, 1, "orders", "rejected", 0, None).await?;
    for f in [DlqFilter::new(), DlqFilter::new().limit(10)] {
        let e = db.broker.dlq_replay(&f).await.unwrap_err();
        assert!(is_invalid_argument(&e), "{e:?}");
        assert!(e.to_string().contains("DlqFilter::all()"), "{e}");
        let e = db.broker.dlq_purge(&f).await.unwrap_err();
        assert!(is_invalid_argument(&e), "{e:?}");
    }
    let e = db
        .broker
        .dlq_replay_with(
            &DlqFilter::all(),
            &ReplayOptions::new().batch_size(0),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(is_invalid_argument(&e), "{e:?}");
    assert_eq!(db.dlq_count().await?, 1);
    assert_eq!(
        db.broker
            .dlq_replay(&DlqFilter::all())
            .await?
            .replayed
            .len(),
        1
    );
    Ok(())
}

/// A failing outbox insert rolls the batch's delete back; earlier batches stay
/// committed.
#[tokio::test]
async fn a_failing_insert_leaves_the_batch_in_the_dead_letter_table() -> R {
    let db = TestDb::new().await?;
    let ok1 = dead_letter(&db, 1, "orders", "rejected", 0, None).await?;
    let poison = dead_letter(&db, 2, "poison", "rejected", 0, None).await?;
    let ok3 = dead_letter(&db, 3, "orders", "rejected", 0, None).await?;
    db.exec(format!(
        "ALTER TABLE {} ADD CONSTRAINT no_poison CHECK (queue <> 'poison')",
        db.t()
    ))
    .await?;

    // One batch: nothing moves.
    let e = db.broker.dlq_replay(&DlqFilter::all()).await.unwrap_err();
    assert!(matches!(e, Error::Database(_)), "{e:?}");
    assert!(e.to_string().contains("no_poison"), "{e}");
    assert_eq!(db.dlq_count().await?, 3);
    assert_eq!(db.count().await?, 0);

    // One row per batch: the first batch commits, the second fails whole.
    let mut progress = Vec::new();
    let e = db
        .broker
        .dlq_replay_with(
            &DlqFilter::all(),
            &ReplayOptions::new().batch_size(1),
            |p| progress.push((p.done, p.replayed, p.total)),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Database(_)), "{e:?}");
    assert_eq!(progress, [(1, 1, 3)]);
    let left: Vec<i64> = db
        .broker
        .dlq_list(&DlqFilter::new())
        .await?
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, [poison, ok3]);
    assert_eq!(db.count().await?, 1);
    let _ = ok1;

    // Fixed: the same replay continues where it stopped.
    db.exec(format!("ALTER TABLE {} DROP CONSTRAINT no_poison", db.t()))
        .await?;
    let report = db.broker.dlq_replay(&DlqFilter::all()).await?;
    assert_eq!(report.replayed.len(), 2);
    assert_eq!(db.dlq_count().await?, 0);
    assert_eq!(db.count().await?, 3);
    Ok(())
}

#[tokio::test]
async fn large_replays_go_in_batches_with_progress() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, failure_reason) \
         SELECT g, CASE WHEN g % 2 = 0 THEN 'even' ELSE 'odd' END, convert_to(g::text, 'UTF8'), \
         jsonb_build_object('correlation_id', 'c' || g), 1, now(), 'rejected' FROM generate_series(1, 1203) g",
        db.d()
    ))
    .await?;
    let mut progress = Vec::new();
    let report = db
        .broker
        .dlq_replay_with(
            &DlqFilter::all(),
            &ReplayOptions::new().batch_size(500),
            |p| progress.push((p.batches, p.done, p.total)),
        )
        .await?;
    assert_eq!(progress, [(1, 500, 1203), (2, 1000, 1203), (3, 1203, 1203)]);
    assert_eq!(report.batches, 3);
    assert_eq!(report.replayed.len(), 1203);
    assert_eq!(report.per_queue()["even"], 601);
    assert_eq!(report.per_queue()["odd"], 602);
    assert_eq!(db.count().await?, 1203);
    assert_eq!(db.dlq_count().await?, 0);
    // Every new id is paired with the right dead letter.
    let mismatched = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE convert_from(payload, 'UTF8') <> headers ->> '{REPLAYED_FROM_HEADER}'",
            db.t()
        ))
        .await?;
    assert_eq!(mismatched, 0);
    for r in &report.replayed {
        let payload = db
            .scalar(format!(
                "SELECT convert_from(payload, 'UTF8')::int8 FROM {} WHERE id = {}",
                db.t(),
                r.new_id.unwrap()
            ))
            .await?;
        assert_eq!(payload, r.original_id);
    }
    // A limit caps the rows examined, oldest first, across batches.
    for n in 1..=5 {
        dead_letter(&db, 5000 + n, "odd", "rejected", 0, None).await?;
    }
    let mut progress = Vec::new();
    let report = db
        .broker
        .dlq_replay_with(
            &DlqFilter::all().limit(3),
            &ReplayOptions::new().batch_size(2),
            |p| progress.push((p.done, p.total)),
        )
        .await?;
    let originals: Vec<i64> = report.replayed.iter().map(|r| r.original_id).collect();
    assert_eq!(originals, [5001, 5002, 5003]);
    assert_eq!(progress, [(2, 3), (3, 3)]);
    assert_eq!(db.dlq_count().await?, 2);
    Ok(())
}

#[tokio::test]
async fn timer_ids_are_kept_and_conflicts_skipped() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let t1a = dead_letter(&db, 1, "q", "rejected", 0, Some("t1")).await?;
    let t1b = dead_letter(&db, 2, "q", "rejected", 0, Some("t1")).await?;
    let t2 = dead_letter(&db, 3, "q", "rejected", 0, Some("t2")).await?;
    let t3 = dead_letter(&db, 4, "q", "rejected", 0, Some("t3")).await?;
    let other_queue = dead_letter(&db, 5, "r", "rejected", 0, Some("t2")).await?;
    // t2 is live in queue q.
    db.broker
        .publish_with(
            &"live",
            "q",
            &PublishOptions::new().timer_id("t2"),
            &mut conn,
        )
        .await?
        .unwrap();

    // A dry run one row per batch sees the cross-batch duplicate too.
    let dry = db
        .broker
        .dlq_replay_with(
            &DlqFilter::all(),
            &ReplayOptions::new().dry_run(true).batch_size(1),
            |_| {},
        )
        .await?;
    let report = db.broker.dlq_replay(&DlqFilter::all()).await?;
    for r in [&dry, &report] {
        let moved: Vec<i64> = r.replayed.iter().map(|x| x.dead_letter_id).collect();
        assert_eq!(moved, [t1a, t3, other_queue]);
        let skipped: Vec<(i64, SkipReason)> = r
            .skipped
            .iter()
            .map(|x| (x.dead_letter_id, x.reason))
            .collect();
        assert_eq!(
            skipped,
            [
                (t1b, SkipReason::DuplicateTimer),
                (t2, SkipReason::LiveTimer)
            ]
        );
    }
    assert_eq!(db.dlq_count().await?, 2, "skipped rows stay");
    let timers: Vec<Option<String>> = outbox_rows(&db).await?.into_iter().map(|r| r.3).collect();
    assert_eq!(
        timers,
        [
            Some("t2".into()),
            Some("t1".into()),
            Some("t3".into()),
            Some("t2".into())
        ]
    );
    // The replayed timer is a real timer again.
    assert!(db.broker.cancel_timer("q", "t1", &mut conn).await?);

    // Cross-batch: with t1 cancelled, the duplicate goes in a later replay.
    let again = db
        .broker
        .dlq_replay_with(
            &DlqFilter::new().ids([t1b, t2]),
            &ReplayOptions::new().batch_size(1),
            |_| {},
        )
        .await?;
    assert_eq!(again.replayed.len(), 1);
    assert_eq!(again.skipped[0].reason, SkipReason::LiveTimer);

    // Dropping timer ids replays the rest as plain rows.
    let dropped = db
        .broker
        .dlq_replay_with(
            &DlqFilter::new().ids([t2]),
            &ReplayOptions::new().timers(ReplayTimers::Drop),
            |_| {},
        )
        .await?;
    assert_eq!(dropped.replayed.len(), 1);
    assert_eq!(dropped.replayed[0].timer_id, None);
    assert_eq!(db.dlq_count().await?, 0);
    let plain = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE timer_id IS NULL",
            db.t()
        ))
        .await?;
    assert_eq!(plain, 1);
    Ok(())
}

#[tokio::test]
async fn purge_deletes_only_what_the_filter_selects() -> R {
    let db = TestDb::new().await?;
    let b = &db.broker;
    let old_rejected = dead_letter(&db, 1, "orders", "rejected", 86_400 * 40, None).await?;
    let old_mail = dead_letter(&db, 2, "mail", "retry_terminal", 86_400 * 40, None).await?;
    let new_rejected = dead_letter(&db, 3, "orders", "rejected", 10, None).await?;
    let new_terminal = dead_letter(&db, 4, "orders", "retry_terminal", 10, None).await?;
    let by_id = dead_letter(&db, 5, "orders", "max_deliveries", 10, None).await?;
    let rest: Vec<i64> = (6..=9).collect();
    for n in &rest {
        dead_letter(&db, *n, "bulk", "rejected", 5, None).await?;
    }
    let left = || async {
        db.broker
            .dlq_list(&DlqFilter::new())
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect::<Vec<_>>()
    };
    let month_ago = Utc::now() - chrono::Duration::days(30);

    assert_eq!(
        b.dlq_purge(&DlqFilter::new().queue("orders").until(month_ago))
            .await?,
        1
    );
    assert!(!left().await.contains(&old_rejected));
    assert!(left().await.contains(&old_mail));
    assert_eq!(
        b.dlq_purge(&DlqFilter::new().queue("orders").reason("rejected"))
            .await?,
        1
    );
    assert!(!left().await.contains(&new_rejected));
    assert!(left().await.contains(&new_terminal));
    assert_eq!(
        b.dlq_purge(&DlqFilter::new().ids([by_id, 999_999])).await?,
        1
    );
    assert_eq!(b.dlq_purge(&DlqFilter::new().queue("nope")).await?, 0);
    // A limit takes the oldest ids first.
    assert_eq!(
        b.dlq_purge(&DlqFilter::new().queue("bulk").limit(3))
            .await?,
        3
    );
    let remaining = left().await;
    assert_eq!(remaining.len(), 3);
    assert!(remaining.contains(&old_mail) && remaining.contains(&new_terminal));
    assert_eq!(db.dlq_count().await?, 3);
    assert_eq!(b.dlq_purge(&DlqFilter::all()).await?, 3);
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn autovacuum_sql_applies_to_the_live_table() -> R {
    let db = TestDb::new().await?;
    let sql = autovacuum_sql(
        &db.table,
        AutovacuumOptions {
            vacuum_threshold: 500,
            insert_threshold: 2000,
            cost_delay: Some(Duration::from_millis(2)),
            cost_limit: Some(2000),
        },
    );
    db.exec(sql).await?;
    let opts: Vec<String> =
        sqlx::query_scalar("SELECT unnest(reloptions) FROM pg_class WHERE oid = to_regclass($1)")
            .bind(db.t())
            .fetch_all(&db.pool)
            .await?;
    for want in [
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=500",
        "autovacuum_vacuum_insert_scale_factor=0",
        "autovacuum_vacuum_insert_threshold=2000",
        "autovacuum_vacuum_cost_delay=2",
        "autovacuum_vacuum_cost_limit=2000",
    ] {
        assert!(opts.iter().any(|o| o == want), "{want} not in {opts:?}");
    }
    Ok(())
}
