//! Testing your handlers without PostgreSQL or a bus (feature `testing`).
//!
//! [`TestApp`] runs an application (your `#[subscriber]` / `#[publish_to]`
//! handlers, transports and state, registered as for [`App`](crate::App))
//! with the outbox in memory: publishing goes through the real producer
//! path, delivery through the engine's own pipeline (ack policy, retry
//! strategy, `max_deliveries`, dead letters), transports are captured by a
//! [`MemoryTransport`]. It is FastStream's
//! `TestBroker` for the outbox. A test takes milliseconds.
//!
//! ```
//! use std::time::Duration;
//! use outbox_core::testing::{OutgoingExt, TestApp, TestClock};
//! use outbox_core::{publish_to, subscriber, MemoryTransport, PublishOptions};
//!
//! #[publish_to(kafka, "orders.kafka")]
//! #[subscriber("orders")]
//! async fn handle(order_id: i64) -> i64 {
//!     println!("got order {order_id}");
//!     order_id
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kafka = MemoryTransport::new("kafka");
//! let app = TestApp::builder()
//!     .without_discovery()
//!     .subscriber(handle {})
//!     .transport(kafka.clone())
//!     .clock(TestClock::frozen())
//!     .start()
//!     .await?;
//!
//! let id = app
//!     .publish_with(&1_i64, "orders", &PublishOptions::new().header("x-tenant", "acme"))
//!     .await?
//!     .expect("inserted");
//!
//! // The handler ran with the body, before `publish` returned...
//! assert_eq!(app.handled_bodies::<i64>("orders")?, [1]);
//! // ... its result was relayed, with the envelope's headers ...
//! let sent = kafka.messages_to("orders.kafka");
//! assert_eq!(sent[0].value::<i64>()?, 1);
//! assert_eq!(sent[0].header("outbox-id"), Some(id.to_string().as_str()));
//! // ... and the row was acked.
//! assert_eq!(app.history(id).to_string(), "claimed(1), acked");
//! assert!(app.rows().await?.is_empty());
//! app.stop().await?;
//! # Ok(()) }
//! ```
//!
//! The pieces:
//!
//! - [`TestApp`] / [`TestAppBuilder`]: the application under test, with
//!   synchronous dispatch (default) or the real engine loops
//!   ([`TestAppBuilder::loop_mode`]), on the in-memory store (default) or,
//!   opt-in, on real PostgreSQL ([`TestAppBuilder::postgres`]);
//! - [`MemoryStore`]: the outbox and dead-letter tables in memory, with the
//!   semantics of the engine's SQL, on a [`TestClock`] you can
//!   [`advance`](TestApp::advance);
//! - [`History`] / [`Step`] / [`Call`]: what the engine did, as recorded by
//!   the engine itself;
//! - [`OutgoingExt`]: reading captured transport messages;
//! - [`StoreOps`]: the engine's storage statements one by one, on either
//!   backend (the contract suite that keeps the two identical drives it).
//!
//! A handler that opens its own PostgreSQL transaction (to publish a
//! follow-up row on `ctx.broker().pool()`) needs the PostgreSQL mode: the
//! in-memory backend has no pool (`OutboxBroker::try_pool` returns
//! [`Error::Unsupported`](crate::Error::Unsupported), `pool()` panics), and
//! what only PostgreSQL can do (`validate_schema`, `stats`, the `dlq_*`
//! operations) returns that error too; `migrate` does nothing.
//!
//! See `docs/testing.md` for the guide.

mod app;
mod ext;
mod harness;
mod ops;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

pub use app::{DEFAULT_SETTLE_TIMEOUT, TestApp, TestAppBuilder};
pub use ext::OutgoingExt;
pub(crate) use harness::Harness;
pub use harness::{Call, History, Step};
pub use ops::{Claim, Lot, StoreOps};

pub use crate::store::clock::TestClock;
pub use crate::store::memory::MemoryStore;
pub use crate::transport::MemoryTransport;

use crate::broker::OutboxBroker;
use crate::error::Result;
use crate::store::{DlqTable, OutboxTable};

/// A broker on the in-memory store `store`: table `outbox` (and
/// `outbox_dlq`), reporting to `harness`. It has no pool: what needs
/// PostgreSQL returns [`Error::Unsupported`](crate::Error::Unsupported).
pub(crate) fn memory_broker(
    store: Arc<MemoryStore>,
    harness: Arc<Harness>,
    dead_letters: bool,
) -> Result<OutboxBroker> {
    let broker = OutboxBroker::local(store, OutboxTable::new("outbox")?).observed_by(harness);
    Ok(if dead_letters {
        broker.dead_letter_table(DlqTable::new("outbox_dlq")?)
    } else {
        broker
    })
}

/// A broker on a private schema `outbox_test_<random>` of the database at
/// `url`, with migrated outbox and dead-letter tables.
pub(crate) async fn scratch_broker(url: &str) -> Result<(OutboxBroker, String)> {
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await?;
    let schema = format!(
        "outbox_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&pool)
        .await?;
    let broker = OutboxBroker::new(pool, OutboxTable::new("outbox")?.schema(&schema)?)
        .dead_letter_table(DlqTable::new("outbox_dlq")?.schema(&schema)?);
    broker.migrate().await?;
    Ok((broker, schema))
}

/// Drops a schema made by [`scratch_broker`].
pub(crate) async fn drop_scratch(broker: &OutboxBroker, schema: &str) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(broker.pool())
    .await?;
    Ok(())
}

/// What advancing the clock by `by` means on PostgreSQL: every stored time
/// of the outbox and dead-letter tables moves back by `by`.
pub(crate) async fn shift_postgres(broker: &OutboxBroker, by: Duration) -> Result<()> {
    let t = broker.table().qualified_name();
    let i = "make_interval(secs => $1)";
    let mut tx = broker.pool().begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {t} SET created_at = created_at - {i}, next_attempt_at = next_attempt_at - {i}, \
         first_attempt_at = first_attempt_at - {i}, last_attempt_at = last_attempt_at - {i}, \
         acquired_at = acquired_at - {i}"
    )))
    .bind(by.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    if let Some(d) = broker.dlq() {
        let d = d.qualified_name();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {d} SET created_at = created_at - {i}, failed_at = failed_at - {i}"
        )))
        .bind(by.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Whether the engine's claim for `queues` would return a row now (on
/// PostgreSQL); `ordered`: of the keyed rows, heads only.
pub(crate) async fn postgres_has_claimable(
    broker: &OutboxBroker,
    queues: &[String],
    lease_ttl: Duration,
    ordered: bool,
) -> Result<bool> {
    let t = broker.table().qualified_name();
    let found: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {t} o WHERE queue = ANY($1) AND next_attempt_at <= now() \
         AND (acquired_token IS NULL OR acquired_at < now() - make_interval(secs => $2)) \
         AND (NOT $3 OR o.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM {t} p \
           WHERE p.queue = o.queue AND p.ordering_key = o.ordering_key AND p.id < o.id)))"
    )))
    .bind(queues)
    .bind(lease_ttl.as_secs_f64())
    .bind(ordered)
    .fetch_one(broker.pool())
    .await?;
    Ok(found)
}

/// The in-memory backend: what it runs, and the clear error for what only
/// PostgreSQL can run.
#[cfg(test)]
mod memory_backend {
    use super::*;
    use crate::error::Error;
    use crate::ops::{DlqFilter, ReplayOptions};
    use crate::publish::PublishOptions;
    use crate::store::SchemaChecks;

    fn broker() -> OutboxBroker {
        let store = Arc::new(MemoryStore::new());
        let harness = Harness::new(Some(store.clone()), true);
        memory_broker(store, harness, true).expect("a memory broker")
    }

    /// `result` is `Error::Unsupported` naming `operation` and the store,
    /// with a message that says to use PostgreSQL.
    #[track_caller]
    fn unsupported<T: std::fmt::Debug>(result: Result<T>, operation: &str) {
        match result {
            Err(
                ref e @ Error::Unsupported {
                    operation: op,
                    backend,
                },
            ) => {
                assert_eq!(op, operation);
                assert_eq!(backend, "the in-memory store");
                assert_eq!(
                    e.to_string(),
                    format!(
                        "{operation} is not supported by the in-memory store; run it against PostgreSQL"
                    )
                );
                assert!(e.is_misuse());
            }
            other => panic!("{operation}: expected Error::Unsupported, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn validate_schema_is_unsupported() {
        unsupported(broker().validate_schema().await, "validate_schema");
    }

    #[tokio::test]
    async fn validate_schema_with_is_unsupported() {
        let checks = SchemaChecks::new().autovacuum(true);
        unsupported(
            broker().validate_schema_with(checks).await,
            "validate_schema_with",
        );
    }

    #[tokio::test]
    async fn stats_are_unsupported() {
        unsupported(broker().stats().await, "stats");
        unsupported(broker().stats_for(&["orders"]).await, "stats");
    }

    #[tokio::test]
    async fn stats_for_no_queue_need_no_backend() {
        // No queue, no statement: an empty answer, as on PostgreSQL.
        assert!(broker().stats_for(&[]).await.expect("empty").is_empty());
    }

    #[tokio::test]
    async fn the_overview_queries_are_unsupported() {
        use crate::ops::{OverviewOptions, RowLookup};
        unsupported(broker().overview(&OverviewOptions::new()).await, "overview");
        unsupported(broker().table_activity().await, "table_activity");
        unsupported(broker().connections().await, "connections");
        unsupported(broker().find_rows(&RowLookup::Id(1)).await, "find_rows");
    }

    #[tokio::test]
    async fn dlq_list_is_unsupported() {
        unsupported(broker().dlq_list(&DlqFilter::all()).await, "dlq_list");
    }

    #[tokio::test]
    async fn dlq_get_is_unsupported() {
        unsupported(broker().dlq_get(1).await, "dlq_get");
    }

    #[tokio::test]
    async fn dlq_count_is_unsupported() {
        unsupported(broker().dlq_count(&DlqFilter::all()).await, "dlq_count");
    }

    #[tokio::test]
    async fn dlq_purge_is_unsupported() {
        unsupported(broker().dlq_purge(&DlqFilter::all()).await, "dlq_purge");
    }

    #[tokio::test]
    async fn dlq_replay_is_unsupported() {
        unsupported(broker().dlq_replay(&DlqFilter::all()).await, "dlq_replay");
        let dry = ReplayOptions::new().dry_run(true);
        unsupported(
            broker()
                .dlq_replay_with(&DlqFilter::all(), &dry, |_| {})
                .await,
            "dlq_replay",
        );
    }

    #[test]
    fn the_pool_is_unsupported() {
        unsupported(broker().try_pool().map(|_| ()), "OutboxBroker::pool");
    }

    #[test]
    #[should_panic(
        expected = "OutboxBroker::pool is not supported by the in-memory store; run it against PostgreSQL"
    )]
    fn pool_panics_in_memory() {
        let _ = broker().pool();
    }

    #[tokio::test]
    async fn migrate_is_a_no_op() {
        broker().migrate().await.expect("nothing to create");
    }

    #[tokio::test]
    async fn producer_operations_run_in_memory() {
        let b = broker();
        let timer = PublishOptions::new().timer_id("t");
        let id = b.publish_on(&1, "orders", &timer, None).await.unwrap();
        assert!(id.is_some());
        let again = b.publish_on(&2, "orders", &timer, None).await.unwrap();
        assert_eq!(again, None, "the timer exists");
        let n = b
            .publish_batch_on([3, 4], "orders", &PublishOptions::new(), None)
            .await
            .unwrap();
        assert_eq!(n, 2);
        let rows = b
            .fetch_unprocessed_on(Some("orders"), 10, None)
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
        assert!(b.cancel_timer_on("orders", "t", None).await.unwrap());
        assert!(!b.cancel_timer_on("orders", "t", None).await.unwrap());
        let rows = b.fetch_unprocessed_on(None, 10, None).await.unwrap();
        assert_eq!(rows.len(), 2);
    }

    #[tokio::test]
    async fn engine_statements_run_in_memory() {
        let store = Arc::new(MemoryStore::new());
        let ops = StoreOps::memory(store.clone()).unwrap();
        ops.publish(&1, "orders", &PublishOptions::new())
            .await
            .unwrap();
        let claim = ops
            .claim(&["orders"], 10, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(claim.rows.len(), 1);
        assert_eq!(store.rows()[0].deliveries_count, 1);
    }
}
