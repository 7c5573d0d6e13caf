//! `#[subscriber(.., ordered, poison_policy = ..)]` end to end: the options
//! reach the macro-built `Route`, and the engine runs it as an ordered
//! subscriber with that poison policy on real PostgreSQL.
//!
//! In a binary of their own: `inventory` discovery would otherwise put these
//! handlers into `macros.rs`'s discovery test.

#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{App, IntoRoute, PublishOptions, Route, subscriber};
use tests::{RunningApp, TestDb};

type R = anyhow::Result<()>;

/// What one handler saw: bodies in call order, and the most calls that were
/// ever in flight at once.
struct Seen {
    bodies: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Seen {
    const fn new() -> Self {
        Seen {
            bodies: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Records a call of `body`, held for a while so that rows handled in
    /// parallel would overlap; returns how many calls of `body` there were.
    async fn call(&self, body: &str) -> usize {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let calls = {
            let mut bodies = self.bodies.lock().unwrap();
            bodies.push(body.to_owned());
            bodies.iter().filter(|b| *b == body).count()
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        calls
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

static CONTINUE: Seen = Seen::new();

/// Fails on `"poison"` every time; its retry strategy would retry it
/// forever, the poison policy dead-letters it at once instead.
#[subscriber(
    "macros_ordered.continue",
    ordered,
    poison_policy = DeadLetterAndContinue,
    max_workers = 4,
    retry = ConstantRetry::new(Duration::from_millis(10)),
    min_fetch_interval = "20ms",
    max_fetch_interval = "200ms",
)]
async fn continue_on_poison(body: String) -> Result<(), String> {
    CONTINUE.call(&body).await;
    if body == "poison" {
        return Err("poison".to_owned());
    }
    Ok(())
}

static BLOCK: Seen = Seen::new();

/// Fails on the first two calls of `"poison"`: the key's later rows wait.
#[subscriber(
    "macros_ordered.block",
    ordered = true,
    poison_policy = outbox_core::PoisonPolicy::Block,
    max_workers = 4,
    retry = ConstantRetry::new(Duration::from_millis(10)),
    min_fetch_interval = "20ms",
    max_fetch_interval = "200ms",
)]
async fn block_on_poison(body: String) -> Result<(), String> {
    let calls = BLOCK.call(&body).await;
    if body == "poison" && calls <= 2 {
        return Err(format!("poison, call {calls}"));
    }
    Ok(())
}

/// Not ordered: the defaults.
#[subscriber("macros_ordered.unordered")]
async fn unordered(body: String) {
    let _ = body;
}

/// `ordered: .., poison_policy: ..` from the route's options, as
/// `"true DeadLetterAndContinue"` (the `Route` shows its options only through
/// `Debug`).
fn options(route: &Route) -> String {
    tests::debug_fields(route, &["ordered", "poison_policy"])
}

fn run(db: &TestDb, route: impl IntoRoute) -> RunningApp {
    RunningApp::start(
        App::new(db.broker.clone())
            .without_discovery()
            .without_signals()
            .subscriber(route),
    )
}

/// One transaction publishing `bodies` under the key `k`, in this order.
async fn publish_keyed(db: &TestDb, queue: &str, bodies: &[&str]) -> R {
    let mut conn = db.pool.acquire().await?;
    let n = db
        .broker
        .publish_batch_with(bodies, queue, &PublishOptions::new().key("k"), &mut conn)
        .await?;
    assert_eq!(n, bodies.len() as u64);
    Ok(())
}

#[test]
fn the_options_reach_the_route() {
    assert_eq!(
        options(&continue_on_poison {}.into_route()),
        "true DeadLetterAndContinue"
    );
    assert_eq!(options(&block_on_poison {}.into_route()), "true Block");
    assert_eq!(options(&unordered {}.into_route()), "false Block");
}

#[tokio::test]
async fn dead_letter_and_continue_moves_a_failing_head_aside_at_once() -> R {
    let db = TestDb::new().await?;
    let app = run(&db, continue_on_poison {});
    publish_keyed(&db, "macros_ordered.continue", &["poison", "a", "b"]).await?;
    assert!(db.drained(Duration::from_secs(20)).await, "not drained");
    assert_eq!(
        CONTINUE.bodies(),
        ["poison", "a", "b"],
        "one call for the poison row, then the key goes on, in order"
    );
    assert_eq!(
        CONTINUE.max_in_flight.load(Ordering::SeqCst),
        1,
        "one row of the key at a time, though max_workers = 4"
    );
    let dead = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE failure_reason = 'retry_terminal' \
             AND ordering_key = 'k' AND payload = 'poison'::bytea",
            db.d()
        ))
        .await?;
    assert_eq!(dead, 1);
    assert_eq!(db.dlq_count().await?, 1);
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn block_holds_the_key_back_until_its_head_succeeds() -> R {
    let db = TestDb::new().await?;
    let app = run(&db, block_on_poison {});
    publish_keyed(&db, "macros_ordered.block", &["poison", "a", "b"]).await?;
    assert!(db.drained(Duration::from_secs(20)).await, "not drained");
    assert_eq!(
        BLOCK.bodies(),
        ["poison", "poison", "poison", "a", "b"],
        "the key's later rows wait for its head's retries"
    );
    assert_eq!(BLOCK.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(db.dlq_count().await?, 0);
    app.stop().await?;
    Ok(())
}
