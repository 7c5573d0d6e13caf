//! The dashboard's queries (`outbox_core::ops` overview, table activity,
//! connections, row lookup) against real PostgreSQL: exact counts per
//! category on a known table, the cap (lower bound plus the planner's
//! estimate), the optional retry index, lookups in both tables, a running
//! engine's connections, the statistics moving, and the plans of the
//! overview's statements on 1,000,000 rows (no sequential scan).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outbox_core::ops::{
    Count, FIND_ROWS_LIMIT, OverviewOptions, QueueOverview, ROW_PAYLOAD_LIMIT, RowLookup, RowState,
};
use outbox_core::{Engine, Error, Message, Subscriber};
use serde_json::json;
use sqlx::types::Json;
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;

/// Inserts one outbox row of `queue`: due `due_in` seconds from now
/// (negative: in the past), with `attempts` recorded attempts, leased
/// `leased_ago` seconds ago if given; correlation id `corr`. Returns its id.
async fn row(
    db: &TestDb,
    queue: &str,
    due_in: f64,
    attempts: i64,
    leased_ago: Option<f64>,
    corr: &str,
) -> anyhow::Result<i64> {
    let id = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (queue, payload, headers, attempts_count, next_attempt_at, acquired_at, acquired_token) \
         VALUES ($1, '\\x7b7d', $2, $3, now() + make_interval(secs => $4), \
         now() - make_interval(secs => $5), CASE WHEN $5 IS NULL THEN NULL ELSE gen_random_uuid() END) \
         RETURNING id",
        db.t()
    )))
    .bind(queue)
    .bind(Json(json!({ "correlation_id": corr })))
    .bind(attempts)
    .bind(due_in)
    .bind(leased_ago)
    .fetch_one(&db.pool)
    .await?;
    Ok(id)
}

/// Inserts `n` dead letters of `queue` (original ids from `first`,
/// correlation ids `corr-<original id>`). Returns the first one's id.
async fn dead_letters(db: &TestDb, queue: &str, first: i64, n: i64) -> anyhow::Result<i64> {
    let id = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failure_reason, last_exception) \
         SELECT g, $1, '\\x7b7d', jsonb_build_object('correlation_id', 'corr-' || g), 3, \
         now() - interval '1 hour', 'rejected', 'boom' FROM generate_series($2::int8, $2 + $3 - 1) g \
         ORDER BY g RETURNING id",
        db.d()
    )))
    .bind(queue)
    .bind(first)
    .bind(n)
    .fetch_all(&db.pool)
    .await?;
    id.first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no dead letter inserted"))
}

fn by_name<'a>(all: &'a [QueueOverview], queue: &str) -> &'a QueueOverview {
    all.iter()
        .find(|q| q.queue == queue)
        .unwrap_or_else(|| panic!("queue {queue} missing from {all:#?}"))
}

fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(-1.0)
}

#[tokio::test]
async fn counts_are_exact_per_category() -> R {
    let db = TestDb::new().await?;
    // Queue a: 3 fresh ready rows (the oldest due 60 s ago), 2 ready retries,
    // 4 scheduled rows of which 1 a retry, 2 leased (30 s and 5 s ago).
    row(&db, "a", -60.0, 0, None, "a1").await?;
    row(&db, "a", -10.0, 0, None, "a2").await?;
    row(&db, "a", -1.0, 0, None, "a3").await?;
    row(&db, "a", -20.0, 2, None, "a4").await?;
    row(&db, "a", -5.0, 1, None, "a5").await?;
    for i in 0..3 {
        row(&db, "a", 3600.0, 0, None, &format!("s{i}")).await?;
    }
    row(&db, "a", 600.0, 3, None, "s3").await?;
    row(&db, "a", -100.0, 0, Some(30.0), "l1").await?;
    row(&db, "a", -50.0, 1, Some(5.0), "l2").await?;
    // Queue b: dead letters only; c: configured, empty; d: scheduled only.
    dead_letters(&db, "b", 1000, 3).await?;
    dead_letters(&db, "a", 2000, 1).await?;
    row(&db, "d", 30.0, 0, None, "d1").await?;

    let all = db
        .broker
        .overview(&OverviewOptions::new().queues(["c", "a"]))
        .await?;
    let names: Vec<&str> = all.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);

    let a = by_name(&all, "a");
    assert_eq!(a.ready, Count::Exact(5));
    assert_eq!(a.scheduled, Count::Exact(4));
    assert_eq!(a.leased, Count::Exact(2));
    assert_eq!(a.retrying, Count::Exact(3), "2 ready + 1 scheduled retries");
    assert_eq!(a.dead_letters, Count::Exact(1));
    // Ages from the rows' timestamps (the statement's now() is after the inserts).
    let ready_age = secs(a.oldest_ready_age);
    assert!((60.0..90.0).contains(&ready_age), "{ready_age}");
    let lease_age = secs(a.oldest_lease_age);
    assert!((30.0..60.0).contains(&lease_age), "{lease_age}");

    let b = by_name(&all, "b");
    assert_eq!(b.dead_letters, Count::Exact(3));
    assert_eq!(
        (b.ready, b.scheduled, b.leased, b.retrying),
        (
            Count::Exact(0),
            Count::Exact(0),
            Count::Exact(0),
            Count::Exact(0)
        )
    );
    assert_eq!((b.oldest_ready_age, b.oldest_lease_age), (None, None));
    let c = by_name(&all, "c");
    assert_eq!(
        (c.ready, c.dead_letters),
        (Count::Exact(0), Count::Exact(0))
    );
    let d = by_name(&all, "d");
    assert_eq!((d.ready, d.scheduled), (Count::Exact(0), Count::Exact(1)));
    assert_eq!(d.oldest_ready_age, None, "a scheduled row is not ready");

    // The same figures as the exact statistics.
    for s in db.broker.stats().await? {
        let o = by_name(&all, &s.queue);
        assert_eq!(o.ready, Count::Exact(s.ready), "{}", s.queue);
        assert_eq!(o.scheduled, Count::Exact(s.scheduled), "{}", s.queue);
        assert_eq!(o.leased, Count::Exact(s.leased), "{}", s.queue);
        assert_eq!(o.dead_letters, Count::Exact(s.dead_letters), "{}", s.queue);
    }

    // Bad options are refused before any statement.
    let err = db
        .broker
        .overview(&OverviewOptions::new().cap(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("cap must be >= 1"), "{err}");
    let err = db
        .broker
        .overview(&OverviewOptions::new().queues([""]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn counts_over_the_cap_are_lower_bounds_with_the_planners_estimate() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "INSERT INTO {} (queue, payload, next_attempt_at) \
         SELECT CASE WHEN g <= 500 THEN 'big' ELSE 'small' END, '\\x00', now() - interval '1 minute' \
         FROM generate_series(1, 503) g",
        db.t()
    ))
    .await?;
    dead_letters(&db, "big", 1, 150).await?;
    db.exec(format!("ANALYZE {}", db.t())).await?;
    db.exec(format!("ANALYZE {}", db.d())).await?;

    let all = db.broker.overview(&OverviewOptions::new().cap(100)).await?;
    let big = by_name(&all, "big");
    match big.ready {
        Count::AtLeast {
            cap: 100,
            estimate: Some(e),
        } => assert!((300..=1000).contains(&e), "estimate {e} for 500 rows"),
        other => panic!("expected AtLeast with an estimate, got {other:?}"),
    }
    assert_eq!(big.ready.lower_bound(), Some(101));
    assert!(
        big.ready.to_string().starts_with("100+ (≈"),
        "{}",
        big.ready
    );
    match big.dead_letters {
        Count::AtLeast {
            cap: 100,
            estimate: Some(e),
        } => assert!(
            (120..=300).contains(&e),
            "estimate {e} for 150 dead letters"
        ),
        other => panic!("expected AtLeast with an estimate, got {other:?}"),
    }
    assert!(
        big.oldest_ready_age.is_some(),
        "the age does not depend on the cap"
    );
    let small = by_name(&all, "small");
    assert_eq!(small.ready, Count::Exact(3));
    assert_eq!(small.dead_letters, Count::Exact(0));

    // Exactly at the cap is still exact.
    let all = db.broker.overview(&OverviewOptions::new().cap(500)).await?;
    assert_eq!(by_name(&all, "big").ready, Count::Exact(500));
    Ok(())
}

#[tokio::test]
async fn retrying_is_unknown_without_the_optional_retry_index() -> R {
    let db = TestDb::new().await?;
    row(&db, "q", -1.0, 2, None, "r").await?;
    let idx = format!("\"{}\".\"{}_retry_idx\"", db.schema, db.table.name());
    let all = db.broker.overview(&OverviewOptions::new()).await?;
    assert_eq!(by_name(&all, "q").retrying, Count::Exact(1));

    // A table without it (as faststream-outbox creates it) is still valid,
    // and the overview says it cannot count retries, without reading the table.
    db.exec(format!("DROP INDEX {idx}")).await?;
    db.broker.validate_schema().await?;
    let all = db.broker.overview(&OverviewOptions::new()).await?;
    let q = by_name(&all, "q");
    assert_eq!(q.retrying, Count::Unknown);
    assert_eq!(q.retrying.to_string(), "unknown");
    assert_eq!(q.ready, Count::Exact(1));
    for (sql, plan) in db.broker.overview_plans(&OverviewOptions::new()).await? {
        assert!(!sql.contains("attempts_count"), "{sql}");
        assert!(!plan.contains("_retry_idx"), "{plan}");
    }

    // An index of that name with another definition is not trusted.
    db.exec(format!(
        "CREATE INDEX \"{}_retry_idx\" ON {} (queue)",
        db.table.name(),
        db.t()
    ))
    .await?;
    let all = db.broker.overview(&OverviewOptions::new()).await?;
    assert_eq!(by_name(&all, "q").retrying, Count::Unknown);
    db.exec(format!("DROP INDEX {idx}")).await?;

    // migrate creates it again.
    db.broker.migrate().await?;
    let all = db.broker.overview(&OverviewOptions::new()).await?;
    assert_eq!(by_name(&all, "q").retrying, Count::Exact(1));
    Ok(())
}

#[tokio::test]
async fn find_rows_by_id_and_correlation_id_in_both_tables() -> R {
    let db = TestDb::new().await?;
    let ready = row(&db, "orders", -1.0, 0, None, "c-1").await?;
    let later = row(&db, "orders", 600.0, 1, None, "c-2").await?;
    let leased = row(&db, "orders", -1.0, 0, Some(2.0), "c-3").await?;
    // Dead letters: row 7001 (corr-7001), and two that were row 7002 (a
    // row dead-lettered, replayed and dead-lettered again) carrying c-1.
    let dl = dead_letters(&db, "orders", 7001, 1).await?;
    dead_letters(&db, "orders", 7002, 1).await?;
    dead_letters(&db, "orders", 7002, 1).await?;
    db.exec(format!(
        "UPDATE {} SET headers = '{{\"correlation_id\": \"c-1\"}}' WHERE original_id = 7002",
        db.d()
    ))
    .await?;

    let found = db.broker.find_rows(&RowLookup::Id(ready)).await?;
    assert_eq!(found.len(), 1, "{found:#?}");
    let r = &found[0];
    assert_eq!(
        (r.state, r.id, r.original_id),
        (RowState::Ready, ready, None)
    );
    assert_eq!(
        (r.queue.as_str(), r.correlation_id.as_str()),
        ("orders", "c-1")
    );
    assert_eq!((r.payload.as_slice(), r.payload_len), (&b"{}"[..], 2));
    assert!(!r.payload_truncated);
    assert_eq!(r.attempts_count, Some(0));
    assert!(r.failed_at.is_none() && r.failure_reason.is_none());

    let f = db.broker.find_rows(&RowLookup::Id(later)).await?;
    assert_eq!(
        (f[0].state, f[0].attempts_count),
        (RowState::Scheduled, Some(1))
    );
    let f = db.broker.find_rows(&RowLookup::Id(leased)).await?;
    assert_eq!(f[0].state, RowState::Leased);
    assert!(f[0].acquired_at.is_some());

    // An outbox id finds the dead letters it became (by original_id).
    let f = db.broker.find_rows(&RowLookup::Id(7001)).await?;
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].state, f[0].id, f[0].original_id),
        (RowState::DeadLetter, dl, Some(7001))
    );
    assert_eq!(f[0].correlation_id, "corr-7001");
    assert_eq!(f[0].failure_reason.as_deref(), Some("rejected"));
    assert_eq!(f[0].last_exception.as_deref(), Some("boom"));
    assert_eq!(f[0].attempts_count, None);
    let f = db.broker.find_rows(&RowLookup::DeadLetterId(dl)).await?;
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].original_id, Some(7001));

    // A correlation id: the outbox row first, then both dead letters by id.
    let f = db
        .broker
        .find_rows(&RowLookup::CorrelationId("c-1".into()))
        .await?;
    let got: Vec<(RowState, Option<i64>)> = f.iter().map(|r| (r.state, r.original_id)).collect();
    assert_eq!(
        got,
        [
            (RowState::Ready, None),
            (RowState::DeadLetter, Some(7002)),
            (RowState::DeadLetter, Some(7002))
        ]
    );
    assert!(f[1].id < f[2].id);

    // Nothing matches: empty. An empty correlation id is refused.
    assert!(db.broker.find_rows(&RowLookup::Id(-5)).await?.is_empty());
    assert!(
        db.broker
            .find_rows(&RowLookup::CorrelationId("nope".into()))
            .await?
            .is_empty()
    );
    let err = db
        .broker
        .find_rows(&RowLookup::CorrelationId(String::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    // A large payload comes back truncated, with its full length.
    let big: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (queue, payload) VALUES ('orders', $1) RETURNING id",
        db.t()
    )))
    .bind(vec![b'x'; ROW_PAYLOAD_LIMIT + 100])
    .fetch_one(&db.pool)
    .await?;
    let f = db.broker.find_rows(&RowLookup::Id(big)).await?;
    assert_eq!(f[0].payload.len(), ROW_PAYLOAD_LIMIT);
    assert_eq!(f[0].payload_len, (ROW_PAYLOAD_LIMIT + 100) as u64);
    assert!(f[0].payload_truncated);
    assert_eq!(
        f[0].correlation_id,
        big.to_string(),
        "no header: the row id"
    );

    // A lookup returns at most FIND_ROWS_LIMIT rows per table.
    db.exec(format!(
        "INSERT INTO {} (queue, payload, headers) SELECT 'orders', '\\x00', \
         '{{\"correlation_id\": \"many\"}}' FROM generate_series(1, {})",
        db.t(),
        FIND_ROWS_LIMIT + 5
    ))
    .await?;
    let f = db
        .broker
        .find_rows(&RowLookup::CorrelationId("many".into()))
        .await?;
    assert_eq!(f.len(), FIND_ROWS_LIMIT);
    Ok(())
}

#[tokio::test]
async fn connections_show_a_running_engines_connections_and_its_listen() -> R {
    let db = TestDb::new().await?;
    let app = format!("dash-{}", db.schema);
    let sub = Subscriber::builder(["q"]).build(|_m: Message| async {})?;
    let engine = Engine::new(db.broker.clone())
        .application_name(app.clone())
        .subscriber(sub);
    engine.start().await?;
    assert!(db.listening(Duration::from_secs(10)).await);
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&json!({"n": 1}), "q", &mut conn).await?;
    drop(conn);
    assert!(db.drained(Duration::from_secs(10)).await);

    let mine = |all: Vec<outbox_core::ops::RelayConnection>| {
        all.into_iter()
            .filter(|c| c.application_name.starts_with(&app))
            .collect::<Vec<_>>()
    };
    let conns = mine(db.broker.connections().await?);
    let listen: Vec<_> = conns
        .iter()
        .filter(|c| c.role.as_deref() == Some("listen"))
        .collect();
    assert_eq!(listen.len(), 1, "{conns:#?}");
    assert_eq!(listen[0].application_name, format!("{app}-listen"));
    assert!(listen[0].is_listen, "{:#?}", listen[0]);
    assert_eq!(
        listen[0].listen_channel.as_deref(),
        Some(db.table.channel().as_str())
    );
    assert!(listen[0].backend_start.is_some());
    assert!(
        conns.iter().any(|c| c.role.as_deref() == Some("fetch")),
        "{conns:#?}"
    );
    assert!(
        conns.iter().all(|c| c.pid > 0 && c.role.is_some()),
        "{conns:#?}"
    );

    // A connection that is not an engine's but works on the table shows up
    // by its statement (how a faststream-outbox relay is found).
    let mut other = db.connect().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        db.t()
    )))
    .execute(&mut other)
    .await?;
    let all = db.broker.connections().await?;
    assert!(
        all.iter()
            .any(|c| c.role.is_none() && c.query.contains(db.table.name())),
        "{all:#?}"
    );

    engine.stop().await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            mine(db.broker.connections().await.unwrap()).is_empty()
        })
        .await,
        "the engine's connections are gone after stop"
    );
    Ok(())
}

#[tokio::test]
async fn table_activity_follows_inserts_and_deletes() -> R {
    let db = TestDb::new().await?;
    let before = db.broker.table_activity().await?;
    db.exec(format!(
        "INSERT INTO {} (queue, payload) SELECT 'q', '\\x00' FROM generate_series(1, 10)",
        db.t()
    ))
    .await?;
    db.exec(format!(
        "DELETE FROM {} WHERE id IN (SELECT id FROM {} ORDER BY id LIMIT 4)",
        db.t(),
        db.t()
    ))
    .await?;
    // Backends flush their statistics at most once a second.
    let moved = wait_until(Duration::from_secs(15), || async {
        let now = db.broker.table_activity().await.unwrap();
        now.inserted >= before.inserted + 10 && now.deleted >= before.deleted + 4
    })
    .await;
    let after = db.broker.table_activity().await?;
    assert!(moved, "{before:?} -> {after:?}");
    assert_eq!(after.inserted - before.inserted, 10, "{after:?}");
    assert_eq!(after.deleted - before.deleted, 4, "{after:?}");
    assert!(after.sampled_at > before.sampled_at);

    let gone = outbox_core::OutboxBroker::new(
        db.pool.clone(),
        outbox_core::OutboxTable::new("no_such_table")?.schema(&db.schema)?,
    );
    let err = gone.table_activity().await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    Ok(())
}

/// The plans of every statement the overview runs, on 1,000,000 rows in
/// four queues (with leased, scheduled and retrying rows and dead letters),
/// after ANALYZE: no sequential scan, and each index the design relies on
/// is used.
#[tokio::test]
async fn the_overview_reads_no_table_sequentially_on_a_million_rows() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "INSERT INTO {} (queue, payload, attempts_count, next_attempt_at) \
         SELECT 'q' || (g % 4), '\\x7b7d', CASE WHEN g % 101 = 0 THEN 1 ELSE 0 END, \
         now() + CASE WHEN g % 51 = 0 THEN interval '1 hour' ELSE interval '-1 minute' END \
         FROM generate_series(1, 1000000) g",
        db.t()
    ))
    .await?;
    db.exec(format!(
        "UPDATE {} SET acquired_at = now(), acquired_token = gen_random_uuid() WHERE id % 1000 < 4",
        db.t()
    ))
    .await?;
    dead_letters(&db, "q1", 1, 2000).await?;
    dead_letters(&db, "dlq-only", 5000, 10).await?;
    db.exec(format!("VACUUM ANALYZE {}", db.t())).await?;
    db.exec(format!("VACUUM ANALYZE {}", db.d())).await?;

    let opts = OverviewOptions::new().queues(["configured"]);
    let plans = db.broker.overview_plans(&opts).await?;
    assert_eq!(plans.len(), 2);
    let all: String = plans.iter().map(|(_, p)| p.as_str()).collect();
    for (sql, plan) in &plans {
        assert!(!plan.contains("Seq Scan"), "{sql}\n{plan}");
    }
    let name = db.table.name();
    for idx in [
        format!("{name}_key_idx"),
        format!("{name}_pending_idx"),
        format!("{name}_leased_idx"),
        format!("{name}_retry_idx"),
        format!("{}_queue_failed_idx", db.dlq.name()),
    ] {
        assert!(all.contains(&idx), "{idx} not used:\n{all}");
    }
    // The same statements as generic plans: what PostgreSQL may switch a
    // prepared statement to after five runs (sqlx prepares and caches them).
    let mut conn = db.connect().await?;
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await?;
    for (i, (sql, _)) in plans.iter().enumerate() {
        let (types, args) = if sql.contains("unnest($1::varchar[])") {
            ("varchar[], int8", "'{q1,configured}', 10001")
        } else {
            ("text", "'x'")
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE overview_{i}({types}) AS {sql}"
        )))
        .execute(&mut conn)
        .await?;
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN EXECUTE overview_{i}({args})"
        )))
        .fetch_all(&mut conn)
        .await?;
        let plan = lines.join("\n");
        assert!(!plan.contains("Seq Scan"), "generic plan of {sql}\n{plan}");
        assert!(plan.contains("Index"), "{plan}");
    }

    let overview = db.broker.overview(&opts).await?;
    let names: Vec<&str> = overview.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, ["configured", "dlq-only", "q0", "q1", "q2", "q3"]);
    let q1 = by_name(&overview, "q1");
    assert!(
        matches!(q1.ready, Count::AtLeast { cap: 10_000, estimate: Some(e) } if e > 10_000),
        "{q1:#?}"
    );
    assert!(q1.scheduled.is_exact(), "{q1:#?}");
    assert!(matches!(q1.retrying, Count::Exact(n) if n > 0), "{q1:#?}");
    assert!(matches!(q1.leased, Count::Exact(n) if n > 0), "{q1:#?}");
    assert_eq!(q1.dead_letters, Count::Exact(2000));
    assert!(q1.oldest_ready_age.is_some() && q1.oldest_lease_age.is_some());

    // A cap of 1,000: ready, scheduled and retrying of each queue are over
    // it (12 counts, estimated by one EXPLAIN), each with its own estimate,
    // of its own magnitude (about 245,000, 4,900 and 2,500 rows).
    let small_cap = db
        .broker
        .overview(&OverviewOptions::new().cap(1000))
        .await?;
    let est = |c: Count| match c {
        Count::AtLeast {
            cap: 1000,
            estimate: Some(e),
        } => e,
        other => panic!("expected AtLeast with an estimate, got {other:?}"),
    };
    for q in ["q0", "q1", "q2", "q3"] {
        let o = by_name(&small_cap, q);
        let (r, s, t) = (est(o.ready), est(o.scheduled), est(o.retrying));
        assert!((100_000..=500_000).contains(&r), "{q} ready ≈{r}");
        assert!((1_500..=15_000).contains(&s), "{q} scheduled ≈{s}");
        assert!((1_001..=8_000).contains(&t), "{q} retrying ≈{t}");
        assert_eq!(
            o.leased,
            Count::Exact(1000),
            "{q}: exactly the cap is exact"
        );
    }
    Ok(())
}
