//! The lease heartbeat against real PostgreSQL: a handler that runs several
//! leases long keeps its row while another engine competes for it (and,
//! heartbeat off, loses it: the control); a lease taken from under the
//! heartbeat is reported as `lease_lost` (phase `heartbeat`) and the row is
//! left to its new holder; `ClaimMode::Transaction`'s rows leased at
//! `max_hold`; a crashed or stopped engine's leases expire as before; the
//! extension's statement uses the primary key.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{ClaimMode, Engine, Message, OutboxBroker, Subscriber, SubscriberBuilder};
use tests::{TestDb, captured, wait_until};
use tokio::sync::Semaphore;

type R = anyhow::Result<()>;

/// The lease of every test: 1 s (heartbeat every 333 ms by default).
const LEASE: Duration = Duration::from_secs(1);

fn fast(queue: &str) -> SubscriberBuilder {
    Subscriber::builder([queue])
        .lease_ttl(LEASE)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(100))
}

fn engine(broker: &OutboxBroker, name: &str, sub: Subscriber) -> Engine {
    Engine::new(broker.clone())
        .application_name(name)
        .subscriber(sub)
}

/// Handler calls per row id, shared by the competing engines.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<i64, usize>>>);

impl Calls {
    fn record(&self, id: i64) {
        *self.0.lock().unwrap().entry(id).or_default() += 1;
    }
    fn of(&self, id: i64) -> usize {
        self.0.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
}

/// `lease_lost` events logged for `row_id` with `phase`.
fn lease_lost(row_id: i64, phase: &str) -> usize {
    captured(|c| {
        c.fields.get("event").map(String::as_str) == Some("lease_lost")
            && c.fields.get("phase").map(String::as_str) == Some(phase)
            && c.fields.get("row_id") == Some(&row_id.to_string())
    })
    .len()
}

/// Two engines on one queue, each with the same handler: the first call of
/// a row runs three leases long (3 s under a 1 s lease), later calls
/// return at once. Returns how often the row was handled once it is gone.
async fn two_engines_one_slow_row(mode: ClaimMode, heartbeat: bool) -> anyhow::Result<usize> {
    let db = TestDb::new().await?;
    let queue = "slow";
    let calls = Calls::default();
    let sub = |name: &str| {
        let c = calls.clone();
        let b = fast(queue)
            .name(name)
            .claim_mode(mode)
            // Transaction mode: the lot leases the row at max_hold.
            .max_hold(Duration::from_millis(300));
        let b = if heartbeat {
            b
        } else {
            b.without_lease_heartbeat()
        };
        b.build(move |m: Message| {
            c.record(m.id());
            let first = m.deliveries_count() == 1;
            async move {
                if first {
                    tokio::time::sleep(LEASE * 3).await;
                }
            }
        })
    };
    let a = engine(&db.broker, &format!("a-{}", db.schema), sub("a")?);
    let b = engine(&db.broker, &format!("b-{}", db.schema), sub("b")?);
    a.start().await?;
    b.start().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, queue, &mut conn).await?;
    drop(conn);
    // Gone once the slow first call's ack (or, heartbeat off, the second
    // call's) deleted it.
    assert!(db.drained(Duration::from_secs(20)).await, "row {id} left");
    // A late second delivery would show within a lease: wait one out.
    tokio::time::sleep(LEASE).await;
    a.stop().await;
    b.stop().await;
    let n = calls.of(id);
    println!("{mode:?}, heartbeat {heartbeat}: row {id} handled {n} times");
    if heartbeat {
        assert_eq!(lease_lost(id, "heartbeat"), 0, "no extension was lost");
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_three_leases_long_is_handled_once_while_another_engine_competes() -> R {
    assert_eq!(two_engines_one_slow_row(ClaimMode::Lease, true).await?, 1);
    Ok(())
}

/// The control: without the heartbeat the same run handles the row twice
/// (the lease expires under the slow handler and the other claim takes
/// it), so the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_heartbeat_the_same_handler_is_handled_twice() -> R {
    assert!(two_engines_one_slow_row(ClaimMode::Lease, false).await? >= 2);
    Ok(())
}

/// `ClaimMode::Transaction`: the lot reaches `max_hold` (300 ms) while the
/// handler runs and leases the row (1 s); the heartbeat extends that lease
/// until the handler's outcome is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_leased_at_max_hold_is_extended_until_its_handler_ends() -> R {
    assert_eq!(
        two_engines_one_slow_row(ClaimMode::Transaction, true).await?,
        1
    );
    Ok(())
}

/// The control of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_heartbeat_a_row_leased_at_max_hold_is_handled_twice() -> R {
    assert!(two_engines_one_slow_row(ClaimMode::Transaction, false).await? >= 2);
    Ok(())
}

/// A subscriber of `queue` whose handler counts its calls in `calls` and
/// waits for a permit of the returned gate (kept).
fn gated(queue: &str, calls: &Calls) -> (Subscriber, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let (g, calls) = (gate.clone(), calls.clone());
    let sub = fast(queue)
        .build(move |m: Message| {
            calls.record(m.id());
            let g = g.clone();
            async move {
                if let Ok(p) = g.acquire().await {
                    p.forget();
                }
            }
        })
        .unwrap();
    (sub, gate)
}

/// Another holder takes the lease from under a running handler (here: the
/// test writes a new token, dated an hour ahead so nothing reclaims it): the
/// heartbeat reports `lease_lost` with phase `heartbeat`, once, stops
/// extending the row, and the handler's late ack leaves it to its holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_lease_is_reported_by_the_heartbeat_and_the_row_is_left_alone() -> R {
    let db = TestDb::new().await?;
    let calls = Calls::default();
    let (sub, gate) = gated("stolen", &calls);
    let e = engine(&db.broker, &format!("s-{}", db.schema), sub);
    e.start().await?;
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish(&1, "stolen", &mut conn).await?;
    drop(conn);
    assert!(wait_until(Duration::from_secs(10), || async { calls.of(id) == 1 }).await);
    // Extended at least once (acquired_at moves) before the theft.
    let acquired_at = || {
        db.scalar(format!(
            "SELECT (extract(epoch FROM acquired_at) * 1000000)::int8 FROM {} WHERE id = {id}",
            db.t()
        ))
    };
    let first = acquired_at().await?;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            acquired_at().await.unwrap() > first
        })
        .await,
        "the heartbeat extends the running row's lease"
    );
    let thief = uuid::Uuid::new_v4();
    db.exec(format!(
        "UPDATE {} SET acquired_token = '{thief}', acquired_at = now() + interval '1 hour' \
         WHERE id = {id}",
        db.t()
    ))
    .await?;
    let stolen_at = acquired_at().await?;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            lease_lost(id, "heartbeat") == 1
        })
        .await,
        "the lost extension is reported"
    );
    // More beats: reported once, and the row is not extended any more.
    tokio::time::sleep(LEASE).await;
    assert_eq!(lease_lost(id, "heartbeat"), 1);
    let lost = captured(|c| {
        c.fields.get("phase").map(String::as_str) == Some("heartbeat")
            && c.fields.get("row_id") == Some(&id.to_string())
    });
    assert_eq!(lost[0].level, tracing::Level::WARN);
    assert_eq!(lost[0].fields["queue"], "stolen");
    // The handler ends: its ack is refused (the thief holds the row).
    gate.add_permits(1);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            lease_lost(id, "terminal") == 1
        })
        .await,
        "the late ack finds the lease gone"
    );
    e.stop().await;
    let token: Option<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT acquired_token FROM {} WHERE id = $1",
        db.t()
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(token, Some(thief), "the row is left to its holder");
    assert_eq!(acquired_at().await?, stolen_at, "and not extended");
    assert_eq!(calls.of(id), 1);
    Ok(())
}

/// The heartbeat lives no longer than its engine: a crashed engine's
/// (abort) and a stopped engine's (graceful stop, the drain timing out on a
/// wedged handler) running rows are claimed again after `lease_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_or_stopped_engines_leases_expire() -> R {
    let db = TestDb::new().await?;
    let broker = db
        .broker
        .clone()
        .graceful_timeout(Duration::from_millis(300));
    let mut conn = db.pool.acquire().await?;
    for (how, queue) in [("abort", "crashed"), ("stop", "stopped")] {
        let calls = Calls::default();
        let (sub, gate) = gated(queue, &calls);
        let first = engine(&broker, &format!("f-{how}-{}", db.schema), sub);
        first.start().await?;
        let id = db.broker.publish(&1, queue, &mut conn).await?;
        assert!(wait_until(Duration::from_secs(10), || async { calls.of(id) == 1 }).await);
        // Extended past the first lease while running.
        tokio::time::sleep(LEASE * 2).await;
        assert_eq!(calls.of(id), 1);
        if how == "abort" {
            first.abort().await;
        } else {
            let report = first.stop().await;
            assert_eq!(report.timed_out.len(), 1, "{report:?}");
        }
        let (sub, second_gate) = gated(queue, &calls);
        second_gate.add_permits(1);
        let second = engine(&broker, &format!("s-{how}-{}", db.schema), sub);
        second.start().await?;
        assert!(
            wait_until(Duration::from_secs(10), || async {
                db.scalar(format!(
                    "SELECT count(*) FROM {} WHERE queue = '{queue}'",
                    db.t()
                ))
                .await
                .unwrap()
                    == 0
            })
            .await,
            "{how}: the row is claimed again once its lease expired"
        );
        assert_eq!(calls.of(id), 2, "{how}");
        second.stop().await;
        gate.close();
    }
    Ok(())
}

/// The extension looks rows up by primary key, even when the statistics
/// say nothing is leased (as the other token-guarded writes do).
#[tokio::test]
async fn the_extension_uses_the_primary_key() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "INSERT INTO {} (queue, payload, headers) \
         SELECT 'q', '\\x00'::bytea, '{{}}'::jsonb FROM generate_series(1, 20000)",
        db.t()
    ))
    .await?;
    db.exec(format!("ANALYZE {}", db.t())).await?; // no leased row at all
    db.exec(format!(
        "UPDATE {} SET acquired_token = gen_random_uuid(), acquired_at = now() WHERE id % 2 = 0",
        db.t()
    ))
    .await?;
    let sql = outbox_core::__private::engine_sql(&db.table, "extend")
        .unwrap()
        .replace(
            "$1::int8[]",
            "(SELECT array_agg(id) FROM generate_series(1, 1000) id)::int8[]",
        )
        .replace(
            "$2::uuid[]",
            "(SELECT array_agg(gen_random_uuid()) FROM generate_series(1, 1000))::uuid[]",
        );
    let mut tx = db.pool.begin().await?;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let plan = plan.join("\n");
    assert!(plan.contains("_pkey"), "by primary key:\n{plan}");
    assert!(
        !plan.contains("_leased_idx") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    Ok(())
}

/// The option is checked when the subscriber is built.
#[test]
fn a_heartbeat_as_long_as_the_lease_is_refused() {
    let err = fast("q")
        .lease_heartbeat(Some(LEASE))
        .build(|_: Message| async {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lease_heartbeat (1s) must be shorter than lease_ttl (1s)"),
        "{err}"
    );
    let ok = fast("q")
        .lease_heartbeat(Some(Duration::from_millis(200)))
        .build(|_: Message| async {})
        .unwrap();
    assert_eq!(
        ok.options().get_lease_heartbeat(),
        Some(Duration::from_millis(200))
    );
}
