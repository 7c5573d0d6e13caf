//! `overview`: the dashboard's per-queue overview
//! ([`OutboxBroker::overview`], capped counts) against the exact
//! [`OutboxBroker::stats`] on the same table in the same run. Prefills a
//! backlog spread over several queues (with scheduled, retrying and leased
//! rows) and a dead-letter table, `VACUUM ANALYZE`s both, then times `runs`
//! calls of each, interleaved so that both see the same machine, and as
//! many loads of the dashboard's queues page (`GET /` of an
//! `outbox_dashboard::Dashboard` served on loopback, over HTTP, whole body
//! read: what an operator's browser waits for). Prints one JSON object: the
//! percentiles of each and their ratios. Timings are not gated (`check` does
//! not run it).

use std::time::Instant;

use anyhow::Context as _;
use outbox_core::ops::OverviewOptions;
use outbox_core::{DlqTable, OutboxBroker};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use crate::db::Db;
use crate::point::percentiles_ms;

/// Parameters of the overview run.
#[derive(Debug, Clone)]
pub(crate) struct OverviewParams {
    pub(crate) backlog: u64,
    pub(crate) queues: u64,
    pub(crate) dead_letters: u64,
    pub(crate) runs: usize,
    pub(crate) cap: u64,
    pub(crate) payload_bytes: usize,
}

/// Runs the scenario on a fresh table (and its dead-letter table).
pub(crate) async fn run(db: &Db, p: &OverviewParams) -> anyhow::Result<Value> {
    db.with_fresh_table(async |table| {
        let dlq = DlqTable::new(&format!("{}_dlq", table.name()))?;
        let result = measure(db, table, &dlq, p).await;
        let mut conn = db.opts.connect().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            dlq.qualified_name()
        )))
        .execute(&mut conn)
        .await
        .ok();
        conn.close().await.ok();
        result
    })
    .await
}

async fn measure(
    db: &Db,
    table: &outbox_core::OutboxTable,
    dlq: &DlqTable,
    p: &OverviewParams,
) -> anyhow::Result<Value> {
    let pool = db.pool(2).await?;
    dlq.migrate(&pool).await?;
    let t = table.qualified_name();
    let queues = p.queues.max(1);
    let t0 = Instant::now();
    // Queue q<i mod queues>; 1 in 51 rows scheduled an hour ahead, 1 in 101
    // retrying (attempts_count 1), 1 in 997 leased (primes: every queue gets some).
    let chunk = 100_000u64;
    let mut from = 1u64;
    while from <= p.backlog {
        let to = (from + chunk - 1).min(p.backlog);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {t} (queue, payload, attempts_count, next_attempt_at, acquired_at, acquired_token) \
             SELECT 'q' || (g % $3), convert_to(repeat('x', $4), 'UTF8'), \
             CASE WHEN g % 101 = 0 THEN 1 ELSE 0 END, \
             now() + CASE WHEN g % 51 = 0 THEN interval '1 hour' ELSE interval '-1 minute' END, \
             CASE WHEN g % 997 = 0 THEN now() END, CASE WHEN g % 997 = 0 THEN gen_random_uuid() END \
             FROM generate_series($1::int8, $2::int8) g"
        )))
        .bind(i64::try_from(from)?)
        .bind(i64::try_from(to)?)
        .bind(i64::try_from(queues)?)
        .bind(i32::try_from(p.payload_bytes)?)
        .execute(&pool)
        .await
        .context("prefilling the outbox")?;
        from = to + 1;
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (original_id, queue, payload, deliveries_count, created_at, failure_reason) \
         SELECT g, 'q' || (g % $2), '\\x7b7d', 3, now(), 'rejected' FROM generate_series(1, $1::int8) g",
        dlq.qualified_name()
    )))
    .bind(i64::try_from(p.dead_letters)?)
    .bind(i64::try_from(queues)?)
    .execute(&pool)
    .await
    .context("prefilling the dead-letter table")?;
    for name in [t.clone(), dlq.qualified_name()] {
        sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {name}")))
            .execute(&pool)
            .await?;
    }
    let prefill_s = t0.elapsed().as_secs_f64();

    let broker = OutboxBroker::new(pool.clone(), table.clone()).dead_letter_table(dlq.clone());
    let opts = OverviewOptions::new().cap(p.cap);
    // Warm-up: plans cached on both connections, pages in shared buffers.
    for _ in 0..3 {
        broker.overview(&opts).await?;
        broker.stats().await?;
    }
    // The queues page, served as `outbox serve` serves it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        outbox_dashboard::Dashboard::new(broker.clone()).serve_listener(listener, async {
            let _ = stopped.await;
        }),
    );
    for _ in 0..3 {
        get_page(addr).await?;
    }
    let mut overview_ms = Vec::with_capacity(p.runs);
    let mut stats_ms = Vec::with_capacity(p.runs);
    let mut page_ms = Vec::with_capacity(p.runs);
    let mut last = Vec::new();
    for _ in 0..p.runs.max(1) {
        let s = Instant::now();
        last = broker.overview(&opts).await?;
        overview_ms.push(s.elapsed().as_secs_f64() * 1000.0);
        let s = Instant::now();
        broker.stats().await?;
        stats_ms.push(s.elapsed().as_secs_f64() * 1000.0);
        let s = Instant::now();
        get_page(addr).await?;
        page_ms.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = stop.send(());
    server.await?.context("the dashboard server")?;
    let plans = broker.overview_plans(&opts).await?;
    let seq_scans = plans
        .iter()
        .filter(|(_, plan)| plan.contains("Seq Scan"))
        .count();
    pool.close().await;
    let ov = percentiles_ms(&mut overview_ms);
    let st = percentiles_ms(&mut stats_ms);
    let pg = percentiles_ms(&mut page_ms);
    let ratio_of = |num: &Value, den: &Value, k: &str| {
        let (a, b) = (
            num[k].as_f64().unwrap_or(0.0),
            den[k].as_f64().unwrap_or(0.0),
        );
        if b > 0.0 {
            json!(crate::sys::round(a / b, 1))
        } else {
            Value::Null
        }
    };
    let ratio = |k: &str| ratio_of(&st, &ov, k);
    let page_ratio = |k: &str| ratio_of(&st, &pg, k);
    let queues_json: Vec<Value> = last
        .iter()
        .map(|q| {
            json!({
                "queue": q.queue,
                "ready": q.ready.to_string(),
                "scheduled": q.scheduled.to_string(),
                "leased": q.leased.to_string(),
                "retrying": q.retrying.to_string(),
                "dead_letters": q.dead_letters.to_string(),
            })
        })
        .collect();
    Ok(json!({
        "scenario": "overview",
        "impl": "rust",
        "params": {
            "backlog": p.backlog, "queues": queues, "dead_letters": p.dead_letters,
            "runs": p.runs, "cap": p.cap, "payload_bytes": p.payload_bytes,
        },
        "prefill_s": crate::sys::round(prefill_s, 1),
        "overview_ms": ov,
        "stats_ms": st,
        "stats_over_overview": {"p50": ratio("p50"), "p95": ratio("p95"), "p99": ratio("p99")},
        "queues_page_ms": pg,
        "stats_over_queues_page": {"p50": page_ratio("p50"), "p95": page_ratio("p95"), "p99": page_ratio("p99")},
        "overview_statements_with_seq_scan": seq_scans,
        "overview": queues_json,
        "build": crate::build_info(),
    }))
}

/// `GET /` of the dashboard, read to the end; fails unless it is the queues
/// page answered with 200.
async fn get_page(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    anyhow::ensure!(
        body.starts_with("HTTP/1.1 200") && body.contains(r#"id="queues""#),
        "the dashboard's queues page did not answer 200 with its table: {}",
        body.lines().next().unwrap_or_default()
    );
    Ok(())
}
