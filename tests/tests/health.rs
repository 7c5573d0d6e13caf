//! Health (`AppHandle::health`, the `/healthz` and `/readyz` endpoints of
//! `App::health_endpoint`), `Transport::health` on the real buses, and the
//! engine's connection budget, against the real PostgreSQL.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_core::health::{HealthReport, ListenState, LoopState};
use outbox_core::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use outbox_core::transport::BoxFuture;
use outbox_core::{App, AppContext, BoxError, Message, OutboxBroker, Outgoing, Route, Transport};
use serde_json::Value;
use tests::proxy::TcpProxy;
use tests::{RunningApp, TestDb, captured, database_url, wait_until};

type R = anyhow::Result<()>;

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// `GET path` on the health endpoint: the status code and the JSON body.
async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
    let out = tests::http_get(addr, path).await?;
    let code: u16 = out
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no status line: {out}"))?
        .parse()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((code, serde_json::from_str(body)?))
}

/// Polls `GET path` until it answers `code`; the last answer.
async fn until_code(addr: std::net::SocketAddr, path: &str, code: u16) -> (u16, Value) {
    let mut last = (0, Value::Null);
    for _ in 0..300 {
        if let Ok(r) = get(addr, path).await {
            last = r;
            if last.0 == code {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

fn route(queue: &str, name: &str) -> Route {
    Route::builder([queue])
        .name(name)
        .min_fetch_interval(Duration::from_millis(50))
        .max_fetch_interval(Duration::from_millis(200))
        .handler(|_m: Message, _c| async {})
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_app_is_live_and_ready_with_its_subscribers_listed() -> R {
    let db = TestDb::new().await?;
    let addr = free_addr()?;
    let app = db
        .app()
        .health_endpoint(addr)
        .subscriber(route("h_orders", "orders-sub"))
        .subscriber(route("h_bills", "bills-sub"))
        .transport(outbox_core::MemoryTransport::new("mem"));
    let handle = app.handle();
    let running = RunningApp::start(app);
    let (code, body) = until_code(addr, "/readyz", 200).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["database"]["ok"], true, "{body}");
    assert_eq!(
        names(&body, "subscribers"),
        ["orders-sub", "bills-sub"],
        "{body}"
    );
    assert_eq!(body["subscribers"][0]["queues"][0], "h_orders", "{body}");
    assert_eq!(body["subscribers"][0]["state"], "running", "{body}");
    assert_eq!(body["subscribers"][0]["claim_mode"], "lease", "{body}");
    assert_eq!(names(&body, "transports"), ["mem"], "{body}");
    assert_eq!(body["transports"][0]["ok"], true, "{body}");
    let (code, live) = get(addr, "/healthz").await?;
    assert_eq!(code, 200, "{live}");
    assert_eq!(
        names(&live, "subscribers"),
        ["orders-sub", "bills-sub"],
        "{live}"
    );
    assert!(
        live.get("database").is_none(),
        "liveness runs no query: {live}"
    );
    let (code, _) = get(addr, "/nope").await?;
    assert_eq!(code, 404);

    let report: HealthReport = handle.health().await;
    assert!(report.live && report.ready, "{report:?}");
    let engine = report.engine.as_ref().unwrap();
    assert!(
        engine
            .subscribers
            .iter()
            .all(|s| s.state == LoopState::Running
                && s.loops_running == s.loops_total
                && s.loops_total == 4) // fetch, worker, acker, lease heartbeat
    );
    // LISTEN is up once the engine listens on the table's channel.
    assert!(db.listening(Duration::from_secs(10)).await);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handle
                .health()
                .await
                .engine
                .is_some_and(|e| e.listen.state == ListenState::Connected)
        })
        .await
    );
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_makes_readyz_fail_naming_it_but_not_healthz() -> R {
    let db = TestDb::new().await?;
    let upstream: PgConnectOptions = database_url().parse()?;
    let proxy =
        TcpProxy::start(&format!("{}:{}", upstream.get_host(), upstream.get_port())).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(upstream.clone().host("127.0.0.1").port(proxy.addr().port()))
        .await?;
    let broker = OutboxBroker::new(pool, db.table.clone());
    let addr = free_addr()?;
    let app = App::new(broker)
        .without_discovery()
        .without_signals()
        .health_endpoint(addr)
        .subscriber(route("h_db", "db-sub"));
    let running = RunningApp::start(app);
    let (code, body) = until_code(addr, "/readyz", 200).await;
    assert_eq!(code, 200, "{body}");

    proxy.cut();
    let (code, body) = until_code(addr, "/readyz", 503).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["database"]["ok"], false, "{body}");
    let problems = body["problems"].to_string();
    assert!(problems.contains("database"), "{body}");
    // The loops retry on their own: not a reason to restart the process.
    let (code, live) = get(addr, "/healthz").await?;
    assert_eq!(code, 200, "{live}");

    proxy.restore();
    let (code, body) = until_code(addr, "/readyz", 200).await;
    assert_eq!(code, 200, "back once the database answers: {body}");
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_backend_shows_in_health_until_it_is_replaced() -> R {
    let db = TestDb::new().await?;
    // The LISTEN connection logs in as a role of its own: with its login
    // refused, the killed connection cannot be replaced until it is allowed
    // again (so the test sees the gap, whatever the timing).
    let role = format!("listen_{}", tests::suffix());
    db.exec(format!("CREATE ROLE {role} LOGIN")).await?;
    let listen_opts = database_url().parse::<PgConnectOptions>()?.username(&role);
    let app = db
        .app()
        .subscriber(route("h_listen", "listen-sub"))
        .configure_engine(move |e| e.listen_with(listen_opts));
    let handle = app.handle();
    let running = RunningApp::start(app);
    let listen = || async { handle.health().await.engine.map(|e| e.listen) };
    assert!(
        wait_until(Duration::from_secs(15), || async {
            listen()
                .await
                .is_some_and(|l| l.state == ListenState::Connected)
        })
        .await,
        "{:?}",
        listen().await
    );
    let pid = listen().await.and_then(|l| l.backend_pid).unwrap();
    let usename: String =
        sqlx::query_scalar("SELECT usename::text FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(usename, role, "the reported pid is the LISTEN connection");

    db.exec(format!("ALTER ROLE {role} NOLOGIN")).await?;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await?;
    assert!(killed);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            listen()
                .await
                .is_some_and(|l| l.state == ListenState::Polling)
        })
        .await,
        "{:?}",
        listen().await
    );
    let down = listen().await.unwrap();
    assert_eq!(down.backend_pid, None, "{down:?}");
    assert!(down.error.is_some(), "{down:?}");
    // Still polling a second later: nothing replaced it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = listen().await.unwrap();
    assert_eq!(still.state, ListenState::Polling, "{still:?}");
    // A lost LISTEN is not a reason to leave the load balancer: the
    // subscribers poll meanwhile.
    assert!(handle.health().await.ready);

    db.exec(format!("ALTER ROLE {role} LOGIN")).await?;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            listen()
                .await
                .is_some_and(|l| l.state == ListenState::Connected)
        })
        .await,
        "{:?}",
        listen().await
    );
    let back = listen().await.unwrap();
    assert!(back.backend_pid.is_some_and(|p| p != pid), "{back:?}");
    assert!(back.reconnects >= 1, "{back:?}");
    running.stop().await?;
    // The role's sessions are gone with the engine.
    let _ = db
        .exec(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await;
    let _ = db.exec(format!("DROP ROLE IF EXISTS {role}")).await;
    Ok(())
}

/// A transport whose health the test sets.
#[derive(Debug, Clone)]
struct Flaky {
    ok: Arc<AtomicBool>,
}

impl Transport for Flaky {
    fn name(&self) -> &str {
        "flaky-bus"
    }

    fn publish(&self, _msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }

    fn health(&self) -> BoxFuture<'static, Result<(), String>> {
        let ok = self.ok.load(Ordering::SeqCst);
        Box::pin(async move {
            if ok {
                Ok(())
            } else {
                Err("the broker closed the connection".to_owned())
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_reporting_an_error_makes_readyz_fail_naming_it() -> R {
    let db = TestDb::new().await?;
    let ok = Arc::new(AtomicBool::new(true));
    let addr = free_addr()?;
    let app = db
        .app()
        .health_endpoint(addr)
        .subscriber(route("h_flaky", "flaky-sub"))
        .transport(Flaky { ok: ok.clone() });
    let running = RunningApp::start(app);
    let (code, body) = until_code(addr, "/readyz", 200).await;
    assert_eq!(code, 200, "{body}");
    ok.store(false, Ordering::SeqCst);
    let (code, body) = get(addr, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["transports"][0]["name"], "flaky-bus", "{body}");
    assert_eq!(body["transports"][0]["ok"], false, "{body}");
    assert!(
        body["problems"]
            .to_string()
            .contains("transport flaky-bus: the broker closed the connection"),
        "{body}"
    );
    assert_eq!(get(addr, "/healthz").await?.0, 200);
    ok.store(true, Ordering::SeqCst);
    assert_eq!(get(addr, "/readyz").await?.0, 200);
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_app_is_not_ready() -> R {
    let db = TestDb::new().await?;
    let addr = free_addr()?;
    let release = Arc::new(tokio::sync::Notify::new());
    let in_hook = Arc::new(tokio::sync::Notify::new());
    let (r, h) = (release.clone(), in_hook.clone());
    let app = db
        .app()
        .health_endpoint(addr)
        .subscriber(route("h_stop", "stop-sub"))
        // Holds the app in its shutdown while the test probes it.
        .on_shutdown(move |_: AppContext| {
            let (r, h) = (r.clone(), h.clone());
            async move {
                h.notify_one();
                r.notified().await;
                Ok::<_, BoxError>(())
            }
        });
    let handle = app.handle();
    let run = tokio::spawn(app.run());
    let (code, body) = until_code(addr, "/readyz", 200).await;
    assert_eq!(code, 200, "{body}");
    handle.shutdown();
    in_hook.notified().await;
    let (code, body) = get(addr, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["stopping"], true, "{body}");
    assert!(body["problems"].to_string().contains("stopping"), "{body}");
    let (code, live) = get(addr, "/healthz").await?;
    assert_eq!(code, 200, "a draining app is alive: {live}");
    assert!(handle.health().await.stopping);
    release.notify_one();
    run.await??;
    // Served until run returns, not after.
    assert!(get(addr, "/readyz").await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_fails_run() -> R {
    let db = TestDb::new().await?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let err = db
        .app()
        .health_endpoint(taken.local_addr()?)
        .subscriber(route("h_port", "port-sub"))
        .run()
        .await
        .expect_err("started on a port in use")
        .to_string();
    assert!(err.contains("health endpoint"), "{err}");
    Ok(())
}

/// `Transport::health` of a real transport behind `proxy`: `Ok` while
/// connected; once the proxy cuts the bus off, an error containing `reason`
/// (within 20 s: some clients notice a dead connection only when they next
/// use it); `Ok` again within `recover` after the proxy is restored.
async fn health_follows(
    t: &impl Transport,
    proxy: &TcpProxy,
    reason: &str,
    recover: Duration,
) -> R {
    t.health().await.map_err(anyhow::Error::msg)?;
    proxy.cut();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            t.health().await.is_err()
        })
        .await,
        "healthy while cut off"
    );
    let err = t.health().await.unwrap_err();
    assert!(err.contains(reason), "{err}");
    proxy.restore();
    assert!(
        wait_until(recover, || async { t.health().await.is_ok() }).await,
        "not healthy again after the proxy was restored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_health_follows_its_connection() -> R {
    let proxy = TcpProxy::start(&tests::redis::addr()).await?;
    let t = tests::redis::test_redis(&tests::redis::url_via(&proxy.addr().to_string()))
        .connect_transport()
        .await?;
    health_follows(&t, &proxy, "PING", Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_health_follows_its_connection() -> R {
    let (proxy, url) = tests::rabbitmq::proxy().await?;
    let t = tests::rabbitmq::test_rabbit(&url)
        .connect_transport()
        .await?;
    health_follows(&t, &proxy, "not connected", Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_health_follows_its_connection() -> R {
    let proxy = TcpProxy::start(&tests::nats::addr()).await?;
    let t = outbox_nats::NatsBroker::new(format!("nats://{}", proxy.addr()))
        .connect_transport()
        .await?;
    health_follows(&t, &proxy, "not connected to NATS", Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_health_reads_the_cluster_metadata() -> R {
    let t = tests::kafka::test_kafka(&tests::kafka::bootstrap())
        .connect_transport()
        .await?;
    t.health().await.map_err(anyhow::Error::msg)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_smaller_than_the_subscribers_need_is_warned_about_at_start() -> R {
    let db = TestDb::new().await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await?;
    let broker = OutboxBroker::new(pool, db.table.clone());
    let sub = outbox_core::Subscriber::builder(["h_budget"])
        .name("budget-sub")
        .max_workers(6)
        .build(|_m: Message| async { Ok::<_, BoxError>(()) })?;
    let engine = outbox_core::Engine::new(broker).subscriber(sub);
    let budget = engine.connection_budget().await?;
    assert_eq!(budget.subscribers, [("budget-sub".to_owned(), 1 + 4 + 1)]);
    assert_eq!(budget.listen, 1);
    assert_eq!(budget.engine(), 7);
    assert_eq!(budget.pool_max, 2);
    assert_eq!(budget.pool_wanted, 1 + 1 + 6);
    assert!(
        budget.max_connections > 0 && budget.in_use > 0,
        "{budget:?}"
    );
    engine.start().await?;
    let warned = || {
        captured(|c| {
            c.fields
                .get("event")
                .is_some_and(|e| e == "connection_budget")
                && c.message
                    .contains("at most 2 connections, fewer than the 8")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || async { !warned().is_empty() }).await,
        "no connection_budget warning"
    );
    assert_eq!(warned()[0].level, tracing::Level::WARN);
    engine.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_the_server_cannot_hold_is_reported_with_the_numbers() -> R {
    let db = TestDb::new().await?;
    let max: i32 = sqlx::query_scalar("SELECT current_setting('max_connections')::int")
        .fetch_one(&db.pool)
        .await?;
    let claims = usize::try_from(max)? + 1;
    let sub = outbox_core::Subscriber::builder(["h_budget_big"])
        .name("big-sub")
        .fetch_batch_size(claims)
        .fetch_concurrency(claims)
        .build(|_m: Message| async { Ok::<_, BoxError>(()) })?;
    // Never started: it would take every connection of the shared server.
    let engine = outbox_core::Engine::new(db.broker.clone()).subscriber(sub);
    let budget = engine.connection_budget().await?;
    assert_eq!(budget.engine(), claims + 1 + 1 + 1, "{budget:?}");
    assert_eq!(budget.max_connections, u32::try_from(max)?);
    let problems = budget.problems();
    let all = problems
        .iter()
        .find(|p| p.contains("in all"))
        .unwrap_or_else(|| panic!("{problems:?}"));
    assert!(all.contains(&format!("max_connections {max}")), "{all}");
    assert!(all.contains(&format!("big-sub: {}", claims + 2)), "{all}");
    assert!(all.contains("fetch_concurrency"), "{all}");
    Ok(())
}
