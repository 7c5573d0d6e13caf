//! The `outbox` binary end to end, against real PostgreSQL (each test in the
//! private schema of a `tests::TestDb`).

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use outbox_core::{Engine, Message, PublishOptions, Subscriber};
use serde_json::{Value, json};
use sqlx::types::Json;
use tests::{TestDb, database_url, wait_until};

type R = anyhow::Result<()>;

const BIN: &str = env!("CARGO_BIN_EXE_outbox");

/// Runs `outbox` with `args` (no stdin, no inherited DATABASE_URL).
async fn outbox(args: Vec<String>) -> anyhow::Result<Output> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    Ok(out)
}

/// `outbox --database-url … --schema <test schema> --table <test table> ARGS`
/// (the test's dead-letter table is `<table>_dlq`, the CLI's default).
async fn run(db: &TestDb, args: &[&str]) -> anyhow::Result<Output> {
    run_on(db, db.table.name(), args).await
}

/// `outbox` on another table of the test's schema.
async fn run_on(db: &TestDb, table: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut all = vec![
        "--database-url".to_owned(),
        database_url(),
        "--schema".to_owned(),
        db.schema.clone(),
        "--table".to_owned(),
        table.to_owned(),
    ];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    outbox(all).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Asserts success and parses stdout as one JSON document.
fn json_of(o: &Output) -> Value {
    assert_eq!(code(o), 0, "stderr: {}", stderr(o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", stdout(o)))
}

async fn dead_letter(
    db: &TestDb,
    original_id: i64,
    queue: &str,
    reason: &str,
) -> anyhow::Result<i64> {
    let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failure_reason, last_exception) VALUES ($1, $2, $3, $4, 3, now(), $5, 'Error: boom') RETURNING id",
        db.d()
    )))
    .bind(original_id)
    .bind(queue)
    .bind(serde_json::to_vec(&json!({ "n": original_id }))?)
    .bind(Json(json!({
        "content-type": "application/json",
        "correlation_id": format!("corr-{original_id}"),
    })))
    .bind(reason)
    .fetch_one(&db.pool)
    .await?;
    Ok(id)
}

/// `migrate --inbox` creates the consumers' inbox table in --schema (usable
/// by `outbox_core::inbox::Inbox` at once); `sql --inbox` prints its DDL.
#[tokio::test]
async fn migrate_creates_the_inbox_table_when_asked() -> R {
    let db = TestDb::new().await?;
    let o = run_on(&db, "ibx_outbox", &["sql", "--inbox", "ibx_inbox"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let ddl = format!(r#"CREATE TABLE "{}"."ibx_inbox" ("#, db.schema);
    assert!(stdout(&o).contains(&ddl), "{}", stdout(&o));
    let o = run_on(
        &db,
        "ibx_outbox",
        &["--json", "migrate", "--inbox", "ibx_inbox"],
    )
    .await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(
        v["inbox_table"],
        json!(format!(r#""{}"."ibx_inbox""#, db.schema)),
        "{v}"
    );
    let inbox = outbox_core::inbox::Inbox::new("ibx_inbox", "billing")?.schema(&db.schema)?;
    let mut tx = db.pool.begin().await?;
    assert!(inbox.accept(&mut *tx, "m-1").await?);
    assert!(!inbox.accept(&mut *tx, "m-1").await?);
    tx.commit().await?;
    // Without the flag, no inbox table; a bad name is a usage error.
    let o = run_on(&db, "ibx_outbox", &["migrate"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stdout(&o).contains("inbox"), "{}", stdout(&o));
    let o = run_on(&db, "ibx_outbox", &["migrate", "--inbox", ""]).await?;
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert!(stderr(&o).contains("inbox table"), "{}", stderr(&o));
    Ok(())
}

#[tokio::test]
async fn migrate_then_validate_and_drift_exits_3() -> R {
    let db = TestDb::new().await?;
    let fresh = |args: &'static [&'static str]| run_on(&db, "fresh", args);
    // Before migrate: a missing table is a schema problem, with the fix.
    let o = fresh(&["stats"]).await?;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert!(stderr(&o).contains("outbox migrate"), "{}", stderr(&o));

    let o = fresh(&["migrate"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains(r#"."fresh""#), "{}", stdout(&o));
    assert!(stdout(&o).contains(r#"."fresh_dlq""#), "{}", stdout(&o));
    let exists = db
        .scalar(format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = '{}' AND tablename IN ('fresh', 'fresh_dlq')",
            db.schema
        ))
        .await?;
    assert_eq!(exists, 2);
    // Idempotent.
    assert_eq!(code(&fresh(&["migrate"]).await?), 0);

    let o = fresh(&["validate"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("schema OK"), "{}", stdout(&o));
    assert_eq!(json_of(&fresh(&["--json", "validate"]).await?)["ok"], true);

    db.exec(format!(r#"DROP INDEX "{}"."fresh_pending_idx""#, db.schema))
        .await?;
    let o = fresh(&["validate"]).await?;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("acquired_token is null"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains(r#"CREATE INDEX "fresh_pending_idx""#),
        "the fix is printed: {}",
        stdout(&o)
    );
    let o = fresh(&["--json", "validate"]).await?;
    assert_eq!(code(&o), 3);
    let v: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 1);
    assert!(v["fix"].as_str().unwrap().contains("fresh_pending_idx"));

    // --autovacuum: the fresh table is not tuned; `outbox autovacuum`'s DDL fixes it.
    db.exec(format!(
        r#"CREATE INDEX "fresh_pending_idx" ON "{}"."fresh" (queue, next_attempt_at, id) WHERE acquired_token IS NULL"#,
        db.schema
    ))
    .await?;
    assert_eq!(code(&fresh(&["validate"]).await?), 0);
    let o = fresh(&["validate", "--autovacuum"]).await?;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("autovacuum_vacuum_scale_factor is unset"),
        "{}",
        stdout(&o)
    );
    let ddl = stdout(&fresh(&["autovacuum"]).await?);
    assert!(ddl.contains("ALTER TABLE"), "{ddl}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&db.pool)
        .await?;
    let o = fresh(&["validate", "--autovacuum"]).await?;
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    Ok(())
}

#[tokio::test]
async fn stats_match_a_known_table() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let b = &db.broker;
    let past = PublishOptions::new().activate_at(Utc::now() - chrono::Duration::seconds(300));
    b.publish_with(&1, "orders", &past, &mut conn).await?;
    b.publish(&2, "orders", &mut conn).await?;
    b.publish_with(
        &3,
        "orders",
        &PublishOptions::new().activate_in(Duration::from_secs(3600)),
        &mut conn,
    )
    .await?;
    let leased = b.publish(&4, "mail", &mut conn).await?;
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE id = {leased}",
        db.t()
    ))
    .await?;
    dead_letter(&db, 1, "orders", "rejected").await?;
    dead_letter(&db, 2, "billing", "retry_terminal").await?;

    let v = json_of(&run(&db, &["--json", "stats"]).await?);
    assert_eq!(v["table"], db.t());
    assert_eq!(v["dlq_table"], db.d());
    let q = v["queues"].as_array().unwrap();
    let names: Vec<&str> = q.iter().map(|x| x["queue"].as_str().unwrap()).collect();
    assert_eq!(names, ["billing", "mail", "orders"]);
    let orders = &q[2];
    assert_eq!(
        (
            &orders["ready"],
            &orders["leased"],
            &orders["scheduled"],
            &orders["dead_letters"]
        ),
        (&json!(2), &json!(0), &json!(1), &json!(1))
    );
    let age = orders["oldest_ready_age_seconds"].as_f64().unwrap();
    assert!((299.0..400.0).contains(&age), "{age}");
    assert_eq!(q[1]["leased"], 1);
    assert_eq!(q[1]["oldest_ready_age_seconds"], Value::Null);
    assert_eq!(q[0]["dead_letters"], 1);

    let v = json_of(
        &run(
            &db,
            &["--json", "stats", "--queue", "orders", "--queue", "none"],
        )
        .await?,
    );
    let names: Vec<&str> = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["none", "orders"]);

    let o = run(&db, &["stats"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let line = text.lines().find(|l| l.starts_with("orders")).unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[..4], ["orders", "2", "0", "1"], "{text}");
    assert!(cols[4].starts_with('5') && cols[4].contains('m'), "{text}");
    assert_eq!(cols[5], "1", "{text}");
    assert!(text.contains("(total)"), "{text}");
    Ok(())
}

/// The operator's path: list the dead letters, replay three by id, and a
/// running subscriber handles them with their original payload and
/// correlation id.
#[tokio::test]
async fn dlq_replay_is_delivered_by_a_running_subscriber() -> R {
    let db = TestDb::new().await?;
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(dead_letter(&db, 100 + n, "orders", "retry_terminal").await?);
    }
    dead_letter(&db, 999, "other", "rejected").await?; // not replayed
    let seen: Arc<Mutex<Vec<(Value, String, String)>>> = Arc::default();
    let s = seen.clone();
    let sub = Subscriber::builder(["orders"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .build(move |m: Message| {
            s.lock().unwrap().push((
                m.decode().unwrap(),
                m.correlation_id(),
                m.header("x-outbox-replayed-from").unwrap_or("").to_owned(),
            ));
            async {}
        })?;
    let engine = Engine::new(db.broker.clone()).subscriber(sub);
    engine.start().await?;

    let list = json_of(&run(&db, &["--json", "dlq", "list", "--queue", "orders"]).await?);
    let listed: Vec<i64> = list["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(list["dead_letters"][0]["body"], json!({"n": 101}));
    assert_eq!(list["dead_letters"][0]["last_exception"], "Error: boom");

    let id_list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let o = run(&db, &["dlq", "replay", "--ids", &id_list]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("replayed 3 dead letter(s)"),
        "{}",
        stdout(&o)
    );

    assert!(
        wait_until(Duration::from_secs(10), || async {
            seen.lock().unwrap().len() == 3
        })
        .await
    );
    engine.stop().await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    for (i, (body, corr, from)) in seen.iter().enumerate() {
        let original = 101 + i64::try_from(i)?;
        assert_eq!(*body, json!({ "n": original }));
        assert_eq!(*corr, format!("corr-{original}"));
        assert_eq!(*from, original.to_string());
    }
    assert_eq!(
        db.dlq_count().await?,
        1,
        "only the other queue's dead letter is left"
    );
    Ok(())
}

#[tokio::test]
async fn dlq_replay_dry_run_and_refusals() -> R {
    let db = TestDb::new().await?;
    dead_letter(&db, 1, "orders", "rejected").await?;
    dead_letter(&db, 2, "orders", "rejected").await?;
    let v = json_of(
        &run(
            &db,
            &["--json", "dlq", "replay", "--queue", "orders", "--dry-run"],
        )
        .await?,
    );
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["replayed"].as_array().unwrap().len(), 2);
    assert_eq!(db.dlq_count().await?, 2);
    assert_eq!(db.count().await?, 0);

    // No selection, or --all with a filter: usage errors.
    let o = run(&db, &["dlq", "replay"]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = run(&db, &["dlq", "replay", "--all", "--queue", "orders"]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = run(&db, &["dlq", "replay", "--limit", "1"]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(db.dlq_count().await?, 2);

    let o = run(&db, &["dlq", "replay", "--all", "--limit", "1"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(db.dlq_count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn dlq_purge_with_filters() -> R {
    let db = TestDb::new().await?;
    dead_letter(&db, 1, "orders", "rejected").await?;
    dead_letter(&db, 2, "orders", "retry_terminal").await?;
    let mail = dead_letter(&db, 3, "mail", "rejected").await?;
    dead_letter(&db, 4, "bulk", "rejected").await?;
    dead_letter(&db, 5, "bulk", "rejected").await?;

    // No terminal and no --yes: refused, nothing deleted.
    let o = run(&db, &["dlq", "purge", "--queue", "orders"]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    assert_eq!(db.dlq_count().await?, 5);
    // No filter at all: usage error.
    assert_eq!(code(&run(&db, &["dlq", "purge", "--yes"]).await?), 2);

    let o = run(
        &db,
        &[
            "dlq", "purge", "--queue", "orders", "--reason", "rejected", "--yes",
        ],
    )
    .await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("purged 1 dead letter(s)"),
        "{}",
        stdout(&o)
    );
    assert_eq!(db.dlq_count().await?, 4);

    let v = json_of(
        &run(
            &db,
            &[
                "--json",
                "dlq",
                "purge",
                "--ids",
                &mail.to_string(),
                "--yes",
            ],
        )
        .await?,
    );
    assert_eq!(v["purged"], 1);
    let v = json_of(
        &run(
            &db,
            &[
                "--json", "dlq", "purge", "--queue", "bulk", "--limit", "1", "-y",
            ],
        )
        .await?,
    );
    assert_eq!(v["purged"], 1);
    let o = run(&db, &["dlq", "purge", "--queue", "nothing", "--yes"]).await?;
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("nothing purged"), "{}", stdout(&o));
    assert_eq!(db.dlq_count().await?, 2);
    let v = json_of(&run(&db, &["--json", "dlq", "purge", "--all", "--yes"]).await?);
    assert_eq!(v["purged"], 2);
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn every_read_command_prints_one_json_document() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    db.broker
        .publish_with(
            &json!({"order": 7}),
            "orders",
            &PublishOptions::new().correlation_id("req-7").key("order-7"),
            &mut conn,
        )
        .await?;
    db.broker
        .publish(&"plain text", "orders", &mut conn)
        .await?;
    let dl = dead_letter(&db, 1, "orders", "rejected").await?;

    let v = json_of(&run(&db, &["--json", "peek", "orders"]).await?);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["body"], json!({"order": 7}));
    assert_eq!(rows[0]["correlation_id"], "req-7");
    assert_eq!(rows[0]["state"], "ready");
    assert_eq!(rows[0]["headers"]["content-type"], "application/json");
    assert_eq!(rows[0]["ordering_key"], "order-7");
    assert_eq!(rows[1]["body"], "plain text");
    assert_eq!(rows[1]["ordering_key"], Value::Null);
    assert_eq!(
        db.count().await?,
        2,
        "peek leases nothing and deletes nothing"
    );
    let leased = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
            db.t()
        ))
        .await?;
    assert_eq!(leased, 0);

    let v = json_of(&run(&db, &["--json", "dlq", "show", &dl.to_string()]).await?);
    assert_eq!(v["id"], dl);
    assert_eq!(v["original_id"], 1);
    assert_eq!(v["failure_reason"], "rejected");
    assert_eq!(v["correlation_id"], "corr-1");
    for args in [
        &["--json", "stats"][..],
        &["--json", "dlq", "list"],
        &[
            "--json", "dlq", "list", "--since", "1h", "--reason", "rejected",
        ],
        &["--json", "validate"],
        &["--json", "sql"],
        &["--json", "autovacuum"],
        &["--json", "migrate"],
    ] {
        let v = json_of(&run(&db, args).await?);
        assert!(v.is_object(), "{args:?}: {v}");
    }

    // And the text views show the decoded content.
    let o = run(&db, &["peek", "orders", "--limit", "1"]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("\"order\": 7"), "{}", stdout(&o));
    assert!(stdout(&o).contains("key \"order-7\""), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("correlation_id: req-7"),
        "{}",
        stdout(&o)
    );
    let o = run(&db, &["dlq", "show", &dl.to_string()]).await?;
    assert!(stdout(&o).contains("Error: boom"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!("outbox dlq replay --ids {dl}")),
        "{}",
        stdout(&o)
    );
    Ok(())
}

#[tokio::test]
async fn errors_name_the_problem_and_map_to_exit_codes() -> R {
    let db = TestDb::new().await?;
    // Nothing listens on port 1.
    let o = outbox(vec![
        "--database-url".into(),
        "postgres://postgres@127.0.0.1:1/outbox_test".into(),
        "stats".into(),
    ])
    .await?;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.contains("PostgreSQL is running"), "{err}");

    let mut url = database_url();
    if let Some(i) = url.rfind('/') {
        url.truncate(i);
    }
    let o = outbox(vec![
        "--database-url".into(),
        format!("{url}/no_such_db_for_outbox_cli"),
        "stats".into(),
    ])
    .await?;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));

    let o = outbox(vec![
        "--database-url".into(),
        "not a url".into(),
        "stats".into(),
    ])
    .await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = outbox(vec!["stats".into()]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("DATABASE_URL"), "{}", stderr(&o));

    // A missing table suggests migrate.
    let o = run_on(&db, "nope", &["peek", "q"]).await?;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("outbox migrate"), "{}", stderr(&o));
    let o = run(&db, &["--dlq-table", "nope_dlq", "dlq", "list"]).await?;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("nope_dlq"), "{}", stderr(&o));
    let o = run(&db, &["--no-dlq", "dlq", "list"]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));

    let o = run(&db, &["dlq", "show", "123456"]).await?;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no dead letter with id 123456"),
        "{}",
        stderr(&o)
    );
    let o = run(&db, &["dlq", "list", "--since", "yesterday"]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = run(&db, &["dlq", "list", "--queue", ""]).await?;
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = run(&db, &["bogus"]).await?;
    assert_eq!(code(&o), 2);
    Ok(())
}

#[tokio::test]
async fn sql_and_autovacuum_need_no_database() -> R {
    let o = outbox(vec!["--schema".into(), "app".into(), "sql".into()]).await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains(r#"CREATE TABLE "app"."outbox""#));
    assert!(stdout(&o).contains(r#"CREATE TABLE "app"."outbox_dlq""#));
    let o = outbox(vec!["--no-dlq".into(), "sql".into()]).await?;
    assert!(!stdout(&o).contains("outbox_dlq"));
    let o = outbox(vec![
        "autovacuum".into(),
        "--threshold".into(),
        "5000".into(),
        "--cost-delay".into(),
        "0".into(),
    ])
    .await?;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        r#"ALTER TABLE "outbox" SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000, autovacuum_vacuum_cost_delay = 0);"#
    );
    let o = outbox(vec!["--help".into()]).await?;
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("Exit codes:"), "{}", stdout(&o));
    Ok(())
}
