//! # outbox-conformance
//!
//! The conformance kit of `outbox-core` transports: reusable async checks
//! that a transport crate runs against its **real** server, so that every
//! bus keeps the same promises (`docs/transports.md` explains how to write a
//! transport crate; this is its test suite).
//!
//! A transport crate implements [`BusProbe`] for its bus in its tests: a
//! factory for the transport under test (its
//! [`TransportBroker`]), a fresh destination per check, a way to read back
//! what arrived ([`BusProbe::read`]), a way to cut the bus and restore it
//! ([`BusProbe::cut`]), an invalid destination and a payload size the bus
//! refuses. Each check then takes the probe and an [`OutboxBroker`] on
//! PostgreSQL (with a dead-letter table) and panics with a message saying
//! what was broken:
//!
//! | check | the promise |
//! |---|---|
//! | [`publish_confirms`] | `publish` resolves `Ok` only once the bus has the message: it is readable right after; the transport carries its broker's name; `close` works |
//! | [`messages_arrive_as_documented`] | body, `content-type`, `correlation_id`, explicit and propagated headers, `outbox-id` (and the key) arrive as the App mapped them |
//! | [`outage_keeps_rows`] | while the bus is cut, a publish does not resolve `Ok`, the rows stay in the outbox; after recovery every row arrives |
//! | [`killed_relay_redelivers`] | a relay aborted mid-stream (no graceful stop) and started again: every row arrives at least once |
//! | [`invalid_destination_fails_startup`] | `App::run` fails before consuming anything, naming the destination |
//! | [`oversized_message_is_not_lost`] | a payload over the bus's limit is a [`BusRejection`] naming the bus; its row is dead-lettered with that reason (or kept), never dropped |
//! | [`unreachable_bus_fails_startup`] | a bus that cannot be reached fails `App::run` at startup, naming the transport; nothing is consumed |
//!
//! ```no_run
//! # use outbox_core::OutboxBroker;
//! # async fn demo<P: outbox_conformance::BusProbe>(probe: P, outbox: OutboxBroker) {
//! // in tests/conformance_<bus>.rs, one #[tokio::test] per check:
//! outbox_conformance::publish_confirms(&probe).await;
//! outbox_conformance::messages_arrive_as_documented(&probe, &outbox).await;
//! # }
//! ```
//!
//! [`conformance_tests!`] writes those tests: one invocation per bus.
//!
//! Every check uses its own queue and destination, so they can share one
//! outbox table and run in parallel (except that [`outage_keeps_rows`] cuts
//! the whole bus: keep other tests off it meanwhile).
//!
//! [`layering`] checks a transport crate's module map against its code
//! (every transport crate keeps the same file layout, see
//! `docs/transports.md`).

pub mod layering;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::retry::ConstantRetry;
use outbox_core::transport::{BoxFuture, TransportBroker};
use outbox_core::{
    App, AppContext, AppHandle, BoxError, BusRejection, Engine, FromDelivery, Message,
    OutboxBroker, Outgoing, Passthrough, PublishOptions, Raw, Response, Route, Transport,
};

/// One message as it arrived on the bus, read back by [`BusProbe::read`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// The record key / routing key, if the bus has one.
    pub key: Option<Vec<u8>>,
    /// The body, as the bus delivered it.
    pub payload: Vec<u8>,
    /// The headers (bus properties such as AMQP's `content_type` mapped
    /// back to the names of [`Outgoing::headers`]).
    pub headers: BTreeMap<String, String>,
}

impl Received {
    /// The `outbox-id` header as a row id.
    pub fn outbox_id(&self) -> Option<i64> {
        self.headers.get(outbox_core::OUTBOX_ID)?.parse().ok()
    }

    /// The header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A cut bus (from [`BusProbe::cut`]); restored by [`Cut::restore`], or when
/// dropped (a failing check never leaves the bus cut).
pub struct Cut {
    restore: Option<Box<dyn FnOnce() -> Result<(), BoxError> + Send>>,
}

impl fmt::Debug for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cut")
            .field("restored", &self.restore.is_none())
            .finish()
    }
}

impl Cut {
    /// A cut undone by `restore` (for Kafka: `scripts/kafka.sh resume`; for
    /// an in-process bus: clearing a flag).
    pub fn new(restore: impl FnOnce() -> Result<(), BoxError> + Send + 'static) -> Self {
        Self {
            restore: Some(Box::new(restore)),
        }
    }

    /// Restores the bus.
    pub fn restore(mut self) -> Result<(), BoxError> {
        self.restore.take().map_or(Ok(()), |f| f())
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        if let Some(f) = self.restore.take() {
            let _ = f();
        }
    }
}

/// Reads back until `done(messages so far)` (see [`BusProbe::read`]).
pub type Until = Arc<dyn Fn(&[Received]) -> bool + Send + Sync>;

/// What a transport crate provides to run the kit against its bus.
pub trait BusProbe: Send + Sync + 'static {
    /// The transport's builder (e.g. `KafkaBroker`).
    type Broker: TransportBroker;

    /// A builder of the transport under test, pointed at the real server.
    fn broker(&self) -> Self::Broker;

    /// A destination no other check uses, ready to receive (created on the
    /// bus when the bus needs that, e.g. a Kafka topic). `label` says which
    /// check asks.
    fn destination(&self, label: &str) -> BoxFuture<'static, Result<String, BoxError>>;

    /// Everything that arrived at `destination`, from its beginning: reads
    /// until `done` holds for what was read, or `timeout` passes (then
    /// returns what it has).
    fn read(
        &self,
        destination: &str,
        done: Until,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Received>, BoxError>>;

    /// Cuts the bus (publishes cannot be confirmed) until the returned
    /// [`Cut`] is restored or dropped.
    fn cut(&self) -> BoxFuture<'static, Result<Cut, BoxError>>;

    /// A destination the transport refuses at startup
    /// ([`Transport::check_destination`]).
    fn invalid_destination(&self) -> String;

    /// A payload length (bytes) the bus refuses.
    fn oversized_len(&self) -> usize;

    /// Whether the bus carries a message key ([`Response::key`]); the
    /// mapping check compares it only then.
    fn carries_keys(&self) -> bool {
        true
    }

    /// A builder of the transport pointed at an address where no server
    /// answers (or with credentials the server refuses), with a short
    /// connect timeout, for [`unreachable_bus_fails_startup`]; `None` for a
    /// bus that cannot be unreachable (in-process).
    fn unreachable_broker(&self) -> Option<Self::Broker> {
        None
    }
}

/// How long a check waits for the bus or the relay at most.
const WAIT: Duration = Duration::from_secs(90);

/// `OutboxBroker::publish` returns the row id, for timers `Option<i64>`.
trait RowId {
    fn row_id(self) -> i64;
}

impl RowId for i64 {
    fn row_id(self) -> i64 {
        self
    }
}

impl RowId for Option<i64> {
    fn row_id(self) -> i64 {
        self.unwrap_or_else(|| panic!("a plain publish returned no row id"))
    }
}

fn must<T, E: fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("conformance: {what}: {e}"))
}

fn unique(label: &str) -> String {
    let s = uuid::Uuid::new_v4().simple().to_string();
    format!("conf_{label}_{}", &s[..10])
}

async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows of `queue` in the outbox table.
async fn rows(outbox: &OutboxBroker, queue: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM {} WHERE queue = $1",
        outbox.table().qualified_name()
    );
    must(
        "counting outbox rows",
        outbox_core::sqlx::query_scalar::<_, i64>(outbox_core::sqlx::AssertSqlSafe(sql))
            .bind(queue)
            .fetch_one(outbox.pool())
            .await,
    )
}

async fn publish_rows(outbox: &OutboxBroker, queue: &str, n: i64) -> BTreeSet<i64> {
    let mut tx = must("beginning a transaction", outbox.pool().begin().await);
    let mut ids = BTreeSet::new();
    for v in 0..n {
        ids.insert(must("publishing", outbox.publish(&v, queue, &mut *tx).await).row_id());
    }
    must("committing", tx.commit().await);
    ids
}

/// Reads until every id of `ids` arrived; panics naming the missing ones.
async fn read_ids<P: BusProbe>(
    probe: &P,
    dest: &str,
    ids: &BTreeSet<i64>,
    what: &str,
) -> Vec<Received> {
    let want = ids.clone();
    let done: Until = Arc::new(move |got: &[Received]| {
        let seen: BTreeSet<i64> = got.iter().filter_map(Received::outbox_id).collect();
        want.is_subset(&seen)
    });
    let got = must("reading back", probe.read(dest, done, WAIT).await);
    let seen: BTreeSet<i64> = got.iter().filter_map(Received::outbox_id).collect();
    let missing: Vec<_> = ids.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "conformance: {what}: rows {missing:?} never arrived at `{dest}` ({} messages read)",
        got.len()
    );
    got
}

/// A relay App for the checks: `queue` -> `dest` on the transport under
/// test, the handler's result the row's own bytes (a
/// [`Response<Passthrough>`] with a key, a header and a correlation id).
struct Relay {
    handle: AppHandle,
    run: tokio::task::JoinHandle<outbox_core::Result<()>>,
    engine: Arc<Mutex<Option<Engine>>>,
}

#[derive(Clone, Copy)]
struct RelayOptions {
    lease_ttl: Duration,
    retry: bool,
    handler_delay: Duration,
    /// `fetch_batch_size` and `fetch_concurrency`: small, so that a relay's
    /// progress (rows leaving the outbox as each claim's transaction
    /// commits) shows mid-stream.
    batch: usize,
    lots: usize,
}

const RELAY: RelayOptions = RelayOptions {
    lease_ttl: Duration::from_secs(60),
    retry: true,
    handler_delay: Duration::ZERO,
    batch: 10,
    lots: 1,
};

fn relay_app<P: BusProbe>(
    probe: &P,
    outbox: &OutboxBroker,
    queue: &str,
    dest: &str,
    o: RelayOptions,
) -> (App, Arc<Mutex<Option<Engine>>>) {
    let broker = probe.broker();
    let name = broker.transport_name().to_owned();
    let mut b = Route::builder([queue])
        .max_workers(4)
        .fetch_batch_size(o.batch)
        .fetch_concurrency(o.lots)
        .lease_ttl(o.lease_ttl)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to(name, dest);
    if o.retry {
        b = b.retry(ConstantRetry::new(Duration::from_millis(200)));
    }
    let route = b.handler(move |msg: Message, ctx: AppContext| async move {
        if !o.handler_delay.is_zero() {
            tokio::time::sleep(o.handler_delay).await;
        }
        let body = Passthrough::from_delivery(&msg, &ctx)?;
        Ok::<_, BoxError>(
            Response::new(body)
                .key(format!("k{}", msg.id()))
                .header("x-conformance", "explicit")
                .correlation_id(format!("corr-{}", msg.id())),
        )
    });
    let slot = Arc::new(Mutex::new(None));
    let s = slot.clone();
    let app = App::new(outbox.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .configure_engine(move |e| {
            *s.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            e
        })
        .on_startup(broker.connect());
    (app, slot)
}

impl Relay {
    fn start<P: BusProbe>(
        probe: &P,
        outbox: &OutboxBroker,
        queue: &str,
        dest: &str,
        o: RelayOptions,
    ) -> Self {
        let (app, engine) = relay_app(probe, outbox, queue, dest, o);
        Self {
            handle: app.handle(),
            run: tokio::spawn(app.run()),
            engine,
        }
    }

    async fn stop(self) {
        self.handle.shutdown();
        let res = must("joining the relay", self.run.await);
        must("the relay's App::run", res);
    }

    /// As a crash: the engine's tasks aborted, no lease released, the App
    /// dropped without closing its transports.
    async fn kill(self) {
        let engine = self
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(e) = engine {
            e.abort().await;
        }
        self.run.abort();
        let _ = self.run.await;
    }
}

/// `publish` resolves `Ok` only once the bus has the message: each message
/// is readable right after its publish returned; the connected transport
/// carries its broker's name; `close` succeeds.
pub async fn publish_confirms<P: BusProbe>(probe: &P) {
    let broker = probe.broker();
    let dest = must("creating a destination", probe.destination("confirm").await);
    let transport = must("connecting", broker.connect_transport().await);
    assert_eq!(
        transport.name(),
        broker.transport_name(),
        "conformance: the transport must carry its broker's transport_name()"
    );
    let run = uuid::Uuid::new_v4().to_string();
    for i in 0..3_i64 {
        let mut out = Outgoing::new(dest.clone(), format!("confirm {i}").into_bytes());
        out.headers
            .insert(outbox_core::OUTBOX_ID.to_owned(), i.to_string());
        out.headers.insert("x-run".to_owned(), run.clone());
        must("publishing", transport.publish(out).await);
        // Confirmed means there: it is readable now (the read may take its
        // time to fetch, but the message must not be missing).
        let (r, want) = (run.clone(), i);
        let done: Until = Arc::new(move |got: &[Received]| {
            got.iter()
                .any(|m| m.header("x-run") == Some(&r) && m.outbox_id() == Some(want))
        });
        let got = must("reading back", probe.read(&dest, done.clone(), WAIT).await);
        assert!(
            done(&got),
            "conformance: publish {i} to `{dest}` returned Ok but the message is not on the bus"
        );
        let m = got
            .iter()
            .find(|m| m.outbox_id() == Some(i) && m.header("x-run") == Some(&run));
        assert_eq!(
            m.map(|m| m.payload.clone()),
            Some(format!("confirm {i}").into_bytes()),
            "conformance: the payload changed on the way"
        );
    }
    must("closing the transport", transport.close().await);
}

/// Through the App: the body (byte-exact), `content-type`, `correlation_id`,
/// explicit headers ([`Response::header`]), propagated row headers,
/// `outbox-id` and the key arrive as `docs/transports.md` documents.
pub async fn messages_arrive_as_documented<P: BusProbe>(probe: &P, outbox: &OutboxBroker) {
    let queue = unique("mapping");
    let dest = must("creating a destination", probe.destination("mapping").await);
    let mut tx = must("beginning", outbox.pool().begin().await);
    let opts = PublishOptions::new().header("x-tenant", "acme");
    let text = must(
        "publishing",
        outbox.publish_with(&"hello", &queue, &opts, &mut *tx).await,
    )
    .row_id();
    let value = serde_json::json!({"b": 1, "a": [2]});
    // As the publish encoded it (key order depends on serde_json's features).
    let json_bytes = must("encoding", serde_json::to_vec(&value));
    let json = must(
        "publishing",
        outbox.publish_with(&value, &queue, &opts, &mut *tx).await,
    )
    .row_id();
    let raw = must(
        "publishing",
        outbox
            .publish_with(&Raw(vec![0, 159, 146, 150]), &queue, &opts, &mut *tx)
            .await,
    )
    .row_id();
    must("committing", tx.commit().await);
    let relay = Relay::start(probe, outbox, &queue, &dest, RELAY);
    let ids: BTreeSet<i64> = [text, json, raw].into();
    let got = read_ids(probe, &dest, &ids, "mapping").await;
    relay.stop().await;
    let expect: [(i64, &[u8], Option<&str>); 3] = [
        (text, b"hello", Some("text/plain")),
        (json, &json_bytes, Some("application/json")),
        (raw, &[0, 159, 146, 150], None),
    ];
    for (id, payload, content_type) in expect {
        let m = got
            .iter()
            .find(|m| m.outbox_id() == Some(id))
            .unwrap_or_else(|| panic!("conformance: row {id} missing"));
        let who = format!("conformance: the message of row {id}");
        assert_eq!(m.payload, payload, "{who}: body");
        assert_eq!(
            m.header("content-type"),
            content_type,
            "{who}: content-type"
        );
        let corr = format!("corr-{id}");
        assert_eq!(
            m.header("correlation_id"),
            Some(corr.as_str()),
            "{who}: correlation_id"
        );
        assert_eq!(
            m.header("x-conformance"),
            Some("explicit"),
            "{who}: explicit header"
        );
        assert_eq!(
            m.header("x-tenant"),
            Some("acme"),
            "{who}: propagated header"
        );
        if probe.carries_keys() {
            assert_eq!(m.key, Some(format!("k{id}").into_bytes()), "{who}: key");
        }
    }
}

/// A bus outage: a publish while the bus is cut does not resolve `Ok`; the
/// relay's rows stay in the outbox while it is cut; after the bus is
/// restored every row arrives (through the App, on PostgreSQL).
pub async fn outage_keeps_rows<P: BusProbe>(probe: &P, outbox: &OutboxBroker) {
    let queue = unique("outage");
    let dest = must("creating a destination", probe.destination("outage").await);
    let relay = Relay::start(probe, outbox, &queue, &dest, RELAY);
    let mut ids = publish_rows(outbox, &queue, 5).await;
    read_ids(probe, &dest, &ids, "before the outage").await;
    let drained = wait_until(WAIT, || async { rows(outbox, &queue).await == 0 }).await;
    assert!(drained, "conformance: the relay did not get going");

    let direct = must("connecting", probe.broker().connect_transport().await);
    let cut = must("cutting the bus", probe.cut().await);
    let mut out = Outgoing::new(dest.clone(), b"during the outage".to_vec());
    out.headers
        .insert(outbox_core::OUTBOX_ID.to_owned(), "-1".to_owned());
    let res = tokio::time::timeout(Duration::from_secs(2), direct.publish(out)).await;
    assert!(
        !matches!(res, Ok(Ok(()))),
        "conformance: a publish resolved Ok while the bus was cut: it must wait for the bus's \
         confirmation"
    );
    let during = publish_rows(outbox, &queue, 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = rows(outbox, &queue).await;
    assert_eq!(
        left, 10,
        "conformance: rows left the outbox while the bus was cut (they must stay until the bus \
         confirms)"
    );
    must("restoring the bus", cut.restore());
    ids.extend(during);
    let drained = wait_until(WAIT, || async { rows(outbox, &queue).await == 0 }).await;
    assert!(
        drained,
        "conformance: {} rows still in the outbox after the bus came back",
        rows(outbox, &queue).await
    );
    read_ids(probe, &dest, &ids, "after the outage").await;
    relay.stop().await;
    let _ = direct.close().await;
}

/// A relay killed mid-stream (its engine aborted, no graceful stop, no
/// lease released) and started again: every row arrives at least once.
pub async fn killed_relay_redelivers<P: BusProbe>(probe: &P, outbox: &OutboxBroker) {
    let queue = unique("kill");
    let dest = must("creating a destination", probe.destination("kill").await);
    let n = 40;
    let ids = publish_rows(outbox, &queue, n).await;
    let o = RelayOptions {
        lease_ttl: Duration::from_secs(2),
        handler_delay: Duration::from_millis(30),
        ..RELAY
    };
    let first = Relay::start(probe, outbox, &queue, &dest, o);
    let started = wait_until(WAIT, || async { rows(outbox, &queue).await <= n - 5 }).await;
    assert!(started, "conformance: the first relay relayed nothing");
    first.kill().await;
    let left = rows(outbox, &queue).await;
    assert!(
        left > 0,
        "conformance: the first relay finished before it was killed; nothing to redeliver"
    );
    let second = Relay::start(probe, outbox, &queue, &dest, o);
    let drained = wait_until(WAIT, || async { rows(outbox, &queue).await == 0 }).await;
    assert!(
        drained,
        "conformance: {} rows left after the relay restarted",
        rows(outbox, &queue).await
    );
    second.stop().await;
    let got = read_ids(probe, &dest, &ids, "after a killed relay").await;
    let extra = got.len() as i64 - n;
    println!("killed relay: {left} rows left at the kill; {extra} duplicate(s) on the bus");
}

/// A destination the transport refuses fails `App::run` before anything is
/// consumed, with an error naming it.
pub async fn invalid_destination_fails_startup<P: BusProbe>(probe: &P, outbox: &OutboxBroker) {
    let queue = unique("invalid");
    let bad = probe.invalid_destination();
    let ids = publish_rows(outbox, &queue, 1).await;
    let name = probe.broker().transport_name().to_owned();
    let (app, _) = relay_app(probe, outbox, &queue, &bad, RELAY);
    let res = must(
        "App::run did not return",
        tokio::time::timeout(WAIT, app.run()).await,
    );
    let err = match res {
        Ok(()) => panic!("conformance: App::run started with destination `{bad}`"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&bad) && err.contains(&name),
        "conformance: the startup error must name the destination `{bad}` and the transport \
         `{name}`: {err}"
    );
    assert_eq!(
        rows(outbox, &queue).await,
        ids.len() as i64,
        "conformance: a row was consumed"
    );
}

/// A payload over the bus's limit: `publish` fails with a [`BusRejection`]
/// naming the bus; through the App its row is dead-lettered with the bus's
/// error (reason `rejected`) or kept in the outbox, never dropped.
pub async fn oversized_message_is_not_lost<P: BusProbe>(probe: &P, outbox: &OutboxBroker) {
    let Some(dlq) = outbox.dlq() else {
        panic!("conformance: the outbox needs a dead-letter table for this check");
    };
    let name = probe.broker().transport_name().to_owned();
    let dest = must(
        "creating a destination",
        probe.destination("oversized").await,
    );
    let len = probe.oversized_len();
    let direct = must("connecting", probe.broker().connect_transport().await);
    let res =
        tokio::time::timeout(WAIT, direct.publish(Outgoing::new(&dest, vec![b'x'; len]))).await;
    let err = match res {
        Ok(Err(e)) => e,
        Ok(Ok(())) => panic!("conformance: a {len}-byte message was accepted; pick a larger one"),
        Err(_) => panic!("conformance: a {len}-byte publish hung"),
    };
    let rejection = BusRejection::find(&*err).unwrap_or_else(|| {
        panic!("conformance: an oversized message must be a BusRejection (permanent): {err}")
    });
    assert_eq!(
        rejection.bus(),
        name,
        "conformance: the rejection names the bus"
    );
    let _ = direct.close().await;

    let queue = unique("oversized");
    let mut tx = must("beginning", outbox.pool().begin().await);
    let id = must(
        "publishing",
        outbox
            .publish(&Raw(vec![b'x'; len]), &queue, &mut *tx)
            .await,
    )
    .row_id();
    must("committing", tx.commit().await);
    // The default retry strategy: a BusRejection is terminal at once.
    let o = RelayOptions {
        retry: false,
        ..RELAY
    };
    let relay = Relay::start(probe, outbox, &queue, &dest, o);
    let sql = format!(
        "SELECT coalesce(max(failure_reason || ': ' || coalesce(last_exception, '')), '') FROM {} \
         WHERE original_id = $1",
        dlq.qualified_name()
    );
    let dead = || async {
        must(
            "reading the dead-letter table",
            outbox_core::sqlx::query_scalar::<_, String>(outbox_core::sqlx::AssertSqlSafe(
                sql.clone(),
            ))
            .bind(id)
            .fetch_one(outbox.pool())
            .await,
        )
    };
    let settled = wait_until(Duration::from_secs(30), || async {
        !dead().await.is_empty()
    })
    .await;
    relay.stop().await;
    let dead = dead().await;
    let kept = rows(outbox, &queue).await;
    if settled {
        assert!(
            dead.starts_with("rejected") && dead.contains(&name),
            "conformance: the dead letter must say the bus `{name}` rejected it: {dead}"
        );
        assert_eq!(kept, 0);
    } else {
        assert_eq!(
            kept, 1,
            "conformance: the oversized row is neither dead-lettered nor kept: lost"
        );
    }
    let none: Until = Arc::new(|_: &[Received]| false);
    let got = must(
        "reading back",
        probe.read(&dest, none, Duration::from_secs(2)).await,
    );
    assert!(
        got.iter().all(|m| m.outbox_id() != Some(id)),
        "conformance: the oversized message arrived after all"
    );
}

/// A bus that cannot be reached ([`BusProbe::unreachable_broker`]) fails
/// `App::run` at startup through the shared registration step, with an
/// error naming the transport and its connect hook; no row is consumed.
/// Returns the error text, for the bus's own assertions (such as the
/// address it names).
pub async fn unreachable_bus_fails_startup<P: BusProbe>(
    probe: &P,
    outbox: &OutboxBroker,
) -> String {
    let Some(broker) = probe.unreachable_broker() else {
        panic!("conformance: this BusProbe gives no unreachable_broker()");
    };
    let name = broker.transport_name().to_owned();
    let queue = unique("unreachable");
    let ids = publish_rows(outbox, &queue, 1).await;
    let route = Route::builder([queue.as_str()])
        .publish_to(name.clone(), "anywhere")
        .handler(
            |msg: Message, ctx: AppContext| async move { Passthrough::from_delivery(&msg, &ctx) },
        );
    let app = App::new(outbox.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(broker.connect());
    let res = must(
        "App::run did not return",
        tokio::time::timeout(WAIT, app.run()).await,
    );
    let err = match res {
        Ok(()) => panic!("conformance: App::run started with an unreachable `{name}`"),
        Err(e) => e.to_string(),
    };
    let hook = format!("{name}.connect");
    let transport = format!("transport `{name}` could not connect");
    assert!(
        err.contains(&hook) && err.contains(&transport),
        "conformance: the startup error must name the hook `{hook}` and say `{transport}`: {err}"
    );
    assert_eq!(
        rows(outbox, &queue).await,
        ids.len() as i64,
        "conformance: a row was consumed"
    );
    err
}

/// Generates the kit's tests for one bus: one test per check, in a module
/// named by the first line (test names `<module>::publish_confirms`,
/// `<module>::outage_keeps_rows`, ...), so that a bus's test file is its
/// [`BusProbe`] and one invocation:
///
/// ```ignore
/// outbox_conformance::conformance_tests! {
///     mod rabbitmq;
///     // The attribute every test gets.
///     #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
///     // The probe, made afresh in each test (may `.await`).
///     probe: Rabbit::new().await,
///     // The outbox: anything `AsRef<OutboxBroker>`, kept alive for the
///     // check (`tests::TestDb` drops its schema when dropped).
///     outbox: TestDb::new().await.unwrap(),
///     // Optional: awaited first with the check's name
///     // ("outage_keeps_rows", ...), its result held until the test ends
///     // (e.g. Kafka's broker lock, exclusive for the outage).
///     guard: |check| lock(check),
///     // Optional: runs `unreachable_bus_fails_startup` (which needs
///     // `BusProbe::unreachable_broker`) and hands its error text here for
///     // the bus's own assertions.
///     unreachable: |err: String| assert!(err.contains("127.0.0.1:1"), "{err}"),
/// }
/// ```
///
/// The probe and the outbox are expressions evaluated inside each test, in
/// the scope of the calling file (the generated module imports
/// `super::*`); the guard comes first, then the outbox, then the probe.
#[macro_export]
macro_rules! conformance_tests {
    (
        mod $bus:ident;
        #[$test:meta]
        probe: $probe:expr,
        outbox: $outbox:expr
        $(, guard: $guard:expr)?
        $(, unreachable: $unreachable:expr)?
        $(,)?
    ) => {
        mod $bus {
            #[allow(unused_imports)]
            use super::*;

            /// The guard of `check` (`()` when the bus has none).
            #[allow(unused_variables)]
            async fn guard(check: &'static str) -> impl Sized {
                $(($guard)(check).await)?
            }

            #[$test]
            async fn publish_confirms() {
                let _guard = guard("publish_confirms").await;
                $crate::publish_confirms(&$probe).await;
            }

            $crate::conformance_tests! {
                @checks #[$test] $outbox, $probe;
                messages_arrive_as_documented
                outage_keeps_rows
                killed_relay_redelivers
                invalid_destination_fails_startup
                oversized_message_is_not_lost
            }

            $(
                #[$test]
                async fn unreachable_bus_fails_startup() {
                    let _guard = guard("unreachable_bus_fails_startup").await;
                    let outbox = $outbox;
                    let err =
                        $crate::unreachable_bus_fails_startup(&$probe, $crate::outbox_of(&outbox))
                            .await;
                    ($unreachable)(err);
                }
            )?
        }
    };
    // One test per check taking (probe, outbox): guard, outbox, probe, check.
    (@checks #[$test:meta] $outbox:expr, $probe:expr; $($check:ident)*) => {
        $(
            #[$test]
            async fn $check() {
                let _guard = guard(stringify!($check)).await;
                let outbox = $outbox;
                $crate::$check(&$probe, $crate::outbox_of(&outbox)).await;
            }
        )*
    };
}

/// The outbox of a [`conformance_tests!`] fixture.
#[doc(hidden)]
pub fn outbox_of<T: AsRef<OutboxBroker>>(fixture: &T) -> &OutboxBroker {
    fixture.as_ref()
}
