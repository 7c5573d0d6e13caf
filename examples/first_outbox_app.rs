//! The seed tutorial's first app: a handler that prints the order, Postgres
//! only. One order is published in a transaction once the subscriber is
//! live; the app stops by itself when the outbox is empty (a real service
//! would run until SIGINT/SIGTERM).
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo \
//!     cargo run -p examples --example first_outbox_app
//! ```

use std::time::Duration;

use anyhow::Context;
use outbox_core::{App, AppContext, BoxError, OutboxBroker, OutboxTable, subscriber};

#[subscriber("orders")]
async fn handle(order_id: i64) {
    println!("got order {order_id}");
}

/// Runs once the subscriber is live: publishes order 1 in a transaction.
async fn publish_one(app: AppContext) -> Result<(), BoxError> {
    let mut tx = app.broker().pool().begin().await?;
    // ... the service's own writes on `tx` would go here ...
    app.broker().publish(&1_i64, "orders", &mut *tx).await?;
    tx.commit().await?;
    println!("published order 1");
    Ok(())
}

/// Stops the app once nothing is left in the outbox (for the demo only).
async fn stop_when_drained(app: AppContext) -> Result<(), BoxError> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Ok(mut conn) = app.broker().pool().acquire().await else {
                continue;
            };
            let rows = app.broker().fetch_unprocessed(Some("orders"), 1, &mut conn);
            if rows.await.is_ok_and(|r| r.is_empty()) {
                println!("the outbox is empty; stopping");
                app.shutdown();
                return;
            }
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,outbox_core=info".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/outbox_demo".to_owned());
    let pool = sqlx::PgPool::connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url} (set DATABASE_URL)"))?;
    let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?);
    outbox.migrate().await?;

    App::new(outbox)
        .after_startup(publish_one)
        .after_startup(stop_when_drained)
        .run()
        .await?;
    Ok(())
}
