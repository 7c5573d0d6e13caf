//! The engine's storage operations: the seam between the engine and its
//! storage. In [`ClaimMode::Lease`](crate::ClaimMode::Lease) each is one
//! statement guarded by the lease token; in
//! [`ClaimMode::Transaction`](crate::ClaimMode::Transaction) a lot's claim
//! and writes run in one transaction that holds the rows' locks
//! ([`lot_claim`], [`lot_end`]).
//!
//! Every operation takes a [`Conn`]: a PostgreSQL connection (the product),
//! or a [`LocalStore`], a backend that lives in the process (the in-memory
//! store of the test harness, `MemoryStore`, which implements the same
//! contract, checked by the workspace's contract suite against real
//! PostgreSQL). The fetch loop, the workers, the acker and the lot loops
//! have one code path for both; the broker's backend value (`broker::Backend`) opens the
//! connection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, Row};
use uuid::Uuid;

use super::producer::{BatchInsert, Insert};
use super::row::OutboxRow;
use super::sql::{self, Statements};

/// A storage backend that lives in the process: no connection, no I/O, every
/// statement a method call that cannot fail. The test harness's in-memory
/// store (`MemoryStore`, feature `testing`) is the one implementation; the
/// engine and the broker reach it only through this interface, so they
/// compile and run the same with or without that feature.
///
/// Each method has the semantics of the PostgreSQL statement of the same
/// name (see [`sql::Statements`]).
pub(crate) trait LocalStore: Send + Sync + fmt::Debug {
    /// How the backend names itself in [`Error::Unsupported`](crate::Error::Unsupported).
    fn name(&self) -> &'static str {
        "the in-memory store"
    }
    /// The backend's clock (what `now()` is in its statements).
    fn now(&self) -> DateTime<Utc>;
    /// The producer's insert; `None` for a timer no-op.
    fn insert(&self, insert: Insert) -> Option<i64>;
    /// The producer's batch insert; how many rows were inserted.
    fn insert_batch(&self, batch: BatchInsert) -> u64;
    /// `cancel_timer`.
    fn cancel_timer(&self, queue: &str, timer_id: &str) -> bool;
    /// `fetch_unprocessed`.
    fn fetch_unprocessed(&self, queue: Option<&str>, limit: i64) -> Vec<OutboxRow>;
    /// The engine's claim.
    fn claim(&self, args: &ClaimArgs<'_>) -> Vec<OutboxRow>;
    /// A lease-guarded write after the claim.
    fn execute(&self, write: &Write) -> Written;
    /// Gives back the leases of unstarted rows.
    fn release(&self, ids: &[i64], tokens: &[Uuid]) -> u64;
    /// A lot's claim: the claim's rows, locked by `lot` (no lease written).
    fn claim_locked(&self, args: &ClaimArgs<'_>, lot: u64) -> Vec<OutboxRow>;
    /// Ends `lot`: with `Some(writes)` they are applied (commit), with
    /// `None` nothing is (rollback); either way its locks are gone.
    fn end_lot(&self, lot: u64, writes: Option<&LotWrites>);
}

/// What a lot's transaction writes before it commits (see
/// [`ClaimMode::Transaction`](crate::ClaimMode::Transaction)); its rows are
/// locked by the lot, so no write needs a token.
#[derive(Debug, Default)]
pub(crate) struct LotWrites {
    /// Acks, and terminal failures without a dead-letter table.
    pub(crate) delete: Vec<i64>,
    /// Retries and their delays.
    pub(crate) retry: Vec<(i64, Duration)>,
    /// Dead-letter moves: id, reason, last exception.
    pub(crate) dead_letter: Vec<(i64, &'static str, Option<String>)>,
    /// Rows still running at `max_hold`: leased with `token`, to finish as
    /// leased rows after the commit.
    pub(crate) lease: Vec<i64>,
    /// The lease token of [`lease`](Self::lease).
    pub(crate) token: Uuid,
}

/// Lot ids of in-process stores (PostgreSQL needs none: a lot is the
/// transaction of its connection).
static NEXT_LOT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Starts a lot on `conn`: opens a transaction and claims rows into it,
/// locked, without a lease. On an error the transaction is rolled back when
/// the connection still works. Returns the lot's id and rows (none: the
/// transaction is already over).
pub(crate) async fn lot_claim(
    stmts: &Statements,
    conn: &mut Conn,
    args: &ClaimArgs<'_>,
) -> Result<(u64, Vec<OutboxRow>), sqlx::Error> {
    let lot = NEXT_LOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rows = match conn {
        Conn::Local(store) => store.claim_locked(args, lot),
        Conn::Pg(pg) => {
            sqlx::raw_sql("BEGIN").execute(&mut *pg).await?;
            match lot_claim_pg(stmts, pg, args).await {
                Ok(rows) => rows,
                Err(e) => return Err(rollback_after(pg, e).await),
            }
        }
    };
    if rows.is_empty() {
        lot_end(stmts, conn, lot, None).await?;
    }
    Ok((lot, rows))
}

async fn lot_claim_pg(
    stmts: &Statements,
    conn: &mut PgConnection,
    args: &ClaimArgs<'_>,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let sql = stmts.claim_locked(args.with_expired, args.ordered.is_some());
    run_claim(sql, conn, args).await
}

/// Ends a lot: with `Some(writes)`, writes them and commits; with `None`,
/// rolls back. A failed write rolls everything back (when the connection
/// still works; a broken one is rolled back by the server), except a
/// refused dead-letter move (a drifted dead-letter table, permissions): then
/// those rows get the lot's lease instead, as a failed dead-letter write
/// leaves a leased row, the rest commits, and the refusal is returned in
/// `Ok(Some(..))`.
pub(crate) async fn lot_end(
    stmts: &Statements,
    conn: &mut Conn,
    lot: u64,
    writes: Option<&LotWrites>,
) -> Result<Option<sqlx::Error>, sqlx::Error> {
    let pg = match conn {
        Conn::Local(store) => {
            if let Some(w) = writes
                && !w.dead_letter.is_empty()
                && stmts.lot.dead_letter.is_none()
            {
                store.end_lot(lot, None);
                return Err(no_dead_letter_table());
            }
            store.end_lot(lot, writes);
            return Ok(None);
        }
        Conn::Pg(pg) => pg,
    };
    let Some(writes) = writes else {
        return sqlx::raw_sql("ROLLBACK")
            .execute(&mut *pg)
            .await
            .map(|_| None);
    };
    match lot_write_pg(stmts, pg, writes).await {
        Ok(refused) => sqlx::raw_sql("COMMIT")
            .execute(&mut *pg)
            .await
            .map(|_| refused),
        Err(e) => Err(rollback_after(pg, e).await),
    }
}

async fn lot_write_pg(
    stmts: &Statements,
    pg: &mut PgConnection,
    w: &LotWrites,
) -> Result<Option<sqlx::Error>, sqlx::Error> {
    let mut refused = None;
    let lot = &stmts.lot;
    if !w.delete.is_empty() {
        sql::q(&lot.delete)
            .bind(&w.delete)
            .execute(&mut *pg)
            .await?;
    }
    if !w.retry.is_empty() {
        let ids: Vec<i64> = w.retry.iter().map(|(id, _)| *id).collect();
        let delays: Vec<f64> = w.retry.iter().map(|(_, d)| d.as_secs_f64()).collect();
        sql::q(&lot.retry)
            .bind(ids)
            .bind(delays)
            .execute(&mut *pg)
            .await?;
    }
    if !w.dead_letter.is_empty() {
        let Some(dl) = &lot.dead_letter else {
            return Err(no_dead_letter_table());
        };
        let ids: Vec<i64> = w.dead_letter.iter().map(|(id, _, _)| *id).collect();
        let reasons: Vec<&str> = w.dead_letter.iter().map(|(_, r, _)| *r).collect();
        let texts: Vec<Option<&str>> = w.dead_letter.iter().map(|(_, _, t)| t.as_deref()).collect();
        sqlx::raw_sql("SAVEPOINT outbox_dead_letters")
            .execute(&mut *pg)
            .await?;
        let moved = sql::q(dl)
            .bind(&ids)
            .bind(reasons)
            .bind(texts)
            .execute(&mut *pg)
            .await;
        match moved {
            Ok(_) => {}
            Err(e) if is_connection_error(&e) => return Err(e),
            Err(e) => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT outbox_dead_letters")
                    .execute(&mut *pg)
                    .await?;
                sql::q(&lot.lease)
                    .bind(&ids)
                    .bind(w.token)
                    .execute(&mut *pg)
                    .await?;
                refused = Some(e);
            }
        }
    }
    if !w.lease.is_empty() {
        sql::q(&lot.lease)
            .bind(&w.lease)
            .bind(w.token)
            .execute(&mut *pg)
            .await?;
    }
    Ok(refused)
}

/// What one claim asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimArgs<'a> {
    /// The subscriber's queues.
    pub(crate) queues: &'a [String],
    /// Most rows to claim.
    pub(crate) limit: usize,
    /// The lease TTL (for the expired-lease branch).
    pub(crate) lease_ttl: Duration,
    /// The fresh lease token.
    pub(crate) token: Uuid,
    /// Whether to look for expired leases too.
    pub(crate) with_expired: bool,
    /// An ordered claim: of the rows with a key, only each key's head. The
    /// walk over the keys starts after this one (`""`: from the first), so
    /// successive claims go round all keys.
    pub(crate) ordered: Option<&'a str>,
}

/// Where the engine's statements run.
#[derive(Debug)]
pub(crate) enum Conn {
    /// A dedicated PostgreSQL connection.
    Pg(PgConnection),
    /// An in-process backend (the in-memory store of a test harness).
    Local(Arc<dyn LocalStore>),
}

impl Conn {
    /// Forgets an open lot without writing (what closing a PostgreSQL
    /// connection does to its transaction); a no-op on PostgreSQL, where
    /// the connection's drop closes it.
    #[cfg_attr(
        not(feature = "testing"),
        allow(dead_code, reason = "only testing::Lot abandons a lot by hand")
    )]
    pub(crate) fn abandon_lot(&self, lot: u64) {
        if let Conn::Local(store) = self {
            store.end_lot(lot, None);
        }
    }
}

/// A write after the claim. Every variant filters on `id AND acquired_token`.
#[derive(Debug)]
pub(crate) enum Write {
    /// `DELETE` one row (ack, or terminal without a dead-letter table).
    Delete { id: i64, token: Uuid },
    /// Release the lease and reschedule.
    Retry {
        id: i64,
        token: Uuid,
        delay: Duration,
    },
    /// Atomic `DELETE ... INSERT INTO dlq`.
    DeadLetter {
        id: i64,
        token: Uuid,
        reason: &'static str,
        last_exception: Option<String>,
    },
    /// Batched `DELETE`; returns the ids that were deleted.
    DeleteBatch { ids: Vec<i64>, tokens: Vec<Uuid> },
    /// The lease heartbeat: `acquired_at = now` on the rows that still hold
    /// their token; returns the ids extended.
    Extend { ids: Vec<i64>, tokens: Vec<Uuid> },
}

#[derive(Debug)]
pub(crate) enum Written {
    Rows(u64),
    Ids(Vec<i64>),
}

fn no_dead_letter_table() -> sqlx::Error {
    sqlx::Error::Configuration(
        "a dead-letter write without a dead-letter table; refusing to drop the row silently".into(),
    )
}

pub(crate) async fn execute(
    stmts: &Statements,
    conn: &mut Conn,
    write: &Write,
) -> Result<Written, sqlx::Error> {
    match conn {
        Conn::Pg(conn) => execute_pg(stmts, conn, write).await,
        Conn::Local(store) => {
            if matches!(write, Write::DeadLetter { .. }) && stmts.dead_letter.is_none() {
                return Err(no_dead_letter_table());
            }
            Ok(store.execute(write))
        }
    }
}

async fn execute_pg(
    stmts: &Statements,
    conn: &mut PgConnection,
    write: &Write,
) -> Result<Written, sqlx::Error> {
    match write {
        Write::Delete { id, token } => sql::q(&stmts.ack)
            .bind(id)
            .bind(token)
            .execute(&mut *conn)
            .await
            .map(|r| Written::Rows(r.rows_affected())),
        Write::Retry { id, token, delay } => sql::q(&stmts.retry)
            .bind(id)
            .bind(token)
            .bind(delay.as_secs_f64())
            .execute(&mut *conn)
            .await
            .map(|r| Written::Rows(r.rows_affected())),
        Write::DeadLetter {
            id,
            token,
            reason,
            last_exception,
        } => {
            let Some(dl) = &stmts.dead_letter else {
                return Err(no_dead_letter_table());
            };
            sql::q(dl)
                .bind(id)
                .bind(token)
                .bind(*reason)
                .bind(last_exception.as_deref())
                .execute(&mut *conn)
                .await
                .map(|r| Written::Rows(r.rows_affected()))
        }
        Write::DeleteBatch { ids, tokens } => {
            guarded_ids(&stmts.ack_batch, ids, tokens, conn).await
        }
        Write::Extend { ids, tokens } => guarded_ids(&stmts.extend, ids, tokens, conn).await,
    }
}

/// Runs a batched statement guarded by `(id, token)` pairs and returns the
/// ids it touched (`RETURNING id`): those whose lease still held.
async fn guarded_ids(
    stmt: &sql::Sql,
    ids: &[i64],
    tokens: &[Uuid],
    conn: &mut PgConnection,
) -> Result<Written, sqlx::Error> {
    let rows = sql::q(stmt).bind(ids).bind(tokens).fetch_all(conn).await?;
    rows.iter()
        .map(|r| r.try_get::<i64, _>(0))
        .collect::<Result<Vec<_>, _>>()
        .map(Written::Ids)
}

/// Claims up to `limit` rows of `queues` with a fresh token; expired leases
/// too when `with_expired`; only the heads of keys when `ordered`.
pub(crate) async fn claim(
    stmts: &Statements,
    conn: &mut Conn,
    args: &ClaimArgs<'_>,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    match conn {
        Conn::Pg(conn) => claim_pg(stmts, conn, args).await,
        Conn::Local(store) => Ok(store.claim(args)),
    }
}

async fn claim_pg(
    stmts: &Statements,
    conn: &mut PgConnection,
    args: &ClaimArgs<'_>,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let sql = match (args.ordered, args.with_expired) {
        (Some(_), with_expired) => stmts.claim_ordered(with_expired),
        (None, true) => &stmts.claim,
        (None, false) => &stmts.claim_pending,
    };
    run_claim(sql, conn, args).await
}

/// Runs a claim statement (a lease claim or a lot's) with `args`' bind
/// parameters; returns the rows in claim order.
async fn run_claim(
    sql: &sql::Sql,
    conn: &mut PgConnection,
    args: &ClaimArgs<'_>,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let limit = i64::try_from(args.limit).unwrap_or(i64::MAX);
    let ttl = args.lease_ttl.as_secs_f64();
    let mut out = if let Some(cursor) = args.ordered {
        // One statement per queue (the key walk is per queue), sharing the
        // limit; the token is the same, so the acks do not care.
        let mut out: Vec<OutboxRow> = Vec::new();
        for queue in args.queues {
            let room = limit - i64::try_from(out.len()).unwrap_or(i64::MAX);
            if room <= 0 {
                break;
            }
            let rows = sql::q_as::<OutboxRow>(sql)
                .bind(queue)
                .bind(room)
                .bind(ttl)
                .bind(args.token)
                .bind(cursor)
                .fetch_all(&mut *conn)
                .await?;
            out.extend(rows);
        }
        out
    } else {
        sql::q_as::<OutboxRow>(sql)
            .bind(args.queues)
            .bind(limit)
            .bind(ttl)
            .bind(args.token)
            .fetch_all(&mut *conn)
            .await?
    };
    // RETURNING is unordered; dispatch in claim order.
    out.sort_by_key(|r| (r.next_attempt_at, r.id));
    Ok(out)
}

/// How long until the earliest future-dated, unleased row of `queues` is
/// due (on the database clock), if there is one. The in-memory store answers
/// `None`: the test harness wakes subscribers itself when its clock moves.
pub(crate) async fn next_due(
    stmts: &Statements,
    conn: &mut Conn,
    queues: &[String],
) -> Result<Option<Duration>, sqlx::Error> {
    match conn {
        Conn::Pg(conn) => {
            let secs: Option<f64> = sqlx::query_scalar(sqlx::AssertSqlSafe(stmts.next_due.clone()))
                .bind(queues)
                .fetch_one(&mut *conn)
                .await?;
            Ok(secs.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
        }
        Conn::Local(_) => Ok(None),
    }
}

/// Releases leases of rows claimed but never started, and gives the claim
/// back (`deliveries_count - 1`), so another replica takes them at once.
pub(crate) async fn release(
    stmts: &Statements,
    conn: &mut Conn,
    ids: Vec<i64>,
    tokens: Vec<Uuid>,
) -> Result<u64, sqlx::Error> {
    match conn {
        Conn::Pg(conn) => release_pg(stmts, conn, ids, tokens).await,
        Conn::Local(store) => Ok(store.release(&ids, &tokens)),
    }
}

async fn release_pg(
    stmts: &Statements,
    conn: &mut PgConnection,
    ids: Vec<i64>,
    tokens: Vec<Uuid>,
) -> Result<u64, sqlx::Error> {
    sql::q(&stmts.release)
        .bind(ids)
        .bind(tokens)
        .execute(&mut *conn)
        .await
        .map(|r| r.rows_affected())
}

/// A new PostgreSQL connection for the engine's statements, made with `opts`.
pub(crate) async fn connect(opts: &PgConnectOptions) -> Result<Conn, sqlx::Error> {
    opts.connect().await.map(Conn::Pg)
}

/// A statement of an open transaction on `pg` failed with `e`: rolls the
/// transaction back (best effort; a broken connection is left to be
/// replaced) and gives `e` back.
pub(crate) async fn rollback_after(pg: &mut PgConnection, e: sqlx::Error) -> sqlx::Error {
    if !is_connection_error(&e) {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await;
    }
    e
}

/// Whether an error means the connection is unusable (reconnect and retry)
/// rather than the statement being refused.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03"),
        _ => false,
    }
}
