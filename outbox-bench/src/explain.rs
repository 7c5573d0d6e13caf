//! `explain`: where the time of the engine's own statements goes inside
//! PostgreSQL. Prefills a backlog, then runs `EXPLAIN (ANALYZE, BUFFERS)` of
//! the claim (and of the batched delete of the rows it claimed) at several
//! claim sizes, each inside a transaction that is rolled back, so every size
//! sees the same table.

use anyhow::Context as _;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use crate::db::{self, Db, QUEUE};
use crate::point::percentiles_ms;

/// Parameters of the explain run.
#[derive(Debug, Clone)]
pub(crate) struct ExplainParams {
    pub(crate) backlog: u64,
    pub(crate) limits: Vec<i64>,
    pub(crate) runs: usize,
    pub(crate) payload_bytes: usize,
    /// Rows claimed and deleted (committed, with the engine's statements)
    /// before explaining: the state of the table part-way through a drain.
    pub(crate) consume_first: u64,
}

fn engine_sql(table: &outbox_core::OutboxTable, which: &str) -> anyhow::Result<String> {
    outbox_core::__private::engine_sql(table, which)
        .with_context(|| format!("outbox-core has no `{which}` statement"))
}

pub(crate) async fn run(db: &Db, p: &ExplainParams) -> anyhow::Result<Vec<Value>> {
    db.with_fresh_table(async |table| {
        db::prefill(db, table, p.backlog, p.payload_bytes).await?;
        let mut conn = db.opts.connect().await?;
        consume(&mut conn, table, p.consume_first).await?;
        let mut out = Vec::new();
        for which in ["claim_pending", "claim"] {
            let claim = engine_sql(table, which)?;
            let ack = engine_sql(table, "ack_batch")?;
            for &limit in &p.limits {
                let mut claim_ms = Vec::new();
                let mut ack_ms = Vec::new();
                let mut plan_claim = Vec::new();
                let mut plan_ack = Vec::new();
                for run in 0..p.runs.max(1) {
                    let mut tx = conn.begin().await?;
                    let token = uuid::Uuid::new_v4();
                    let rows = sqlx::query(AssertSqlSafe(format!(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {claim}"
                    )))
                    .bind(vec![QUEUE.to_owned()])
                    .bind(limit)
                    .bind(60.0_f64)
                    .bind(token)
                    .fetch_one(&mut *tx)
                    .await
                    .with_context(|| format!("EXPLAIN {which}"))?;
                    let plan: Value = rows.try_get(0)?;
                    claim_ms.push(plan[0]["Execution Time"].as_f64().unwrap_or(0.0));
                    if run == 0 {
                        plan_claim = plan_lines(&plan[0]["Plan"], 0);
                    }
                    // The rows this claim leased (visible inside the transaction).
                    let ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
                        "SELECT id FROM {} WHERE acquired_token = $1",
                        table.qualified_name()
                    )))
                    .bind(token)
                    .fetch_all(&mut *tx)
                    .await?;
                    let tokens = vec![token; ids.len()];
                    let rows = sqlx::query(AssertSqlSafe(format!(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {ack}"
                    )))
                    .bind(&ids)
                    .bind(&tokens)
                    .fetch_one(&mut *tx)
                    .await
                    .context("EXPLAIN ack_batch")?;
                    let plan: Value = rows.try_get(0)?;
                    ack_ms.push(plan[0]["Execution Time"].as_f64().unwrap_or(0.0));
                    if run == 0 {
                        plan_ack = plan_lines(&plan[0]["Plan"], 0);
                    }
                    tx.rollback().await?;
                }
                let per_row = |v: &[f64]| {
                    let mut s = v.to_vec();
                    s.sort_by(f64::total_cmp);
                    s.get(s.len() / 2).copied().unwrap_or(0.0) * 1000.0 / limit.max(1) as f64
                };
                out.push(json!({
                    "scenario": "explain",
                    "impl": "rust",
                    "params": {"backlog": p.backlog, "consumed_first": p.consume_first, "statement": which, "limit": limit, "runs": p.runs},
                    "claim_ms": percentiles_ms(&mut claim_ms.clone()),
                    "claim_us_per_row": crate::sys::round(per_row(&claim_ms), 2),
                    "ack_batch_ms": percentiles_ms(&mut ack_ms.clone()),
                    "ack_batch_us_per_row": crate::sys::round(per_row(&ack_ms), 2),
                    "claim_plan": plan_claim,
                    "ack_batch_plan": plan_ack,
                    "build": crate::build_info(),
                }));
            }
        }
        conn.close().await.ok();
        anyhow::Ok(out)
    })
    .await
}

/// Claims and deletes `n` rows, 1,000 at a time, with the engine's own
/// statements (committed; no vacuum runs, as in a drain with autovacuum off).
async fn consume(
    conn: &mut sqlx::PgConnection,
    table: &outbox_core::OutboxTable,
    n: u64,
) -> anyhow::Result<()> {
    let claim = engine_sql(table, "claim_pending")?;
    let ack = engine_sql(table, "ack_batch")?;
    let mut left = n;
    while left > 0 {
        let limit = left.min(1000);
        let token = uuid::Uuid::new_v4();
        let rows = sqlx::query(AssertSqlSafe(claim.clone()))
            .bind(vec![QUEUE.to_owned()])
            .bind(i64::try_from(limit)?)
            .bind(60.0_f64)
            .bind(token)
            .fetch_all(&mut *conn)
            .await
            .context("consuming: claim")?;
        if rows.is_empty() {
            break;
        }
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        let tokens = vec![token; ids.len()];
        sqlx::query(AssertSqlSafe(ack.clone()))
            .bind(&ids)
            .bind(&tokens)
            .execute(&mut *conn)
            .await
            .context("consuming: delete")?;
        left = left.saturating_sub(u64::try_from(ids.len())?);
    }
    Ok(())
}

/// A plan tree as indented one-line summaries: node, rows, loops, time, buffers.
fn plan_lines(node: &Value, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    let name = node["Node Type"].as_str().unwrap_or("?");
    let rel = node["Relation Name"]
        .as_str()
        .or_else(|| node["Index Name"].as_str())
        .map(|r| format!(" on {r}"))
        .unwrap_or_default();
    let idx = node["Index Name"]
        .as_str()
        .filter(|_| node["Relation Name"].is_string())
        .map(|i| format!(" using {i}"))
        .unwrap_or_default();
    out.push(format!(
        "{}{name}{rel}{idx}  rows={} loops={} time={:.3}..{:.3} ms  shared hit={} read={} dirtied={}",
        "  ".repeat(depth),
        node["Actual Rows"],
        node["Actual Loops"],
        node["Actual Startup Time"].as_f64().unwrap_or(0.0),
        node["Actual Total Time"].as_f64().unwrap_or(0.0),
        node["Shared Hit Blocks"],
        node["Shared Read Blocks"],
        node["Shared Dirtied Blocks"],
    ));
    if let Some(children) = node["Plans"].as_array() {
        for c in children {
            out.extend(plan_lines(c, depth + 1));
        }
    }
    out
}
