//! Tutorials 4 to 6 (docs/tutorial/04-retries-and-dead-letters.md,
//! 05-testing.md, 06-operating.md): the tutorial's `src/main.rs` in its final
//! form. Orders are relayed to Kafka; payments are charged with retries, and
//! what cannot be charged goes to the dead-letter table; metrics are served
//! for Prometheus; the handlers' tests sit at the bottom. The markdown shows
//! parts of this file; scripts/check-tutorial.sh checks that they agree, runs
//! the program and its tests.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo KAFKA_BOOTSTRAP=localhost:9092 \
//!     cargo run -p examples --example tutorial_app   # Ctrl-C to stop
//! cargo test -p examples --example tutorial_app      # the tests, in memory
//! ```

// ANCHOR: all
// ANCHOR: imports
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{
    App, AppContext, BoxError, DlqTable, Message, OutboxBroker, OutboxTable, publish_to, subscriber,
};
use outbox_kafka::KafkaBroker;
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
// ANCHOR_END: imports

#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

// ANCHOR: charge
/// A payment to take for an order.
#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    order_id: i64,
    amount_cents: i64,
}

#[subscriber(
    "payments",
    retry = ConstantRetry::new(Duration::from_secs(1)).max_attempts(5),
)]
async fn charge(payment: Payment, msg: Message) -> Result<(), BoxError> {
    if payment.amount_cents <= 0 {
        // Retrying cannot fix this one: straight to the dead-letter table.
        msg.reject();
        return Err(format!("order {}: nothing to charge", payment.order_id).into());
    }
    if msg.deliveries_count() == 1 {
        // Pretend the payment provider timed out the first time.
        println!(
            "charging order {}: the provider timed out",
            payment.order_id
        );
        return Err("payment provider timed out".into());
    }
    println!(
        "charged order {} ({} cents) on delivery {}",
        payment.order_id,
        payment.amount_cents,
        msg.deliveries_count()
    );
    Ok(())
}
// ANCHOR_END: charge

// ANCHOR: publish
/// Runs once the subscribers are live: two orders, each with its payment,
/// each in one transaction. The second payment has no amount.
async fn publish_orders(app: AppContext) -> Result<(), BoxError> {
    let outbox = app.broker();
    for amount_cents in [1500, 0] {
        let mut tx = outbox.pool().begin().await?;
        let order_id: i64 = outbox_core::sqlx::query_scalar(
            "INSERT INTO orders (item) VALUES ('a book') RETURNING id",
        )
        .fetch_one(&mut *tx)
        .await?;
        outbox.publish(&order_id, "orders", &mut *tx).await?;
        let payment = Payment {
            order_id,
            amount_cents,
        };
        outbox.publish(&payment, "payments", &mut *tx).await?;
        tx.commit().await?;
        println!("published order {order_id} and its payment of {amount_cents} cents");
    }
    Ok(())
}
// ANCHOR_END: publish

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // INFO, without sqlx's "already exists" notices; RUST_LOG=debug for more.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@localhost:5432/outbox".to_owned());
    let pool = outbox_core::sqlx::PgPool::connect(&url).await?;
    // The service's own table (a real service creates it in its migrations).
    outbox_core::sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, item TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;

    // ANCHOR: dlq
    let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?)
        .dead_letter_table(DlqTable::new("outbox_dlq")?);
    outbox.migrate().await?; // creates both tables if missing
    // ANCHOR_END: dlq

    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "localhost:9092".to_owned());
    let kafka = KafkaBroker::new(bootstrap);
    kafka.ensure_topic("orders.kafka", 1, 1).await?; // 1 partition, 1 replica

    // ANCHOR: metrics
    let metrics_addr =
        std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9898".to_owned());
    App::new(outbox)
        .prometheus(metrics_addr.parse()?) // GET http://127.0.0.1:9898/metrics
        .on_startup(kafka.connect())
        .after_startup(publish_orders)
        .run()
        .await?;
    // ANCHOR_END: metrics
    Ok(()) // Ctrl-C (SIGINT) or SIGTERM: a graceful stop
}
// ANCHOR_END: all

// ANCHOR: tests
// ANCHOR: tests_head
#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::testing::{OutgoingExt, TestApp, TestClock};
    use outbox_kafka::testing::test_kafka;

    type TestResult = Result<(), Box<dyn std::error::Error>>;
    // ANCHOR_END: tests_head

    // ANCHOR: test_relay
    #[tokio::test]
    async fn an_order_is_relayed_to_kafka() -> TestResult {
        let kafka = test_kafka(); // records what would go to Kafka; no broker
        let app = TestApp::builder().transport(kafka.clone()).start().await?;

        let id = app.publish(&7_i64, "orders").await?; // returns once handled

        assert_eq!(app.handled_bodies::<i64>("orders")?, [7]);
        let records = kafka.messages_to("orders.kafka");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].value::<i64>()?, 7);
        assert_eq!(
            records[0].header("outbox-id"),
            Some(id.to_string().as_str())
        );
        assert_eq!(app.history(id).to_string(), "claimed(1), acked");
        app.stop().await?;
        Ok(())
    }
    // ANCHOR_END: test_relay

    // ANCHOR: test_retry
    #[tokio::test]
    async fn a_timed_out_payment_is_charged_on_the_next_delivery() -> TestResult {
        let app = TestApp::builder()
            .transport(test_kafka())
            .clock(TestClock::frozen()) // time moves only with `advance`
            .start()
            .await?;

        let payment = Payment {
            order_id: 1,
            amount_cents: 1500,
        };
        let id = app.publish(&payment, "payments").await?;
        assert_eq!(app.history(id).to_string(), "claimed(1), retried");

        app.advance(Duration::from_secs(1)).await?; // ConstantRetry: 1 s later
        assert_eq!(
            app.history(id).to_string(),
            "claimed(1), retried, claimed(2), acked"
        );
        assert!(app.rows().await?.is_empty());
        app.stop().await?;
        Ok(())
    }
    // ANCHOR_END: test_retry

    // ANCHOR: test_dlq
    #[tokio::test]
    async fn a_payment_without_amount_is_dead_lettered_at_once() -> TestResult {
        let app = TestApp::builder().transport(test_kafka()).start().await?;

        let payment = Payment {
            order_id: 2,
            amount_cents: 0,
        };
        let id = app.publish(&payment, "payments").await?;

        assert_eq!(app.history(id).retries(), 0);
        let dead = app.dead_letters().await?;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].failure_reason, "rejected");
        let error = dead[0].last_exception.as_deref().unwrap_or_default();
        assert!(error.contains("order 2: nothing to charge"), "{error}");
        app.stop().await?;
        Ok(())
    }
    // ANCHOR_END: test_dlq
}
// ANCHOR_END: tests
