//! `validate_schema()` against real PostgreSQL: every kind of drift is
//! reported, extras are accepted, and the printed fix repairs the table.

#![allow(clippy::unwrap_used)]

use outbox_core::{DlqTable, Error, OutboxBroker, OutboxTable, SchemaChecks};
use tests::{TestDb, suffix};

type R = anyhow::Result<()>;

async fn drift(b: &OutboxBroker) -> outbox_core::SchemaDrift {
    drift_with(b, SchemaChecks::new()).await
}

async fn drift_with(b: &OutboxBroker, checks: SchemaChecks) -> outbox_core::SchemaDrift {
    match b.validate_schema_with(checks).await {
        Err(Error::SchemaDrift(d)) => d,
        other => panic!("expected a schema drift, got {other:?}"),
    }
}

/// Applies the printed fix and checks the table is then accepted.
async fn fix_and_recheck(db: &TestDb, d: &outbox_core::SchemaDrift) -> anyhow::Result<()> {
    fix_and_recheck_with(db, d, SchemaChecks::new()).await
}

async fn fix_and_recheck_with(
    db: &TestDb,
    d: &outbox_core::SchemaDrift,
    checks: SchemaChecks,
) -> anyhow::Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(d.fix.clone()))
        .execute(&db.pool)
        .await?;
    db.broker.validate_schema_with(checks).await?;
    Ok(())
}

#[tokio::test]
async fn a_migrated_schema_passes_and_extras_are_fine() -> R {
    let db = TestDb::new().await?;
    db.broker.validate_schema().await?;
    db.exec(format!("ALTER TABLE {} ADD COLUMN tenant TEXT", db.t()))
        .await?;
    db.exec(format!(
        "CREATE INDEX extra_{} ON {} (created_at)",
        suffix(),
        db.t()
    ))
    .await?;
    db.broker.validate_schema().await?;
    // The lease CHECK is matched by its predicate, under any name.
    db.exec(format!(
        "ALTER TABLE {} RENAME CONSTRAINT \"{}_lease_ck\" TO \"ck_custom\"",
        db.t(),
        db.table.name()
    ))
    .await?;
    db.broker.validate_schema().await?;
    Ok(())
}

#[tokio::test]
async fn missing_tables_are_reported_with_their_ddl() -> R {
    let db = TestDb::new().await?;
    let ghost = OutboxBroker::new(
        db.pool.clone(),
        OutboxTable::new("ghost")?.schema(&db.schema)?,
    )
    .dead_letter_table(DlqTable::new("ghost_dlq")?.schema(&db.schema)?);
    let d = drift(&ghost).await;
    assert_eq!(d.problems.len(), 2, "{d}");
    assert!(
        d.problems[0].contains("outbox table") && d.problems[0].contains("does not exist"),
        "{d}"
    );
    assert!(d.problems[1].contains("dead-letter table"), "{d}");
    assert!(
        d.fix.contains("CREATE TABLE") && d.fix.contains("_pending_idx"),
        "{d}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(d.fix.clone()))
        .execute(&db.pool)
        .await?;
    ghost.validate_schema().await?;
    Ok(())
}

#[tokio::test]
async fn index_drift_is_detected_and_fixed() -> R {
    let db = TestDb::new().await?;
    let (s, n, t) = (&db.schema, db.table.name(), db.t());
    db.exec(format!("DROP INDEX \"{s}\".\"{n}_pending_idx\""))
        .await?;
    db.exec(format!("DROP INDEX \"{s}\".\"{n}_leased_idx\""))
        .await?;
    db.exec(format!(
        "CREATE INDEX \"{n}_leased_idx\" ON {t} (queue, next_attempt_at, id) WHERE acquired_at IS NOT NULL"
    ))
    .await?;
    db.exec(format!("DROP INDEX \"{s}\".\"{n}_timer_id_uq\""))
        .await?;
    db.exec(format!(
        "CREATE INDEX \"{n}_timer_id_uq\" ON {t} (queue, timer_id) WHERE timer_id IS NOT NULL"
    ))
    .await?;
    let d = drift(&db.broker).await;
    let all = d.problems.join("\n");
    assert_eq!(d.problems.len(), 3, "{d}");
    assert!(
        all.contains(
            "missing an index on (queue, next_attempt_at, id) WHERE acquired_token is null"
        ),
        "{d}"
    );
    assert!(
        all.contains("has predicate \"acquired_at is not null\""),
        "{d}"
    );
    assert!(all.contains("is not UNIQUE"), "{d}");
    fix_and_recheck(&db, &d).await
}

#[tokio::test]
async fn a_non_partial_index_is_not_accepted() -> R {
    let db = TestDb::new().await?;
    let (s, n, t) = (&db.schema, db.table.name(), db.t());
    db.exec(format!("DROP INDEX \"{s}\".\"{n}_pending_idx\""))
        .await?;
    db.exec(format!(
        "CREATE INDEX \"{n}_pending_idx\" ON {t} (queue, next_attempt_at, id)"
    ))
    .await?;
    let d = drift(&db.broker).await;
    assert!(
        d.problems[0].contains("predicate \"none (not partial)\""),
        "{d}"
    );
    fix_and_recheck(&db, &d).await
}

#[tokio::test]
async fn column_and_check_drift_is_detected_and_fixed() -> R {
    let db = TestDb::new().await?;
    let t = db.t();
    db.exec(format!(
        "ALTER TABLE {t} DROP CONSTRAINT \"{}_lease_ck\"",
        db.table.name()
    ))
    .await?;
    db.exec(format!("ALTER TABLE {t} DROP COLUMN timer_id"))
        .await?;
    db.exec(format!("ALTER TABLE {t} ALTER COLUMN queue TYPE TEXT"))
        .await?;
    db.exec(format!("ALTER TABLE {t} ALTER COLUMN headers SET NOT NULL"))
        .await?;
    db.exec(format!(
        "ALTER TABLE {t} ALTER COLUMN next_attempt_at DROP DEFAULT"
    ))
    .await?;
    let d = drift(&db.broker).await;
    let all = d.problems.join("\n");
    assert!(all.contains("has no column timer_id"), "{d}");
    assert!(
        all.contains("column queue is text, expected character varying(255)"),
        "{d}"
    );
    assert!(
        all.contains("column headers is NOT NULL, expected nullable"),
        "{d}"
    );
    assert!(all.contains("column next_attempt_at has no default"), "{d}");
    assert!(all.contains("no CHECK enforcing"), "{d}");
    // Dropping timer_id also dropped the unique timer index.
    assert!(all.contains("unique index on (queue, timer_id)"), "{d}");
    assert_eq!(d.problems.len(), 6, "{d}");
    fix_and_recheck(&db, &d).await
}

#[tokio::test]
async fn the_dead_letter_table_is_checked_too() -> R {
    let db = TestDb::new().await?;
    db.exec(format!("ALTER TABLE {} DROP COLUMN failure_reason", db.d()))
        .await?;
    let d = drift(&db.broker).await;
    assert_eq!(d.problems.len(), 1, "{d}");
    assert!(
        d.problems[0].contains("dead-letter table") && d.problems[0].contains("failure_reason"),
        "{d}"
    );
    assert!(d.to_string().starts_with("outbox schema mismatch:"), "{d}");
    Ok(())
}

/// `SchemaChecks::autovacuum` (faststream-outbox's `check_autovacuum`):
/// an untuned table is drift, with `autovacuum_sql` as the fix; any
/// threshold is fine once the scale factors are 0; the default check ignores
/// autovacuum entirely.
#[tokio::test]
async fn autovacuum_tuning_is_checked_on_request() -> R {
    let db = TestDb::new().await?;
    let with_av = SchemaChecks::new().autovacuum(true);
    // A fresh table has PostgreSQL's defaults: fine for the structure…
    db.broker.validate_schema().await?;
    // …but not tuned.
    let d = drift_with(&db.broker, with_av).await;
    assert_eq!(d.problems.len(), 4, "{d}");
    assert!(
        d.problems[0].contains("autovacuum not tuned")
            && d.problems[0].contains("autovacuum_vacuum_scale_factor is unset (want 0)"),
        "{d}"
    );
    let expected_fix = format!(
        "{};",
        outbox_core::ops::autovacuum_sql(&db.table, Default::default())
    );
    assert_eq!(d.fix, expected_fix);
    fix_and_recheck_with(&db, &d, with_av).await?;

    // Custom thresholds are fine; a non-zero scale factor or a disabled
    // autovacuum is not.
    db.exec(format!(
        "ALTER TABLE {} SET (autovacuum_vacuum_threshold = 5000, \
         autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_enabled = false)",
        db.t()
    ))
    .await?;
    let d = drift_with(&db.broker, with_av).await;
    assert_eq!(d.problems.len(), 2, "{d}");
    assert!(
        d.problems[0].contains("autovacuum is disabled on it"),
        "{d}"
    );
    assert!(
        d.problems[1].contains("autovacuum_vacuum_insert_scale_factor is 0.05, not 0"),
        "{d}"
    );
    assert!(d.fix.contains("RESET (autovacuum_enabled)"), "{d}");
    fix_and_recheck_with(&db, &d, with_av).await?;
    // Without the option, an untuned table passes.
    db.exec(format!(
        "ALTER TABLE {} RESET (autovacuum_vacuum_scale_factor)",
        db.t()
    ))
    .await?;
    db.broker.validate_schema().await?;
    assert!(db.broker.validate_schema_with(with_av).await.is_err());

    // Structure and autovacuum problems are reported together.
    db.exec(format!(
        "DROP INDEX \"{}\".\"{}_leased_idx\"",
        db.schema,
        db.table.name()
    ))
    .await?;
    let d = drift_with(&db.broker, with_av).await;
    assert_eq!(d.problems.len(), 2, "{d}");
    fix_and_recheck_with(&db, &d, with_av).await
}

#[tokio::test]
async fn the_app_can_refuse_to_start_on_drift() -> R {
    use outbox_core::{App, Message, Route};
    let db = TestDb::new().await?;
    db.exec(format!(
        "DROP INDEX \"{}\".\"{}_leased_idx\"",
        db.schema,
        db.table.name()
    ))
    .await?;
    let err = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .validate_schema_at_startup()
        .subscriber(Route::builder(["q"]).handler(|_m: Message, _c| async {}))
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaDrift(_)), "{err}");
    assert!(
        err.to_string().contains("acquired_token IS NOT NULL"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn the_app_can_refuse_to_start_on_untuned_autovacuum() -> R {
    use outbox_core::{App, Message, Route};
    let db = TestDb::new().await?;
    let err = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .validate_schema_at_startup_with(SchemaChecks::new().autovacuum(true))
        .subscriber(Route::builder(["q"]).handler(|_m: Message, _c| async {}))
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaDrift(_)), "{err}");
    assert!(err.to_string().contains("autovacuum not tuned"), "{err}");
    // Nothing was consumed or changed: the table is still untuned.
    assert!(
        db.broker
            .validate_schema_with(SchemaChecks::new().autovacuum(true))
            .await
            .is_err()
    );
    Ok(())
}
