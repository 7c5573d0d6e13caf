//! The benchmark database: creating it, fresh tables, prefilling backlogs,
//! and the probe that reads PostgreSQL's own counters around a measurement.
//!
//! Every statement of the probe carries the comment [`PROBE`] and is left out
//! of the statement counts, as the Python harness leaves out its probe
//! (`NOT ILIKE '%pg_stat%'`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox_core::{OutboxBroker, OutboxTable};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, Row};

use crate::sys::{self, CpuSnap, round};

/// Marker comment of the probe's own statements.
pub(crate) const PROBE: &str = "/* outbox-bench-probe */";

/// Queue name every scenario uses.
pub(crate) const QUEUE: &str = "bench";

/// The server and database a run uses.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pub(crate) opts: PgConnectOptions,
    pub(crate) url: String,
    /// Fresh tables get the advised autovacuum settings instead of none.
    autovacuum: bool,
}

impl Db {
    /// Parses `url`, creates its database if missing (connecting to
    /// `postgres` on the same server) and the `pg_stat_statements` extension.
    pub(crate) async fn prepare(url: &str, autovacuum: bool) -> anyhow::Result<Self> {
        let opts: PgConnectOptions = url
            .parse()
            .with_context(|| format!("invalid --database-url {url:?}"))?;
        let opts = opts.application_name("outbox-bench");
        let name = opts
            .get_database()
            .context("--database-url needs a database name (e.g. .../outbox_bench)")?
            .to_owned();
        let admin = opts.clone().database("postgres");
        let mut conn = tokio::time::timeout(Duration::from_secs(15), admin.connect())
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {url} timed out after 15 s"))?
            .with_context(|| {
                format!(
                    "cannot connect to PostgreSQL at {url}; start the private benchmark cluster with \
                     `bash scripts/bench-pg.sh start`, or pass --database-url"
                )
            })?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            if let Err(e) = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await {
                let dup = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42P04" || c == "23505");
                if !dup {
                    return Err(e).context(format!("CREATE DATABASE {name}"));
                }
            }
        }
        conn.close().await.ok();
        let mut conn = opts
            .connect()
            .await
            .with_context(|| format!("connecting to database {name}"))?;
        if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await
        {
            eprintln!(
                "outbox-bench: WARNING: CREATE EXTENSION pg_stat_statements failed ({e}); statement \
                 counts will be missing"
            );
        }
        // The WAL split into records and full-page images (PostgreSQL 15+,
        // contrib); without it those fields are null.
        if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .execute(&mut conn)
            .await
        {
            eprintln!(
                "outbox-bench: note: CREATE EXTENSION pg_walinspect failed ({e}); the WAL's                  full-page-image share (wal_fpi_bytes_*) will be missing"
            );
        }
        if autovacuum {
            let on: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
                .fetch_one(&mut conn)
                .await?;
            anyhow::ensure!(
                on == "on",
                "--autovacuum needs autovacuum = on in the server (it is {on}); on the benchmark \
                 cluster: psql {url} -c \"ALTER SYSTEM SET autovacuum = on\" -c \"ALTER SYSTEM SET \
                 autovacuum_naptime = '1s'\" -c \"SELECT pg_reload_conf()\""
            );
        }
        conn.close().await.ok();
        Ok(Self {
            opts,
            url: url.to_owned(),
            autovacuum,
        })
    }

    /// A pool of up to `n` connections for producers and setup.
    pub(crate) async fn pool(&self, n: u32) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(n)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.opts.clone())
            .await?)
    }

    /// A pool that never connects unless asked (the engine opens its own
    /// connections from the pool's options).
    pub(crate) fn lazy_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(self.opts.clone())
    }

    /// A fresh `bench_<random>` outbox table with autovacuum off on it (as
    /// the Python harness does: the dead tuples a run leaves are a result),
    /// or, with `--autovacuum`, tuned as `outbox autovacuum` advises.
    async fn fresh_table(&self, pool: &PgPool) -> anyhow::Result<OutboxTable> {
        let name = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let table = OutboxTable::new(&name)?;
        table.migrate(pool).await?;
        let sql = if self.autovacuum {
            outbox_core::ops::autovacuum_sql(&table, outbox_core::ops::AutovacuumOptions::default())
        } else {
            format!(
                "ALTER TABLE {} SET (autovacuum_enabled = false)",
                table.qualified_name()
            )
        };
        sqlx::query(AssertSqlSafe(sql)).execute(pool).await?;
        Ok(table)
    }

    /// Runs `f` on a fresh table (see [`fresh_table`](Self::fresh_table)),
    /// and drops the table afterwards, whatever `f` returned.
    pub(crate) async fn with_fresh_table<T>(
        &self,
        f: impl AsyncFnOnce(&OutboxTable) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let setup = self.pool(2).await?;
        let table = self.fresh_table(&setup).await?;
        setup.close().await;
        let result = f(&table).await;
        if let Err(e) = self.drop_table(&table).await {
            eprintln!(
                "outbox-bench: could not drop {}: {e}",
                table.qualified_name()
            );
        }
        result
    }

    /// Drops a table made by [`fresh_table`](Self::fresh_table).
    async fn drop_table(&self, table: &OutboxTable) -> anyhow::Result<()> {
        let mut conn = self.opts.connect().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            table.qualified_name()
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok(())
    }
}

/// A broker over `pool` and `table`.
pub(crate) fn broker(pool: PgPool, table: OutboxTable) -> OutboxBroker {
    OutboxBroker::new(pool, table)
}

/// The body every scenario publishes: `{"payload":"xxx…"}`, exactly
/// `payload_bytes` long once JSON-encoded (at least 14 bytes).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Body {
    payload: String,
}

impl Body {
    pub(crate) fn new(payload_bytes: usize) -> Self {
        Self {
            payload: "x".repeat(payload_bytes.saturating_sub(14)),
        }
    }
}

/// Inserts `n` ready rows into `table` server-side (`INSERT … SELECT
/// generate_series`, 100,000 rows per transaction, no NOTIFY), with the
/// envelope `publish_batch` would write for a [`Body`]: JSON payload,
/// `content-type: application/json`, a fresh correlation id each. Then
/// `VACUUM ANALYZE` (what autovacuum would have done by then), so that every
/// run starts from the same state. Outside any measurement.
pub(crate) async fn prefill(
    db: &Db,
    table: &OutboxTable,
    n: u64,
    payload_bytes: usize,
) -> anyhow::Result<Duration> {
    Ok(prefill_keyed(db, table, n, payload_bytes, 0).await?.took)
}

/// What writing a backlog cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefilled {
    /// Rows written.
    pub(crate) rows: u64,
    /// Wall time, including the `VACUUM ANALYZE`.
    pub(crate) took: Duration,
    /// WAL the `INSERT`s wrote (`pg_current_wal_lsn()` before the first and
    /// after the last commit; the `VACUUM ANALYZE` after them is left out):
    /// the producer's share of a backlog's WAL.
    pub(crate) wal_bytes: u64,
    /// Of which full-page images (`pg_walinspect`; `None` without it).
    pub(crate) wal_fpi_bytes: Option<u64>,
}

/// The ordering key of the `i`-th row (1-based) of a backlog over `keys`
/// keys: `k<i mod keys>`, so the keys interleave in id order (each key's rows
/// are `keys` ids apart), as in the research's experiment 3.
pub(crate) fn key_of(i: u64, keys: u64) -> String {
    format!("k{}", i % keys.max(1))
}

/// Rows of a `n`-row backlog over `keys` keys that carry the key `k0`
/// (see [`key_of`]): the rows of the poisoned key.
pub(crate) fn rows_of_k0(n: u64, keys: u64) -> u64 {
    n.checked_div(keys).unwrap_or(0)
}

/// [`prefill`] with an `ordering_key` on every row when `keys > 0`: row `i`
/// gets [`key_of`]`(i, keys)`. Written server-side, as the keyless backlog:
/// the table then holds exactly what `publish_with(.., PublishOptions::key(..))`
/// would have written (the key lock a keyed publish takes leaves nothing
/// behind once its transaction ended).
pub(crate) async fn prefill_keyed(
    db: &Db,
    table: &OutboxTable,
    n: u64,
    payload_bytes: usize,
    keys: u64,
) -> anyhow::Result<Prefilled> {
    let t0 = Instant::now();
    let mut conn = db.opts.connect().await?;
    let lsn_sql = format!("SELECT {PROBE} pg_current_wal_lsn()::text");
    let lsn_before: String = sqlx::query_scalar(AssertSqlSafe(lsn_sql.clone()))
        .fetch_one(&mut conn)
        .await?;
    let (key_col, key_val) = if keys > 0 {
        (", ordering_key", ", 'k' || ((g + $4) % $5)::text")
    } else {
        ("", "")
    };
    let sql = format!(
        "INSERT INTO {} (queue, payload, headers{key_col}) \
         SELECT $1, convert_to('{{\"payload\":\"' || repeat('x', $2) || '\"}}', 'UTF8'), \
         jsonb_build_object('content-type', 'application/json', 'correlation_id', gen_random_uuid()::text){key_val} \
         FROM generate_series(1, $3) AS g",
        table.qualified_name()
    );
    let mut left = n;
    let mut done = 0u64;
    while left > 0 {
        let chunk = left.min(100_000);
        let mut q = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(QUEUE)
            .bind(i32::try_from(payload_bytes.saturating_sub(14)).unwrap_or(i32::MAX))
            .bind(i64::try_from(chunk)?);
        if keys > 0 {
            q = q.bind(i64::try_from(done)?).bind(i64::try_from(keys)?);
        }
        q.execute(&mut conn)
            .await
            .context("prefilling the backlog")?;
        left -= chunk;
        done += chunk;
    }
    let lsn_after: String = sqlx::query_scalar(AssertSqlSafe(lsn_sql))
        .fetch_one(&mut conn)
        .await?;
    let (lsn_before, lsn_after) = (parse_lsn(&lsn_before)?, parse_lsn(&lsn_after)?);
    let wal_bytes = lsn_after.saturating_sub(lsn_before);
    let wal_fpi_bytes = wal_stats(&mut conn, lsn_before, lsn_after)
        .await
        .map(|w| w.fpi_bytes());
    sqlx::query(AssertSqlSafe(format!(
        "VACUUM ANALYZE {}",
        table.qualified_name()
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await.ok();
    Ok(Prefilled {
        rows: n,
        took: t0.elapsed(),
        wal_bytes,
        wal_fpi_bytes,
    })
}

/// The WAL between two LSNs by resource manager (`pg_walinspect`'s
/// `pg_get_wal_stats`): name -> (records, record bytes, full-page-image
/// bytes).
#[derive(Debug, Clone, Default)]
pub(crate) struct WalStats(pub(crate) Vec<(String, i64, i64, i64)>);

impl WalStats {
    pub(crate) fn fpi_bytes(&self) -> u64 {
        u64::try_from(self.0.iter().map(|r| r.3).sum::<i64>()).unwrap_or(0)
    }
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// [`WalStats`] of `[from, to)`; `None` without `pg_walinspect`, or when
/// the range's WAL files were already recycled (a long point).
pub(crate) async fn wal_stats(conn: &mut PgConnection, from: u64, to: u64) -> Option<WalStats> {
    if to <= from {
        return Some(WalStats::default());
    }
    // pg_walinspect reads flushed WAL only; asynchronous commits (the
    // engine's acks) leave it to the WAL writer (wal_writer_delay, 200 ms).
    let flush_sql = format!("SELECT {PROBE} pg_current_wal_flush_lsn()::text");
    for _ in 0..40 {
        let flushed: Option<String> = sqlx::query_scalar(AssertSqlSafe(flush_sql.clone()))
            .fetch_one(&mut *conn)
            .await
            .ok();
        match flushed.as_deref().map(parse_lsn) {
            Some(Ok(f)) if f >= to => break,
            Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break,
        }
    }
    let rows = sqlx::query_as::<_, (String, i64, i64, i64)>(AssertSqlSafe(format!(
        "SELECT {PROBE} \"resource_manager/record_type\", count, record_size::int8, \
         fpi_size::int8 FROM pg_get_wal_stats($1::pg_lsn, $2::pg_lsn) WHERE count > 0"
    )))
    .bind(lsn_text(from))
    .bind(lsn_text(to))
    .fetch_all(conn)
    .await;
    match rows {
        Ok(r) => Some(WalStats(r)),
        Err(e) => {
            if !e.to_string().contains("pg_get_wal_stats") {
                eprintln!("outbox-bench: note: no WAL detail: {e}");
            }
            None
        }
    }
}

/// A long transaction held open in another session for a whole point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Hold {
    /// No other session.
    None,
    /// `BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;`, then idle in
    /// transaction: an old snapshot (it holds back the xmin horizon that
    /// VACUUM and page pruning respect) but no transaction id.
    Snapshot,
    /// `BEGIN; SELECT txid_current();`, then idle in transaction: a running
    /// transaction id, as any writing transaction has. Besides the horizon,
    /// it holds back every snapshot's `xmin` (what an xmin fence reads).
    Xid,
}

/// The session of a [`Hold`] (its statements carry the probe marker, so they
/// are not counted).
#[derive(Debug)]
pub(crate) struct Holder {
    conn: PgConnection,
}

impl Holder {
    /// Opens the long transaction; `None` for [`Hold::None`].
    pub(crate) async fn open(db: &Db, hold: Hold) -> anyhow::Result<Option<Self>> {
        let (begin, first) = match hold {
            Hold::None => return Ok(None),
            Hold::Snapshot => ("BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT 1"),
            Hold::Xid => ("BEGIN", "SELECT txid_current()"),
        };
        let mut conn = db
            .opts
            .clone()
            .application_name("outbox-bench-long-tx")
            .connect()
            .await?;
        for sql in [begin, first] {
            sqlx::query(AssertSqlSafe(format!("{PROBE} {sql}")))
                .execute(&mut conn)
                .await
                .with_context(|| format!("long transaction: {sql}"))?;
        }
        Ok(Some(Self { conn }))
    }

    /// Ends the transaction (COMMIT) and the session.
    pub(crate) async fn end(mut self) -> anyhow::Result<()> {
        sqlx::query(AssertSqlSafe(format!("{PROBE} COMMIT")))
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await.ok();
        Ok(())
    }
}

/// What an xmin-fence reader (Watermill's PostgreSQL subscriber reads only
/// rows whose inserting transaction is older than every running one) would
/// see of `table` now: (rows passing the fence, rows).
pub(crate) async fn xmin_fence(db: &Db, table: &OutboxTable) -> anyhow::Result<(i64, i64)> {
    let mut conn = db.opts.connect().await?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {PROBE} count(*) FILTER (WHERE xmin::text::bigint < \
         txid_snapshot_xmin(txid_current_snapshot())), count(*) FROM {}",
        table.qualified_name()
    )))
    .fetch_one(&mut conn)
    .await?;
    conn.close().await.ok();
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Drops `<t>_key_idx` (the index an ordered claim walks), for the baseline
/// of its insert cost.
pub(crate) async fn drop_key_index(db: &Db, table: &OutboxTable) -> anyhow::Result<()> {
    let mut conn = db.opts.connect().await?;
    let idx = format!("{}_key_idx", table.name());
    let schema = table
        .schema_name()
        .map(|s| format!("\"{}\".", s.replace('"', "\"\"")))
        .unwrap_or_default();
    sqlx::query(AssertSqlSafe(format!(
        "{PROBE} DROP INDEX {schema}\"{}\"",
        idx.replace('"', "\"\"")
    )))
    .execute(&mut conn)
    .await
    .with_context(|| format!("DROP INDEX {idx}"))?;
    conn.close().await.ok();
    Ok(())
}

/// One statement's counters in `pg_stat_statements`.
#[derive(Debug, Clone)]
struct Stmt {
    query: String,
    calls: i64,
    total_ms: f64,
    rows: i64,
}

/// The table's counters in `pg_stat_user_tables`.
#[derive(Debug, Clone, Copy, Default)]
struct TableStats {
    ins: i64,
    upd: i64,
    hot_upd: i64,
    del: i64,
    dead: i64,
}

/// PostgreSQL's counters at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    stmts: Option<HashMap<(i64, i64), Stmt>>,
    lsn: u64,
    /// `pg_stat_wal` (cluster-wide): WAL records and full-page images.
    wal_stat: Option<(i64, i64)>,
    table: TableStats,
    cpu: CpuSnap,
}

/// The probe: one dedicated connection.
#[derive(Debug)]
pub(crate) struct Probe {
    conn: PgConnection,
    postmaster: Option<i64>,
    has_pss: bool,
}

fn parse_lsn(s: &str) -> anyhow::Result<u64> {
    let (hi, lo) = s.split_once('/').context("malformed LSN")?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

fn keyword(query: &str) -> &'static str {
    let mut q = query.trim_start();
    // Skip leading comments.
    loop {
        if let Some(rest) = q.strip_prefix("/*") {
            q = rest.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else if let Some(rest) = q.strip_prefix("--") {
            q = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    let word: String = q
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    match word.as_str() {
        "select" => "select",
        "insert" => "insert",
        "update" => "update",
        "delete" => "delete",
        "with" => "with",
        "begin" | "start" => "begin",
        "commit" | "end" => "commit",
        "rollback" => "rollback",
        "listen" => "listen",
        _ => "other",
    }
}

impl Probe {
    pub(crate) async fn connect(db: &Db) -> anyhow::Result<Self> {
        let mut conn = db
            .opts
            .clone()
            .application_name("outbox-bench-probe")
            .connect()
            .await?;
        let pid: i32 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT {PROBE} pg_backend_pid()")))
                .fetch_one(&mut conn)
                .await?;
        let has_pss = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROBE} 1 FROM pg_stat_statements LIMIT 1"
        )))
        .fetch_optional(&mut conn)
        .await
        .is_ok();
        if !has_pss {
            eprintln!(
                "outbox-bench: WARNING: pg_stat_statements is not usable on {} (not in \
                 shared_preload_libraries?): no statement counts. `bash scripts/bench-pg.sh start` \
                 gives a server with it",
                db.url
            );
        }
        Ok(Self {
            conn,
            postmaster: sys::postmaster_of(pid),
            has_pss,
        })
    }

    async fn exec(&mut self, sql: &str) -> anyhow::Result<()> {
        sqlx::query(AssertSqlSafe(format!("{PROBE} {sql}")))
            .execute(&mut self.conn)
            .await
            .with_context(|| format!("probe: {sql}"))?;
        Ok(())
    }

    /// `CHECKPOINT`, so that every run starts with the same WAL state (the
    /// full-page images after it are part of the result, as in the Python harness).
    pub(crate) async fn checkpoint(&mut self) -> anyhow::Result<()> {
        self.exec("CHECKPOINT").await
    }

    /// Waits until at most `keep` other client backends are connected to this
    /// database, so the statistics of the others are flushed (a backend
    /// flushes at exit).
    pub(crate) async fn wait_backends_gone(
        &mut self,
        keep: i64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT {PROBE} count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )))
            .fetch_one(&mut self.conn)
            .await?;
            if n <= keep {
                return Ok(());
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "outbox-bench: WARNING: {n} other client connection(s) still on the database after \
                     {timeout:?}; table statistics may be incomplete"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rows in `table` (outside the statement counts).
    pub(crate) async fn count(&mut self, table: &OutboxTable) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {PROBE} count(*) FROM {}",
            table.qualified_name()
        )))
        .fetch_one(&mut self.conn)
        .await?)
    }

    pub(crate) async fn snapshot(&mut self, table: &OutboxTable) -> anyhow::Result<Snapshot> {
        let stmts = if self.has_pss {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {PROBE} queryid, userid::oid::int8, query, calls, total_exec_time, rows \
                 FROM pg_stat_statements WHERE toplevel AND queryid IS NOT NULL \
                 AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )))
            .fetch_all(&mut self.conn)
            .await
            .context("reading pg_stat_statements")?;
            let mut map = HashMap::with_capacity(rows.len());
            for r in rows {
                let query: String = r.try_get(2)?;
                if query.contains(PROBE) || query.to_ascii_lowercase().contains("pg_stat") {
                    continue;
                }
                map.insert(
                    (r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?),
                    Stmt {
                        query,
                        calls: r.try_get(3)?,
                        total_ms: r.try_get(4)?,
                        rows: r.try_get(5)?,
                    },
                );
            }
            Some(map)
        } else {
            None
        };
        let lsn: String = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {PROBE} pg_current_wal_lsn()::text"
        )))
        .fetch_one(&mut self.conn)
        .await?;
        // PostgreSQL 14+; backends flush it at exit, and the window waits
        // for the workload's connections to be gone first.
        let wal_stat = sqlx::query_as::<_, (i64, i64)>(AssertSqlSafe(format!(
            "SELECT {PROBE} wal_records, wal_fpi FROM pg_stat_wal"
        )))
        .fetch_optional(&mut self.conn)
        .await
        .ok()
        .flatten();
        let t = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PROBE} n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, n_dead_tup \
             FROM pg_stat_user_tables WHERE relid = $1::regclass"
        )))
        .bind(table.qualified_name())
        .fetch_optional(&mut self.conn)
        .await?;
        let table = match t {
            Some(r) => TableStats {
                ins: r.try_get(0)?,
                upd: r.try_get(1)?,
                hot_upd: r.try_get(2)?,
                del: r.try_get(3)?,
                dead: r.try_get(4)?,
            },
            None => TableStats::default(),
        };
        Ok(Snapshot {
            stmts,
            lsn: parse_lsn(&lsn)?,
            wal_stat,
            table,
            cpu: CpuSnap::take(self.postmaster),
        })
    }

    /// [`wal_stats`] between two snapshots.
    pub(crate) async fn wal_between(
        &mut self,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Option<WalStats> {
        wal_stats(&mut self.conn, before.lsn, after.lsn).await
    }

    /// CPU counters only (for the measurement window's end, taken before the
    /// slower catalog reads).
    pub(crate) fn cpu(&self) -> CpuSnap {
        CpuSnap::take(self.postmaster)
    }
}

/// What PostgreSQL did between two snapshots, per message.
#[derive(Debug, Clone, Default)]
pub(crate) struct Delta {
    /// Statement calls grouped by leading keyword (`None`: no pg_stat_statements).
    pub(crate) by_keyword: Option<Vec<(&'static str, i64)>>,
    pub(crate) calls: Option<i64>,
    pub(crate) wal_bytes: u64,
    /// WAL records and full-page images (`pg_stat_wal`), when available.
    pub(crate) wal_records: Option<i64>,
    pub(crate) wal_fpi: Option<i64>,
    pub(crate) tup_ins: i64,
    pub(crate) tup_upd: i64,
    pub(crate) tup_hot_upd: i64,
    pub(crate) tup_del: i64,
    pub(crate) dead_tuples: i64,
    /// Per statement: (text, calls, total ms, rows), by total time.
    pub(crate) statements: Vec<(String, i64, f64, i64)>,
    pub(crate) exec_ms: Option<f64>,
    pub(crate) cpu: Value,
}

impl Delta {
    /// `cpu_end` is taken when the measured window ended; the snapshots
    /// after it may come later (after the engine's connections closed).
    pub(crate) fn between(before: &Snapshot, after: &Snapshot, cpu_end: &CpuSnap) -> Self {
        let mut by_kw: HashMap<&'static str, i64> = HashMap::new();
        let mut statements = Vec::new();
        let (mut calls, mut exec_ms) = (None, None);
        if let (Some(b), Some(a)) = (&before.stmts, &after.stmts) {
            let (mut c, mut ms) = (0, 0.0);
            for (k, s) in a {
                let (c0, t0, r0) = b
                    .get(k)
                    .map_or((0, 0.0, 0), |p| (p.calls, p.total_ms, p.rows));
                let dc = s.calls - c0;
                if dc <= 0 {
                    continue;
                }
                c += dc;
                ms += s.total_ms - t0;
                *by_kw.entry(keyword(&s.query)).or_default() += dc;
                statements.push((s.query.clone(), dc, s.total_ms - t0, s.rows - r0));
            }
            calls = Some(c);
            exec_ms = Some(ms);
        }
        statements.sort_by(|a, b| b.2.total_cmp(&a.2));
        let by_keyword = before.stmts.as_ref().map(|_| {
            let mut v: Vec<(&'static str, i64)> = by_kw.into_iter().collect();
            v.sort();
            v
        });
        Self {
            by_keyword,
            calls,
            wal_bytes: after.lsn.saturating_sub(before.lsn),
            wal_records: before.wal_stat.zip(after.wal_stat).map(|(b, a)| a.0 - b.0),
            wal_fpi: before.wal_stat.zip(after.wal_stat).map(|(b, a)| a.1 - b.1),
            tup_ins: after.table.ins - before.table.ins,
            tup_upd: after.table.upd - before.table.upd,
            tup_hot_upd: after.table.hot_upd - before.table.hot_upd,
            tup_del: after.table.del - before.table.del,
            dead_tuples: after.table.dead,
            statements,
            exec_ms,
            cpu: before.cpu.delta(cpu_end),
        }
    }

    /// The JSON fields of a result that come from PostgreSQL.
    pub(crate) fn to_json(&self, messages: u64, top: usize) -> Value {
        let m = messages.max(1) as f64;
        let per = |v: i64| round(v as f64 / m, 4);
        let text = |q: &str| {
            let one: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
            if one.chars().count() > 160 {
                format!("{}…", one.chars().take(160).collect::<String>())
            } else {
                one
            }
        };
        json!({
            "round_trips_per_msg": self.calls.map(per),
            "statements_per_msg": self.by_keyword.as_ref().map(|v| {
                v.iter().map(|(k, c)| ((*k).to_owned(), json!(per(*c)))).collect::<serde_json::Map<_, _>>()
            }),
            "statement_calls": self.by_keyword.as_ref().map(|v| {
                v.iter().map(|(k, c)| ((*k).to_owned(), json!(c))).collect::<serde_json::Map<_, _>>()
            }),
            "wal_bytes_per_msg": round(self.wal_bytes as f64 / m, 1),
            "wal_bytes": self.wal_bytes,
            "wal_records_per_msg": self.wal_records.map(per),
            "wal_fpi_per_msg": self.wal_fpi.map(per),
            "tuples": {
                "inserted": self.tup_ins, "updated": self.tup_upd,
                "hot_updated": self.tup_hot_upd, "deleted": self.tup_del,
            },
            "dead_tuples": self.dead_tuples,
            "dead_tuples_per_msg": per(self.dead_tuples),
            "pg_exec_ms_per_msg": self.exec_ms.map(|ms| round(ms / m, 5)),
            "cpu": self.cpu,
            "top_statements": self.statements.iter().take(top).map(|(q, c, ms, rows)| json!({
                "query": text(q),
                "calls": c,
                "calls_per_msg": per(*c),
                "total_ms": round(*ms, 2),
                "mean_ms": round(ms / (*c).max(1) as f64, 4),
                "rows": rows,
                "rows_per_call": round(*rows as f64 / (*c).max(1) as f64, 2),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_skip_comments() {
        assert_eq!(keyword("  /* x */ SELECT 1"), "select");
        assert_eq!(keyword("WITH a AS (SELECT 1) SELECT 1"), "with");
        assert_eq!(keyword("-- c\nDELETE FROM t"), "delete");
        assert_eq!(keyword("BEGIN"), "begin");
        assert_eq!(keyword("COMMIT"), "commit");
        assert_eq!(keyword("listen \"x\""), "listen");
        assert_eq!(keyword("VACUUM t"), "other");
    }

    #[test]
    fn keys_interleave_and_k0_is_counted() {
        assert_eq!(key_of(1, 1000), "k1");
        assert_eq!(key_of(1000, 1000), "k0");
        // Rows 1..=n: k0 is every keys-th row.
        let n = 100_000;
        let k0 = (1..=n).filter(|i| key_of(*i, 1000) == "k0").count() as u64;
        assert_eq!(rows_of_k0(n, 1000), k0);
        assert_eq!(rows_of_k0(10, 0), 0);
    }

    #[test]
    fn lsn_prints_as_postgres_reads_it() {
        for lsn in [0x16B3748u64, 1 << 32, (5 << 32) | 0xAB] {
            assert_eq!(parse_lsn(&lsn_text(lsn)).ok(), Some(lsn));
        }
        assert_eq!(lsn_text(0x16B3748), "0/16B3748");
    }

    #[test]
    fn lsn_parses() {
        assert_eq!(parse_lsn("0/16B3748").ok(), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0").ok(), Some(1 << 32));
        assert!(parse_lsn("nope").is_err());
    }
}
