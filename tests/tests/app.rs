//! The application runtime end to end on real PostgreSQL with the in-process
//! transport: routes written by hand (the macros' expansion target).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{
    App, AppContext, BoxError, FromDelivery, Hook, IntoRoute, MemoryTransport, Message,
    PublishOptions, Response, Route, State,
};
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;

fn fast(b: outbox_core::RouteBuilder) -> outbox_core::RouteBuilder {
    b.min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

/// What `#[publish_to(kafka, "orders.kafka")] #[subscriber("orders")]
/// async fn handle(order_id: i64) -> i64` expands to, by hand.
#[allow(non_camel_case_types)]
struct handle {}

async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

impl IntoRoute for handle {
    fn into_route(self) -> Route {
        fast(Route::builder(["orders"]))
            .name(concat!(module_path!(), "::handle"))
            .location(file!(), line!(), column!())
            .publish_to("kafka", "orders.kafka")
            .to(|order_id: i64| async move { Response::new(handle(order_id).await) })
    }
}

async fn publish_one(app: AppContext) -> Result<(), BoxError> {
    let mut tx = app.broker().pool().begin().await?;
    app.broker()
        .publish_with(
            &1_i64,
            "orders",
            &PublishOptions::new()
                .header("x-tenant", "acme")
                .correlation_id("corr-1"),
            &mut *tx,
        )
        .await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn the_seed_snippet_relays_a_row_to_the_transport() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let connect = {
        let kafka = kafka.clone();
        Hook::new("kafka.connect", move |ctx: AppContext| async move {
            ctx.add_transport(Arc::new(kafka))
        })
    };
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(handle {})
        .on_startup(connect)
        .after_startup(publish_one);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.destination, "orders.kafka");
    assert_eq!(m.payload, b"1");
    assert_eq!(m.content_type(), Some("application/json"));
    assert_eq!(m.headers["correlation_id"], "corr-1");
    assert!(m.headers.contains_key("outbox-id"));
    assert_eq!(
        m.headers.get("x-tenant").map(String::as_str),
        Some("acme"),
        "propagated by default"
    );
    assert!(db.drained(Duration::from_secs(5)).await);
    stop.shutdown();
    run.await??;
    assert!(kafka.is_closed());
    Ok(())
}

#[tokio::test]
async fn hooks_run_in_order_and_a_failing_startup_hook_aborts() -> R {
    let db = TestDb::new().await?;
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let step = |name: &'static str| {
        let log = log.clone();
        Hook::new(name, move |_ctx: AppContext| async move {
            log.lock().unwrap().push(name);
        })
    };
    let route = fast(Route::builder(["q"])).handler(|_m: Message, _c| async {});
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route.clone())
        .on_startup(step("on_startup 1"))
        .on_startup(step("on_startup 2"))
        .after_startup(step("after_startup"))
        .on_shutdown(step("on_shutdown"))
        .after_shutdown(step("after_shutdown"));
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    assert!(
        wait_until(Duration::from_secs(5), || async {
            log.lock().unwrap().len() == 3
        })
        .await
    );
    stop.shutdown();
    run.await??;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "on_startup 1",
            "on_startup 2",
            "after_startup",
            "on_shutdown",
            "after_shutdown"
        ]
    );

    let failing = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(Hook::new("broken", |_ctx: AppContext| async {
            Err::<(), BoxError>("no credentials".into())
        }));
    let err = failing.run().await.unwrap_err().to_string();
    assert_eq!(err, "on_startup hook `broken` failed: no credentials");
    Ok(())
}

#[tokio::test]
async fn an_unknown_transport_is_a_startup_error_and_nothing_is_consumed() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, "orders", &mut conn).await?;
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(MemoryTransport::new("rabbit"))
        .subscriber(handle {});
    let err = app.run().await.unwrap_err().to_string();
    assert!(
        err.contains("publishes to transport `kafka`, which is not registered"),
        "{err}"
    );
    assert!(err.contains(r#"["rabbit"]"#), "{err}");
    assert!(
        err.contains("tests/tests/app.rs:"),
        "names the declaration: {err}"
    );
    assert_eq!(db.count().await?, 1, "nothing consumed");
    Ok(())
}

/// A bus whose destinations exist only when listed, counting the checks
/// and recording whether it was closed.
struct Verifying {
    existing: &'static [&'static str],
    checks: Arc<Mutex<Vec<String>>>,
    closed: Arc<Mutex<bool>>,
}

impl outbox_core::Transport for Verifying {
    fn name(&self) -> &str {
        "kafka"
    }

    fn publish(
        &self,
        _msg: outbox_core::Outgoing,
    ) -> outbox_core::transport::BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }

    fn verify_destination(
        &self,
        destination: &str,
    ) -> outbox_core::transport::BoxFuture<'static, Result<(), String>> {
        self.checks.lock().unwrap().push(destination.to_owned());
        let found = self.existing.contains(&destination);
        let destination = destination.to_owned();
        Box::pin(async move {
            if found {
                Ok(())
            } else {
                Err(format!(
                    "no topic `{destination}`; create it with ensure_topic"
                ))
            }
        })
    }

    fn close(&self) -> outbox_core::transport::BoxFuture<'static, Result<(), BoxError>> {
        *self.closed.lock().unwrap() = true;
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn a_destination_missing_on_the_bus_fails_startup_and_nothing_is_consumed() -> R {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, "orders", &mut conn).await?;
    let run = |existing: &'static [&'static str]| {
        let checks = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(false));
        let app = App::new(db.broker.clone())
            .without_discovery()
            .without_signals()
            .transport(Verifying {
                existing,
                checks: checks.clone(),
                closed: closed.clone(),
            })
            .subscriber(handle {})
            // A second route to the same destination: checked once.
            .subscriber(
                fast(Route::builder(["refunds"]))
                    .name("refunds")
                    .publish_to("kafka", "orders.kafka")
                    .to(|v: i64| async move { Response::new(v) }),
            );
        let handle = app.handle();
        (app, handle, checks, closed)
    };

    let (app, _, checks, closed) = run(&[]);
    let err = app.run().await.unwrap_err().to_string();
    assert!(
        err.contains(
            "publishes to `orders.kafka` on transport `kafka`, which is not ready for it: no \
             topic `orders.kafka`; create it with ensure_topic"
        ),
        "{err}"
    );
    assert!(
        err.contains("tests/tests/app.rs:"),
        "names the declaration: {err}"
    );
    assert_eq!(
        *checks.lock().unwrap(),
        ["orders.kafka"],
        "once per destination"
    );
    assert!(*closed.lock().unwrap(), "the transports are closed");
    assert_eq!(db.count().await?, 1, "nothing consumed");

    // With the destination on the bus, the same App starts and relays.
    let (app, stop, checks, _) = run(&["orders.kafka"]);
    let running = tokio::spawn(app.run());
    assert!(
        wait_until(Duration::from_secs(30), || async {
            db.count().await.unwrap() == 0
        })
        .await,
        "relayed"
    );
    stop.shutdown();
    running.await??;
    assert_eq!(*checks.lock().unwrap(), ["orders.kafka"]);
    Ok(())
}

#[tokio::test]
async fn registry_validation() -> R {
    let db = TestDb::new().await?;
    let err = App::new(db.broker.clone())
        .without_discovery()
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no subscribers registered"), "{err}");
    assert!(err.contains("use my_handlers as _;"), "{err}");
    let r = || {
        fast(Route::builder(["q"]))
            .name("same")
            .handler(|_m: Message, _c| async {})
    };
    let err = App::new(db.broker.clone())
        .without_discovery()
        .subscriber(r())
        .subscriber(r())
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("two subscribers are named `same`"), "{err}");
    #[derive(Debug)]
    struct Config;
    let needs_state = fast(Route::builder(["q"]))
        .requires::<State<Config>>()
        .handler(|_m: Message, _c| async {});
    let err = App::new(db.broker.clone())
        .without_discovery()
        .subscriber(needs_state)
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("State<") && err.contains("Config"), "{err}");
    Ok(())
}

#[tokio::test]
async fn handler_errors_and_transport_failures_are_retried() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    kafka.fail_next(2);
    let route = fast(Route::builder(["orders"]))
        .retry(ConstantRetry::new(Duration::from_millis(10)))
        .publish_to("kafka", "orders.kafka")
        .propagate_headers(true)
        .handler(|msg: Message, _c| async move {
            let n: i64 = msg.decode()?;
            Ok::<_, BoxError>(Response::new(n * 10).key("k").header("x-explicit", "yes"))
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(kafka.clone())
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut conn = db.pool.acquire().await?;
    let id = db
        .broker
        .publish_with(
            &4,
            "orders",
            &PublishOptions::new()
                .header("x-tenant", "acme")
                .header("x-explicit", "no"),
            &mut conn,
        )
        .await?
        .unwrap();
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"40");
    assert_eq!(got[0].key.as_deref(), Some(&b"k"[..]));
    assert_eq!(got[0].headers["x-tenant"], "acme", "propagated");
    assert_eq!(got[0].headers["x-explicit"], "yes", "explicit wins");
    assert_eq!(got[0].headers["outbox-id"], id.to_string());
    assert!(db.drained(Duration::from_secs(5)).await);
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn state_and_message_parameters() -> R {
    #[derive(Debug)]
    struct Prefix(String);
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let route = fast(Route::builder(["q"]))
        .publish_to("kafka", "out")
        .requires::<State<Prefix>>()
        .handler(|msg: Message, ctx: AppContext| async move {
            let body = <String as FromDelivery>::from_delivery(&msg, &ctx)?;
            let prefix = <State<Prefix> as FromDelivery>::from_delivery(&msg, &ctx)?;
            let m = <Message as FromDelivery>::from_delivery(&msg, &ctx)?;
            Ok::<_, BoxError>(Some(Response::new(format!(
                "{}{body}#{}",
                prefix.0.0,
                m.id()
            ))))
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .state(Prefix("> ".into()))
        .transport(kafka.clone())
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut conn = db.pool.acquire().await?;
    let id = db.broker.publish("hi", "q", &mut conn).await?;
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].payload, format!("> hi#{id}").into_bytes());
    assert_eq!(got[0].content_type(), Some("text/plain"));
    stop.shutdown();
    run.await??;
    Ok(())
}

/// Gives up at once on transport failures, retries everything else.
#[derive(Debug)]
struct NoRetryOnTransport;

impl outbox_core::RetryStrategy for NoRetryOnTransport {
    fn next_delay(
        &self,
        ctx: &outbox_core::retry::RetryContext<'_>,
    ) -> Result<Option<Duration>, BoxError> {
        let transport_failed = ctx
            .error
            .and_then(|e| e.downcast_ref::<outbox_core::Error>())
            .is_some_and(|e| {
                matches!(e, outbox_core::Error::Transport { source, destination, .. }
                if destination == "out" && source.is::<outbox_core::transport::InjectedFailure>())
            });
        Ok(if transport_failed {
            None
        } else {
            Some(Duration::from_millis(10))
        })
    }
}

#[tokio::test]
async fn retry_strategies_see_the_transports_own_error() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    kafka.fail_next(1);
    let route = fast(Route::builder(["q"]))
        .retry(NoRetryOnTransport)
        .publish_to("kafka", "out")
        .handler(|_m: Message, _c| async { Ok::<_, BoxError>(Response::new(1)) });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(kafka.clone())
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, "q", &mut conn).await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.dlq_count().await.unwrap() == 1
        })
        .await
    );
    stop.shutdown();
    run.await??;
    let text: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT last_exception FROM {}",
        db.d()
    )))
    .fetch_one(&db.pool)
    .await?;
    assert!(
        text.starts_with("transport `kafka` could not publish to \"out\": injected failure"),
        "{text}"
    );
    assert!(kafka.messages().is_empty());
    Ok(())
}

/// A transport whose publishes may take 10 minutes.
#[derive(Clone)]
struct Slow(MemoryTransport);

impl outbox_core::Transport for Slow {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn publish(
        &self,
        msg: outbox_core::Outgoing,
    ) -> outbox_core::__private::BoxFuture<'static, Result<(), BoxError>> {
        self.0.publish(msg)
    }
    fn max_publish_time(&self) -> Option<Duration> {
        Some(Duration::from_secs(600))
    }
}

#[tokio::test]
async fn a_lease_shorter_than_the_transport_timeout_is_warned_about() -> R {
    let db = TestDb::new().await?;
    // With the lease heartbeat on (the default) the lease is extended while
    // the publish waits: no warning. Checked first, so it would be logged
    // before the other route's.
    let extended = fast(Route::builder(["p"]))
        .name("short-lease-extended")
        .publish_to("slow", "out")
        .handler(|_m: Message, _c| async {});
    let route = fast(Route::builder(["q"]))
        .name("short-lease")
        .lease_heartbeat(None)
        .publish_to("slow", "out")
        .handler(|_m: Message, _c| async {});
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(Slow(MemoryTransport::new("slow")))
        .subscriber(extended)
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    assert!(
        wait_until(Duration::from_secs(5), || async {
            !tests::captured(|c| {
                c.message.contains("short-lease") && c.message.contains("not longer than the 600s")
            })
            .is_empty()
        })
        .await
    );
    assert!(
        tests::captured(
            |c| c.message.contains("short-lease-extended") && c.message.contains("not longer than")
        )
        .is_empty()
    );
    stop.shutdown();
    run.await??;
    Ok(())
}

/// The `app_child` binary relaying `queue` of `db`'s table (after `rows`
/// rows were published to it), its output read line by line on a thread.
struct AppChild {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl AppChild {
    async fn spawn(
        db: &TestDb,
        queue: &str,
        rows: i64,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};
        let mut conn = db.pool.acquire().await?;
        db.broker.publish_batch(0..rows, queue, &mut conn).await?;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_app_child"))
            .env("OUTBOX_CHILD_TABLE", db.table.name())
            .env("OUTBOX_CHILD_SCHEMA", &db.schema)
            .env("OUTBOX_CHILD_QUEUE", queue)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok(Self { child, lines })
    }

    /// Its lines until one starts with `prefix` (that one included).
    fn lines_until(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        while !lines.iter().any(|l: &String| l.starts_with(prefix)) {
            lines.push(self.lines.recv_timeout(Duration::from_secs(20))?);
        }
        Ok(lines)
    }

    /// SIGTERM, then its exit status and the lines it printed until it
    /// ended (the reader thread drops its sender at EOF, which ends the
    /// read at once; the timeout only bounds a hang).
    fn sigterm(mut self) -> anyhow::Result<(std::process::ExitStatus, Vec<String>)> {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        anyhow::ensure!(killed.success(), "kill -TERM {pid}: {killed}");
        let status = self.child.wait()?;
        let rest = std::iter::from_fn(|| self.lines.recv_timeout(Duration::from_secs(10)).ok());
        Ok((status, rest.collect()))
    }
}

/// The highest `deliveries_count` of `db`'s table: 0 when no row was
/// ever claimed.
async fn max_deliveries(db: &TestDb) -> anyhow::Result<i64> {
    db.scalar(format!(
        "SELECT coalesce(max(deliveries_count), 0) FROM {}",
        db.t()
    ))
    .await
}

/// A shutdown requested while the App is still starting (here: a startup
/// hook that never finishes, as a broker being retried) stops it there:
/// `run` returns `Ok`, the later steps and every other hook are skipped,
/// the transports registered so far are closed, and nothing is consumed.
#[tokio::test]
async fn a_shutdown_while_starting_stops_before_anything_is_consumed() -> R {
    tests::init_tracing();
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    db.broker.publish_batch(0..3, "early", &mut conn).await?;
    let kafka = MemoryTransport::new("kafka");
    let (entered, mut hook_entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let later: Arc<Mutex<Vec<&str>>> = Arc::default();
    let hook = |name: &'static str| {
        let later = later.clone();
        move |_ctx: AppContext| {
            later.lock().unwrap().push(name);
            async { Ok::<(), BoxError>(()) }
        }
    };
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(kafka.clone())
        .subscriber(
            fast(Route::builder(["early"]))
                .publish_to("kafka", "early.kafka")
                .handler(|m: Message, _| async move {
                    Ok::<_, BoxError>(Response::new(m.decode::<i64>()?))
                }),
        )
        .on_startup(move |_ctx: AppContext| {
            let entered = entered.clone();
            async move {
                let _ = entered.send(());
                std::future::pending::<()>().await;
                Ok::<(), BoxError>(())
            }
        })
        .on_startup(hook("on_startup"))
        .after_startup(hook("after_startup"))
        .on_shutdown(hook("on_shutdown"))
        .after_shutdown(hook("after_shutdown"));
    let handle = app.handle();
    let run = tokio::spawn(app.run());
    tokio::time::timeout(Duration::from_secs(10), hook_entered.recv()).await?;
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), run).await???;
    assert_eq!(*later.lock().unwrap(), Vec::<&str>::new());
    assert!(kafka.is_closed());
    assert!(kafka.messages().is_empty());
    assert_eq!(db.count().await?, 3);
    assert_eq!(max_deliveries(&db).await?, 0, "nothing was claimed");
    assert!(
        !tests::captured(|c| c.message.contains("stopped while starting")).is_empty(),
        "the stop is logged"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_in_flight_rows_and_releases_the_rest() -> R {
    let db = TestDb::new().await?;
    let child = AppChild::spawn(&db, "term", 20, &[]).await?;
    // Wait until the first row was handled: the rest are claimed and waiting.
    let mut lines = child.lines_until("handled")?;
    let (status, rest) = child.sigterm()?;
    lines.extend(rest);
    assert!(status.success(), "exit status {status}: {lines:?}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("stopped"),
        "{lines:?}"
    );
    let handled = lines.iter().filter(|l| l.starts_with("handled")).count() as i64;
    assert!(handled < 20, "stopped early: {handled}");
    // Handled rows are gone; the others are back, unleased, claim given back.
    assert_eq!(db.count().await?, 20 - handled);
    let leased = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
            db.t()
        ))
        .await?;
    assert_eq!(leased, 0, "nothing left to lease expiry");
    assert_eq!(max_deliveries(&db).await?, 0);
    Ok(())
}

/// SIGTERM while the App is still starting (its startup never finishes
/// here, as when a broker is being retried) stops it gracefully: exit
/// status 0, no hook after the one in progress, nothing consumed. Before,
/// the signal handlers were installed only once startup was done, and the
/// signal's default action killed the process.
#[tokio::test]
async fn sigterm_while_starting_stops_gracefully() -> R {
    let db = TestDb::new().await?;
    let child = AppChild::spawn(&db, "term", 5, &[("OUTBOX_CHILD_HOLD_STARTUP", "1")]).await?;
    assert_eq!(child.lines_until("starting")?, ["starting"]);
    let (status, rest) = child.sigterm()?;
    assert!(status.success(), "exit status {status}: {rest:?}");
    assert_eq!(rest, Vec::<String>::new(), "no hook ran after the stop");
    assert_eq!(db.count().await?, 5);
    Ok(())
}

/// `App::outbox_transport()`: a handler's result published to `outbox`
/// becomes a row of the next queue, with the result's encoding, the
/// correlation id and the headers, but its own `outbox-id`; the next handler
/// receives it; both tables end empty.
#[tokio::test]
async fn results_published_to_the_outbox_transport_chain_queues() -> R {
    let db = TestDb::new().await?;
    // (amount, correlation id, x-stage header, outbox-id header)
    type Seen = Vec<(i64, String, Option<String>, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let bill = fast(Route::builder(["orders"]))
        .name("bill")
        .publish_to("outbox", "invoices")
        .handler(|msg: Message, _ctx: AppContext| async move {
            let order: i64 = msg.decode()?;
            Ok::<_, BoxError>(Response::new(order * 100).header("x-stage", "billed"))
        });
    let send = {
        let seen = seen.clone();
        fast(Route::builder(["invoices"])).name("send").handler(
            move |msg: Message, _ctx: AppContext| {
                let seen = seen.clone();
                async move {
                    let amount: i64 = msg.decode()?;
                    seen.lock().unwrap().push((
                        amount,
                        msg.correlation_id().to_owned(),
                        msg.headers().get("x-stage").cloned(),
                        msg.headers().get("outbox-id").cloned(),
                    ));
                    Ok::<_, BoxError>(())
                }
            },
        )
    };
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .outbox_transport()
        .subscriber(bill)
        .subscriber(send)
        .after_startup(publish_one);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !seen.lock().unwrap().is_empty()
        })
        .await,
        "the follow-on row was not handled"
    );
    assert!(db.drained(Duration::from_secs(5)).await);
    stop.shutdown();
    run.await??;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (amount, corr, stage, outbox_id) = &seen[0];
    assert_eq!(*amount, 100);
    assert_eq!(corr, "corr-1", "the correlation id carries over");
    assert_eq!(stage.as_deref(), Some("billed"));
    assert_eq!(outbox_id, &None, "the inbound row id is not copied");
    Ok(())
}

/// A destination the transport refuses (here an empty queue name for the
/// outbox transport) fails `App::run` before anything is consumed.
#[tokio::test]
async fn a_destination_the_transport_refuses_fails_startup() -> R {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1_i64, "orders", &mut *tx).await?;
    tx.commit().await?;
    let route = fast(Route::builder(["orders"]))
        .publish_to("outbox", "")
        .handler(|msg: Message, _ctx: AppContext| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let err = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .outbox_transport()
        .subscriber(route)
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("transport `outbox`"), "{err}");
    assert!(err.contains("queue must be a non-empty string"), "{err}");
    assert_eq!(db.count().await?, 1, "nothing consumed");
    let deliveries = db
        .scalar(format!("SELECT deliveries_count::bigint FROM {}", db.t()))
        .await?;
    assert_eq!(deliveries, 0);
    Ok(())
}

/// `App::run` reports the first error, not the last: of the mistakes made
/// while building the App, and of the shutdown hooks.
#[tokio::test]
async fn run_reports_the_first_error_not_the_last() -> R {
    let db = TestDb::new().await?;
    let route = || fast(Route::builder(["q"])).handler(|_m: Message, _c| async {});
    let err = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route())
        .transport(MemoryTransport::new("kafka"))
        .transport(MemoryTransport::new("kafka"))
        .outage_warning_after(Duration::ZERO)
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kafka"),
        "the duplicate transport, first: {err}"
    );
    assert!(!err.contains("outage_warning_after"), "{err}");

    let failing = |name: &'static str| {
        Hook::new(name, move |_ctx: AppContext| async move {
            Err::<(), BoxError>(format!("{name} broke").into())
        })
    };
    let (started, mut is_started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route())
        .after_startup(move |_ctx: AppContext| {
            let _ = started.send(());
            async { Ok::<(), BoxError>(()) }
        })
        .on_shutdown(failing("first"))
        .on_shutdown(failing("second"))
        .after_shutdown(failing("third"));
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    // Once started: a stop during startup runs no shutdown hook.
    tokio::time::timeout(Duration::from_secs(10), is_started.recv()).await?;
    stop.shutdown();
    let err = run.await?.unwrap_err().to_string();
    assert_eq!(err, "on_shutdown hook `first` failed: first broke");
    Ok(())
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Order {
    id: i64,
}

#[derive(Debug)]
struct Db {
    name: &'static str,
}

/// The hand-written equivalent of a `#[subscriber]` with parameters.
async fn one_line(
    order: Order,
    msg: Message,
    headers: outbox_core::MessageHeaders,
    db: State<Db>,
) -> Response<Order> {
    Response::new(order)
        .header("x-db", db.name)
        .header(
            "x-seen-tenant",
            headers.get("x-tenant").cloned().unwrap_or_default(),
        )
        .header("x-row", msg.id().to_string())
}

/// `.to(handle)`: every parameter extracted from the delivery, the
/// `MessageHeaders` parameter given the row's headers (not the body), the
/// result forwarded; the state its parameters need is checked at start.
#[tokio::test]
async fn a_route_is_one_line_with_to() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let route = fast(Route::builder(["orders"]))
        .publish_to("kafka", "orders.kafka")
        .to(one_line);
    let err = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(MemoryTransport::new("kafka"))
        .subscriber(route.clone())
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("State<") && err.contains("Db"), "{err}");

    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .state(Db { name: "main" })
        .transport(kafka.clone())
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut conn = db.pool.acquire().await?;
    db.broker
        .publish_with(
            &Order { id: 7 },
            "orders",
            &PublishOptions::new().header("x-tenant", "acme"),
            &mut conn,
        )
        .await?;
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].payload, br#"{"id":7}"#);
    assert_eq!(got[0].headers["x-db"], "main");
    assert_eq!(
        got[0].headers["x-seen-tenant"], "acme",
        "the headers, not the body"
    );
    assert_eq!(got[0].headers["x-row"], got[0].headers["outbox-id"]);
    assert!(db.drained(Duration::from_secs(5)).await);
    stop.shutdown();
    run.await??;
    Ok(())
}

/// A parameter that cannot be extracted is a handler error: the row is
/// retried, not lost.
#[tokio::test]
async fn a_failed_extraction_is_a_handler_error() -> R {
    let db = TestDb::new().await?;
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let route = fast(Route::builder(["bad"]))
        .max_deliveries(1)
        .retry(outbox_core::retry::NoRetry)
        .to(move |_order: Order| {
            let seen = seen.clone();
            async move { *seen.lock().unwrap() += 1 }
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    let mut conn = db.pool.acquire().await?;
    db.broker.publish("not an order", "bad", &mut conn).await?;
    assert!(db.drained(Duration::from_secs(10)).await, "went terminal");
    assert_eq!(*calls.lock().unwrap(), 0, "the fn never ran");
    stop.shutdown();
    run.await??;
    Ok(())
}
