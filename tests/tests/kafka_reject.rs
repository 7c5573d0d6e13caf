//! Permanent refusals by Kafka against the real broker (`KAFKA_BOOTSTRAP`)
//! and real PostgreSQL: a record the bus will never take is dead-lettered
//! at once under the default retry strategy (reason `rejected`), the other
//! rows of the queue are relayed, and a strategy of the user's own still
//! decides for itself.
//!
//! The refusal used is a 2 MB record: librdkafka refuses it before sending
//! (`MessageSizeTooLarge`), because it is larger than the producer's
//! `message.max.bytes`, whose default (1,000,000 bytes) matches Kafka's
//! broker default. That is a true permanent refusal: the same record with
//! the same configuration is refused every time. (The local broker, Tansu,
//! enforces no record size limit of its own: with the producer's limit
//! raised to 10 MB it accepted the 2 MB record, so the broker-side
//! `MESSAGE_TOO_LARGE` of a real Kafka cluster, classified the same way by
//! `outbox_kafka::Error::is_retryable`, cannot be produced here.)

#![allow(clippy::unwrap_used)]

use tests::kafka as support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outbox_core::retry::ConstantRetry;
use outbox_core::{App, AppHandle, BoxError, Message, Response, Route, RouteBuilder};
use support::{bootstrap, broker_lock, create_topic, read_back, retries_of, test_kafka};
use tests::TestDb;

type R = anyhow::Result<()>;

/// 2 MB: over librdkafka's and Kafka's default 1 MB limit.
const BIG: usize = 2 * 1024 * 1024;

/// A relay of `queue` to `topic` that forwards the row's value: an `i64`
/// (keyed `k{v}`, so `read_back` checks it) or, for the oversized row, a
/// string.
fn relay(
    db: &TestDb,
    queue: &str,
    topic: &str,
    tune: fn(RouteBuilder) -> RouteBuilder,
) -> (AppHandle, tokio::task::JoinHandle<outbox_core::Result<()>>) {
    let route = tune(
        Route::builder([queue])
            .max_workers(4)
            .min_fetch_interval(Duration::from_millis(20))
            .max_fetch_interval(Duration::from_millis(200)),
    )
    .publish_to("kafka", topic)
    .handler(|msg: Message, _ctx| async move {
        match msg.decode::<i64>() {
            Ok(v) => Ok::<_, BoxError>(Response::new(serde_json::json!(v)).key(format!("k{v}"))),
            Err(_) => Ok(Response::new(serde_json::json!(msg.decode::<String>()?))),
        }
    });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(test_kafka(&bootstrap()).connect());
    let handle = app.handle();
    (handle, tokio::spawn(app.run()))
}

/// Publishes 0..5, the oversized row, then 5..10 in one transaction;
/// returns the small rows' ids and the big row's id.
async fn publish_with_a_big_row(db: &TestDb, queue: &str) -> anyhow::Result<(BTreeSet<i64>, i64)> {
    let mut tx = db.pool.begin().await?;
    let mut small = BTreeSet::new();
    for v in 0..5_i64 {
        small.insert(db.broker.publish(&v, queue, &mut *tx).await?);
    }
    let big = db.broker.publish(&"x".repeat(BIG), queue, &mut *tx).await?;
    for v in 5..10_i64 {
        small.insert(db.broker.publish(&v, queue, &mut *tx).await?);
    }
    tx.commit().await?;
    Ok((small, big))
}

/// The dead letter of row `id`: (failure_reason, last_exception,
/// deliveries_count).
async fn dead_letter(db: &TestDb, id: i64) -> anyhow::Result<(String, String, i64)> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT failure_reason, coalesce(last_exception, ''), deliveries_count::bigint \
         FROM {} WHERE original_id = $1",
        db.d()
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await?)
}

/// The default strategy: the oversized row goes to the dead-letter table on
/// its first delivery, with reason `rejected` and the bus's error text; the
/// ten other rows of the queue are relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_is_dead_lettered_at_once_and_the_others_are_relayed() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("reject.big");
    create_topic(&boot, &topic, 4).await?;
    let queue = "reject_default";

    let t0 = Instant::now();
    let (small, big) = publish_with_a_big_row(&db, queue).await?;
    let (stop, run) = relay(&db, queue, &topic, |b| b);
    // Under the default strategy a retried row would stay for minutes.
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left: {}",
        db.count().await?
    );
    let took = t0.elapsed();
    let (reason, last_exception, deliveries) = dead_letter(&db, big).await?;
    println!("dead-lettered after {took:?}: {reason}: {last_exception}");
    assert_eq!(reason, "rejected");
    assert_eq!(deliveries, 1, "handled once, never retried");
    assert_eq!(retries_of(queue), Vec::<String>::new(), "no retry at all");
    assert_eq!(db.dlq_count().await?, 1);
    for part in ["kafka", topic.as_str(), "Message size too large"] {
        assert!(
            last_exception.contains(part),
            "{part:?} in {last_exception}"
        );
    }
    assert_eq!(
        last_exception.matches("Message size too large").count(),
        1,
        "each error text once: {last_exception}"
    );
    let per_id = read_back(&boot, &topic, &small).await?;
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");

    stop.shutdown();
    run.await??;
    Ok(())
}

/// A strategy of the user's own decides for itself: `ConstantRetry` with 3
/// attempts retries the oversized row twice, then gives up
/// (`retry_terminal`), and its `RetryContext` could tell it is a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_retry_strategy_still_retries_an_oversized_record() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("reject.custom");
    create_topic(&boot, &topic, 4).await?;
    let queue = "reject_custom";

    let (small, big) = publish_with_a_big_row(&db, queue).await?;
    let (stop, run) = relay(&db, queue, &topic, |b| {
        b.retry(ConstantRetry::new(Duration::from_millis(200)).max_attempts(3))
    });
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left: {}",
        db.count().await?
    );
    let (reason, last_exception, deliveries) = dead_letter(&db, big).await?;
    assert_eq!(reason, "retry_terminal", "{last_exception}");
    assert_eq!(deliveries, 3);
    let retries = retries_of(queue);
    assert_eq!(retries.len(), 2, "{retries:#?}");
    assert!(
        retries.iter().all(|r| r.contains("Message size too large")),
        "{retries:#?}"
    );
    assert!(
        last_exception.contains("kafka refused the message"),
        "{last_exception}"
    );
    let per_id = read_back(&boot, &topic, &small).await?;
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");

    stop.shutdown();
    run.await??;
    Ok(())
}
