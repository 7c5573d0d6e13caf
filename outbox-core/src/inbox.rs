//! The consuming side of effectively-once: an **inbox** that remembers which
//! messages a consumer has processed, in the consumer's own PostgreSQL
//! transaction.
//!
//! The relay delivers at least once: a relay that dies between the bus's
//! confirmation and the row's deletion publishes the row again, and a
//! consumer that dies between its database commit and its offset commit (or
//! its ack) reads the message again. An [`Inbox`] turns both into "processed
//! once": inside the transaction that writes the consumer's domain rows,
//! [`Inbox::accept`] records the message id and says whether it is new. The
//! dedup record and the domain write commit together or not at all, so a
//! redelivered message finds its id recorded and is skipped, and a crash
//! before the commit leaves neither behind.
//!
//! ```no_run
//! use outbox_core::inbox::Inbox;
//!
//! # async fn handle(pool: sqlx::PgPool, outbox_id: &str, order_id: i64) -> Result<(), outbox_core::Error> {
//! let inbox = Inbox::new("inbox", "billing")?; // table, consumer name
//! inbox.migrate(&pool).await?; // once, at startup
//!
//! let mut tx = pool.begin().await?;
//! if inbox.accept(&mut *tx, outbox_id).await? {
//!     sqlx::query("INSERT INTO invoices (order_id) VALUES ($1)")
//!         .bind(order_id)
//!         .execute(&mut *tx)
//!         .await?;
//! } // else: processed before (a redelivery); nothing to do
//! tx.commit().await?; // then commit the Kafka offset / ack the message
//! # Ok(()) }
//! ```
//!
//! Which id to pass, per bus (what the transports of this workspace send):
//!
//! | bus | message id |
//! | --- | --- |
//! | Kafka (`outbox-kafka`) | the `outbox-id` record header |
//! | RabbitMQ (`outbox-rabbitmq`) | the `message_id` property |
//! | NATS (`outbox-nats`) | the `Nats-Msg-Id` header (`<source>:<outbox-id>`) |
//! | Redis (`outbox-redis`) | the `outbox-id` field |
//! | a `#[subscriber]` of this crate | [`Message::id`](crate::Message::id) |
//!
//! The `outbox-id` is unique within **one** outbox table: a consumer that
//! reads what several outboxes (services, databases) relayed into one topic
//! should prefix it with where it came from (the topic and a producer-set
//! header, or NATS's source-qualified id), or use one consumer name per
//! source.
//!
//! Concurrency: two transactions accepting the same id at once are
//! serialized by the table's primary key: the second waits until the first
//! ends and then returns `false` (first committed) or `true` (first rolled
//! back). Records older than the [retention](Inbox::retention) are removed
//! by [`Inbox::cleanup`] (or the task of [`Inbox::spawn_cleanup`]); a
//! message redelivered after its record was removed is processed again, so
//! the retention must exceed the longest redelivery delay of the bus (a
//! consumer group rewound, a relay down for days).

use std::time::Duration;

use sqlx::{PgExecutor, PgPool};

use crate::error::{Error, Result};
use crate::store::ident;
use crate::store::table::{TableName, run_migration, validate_schema};

/// The longest message id [`Inbox::accept`] takes, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 1024;

/// The longest consumer name, in characters (the column is `VARCHAR(255)`).
pub const MAX_CONSUMER_CHARS: usize = 255;

/// The default [retention](Inbox::retention): 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many records one statement of [`Inbox::cleanup`] deletes.
const CLEANUP_BATCH: i64 = 10_000;

const SUFFIXES: [&str; 2] = ["_pkey", "_accepted_idx"];

/// An inbox table and the consumer that records its processed messages in it
/// (several consumers can share one table: the key is `(consumer,
/// message_id)`). See the [module documentation](self).
///
/// ```
/// use outbox_core::inbox::Inbox;
///
/// let inbox = Inbox::new("inbox", "billing")?.schema("svc")?;
/// assert_eq!(inbox.qualified_name(), r#""svc"."inbox""#);
/// assert!(inbox.create_sql().contains("PRIMARY KEY (consumer, message_id)"));
/// assert!(Inbox::new("inbox", "").is_err()); // a consumer name is required
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbox {
    table: TableName,
    consumer: String,
    retention: Duration,
}

impl Inbox {
    /// The inbox table `table` (in the connection's `search_path`) for the
    /// consumer `consumer` (1-255 characters; the name of the service or
    /// handler whose processing it records), with the
    /// [default retention](DEFAULT_RETENTION).
    ///
    /// Fails if the table name is empty, holds a NUL byte or derives an index
    /// name over 63 bytes, or if the consumer name is empty or too long.
    pub fn new(table: &str, consumer: &str) -> Result<Self> {
        ident::validate("inbox table", table, &[], &SUFFIXES)?;
        if consumer.is_empty() || consumer.chars().count() > MAX_CONSUMER_CHARS {
            return Err(Error::arg(format!(
                "the inbox consumer name must be 1-{MAX_CONSUMER_CHARS} characters (got {}); \
                 name the service or handler whose processing the inbox records",
                consumer.chars().count()
            )));
        }
        Ok(Self {
            table: TableName {
                schema: None,
                name: table.to_owned(),
            },
            consumer: consumer.to_owned(),
            retention: DEFAULT_RETENTION,
        })
    }

    /// Places the table in `schema` (created by [`migrate`](Self::migrate)
    /// if missing).
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        validate_schema(schema)?;
        self.table.schema = Some(schema.to_owned());
        Ok(self)
    }

    /// How long a record is kept (default 7 days): [`cleanup`](Self::cleanup)
    /// removes older ones. It must exceed the longest time after which the
    /// bus may deliver a message again.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The retention.
    pub fn retention_period(&self) -> Duration {
        self.retention
    }

    /// The quoted, schema-qualified table name as it appears in SQL.
    pub fn qualified_name(&self) -> String {
        self.table.qualified()
    }

    /// The DDL creating the table and its index, for a migration tool of
    /// your own.
    pub fn create_sql(&self) -> String {
        self.table.script(self.statements(false))
    }

    fn statements(&self, if_not_exists: bool) -> Vec<String> {
        let t = self.qualified_name();
        let ine = if if_not_exists { "IF NOT EXISTS " } else { "" };
        let n = &self.table.name;
        vec![
            format!(
                "CREATE TABLE {ine}{t} (\n\
                 \x20   consumer VARCHAR(255) NOT NULL,\n\
                 \x20   message_id TEXT NOT NULL,\n\
                 \x20   accepted_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,\n\
                 \x20   CONSTRAINT {pk} PRIMARY KEY (consumer, message_id)\n\
                 )",
                pk = ident::quote(&format!("{n}_pkey")),
            ),
            format!(
                "CREATE INDEX {ine}{} ON {t} (consumer, accepted_at)",
                ident::quote(&format!("{n}_accepted_idx"))
            ),
        ]
    }

    /// Creates the schema, the table and its index where missing; idempotent
    /// and safe from several processes at once.
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let stmts = self
            .table
            .schema_ddl()
            .into_iter()
            .chain(self.statements(true))
            .collect();
        run_migration(pool, &self.qualified_name(), stmts).await
    }

    /// Records `message_id` as processed by this consumer, on `conn`: pass
    /// the transaction that writes the consumer's domain rows (`&mut *tx`),
    /// so both commit together. Returns `true` for a message seen for the
    /// first time (process it), `false` for one already recorded (a
    /// redelivery: skip it).
    ///
    /// Outside a transaction the record commits at once, before the
    /// processing it is meant to guard: a crash in between would lose the
    /// message. Fails on an empty or over-long id (at most
    /// [`MAX_MESSAGE_ID_BYTES`] bytes) and on database errors (the
    /// transaction is then to be rolled back, the message to be redelivered).
    pub async fn accept<'c, E: PgExecutor<'c>>(&self, conn: E, message_id: &str) -> Result<bool> {
        check_message_id(message_id)?;
        let sql = format!(
            "INSERT INTO {} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            self.qualified_name()
        );
        // The table name is validated and quoted; the values are parameters.
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.consumer)
            .bind(message_id)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether `message_id` is recorded for this consumer (without recording
    /// it).
    pub async fn contains<'c, E: PgExecutor<'c>>(&self, conn: E, message_id: &str) -> Result<bool> {
        check_message_id(message_id)?;
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE consumer = $1 AND message_id = $2)",
            self.qualified_name()
        );
        let found: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(&self.consumer)
            .bind(message_id)
            .fetch_one(conn)
            .await?;
        Ok(found)
    }

    /// Deletes this consumer's records older than the retention (by the
    /// database's clock), in statements of at most 10,000 rows, and returns
    /// how many it deleted.
    pub async fn cleanup(&self, pool: &PgPool) -> Result<u64> {
        let t = self.qualified_name();
        let sql = format!(
            "DELETE FROM {t} WHERE ctid = ANY (ARRAY(\
             SELECT ctid FROM {t} WHERE consumer = $1 \
             AND accepted_at < now() - make_interval(secs => $2) LIMIT $3))"
        );
        let mut total = 0;
        loop {
            let done = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&self.consumer)
                .bind(self.retention.as_secs_f64())
                .bind(CLEANUP_BATCH)
                .execute(pool)
                .await?;
            total += done.rows_affected();
            if done.rows_affected() < CLEANUP_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Runs [`cleanup`](Self::cleanup) every `every` on a tokio task (the
    /// first run at once) until the returned handle is aborted or dropped
    /// with the runtime. A failed run is logged at WARN and tried again at
    /// the next tick.
    pub fn spawn_cleanup(&self, pool: PgPool, every: Duration) -> tokio::task::JoinHandle<()> {
        let inbox = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match inbox.cleanup(&pool).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(
                        inbox = %inbox.qualified_name(),
                        consumer = %inbox.consumer,
                        deleted = n,
                        "inbox cleanup"
                    ),
                    Err(e) => tracing::warn!(
                        inbox = %inbox.qualified_name(),
                        consumer = %inbox.consumer,
                        error = %e,
                        "inbox cleanup failed; retrying at the next interval"
                    ),
                }
            }
        })
    }
}

fn check_message_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_BYTES {
        return Err(Error::arg(format!(
            "an inbox message id must be 1-{MAX_MESSAGE_ID_BYTES} bytes (got {}): pass the \
             message's id (the outbox-id header, the message_id property, Nats-Msg-Id)",
            id.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_are_validated() {
        assert!(Inbox::new("", "c").is_err());
        assert!(Inbox::new("inbox", &"c".repeat(256)).is_err());
        assert!(Inbox::new("inbox", &"c".repeat(255)).is_ok());
        // `<t>_accepted_idx` must fit in 63 bytes.
        assert!(Inbox::new(&"t".repeat(50), "c").is_ok());
        assert!(Inbox::new(&"t".repeat(51), "c").is_err());
        assert!(check_message_id("").is_err());
        assert!(check_message_id(&"x".repeat(MAX_MESSAGE_ID_BYTES)).is_ok());
        let err = check_message_id(&"x".repeat(MAX_MESSAGE_ID_BYTES + 1)).unwrap_err();
        assert!(err.to_string().contains("outbox-id"), "{err}");
    }

    #[test]
    fn ddl_quotes_the_names() {
        let sql = Inbox::new("in\"box", "c")
            .expect("valid")
            .schema("s")
            .expect("valid")
            .create_sql();
        assert!(
            sql.starts_with(r#"CREATE SCHEMA IF NOT EXISTS "s";"#),
            "{sql}"
        );
        assert!(sql.contains(r#"CREATE TABLE "s"."in""box" ("#), "{sql}");
        assert!(sql.contains(
            r#"CREATE INDEX "in""box_accepted_idx" ON "s"."in""box" (consumer, accepted_at)"#
        ));
    }
}
