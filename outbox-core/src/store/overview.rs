//! The statements of the operator overview
//! ([`OutboxBroker::overview`](crate::OutboxBroker::overview) and its
//! siblings in `ops::overview`): built from the validated, quoted table names
//! only; every value is a bind parameter.
//!
//! The overview must stay cheap on a table of millions of rows, so nothing
//! here counts a whole table: queues are listed with a loose index scan (a
//! recursive CTE hopping from one distinct `queue` to the next through an
//! index whose leading column is `queue`), and every count is capped
//! (`count(*)` over a `LIMIT cap + 1` subquery ordered like a partial index,
//! so it is an index-only scan that stops after `cap + 1` entries).

use super::ident;
use super::table::{DlqTable, OutboxTable};

/// The suffix of the optional index that counts retrying rows.
pub(crate) const RETRY_INDEX_SUFFIX: &str = "_retry_idx";

/// The DDL of the optional retry index (`IF NOT EXISTS` when `ine`): unleased
/// rows that have had an attempt, by queue and due time.
pub(crate) fn retry_index_ddl(table: &OutboxTable, ine: bool) -> String {
    format!(
        "CREATE INDEX {}{} ON {} (queue, next_attempt_at) \
         WHERE attempts_count > 0 AND acquired_token IS NULL",
        if ine { "IF NOT EXISTS " } else { "" },
        table.index(RETRY_INDEX_SUFFIX),
        table.qualified_name()
    )
}

/// The quoted, schema-qualified name of the retry index (what `to_regclass`
/// takes).
pub(crate) fn retry_index_name(table: &OutboxTable) -> String {
    let idx = table.index(RETRY_INDEX_SUFFIX);
    match table.schema_name() {
        Some(s) => format!("{}.{idx}", ident::quote(s)),
        None => idx,
    }
}

/// Whether `pg_get_indexdef` output describes a usable retry index: over
/// `(queue, next_attempt_at)` with exactly the predicate the overview's
/// retry count uses (an index of that name with another definition is
/// ignored, and `retrying` is then reported as unknown).
pub(crate) fn retry_index_matches(indexdef: &str) -> bool {
    let norm: String = indexdef
        .to_ascii_lowercase()
        .replace(['(', ')'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    norm.contains("using btree queue, next_attempt_at where")
        && norm.ends_with("where attempts_count > 0 and acquired_token is null")
}

/// A loose index scan listing the distinct queues of `table` (alias `x`,
/// output column `queue`): the first queue, then repeatedly the next greater
/// one, each an `ORDER BY queue LIMIT 1` that the planner answers with one
/// descent of an index led by `queue` (`<t>_key_idx`, the dead-letter
/// `(queue, failed_at)` index).
fn distinct_queues(cte: &str, table: &str) -> String {
    format!(
        "{cte}(queue) AS (\
         (SELECT x.queue FROM {table} x ORDER BY x.queue LIMIT 1) \
         UNION ALL \
         SELECT (SELECT x.queue FROM {table} x WHERE x.queue > {cte}.queue ORDER BY x.queue LIMIT 1) \
         FROM {cte} WHERE {cte}.queue IS NOT NULL)"
    )
}

/// Statement 1 of the overview: turns JIT off for the rest of the
/// transaction (the count statement's estimated cost grows with the number
/// of queues and would otherwise cross `jit_above_cost`, and compiling costs
/// more than the whole query), lists the queues of both tables, and reads the
/// retry index's definition. `$1`: the retry index's qualified name (text).
/// Columns: `text[]` outbox queues, `text[]` dead-letter queues, the index
/// definition (NULL when absent), the jit setting (ignored).
pub(crate) fn queues_sql(table: &OutboxTable, dlq: Option<&DlqTable>) -> String {
    let t = table.qualified_name();
    let mut ctes = vec![distinct_queues("oq", &t)];
    let dq = match dlq {
        Some(d) => {
            ctes.push(distinct_queues("dq", &d.qualified_name()));
            "ARRAY(SELECT dq.queue::text FROM dq WHERE dq.queue IS NOT NULL)"
        }
        None => "ARRAY[]::text[]",
    };
    format!(
        "WITH RECURSIVE {ctes} SELECT \
         ARRAY(SELECT oq.queue::text FROM oq WHERE oq.queue IS NOT NULL), {dq}, \
         pg_get_indexdef(to_regclass($1)), set_config('jit', 'off', true)",
        ctes = ctes.join(", ")
    )
}

/// What one capped count of the overview counts: the predicate over the
/// outbox (alias `o`), or the dead-letter table (alias `d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    Ready,
    Scheduled,
    Leased,
    Retrying,
    DeadLetters,
}

impl Category {
    /// The predicate (besides `queue = <q>`) and the column the partial index
    /// is ordered by after `queue`, which the subquery orders by so that a
    /// sequential scan (which would have to sort everything) never wins.
    fn predicate(self) -> (&'static str, &'static str) {
        match self {
            Category::Ready => (
                "o.acquired_token IS NULL AND o.next_attempt_at <= now()",
                "o.next_attempt_at",
            ),
            Category::Scheduled => (
                "o.acquired_token IS NULL AND o.next_attempt_at > now()",
                "o.next_attempt_at",
            ),
            Category::Leased => ("o.acquired_token IS NOT NULL", "o.next_attempt_at"),
            Category::Retrying => (
                "o.attempts_count > 0 AND o.acquired_token IS NULL",
                "o.next_attempt_at",
            ),
            Category::DeadLetters => ("TRUE", "d.failed_at"),
        }
    }

    fn alias(self) -> &'static str {
        if self == Category::DeadLetters {
            "d"
        } else {
            "o"
        }
    }

    /// `count(*)` of at most `$cap` rows of this category in queue `q`.
    fn capped(self, table: &str, q: &str, cap: &str) -> String {
        let (pred, order) = self.predicate();
        let a = self.alias();
        format!(
            "(SELECT count(*) FROM (SELECT 1 FROM {table} {a} WHERE {a}.queue = {q} AND {pred} \
             ORDER BY {order} LIMIT {cap}) s)::int8"
        )
    }
}

/// Statement 2 of the overview: per queue of `$1` (`varchar[]`), the capped
/// counts (`$2`: cap + 1), the oldest ready row's age and the oldest lease's
/// age in seconds. Columns: queue, ready, scheduled, leased, retrying (NULL
/// without the retry index), dead letters (NULL without a dead-letter
/// table), ready age, lease age.
///
/// The lease age comes from the same bounded scan of `<t>_leased_idx` as the
/// leased count (it needs `acquired_at` from the heap): exact when the queue
/// has at most `cap` leased rows, else the oldest among the `cap + 1`
/// leased rows due first.
pub(crate) fn counts_sql(table: &OutboxTable, dlq: Option<&DlqTable>, retry_index: bool) -> String {
    let t = table.qualified_name();
    let q = "n.queue";
    let cap = "$2";
    let retrying = if retry_index {
        Category::Retrying.capped(&t, q, cap)
    } else {
        "NULL::int8".to_owned()
    };
    let dead = match dlq {
        Some(d) => Category::DeadLetters.capped(&d.qualified_name(), q, cap),
        None => "NULL::int8".to_owned(),
    };
    format!(
        "SELECT n.queue::text, {ready}, {scheduled}, l.n, {retrying}, {dead}, \
         extract(epoch FROM now() - (SELECT o.next_attempt_at FROM {t} o WHERE o.queue = n.queue \
         AND o.acquired_token IS NULL AND o.next_attempt_at <= now() ORDER BY o.next_attempt_at LIMIT 1))::float8, \
         extract(epoch FROM now() - l.oldest)::float8 \
         FROM unnest($1::varchar[]) AS n(queue) \
         CROSS JOIN LATERAL (SELECT count(*)::int8 AS n, min(s.acquired_at) AS oldest FROM \
         (SELECT o.acquired_at FROM {t} o WHERE o.queue = n.queue AND o.acquired_token IS NOT NULL \
         ORDER BY o.next_attempt_at LIMIT {cap}) s) l",
        ready = Category::Ready.capped(&t, q, cap),
        scheduled = Category::Scheduled.capped(&t, q, cap),
    )
}

/// The planner's row estimates for several (category, queue) counts at
/// once: `EXPLAIN (FORMAT JSON)` of the `UNION ALL` of their uncapped
/// predicates, branch `i` with its queue in `$i` (text). Nothing is
/// executed; the plan is an `Append` with one child per branch, in order
/// (one branch: the scan itself).
pub(crate) fn estimates_sql(
    table: &OutboxTable,
    dlq: Option<&DlqTable>,
    cats: &[Category],
) -> String {
    let branches: Vec<String> = cats
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let (pred, _) = c.predicate();
            let a = c.alias();
            let name = match (c, dlq) {
                (Category::DeadLetters, Some(d)) => d.qualified_name(),
                _ => table.qualified_name(),
            };
            format!(
                "SELECT 1 FROM {name} {a} WHERE {a}.queue = ${}::varchar AND {pred}",
                i + 1
            )
        })
        .collect();
    format!("EXPLAIN (FORMAT JSON) {}", branches.join(" UNION ALL "))
}

/// The cumulative statistics of one table (`$1`: its qualified name), read
/// through the `pg_stat_get_*` functions (what `pg_stat_user_tables` shows,
/// without scanning `pg_class`). Columns: found, inserted, updated,
/// deleted, live, dead, last autovacuum, last vacuum, last autoanalyze, the
/// time of reading.
pub(crate) const ACTIVITY_SQL: &str = "SELECT r.oid IS NOT NULL, \
     COALESCE(pg_stat_get_tuples_inserted(r.oid), 0)::int8, \
     COALESCE(pg_stat_get_tuples_updated(r.oid), 0)::int8, \
     COALESCE(pg_stat_get_tuples_deleted(r.oid), 0)::int8, \
     COALESCE(pg_stat_get_live_tuples(r.oid), 0)::int8, \
     COALESCE(pg_stat_get_dead_tuples(r.oid), 0)::int8, \
     pg_stat_get_last_autovacuum_time(r.oid), pg_stat_get_last_vacuum_time(r.oid), \
     pg_stat_get_last_autoanalyze_time(r.oid), clock_timestamp() \
     FROM (SELECT to_regclass($1)::oid AS oid) r";

/// The backends of this database (other than the caller's) that look like
/// relays of the table: an engine connection (`application_name` ending
/// in `-fetch`, `-worker`, `-listen` or `-acker`), or any backend whose
/// current or last statement names the table (`$1`, unquoted; this is how a
/// faststream-outbox relay, which sets no `application_name`, shows up,
/// with its `LISTEN "outbox_<table>"`).
pub(crate) const CONNECTIONS_SQL: &str = "SELECT a.pid, COALESCE(a.application_name, '')::text, \
     host(a.client_addr), a.backend_start, a.state, a.wait_event_type, a.wait_event, \
     COALESCE(a.query, '')::text, a.query_start, a.state_change \
     FROM pg_stat_activity a \
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
     AND a.backend_type = 'client backend' \
     AND (a.application_name ~ '-(fetch|worker|listen|acker)$' OR strpos(a.query, $1) > 0) \
     ORDER BY a.application_name, a.pid";

/// How a row lookup matches rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    /// `$1` (int8) is the outbox id (dead letters: their `original_id`).
    Id,
    /// `$1` (int8) is a dead-letter id (the outbox is not searched).
    DeadLetterId,
    /// `$1` (text) is the `correlation_id` header.
    CorrelationId,
}

/// The outbox rows a lookup matches, at most `$3` of them, with the first
/// `$2` bytes of the payload. Columns by name (see `ops::overview`).
pub(crate) fn find_outbox_sql(table: &OutboxTable, m: Match) -> Option<String> {
    let cond = match m {
        Match::Id => "o.id = $1",
        Match::CorrelationId => "o.headers ->> 'correlation_id' = $1",
        Match::DeadLetterId => return None,
    };
    Some(format!(
        "SELECT o.id, o.queue::text AS queue, substring(o.payload FROM 1 FOR $2) AS payload, \
         octet_length(o.payload)::int8 AS payload_len, o.headers, o.attempts_count, \
         o.deliveries_count, o.created_at, o.next_attempt_at, o.first_attempt_at, \
         o.last_attempt_at, o.acquired_at, o.timer_id::text AS timer_id, \
         o.ordering_key::text AS ordering_key, (o.next_attempt_at <= now()) AS due \
         FROM {t} o WHERE {cond} ORDER BY o.id LIMIT $3",
        t = table.qualified_name()
    ))
}

/// The dead letters a lookup matches, at most `$3` of them, with the first
/// `$2` bytes of the payload.
pub(crate) fn find_dlq_sql(dlq: &DlqTable, m: Match) -> String {
    let cond = match m {
        Match::Id => "d.original_id = $1",
        Match::DeadLetterId => "d.id = $1",
        Match::CorrelationId => "d.headers ->> 'correlation_id' = $1",
    };
    format!(
        "SELECT d.id, d.original_id, d.queue::text AS queue, \
         substring(d.payload FROM 1 FOR $2) AS payload, \
         octet_length(d.payload)::int8 AS payload_len, d.headers, d.deliveries_count, \
         d.created_at, d.failed_at, d.failure_reason::text AS failure_reason, d.last_exception::text AS last_exception, \
         d.timer_id::text AS timer_id, d.ordering_key::text AS ordering_key \
         FROM {d} d WHERE {cond} ORDER BY d.id LIMIT $3",
        d = dlq.qualified_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_index_definitions_are_recognized() {
        let t = OutboxTable::new("outbox").expect("valid");
        assert!(retry_index_ddl(&t, true).contains(r#"IF NOT EXISTS "outbox_retry_idx""#));
        assert_eq!(
            retry_index_name(&t.clone().schema("s").expect("valid")),
            r#""s"."outbox_retry_idx""#
        );
        assert!(retry_index_matches(
            "CREATE INDEX outbox_retry_idx ON public.outbox USING btree (queue, next_attempt_at) \
             WHERE ((attempts_count > 0) AND (acquired_token IS NULL))"
        ));
        assert!(!retry_index_matches(
            "CREATE INDEX outbox_retry_idx ON public.outbox USING btree (queue, next_attempt_at) \
             WHERE (attempts_count > 0)"
        ));
        assert!(!retry_index_matches(
            "CREATE INDEX outbox_retry_idx ON public.outbox USING btree (queue)"
        ));
    }

    #[test]
    fn every_value_is_a_parameter() {
        let t = OutboxTable::new("ob").expect("valid");
        let d = DlqTable::new("ob_dlq").expect("valid");
        let sql = counts_sql(&t, Some(&d), true);
        assert!(sql.contains("unnest($1::varchar[])"), "{sql}");
        assert_eq!(sql.matches("LIMIT $2").count(), 5, "{sql}");
        assert!(queues_sql(&t, Some(&d)).contains("to_regclass($1)"));
        assert!(!counts_sql(&t, None, false).contains("ob_dlq"));
    }
}
