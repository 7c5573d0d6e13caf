//! Every statement the crate runs, built once per table from validated, quoted
//! identifiers. Values always travel as bind parameters.

use std::sync::Arc;

use sqlx::AssertSqlSafe;

use super::table::{DlqTable, OutboxTable};

/// Columns returned by claims and inspection reads: those the [`crate::OutboxRow`]
/// decoder (its `sqlx::FromRow`) reads by name.
pub(crate) const ROW_COLUMNS: &str = "o.id, o.queue, o.payload, o.headers, o.attempts_count, \
     o.deliveries_count, o.created_at, o.next_attempt_at, o.first_attempt_at, o.last_attempt_at, \
     o.acquired_at, o.acquired_token, o.timer_id, o.ordering_key";

/// When a published row becomes eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScheduleKind {
    Now,
    /// `now() + make_interval(secs => $n)`, on the database clock.
    In,
    /// An absolute timestamp bound as `$n`.
    At,
}

/// What to do when a live row already has the same `(queue, timer_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    None,
    Ignore,
    Extend,
}

/// A prepared-once SQL string.
pub(crate) type Sql = Arc<str>;

pub(crate) fn q(
    sql: &Sql,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

/// A statement whose rows decode into `T` with its [`sqlx::FromRow`].
pub(crate) fn q_as<T>(
    sql: &Sql,
) -> sqlx::query::QueryAs<'static, sqlx::Postgres, T, sqlx::postgres::PgArguments>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    sqlx::query_as(AssertSqlSafe(sql.clone()))
}

#[derive(Debug)]
pub(crate) struct Statements {
    /// Indexed by [`insert_index`].
    insert: Vec<Sql>,
    /// Indexed by `schedule * 2 + notify`.
    insert_batch: Vec<Sql>,
    /// The same with an ordering key (and its lock).
    insert_keyed: Vec<Sql>,
    insert_batch_keyed: Vec<Sql>,
    pub(crate) cancel_timer: Sql,
    pub(crate) unprocessed_all: Sql,
    pub(crate) unprocessed_queue: Sql,
    pub(crate) claim: Sql,
    /// The claim without the expired-lease branch (see [`crate::engine`]).
    pub(crate) claim_pending: Sql,
    /// The ordered claims of one queue, without and with the expired-lease
    /// branch (see [`claim_ordered_sql`]).
    claim_ordered: [Sql; 2],
    /// [`ClaimMode::Transaction`](crate::ClaimMode::Transaction): the same
    /// claims, locking the rows without a lease write (see [`Lot`]);
    /// indexed by `with_expired`.
    claim_locked: [Sql; 2],
    claim_ordered_locked: [Sql; 2],
    /// What a lot's transaction writes before it commits (see [`Lot`]).
    pub(crate) lot: Lot,
    pub(crate) ack: Sql,
    pub(crate) ack_batch: Sql,
    pub(crate) retry: Sql,
    pub(crate) release: Sql,
    /// The lease heartbeat: `acquired_at = now()` (the claim's clock) on
    /// every `(id, token)` pair of `$1`, `$2` that still holds its token;
    /// returns the ids extended. Commits synchronously (an extension lost
    /// in a server crash could let another claim take a running row).
    pub(crate) extend: Sql,
    /// Seconds until the earliest future-dated unleased row of `$1` (the
    /// queues) is due, on the database clock; NULL when there is none.
    pub(crate) next_due: Sql,
    pub(crate) dead_letter: Option<Sql>,
    /// Exactly-once lanes: their claim and delete.
    pub(crate) lane: super::lane::LaneSql,
}

const SCHEDULES: [ScheduleKind; 3] = [ScheduleKind::Now, ScheduleKind::In, ScheduleKind::At];
const TIMERS: [TimerKind; 3] = [TimerKind::None, TimerKind::Ignore, TimerKind::Extend];

fn insert_index(schedule: ScheduleKind, timer: TimerKind, notify: bool) -> usize {
    let s = SCHEDULES.iter().position(|x| *x == schedule).unwrap_or(0);
    let t = TIMERS.iter().position(|x| *x == timer).unwrap_or(0);
    (s * TIMERS.len() + t) * 2 + usize::from(notify)
}

impl Statements {
    /// `sync_writes: false` makes the relay's own writes (claims, acks,
    /// retries, releases, dead-letter moves) commit asynchronously: each one
    /// sets `synchronous_commit = off` for its own transaction only
    /// (`set_config(.., true)`, safe behind any pooler), so the user's
    /// transactions are never affected.
    pub(crate) fn new(table: &OutboxTable, dlq: Option<&DlqTable>, sync_writes: bool) -> Self {
        let t = table.qualified_name();
        let g = if sync_writes {
            ""
        } else {
            " AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"
        };
        let lock = key_lock_expr(table);
        let mut insert = Vec::with_capacity(18);
        let mut insert_keyed = Vec::with_capacity(18);
        for schedule in SCHEDULES {
            for timer in TIMERS {
                for notify in [false, true] {
                    debug_assert_eq!(insert.len(), insert_index(schedule, timer, notify));
                    insert.push(Sql::from(insert_sql(&t, schedule, timer, notify, None)));
                    insert_keyed.push(Sql::from(insert_sql(
                        &t,
                        schedule,
                        timer,
                        notify,
                        Some(&lock),
                    )));
                }
            }
        }
        let mut insert_batch = Vec::with_capacity(6);
        let mut insert_batch_keyed = Vec::with_capacity(6);
        for schedule in SCHEDULES {
            for notify in [false, true] {
                insert_batch.push(Sql::from(insert_batch_sql(&t, schedule, notify, None)));
                insert_batch_keyed.push(Sql::from(insert_batch_sql(
                    &t,
                    schedule,
                    notify,
                    Some(&lock),
                )));
            }
        }
        Self {
            insert,
            insert_batch,
            insert_keyed,
            insert_batch_keyed,
            claim_ordered: [
                claim_ordered_sql(&t, false, g, Hold::Lease).into(),
                claim_ordered_sql(&t, true, g, Hold::Lease).into(),
            ],
            claim_locked: [
                claim_sql(&t, false, g, Hold::Transaction).into(),
                claim_sql(&t, true, g, Hold::Transaction).into(),
            ],
            claim_ordered_locked: [
                claim_ordered_sql(&t, false, g, Hold::Transaction).into(),
                claim_ordered_sql(&t, true, g, Hold::Transaction).into(),
            ],
            lot: Lot::new(&t, dlq, g),
            lane: super::lane::LaneSql::new(&t),
            cancel_timer: format!(
                "DELETE FROM {t} WHERE queue = $1 AND timer_id = $2 AND acquired_token IS NULL"
            )
            .into(),
            unprocessed_all: format!("SELECT {ROW_COLUMNS} FROM {t} o ORDER BY o.id LIMIT $1")
                .into(),
            unprocessed_queue: format!(
                "SELECT {ROW_COLUMNS} FROM {t} o WHERE o.queue = $1 ORDER BY o.id LIMIT $2"
            )
            .into(),
            claim: claim_sql(&t, true, g, Hold::Lease).into(),
            claim_pending: claim_sql(&t, false, g, Hold::Lease).into(),
            // Token guards use IS NOT DISTINCT FROM (the bound token is never
            // NULL, so it means `=`): a strict `=` implies `acquired_token IS
            // NOT NULL`, which lets the planner pick `<t>_leased_idx` and scan
            // all of it for `id = ..` whenever its statistics say it is small.
            ack: format!(
                "DELETE FROM {t} WHERE id = $1 AND acquired_token IS NOT DISTINCT FROM $2{g}"
            )
            .into(),
            ack_batch: format!(
                "DELETE FROM {t} o USING unnest($1::int8[], $2::uuid[]) AS w(id, token) \
                 WHERE o.id = w.id AND o.acquired_token IS NOT DISTINCT FROM w.token{g} RETURNING o.id"
            )
            .into(),
            retry: format!(
                "UPDATE {t} SET attempts_count = attempts_count + 1, \
                 next_attempt_at = now() + make_interval(secs => $3), \
                 first_attempt_at = COALESCE(first_attempt_at, now()), last_attempt_at = now(), \
                 acquired_at = NULL, acquired_token = NULL \
                 WHERE id = $1 AND acquired_token IS NOT DISTINCT FROM $2{g}"
            )
            .into(),
            next_due: format!(
                "SELECT EXTRACT(EPOCH FROM (min(n.next_attempt_at) - now()))::float8 \
                 FROM (SELECT DISTINCT unnest($1::varchar[]) AS name) q CROSS JOIN LATERAL (\
                   SELECT c.next_attempt_at FROM {t} c \
                   WHERE c.queue = q.name AND c.acquired_token IS NULL AND c.next_attempt_at > now() \
                   ORDER BY c.next_attempt_at LIMIT 1) n"
            )
            .into(),
            extend: format!(
                "UPDATE {t} o SET acquired_at = now() \
                 FROM unnest($1::int8[], $2::uuid[]) AS w(id, token) \
                 WHERE o.id = w.id AND o.acquired_token IS NOT DISTINCT FROM w.token RETURNING o.id"
            )
            .into(),
            release: format!(
                "UPDATE {t} o SET acquired_at = NULL, acquired_token = NULL, \
                 deliveries_count = GREATEST(o.deliveries_count - 1, 0) \
                 FROM unnest($1::int8[], $2::uuid[]) AS w(id, token) \
                 WHERE o.id = w.id AND o.acquired_token IS NOT DISTINCT FROM w.token{g}"
            )
            .into(),
            dead_letter: dlq.map(|d| {
                format!(
                    "WITH deleted AS (DELETE FROM {t} WHERE id = $1 AND acquired_token IS NOT DISTINCT FROM $2{g} \
                     RETURNING id, queue, payload, headers, deliveries_count, created_at, timer_id, ordering_key) \
                     INSERT INTO {d} (original_id, queue, payload, headers, deliveries_count, \
                     created_at, timer_id, ordering_key, failure_reason, last_exception) \
                     SELECT id, queue, payload, headers, deliveries_count, created_at, timer_id, ordering_key, $3, $4 \
                     FROM deleted",
                    d = d.qualified_name()
                )
                .into()
            }),
        }
    }

    /// The single insert; `keyed`: with the `ordering_key` (the last
    /// parameter but the NOTIFY channel) and its lock.
    pub(crate) fn insert(
        &self,
        schedule: ScheduleKind,
        timer: TimerKind,
        notify: bool,
        keyed: bool,
    ) -> &Sql {
        let all = if keyed {
            &self.insert_keyed
        } else {
            &self.insert
        };
        &all[insert_index(schedule, timer, notify)]
    }

    pub(crate) fn insert_batch(&self, schedule: ScheduleKind, notify: bool, keyed: bool) -> &Sql {
        let s = SCHEDULES.iter().position(|x| *x == schedule).unwrap_or(0);
        let all = if keyed {
            &self.insert_batch_keyed
        } else {
            &self.insert_batch
        };
        &all[s * 2 + usize::from(notify)]
    }

    /// The ordered claim of one queue (see [`claim_ordered_sql`]).
    pub(crate) fn claim_ordered(&self, with_expired: bool) -> &Sql {
        &self.claim_ordered[usize::from(with_expired)]
    }

    /// The claim of a lot (rows locked, no lease), ordered or not.
    pub(crate) fn claim_locked(&self, with_expired: bool, ordered: bool) -> &Sql {
        let all = if ordered {
            &self.claim_ordered_locked
        } else {
            &self.claim_locked
        };
        &all[usize::from(with_expired)]
    }
}

/// The statements of a lot: a claim's transaction in
/// [`ClaimMode::Transaction`](crate::ClaimMode::Transaction). Its rows are
/// locked by the claim (`FOR UPDATE SKIP LOCKED`), so the writes need no
/// token guard; each takes every row of one kind at once, and the
/// transaction commits after them. `deliveries_count` rises with the
/// outcome (the claim wrote nothing). Their times are `clock_timestamp()`,
/// when the outcome is written: `now()` would be the transaction's start,
/// the claim, up to `max_hold` earlier (a retry would come due early, a
/// lease would start old).
#[derive(Debug)]
pub(crate) struct Lot {
    /// Acks (and terminal failures without a dead-letter table): `$1` ids.
    pub(crate) delete: Sql,
    /// Retries: `$1` ids, `$2` delays in seconds (`float8[]`).
    pub(crate) retry: Sql,
    /// Rows whose handlers outlive `max_hold`: a lease (`$2` token) so they
    /// finish as leased rows after the commit. `$1` ids.
    pub(crate) lease: Sql,
    /// Dead-letter moves: `$1` ids, `$2` reasons, `$3` last exceptions.
    pub(crate) dead_letter: Option<Sql>,
}

impl Lot {
    fn new(t: &str, dlq: Option<&DlqTable>, g: &str) -> Self {
        Self {
            delete: format!("DELETE FROM {t} WHERE id = ANY($1::int8[]){g}").into(),
            retry: format!(
                "UPDATE {t} o SET attempts_count = o.attempts_count + 1, \
                 deliveries_count = o.deliveries_count + 1, \
                 next_attempt_at = c.at + make_interval(secs => w.delay), \
                 first_attempt_at = COALESCE(o.first_attempt_at, c.at), \
                 last_attempt_at = c.at, acquired_at = NULL, acquired_token = NULL \
                 FROM unnest($1::int8[], $2::float8[]) AS w(id, delay) \
                 CROSS JOIN (SELECT clock_timestamp() AS at) c WHERE o.id = w.id{g}"
            )
            .into(),
            lease: format!(
                "UPDATE {t} SET deliveries_count = deliveries_count + 1, \
                 acquired_at = clock_timestamp(), acquired_token = $2 WHERE id = ANY($1::int8[]){g}"
            )
            .into(),
            dead_letter: dlq.map(|d| {
                format!(
                    "WITH deleted AS (DELETE FROM {t} o USING unnest($1::int8[], $2::text[], $3::text[]) \
                     AS w(id, reason, exc) WHERE o.id = w.id{g} \
                     RETURNING o.id, o.queue, o.payload, o.headers, o.deliveries_count, o.created_at, \
                     o.timer_id, o.ordering_key, w.reason, w.exc) \
                     INSERT INTO {d} (original_id, queue, payload, headers, deliveries_count, \
                     created_at, timer_id, ordering_key, failure_reason, last_exception, failed_at) \
                     SELECT id, queue, payload, headers, deliveries_count + 1, created_at, timer_id, \
                     ordering_key, reason, exc, clock_timestamp() FROM deleted",
                    d = d.qualified_name()
                )
                .into()
            }),
        }
    }
}

/// What a claim leaves on its rows: a lease it writes (and commits), or
/// the row locks of the transaction it runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Lease,
    Transaction,
}

impl Hold {
    /// What the claim's branches select from a candidate `c`: the id and
    /// the sort key to lease, or the whole row to return as it is locked.
    fn picked(self) -> String {
        match self {
            Hold::Lease => "c.id, c.next_attempt_at".to_owned(),
            Hold::Transaction => ROW_COLUMNS.replace("o.", "c."),
        }
    }

    /// `ready`, the claim's rows in `(next_attempt_at, id)` order up to the
    /// limit, from `branches` (each selecting [`picked`](Self::picked)).
    fn ready(self, branches: &str) -> String {
        let cols = match self {
            Hold::Lease => "r.id",
            Hold::Transaction => "r.*",
        };
        format!(
            "ready AS (SELECT {cols} FROM ({branches}) r ORDER BY r.next_attempt_at, r.id LIMIT $2)"
        )
    }

    /// The statement's end: the lease write, or the locked rows themselves.
    fn finish(self, t: &str, g: &str) -> String {
        match self {
            Hold::Lease => format!(
                "UPDATE {t} o SET deliveries_count = o.deliveries_count + 1, acquired_at = now(), acquired_token = $4 \
                 WHERE o.id IN (SELECT id FROM ready){g} \
                 RETURNING {ROW_COLUMNS}"
            ),
            Hold::Transaction => "SELECT * FROM ready".to_owned(),
        }
    }
}

/// The lock a keyed publish takes before its row gets an id:
/// `pg_advisory_xact_lock` on a 64-bit hash of (table, queue, key), the key
/// bound as the parameter `{key}` and the queue as `$1`. Held until the
/// producer's transaction ends, so two transactions publishing one key
/// serialize and the later one's id is drawn after the earlier one
/// committed: within a key, id order is commit order. (A hash collision
/// between two keys only makes them wait for each other.)
fn key_lock_expr(table: &OutboxTable) -> String {
    format!(
        "pg_advisory_xact_lock(hashtextextended({} || chr(31) || $1 || chr(31) || {{key}}, 0))",
        super::ident::literal(&table.qualified_name())
    )
}

/// Parameters: `$1` queue, `$2` payload, `$3` headers, then the schedule (if
/// any), the timer id (if any), the ordering key (if `lock`: the
/// [`key_lock_expr`]), the NOTIFY channel (if notifying).
fn insert_sql(
    t: &str,
    schedule: ScheduleKind,
    timer: TimerKind,
    notify: bool,
    lock: Option<&str>,
) -> String {
    let mut cols = String::from("queue, payload, headers");
    let mut vals = String::from("$1, $2, $3");
    let mut n = 3;
    match schedule {
        ScheduleKind::Now => {}
        ScheduleKind::In => {
            n += 1;
            cols.push_str(", next_attempt_at");
            vals.push_str(&format!(", now() + make_interval(secs => ${n})"));
        }
        ScheduleKind::At => {
            n += 1;
            cols.push_str(", next_attempt_at");
            vals.push_str(&format!(", ${n}"));
        }
    }
    if timer != TimerKind::None {
        n += 1;
        cols.push_str(", timer_id");
        vals.push_str(&format!(", ${n}"));
    }
    // The key's lock is taken in a subquery the row is selected from, so it
    // is held before the id default (nextval) is evaluated.
    let from = match lock {
        Some(lock) => {
            n += 1;
            cols.push_str(", ordering_key");
            vals.push_str(&format!(", ${n}"));
            let lock = lock.replace("{key}", &format!("${n}::text"));
            format!(" FROM (SELECT {lock}) AS key_lock")
        }
        None => String::new(),
    };
    let conflict = match timer {
        TimerKind::None => String::new(),
        TimerKind::Ignore => {
            " ON CONFLICT (queue, timer_id) WHERE timer_id IS NOT NULL DO NOTHING".to_owned()
        }
        TimerKind::Extend => {
            let later = "excluded.next_attempt_at > o.next_attempt_at";
            format!(
                " ON CONFLICT (queue, timer_id) WHERE timer_id IS NOT NULL DO UPDATE SET \
                 payload = CASE WHEN {later} THEN excluded.payload ELSE o.payload END, \
                 headers = CASE WHEN {later} THEN excluded.headers ELSE o.headers END, \
                 attempts_count = CASE WHEN {later} THEN 0 ELSE o.attempts_count END, \
                 next_attempt_at = greatest(o.next_attempt_at, excluded.next_attempt_at), \
                 first_attempt_at = CASE WHEN {later} THEN NULL ELSE o.first_attempt_at END, \
                 last_attempt_at = CASE WHEN {later} THEN NULL ELSE o.last_attempt_at END \
                 WHERE o.acquired_token IS NULL"
            )
        }
    };
    let returning = if notify {
        format!("RETURNING o.id, pg_notify(${}, o.queue)", n + 1)
    } else {
        "RETURNING o.id".to_owned()
    };
    if lock.is_some() {
        format!("INSERT INTO {t} AS o ({cols}) SELECT {vals}{from}{conflict} {returning}")
    } else {
        format!("INSERT INTO {t} AS o ({cols}) VALUES ({vals}){conflict} {returning}")
    }
}

/// Parameters: `$1` queue, `$2` payloads (`bytea[]`), `$3` headers (`jsonb[]`),
/// then the schedule (if any), the ordering key of every row (if `lock`),
/// the NOTIFY channel (if notifying). Returns the number of rows inserted;
/// one statement, one NOTIFY, rows in the arrays' order.
fn insert_batch_sql(t: &str, schedule: ScheduleKind, notify: bool, lock: Option<&str>) -> String {
    let (col, val, mut n) = match schedule {
        ScheduleKind::Now => ("", String::new(), 3),
        ScheduleKind::In => (
            ", next_attempt_at",
            ", now() + make_interval(secs => $4)".to_owned(),
            4,
        ),
        ScheduleKind::At => (", next_attempt_at", ", $4".to_owned(), 4),
    };
    let (key_col, key_val, source) = match lock {
        Some(lock) => {
            n += 1;
            let lock = lock.replace("{key}", &format!("${n}::text"));
            (
                ", ordering_key",
                format!(", ${n}"),
                // The lock is part of the rows' source, so it is taken
                // before any row's id; the ids follow the arrays' order.
                format!(
                    "unnest($2::bytea[], $3::jsonb[]) WITH ORDINALITY AS u(payload, headers, ord) \
                     CROSS JOIN (SELECT {lock}) AS key_lock ORDER BY u.ord"
                ),
            )
        }
        None => (
            "",
            String::new(),
            "unnest($2::bytea[], $3::jsonb[]) AS u(payload, headers)".to_owned(),
        ),
    };
    let notify_expr = if notify {
        n += 1;
        format!(", pg_notify(${n}, $1)")
    } else {
        String::new()
    };
    format!(
        "WITH ins AS (INSERT INTO {t} (queue, payload, headers{col}{key_col}) \
         SELECT $1, u.payload, u.headers{val}{key_val} FROM {source} \
         RETURNING 1) \
         SELECT count(*)::int8{notify_expr} FROM ins"
    )
}

/// The claim: one statement per fetch. Per served queue, two index-ordered
/// LATERAL branches (unleased rows on `<t>_pending_idx`, expired leases on
/// `<t>_leased_idx`), each `FOR UPDATE SKIP LOCKED`, merged in
/// `(next_attempt_at, id)` order. Parameters: `$1` queues (`varchar[]`),
/// `$2` limit, `$3` lease TTL in seconds, `$4` the fresh lease token.
/// Without `with_expired`, only the pending branch (`$3` is then unused).
/// `hold`: the claim writes a lease, or (a lot's claim) returns the rows it
/// locked and writes nothing (`$4` is then unused).
fn claim_sql(t: &str, with_expired: bool, g: &str, hold: Hold) -> String {
    let picked = hold.picked();
    // Each LATERAL branch is limited per queue: with several queues the
    // overall limit is applied in `ready` too (the buffer has room for `$2`
    // rows only).
    let ready = if with_expired {
        hold.ready("SELECT * FROM pending UNION ALL SELECT * FROM expired")
    } else {
        hold.ready("SELECT * FROM pending")
    };
    let expired = if with_expired {
        format!(
            "expired AS (SELECT e.* FROM queues CROSS JOIN LATERAL (\
               SELECT {picked} FROM {t} c \
               WHERE c.queue = queues.name AND c.next_attempt_at <= now() AND c.acquired_token IS NOT NULL \
               AND c.acquired_at < now() - make_interval(secs => $3) \
               ORDER BY c.next_attempt_at, c.id LIMIT $2 FOR UPDATE SKIP LOCKED) e), "
        )
    } else {
        String::new()
    };
    format!(
        "WITH queues AS (SELECT DISTINCT unnest($1::varchar[]) AS name), \
         pending AS (SELECT p.* FROM queues CROSS JOIN LATERAL (\
           SELECT {picked} FROM {t} c \
           WHERE c.queue = queues.name AND c.next_attempt_at <= now() AND c.acquired_token IS NULL \
           ORDER BY c.next_attempt_at, c.id LIMIT $2 FOR UPDATE SKIP LOCKED) p), \
         {expired}{ready} {finish}",
        finish = hold.finish(t, g)
    )
}

/// The ordered claim of one queue. Parameters: `$1` queue, `$2` limit, `$3`
/// lease TTL in seconds (used with `with_expired`), `$4` the fresh lease
/// token, `$5` the key cursor (`''`: from the first key).
///
/// - **Keyed rows, heads only.** A skip scan over `<t>_key_idx` walks the
///   queue's distinct keys in byte order (`COLLATE "C"`, as the index),
///   starting after the cursor and wrapping round to it, so successive
///   claims serve every key in turn and none starves. For each key it takes
///   the **head**, the key's oldest row *leased or not*, and keeps it only if
///   it is unleased and due, locking that exact row with `SKIP LOCKED`: a
///   head that another claim holds is skipped, never replaced by the key's
///   second row (which would put two rows of a key in flight), and a head
///   waiting for its retry keeps the whole key back. The walk stops at `$2`
///   claimable heads; with K keys a claim reads at most K index entries
///   twice. The heads are chosen in the walk's order (the lateral lookup
///   keeps the walk on the outside of the join), then locked.
/// - **Rows without a key** (faststream-outbox's, or published without
///   one) are claimed as usual, in id order from the same index. This is
///   why `<t>_key_idx` is not partial: on the pending index, finding them
///   would mean walking past every blocked keyed row of the queue.
/// - **Expired leases**, with `with_expired`: only heads are ever leased, so
///   a reclaim keeps the order.
fn claim_ordered_sql(t: &str, with_expired: bool, g: &str, hold: Hold) -> String {
    let picked = hold.picked();
    let lock_picked = picked.replace("c.", "o.");
    let next = |after: &str| {
        format!(
            "(SELECT c.ordering_key COLLATE \"C\" FROM {t} c \
             WHERE c.queue = $1 AND c.ordering_key COLLATE \"C\" > {after} \
             ORDER BY c.ordering_key COLLATE \"C\" LIMIT 1)"
        )
    };
    let first = format!(
        "(SELECT c.ordering_key COLLATE \"C\" FROM {t} c \
         WHERE c.queue = $1 AND c.ordering_key IS NOT NULL \
         ORDER BY c.ordering_key COLLATE \"C\" LIMIT 1)"
    );
    let (expired, expired_union) = if with_expired {
        (
            format!(
                "expired AS (SELECT {picked} FROM {t} c \
                 WHERE c.queue = $1 AND c.next_attempt_at <= now() AND c.acquired_token IS NOT NULL \
                 AND c.acquired_at < now() - make_interval(secs => $3) \
                 ORDER BY c.next_attempt_at, c.id LIMIT $2 FOR UPDATE SKIP LOCKED), "
            ),
            " UNION ALL SELECT * FROM expired",
        )
    } else {
        (String::new(), "")
    };
    format!(
        "WITH RECURSIVE \
         fwd(k) AS (SELECT {from_cursor} UNION ALL SELECT {after_fwd} FROM fwd WHERE fwd.k IS NOT NULL), \
         wrap(k) AS (SELECT {first} UNION ALL SELECT {after_wrap} FROM wrap \
           WHERE wrap.k IS NOT NULL AND wrap.k <= $5::text COLLATE \"C\"), \
         heads AS (SELECT hh.id FROM \
           (SELECT fwd.k FROM fwd UNION ALL SELECT wrap.k FROM wrap WHERE wrap.k <= $5::text COLLATE \"C\") ks \
           CROSS JOIN LATERAL (SELECT h.id, h.acquired_token, h.next_attempt_at FROM {t} h \
             WHERE h.queue = $1 AND h.ordering_key COLLATE \"C\" = ks.k \
             ORDER BY h.ordering_key COLLATE \"C\", h.id LIMIT 1) hh \
           WHERE ks.k IS NOT NULL AND hh.acquired_token IS NULL AND hh.next_attempt_at <= now() \
           LIMIT $2), \
         keyed AS (SELECT {lock_picked} FROM {t} o \
           WHERE o.id IN (SELECT heads.id FROM heads) AND o.acquired_token IS NULL \
           AND o.next_attempt_at <= now() FOR UPDATE SKIP LOCKED), \
         keyless AS (SELECT {picked} FROM {t} c \
           WHERE c.queue = $1 AND c.ordering_key IS NULL AND c.acquired_token IS NULL \
           AND c.next_attempt_at <= now() ORDER BY c.id LIMIT $2 FOR UPDATE SKIP LOCKED), \
         {expired}{ready} {finish}",
        ready = hold.ready(&format!(
            "SELECT * FROM keyed UNION ALL SELECT * FROM keyless{expired_union}"
        )),
        finish = hold.finish(t, g),
        from_cursor = next("$5::text COLLATE \"C\""),
        after_fwd = next("fwd.k"),
        after_wrap = next("wrap.k"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmts() -> Statements {
        Statements::new(
            &OutboxTable::new("outbox").expect("valid"),
            Some(&DlqTable::new("outbox_dlq").expect("valid")),
            true,
        )
    }

    #[test]
    fn single_publish_folds_notify_into_returning() {
        let s = stmts();
        let sql = s.insert(ScheduleKind::Now, TimerKind::None, true, false);
        assert_eq!(
            &**sql,
            r#"INSERT INTO "outbox" AS o (queue, payload, headers) VALUES ($1, $2, $3) RETURNING o.id, pg_notify($4, o.queue)"#
        );
        let sql = s.insert(ScheduleKind::In, TimerKind::Extend, false, false);
        assert!(
            sql.contains("now() + make_interval(secs => $4), $5)"),
            "{sql}"
        );
        assert!(
            sql.contains("WHERE o.acquired_token IS NULL RETURNING o.id"),
            "{sql}"
        );
        assert!(!sql.contains("pg_notify"));
        let sql = s.insert(ScheduleKind::At, TimerKind::Ignore, true, false);
        assert!(
            sql.contains("DO NOTHING RETURNING o.id, pg_notify($6, o.queue)"),
            "{sql}"
        );
    }

    #[test]
    fn every_insert_variant_is_distinct() {
        let s = stmts();
        let mut all: Vec<&str> = s.insert.iter().map(|x| &**x).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 18);
    }

    #[test]
    fn batch_insert_is_one_statement_with_one_notify() {
        let s = stmts();
        let sql = s.insert_batch(ScheduleKind::Now, true, false);
        assert!(sql.contains("unnest($2::bytea[], $3::jsonb[])"), "{sql}");
        assert!(
            sql.ends_with("SELECT count(*)::int8, pg_notify($4, $1) FROM ins"),
            "{sql}"
        );
    }

    #[test]
    fn keyed_inserts_lock_the_key_before_the_id_is_drawn() {
        let s = stmts();
        let sql = s.insert(ScheduleKind::Now, TimerKind::None, true, true);
        assert_eq!(
            &**sql,
            r#"INSERT INTO "outbox" AS o (queue, payload, headers, ordering_key) SELECT $1, $2, $3, $4 FROM (SELECT pg_advisory_xact_lock(hashtextextended('"outbox"' || chr(31) || $1 || chr(31) || $4::text, 0))) AS key_lock RETURNING o.id, pg_notify($5, o.queue)"#
        );
        let sql = s.insert(ScheduleKind::In, TimerKind::Extend, false, true);
        assert!(
            sql.contains("$4), $5, $6 FROM (SELECT pg_advisory_xact_lock("),
            "{sql}"
        );
        assert!(
            sql.contains(" AS key_lock ON CONFLICT (queue, timer_id)"),
            "{sql}"
        );
        let sql = s.insert_batch(ScheduleKind::Now, true, true);
        assert!(
            sql.contains("WITH ORDINALITY AS u(payload, headers, ord) CROSS JOIN (SELECT pg_advisory_xact_lock("),
            "{sql}"
        );
        assert!(sql.contains("ORDER BY u.ord RETURNING 1"), "{sql}");
        assert!(
            sql.ends_with("SELECT count(*)::int8, pg_notify($5, $1) FROM ins"),
            "{sql}"
        );
        let mut all: Vec<&str> = s.insert_keyed.iter().map(|x| &**x).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 18);
    }

    #[test]
    fn ordered_claims_lock_exact_heads() {
        let s = stmts();
        for with_expired in [false, true] {
            let sql = s.claim_ordered(with_expired);
            // The head is taken among all rows of the key (leased too), then
            // that exact row is locked: never the key's second row.
            assert!(
                sql.contains("ORDER BY h.ordering_key COLLATE \"C\", h.id LIMIT 1) hh"),
                "{sql}"
            );
            assert!(
                sql.contains(
                    "WHERE o.id IN (SELECT heads.id FROM heads) AND o.acquired_token IS NULL"
                ),
                "{sql}"
            );
            assert!(
                sql.contains("<= now() FOR UPDATE SKIP LOCKED), keyless"),
                "{sql}"
            );
            assert_eq!(sql.contains("expired AS"), with_expired, "{sql}");
        }
    }

    #[test]
    fn dead_letter_move_is_one_statement() {
        let s = stmts();
        let sql = s.dead_letter.as_deref().expect("dlq configured");
        assert!(sql.starts_with(
            r#"WITH deleted AS (DELETE FROM "outbox" WHERE id = $1 AND acquired_token IS NOT DISTINCT FROM $2"#
        ));
        assert!(sql.contains(r#"INSERT INTO "outbox_dlq""#));
    }
}
