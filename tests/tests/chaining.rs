//! Queue chaining exactly once, against real PostgreSQL: a handler's result
//! published to an `OutboxTransport` on the subscriber's own database is
//! inserted in the transaction that deletes the inbound row (lease mode:
//! `DELETE` guarded by the token, `INSERT`, `COMMIT`; transaction mode:
//! inside the lot's transaction), so every handled inbound row has exactly
//! one follow-on row, whatever dies when:
//!
//! - both claim modes write each follow-on row once;
//! - a backend killed (`pg_terminate_backend` from a trigger) right after the
//!   follow-on `INSERT` or the inbound `DELETE`, before the `COMMIT`, over
//!   many rows: no duplicate, no loss;
//! - a lease lost before the ack commits no follow-on row; the control (an
//!   `OutboxTransport` on "another database", which inserts on its own
//!   connection) writes it twice;
//! - delayed follow-ons (`Response::activate_in` / `activate_at`) are due on
//!   the database clock; timer follow-ons keep the timer rules (`Ignore`,
//!   `Extend`);
//! - those options sent to another transport fail, naming the problem,
//!   before anything is sent.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_core::retry::NoRetry;
use outbox_core::{
    App, BoxError, ClaimMode, MemoryTransport, Message, OutboxBroker, OutboxTransport, Response,
    Route, RouteBuilder, TimerConflict,
};
use sqlx::postgres::PgPoolOptions;
use tests::{RunningApp, TestDb, captured, wait_until};
use tokio::sync::Semaphore;

type R = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(60);

/// A route from queue `in` to the outbox queue `out`, polling briskly.
fn route(mode: ClaimMode) -> RouteBuilder {
    Route::builder(["in"])
        .name("chain")
        .claim_mode(mode)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("outbox", "out")
}

/// The `i64` body of each row, forwarded as is.
async fn forward(m: Message) -> Result<Response<i64>, BoxError> {
    Ok(Response::new(m.decode::<i64>()?))
}

fn app(db: &TestDb, target: OutboxBroker, route: Route) -> App {
    db.app()
        .transport(OutboxTransport::new(target))
        .subscriber(route)
}

async fn publish(db: &TestDb, n: i64) -> R {
    let mut conn = db.pool.acquire().await?;
    db.broker.publish_batch(0..n, "in", &mut conn).await?;
    Ok(())
}

async fn rows(db: &TestDb, queue: &str) -> anyhow::Result<i64> {
    db.scalar(format!(
        "SELECT count(*) FROM {} WHERE queue = '{queue}'",
        db.t()
    ))
    .await
}

/// The follow-on rows, and how many distinct bodies they carry.
async fn follow_ons(db: &TestDb) -> anyhow::Result<(i64, i64)> {
    let total = rows(db, "out").await?;
    let distinct = db
        .scalar(format!(
            "SELECT count(DISTINCT payload) FROM {} WHERE queue = 'out'",
            db.t()
        ))
        .await?;
    Ok((total, distinct))
}

/// Waits until every inbound row is gone and `n` follow-on rows exist.
async fn chained(db: &TestDb, n: i64) -> bool {
    wait_until(WAIT, || async {
        rows(db, "in").await.unwrap() == 0 && rows(db, "out").await.unwrap() >= n
    })
    .await
}

/// A broker on the same table through a pool that connects to `localhost`
/// instead of `127.0.0.1`: the same server, but not provably the same
/// database, so its `OutboxTransport` inserts on its own connection (the
/// at-least-once path of a table in another database).
fn elsewhere(db: &TestDb) -> OutboxBroker {
    let url = tests::database_url();
    assert!(
        url.contains("127.0.0.1"),
        "the control needs a database URL with 127.0.0.1: {url}"
    );
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&url.replace("127.0.0.1", "localhost"))
        .unwrap();
    OutboxBroker::new(pool, db.table.clone())
}

// ---------------------------------------------------------------------------
// (a) each follow-on row once, both claim modes

async fn written_once(mode: ClaimMode) -> R {
    let db = TestDb::new().await?;
    publish(&db, 200).await?;
    let running = RunningApp::start(app(
        &db,
        db.broker.clone(),
        route(mode).fetch_batch_size(20).to(forward),
    ));
    assert!(chained(&db, 200).await, "{mode:?}: the rows were chained");
    running.stop().await?;
    assert_eq!(follow_ons(&db).await?, (200, 200), "{mode:?}: one per row");
    let bodies = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE queue = 'out' \
             AND convert_from(payload, 'UTF8')::int8 BETWEEN 0 AND 199",
            db.t()
        ))
        .await?;
    assert_eq!(bodies, 200, "{mode:?}: the bodies are the inbound ones");
    Ok(())
}

#[tokio::test]
async fn lease_mode_writes_each_follow_on_row_once() -> R {
    written_once(ClaimMode::Lease).await
}

#[tokio::test]
async fn transaction_mode_writes_each_follow_on_row_once() -> R {
    written_once(ClaimMode::Transaction).await
}

// ---------------------------------------------------------------------------
// (b) the crash window: the backend dies between the follow-on INSERT and
// the COMMIT of the inbound row's DELETE

/// Triggers that terminate the backend writing them on one in `every`
/// follow-on INSERTs (queue `out`) and inbound DELETEs (queue `in`), after
/// the row was written and before the transaction commits; the sequence
/// `kills` (not transactional: it survives the rollbacks) counts the
/// attempts.
async fn install_killer(db: &TestDb, every: i64) -> R {
    let s = &db.schema;
    db.exec(format!("CREATE SEQUENCE \"{s}\".kills")).await?;
    db.exec(format!(
        "CREATE FUNCTION \"{s}\".kill() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF (TG_OP = 'INSERT' AND NEW.queue = 'out') OR (TG_OP = 'DELETE' AND OLD.queue = 'in') THEN \
             IF nextval('\"{s}\".kills') % {every} = 1 THEN \
               PERFORM pg_terminate_backend(pg_backend_pid()); \
               PERFORM pg_sleep(5); \
             END IF; \
           END IF; \
           RETURN NULL; \
         END $$"
    ))
    .await?;
    db.exec(format!(
        "CREATE TRIGGER kill AFTER INSERT OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION \"{s}\".kill()",
        db.t()
    ))
    .await?;
    Ok(())
}

/// How many backends the trigger terminated so far.
async fn kills(db: &TestDb, every: i64) -> anyhow::Result<i64> {
    let attempts = db
        .scalar(format!(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM \"{}\".kills",
            db.schema
        ))
        .await?;
    Ok((attempts + every - 1) / every)
}

/// `n` rows chained by `mode` in claims of `batch` while one in `every`
/// follow-on INSERT or inbound DELETE kills its backend before the commit.
async fn survives_kills(mode: ClaimMode, batch: usize, every: i64, n: i64) -> R {
    let db = TestDb::new().await?;
    install_killer(&db, every).await?;
    publish(&db, n).await?;
    let running = RunningApp::start(app(
        &db,
        db.broker.clone(),
        route(mode)
            .fetch_batch_size(batch)
            .lease_ttl(Duration::from_secs(3))
            .to(forward),
    ));
    let done = chained(&db, n).await;
    running.stop().await?;
    let killed = kills(&db, every).await?;
    assert!(
        done,
        "{mode:?}: every row was chained despite {killed} kills"
    );
    assert!(
        killed >= 3,
        "{mode:?}: the trigger killed {killed} backends; the test proves nothing without kills"
    );
    assert_eq!(
        follow_ons(&db).await?,
        (n, n),
        "{mode:?}: exactly one follow-on row per inbound row after {killed} kills"
    );
    Ok(())
}

#[tokio::test]
async fn lease_mode_survives_a_backend_killed_between_insert_and_commit() -> R {
    survives_kills(ClaimMode::Lease, 10, 5, 60).await
}

#[tokio::test]
async fn transaction_mode_survives_a_backend_killed_between_insert_and_commit() -> R {
    // Small lots, fewer kills: a kill rolls the whole lot back.
    survives_kills(ClaimMode::Transaction, 2, 11, 40).await
}

// ---------------------------------------------------------------------------
// (d) a lease lost before the ack: no follow-on row

/// Runs one inbound row whose first handling waits while the test takes
/// its lease (as another relay would after an expiry), then lets it finish
/// and gives the row back. Returns the follow-on rows after the first
/// handling's ack was refused, and after the second handling.
async fn steal_the_lease(
    target: impl FnOnce(&TestDb) -> OutboxBroker,
) -> anyhow::Result<(i64, i64)> {
    let db = TestDb::new().await?;
    publish(&db, 1).await?;
    let started = Arc::new(Semaphore::new(0));
    let go = Arc::new(Semaphore::new(0));
    let (s, g) = (started.clone(), go.clone());
    let route = route(ClaimMode::Lease)
        .lease_ttl(Duration::from_secs(60))
        .handler(move |m: Message, _ctx| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                if m.deliveries_count() == 1 {
                    s.add_permits(1);
                    g.acquire().await?.forget();
                }
                Ok::<_, BoxError>(Response::new(m.decode::<i64>()?))
            }
        });
    let running = RunningApp::start(app(&db, target(&db), route));
    tokio::time::timeout(WAIT, started.acquire())
        .await??
        .forget();
    let stolen = db
        .exec(format!(
            "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE queue = 'in'",
            db.t()
        ))
        .await?;
    assert_eq!(stolen, 1);
    go.add_permits(1);
    let refused = wait_until(WAIT, || async {
        !captured(|c| c.fields.get("event").is_some_and(|e| e == "lease_lost")).is_empty()
    })
    .await;
    assert!(refused, "the first handling's ack was refused (lease_lost)");
    let after_first = rows(&db, "out").await?;
    assert_eq!(rows(&db, "in").await?, 1, "the inbound row is still there");
    // Give the row back: handled again, acked.
    db.exec(format!(
        "UPDATE {} SET acquired_token = NULL, acquired_at = NULL WHERE queue = 'in'",
        db.t()
    ))
    .await?;
    let handled = wait_until(WAIT, || async { rows(&db, "in").await.unwrap() == 0 }).await;
    running.stop().await?;
    assert!(handled, "the row was handled again once given back");
    Ok((after_first, rows(&db, "out").await?))
}

#[tokio::test]
async fn a_lease_lost_before_the_ack_commits_no_follow_on_row() -> R {
    let (after_first, after_second) = steal_the_lease(|db| db.broker.clone()).await?;
    assert_eq!(
        after_first, 0,
        "the refused ack rolled its follow-on row back"
    );
    assert_eq!(after_second, 1, "exactly one follow-on row in the end");
    Ok(())
}

/// The control: a table that is not provably in the same database gets
/// the follow-on row on its own connection before the ack, so the lost
/// lease duplicates it (what every transport's at-least-once means).
#[tokio::test]
async fn control_an_outbox_in_another_database_writes_it_twice() -> R {
    let (after_first, after_second) = steal_the_lease(elsewhere).await?;
    assert_eq!(
        after_first, 1,
        "written on its own connection, before the ack"
    );
    assert_eq!(after_second, 2, "and again by the second handling");
    Ok(())
}

// ---------------------------------------------------------------------------
// (c) delayed and timer follow-ons

/// `activate_in` is measured on the database clock from the writing
/// transaction's start: `next_attempt_at` is exactly `created_at + delay`
/// (both `now()` of that transaction; the test's clock would not give an
/// exact match), and the row is not due yet. `activate_at` is stored as
/// given.
async fn delayed(mode: ClaimMode) -> R {
    let db = TestDb::new().await?;
    publish(&db, 4).await?;
    let at = chrono::DateTime::parse_from_rfc3339("2100-01-02T03:04:05.678901Z")?.to_utc();
    let route = route(mode).handler(move |m: Message, _ctx| async move {
        let v: i64 = m.decode()?;
        let r = Response::new(v);
        Ok::<_, BoxError>(if v % 2 == 0 {
            r.activate_in(Duration::from_millis(3_600_250))
        } else {
            r.activate_at(at)
        })
    });
    let running = RunningApp::start(app(&db, db.broker.clone(), route));
    let done = chained(&db, 4).await;
    running.stop().await?;
    assert!(done, "{mode:?}: chained");
    let t = db.t();
    let exact = db
        .scalar(format!(
            "SELECT count(*) FROM {t} WHERE queue = 'out' \
             AND convert_from(payload, 'UTF8')::int8 % 2 = 0 \
             AND next_attempt_at = created_at + interval '3600.25 seconds' \
             AND next_attempt_at > now() + interval '3500 seconds'"
        ))
        .await?;
    assert_eq!(exact, 2, "{mode:?}: activate_in on the database clock");
    let fixed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {t} WHERE queue = 'out' \
         AND convert_from(payload, 'UTF8')::int8 % 2 = 1 AND next_attempt_at = $1"
    )))
    .bind(at)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(fixed, 2, "{mode:?}: activate_at as given");
    Ok(())
}

#[tokio::test]
async fn lease_mode_delayed_follow_ons_are_due_on_the_database_clock() -> R {
    delayed(ClaimMode::Lease).await
}

#[tokio::test]
async fn transaction_mode_delayed_follow_ons_are_due_on_the_database_clock() -> R {
    delayed(ClaimMode::Transaction).await
}

/// A delayed follow-on row becomes due on the database clock: moved to
/// the past in SQL, a subscriber of `out` takes it at once.
#[tokio::test]
async fn a_delayed_follow_on_row_is_handled_once_due() -> R {
    let db = TestDb::new().await?;
    publish(&db, 1).await?;
    let got = Arc::new(Semaphore::new(0));
    let g = got.clone();
    let relay = route(ClaimMode::Lease).handler(|m: Message, _ctx| async move {
        Ok::<_, BoxError>(Response::new(m.decode::<i64>()?).activate_in(Duration::from_secs(3600)))
    });
    let sink = Route::builder(["out"])
        .name("sink")
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .handler(move |_m: Message, _ctx| {
            let g = g.clone();
            async move {
                g.add_permits(1);
            }
        });
    let running = RunningApp::start(app(&db, db.broker.clone(), relay).subscriber(sink));
    assert!(chained(&db, 1).await, "chained");
    assert_eq!(got.available_permits(), 0, "not due for an hour");
    db.exec(format!(
        "UPDATE {} SET next_attempt_at = now() - interval '1 second' WHERE queue = 'out'",
        db.t()
    ))
    .await?;
    let handled = tokio::time::timeout(WAIT, got.acquire()).await;
    running.stop().await?;
    handled??.forget();
    assert_eq!(rows(&db, "out").await?, 0, "handled and deleted");
    Ok(())
}

/// Timer follow-ons keep the timer rules: with `Ignore` (the default) a
/// second follow-on of the same timer is a no-op, and its inbound row is
/// acked all the same; with `Extend`, a later deadline moves the timer and
/// replaces its body.
#[tokio::test]
async fn timer_follow_ons_follow_the_timer_rules() -> R {
    for mode in [ClaimMode::Lease, ClaimMode::Transaction] {
        let db = TestDb::new().await?;
        let route = route(mode).handler(|m: Message, _ctx| async move {
            let v: i64 = m.decode()?;
            let r = Response::new(v).activate_in(Duration::from_secs(600 * (v as u64 % 10 + 1)));
            Ok::<_, BoxError>(match v / 10 {
                // 10, 11: timer "ignore"
                1 => r.timer_id("ignore"),
                // 20, 21: timer "extend", the second one later
                _ => r.timer_id("extend").timer_conflict(TimerConflict::Extend),
            })
        });
        let running = RunningApp::start(app(&db, db.broker.clone(), route));
        for v in [10_i64, 11, 20, 21] {
            let mut conn = db.pool.acquire().await?;
            db.broker.publish(&v, "in", &mut conn).await?;
            // One at a time: the second of each timer comes second.
            assert!(
                wait_until(WAIT, || async { rows(&db, "in").await.unwrap() == 0 }).await,
                "{mode:?}: {v} handled"
            );
        }
        running.stop().await?;
        let t = db.t();
        let timers: Vec<(String, String, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT timer_id, convert_from(payload, 'UTF8'), \
             EXTRACT(EPOCH FROM next_attempt_at - created_at)::float8 \
             FROM {t} WHERE queue = 'out' ORDER BY timer_id"
        )))
        .fetch_all(&db.pool)
        .await?;
        assert_eq!(timers.len(), 2, "{mode:?}: one row per timer: {timers:?}");
        assert_eq!(
            (timers[0].0.as_str(), timers[0].1.as_str()),
            ("extend", "21"),
            "{mode:?}: the later deadline won and replaced the body"
        );
        assert!(timers[0].2 > 600.0 * 1.5, "{mode:?}: extended: {timers:?}");
        assert_eq!(
            (timers[1].0.as_str(), timers[1].1.as_str(), timers[1].2),
            ("ignore", "10", 600.0),
            "{mode:?}: the first timer kept"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The outbox-only options on another transport

/// A response that delays its result, sent to a bus transport: the handler
/// fails before anything is sent, naming the option and the transport (here
/// dead-lettered at once, `NoRetry`); the outbox target of the same route
/// got nothing either.
#[tokio::test]
async fn outbox_only_options_sent_to_another_transport_fail_clearly() -> R {
    let db = TestDb::new().await?;
    publish(&db, 1).await?;
    let mem = MemoryTransport::new("mem");
    let route = Route::builder(["in"])
        .claim_mode(ClaimMode::Lease)
        .retry(NoRetry)
        .min_fetch_interval(Duration::from_millis(20))
        .publish_to("outbox", "out")
        .publish_to("mem", "topic")
        .handler(|m: Message, _ctx| async move {
            Ok::<_, BoxError>(
                Response::new(m.decode::<i64>()?)
                    .activate_in(Duration::from_secs(5))
                    .timer_id("t"),
            )
        });
    let running = RunningApp::start(app(&db, db.broker.clone(), route).transport(mem.clone()));
    let dead = wait_until(WAIT, || async { db.dlq_count().await.unwrap() == 1 }).await;
    running.stop().await?;
    assert!(dead, "dead-lettered");
    let text: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT last_exception FROM {}",
        db.d()
    )))
    .fetch_one(&db.pool)
    .await?;
    for needle in [
        "activate_in, timer_id",
        "OutboxTransport",
        "`mem`",
        "nothing was sent",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text:?}");
    }
    assert!(mem.messages().is_empty(), "nothing sent to the bus");
    assert_eq!(rows(&db, "out").await?, 0, "nor to the outbox");
    Ok(())
}

// ---------------------------------------------------------------------------
// Follow-on rows the database refuses

/// A follow-on table that does not exist (same database, so the rows are
/// staged): the insert is refused, rolled back with the ack, and the
/// delivery fails as a refused publish would (here dead-lettered at once,
/// `NoRetry`, naming the transport and the queue); in a lot, the rows
/// without follow-on rows commit all the same.
async fn refused(mode: ClaimMode) -> R {
    let db = TestDb::new().await?;
    publish(&db, 10).await?;
    let missing = OutboxBroker::new(
        db.pool.clone(),
        outbox_core::OutboxTable::new("missing")?.schema(&db.schema)?,
    );
    let route =
        route(mode)
            .fetch_batch_size(10)
            .retry(NoRetry)
            .handler(|m: Message, _ctx| async move {
                let v: i64 = m.decode()?;
                Ok::<_, BoxError>((v % 2 == 1).then(|| Response::new(v)))
            });
    let running = RunningApp::start(app(&db, missing, route));
    let settled = wait_until(WAIT, || async {
        db.count().await.unwrap() == 0 && db.dlq_count().await.unwrap() == 5
    })
    .await;
    running.stop().await?;
    assert!(
        settled,
        "{mode:?}: the odd rows dead-lettered, the even ones acked"
    );
    let texts: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT convert_from(payload, 'UTF8'), last_exception FROM {} ORDER BY 1",
        db.d()
    )))
    .fetch_all(&db.pool)
    .await?;
    let bodies: Vec<&str> = texts.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(bodies, ["1", "3", "5", "7", "9"], "{mode:?}");
    for (_, text) in &texts {
        for needle in ["transport `outbox`", "\"out\"", "missing"] {
            assert!(text.contains(needle), "{mode:?}: {needle:?} in {text:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn lease_mode_refused_follow_on_rows_fail_the_delivery() -> R {
    refused(ClaimMode::Lease).await
}

#[tokio::test]
async fn transaction_mode_refused_follow_on_rows_fail_only_their_delivery() -> R {
    refused(ClaimMode::Transaction).await
}
