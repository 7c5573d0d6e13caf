//! Unit tests of the seed tutorial's handler, as a user writes them (this is
//! the example of `docs/testing.md`): no PostgreSQL, no Kafka, milliseconds.
//!
//! ```sh
//! cargo test -p examples --test seed_handler
//! # the same tests against real PostgreSQL (a private schema, dropped at the end):
//! OUTBOX_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/outbox_test cargo test -p examples --test seed_handler
//! ```

use std::time::Duration;

use outbox_core::testing::{OutgoingExt, TestApp, TestClock};
use outbox_core::{PublishOptions, publish_to, subscriber};
use outbox_kafka::testing::test_kafka;

type TestResult = Result<(), Box<dyn std::error::Error>>;

// The handler under test: the seed tutorial's, unchanged.
#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

#[tokio::test]
async fn handle_relays_the_order_to_kafka() -> TestResult {
    let kafka = test_kafka(); // stands in for `kafka.connect()`: records, never contacts a broker
    let app = TestApp::builder()
        .transport(kafka.clone())
        .postgres_from_env("OUTBOX_TEST_POSTGRES") // unset: in memory
        .start()
        .await?;

    let id = app
        .publish_with(
            &1_i64,
            "orders",
            &PublishOptions::new().correlation_id("req-1"),
        )
        .await?
        .expect("a row id");

    // The handler was called with the body...
    assert_eq!(app.handled_bodies::<i64>("orders")?, [1]);
    // ... `orders.kafka` received its result, with the envelope's headers ...
    let records = kafka.messages_to("orders.kafka");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value::<i64>()?, 1);
    assert_eq!(records[0].key, None);
    assert_eq!(records[0].header("content-type"), Some("application/json"));
    assert_eq!(records[0].correlation_id(), Some("req-1"));
    assert_eq!(
        records[0].header("outbox-id"),
        Some(id.to_string().as_str())
    );
    // ... and the row was acked: nothing left in the outbox.
    assert_eq!(app.history(id).to_string(), "claimed(1), acked");
    assert!(app.rows().await?.is_empty());

    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_kafka_outage_is_retried_until_the_record_is_confirmed() -> TestResult {
    let kafka = test_kafka();
    let app = TestApp::builder()
        .transport(kafka.clone())
        .clock(TestClock::frozen()) // time moves only with `advance`
        .postgres_from_env("OUTBOX_TEST_POSTGRES")
        .start()
        .await?;

    kafka.fail_next(2); // the next two publishes to Kafka fail
    let id = app.publish(&7_i64, "orders").await?;
    assert!(kafka.messages().is_empty());
    assert_eq!(app.row(id).await?.expect("still there").attempts_count, 1);

    // The default ExponentialRetry waits about 1 s, then about 2 s (±10 %).
    app.advance(Duration::from_secs(2)).await?;
    app.advance(Duration::from_secs(3)).await?;

    assert_eq!(
        app.history(id).to_string(),
        "claimed(1), retried, claimed(2), retried, claimed(3), acked"
    );
    assert_eq!(kafka.messages_to("orders.kafka")[0].value::<i64>()?, 7);
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn an_undecodable_order_is_retried_then_dead_lettered() -> TestResult {
    let app = TestApp::builder()
        .transport(test_kafka())
        .clock(TestClock::frozen())
        .postgres_from_env("OUTBOX_TEST_POSTGRES")
        .start()
        .await?;

    let id = app.publish(&"not an order id", "orders").await?;
    // ExponentialRetry::default(): 10 attempts, 1 s × 2 up to 300 s.
    for _ in 0..9 {
        app.advance(Duration::from_secs(600)).await?;
    }

    let history = app.history(id);
    assert_eq!(history.retries(), 9);
    assert_eq!(
        history.failure_reason(),
        Some(outbox_core::FailureReason::RetryTerminal)
    );
    let dead = app.dead_letters().await?;
    assert_eq!(dead[0].failure_reason, "retry_terminal");
    assert!(
        dead[0]
            .last_exception
            .as_deref()
            .is_some_and(|e| e.contains("cannot decode the payload"))
    );
    assert!(
        app.handled_bodies::<i64>("orders").is_err(),
        "never a valid i64"
    );
    app.stop().await?;
    Ok(())
}
