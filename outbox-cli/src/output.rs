//! Errors with exit codes, and the text and JSON renderings of every command.

use std::fmt::Write as _;
use std::io::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use outbox_core::ops::{DeadLetter, QueueStats, ReplayReport};
use outbox_core::{DlqTable, OutboxBroker, OutboxRow, OutboxTable};
use outbox_dashboard::render::{age, base64, body_text, body_value};
use serde_json::{Value, json};

/// Runtime error: the database is unreachable or failed, a row was not found,
/// the operator declined.
pub(crate) const EXIT_RUNTIME: u8 = 1;
/// Usage error (clap uses 2 as well).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Schema drift, or a table is missing.
pub(crate) const EXIT_SCHEMA: u8 = 3;

/// An error message and the exit code it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

pub(crate) fn exit(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        exit(EXIT_USAGE, message)
    }

    pub(crate) fn runtime(message: impl Into<String>) -> Self {
        exit(EXIT_RUNTIME, message)
    }

    pub(crate) fn schema(message: impl Into<String>) -> Self {
        exit(EXIT_SCHEMA, message)
    }

    pub(crate) fn io(e: std::io::Error) -> Self {
        Self::runtime(format!("cannot write the output: {e}"))
    }

    pub(crate) fn db(e: sqlx::Error) -> Self {
        Self::from_core(outbox_core::Error::Database(e))
    }

    /// Misuse (bad names, arguments, configuration) is a usage error, drift
    /// and missing tables a schema error, the rest a runtime error.
    pub(crate) fn from_core(e: outbox_core::Error) -> Self {
        if e.is_misuse() {
            return Self::usage(e.to_string());
        }
        if let outbox_core::Error::SchemaDrift(_) = &e {
            return Self::schema(e.to_string());
        }
        let undefined_table = e
            .as_database_error()
            .and_then(sqlx::Error::as_database_error)
            .and_then(|d| d.code())
            .is_some_and(|c| c == "42P01");
        if undefined_table {
            return Self::schema(format!(
                "{e}: a table is missing; create it with `outbox migrate` or check --table/--schema/--dlq-table"
            ));
        }
        Self::runtime(e.to_string())
    }
}

/// What went wrong while connecting, and what to check.
pub(crate) fn describe_connect_error(e: &sqlx::Error, target: &str) -> String {
    let hint = match e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "the connection was refused: check that PostgreSQL is running and listening on that \
             host and port, and that DATABASE_URL / --database-url names them"
        }
        sqlx::Error::Io(_) => {
            "check the host name and port in DATABASE_URL / --database-url, and that the host \
             is reachable from here"
        }
        sqlx::Error::Tls(_) => "TLS failed: check sslmode in the URL and the server's certificates",
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some("28P01" | "28000") => {
                "authentication failed: check the user and password in the URL and the \
                 server's pg_hba.conf"
            }
            Some("3D000") => {
                "the database does not exist: check the database name in the URL, or create it"
            }
            Some("53300") => "the server has no free connection slots (max_connections)",
            _ => "check the URL and the server's log",
        },
        _ => "check DATABASE_URL / --database-url and that the server is up",
    };
    let cause = match e {
        // The server's message, without sqlx's decoration.
        sqlx::Error::Database(d) => d.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    };
    format!("cannot connect to {target}: {cause}; {hint}")
}

/// No answer within `after`.
pub(crate) fn describe_connect_timeout(target: &str, after: std::time::Duration) -> String {
    format!(
        "cannot connect to {target}: no answer within {} s; check the host and port in \
         DATABASE_URL / --database-url, and firewalls between here and the server",
        after.as_secs()
    )
}

/// `writeln!` into a `String` (which cannot fail).
macro_rules! outln {
    ($s:expr) => {
        $s.push('\n')
    };
    ($s:expr, $($arg:tt)*) => {{
        let _ = writeln!($s, $($arg)*);
    }};
}

/// Writes `text` to stdout. A closed pipe (`outbox dlq list | head`) ends the
/// program quietly with success: the command itself did its work.
pub(crate) fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(exit(0, "")),
        Err(e) => Err(Failure::io(e)),
    }
}

pub(crate) fn print_json(v: &Value) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| Failure::runtime(format!("cannot render JSON: {e}")))?;
    emit(&format!("{s}\n"))
}

pub(crate) fn print_json_line(v: &Value) -> Result<(), Failure> {
    emit(&format!("{v}\n"))
}

pub(crate) fn tables_label(t: &OutboxTable, d: Option<&DlqTable>) -> String {
    match d {
        Some(d) => format!(
            "outbox table {}, dead-letter table {}",
            t.qualified_name(),
            d.qualified_name()
        ),
        None => format!("outbox table {}", t.qualified_name()),
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Prints rows as aligned columns (the last column is not padded).
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        let n = widths.len();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        outln!(out, "{}", s.trim_end());
    };
    line(out, &mut header.iter().copied());
    for r in rows {
        line(out, &mut r.iter().map(String::as_str));
    }
}

// --- stats -------------------------------------------------------------------

pub(crate) fn stats_json(b: &OutboxBroker, stats: &[QueueStats], has_dlq: bool) -> Value {
    let queues: Vec<Value> = stats
        .iter()
        .map(|q| {
            json!({
                "queue": q.queue,
                "ready": q.ready,
                "leased": q.leased,
                "scheduled": q.scheduled,
                "oldest_ready_age_seconds": q.oldest_ready_age.map(|d| d.as_secs_f64()),
                "dead_letters": has_dlq.then_some(q.dead_letters),
            })
        })
        .collect();
    json!({
        "at": ts(Utc::now()),
        "table": b.table().qualified_name(),
        "dlq_table": b.dlq().map(DlqTable::qualified_name),
        "queues": queues,
    })
}

pub(crate) fn print_stats(s: &mut String, b: &OutboxBroker, stats: &[QueueStats], has_dlq: bool) {
    outln!(s, "{}", tables_label(b.table(), b.dlq()));
    if stats.is_empty() {
        outln!(s, "(no rows in any queue)");
        return;
    }
    let mut rows: Vec<Vec<String>> = stats
        .iter()
        .map(|q| {
            vec![
                q.queue.clone(),
                q.ready.to_string(),
                q.leased.to_string(),
                q.scheduled.to_string(),
                q.oldest_ready_age.map_or_else(|| "-".to_owned(), age),
                if has_dlq {
                    q.dead_letters.to_string()
                } else {
                    "-".to_owned()
                },
            ]
        })
        .collect();
    if stats.len() > 1 {
        let sum = |f: fn(&QueueStats) -> u64| stats.iter().map(f).sum::<u64>().to_string();
        let oldest = stats.iter().filter_map(|q| q.oldest_ready_age).max();
        rows.push(vec![
            "(total)".to_owned(),
            sum(|q| q.ready),
            sum(|q| q.leased),
            sum(|q| q.scheduled),
            oldest.map_or_else(|| "-".to_owned(), age),
            if has_dlq {
                sum(|q| q.dead_letters)
            } else {
                "-".to_owned()
            },
        ]);
    }
    table(
        s,
        &[
            "QUEUE",
            "READY",
            "LEASED",
            "SCHEDULED",
            "OLDEST READY",
            "DEAD LETTERS",
        ],
        &rows,
    );
}

// --- bodies ------------------------------------------------------------------

/// First line, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let first = s.lines().next().unwrap_or("");
    let mut out: String = first.chars().take(max).collect();
    if first.chars().count() > max || s.lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// --- peek --------------------------------------------------------------------

fn row_state(r: &OutboxRow, now: DateTime<Utc>) -> &'static str {
    if r.acquired_token.is_some() {
        "leased"
    } else if r.next_attempt_at <= now {
        "ready"
    } else {
        "scheduled"
    }
}

pub(crate) fn row_json(r: &OutboxRow, now: DateTime<Utc>) -> Value {
    json!({
        "id": r.id,
        "queue": r.queue,
        "state": row_state(r, now),
        "created_at": ts(r.created_at),
        "next_attempt_at": ts(r.next_attempt_at),
        "attempts_count": r.attempts_count,
        "deliveries_count": r.deliveries_count,
        "acquired_at": r.acquired_at.map(ts),
        "timer_id": r.timer_id,
        "ordering_key": r.ordering_key,
        "correlation_id": r.correlation_id(),
        "content_type": r.content_type(),
        "headers": r.headers,
        "body": body_value(&r.payload, r.content_type()),
        "payload_base64": base64(&r.payload),
    })
}

pub(crate) fn print_peek(
    s: &mut String,
    queue: &str,
    rows: &[OutboxRow],
    now: DateTime<Utc>,
    limit: i64,
) {
    if rows.is_empty() {
        outln!(s, "queue {queue:?} has no rows");
        return;
    }
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            outln!(s);
        }
        outln!(
            s,
            "row {} [{}]  next attempt {}  attempts {}  deliveries {}{}{}",
            r.id,
            row_state(r, now),
            ts(r.next_attempt_at),
            r.attempts_count,
            r.deliveries_count,
            r.timer_id
                .as_deref()
                .map(|t| format!("  timer {t:?}"))
                .unwrap_or_default(),
            r.ordering_key
                .as_deref()
                .map(|k| format!("  key {k:?}"))
                .unwrap_or_default()
        );
        outln!(s, "headers:");
        for (k, v) in &r.headers {
            outln!(s, "  {k}: {v}");
        }
        outln!(s, "body:");
        outln!(s, "{}", indent(&body_text(&r.payload, r.content_type())));
    }
    if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit {
        eprintln!("(first {limit} rows by id; raise --limit to see more)");
    }
}

// --- dead letters --------------------------------------------------------------

pub(crate) fn dead_letter_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id,
        "original_id": d.original_id,
        "queue": d.queue,
        "failure_reason": d.failure_reason,
        "failed_at": ts(d.failed_at),
        "created_at": ts(d.created_at),
        "deliveries_count": d.deliveries_count,
        "timer_id": d.timer_id,
        "ordering_key": d.ordering_key,
        "correlation_id": d.correlation_id(),
        "content_type": d.content_type(),
        "headers": d.headers,
        "body": body_value(&d.payload, d.content_type()),
        "payload_base64": base64(&d.payload),
        "last_exception": d.last_exception,
    })
}

pub(crate) fn print_dlq_list(s: &mut String, rows: &[DeadLetter]) {
    if rows.is_empty() {
        outln!(s, "no dead letters match");
        return;
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.original_id.to_string(),
                d.queue.clone(),
                d.failure_reason.clone(),
                d.failed_at
                    .to_rfc3339_opts(SecondsFormat::Secs, true)
                    .replace('T', " "),
                d.deliveries_count.to_string(),
                d.correlation_id(),
                d.last_exception
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| one_line(e, 60)),
            ]
        })
        .collect();
    table(
        s,
        &[
            "ID",
            "ORIGINAL",
            "QUEUE",
            "REASON",
            "FAILED AT",
            "DELIVERIES",
            "CORRELATION ID",
            "LAST EXCEPTION",
        ],
        &rows,
    );
}

pub(crate) fn print_dead_letter(s: &mut String, d: &DeadLetter) {
    outln!(s, "dead letter {}", d.id);
    let fields = [
        ("original id", d.original_id.to_string()),
        ("queue", d.queue.clone()),
        ("failure reason", d.failure_reason.clone()),
        ("failed at", ts(d.failed_at)),
        ("created at", ts(d.created_at)),
        ("deliveries", d.deliveries_count.to_string()),
        ("timer id", d.timer_id.clone().unwrap_or_else(|| "-".into())),
        (
            "ordering key",
            d.ordering_key.clone().unwrap_or_else(|| "-".into()),
        ),
        ("correlation id", d.correlation_id()),
        (
            "content type",
            d.content_type().unwrap_or("(none)").to_owned(),
        ),
    ];
    for (k, v) in fields {
        outln!(s, "  {:<16}{v}", format!("{k}:"));
    }
    outln!(s, "headers:");
    for (k, v) in &d.headers {
        outln!(s, "  {k}: {v}");
    }
    outln!(s, "body:");
    outln!(s, "{}", indent(&body_text(&d.payload, d.content_type())));
    outln!(s, "last exception:");
    outln!(
        s,
        "{}",
        indent(d.last_exception.as_deref().unwrap_or("(none recorded)"))
    );
    outln!(s);
    outln!(s, "replay it with: outbox dlq replay --ids {}", d.id);
}

// --- replay --------------------------------------------------------------------

pub(crate) fn progress_bar(total: u64, dry_run: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let verb = if dry_run { "checking" } else { "replaying" };
    let template =
        format!("{verb} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} eta {{eta}}  {{msg}}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

pub(crate) fn replay_json(r: &ReplayReport) -> Value {
    let replayed: Vec<Value> = r
        .replayed
        .iter()
        .map(|x| {
            json!({
                "dead_letter_id": x.dead_letter_id,
                "original_id": x.original_id,
                "queue": x.queue,
                "timer_id": x.timer_id,
                "new_id": x.new_id,
            })
        })
        .collect();
    let skipped: Vec<Value> = r
        .skipped
        .iter()
        .map(|x| {
            json!({
                "dead_letter_id": x.dead_letter_id,
                "original_id": x.original_id,
                "queue": x.queue,
                "timer_id": x.timer_id,
                "reason": x.reason.as_str(),
            })
        })
        .collect();
    json!({
        "dry_run": r.dry_run,
        "replayed": replayed,
        "skipped": skipped,
        "per_queue": r.per_queue(),
        "batches": r.batches,
    })
}

const MAX_LISTED: usize = 100;

pub(crate) fn print_replay(s: &mut String, b: &OutboxBroker, r: &ReplayReport) {
    let t = b.table().qualified_name();
    let n = r.replayed.len();
    if r.dry_run {
        outln!(
            s,
            "dry run, nothing changed: would replay {n} dead letter(s) into {t}"
        );
    } else {
        outln!(s, "replayed {n} dead letter(s) into {t}");
    }
    for x in r.replayed.iter().take(MAX_LISTED) {
        let target = x
            .new_id
            .map(|id| format!(" -> outbox row {id}"))
            .unwrap_or_default();
        outln!(
            s,
            "  dead letter {} (was row {}, queue {:?}){target}",
            x.dead_letter_id,
            x.original_id,
            x.queue
        );
    }
    if n > MAX_LISTED {
        outln!(s, "  … and {} more (use --json for all)", n - MAX_LISTED);
    }
    if !r.skipped.is_empty() {
        outln!(
            s,
            "{} {} dead letter(s), left in place:",
            if r.dry_run { "would skip" } else { "skipped" },
            r.skipped.len()
        );
        for x in r.skipped.iter().take(MAX_LISTED) {
            let why = match x.reason {
                outbox_core::ops::SkipReason::LiveTimer => {
                    "a live outbox row has the same (queue, timer_id); replay later or with --drop-timer-ids"
                }
                outbox_core::ops::SkipReason::DuplicateTimer => {
                    "an earlier dead letter of this replay has the same (queue, timer_id)"
                }
                outbox_core::ops::SkipReason::Gone => "removed concurrently",
                _ => "skipped",
            };
            outln!(
                s,
                "  dead letter {} (queue {:?}, timer {:?}): {}: {why}",
                x.dead_letter_id,
                x.queue,
                x.timer_id.as_deref().unwrap_or(""),
                x.reason
            );
        }
        if r.skipped.len() > MAX_LISTED {
            outln!(
                s,
                "  … and {} more (use --json for all)",
                r.skipped.len() - MAX_LISTED
            );
        }
    }
}
