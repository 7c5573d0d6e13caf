//! The outbox without macros or transports: publish orders in Postgres
//! transactions, drain them with the subscriber engine, stop gracefully.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo \
//!     cargo run -p examples --example standalone_outbox
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use outbox_core::retry::ConstantRetry;
use outbox_core::{BoxError, DlqTable, Engine, Message, OutboxBroker, OutboxTable, Subscriber};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: i64,
    amount_cents: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/outbox_demo".to_owned());
    let pool = sqlx::PgPool::connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url} (set DATABASE_URL)"))?;

    // The tables: create what is missing (or run `create_sql()` in your migrations).
    let outbox = OutboxBroker::new(pool.clone(), OutboxTable::new("standalone_outbox")?)
        .dead_letter_table(DlqTable::new("standalone_outbox_dlq")?);
    outbox.migrate().await?;

    // A domain table written in the same transaction as the outbox rows.
    sqlx::query("CREATE TABLE IF NOT EXISTS demo_orders (id BIGINT PRIMARY KEY, amount_cents BIGINT NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE demo_orders").execute(&pool).await?;

    for order_id in 1..=3_i64 {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO demo_orders (id, amount_cents) VALUES ($1, $2)")
            .bind(order_id)
            .bind(order_id * 1000)
            .execute(&mut *tx)
            .await?;
        let body = serde_json::json!({"order_id": order_id, "amount_cents": order_id * 1000});
        outbox.publish(&body, "orders", &mut *tx).await?;
        tx.commit().await?;
    }
    // Rolled back: neither the domain row nor the message exists.
    let mut tx = pool.begin().await?;
    outbox
        .publish(
            &serde_json::json!({"order_id": 99, "amount_cents": 1}),
            "orders",
            &mut *tx,
        )
        .await?;
    tx.rollback().await?;
    println!("published 3 orders (and rolled one back)");

    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let orders = Subscriber::builder(["orders"])
        .max_workers(2)
        .retry(ConstantRetry::new(Duration::from_secs(1)).max_attempts(5))
        .build(move |msg: Message| {
            let counter = counter.clone();
            async move {
                let order: Order = msg.decode()?;
                println!(
                    "got order {} ({} cents), row {}",
                    order.order_id,
                    order.amount_cents,
                    msg.id()
                );
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        })?;
    let engine = Engine::new(outbox.clone()).subscriber(orders);
    engine.start().await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handled.load(Ordering::SeqCst) < 3 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "orders were not handled within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = engine.stop().await;
    let mut conn = pool.acquire().await?;
    let left = outbox
        .fetch_unprocessed(Some("orders"), 10, &mut conn)
        .await?
        .len();
    println!(
        "handled {} orders; {left} rows left in the outbox; stop: {report:?}",
        handled.load(Ordering::SeqCst)
    );
    Ok(())
}
