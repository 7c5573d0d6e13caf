//! The statements of exactly-once lanes (`docs/exactly-once.md`): the lane
//! lock, the lane's claim and the delete of a committed lot's rows.
//!
//! A row's lane is `hash(ordering_key) mod U` for keyed rows and
//! `id mod U` for the others ([`lane_expr`]), so one key always maps to one
//! lane. The claim runs in a transaction on the lock's connection and locks
//! the rows `FOR UPDATE SKIP LOCKED` (no lease is written, as in a lot of
//! `ClaimMode::Transaction`); its writes are the lot's (`conn::lot_end`).

use sqlx::{PgConnection, Row};

use super::conn::{Conn, rollback_after};
use super::row::OutboxRow;
use super::sql::{self, ROW_COLUMNS, Sql};

/// A row's lane among `$4` lanes (`$4 > 0`), in SQL on the candidate `c`:
/// `hashtext` of the key (stable across servers and versions of a major
/// release), made non-negative in `int8`, else the id.
pub(crate) fn lane_expr(c: &str) -> String {
    format!(
        "mod(CASE WHEN {c}.ordering_key IS NULL THEN {c}.id \
         ELSE abs(hashtext({c}.ordering_key)::int8) END, $4::int8)"
    )
}

/// The lane statements of one outbox table.
#[derive(Debug)]
pub(crate) struct LaneSql {
    /// `$1` queues, `$2` limit, `$3` lease TTL (seconds: rows leased by
    /// another subscriber mode and expired are taken), `$4` lanes, `$5`
    /// the lane. Id order. A keyed row waits while a row of its key waits
    /// for a retry (`blocked`: the retrying rows, on `<t>_retry_idx` or
    /// `<t>_pending_idx`, a handful), so a key's records stay in id order
    /// across retries (a key's retrying row is its oldest: the later ones
    /// were held back).
    claim: Sql,
    /// `$1` ids.
    delete: Sql,
}

impl LaneSql {
    /// The statements for the quoted, qualified table `t`.
    pub(crate) fn new(t: &str) -> Self {
        let cols = ROW_COLUMNS.replace("o.", "c.");
        let lane = lane_expr("c");
        Self {
            claim: format!(
                "WITH blocked AS MATERIALIZED (SELECT DISTINCT b.ordering_key FROM {t} b \
                   WHERE b.queue = ANY($1::varchar[]) AND b.attempts_count > 0 \
                   AND b.acquired_token IS NULL AND b.next_attempt_at > now() \
                   AND b.ordering_key IS NOT NULL) \
                 SELECT {cols} FROM {t} c \
                 WHERE c.queue = ANY($1::varchar[]) AND c.next_attempt_at <= now() \
                 AND (c.acquired_token IS NULL OR c.acquired_at < now() - make_interval(secs => $3)) \
                 AND {lane} = $5::int8 \
                 AND (c.ordering_key IS NULL \
                   OR NOT EXISTS (SELECT 1 FROM blocked WHERE blocked.ordering_key = c.ordering_key)) \
                 ORDER BY c.id LIMIT $2 FOR UPDATE OF c SKIP LOCKED"
            )
            .into(),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1::int8[])").into(),
        }
    }
}

/// The PostgreSQL connection of `conn`, or the error an in-process store
/// gives (lanes need PostgreSQL: session advisory locks).
fn pg(conn: &mut Conn) -> Result<&mut PgConnection, sqlx::Error> {
    match conn {
        Conn::Pg(pg) => Ok(pg),
        Conn::Local(_) => Err(sqlx::Error::Protocol(
            "exactly-once lanes need PostgreSQL (session advisory locks)".into(),
        )),
    }
}

/// Takes the session advisory lock of lane `lane` of `unit` (the table and
/// subscriber) on `conn` if it is free; `true` when this session holds it
/// now. The lock is the two-key form (`hashtext(unit)`, lane): another
/// space than the one-key locks of keyed publishes.
pub(crate) async fn try_lock(conn: &mut Conn, unit: &str, lane: u32) -> Result<bool, sqlx::Error> {
    let pg = pg(conn)?;
    let row = sqlx::query("SELECT pg_try_advisory_lock(hashtext($1), $2)")
        .bind(unit)
        .bind(i32::try_from(lane).unwrap_or(i32::MAX))
        .fetch_one(&mut *pg)
        .await?;
    row.try_get::<bool, _>(0)
}

/// How a lot's transaction begins: the claim's plan settings, for the lot's
/// transaction only.
///
/// - The planner does not know how many rows `mod(.., $4) = $5` keeps
///   (it assumes 0.5 %, the lane keeps `1/U`), so on a large backlog it
///   read the whole table and sorted it (a sequential or bitmap scan, then
///   `Sort`): 15 ms per claim of 500 rows on 50,000 idle rows, 60-100 ms
///   with four lanes claiming, a linear cost in the backlog. In id order on
///   the primary key the claim stops after its lot: about `U x` lot rows
///   read, under 1 ms. Sequential and bitmap scans and sorts are disabled so
///   the planner takes that path (there is no other: no index has the lane);
///   the `blocked` keys still come from `<t>_retry_idx`.
/// - The estimate also put the claim above `jit_above_cost`: JIT compiling
///   it cost 0.3 to 0.5 s per claim.
const CLAIM_BEGIN: &str = "BEGIN; SET LOCAL jit = off; SET LOCAL enable_seqscan = off; \
    SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off";

/// Opens a lot of lane `lane` of `lanes` on `conn`: a transaction and the
/// lane's due rows in id order, locked (none: the transaction is over).
pub(crate) async fn claim(
    stmts: &LaneSql,
    conn: &mut Conn,
    queues: &[String],
    limit: usize,
    lease_ttl: std::time::Duration,
    lanes: u32,
    lane: u32,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let pg = pg(conn)?;
    sqlx::raw_sql(CLAIM_BEGIN).execute(&mut *pg).await?;
    let claimed = sql::q_as::<OutboxRow>(&stmts.claim)
        .bind(queues)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(lease_ttl.as_secs_f64())
        .bind(i64::from(lanes))
        .bind(i64::from(lane))
        .fetch_all(&mut *pg)
        .await;
    let rows = match claimed {
        Ok(rows) => rows,
        Err(e) => return Err(rollback_after(pg, e).await),
    };
    if rows.is_empty() {
        sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await?;
    }
    Ok(rows)
}

/// Deletes the rows `ids` (a committed lot's; autocommit); how many were
/// still there.
pub(crate) async fn delete(
    stmts: &LaneSql,
    conn: &mut Conn,
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let pg = pg(conn)?;
    let done = sql::q(&stmts.delete).bind(ids).execute(&mut *pg).await?;
    Ok(done.rows_affected())
}

/// The `EXPLAIN (ANALYZE, BUFFERS)` of a lane claim with these parameters,
/// in a transaction begun as a lot's and rolled back (so it locks nothing
/// for long and writes nothing). For the tests that check its plan.
pub(crate) async fn explain_claim(
    stmts: &LaneSql,
    pg: &mut PgConnection,
    queues: &[String],
    limit: usize,
    lanes: u32,
    lane: u32,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::raw_sql(CLAIM_BEGIN).execute(&mut *pg).await?;
    let explained = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        stmts.claim
    )))
    .bind(queues)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(30.0_f64)
    .bind(i64::from(lanes))
    .bind(i64::from(lane))
    .fetch_all(&mut *pg)
    .await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await?;
    explained
}
