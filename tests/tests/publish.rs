//! Producer API against real PostgreSQL: transactional publish, options,
//! timers, batches, NOTIFY, validation.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{Headers, PublishOptions, Raw, TimerConflict};
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::{Acquire, Row};
use tests::TestDb;

type R = anyhow::Result<()>;

#[tokio::test]
async fn commit_makes_the_row_visible_with_every_column() -> R {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let id = db
        .broker
        .publish_with(
            &json!({"order_id": 7}),
            "orders",
            &PublishOptions::new()
                .header("x-tenant", "acme")
                .correlation_id("corr-1"),
            &mut *tx,
        )
        .await?
        .expect("a new row");
    // Not visible to other sessions before commit.
    assert_eq!(db.count().await?, 0);
    tx.commit().await?;

    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT queue, payload, headers, attempts_count, deliveries_count, created_at, \
         next_attempt_at, first_attempt_at, last_attempt_at, acquired_at, acquired_token, timer_id \
         FROM {} WHERE id = $1",
        db.t()
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(row.get::<String, _>("queue"), "orders");
    assert_eq!(row.get::<Vec<u8>, _>("payload"), br#"{"order_id":7}"#);
    assert_eq!(
        row.get::<serde_json::Value, _>("headers"),
        json!({"content-type": "application/json", "correlation_id": "corr-1", "x-tenant": "acme"})
    );
    assert_eq!(row.get::<i64, _>("attempts_count"), 0);
    assert_eq!(row.get::<i64, _>("deliveries_count"), 0);
    let created: DateTime<Utc> = row.get("created_at");
    let next: DateTime<Utc> = row.get("next_attempt_at");
    assert_eq!(created, next, "eligible at once (both default to now())");
    for col in ["first_attempt_at", "last_attempt_at", "acquired_at"] {
        assert!(row.get::<Option<DateTime<Utc>>, _>(col).is_none(), "{col}");
    }
    assert!(row.get::<Option<uuid::Uuid>, _>("acquired_token").is_none());
    assert!(row.get::<Option<String>, _>("timer_id").is_none());
    Ok(())
}

#[tokio::test]
async fn rollback_leaves_nothing() -> R {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1, "orders", &mut *tx).await?;
    db.broker
        .publish_batch([1, 2, 3], "orders", &mut *tx)
        .await?;
    tx.rollback().await?;
    assert_eq!(db.count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn savepoint_rollback_leaves_nothing_and_keeps_the_outer_rows() -> R {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&"kept", "orders", &mut *tx).await?;
    {
        let mut sp = tx.begin().await?;
        db.broker.publish(&"dropped", "orders", &mut *sp).await?;
        sp.rollback().await?;
    }
    tx.commit().await?;
    let mut conn = db.pool.acquire().await?;
    let rows = db.broker.fetch_unprocessed(None, 10, &mut conn).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decode::<String>()?, "kept");
    Ok(())
}

#[tokio::test]
async fn publish_works_on_a_plain_connection_in_autocommit() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "orders", &mut conn).await?;
    let stored = db
        .scalar(format!("SELECT id FROM {} WHERE queue = 'orders'", db.t()))
        .await?;
    assert_eq!(id, stored, "publish returns the row id");
    assert_eq!(db.count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn envelope_by_body_type() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let b = &db.broker;
    b.publish(&json!({"a": 1}), "q", &mut conn).await?;
    b.publish("text", "q", &mut conn).await?;
    b.publish(&Raw(vec![0, 1, 255]), "q", &mut conn).await?;
    b.publish(&(), "q", &mut conn).await?;
    b.publish(&42_i64, "q", &mut conn).await?;
    let rows = b.fetch_unprocessed(Some("q"), 100, &mut conn).await?;
    let ct: Vec<Option<&str>> = rows.iter().map(|r| r.content_type()).collect();
    assert_eq!(
        ct,
        [
            Some("application/json"),
            Some("text/plain"),
            None,
            None,
            Some("application/json")
        ]
    );
    assert_eq!(rows[0].payload, br#"{"a":1}"#);
    assert_eq!(rows[1].payload, b"text");
    assert_eq!(rows[2].payload, [0, 1, 255]);
    assert!(rows[3].payload.is_empty());
    assert_eq!(rows[4].decode::<i64>()?, 42);
    assert_eq!(rows[2].decode::<Raw>()?, Raw(vec![0, 1, 255]));
    for r in &rows {
        assert_eq!(r.headers["correlation_id"].len(), 36, "uuid correlation id");
    }
    Ok(())
}

#[tokio::test]
async fn activate_in_uses_the_database_clock() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db
        .broker
        .publish_with(
            &1,
            "q",
            &PublishOptions::new().activate_in(Duration::from_secs(90)),
            &mut conn,
        )
        .await?
        .unwrap();
    let delta = db
        .scalar(format!(
            "SELECT extract(epoch FROM next_attempt_at - created_at)::int8 FROM {} WHERE id = {id}",
            db.t()
        ))
        .await?;
    assert_eq!(delta, 90);
    Ok(())
}

#[tokio::test]
async fn activate_at_is_stored_as_given() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let at: DateTime<Utc> = "2031-02-03T04:05:06.789Z".parse()?;
    db.broker
        .publish_with(&1, "q", &PublishOptions::new().activate_at(at), &mut conn)
        .await?;
    let rows = db.broker.fetch_unprocessed(None, 1, &mut conn).await?;
    assert_eq!(rows[0].next_attempt_at, at);
    Ok(())
}

#[tokio::test]
async fn timer_ignore_keeps_the_first_row() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let opts = PublishOptions::new().timer_id("t1");
    let first = db.broker.publish_with(&"a", "q", &opts, &mut conn).await?;
    let second = db.broker.publish_with(&"b", "q", &opts, &mut conn).await?;
    assert!(first.is_some());
    assert_eq!(second, None);
    // The same timer id on another queue is independent.
    let other = db.broker.publish_with(&"c", "q2", &opts, &mut conn).await?;
    assert!(other.is_some());
    let rows = db
        .broker
        .fetch_unprocessed(Some("q"), 10, &mut conn)
        .await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decode::<String>()?, "a");
    assert_eq!(rows[0].timer_id.as_deref(), Some("t1"));
    Ok(())
}

#[tokio::test]
async fn timer_extend_later_deadline_wins_and_leased_rows_are_untouched() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let b = &db.broker;
    let at = |s: &str| -> DateTime<Utc> { s.parse().unwrap() };
    let ext = |when: DateTime<Utc>| {
        PublishOptions::new()
            .timer_id("remind")
            .timer_conflict(TimerConflict::Extend)
            .activate_at(when)
    };
    let id = b
        .publish_with(&"v1", "q", &ext(at("2030-01-01T00:00:00Z")), &mut conn)
        .await?
        .unwrap();
    // Later deadline: payload replaced, deadline moved, same row.
    let id2 = b
        .publish_with(&"v2", "q", &ext(at("2030-06-01T00:00:00Z")), &mut conn)
        .await?;
    assert_eq!(id2, Some(id));
    // Earlier deadline: nothing changes but the call still returns the id.
    let id3 = b
        .publish_with(&"v3", "q", &ext(at("2029-01-01T00:00:00Z")), &mut conn)
        .await?;
    assert_eq!(id3, Some(id));
    let rows = b.fetch_unprocessed(Some("q"), 10, &mut conn).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decode::<String>()?, "v2");
    assert_eq!(rows[0].next_attempt_at, at("2030-06-01T00:00:00Z"));

    // Leased: the in-flight worker keeps the deadline it claimed.
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE id = {id}",
        db.t()
    ))
    .await?;
    let leased = b
        .publish_with(&"v4", "q", &ext(at("2031-01-01T00:00:00Z")), &mut conn)
        .await?;
    assert_eq!(leased, None);
    let rows = b.fetch_unprocessed(Some("q"), 10, &mut conn).await?;
    assert_eq!(rows[0].decode::<String>()?, "v2");
    Ok(())
}

#[tokio::test]
async fn timer_extend_resets_the_retry_history() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let opts = |secs| {
        PublishOptions::new()
            .timer_id("t")
            .timer_conflict(TimerConflict::Extend)
            .activate_in(Duration::from_secs(secs))
    };
    let id = db
        .broker
        .publish_with(&1, "q", &opts(10), &mut conn)
        .await?
        .unwrap();
    db.exec(format!(
        "UPDATE {} SET attempts_count = 3, deliveries_count = 4, first_attempt_at = now(), \
         last_attempt_at = now() WHERE id = {id}",
        db.t()
    ))
    .await?;
    db.broker
        .publish_with(&2, "q", &opts(100), &mut conn)
        .await?;
    let r = &db.broker.fetch_unprocessed(None, 1, &mut conn).await?[0];
    assert_eq!(r.attempts_count, 0);
    assert_eq!(r.deliveries_count, 4, "claims are history, not reset");
    assert!(r.first_attempt_at.is_none() && r.last_attempt_at.is_none());
    assert_eq!(r.decode::<i64>()?, 2);
    Ok(())
}

#[tokio::test]
async fn cancel_timer_only_deletes_unleased_rows() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let b = &db.broker;
    let timer = |id: &str| PublishOptions::new().timer_id(id);
    b.publish_with(&1, "q", &timer("free"), &mut conn).await?;
    let leased = b
        .publish_with(&2, "q", &timer("busy"), &mut conn)
        .await?
        .unwrap();
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE id = {leased}",
        db.t()
    ))
    .await?;
    assert!(b.cancel_timer("q", "free", &mut conn).await?);
    assert!(!b.cancel_timer("q", "busy", &mut conn).await?);
    assert!(!b.cancel_timer("q", "unknown", &mut conn).await?);
    assert_eq!(db.count().await?, 1);

    // On a transaction that rolls back, the cancel does not happen.
    b.publish_with(&3, "q", &timer("again"), &mut conn).await?;
    let mut tx = db.pool.begin().await?;
    assert!(b.cancel_timer("q", "again", &mut *tx).await?);
    tx.rollback().await?;
    assert_eq!(db.count().await?, 2);
    Ok(())
}

#[tokio::test]
async fn batch_of_ten_thousand_rows_with_one_notify() -> R {
    let db = TestDb::new().await?;
    let mut listener = PgListener::connect_with(&db.pool).await?;
    listener.listen(&db.table.channel()).await?;

    let mut tx = db.pool.begin().await?;
    let bodies: Vec<serde_json::Value> = (0..10_000).map(|i| json!({"n": i})).collect();
    let n = db
        .broker
        .publish_batch_with(
            bodies,
            "bulk",
            &PublishOptions::new().header("x-batch", "yes"),
            &mut *tx,
        )
        .await?;
    assert_eq!(n, 10_000);
    tx.commit().await?;

    assert_eq!(db.count().await?, 10_000);
    let distinct = db
        .scalar(format!(
            "SELECT count(DISTINCT headers->>'correlation_id') FROM {} WHERE headers->>'x-batch' = 'yes'",
            db.t()
        ))
        .await?;
    assert_eq!(distinct, 10_000, "every row has its own correlation id");
    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await??;
    assert_eq!(first.payload(), "bulk");
    let more = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(more.is_err(), "exactly one NOTIFY for the batch");
    // An empty batch is a no-op.
    let mut conn = db.pool.acquire().await?;
    assert_eq!(
        db.broker
            .publish_batch(Vec::<i32>::new(), "bulk", &mut conn)
            .await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn batch_activate_in_delays_every_row() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    db.broker
        .publish_batch_with(
            ["a", "b"],
            "q",
            &PublishOptions::new().activate_in(Duration::from_secs(3600)),
            &mut conn,
        )
        .await?;
    let future = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE next_attempt_at > now() + interval '59 minutes'",
            db.t()
        ))
        .await?;
    assert_eq!(future, 2);
    Ok(())
}

/// The next notification within 400 ms: long enough to see one that should
/// not come (a NOTIFY is delivered at commit, in milliseconds).
async fn recv(l: &mut PgListener) -> Option<sqlx::postgres::PgNotification> {
    recv_within(l, Duration::from_millis(400)).await
}

/// The next notification within `timeout`.
async fn recv_within(
    l: &mut PgListener,
    timeout: Duration,
) -> Option<sqlx::postgres::PgNotification> {
    tokio::time::timeout(timeout, l.recv())
        .await
        .ok()
        .and_then(Result::ok)
}

#[tokio::test]
async fn notify_carries_the_queue_after_commit_only() -> R {
    let db = TestDb::new().await?;
    let mut listener = PgListener::connect_with(&db.pool).await?;
    listener.listen(&db.table.channel()).await?;

    // Rolled back: nothing.
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1, "orders", &mut *tx).await?;
    tx.rollback().await?;
    assert!(
        recv(&mut listener).await.is_none(),
        "no NOTIFY after rollback"
    );

    // Future-dated: notifies too (unlike faststream-outbox), so that a woken
    // relay looks up when the row is due instead of waiting for its next poll.
    let mut tx = db.pool.begin().await?;
    db.broker
        .publish_with(
            &1,
            "orders",
            &PublishOptions::new().activate_in(Duration::from_secs(60)),
            &mut *tx,
        )
        .await?;
    tx.commit().await?;
    assert_eq!(
        recv_within(&mut listener, Duration::from_secs(10))
            .await
            .expect("a NOTIFY for a future row")
            .payload(),
        "orders"
    );

    // Timer no-op: nothing (the timer's first publish, a future row, notifies).
    let mut conn = db.pool.acquire().await?;
    let t = PublishOptions::new()
        .timer_id("x")
        .activate_in(Duration::from_secs(60));
    db.broker.publish_with(&1, "orders", &t, &mut conn).await?;
    assert!(
        recv_within(&mut listener, Duration::from_secs(10))
            .await
            .is_some()
    );
    let noop = PublishOptions::new().timer_id("x");
    assert_eq!(
        db.broker
            .publish_with(&1, "orders", &noop, &mut conn)
            .await?,
        None
    );
    assert!(recv(&mut listener).await.is_none(), "no NOTIFY for a no-op");

    // Committed: exactly the queue name, once the commit happened.
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1, "orders", &mut *tx).await?;
    assert!(recv(&mut listener).await.is_none(), "nothing before commit");
    tx.commit().await?;
    // Expected notifications get a deadline a loaded CI machine meets.
    let n = recv_within(&mut listener, Duration::from_secs(10))
        .await
        .expect("a NOTIFY after commit");
    assert_eq!(n.payload(), "orders");
    assert_eq!(n.channel(), db.table.channel());
    assert!(recv(&mut listener).await.is_none(), "only one");

    // A past activate_at notifies.
    let past = Utc::now() - chrono::Duration::seconds(5);
    db.broker
        .publish_with(
            &1,
            "late",
            &PublishOptions::new().activate_at(past),
            &mut conn,
        )
        .await?;
    assert_eq!(
        recv_within(&mut listener, Duration::from_secs(10))
            .await
            .expect("notified")
            .payload(),
        "late"
    );
    Ok(())
}

#[tokio::test]
async fn validation_errors_name_the_problem_before_any_sql() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let b = &db.broker;
    let err = |e: outbox_core::Error| {
        assert!(e.is_misuse(), "{e:?}");
        e.to_string()
    };
    let both = PublishOptions::new()
        .activate_in(Duration::from_secs(1))
        .activate_at(Utc::now());
    assert!(
        err(b.publish_with(&1, "q", &both, &mut conn).await.unwrap_err())
            .contains("at most one of activate_in / activate_at")
    );
    assert_eq!(
        err(b.publish(&1, "", &mut conn).await.unwrap_err()),
        "queue must be a non-empty string"
    );
    assert_eq!(
        err(b
            .publish(&1, &"q".repeat(256), &mut conn)
            .await
            .unwrap_err()),
        "queue must be at most 255 characters (got 256)"
    );
    let long_timer = PublishOptions::new().timer_id("t".repeat(300));
    assert_eq!(
        err(b
            .publish_with(&1, "q", &long_timer, &mut conn)
            .await
            .unwrap_err()),
        "timer_id must be at most 255 characters (got 300)"
    );
    let extend = PublishOptions::new().timer_conflict(TimerConflict::Extend);
    assert!(
        err(b
            .publish_with(&1, "q", &extend, &mut conn)
            .await
            .unwrap_err())
        .contains("Extend requires a timer_id")
    );
    for opts in [
        PublishOptions::new().timer_id("t"),
        PublishOptions::new().correlation_id("c"),
    ] {
        assert!(
            err(b
                .publish_batch_with([1], "q", &opts, &mut conn)
                .await
                .unwrap_err())
            .contains("not supported for batch publishes")
        );
    }
    let mut h = Headers::new();
    h.insert("content-type".into(), "text/plain".into());
    let conflict = PublishOptions::new().headers(h);
    assert!(
        err(b
            .publish_with(&json!({"a": 1}), "q", &conflict, &mut conn)
            .await
            .unwrap_err())
        .contains("conflicts with the body's encoding")
    );
    let corr = PublishOptions::new()
        .header("correlation_id", "a")
        .correlation_id("b");
    assert!(
        err(b.publish_with(&1, "q", &corr, &mut conn).await.unwrap_err())
            .contains("conflicts with the `correlation_id` header")
    );
    assert_eq!(
        err(b.fetch_unprocessed(None, 0, &mut conn).await.unwrap_err()),
        "limit must be >= 1, got 0"
    );
    assert_eq!(db.count().await?, 0, "nothing reached the table");
    Ok(())
}

#[tokio::test]
async fn fetch_unprocessed_is_lease_free_and_filters_by_queue() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    for q in ["a", "b", "a"] {
        db.broker.publish(&q, q, &mut conn).await?;
    }
    db.broker
        .publish_with(
            &"later",
            "a",
            &PublishOptions::new().activate_in(Duration::from_secs(600)),
            &mut conn,
        )
        .await?;
    let all = db.broker.fetch_unprocessed(None, 1000, &mut conn).await?;
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ordered by id");
    let a = db
        .broker
        .fetch_unprocessed(Some("a"), 1000, &mut conn)
        .await?;
    assert_eq!(a.len(), 3, "future rows included");
    let limited = db.broker.fetch_unprocessed(None, 2, &mut conn).await?;
    assert_eq!(limited.len(), 2);
    assert!(all.iter().all(|r| r.acquired_token.is_none()));
    // It sees the caller's own uncommitted rows.
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&"mine", "c", &mut *tx).await?;
    let mine = db.broker.fetch_unprocessed(Some("c"), 10, &mut *tx).await?;
    assert_eq!(mine.len(), 1);
    tx.rollback().await?;
    Ok(())
}
