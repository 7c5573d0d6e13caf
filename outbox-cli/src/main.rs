//! `outbox`: the operations tool of the PostgreSQL transactional outbox.
//!
//! Creates and checks the tables, shows per-queue statistics, peeks at the
//! next rows, and lists, shows, replays and purges dead letters. Built on
//! [`outbox_core::ops`]; see `docs/operations.md` and `outbox --help`.
//! `outbox docs gen|serve` writes and serves an application's AsyncAPI
//! document (`docs.rs`, `html.rs`); `outbox serve` the operator dashboard
//! (`serve.rs`).

mod docs;
mod html;
mod output;
mod serve;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand};
use outbox_core::inbox::Inbox;
use outbox_core::ops::{
    AutovacuumOptions, DlqFilter, ReplayOptions, ReplayProgress, ReplayTimers, autovacuum_sql,
};
use outbox_core::{DlqTable, OutboxBroker, OutboxTable};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::output::{Failure, exit};

const GLOBAL: &str = "Global options";

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime error (database unreachable or failing, not found, aborted)
  2  usage error (bad arguments, refused destructive command)
  3  schema problem (`validate` found drift, or a table is missing: run `outbox migrate`)

Environment:
  DATABASE_URL  default for --database-url, e.g. postgres://user:pass@host:5432/db
  RUST_LOG      log filter for diagnostics on stderr (default: warn)";

/// Operate a PostgreSQL transactional outbox (tables compatible with faststream-outbox 0.19).
#[derive(Debug, Parser)]
#[command(name = "outbox", version, after_help = EXIT_CODES, max_term_width = 100)]
struct Cli {
    /// PostgreSQL URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE).
    #[arg(long, env = "DATABASE_URL", global = true, help_heading = GLOBAL, hide_env_values = true)]
    database_url: Option<String>,

    /// The outbox table.
    #[arg(long, global = true, help_heading = GLOBAL, default_value = "outbox")]
    table: String,

    /// The schema of both tables (default: the connection's search_path).
    #[arg(long, global = true, help_heading = GLOBAL)]
    schema: Option<String>,

    /// The dead-letter table [default: <TABLE>_dlq, i.e. outbox_dlq, faststream-outbox's name].
    #[arg(long, global = true, help_heading = GLOBAL)]
    dlq_table: Option<String>,

    /// Work without a dead-letter table.
    #[arg(long, global = true, help_heading = GLOBAL, conflicts_with = "dlq_table")]
    no_dlq: bool,

    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true, help_heading = GLOBAL)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the outbox and dead-letter tables, their indexes and the lease
    /// CHECK where missing (idempotent).
    Migrate {
        #[command(flatten)]
        inbox: InboxArg,
    },
    /// Print the DDL of both tables (no database needed).
    Sql {
        #[command(flatten)]
        inbox: InboxArg,
    },
    /// Compare the live tables with what the engine needs; on drift, print
    /// every problem and the DDL that fixes it, and exit with 3.
    Validate {
        /// Also require autovacuum tuned for a queue table on the outbox
        /// table (scale factors 0, thresholds set; see `outbox autovacuum`).
        #[arg(long)]
        autovacuum: bool,
    },
    /// Per-queue counts: ready, leased, scheduled, oldest ready age (the relay
    /// lag) and dead letters.
    Stats {
        /// Only these queues (repeatable); listed even when empty.
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
        /// Refresh every SECS seconds (default 2; or a duration such as
        /// 500ms, 1m) until interrupted; with --json, one JSON document per line.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
            value_parser = parse_interval)]
        watch: Option<Duration>,
    },
    /// Show the next rows of a queue (by id) with decoded bodies and headers,
    /// without leasing them.
    Peek {
        /// The queue.
        queue: String,
        /// At most this many rows.
        #[arg(long, default_value_t = 10)]
        limit: i64,
    },
    /// Inspect, replay and purge dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print the ALTER TABLE that tunes autovacuum for the outbox (no database
    /// needed). Every message is an insert, a non-HOT lease update and a
    /// delete: the default scale factors let a busy outbox bloat.
    Autovacuum(AutovacuumArgs),
    /// The AsyncAPI 3.0 document of an application built on outbox_core::App
    /// (its binary runs with OUTBOX_ASYNCAPI set, writes it and exits): write
    /// it as JSON or YAML, or serve it as an HTML page (no database needed).
    #[command(subcommand)]
    Docs(docs::DocsCommand),
    /// Serve the operator dashboard (queues, relay rate, dead letters,
    /// relays, rows) over HTTP until interrupted; read-only unless
    /// --allow-writes.
    Serve(serve::ServeArgs),
}

/// The inbox table of a consuming service (`outbox_core::inbox`).
#[derive(Debug, Args)]
struct InboxArg {
    /// Also the inbox table TABLE of consuming services (`outbox_core::inbox`;
    /// one table serves every consumer; in --schema when given).
    #[arg(long, value_name = "TABLE")]
    inbox: Option<String>,
}

impl InboxArg {
    /// The inbox table's definition (the consumer name does not matter to
    /// its DDL).
    fn table(&self, cli: &Cli) -> Result<Option<Inbox>, Failure> {
        let Some(name) = &self.inbox else {
            return Ok(None);
        };
        let mut inbox = Inbox::new(name, "outbox-cli").map_err(Failure::from_core)?;
        if let Some(s) = &cli.schema {
            inbox = inbox.schema(s).map_err(Failure::from_core)?;
        }
        Ok(Some(inbox))
    }
}

// The settings `outbox autovacuum` prints (the variant documents the command).
#[derive(Debug, Args)]
struct AutovacuumArgs {
    /// autovacuum_vacuum_threshold (dead rows; scale factor 0).
    #[arg(long, default_value_t = 1000)]
    threshold: u64,
    /// autovacuum_vacuum_insert_threshold [default: --threshold].
    #[arg(long)]
    insert_threshold: Option<u64>,
    /// autovacuum_vacuum_cost_delay in milliseconds (0 to 100).
    #[arg(long, value_name = "MS")]
    cost_delay: Option<f64>,
    /// autovacuum_vacuum_cost_limit (1 to 10000).
    #[arg(long)]
    cost_limit: Option<u32>,
}

/// Time criteria and the queue/reason filters shared by the dlq commands.
#[derive(Debug, Args)]
struct FilterArgs {
    /// Only dead letters of this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only this failure reason (max_deliveries, retry_terminal, rejected).
    #[arg(long)]
    reason: Option<String>,
    /// Only rows that failed at or after this time: RFC 3339
    /// (2026-05-01T12:00:00Z), a date (2026-05-01, UTC) or an age such as 30m, 2h, 7d.
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    since: Option<DateTime<Utc>>,
    /// Only rows that failed before this time (same formats as --since).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
}

/// Which dead letters a destructive command touches.
#[derive(Debug, Args)]
struct Selection {
    /// These dead-letter ids (the `id` column shown by `dlq list`), comma-separated.
    #[arg(long, value_delimiter = ',', num_args = 1.., value_name = "ID,...")]
    ids: Option<Vec<i64>>,
    #[command(flatten)]
    filter: FilterArgs,
    /// At most this many rows (the oldest first).
    #[arg(long)]
    limit: Option<u64>,
    /// Every dead letter (required when no other filter is given).
    #[arg(long, conflicts_with_all = ["ids", "queue", "reason", "since", "until"])]
    all: bool,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// Show one dead letter: headers, decoded body, last exception.
    Show {
        /// The dead-letter id.
        id: i64,
    },
    /// Move dead letters back into the outbox (same queue, payload and headers;
    /// fresh attempts), batch by batch, each batch atomic.
    #[command(group(ArgGroup::new("selection").required(true).multiple(true)
        .args(["ids", "queue", "reason", "since", "until", "all"])))]
    Replay {
        #[command(flatten)]
        selection: Selection,
        /// Show what would be replayed and skipped; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Dead letters per statement.
        #[arg(long, default_value_t = outbox_core::ops::DEFAULT_REPLAY_BATCH_SIZE)]
        batch_size: u64,
        /// Replay without timer ids instead of skipping rows whose
        /// (queue, timer_id) is live in the outbox.
        #[arg(long)]
        drop_timer_ids: bool,
    },
    /// Delete dead letters for good. Asks for confirmation on a terminal;
    /// without a terminal, --yes is required.
    #[command(group(ArgGroup::new("selection").required(true).multiple(true)
        .args(["ids", "queue", "reason", "since", "until", "all"])))]
    Purge {
        #[command(flatten)]
        selection: Selection,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// RFC 3339, a date (midnight UTC), or an age (`90s`, `30m`, `2h`, `7d`,
/// `1h 30m`: a [`humantime`] duration) counted back from now.
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let bad = |why: &str| {
        format!(
            "expected RFC 3339 (2026-05-01T12:00:00Z), a date (2026-05-01, midnight UTC) \
             or an age such as 90s, 30m, 2h, 7d{why}"
        )
    };
    let age = humantime::parse_duration(s).map_err(|e| {
        // Say what is wrong with what looks like an age ("30x": the unit).
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            bad(&format!(" (as an age: {e})"))
        } else {
            bad("")
        }
    })?;
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .ok_or_else(|| bad(" (this age reaches before the earliest representable time)"))
}

/// The `--watch` interval: seconds (`2`, `0.5`) or a [`humantime`] duration
/// (`500ms`, `1m`), at least 100 ms.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let every = match s.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| {
            format!("expected a number of seconds (2) or a duration (500ms, 1m): {e}")
        })?,
        Err(_) => humantime::parse_duration(s).map_err(|e| {
            format!("expected a number of seconds (2) or a duration (500ms, 1m): {e}")
        })?,
    };
    if every < Duration::from_millis(100) {
        return Err("must be at least 0.1 seconds".to_owned());
    }
    Ok(every)
}

impl FilterArgs {
    fn to_filter(&self, base: DlqFilter) -> DlqFilter {
        let mut f = base;
        if let Some(q) = &self.queue {
            f = f.queue(q.clone());
        }
        if let Some(r) = &self.reason {
            f = f.reason(r.clone());
        }
        if let Some(s) = self.since {
            f = f.since(s);
        }
        if let Some(u) = self.until {
            f = f.until(u);
        }
        f
    }
}

impl Selection {
    fn to_filter(&self) -> DlqFilter {
        let base = if self.all {
            DlqFilter::all()
        } else {
            DlqFilter::new()
        };
        let mut f = self.filter.to_filter(base);
        if let Some(ids) = &self.ids {
            f = f.ids(ids.iter().copied());
        }
        if let Some(n) = self.limit {
            f = f.limit(n);
        }
        f
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli).await {
        Ok(code) => code,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // sqlx logs every slow statement at WARN; a large replay batch is slow by design.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The table definitions given by the global options.
struct Tables {
    table: OutboxTable,
    dlq: Option<DlqTable>,
}

fn tables(cli: &Cli) -> Result<Tables, Failure> {
    let mut table = OutboxTable::new(&cli.table).map_err(Failure::from_core)?;
    if let Some(s) = &cli.schema {
        table = table.schema(s).map_err(Failure::from_core)?;
    }
    let dlq = if cli.no_dlq {
        None
    } else {
        let (name, default) = match &cli.dlq_table {
            Some(n) => (n.clone(), false),
            None => (format!("{}_dlq", cli.table), true),
        };
        let mut d = DlqTable::new(&name).map_err(|e| {
            let mut f = Failure::from_core(e);
            if default {
                f.message.push_str(
                    " (this is the default dead-letter table name <TABLE>_dlq; \
                     pass --dlq-table NAME or --no-dlq)",
                );
            }
            f
        })?;
        if let Some(s) = &cli.schema {
            d = d.schema(s).map_err(Failure::from_core)?;
        }
        Some(d)
    };
    Ok(Tables { table, dlq })
}

/// Connects with a clear error naming the host, port, database and user
/// (never the password) and what to check.
async fn connect(cli: &Cli) -> Result<PgPool, Failure> {
    let Some(url) = cli.database_url.as_deref() else {
        return Err(Failure::usage(
            "no database given: set DATABASE_URL or pass --database-url \
             postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        ));
    };
    let opts: PgConnectOptions = url.parse().map_err(|e| {
        Failure::usage(format!(
            "invalid database URL ({e}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        ))
    })?;
    let opts = opts.application_name("outbox-cli");
    let target = format!(
        "PostgreSQL at {}:{} (database {:?}, user {:?})",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or(opts.get_username()),
        opts.get_username()
    );
    // One direct connection first: the pool would retry until its timeout
    // and report only that; this reports the real cause at once.
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts)).await;
    match probe {
        Err(_) => {
            return Err(Failure::runtime(output::describe_connect_timeout(
                &target,
                CONNECT_TIMEOUT,
            )));
        }
        Ok(Err(e)) => {
            return Err(Failure::runtime(output::describe_connect_error(
                &e, &target,
            )));
        }
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
    }
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(opts))
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that the outbox table (and, if `need_dlq`, the dead-letter table)
/// exist; returns whether the dead-letter table exists.
async fn check_tables(pool: &PgPool, t: &Tables, need_dlq: bool) -> Result<bool, Failure> {
    let (outbox, dlq): (bool, bool) =
        sqlx::query_as("SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL")
            .bind(t.table.qualified_name())
            .bind(t.dlq.as_ref().map(DlqTable::qualified_name))
            .fetch_one(pool)
            .await
            .map_err(|e| Failure::runtime(format!("database error: {e}")))?;
    if !outbox {
        return Err(Failure::schema(format!(
            "the outbox table {} does not exist: create it with `outbox migrate` \
             (or check --table / --schema and the database in the URL)",
            t.table.qualified_name()
        )));
    }
    if need_dlq {
        match &t.dlq {
            None => {
                return Err(Failure::usage(
                    "this command needs the dead-letter table: drop --no-dlq \
                     (the default is <TABLE>_dlq) or pass --dlq-table NAME",
                ));
            }
            Some(d) if !dlq => {
                return Err(Failure::schema(format!(
                    "the dead-letter table {} does not exist: create it with `outbox migrate` \
                     (or name the right one with --dlq-table)",
                    d.qualified_name()
                )));
            }
            Some(_) => {}
        }
    }
    Ok(dlq)
}

/// The broker over `pool`, with the dead-letter table when it is usable.
fn broker(pool: PgPool, t: &Tables, with_dlq: bool) -> OutboxBroker {
    let b = OutboxBroker::new(pool, t.table.clone());
    match (&t.dlq, with_dlq) {
        (Some(d), true) => b.dead_letter_table(d.clone()),
        _ => b,
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    if let Command::Docs(cmd) = &cli.command {
        return docs::run(cmd).await;
    }
    let t = tables(&cli)?;
    match &cli.command {
        Command::Docs(cmd) => docs::run(cmd).await,
        Command::Sql { inbox } => sql(&cli, &t, inbox.table(&cli)?),
        Command::Autovacuum(args) => autovacuum(&cli, &t, args),
        Command::Migrate { inbox } => migrate(&cli, &t, inbox.table(&cli)?).await,
        Command::Validate { autovacuum } => validate(&cli, &t, *autovacuum).await,
        Command::Stats { queues, watch } => stats_command(&cli, &t, queues, *watch).await,
        Command::Peek { queue, limit } => peek(&cli, &t, queue, *limit).await,
        Command::Serve(args) => {
            let pool = connect(&cli).await?;
            let has_dlq = check_tables(&pool, &t, false).await?;
            if let Some(d) = t.dlq.as_ref().filter(|_| !has_dlq) {
                eprintln!(
                    "note: dead-letter table {} not found; the dashboard shows no dead letters",
                    d.qualified_name()
                );
            }
            serve::run(broker(pool, &t, has_dlq), args).await
        }
        Command::Dlq(cmd) => {
            let pool = connect(&cli).await?;
            check_tables(&pool, &t, true).await?;
            let b = broker(pool, &t, true);
            dlq(&b, &cli, cmd).await
        }
    }
}

/// `outbox sql`: the DDL of both tables.
fn sql(cli: &Cli, t: &Tables, inbox: Option<Inbox>) -> Result<ExitCode, Failure> {
    let outbox = t.table.create_sql();
    let dlq = t.dlq.as_ref().map(DlqTable::create_sql);
    let inbox = inbox.as_ref().map(Inbox::create_sql);
    if cli.json {
        output::print_json(&json!({"outbox": outbox, "dlq": dlq, "inbox": inbox}))?;
    } else {
        output::emit(&format!(
            "{outbox}{}{}",
            dlq.unwrap_or_default(),
            inbox.unwrap_or_default()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `outbox autovacuum`: the ALTER TABLE of the autovacuum advice.
fn autovacuum(cli: &Cli, t: &Tables, args: &AutovacuumArgs) -> Result<ExitCode, Failure> {
    let cost_delay = args
        .cost_delay
        .map(|ms| {
            Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| {
                Failure::usage(format!(
                    "--cost-delay must be a number of milliseconds between 0 and 100, got {ms}"
                ))
            })
        })
        .transpose()?;
    let sql = autovacuum_sql(
        &t.table,
        AutovacuumOptions {
            vacuum_threshold: args.threshold,
            insert_threshold: args.insert_threshold.unwrap_or(args.threshold),
            cost_delay,
            cost_limit: args.cost_limit,
        },
    );
    if cli.json {
        output::print_json(&json!({ "sql": sql }))?;
    } else {
        output::emit(&format!("{sql};\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `outbox migrate`: creates what is missing.
async fn migrate(cli: &Cli, t: &Tables, inbox: Option<Inbox>) -> Result<ExitCode, Failure> {
    let pool = connect(cli).await?;
    let b = broker(pool.clone(), t, true);
    b.migrate().await.map_err(Failure::from_core)?;
    if let Some(i) = &inbox {
        i.migrate(&pool).await.map_err(Failure::from_core)?;
    }
    let dlq = t.dlq.as_ref().map(DlqTable::qualified_name);
    let inbox = inbox.as_ref().map(Inbox::qualified_name);
    if cli.json {
        output::print_json(&json!({
            "ok": true,
            "table": t.table.qualified_name(),
            "dlq_table": dlq,
            "inbox_table": inbox,
        }))?;
    } else {
        let mut text = format!("outbox table {} is in place\n", t.table.qualified_name());
        if let Some(d) = dlq {
            text.push_str(&format!("dead-letter table {d} is in place\n"));
        }
        if let Some(i) = inbox {
            text.push_str(&format!("inbox table {i} is in place\n"));
        }
        output::emit(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `outbox validate`: success, or the drift and its fix with exit code 3.
async fn validate(cli: &Cli, t: &Tables, autovacuum: bool) -> Result<ExitCode, Failure> {
    let pool = connect(cli).await?;
    let b = broker(pool, t, true);
    let checks = outbox_core::SchemaChecks::new().autovacuum(autovacuum);
    match b.validate_schema_with(checks).await {
        Ok(()) => {
            if cli.json {
                output::print_json(&json!({"ok": true, "problems": [], "fix": ""}))?;
            } else {
                output::emit(&format!(
                    "schema OK: {}\n",
                    output::tables_label(&t.table, t.dlq.as_ref())
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(outbox_core::Error::SchemaDrift(d)) => {
            if cli.json {
                output::print_json(&json!({"ok": false, "problems": d.problems, "fix": d.fix}))?;
            } else {
                output::emit(&format!("{d}\n"))?;
            }
            Ok(ExitCode::from(output::EXIT_SCHEMA))
        }
        Err(e) => Err(Failure::from_core(e)),
    }
}

/// `outbox stats`: connects, notes a missing dead-letter table, then [`stats`].
async fn stats_command(
    cli: &Cli,
    t: &Tables,
    queues: &[String],
    watch: Option<Duration>,
) -> Result<ExitCode, Failure> {
    let pool = connect(cli).await?;
    let has_dlq = check_tables(&pool, t, false).await?;
    if let Some(d) = t.dlq.as_ref().filter(|_| !has_dlq) {
        eprintln!(
            "note: dead-letter table {} not found; dead letters are not counted",
            d.qualified_name()
        );
    }
    let b = broker(pool, t, has_dlq);
    stats(&b, cli, queues, watch, has_dlq).await?;
    Ok(ExitCode::SUCCESS)
}

/// `outbox peek`: the next rows of a queue, not leased.
async fn peek(cli: &Cli, t: &Tables, queue: &str, limit: i64) -> Result<ExitCode, Failure> {
    let pool = connect(cli).await?;
    check_tables(&pool, t, false).await?;
    let b = broker(pool, t, false);
    let mut conn = b.pool().acquire().await.map_err(Failure::db)?;
    let rows = b
        .fetch_unprocessed(Some(queue), limit, &mut conn)
        .await
        .map_err(Failure::from_core)?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await
        .map_err(Failure::db)?;
    if cli.json {
        let rows: Vec<_> = rows.iter().map(|r| output::row_json(r, now)).collect();
        output::print_json(&json!({"queue": queue, "rows": rows}))?;
    } else {
        let mut text = String::new();
        output::print_peek(&mut text, queue, &rows, now, limit);
        output::emit(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(
    b: &OutboxBroker,
    cli: &Cli,
    queues: &[String],
    every: Option<Duration>,
    has_dlq: bool,
) -> Result<(), Failure> {
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    let tty = std::io::stdout().is_terminal();
    loop {
        let stats = if names.is_empty() {
            b.stats().await
        } else {
            b.stats_for(&names).await
        }
        .map_err(Failure::from_core)?;
        let doc = output::stats_json(b, &stats, has_dlq);
        match (cli.json, every) {
            (true, Some(_)) => output::print_json_line(&doc)?,
            (true, None) => output::print_json(&doc)?,
            (false, every) => {
                let mut text = String::new();
                if let Some(every) = every {
                    if tty {
                        // Clear the screen, cursor home.
                        text.push_str("\x1b[2J\x1b[H");
                    }
                    text.push_str(&format!(
                        "{}  every {}, Ctrl-C to stop\n",
                        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        humantime::format_duration(every)
                    ));
                }
                output::print_stats(&mut text, b, &stats, has_dlq);
                output::emit(&text)?;
            }
        }
        let Some(every) = every else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `outbox dlq ...`: every subcommand succeeds with exit code 0 or fails.
async fn dlq(b: &OutboxBroker, cli: &Cli, cmd: &DlqCommand) -> Result<ExitCode, Failure> {
    match cmd {
        DlqCommand::List { filter, limit } => dlq_list(b, cli, filter, *limit).await?,
        DlqCommand::Show { id } => dlq_show(b, cli, *id).await?,
        DlqCommand::Replay {
            selection,
            dry_run,
            batch_size,
            drop_timer_ids,
        } => {
            let opts = ReplayOptions::new()
                .dry_run(*dry_run)
                .batch_size(*batch_size)
                .timers(if *drop_timer_ids {
                    ReplayTimers::Drop
                } else {
                    ReplayTimers::Keep
                });
            dlq_replay(b, cli, &selection.to_filter(), &opts, *batch_size, *dry_run).await?;
        }
        DlqCommand::Purge { selection, yes } => {
            dlq_purge(b, cli, &selection.to_filter(), *yes).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outbox dlq list`.
async fn dlq_list(
    b: &OutboxBroker,
    cli: &Cli,
    filter: &FilterArgs,
    limit: u64,
) -> Result<(), Failure> {
    let f = filter.to_filter(DlqFilter::new()).limit(limit);
    let rows = b.dlq_list(&f).await.map_err(Failure::from_core)?;
    if cli.json {
        let rows: Vec<_> = rows.iter().map(output::dead_letter_json).collect();
        return output::print_json(&json!({ "dead_letters": rows }));
    }
    let mut text = String::new();
    output::print_dlq_list(&mut text, &rows);
    output::emit(&text)?;
    if u64::try_from(rows.len()).unwrap_or(u64::MAX) >= limit {
        eprintln!(
            "(first {limit} shown, oldest first; narrow with --since/--queue or raise --limit)"
        );
    }
    Ok(())
}

/// `outbox dlq show ID`.
async fn dlq_show(b: &OutboxBroker, cli: &Cli, id: i64) -> Result<(), Failure> {
    let Some(dl) = b.dlq_get(id).await.map_err(Failure::from_core)? else {
        return Err(Failure::runtime(format!(
            "no dead letter with id {id} in {} (ids are the `id` column of `outbox dlq list`)",
            b.dlq().map(DlqTable::qualified_name).unwrap_or_default()
        )));
    };
    if cli.json {
        return output::print_json(&output::dead_letter_json(&dl));
    }
    let mut text = String::new();
    output::print_dead_letter(&mut text, &dl);
    output::emit(&text)
}

/// `outbox dlq replay`: batch by batch, with a progress bar when the
/// selection spans more than one batch.
async fn dlq_replay(
    b: &OutboxBroker,
    cli: &Cli,
    f: &DlqFilter,
    opts: &ReplayOptions,
    batch_size: u64,
    dry_run: bool,
) -> Result<(), Failure> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let res = b
        .dlq_replay_with(f, opts, |p: &ReplayProgress| {
            if bar.is_none() && p.total > batch_size {
                bar = Some(output::progress_bar(p.total, dry_run));
            }
            if let Some(bar) = &bar {
                bar.set_message(format!("{} replayed, {} skipped", p.replayed, p.skipped));
                bar.set_position(p.done);
            }
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = res.map_err(Failure::from_core)?;
    if cli.json {
        return output::print_json(&output::replay_json(&report));
    }
    let mut text = String::new();
    output::print_replay(&mut text, b, &report);
    output::emit(&text)
}

/// `outbox dlq purge`: counts, asks (unless `yes`), deletes.
async fn dlq_purge(b: &OutboxBroker, cli: &Cli, f: &DlqFilter, yes: bool) -> Result<(), Failure> {
    let n = b.dlq_count(f).await.map_err(Failure::from_core)?;
    let dlq_name = b.dlq().map(DlqTable::qualified_name).unwrap_or_default();
    if n == 0 {
        if cli.json {
            return output::print_json(&json!({ "purged": 0 }));
        }
        return output::emit("no dead letter matches; nothing purged\n");
    }
    if !yes {
        confirm(&format!(
            "Delete {n} dead letter(s) from {dlq_name} for good? Type 'yes' to confirm: "
        ))?;
    }
    let purged = b.dlq_purge(f).await.map_err(Failure::from_core)?;
    if cli.json {
        return output::print_json(&json!({ "purged": purged }));
    }
    output::emit(&format!("purged {purged} dead letter(s) from {dlq_name}\n"))
}

/// Asks on the terminal; refuses (usage error) when stdin is not one.
fn confirm(question: &str) -> Result<(), Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::usage(
            "refusing to purge without confirmation: stdin is not a terminal; pass --yes",
        ));
    }
    eprint!("{question}");
    std::io::stderr().flush().map_err(Failure::io)?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(Failure::io)?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(exit(output::EXIT_RUNTIME, "aborted: nothing was purged"))
    }
}

/// Ctrl-C, or SIGTERM on Unix: how `outbox serve` and `outbox docs serve` stop.
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_durations_counted_back_from_now() {
        for s in ["90s", "30m", "2h", "7d", "1h 30m", "2days"] {
            assert!(parse_time(s).is_ok(), "{s}");
        }
        let minutes = (Utc::now() - parse_time("1h 30m").unwrap()).num_minutes();
        assert!((89..=91).contains(&minutes), "{minutes}");
        assert_eq!(
            parse_time("2026-05-01").unwrap().to_rfc3339(),
            "2026-05-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-05-01T12:00:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2026-05-01T10:00:00+00:00"
        );
    }

    #[test]
    fn bad_times_say_what_is_expected_and_what_is_wrong() {
        let e = parse_time("30x").unwrap_err();
        assert!(
            e.contains("RFC 3339") && e.contains("unknown time unit \"x\""),
            "{e}"
        );
        let e = parse_time("yesterday").unwrap_err();
        assert!(
            e.contains("an age such as 90s") && !e.contains("as an age"),
            "{e}"
        );
        let e = parse_time("99999999999d").unwrap_err();
        assert!(e.contains("earliest representable time"), "{e}");
    }

    #[test]
    fn watch_intervals_are_seconds_or_durations_of_at_least_100_ms() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(
            parse_interval("50ms"),
            Err("must be at least 0.1 seconds".to_owned())
        );
        let e = parse_interval("2x").unwrap_err();
        assert!(e.contains("unknown time unit \"x\""), "{e}");
    }
}
