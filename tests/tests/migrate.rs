//! `migrate()` and `create_sql()` against real PostgreSQL.

#![allow(clippy::unwrap_used)]

use outbox_core::{DlqTable, OutboxBroker, OutboxTable};
use sqlx::{Executor, PgPool};
use tests::{TestDb, suffix};

type R = anyhow::Result<()>;

/// Columns, indexes and constraints of a table, with the schema name erased.
async fn catalog(pool: &PgPool, schema: &str, table: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    type Col = (String, String, Option<i32>, String, Option<String>);
    let cols: Vec<Col> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, character_maximum_length::int4, is_nullable::text, column_default::text \
         FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?;
    out.extend(cols.into_iter().map(|c| format!("col {c:?}")));
    let idx: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2 ORDER BY indexname",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?;
    out.extend(idx.into_iter().map(|i| format!("idx {i:?}")));
    let cons: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.conname::text, pg_get_constraintdef(c.oid) FROM pg_constraint c \
         JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
         WHERE n.nspname = $1 AND t.relname = $2 ORDER BY c.conname",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?;
    out.extend(cons.into_iter().map(|c| format!("con {c:?}")));
    Ok(out
        .into_iter()
        .map(|s| s.replace(schema, "<schema>"))
        .collect())
}

#[tokio::test]
async fn migrate_matches_create_sql_and_is_idempotent() -> R {
    let db = TestDb::new().await?;
    let name = db.table.name().to_owned();
    let dlq_name = db.dlq.name().to_owned();
    let migrated = catalog(&db.pool, &db.schema, &name).await?;
    assert_eq!(migrated.iter().filter(|l| l.starts_with("col")).count(), 14);
    assert_eq!(
        migrated.iter().filter(|l| l.starts_with("idx")).count(),
        6,
        "pkey + 4 partial indexes (pending, leased, timer id, retry) + the key index: {migrated:#?}"
    );
    let dlq_migrated = catalog(&db.pool, &db.schema, &dlq_name).await?;

    // The same table built from create_sql() in another schema.
    let other = format!("c_{}", suffix());
    let table = OutboxTable::new(&name)?.schema(&other)?;
    let dlq = DlqTable::new(&dlq_name)?.schema(&other)?;
    db.pool
        .execute(sqlx::AssertSqlSafe(table.create_sql() + &dlq.create_sql()))
        .await?;
    let from_ddl = catalog(&db.pool, &other, &name).await?;
    let dlq_from_ddl = catalog(&db.pool, &other, &dlq_name).await?;
    db.exec(format!("DROP SCHEMA \"{other}\" CASCADE")).await?;
    assert_eq!(migrated, from_ddl);
    assert_eq!(dlq_migrated, dlq_from_ddl);

    // Twice is a no-op, and keeps data.
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, "q", &mut conn).await?;
    db.broker.migrate().await?;
    db.broker.migrate().await?;
    assert_eq!(catalog(&db.pool, &db.schema, &name).await?, migrated);
    assert_eq!(db.count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn migrate_adds_the_ordering_key_to_a_faststream_outbox_table() -> R {
    let db = TestDb::new().await?;
    let name = db.table.name().to_owned();
    let dlq_name = db.dlq.name().to_owned();
    let want = catalog(&db.pool, &db.schema, &name).await?;
    let want_dlq = catalog(&db.pool, &db.schema, &dlq_name).await?;
    // The tables as faststream-outbox 0.19 creates them: no ordering_key,
    // no key index, no retry index; one of its rows.
    for stmt in [
        format!("DROP INDEX \"{}\".\"{name}_key_idx\"", db.schema),
        format!("DROP INDEX \"{}\".\"{name}_retry_idx\"", db.schema),
        format!("ALTER TABLE {} DROP COLUMN ordering_key", db.t()),
        format!("ALTER TABLE {} DROP COLUMN ordering_key", db.d()),
        format!(
            "INSERT INTO {} (queue, payload, headers) VALUES ('q', '1', '{{}}')",
            db.t()
        ),
    ] {
        db.exec(stmt).await?;
    }
    let err = db.broker.validate_schema().await.unwrap_err().to_string();
    assert!(
        err.contains("has no column ordering_key") && err.contains("_key_idx"),
        "{err}"
    );
    db.broker.migrate().await?;
    assert_eq!(catalog(&db.pool, &db.schema, &name).await?, want);
    assert_eq!(catalog(&db.pool, &db.schema, &dlq_name).await?, want_dlq);
    db.broker.validate_schema().await?;
    let keys: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT ordering_key FROM {}",
        db.t()
    )))
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(keys, [None], "the old row is kept, without a key");
    Ok(())
}

#[tokio::test]
async fn migrate_recreates_what_is_missing() -> R {
    let db = TestDb::new().await?;
    let name = db.table.name().to_owned();
    let before = catalog(&db.pool, &db.schema, &name).await?;
    db.exec(format!(
        "DROP INDEX \"{s}\".\"{name}_pending_idx\"",
        s = db.schema
    ))
    .await?;
    db.exec(format!(
        "ALTER TABLE {t} DROP CONSTRAINT \"{name}_lease_ck\"",
        t = db.t()
    ))
    .await?;
    assert_ne!(catalog(&db.pool, &db.schema, &name).await?, before);
    db.broker.migrate().await?;
    assert_eq!(catalog(&db.pool, &db.schema, &name).await?, before);
    Ok(())
}

#[tokio::test]
async fn migrate_keeps_a_lease_check_under_another_name() -> R {
    let db = TestDb::new().await?;
    let name = db.table.name().to_owned();
    db.exec(format!(
        "ALTER TABLE {t} RENAME CONSTRAINT \"{name}_lease_ck\" TO \"ck_custom_lease\"",
        t = db.t()
    ))
    .await?;
    db.broker.migrate().await?;
    let checks = db
        .scalar(format!(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = '{}'::regclass AND contype = 'c'",
            db.t().replace('\'', "''")
        ))
        .await?;
    assert_eq!(checks, 1, "no duplicate CHECK added");
    Ok(())
}

#[tokio::test]
async fn concurrent_migrations_do_not_collide() -> R {
    let db = TestDb::new().await?;
    let fresh = OutboxTable::new(&format!("cc_{}", suffix()))?.schema(&db.schema)?;
    let broker = OutboxBroker::new(db.pool.clone(), fresh.clone());
    let runs = (0..4).map(|_| {
        let b = broker.clone();
        tokio::spawn(async move { b.migrate().await })
    });
    for r in futures_util::future::join_all(runs).await {
        r??;
    }
    Ok(())
}

#[tokio::test]
async fn the_lease_check_rejects_a_half_set_lease() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "q", &mut conn).await?;
    let res = db
        .exec(format!(
            "UPDATE {} SET acquired_at = now() WHERE id = {id}",
            db.t()
        ))
        .await;
    let err = res.unwrap_err().to_string();
    assert!(err.contains("lease_ck"), "{err}");
    Ok(())
}
