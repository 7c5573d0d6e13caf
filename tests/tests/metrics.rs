//! Metrics through the `metrics` facade, captured by a test recorder: every
//! event fires with its labels after its write landed, and never for a write
//! that lost its lease. Queue names are unique per test (the recorder is
//! process-wide).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::telemetry::names::*;
use outbox_core::{
    App, BoxError, Engine, MemoryTransport, Message, PublishOptions, Response, Route, Subscriber,
};
use tests::metrics_capture::{counter, histogram, install};
use tests::{TestDb, suffix, wait_until};

type R = anyhow::Result<()>;

fn fast(b: outbox_core::SubscriberBuilder) -> outbox_core::SubscriberBuilder {
    b.min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

#[tokio::test]
async fn publish_counts_rows_that_landed() -> R {
    install();
    let db = TestDb::new().await?;
    let q = format!("pub_{}", suffix());
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, &q, &mut conn).await?;
    let timer = PublishOptions::new().timer_id("t");
    db.broker.publish_with(&1, &q, &timer, &mut conn).await?;
    assert_eq!(
        db.broker.publish_with(&1, &q, &timer, &mut conn).await?,
        None
    );
    db.broker.publish_batch([1, 2, 3], &q, &mut conn).await?;
    let both = PublishOptions::new()
        .activate_in(Duration::from_secs(1))
        .activate_at(chrono::Utc::now());
    assert!(
        db.broker
            .publish_with(&1, &q, &both, &mut conn)
            .await
            .is_err()
    );
    assert_eq!(
        counter(PUBLISHED, &[("queue", &q), ("status", "success")]),
        5
    );
    assert_eq!(counter(PUBLISHED, &[("queue", &q), ("status", "error")]), 1);
    Ok(())
}

#[tokio::test]
async fn outcome_events_carry_their_labels() -> R {
    install();
    let db = TestDb::new().await?;
    let q = format!("out_{}", suffix());
    let sub = fast(Subscriber::builder([q.clone()]))
        .name(q.clone())
        .retry(ConstantRetry::new(Duration::from_millis(10)).max_attempts(2))
        .max_deliveries(5)
        .build(|m: Message| async move {
            let what: String = m.decode()?;
            match what.as_str() {
                "ok" => Ok(()),
                "fail" => Err::<(), BoxError>("always fails".into()),
                _ => unreachable!(),
            }
        })?;
    let mut conn = db.pool.acquire().await?;
    db.broker
        .publish_batch(["ok", "ok", "fail"], &q, &mut conn)
        .await?;
    db.broker.publish(&42, &q, &mut conn).await?; // not a String: a decode error
    let exhausted = db.broker.publish("ok", &q, &mut conn).await?;
    db.exec(format!(
        "UPDATE {} SET deliveries_count = 5 WHERE id = {exhausted}",
        db.t()
    ))
    .await?;
    let e = Engine::new(db.broker.clone()).subscriber(sub);
    e.start().await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    e.stop().await;
    let l = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = vec![("queue", &q), ("subscriber", &q)];
        v.extend_from_slice(extra);
        v
    };
    assert_eq!(counter(ACKED, &l(&[])), 2);
    // "fail": attempt 1 retried, attempt 2 terminal; the decode error: the same.
    assert_eq!(counter(NACKED_RETRIED, &l(&[("error_kind", "handler")])), 1);
    assert_eq!(counter(NACKED_RETRIED, &l(&[("error_kind", "decode")])), 1);
    assert_eq!(
        counter(
            NACKED_TERMINAL,
            &l(&[("reason", "retry_terminal"), ("error_kind", "handler")])
        ),
        1
    );
    assert_eq!(
        counter(
            NACKED_TERMINAL,
            &l(&[("reason", "retry_terminal"), ("error_kind", "decode")])
        ),
        1
    );
    assert_eq!(
        counter(
            NACKED_TERMINAL,
            &l(&[("reason", "max_deliveries"), ("error_kind", "none")])
        ),
        1
    );
    assert_eq!(
        counter(DLQ_WRITTEN, &l(&[("failure_reason", "retry_terminal")])),
        2
    );
    assert_eq!(
        counter(DLQ_WRITTEN, &l(&[("failure_reason", "max_deliveries")])),
        1
    );
    // The max_deliveries row never ran: 2 ok + 2 x fail + 2 x decode.
    assert_eq!(counter(DISPATCHED, &l(&[])), 6);
    // Every dispatch is closed by exactly one event carrying a duration.
    assert_eq!(histogram(HANDLER_DURATION, &l(&[])).len(), 6);
    assert!(counter(FETCHED, &[("subscriber", &q)]) >= 6);
    assert!(counter(FETCH_BATCHES, &[("subscriber", &q), ("non_empty", "true")]) >= 1);
    Ok(())
}

#[tokio::test]
async fn batched_acks_count_after_the_flush() -> R {
    install();
    let db = TestDb::new().await?;
    let q = format!("batch_{}", suffix());
    let sub = fast(Subscriber::builder([q.clone()]))
        .name(q.clone())
        .terminal_flush_batch_size(7)
        .fetch_batch_size(50)
        .build(|_m: Message| async {})?;
    let mut conn = db.pool.acquire().await?;
    db.broker.publish_batch(0..50, &q, &mut conn).await?;
    let e = Engine::new(db.broker.clone()).subscriber(sub);
    e.start().await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    e.stop().await;
    assert_eq!(counter(ACKED, &[("queue", &q)]), 50);
    assert_eq!(histogram(HANDLER_DURATION, &[("queue", &q)]).len(), 50);
    Ok(())
}

#[tokio::test]
async fn a_lost_lease_counts_as_lease_lost_not_as_acked() -> R {
    install();
    let db = TestDb::new().await?;
    let q = format!("lost_{}", suffix());
    let started = Arc::new(tokio::sync::Notify::new());
    let st = started.clone();
    let slow = fast(Subscriber::builder([q.clone()]))
        .name(format!("{q}-slow"))
        .lease_ttl(Duration::from_millis(500))
        // No heartbeat: the lease expires under the running handler.
        .without_lease_heartbeat()
        .build(move |_m: Message| {
            st.notify_one();
            // Outlives its 500 ms lease (the behaviour under test).
            async { tokio::time::sleep(Duration::from_millis(1500)).await }
        })?;
    let fresh = fast(Subscriber::builder([q.clone()]))
        .name(format!("{q}-fresh"))
        .lease_ttl(Duration::from_millis(500))
        .build(|_m: Message| async {})?;
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, &q, &mut conn).await?;
    let a = Engine::new(db.broker.clone()).subscriber(slow);
    a.start().await?;
    started.notified().await;
    let b = Engine::new(db.broker.clone()).subscriber(fresh);
    b.start().await?;
    let slow_name = format!("{q}-slow");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            counter(
                LEASE_LOST,
                &[("subscriber", &slow_name), ("phase", "terminal")],
            ) == 1
        })
        .await
    );
    a.stop().await;
    b.stop().await;
    assert_eq!(counter(ACKED, &[("subscriber", &slow_name)]), 0);
    assert_eq!(counter(ACKED, &[("subscriber", &format!("{q}-fresh"))]), 1);
    Ok(())
}

#[tokio::test]
async fn drain_timeouts_and_transport_latency_are_recorded() -> R {
    install();
    let db = TestDb::new().await?;
    let q = format!("app_{}", suffix());
    let kafka = MemoryTransport::new("kafka");
    kafka.fail_next(1);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let route = Route::builder([q.clone()])
        .name(q.clone())
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(10)))
        .publish_to("kafka", "dest")
        .handler(move |m: Message, _| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(Response::new(m.decode::<i64>()?)) }
        });
    let app = App::new(
        db.broker
            .clone()
            .graceful_timeout(Duration::from_millis(200)),
    )
    .without_discovery()
    .without_signals()
    .transport(kafka.clone())
    .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&7, &q, &mut conn).await?;
    kafka.wait_for(1, Duration::from_secs(10)).await;
    assert!(db.drained(Duration::from_secs(5)).await);
    stop.shutdown();
    run.await??;
    let ok = histogram(
        TRANSPORT_DURATION,
        &[
            ("transport", "kafka"),
            ("destination", "dest"),
            ("status", "success"),
        ],
    );
    let err = histogram(
        TRANSPORT_DURATION,
        &[
            ("transport", "kafka"),
            ("destination", "dest"),
            ("status", "error"),
        ],
    );
    assert!(!ok.is_empty() && !err.is_empty(), "{ok:?} {err:?}");
    assert!(
        counter(
            NACKED_RETRIED,
            &[("queue", &q), ("error_kind", "transport")]
        ) >= 1
    );

    // A wedged handler at stop: drain_timeout.
    let w = format!("wedge_{}", suffix());
    let started = Arc::new(tokio::sync::Notify::new());
    let st = started.clone();
    let sub = fast(Subscriber::builder([w.clone()]))
        .name(w.clone())
        .build(move |_m: Message| {
            st.notify_one();
            std::future::pending::<()>()
        })?;
    let e = Engine::new(
        db.broker
            .clone()
            .graceful_timeout(Duration::from_millis(200)),
    )
    .subscriber(sub);
    e.start().await?;
    db.broker.publish(&1, &w, &mut conn).await?;
    started.notified().await;
    e.stop().await;
    assert_eq!(counter(DRAIN_TIMEOUT, &[("subscriber", &w)]), 1);
    Ok(())
}

#[tokio::test]
async fn sampled_gauges_match_the_tables() -> R {
    use tests::metrics_capture::gauge;
    install();
    let db = TestDb::new().await?;
    let q = format!("gauge_{}", suffix());
    let mut conn = db.pool.acquire().await?;
    db.broker.publish_batch([1, 2, 3], &q, &mut conn).await?;
    db.broker
        .publish_with(
            &4,
            &q,
            &PublishOptions::new().activate_in(Duration::from_secs(3600)),
            &mut conn,
        )
        .await?;
    // One leased row, one old ready row (due two minutes ago), one dead letter.
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() \
         WHERE id = (SELECT min(id) FROM {} WHERE queue = '{q}')",
        db.t(),
        db.t()
    ))
    .await?;
    db.exec(format!(
        "UPDATE {} SET next_attempt_at = now() - interval '120 seconds' \
         WHERE id = (SELECT max(id) FROM {} WHERE queue = '{q}' AND acquired_token IS NULL AND next_attempt_at <= now())",
        db.t(),
        db.t()
    ))
    .await?;
    db.exec(format!(
        "INSERT INTO {} (original_id, queue, payload, deliveries_count, created_at, failure_reason) \
         VALUES (1, '{q}', '\\x00', 1, now(), 'rejected')",
        db.d()
    ))
    .await?;
    let stats = outbox_core::telemetry::sample_gauges(&db.broker, &[&q]).await?;
    assert_eq!(
        (
            stats[0].ready,
            stats[0].leased,
            stats[0].scheduled,
            stats[0].dead_letters
        ),
        (2, 1, 1, 1)
    );
    let g = |name| gauge(name, &[("queue", &q)]).unwrap();
    assert_eq!(g(READY_ROWS), 2.0);
    assert_eq!(g(LEASED_ROWS), 1.0);
    assert_eq!(g(SCHEDULED_ROWS), 1.0);
    assert_eq!(g(DEAD_LETTER_ROWS), 1.0);
    let lag = g(OLDEST_READY_AGE);
    assert!((119.0..130.0).contains(&lag), "{lag}");
    Ok(())
}

#[tokio::test]
async fn the_engine_samples_the_gauges_of_its_queues() -> R {
    use tests::metrics_capture::gauge;
    install();
    let db = TestDb::new().await?;
    let q = format!("sampled_{}", suffix());
    let e = Engine::new(db.broker.clone())
        .gauge_interval(Some(Duration::from_millis(50)))
        .subscriber(Subscriber::builder([q.clone()]).build(|_m: Message| async {})?);
    e.start().await?;
    let seen = wait_until(Duration::from_secs(5), || {
        let q = q.clone();
        async move { gauge(READY_ROWS, &[("queue", &q)]).is_some() }
    })
    .await;
    e.stop().await;
    assert!(
        seen,
        "the sampler set outbox_ready_rows for the served queue"
    );
    Ok(())
}
