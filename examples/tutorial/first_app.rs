//! Tutorial 2, "Your first outbox app" (docs/tutorial/02-first-app.md): the
//! tutorial's `src/main.rs`, PostgreSQL only. The markdown shows this file;
//! scripts/check-tutorial.sh checks that the two agree and runs it.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo \
//!     cargo run -p examples --example tutorial_first_app   # Ctrl-C to stop
//! ```

// ANCHOR: all
use outbox_core::{App, AppContext, BoxError, OutboxBroker, OutboxTable, subscriber};
use tracing_subscriber::EnvFilter;

// ANCHOR: handler
#[subscriber("orders")]
async fn handle(order_id: i64) {
    println!("got order {order_id}");
}
// ANCHOR_END: handler

// ANCHOR: publish
/// Runs once the subscriber is live: one order, written in a transaction.
async fn publish_one(app: AppContext) -> Result<(), BoxError> {
    let outbox = app.broker();
    let mut tx = outbox.pool().begin().await?;
    // The domain write and the outbox row share the transaction.
    let order_id: i64 =
        outbox_core::sqlx::query_scalar("INSERT INTO orders (item) VALUES ('a book') RETURNING id")
            .fetch_one(&mut *tx)
            .await?;
    outbox.publish(&order_id, "orders", &mut *tx).await?;
    tx.commit().await?; // both exist from here on; a rollback would drop both
    println!("published order {order_id}");
    Ok(())
}
// ANCHOR_END: publish

// ANCHOR: main
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

    let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?);
    outbox.migrate().await?; // creates the outbox table and its indexes if missing

    App::new(outbox).after_startup(publish_one).run().await?;
    Ok(()) // Ctrl-C (SIGINT) or SIGTERM: a graceful stop
}
// ANCHOR_END: main
// ANCHOR_END: all
