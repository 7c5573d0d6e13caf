//! The outbox and dead-letter table definitions: names, DDL, migration.
//!
//! The layout is column-for-column the one faststream-outbox 0.19 uses
//! (`make_outbox_table` / `make_dlq_table`), so a Python service and a Rust
//! service can share one outbox table.

use sqlx::{Executor, PgPool};

use super::ident;
use crate::error::Result;

const OUTBOX_SUFFIXES: [&str; 8] = [
    "_pending_idx",
    "_retry_idx",
    "_key_idx",
    "_leased_idx",
    "_timer_id_uq",
    "_lease_ck",
    "_pkey",
    "_id_seq",
];
const DLQ_SUFFIXES: [&str; 3] = ["_queue_failed_idx", "_pkey", "_id_seq"];

/// The columns of the outbox table, in declaration order.
pub const OUTBOX_COLUMNS: [&str; 14] = [
    "id",
    "queue",
    "payload",
    "headers",
    "attempts_count",
    "deliveries_count",
    "created_at",
    "next_attempt_at",
    "first_attempt_at",
    "last_attempt_at",
    "acquired_at",
    "acquired_token",
    "timer_id",
    "ordering_key",
];

/// The columns of the dead-letter table, in declaration order.
pub const DLQ_COLUMNS: [&str; 12] = [
    "id",
    "original_id",
    "queue",
    "payload",
    "headers",
    "deliveries_count",
    "created_at",
    "failed_at",
    "failure_reason",
    "last_exception",
    "timer_id",
    "ordering_key",
];

/// A validated, possibly schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableName {
    pub(crate) schema: Option<String>,
    pub(crate) name: String,
}

impl TableName {
    pub(crate) fn qualified(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", ident::quote(s), ident::quote(&self.name)),
            None => ident::quote(&self.name),
        }
    }

    /// The schema statement (if any) and `stmts`, each `;`-terminated.
    pub(crate) fn script(&self, stmts: Vec<String>) -> String {
        self.schema_ddl()
            .into_iter()
            .chain(stmts)
            .map(|s| s + ";\n")
            .collect()
    }

    pub(crate) fn schema_ddl(&self) -> Option<String> {
        self.schema
            .as_ref()
            .map(|s| format!("CREATE SCHEMA IF NOT EXISTS {}", ident::quote(s)))
    }

    /// What `migrate` runs for a table whose `IF NOT EXISTS` DDL is `create`
    /// (the table first): the schema, the table, then the `ordering_key`
    /// column that both tables gained after faststream-outbox 0.19's layout
    /// (for tables created before it; indexes may use it), then the rest.
    fn migration(&self, mut create: Vec<String>) -> Vec<String> {
        let rest = create.split_off(1.min(create.len()));
        let added = format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS ordering_key VARCHAR(255)",
            self.qualified()
        );
        self.schema_ddl()
            .into_iter()
            .chain(create)
            .chain([added])
            .chain(rest)
            .collect()
    }
}

pub(crate) fn validate_schema(schema: &str) -> Result<()> {
    ident::validate("schema", schema, &[], &[])
}

/// The outbox table: where producers insert rows and subscribers claim them.
///
/// The thirteen columns of faststream-outbox 0.19 plus `ordering_key`
/// (nullable: its rows have none), no state column: a row is pending while
/// `acquired_token IS NULL`, leased while it is set (the lease expires
/// `lease_ttl` after `acquired_at`), and gone once handled. Indexes:
/// `<t>_pending_idx` and `<t>_leased_idx` (partial, on `(queue, next_attempt_at, id)`),
/// `<t>_key_idx` (on `(queue, ordering_key, id)`, the key in byte order: the
/// head of each key, for
/// [ordered](crate::SubscriberOptions::ordered) subscribers),
/// `<t>_timer_id_uq` (partial unique, the `timer_id` conflict arbiter), the CHECK
/// `<t>_lease_ck` that makes a half-set lease unrepresentable, and the optional
/// `<t>_retry_idx` (partial, on `(queue, next_attempt_at)` of unleased rows with
/// `attempts_count > 0`: what the [overview](crate::OutboxBroker::overview) counts
/// retrying rows with; [validation](crate::OutboxBroker::validate_schema) does
/// not require it, so tables created by faststream-outbox stay valid).
///
/// ```
/// use outbox_core::OutboxTable;
///
/// let table = OutboxTable::new("outbox")?.schema("billing")?;
/// assert_eq!(table.qualified_name(), r#""billing"."outbox""#);
/// assert_eq!(table.channel(), "outbox_outbox");
/// assert!(table.create_sql().contains(r#"CREATE INDEX "outbox_pending_idx""#));
/// // A name whose derived index names would exceed PostgreSQL's 63 bytes is refused:
/// assert!(OutboxTable::new(&"x".repeat(60)).is_err());
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    name: TableName,
}

impl OutboxTable {
    /// Defines the outbox table `name` (in the connection's `search_path`).
    ///
    /// Fails if the name is empty, contains a NUL byte, or if any identifier
    /// derived from it (`outbox_<name>` for the NOTIFY channel, `<name>_pending_idx`,
    /// `<name>_timer_id_uq`, …) would exceed 63 bytes.
    pub fn new(name: &str) -> Result<Self> {
        ident::validate("table", name, &["outbox_"], &OUTBOX_SUFFIXES)?;
        Ok(Self {
            name: TableName {
                schema: None,
                name: name.to_owned(),
            },
        })
    }

    /// Places the table in `schema` (created by [`migrate`](Self::migrate) if missing).
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        validate_schema(schema)?;
        self.name.schema = Some(schema.to_owned());
        Ok(self)
    }

    /// The unqualified table name.
    pub fn name(&self) -> &str {
        &self.name.name
    }

    /// The schema, if one was set.
    pub fn schema_name(&self) -> Option<&str> {
        self.name.schema.as_deref()
    }

    /// The quoted, schema-qualified name as it appears in SQL.
    pub fn qualified_name(&self) -> String {
        self.name.qualified()
    }

    /// The LISTEN/NOTIFY channel: `outbox_<table>` (not schema-qualified, as in
    /// faststream-outbox; two tables of the same name in different schemas of one
    /// database share a channel, which only costs spurious wake-ups).
    pub fn channel(&self) -> String {
        format!("outbox_{}", self.name.name)
    }

    pub(crate) fn index(&self, suffix: &str) -> String {
        ident::quote(&format!("{}{suffix}", self.name.name))
    }

    /// The DDL creating the table, its indexes and its CHECK constraint, as
    /// semicolon-terminated statements, for a migration tool of your own.
    pub fn create_sql(&self) -> String {
        self.name.script(self.statements(false))
    }

    fn statements(&self, if_not_exists: bool) -> Vec<String> {
        let t = self.qualified_name();
        let ine = if if_not_exists { "IF NOT EXISTS " } else { "" };
        let table = format!(
            "CREATE TABLE {ine}{t} (\n\
             \x20   id BIGSERIAL NOT NULL,\n\
             \x20   queue VARCHAR(255) NOT NULL,\n\
             \x20   payload BYTEA NOT NULL,\n\
             \x20   headers JSONB,\n\
             \x20   attempts_count BIGINT DEFAULT '0' NOT NULL,\n\
             \x20   deliveries_count BIGINT DEFAULT '0' NOT NULL,\n\
             \x20   created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,\n\
             \x20   next_attempt_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,\n\
             \x20   first_attempt_at TIMESTAMP WITH TIME ZONE,\n\
             \x20   last_attempt_at TIMESTAMP WITH TIME ZONE,\n\
             \x20   acquired_at TIMESTAMP WITH TIME ZONE,\n\
             \x20   acquired_token UUID,\n\
             \x20   timer_id VARCHAR(255),\n\
             \x20   ordering_key VARCHAR(255),\n\
             \x20   CONSTRAINT {pk} PRIMARY KEY (id),\n\
             \x20   CONSTRAINT {ck} CHECK ((acquired_token IS NULL) = (acquired_at IS NULL))\n\
             )",
            pk = self.index("_pkey"),
            ck = self.index("_lease_ck"),
        );
        vec![
            table,
            format!(
                "CREATE UNIQUE INDEX {ine}{} ON {t} (queue, timer_id) WHERE timer_id IS NOT NULL",
                self.index("_timer_id_uq")
            ),
            format!(
                "CREATE INDEX {ine}{} ON {t} (queue, next_attempt_at, id) WHERE acquired_token IS NULL",
                self.index("_pending_idx")
            ),
            format!(
                "CREATE INDEX {ine}{} ON {t} (queue, next_attempt_at, id) WHERE acquired_token IS NOT NULL",
                self.index("_leased_idx")
            ),
            format!(
                "CREATE INDEX {ine}{} ON {t} (queue, ordering_key COLLATE \"C\", id)",
                self.index("_key_idx")
            ),
            // Optional (validation does not require it): what the overview
            // counts retrying rows with (`QueueOverview::retrying`).
            super::overview::retry_index_ddl(self, if_not_exists),
        ]
    }

    /// Creates whatever is missing (schema, table, the `ordering_key` column
    /// of a table created by faststream-outbox or an older version, indexes,
    /// the lease CHECK) and leaves what exists alone. Safe to run at every
    /// start and from several processes at once (serialized by an advisory
    /// lock).
    ///
    /// On an existing table without `<t>_retry_idx` this builds it, which
    /// blocks writes to the table while it reads the table once (about a
    /// second per million rows); on a large live table, create it first with
    /// `CREATE INDEX CONCURRENTLY` (the statement is in
    /// [`QueueOverview::retrying`](crate::ops::QueueOverview::retrying)).
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let mut stmts = self.name.migration(self.statements(true));
        // A table created before the CHECK existed gets it added.
        let ck_name = format!("{}_lease_ck", self.name.name);
        stmts.push(format!(
            "DO $outbox$ BEGIN\n\
             IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = {rel}::regclass AND contype = 'c' \
             AND (conname = {lit} OR pg_get_constraintdef(oid) = 'CHECK (((acquired_token IS NULL) = (acquired_at IS NULL)))')) THEN\n\
             ALTER TABLE {t} ADD CONSTRAINT {ck} CHECK ((acquired_token IS NULL) = (acquired_at IS NULL));\n\
             END IF;\n\
             END $outbox$",
            rel = ident::literal(&self.qualified_name()),
            lit = ident::literal(&ck_name),
            t = self.qualified_name(),
            ck = ident::quote(&ck_name),
        ));
        run_migration(pool, &self.qualified_name(), stmts).await
    }
}

/// The dead-letter table: where rows that failed for good are archived, with
/// the reason and the last error, atomically with their removal from the outbox.
///
/// ```
/// use outbox_core::DlqTable;
///
/// let dlq = DlqTable::new("outbox_dlq")?;
/// assert!(dlq.create_sql().contains(r#"CREATE INDEX "outbox_dlq_queue_failed_idx""#));
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqTable {
    name: TableName,
}

impl DlqTable {
    /// Defines the dead-letter table `name`.
    pub fn new(name: &str) -> Result<Self> {
        ident::validate("dead-letter table", name, &[], &DLQ_SUFFIXES)?;
        Ok(Self {
            name: TableName {
                schema: None,
                name: name.to_owned(),
            },
        })
    }

    /// Places the table in `schema`.
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        validate_schema(schema)?;
        self.name.schema = Some(schema.to_owned());
        Ok(self)
    }

    /// The unqualified table name.
    pub fn name(&self) -> &str {
        &self.name.name
    }

    /// The schema, if one was set.
    pub fn schema_name(&self) -> Option<&str> {
        self.name.schema.as_deref()
    }

    /// The quoted, schema-qualified name as it appears in SQL.
    pub fn qualified_name(&self) -> String {
        self.name.qualified()
    }

    /// The DDL creating the table and its `(queue, failed_at)` index.
    pub fn create_sql(&self) -> String {
        self.name.script(self.statements(false))
    }

    fn statements(&self, if_not_exists: bool) -> Vec<String> {
        let t = self.qualified_name();
        let ine = if if_not_exists { "IF NOT EXISTS " } else { "" };
        let n = &self.name.name;
        vec![
            format!(
                "CREATE TABLE {ine}{t} (\n\
                 \x20   id BIGSERIAL NOT NULL,\n\
                 \x20   original_id BIGINT NOT NULL,\n\
                 \x20   queue VARCHAR(255) NOT NULL,\n\
                 \x20   payload BYTEA NOT NULL,\n\
                 \x20   headers JSONB,\n\
                 \x20   deliveries_count BIGINT NOT NULL,\n\
                 \x20   created_at TIMESTAMP WITH TIME ZONE NOT NULL,\n\
                 \x20   failed_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,\n\
                 \x20   failure_reason VARCHAR(64) NOT NULL,\n\
                 \x20   last_exception VARCHAR,\n\
                 \x20   timer_id VARCHAR(255),\n\
                 \x20   ordering_key VARCHAR(255),\n\
                 \x20   CONSTRAINT {pk} PRIMARY KEY (id)\n\
                 )",
                pk = ident::quote(&format!("{n}_pkey")),
            ),
            format!(
                "CREATE INDEX {ine}{} ON {t} (queue, failed_at)",
                ident::quote(&format!("{n}_queue_failed_idx"))
            ),
        ]
    }

    /// Creates whatever is missing (the `ordering_key` column too);
    /// idempotent, like [`OutboxTable::migrate`].
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let stmts = self.name.migration(self.statements(true));
        run_migration(pool, &self.qualified_name(), stmts).await
    }
}

pub(crate) async fn run_migration(pool: &PgPool, lock_key: &str, stmts: Vec<String>) -> Result<()> {
    let mut tx = pool.begin().await?;
    // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in pg_type;
    // serialize migrations of the same table.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("outbox-migrate:{lock_key}"))
        .execute(&mut *tx)
        .await?;
    for stmt in stmts {
        // The statements are built from validated, quoted identifiers only.
        tx.execute(sqlx::AssertSqlSafe(stmt)).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_ddl_matches_the_reference_layout() {
        let sql = OutboxTable::new("outbox").expect("valid").create_sql();
        for col in OUTBOX_COLUMNS {
            assert!(sql.contains(&format!("    {col} ")), "missing column {col}");
        }
        assert!(sql.contains(
            r#"CREATE UNIQUE INDEX "outbox_timer_id_uq" ON "outbox" (queue, timer_id) WHERE timer_id IS NOT NULL"#
        ));
        assert!(sql.contains(
            r#"CREATE INDEX "outbox_pending_idx" ON "outbox" (queue, next_attempt_at, id) WHERE acquired_token IS NULL"#
        ));
        assert!(sql.contains(
            r#"CREATE INDEX "outbox_leased_idx" ON "outbox" (queue, next_attempt_at, id) WHERE acquired_token IS NOT NULL"#
        ));
        assert!(sql.contains(
            r#"CONSTRAINT "outbox_lease_ck" CHECK ((acquired_token IS NULL) = (acquired_at IS NULL))"#
        ));
    }

    #[test]
    fn dlq_ddl_has_twelve_columns() {
        let sql = DlqTable::new("outbox_dlq").expect("valid").create_sql();
        for col in DLQ_COLUMNS {
            assert!(sql.contains(&format!("    {col} ")), "missing column {col}");
        }
    }

    #[test]
    fn schema_is_quoted_and_qualified() {
        let t = OutboxTable::new("Out\"box")
            .expect("valid")
            .schema("my schema")
            .expect("valid");
        assert_eq!(t.qualified_name(), r#""my schema"."Out""box""#);
        assert!(
            t.create_sql()
                .starts_with(r#"CREATE SCHEMA IF NOT EXISTS "my schema";"#)
        );
    }

    #[test]
    fn names_are_validated_at_construction() {
        let err = OutboxTable::new("").unwrap_err().to_string();
        assert!(err.contains("must not be empty"), "{err}");
        let err = OutboxTable::new(&"t".repeat(52)).unwrap_err().to_string();
        assert!(err.contains("63 bytes"), "{err}");
        assert!(OutboxTable::new(&"t".repeat(51)).is_ok());
        // The DLQ's longest derived name is `<t>_queue_failed_idx` (17 extra bytes).
        assert!(DlqTable::new(&"d".repeat(46)).is_ok());
        assert!(DlqTable::new(&"d".repeat(47)).is_err());
        let err = OutboxTable::new("outbox")
            .expect("valid")
            .schema(&"s".repeat(64))
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema"), "{err}");
    }
}
