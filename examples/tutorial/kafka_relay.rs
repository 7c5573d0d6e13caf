//! Tutorial 3, "Add a Kafka relay" (docs/tutorial/03-kafka-relay.md): the
//! first app, with its handler's result relayed to the Kafka topic
//! `orders.kafka`. The markdown shows this file; scripts/check-tutorial.sh
//! checks that the two agree and runs it.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/outbox_demo KAFKA_BOOTSTRAP=localhost:9092 \
//!     cargo run -p examples --example tutorial_kafka_relay   # Ctrl-C to stop
//! ```

// ANCHOR: all
// ANCHOR: imports
use outbox_core::{App, AppContext, BoxError, OutboxBroker, OutboxTable, publish_to, subscriber};
use outbox_kafka::KafkaBroker;
use tracing_subscriber::EnvFilter;
// ANCHOR_END: imports

// ANCHOR: handler
#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}
// ANCHOR_END: handler

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

    // ANCHOR: kafka
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "localhost:9092".to_owned());
    let kafka = KafkaBroker::new(bootstrap);
    kafka.ensure_topic("orders.kafka", 1, 1).await?; // 1 partition, 1 replica

    App::new(outbox)
        .on_startup(kafka.connect()) // registers the transport `kafka`
        .after_startup(publish_one)
        .run()
        .await?;
    // ANCHOR_END: kafka
    Ok(()) // Ctrl-C (SIGINT) or SIGTERM: a graceful stop
}
// ANCHOR_END: all
