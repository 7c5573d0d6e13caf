//! `#[subscriber]` and `#[publish_to]` end to end: the generated routes run
//! under `App` on real PostgreSQL with the in-process transport.
//!
//! `inventory` discovery sees every `#[subscriber]` in this test binary, so
//! each handler here consumes a queue of its own, and the discovery test
//! registers every transport and state any of them needs. The other tests
//! register their handler explicitly (`.without_discovery()`).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::retry::{ConstantRetry, NoRetry};
use outbox_core::{
    App, AppContext, AppHandle, BoxError, IntoRoute, MemoryTransport, Message, PublishOptions,
    Response, State, publish_to, subscriber,
};
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;
type Running = tokio::task::JoinHandle<outbox_core::Result<()>>;

// ---------------------------------------------------------------------------
// Handlers

/// The seed snippet, exactly.
#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

static FLAKY_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Fails twice, then publishes `n * 10`.
#[publish_to(kafka, "macros.flaky.out")]
#[subscriber(
    "macros.flaky",
    retry = ConstantRetry::new(Duration::from_millis(10)),
    min_fetch_interval = "20ms",
    max_fetch_interval = "200ms",
)]
async fn flaky(n: i64) -> Result<i64, std::io::Error> {
    if FLAKY_CALLS.fetch_add(1, Ordering::SeqCst) < 2 {
        return Err(std::io::Error::other("not yet"));
    }
    Ok(n * 10)
}

static NO_TARGET_CALLS: AtomicUsize = AtomicUsize::new(0);

/// No `#[publish_to]`: the `Err` is still the handler error (nack, retry).
#[subscriber(
    "macros.no_target",
    retry = ConstantRetry::new(Duration::from_millis(10)),
    min_fetch_interval = "20ms",
    max_fetch_interval = "200ms"
)]
async fn no_target(n: i64) -> Result<i64, String> {
    if NO_TARGET_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err("first attempt fails".to_owned());
    }
    Ok(n)
}

/// Publishes even numbers only.
#[publish_to(kafka, "macros.evens.out")]
#[subscriber("macros.evens")]
async fn evens(n: i64) -> Option<i64> {
    (n % 2 == 0).then_some(n)
}

/// Two targets, on two transports.
#[publish_to(kafka, "macros.fanout.kafka")]
#[publish_to(audit, "macros.fanout.audit")]
#[subscriber("macros.fanout")]
async fn fanout(s: String) -> String {
    s.to_uppercase()
}

#[derive(Debug)]
struct Prefix(String);

/// The body, the delivery handle and application state; a `Response` with a
/// key and a header.
#[publish_to(kafka, "macros.params.out")]
#[subscriber(["macros.params", "macros.params.2"], propagate_headers = true)]
async fn params(body: String, msg: Message, prefix: State<Prefix>) -> Response<String> {
    Response::new(format!("{}{body}#{}", prefix.0.0, msg.id()))
        .key(body.clone())
        .header("x-explicit", "yes")
}

/// A `Headers` parameter is the row's headers, not the body decoded as a
/// map; a map type written otherwise is the body.
#[publish_to(kafka, "macros.headers.out")]
#[subscriber("macros.headers")]
async fn with_headers(
    body: std::collections::BTreeMap<String, String>,
    headers: outbox_core::Headers,
) -> String {
    format!(
        "body {} / tenant {}",
        body.get("k").map_or("-", String::as_str),
        headers.get("x-tenant").map_or("-", String::as_str)
    )
}

/// Every option.
#[publish_to(kafka, "macros.options.out")]
#[subscriber(
    "macros.options",
    name = "macros::every_option",
    max_workers = 3,
    fetch_batch_size = 7,
    lease_ttl = "2.5s",
    min_fetch_interval = "20ms",
    max_fetch_interval = "200ms",
    max_deliveries = 9,
    terminal_flush_batch_size = 4,
    ack_policy = RejectOnError,
    retry = NoRetry,
    propagate_headers = true,
    crate = "::outbox_core",
)]
async fn every_option(n: i64) -> i64 {
    n
}

/// Declared through `macro_rules!`: the attribute sees invisible groups
/// around `$q` and `$t`.
macro_rules! echo_handler {
    ($name:ident, $q:literal, $t:ty) => {
        #[publish_to(kafka, "macros.echo.out")]
        #[subscriber($q)]
        async fn $name(v: $t) -> $t {
            v
        }
    };
}
echo_handler!(echo, "macros.echo", i64);

// ---------------------------------------------------------------------------
// Helpers

fn start(app: App) -> (AppHandle, Running) {
    let stop = app.handle();
    (stop, tokio::spawn(app.run()))
}

async fn publish(db: &TestDb, body: &(impl serde::Serialize + ?Sized), queue: &str) -> i64 {
    let mut conn = db.pool.acquire().await.unwrap();
    db.broker.publish(body, queue, &mut conn).await.unwrap()
}

async fn drained(db: &TestDb) -> bool {
    db.drained(Duration::from_secs(10)).await
}

/// An app with only `route` and the `kafka` transport.
fn explicit(db: &TestDb, route: impl IntoRoute, kafka: &MemoryTransport) -> App {
    App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(kafka.clone())
        .subscriber(route)
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn the_seed_snippet_is_discovered_and_relays_to_the_transport() -> R {
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

    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    // Discovery is on: every handler of this binary runs, so every transport
    // and state they need is registered.
    let app = App::new(db.broker.clone())
        .without_signals()
        .transport(kafka.clone())
        .transport(MemoryTransport::new("audit"))
        .state(Prefix(String::new()))
        .after_startup(publish_one);
    let (stop, run) = start(app);
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{got:?}");
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
    assert!(drained(&db).await);
    stop.shutdown();
    run.await??;
    assert!(kafka.is_closed());
    Ok(())
}

#[tokio::test]
async fn the_fn_stays_callable_as_written() {
    assert_eq!(handle(3).await, 3);
    assert_eq!(evens(3).await, None);
    assert_eq!(echo(5).await, 5);
    assert_eq!(fanout("a".into()).await, "A");
}

#[tokio::test]
async fn explicit_registration_with_the_marker() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let (stop, run) = start(explicit(&db, handle {}, &kafka));
    publish(&db, &42, "orders").await;
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].payload, b"42");
    assert!(drained(&db).await);
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn an_err_is_retried_by_the_strategy_then_published() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let (stop, run) = start(explicit(&db, flaky {}, &kafka));
    publish(&db, &4, "macros.flaky").await;
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].destination, "macros.flaky.out");
    assert_eq!(got[0].payload, b"40");
    assert_eq!(
        FLAKY_CALLS.load(Ordering::SeqCst),
        3,
        "two failures, one success"
    );
    assert!(drained(&db).await);
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn without_publish_to_an_err_still_nacks() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let (stop, run) = start(explicit(&db, no_target {}, &kafka));
    publish(&db, &7, "macros.no_target").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            NO_TARGET_CALLS.load(Ordering::SeqCst) >= 2
        })
        .await
    );
    assert!(drained(&db).await);
    assert_eq!(db.dlq_count().await?, 0);
    assert!(kafka.messages().is_empty(), "nothing is forwarded");
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn none_publishes_nothing() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let (stop, run) = start(explicit(&db, evens {}, &kafka));
    publish(&db, &1, "macros.evens").await;
    publish(&db, &2, "macros.evens").await;
    publish(&db, &3, "macros.evens").await;
    assert!(drained(&db).await);
    let got = kafka.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, b"2");
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn two_publish_to_reach_both_targets() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let audit = MemoryTransport::new("audit");
    let app = explicit(&db, fanout {}, &kafka).transport(audit.clone());
    let (stop, run) = start(app);
    let id = publish(&db, "hi", "macros.fanout").await;
    let k = kafka.wait_for(1, Duration::from_secs(10)).await;
    let a = audit.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(k[0].destination, "macros.fanout.kafka");
    assert_eq!(a[0].destination, "macros.fanout.audit");
    for m in [&k[0], &a[0]] {
        assert_eq!(m.payload, b"HI");
        assert_eq!(m.headers["outbox-id"], id.to_string());
    }
    assert!(drained(&db).await);
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn message_and_state_parameters_and_a_response() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let app = explicit(&db, params {}, &kafka).state(Prefix("> ".into()));
    let (stop, run) = start(app);
    let mut conn = db.pool.acquire().await?;
    let id = db
        .broker
        .publish_with(
            "hi",
            "macros.params.2",
            &PublishOptions::new().header("x-tenant", "acme"),
            &mut conn,
        )
        .await?
        .unwrap();
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    let m = &got[0];
    assert_eq!(m.payload, format!("> hi#{id}").into_bytes());
    assert_eq!(m.content_type(), Some("text/plain"));
    assert_eq!(m.key.as_deref(), Some(&b"hi"[..]));
    assert_eq!(m.headers["x-explicit"], "yes");
    assert_eq!(m.headers["x-tenant"], "acme", "propagate_headers = true");
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn a_headers_parameter_is_the_rows_headers() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let (stop, run) = start(explicit(&db, with_headers {}, &kafka));
    let mut conn = db.pool.acquire().await?;
    db.broker
        .publish_with(
            &serde_json::json!({"k": "v"}),
            "macros.headers",
            &PublishOptions::new().header("x-tenant", "acme"),
            &mut conn,
        )
        .await?;
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].payload, b"body v / tenant acme");
    assert!(drained(&db).await);
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn a_missing_state_is_a_startup_error() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let err = explicit(&db, params {}, &kafka)
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Prefix"), "{err}");
    assert!(err.contains("macros::params"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_handler_declared_through_macro_rules() -> R {
    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let (stop, run) = start(explicit(&db, echo {}, &kafka));
    publish(&db, &9, "macros.echo").await;
    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].destination, "macros.echo.out");
    assert_eq!(got[0].payload, b"9");
    stop.shutdown();
    run.await??;
    Ok(())
}

#[test]
fn defaults_are_the_runtime_defaults() {
    let route = IntoRoute::into_route(handle {});
    assert_eq!(route.name(), Some("macros::handle"));
    let loc = route.location().unwrap();
    assert!(loc.file.ends_with("macros.rs"), "{loc}");
    assert_eq!(route.targets().len(), 1);
    assert_eq!(route.targets()[0].transport, "kafka");
    assert_eq!(route.targets()[0].destination, "orders.kafka");
    let debug = format!("{route:?}");
    for expected in [
        r#"queues: ["orders"]"#,
        "max_workers: 1,",
        "fetch_batch_size: 10,",
        "min_fetch_interval: 1s,",
        "max_fetch_interval: 10s,",
        "lease_ttl: 60s,",
        "max_deliveries: None,",
        "terminal_flush_batch_size: 1,",
        "ack_policy: NackOnError,",
        "retry: None",
        "propagate_headers: true",
    ] {
        assert!(debug.contains(expected), "{expected} not in {debug}");
    }
}

#[test]
fn every_option_reaches_the_route() {
    let route = IntoRoute::into_route(every_option {});
    assert_eq!(route.name(), Some("macros::every_option"));
    let debug = format!("{route:?}");
    for expected in [
        r#"queues: ["macros.options"]"#,
        "max_workers: 3,",
        "fetch_batch_size: 7,",
        "min_fetch_interval: 20ms,",
        "max_fetch_interval: 200ms,",
        "lease_ttl: 2.5s,",
        "max_deliveries: Some(9),",
        "terminal_flush_batch_size: 4,",
        "ack_policy: RejectOnError,",
        "retry: Some(NoRetry)",
        "propagate_headers: true",
    ] {
        assert!(debug.contains(expected), "{expected} not in {debug}");
    }
    let list = IntoRoute::into_route(params {});
    assert!(
        format!("{list:?}").contains(r#"queues: ["macros.params", "macros.params.2"]"#),
        "{list:?}"
    );
}

/// One source of truth for subscriber options: every option the runtime
/// builders take is a `#[subscriber(..)]` option, and every attribute option
/// is one the runtime takes (except `crate`, which only the macro has).
#[test]
fn the_attribute_takes_exactly_the_runtime_options() {
    use outbox_core::__private::{ROUTE_OPTION_NAMES, SUBSCRIBER_OPTION_NAMES};
    const MACRO_ONLY: &[&str] = &["crate"];
    let attribute: &[&str] = outbox_core::__private::__subscriber_option_names!();
    let runtime: Vec<&str> = SUBSCRIBER_OPTION_NAMES
        .iter()
        .chain(ROUTE_OPTION_NAMES)
        .copied()
        .collect();
    let missing: Vec<&str> = runtime
        .iter()
        .copied()
        .filter(|o| !attribute.contains(o))
        .collect();
    assert!(
        missing.is_empty(),
        "runtime options that #[subscriber(..)] does not take (add them to \
         outbox-macros/src/symbol.rs, the parser and the expansion): {missing:?}"
    );
    let unknown: Vec<&str> = attribute
        .iter()
        .copied()
        .filter(|o| !runtime.contains(o) && !MACRO_ONLY.contains(o))
        .collect();
    assert!(
        unknown.is_empty(),
        "#[subscriber(..)] options no runtime builder takes: {unknown:?}"
    );
    assert!(runtime.contains(&"max_workers") && runtime.contains(&"retry"));
}
