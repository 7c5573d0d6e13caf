//! The application runtime: [`App`] wires routes (from `#[subscriber]` or by
//! hand), lifecycle hooks, transports and the subscriber engine together.

pub mod asyncapi;
mod context;
mod extract;
mod handler;
pub mod health;
mod hooks;
mod reply;
mod route;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

pub use context::AppContext;
pub use extract::{FromDelivery, MessageHeaders, Requirement, State};
pub use handler::HandlerFn;
pub use hooks::{Hook, IntoHook};
pub use reply::{IntoReply, Reply, Response};
pub use route::{
    IntoRoute, Location, PublishTarget, ROUTE_OPTION_NAMES, Route, RouteBuilder, RouteCall,
    RouteFactory,
};

use crate::broker::OutboxBroker;
use crate::engine::Engine;
use crate::engine::lane::LaneSpec;
use crate::engine::message::Message;
use crate::envelope::{self, CONTENT_TYPE, CORRELATION_ID, Headers};
use crate::error::{BoxError, Error, Result};
use crate::publisher::OutboxPublisher;
use crate::transport::headers::OUTBOX_ID;
use crate::transport::outbox::OutboxTransport;
use crate::transport::{Connect, Outgoing, Transport, TransportBroker};

/// An outbox application: routes, hooks, transports, one engine.
///
/// # Lifecycle
///
/// [`App::run`] does, in this order:
///
/// 1. collects the routes: the ones registered with [`App::subscriber`] plus,
///    unless [`App::without_discovery`], every `#[subscriber]` linked into the
///    binary; rejects duplicate names and an empty set; with
///    [`App::validate_schema_at_startup`], also checks the live tables;
/// 2. runs the `on_startup` hooks in registration order (transports register
///    themselves here, e.g. `kafka.connect()`); an error aborts startup;
/// 3. checks that every `#[publish_to]` transport is registered, accepts
///    its destination's name ([`Transport::check_destination`]) and finds
///    the destination on its bus ([`Transport::verify_destination`]: the
///    RabbitMQ exchange or queue, the JetStream stream, the Redis key's
///    type), and that every `State<S>` parameter has its state: nothing is
///    consumed otherwise; then resolves the outbox's source identity
///    ([`OutboxBroker::resolve_source`]: one statement on PostgreSQL, or the
///    explicit [`OutboxBroker::source_id`]), stamped on every [`Outgoing`]
///    for bus-side deduplication ids (while PostgreSQL cannot be reached it
///    retries, with a WARN, until it answers or shutdown is requested);
/// 4. starts the engine (all subscribers), then the [services](App::service);
/// 5. runs the `after_startup` hooks (an error stops the engine and aborts);
/// 6. waits for SIGINT / SIGTERM or [`AppHandle::shutdown`] (listened to
///    from the start: one that arrives during steps 1-3 stops the App
///    there, before anything is consumed, closing the transports connected
///    so far and running no shutdown hook; `run` then returns `Ok`);
/// 7. runs the `on_shutdown` hooks, drains every subscriber concurrently
///    (in-flight rows finish, unstarted ones are released), stops the
///    services, closes the transports (Kafka flushes), runs the
///    `after_shutdown` hooks.
///
/// Shutdown-hook errors are logged, shutdown goes on, and the first one is
/// returned at the end. Mistakes made while building the App (a transport
/// registered twice, a zero `outage_warning_after`) are reported by `run`
/// before anything starts: the first one made.
///
/// ```no_run
/// use outbox_core::{App, AppContext, MemoryTransport, OutboxBroker, OutboxTable, Route, Response, Message, BoxError};
///
/// async fn publish_one(app: AppContext) -> Result<(), BoxError> {
///     let mut tx = app.broker().pool().begin().await?;
///     app.broker().publish(&1_i64, "orders", &mut *tx).await?;
///     tx.commit().await?;
///     Ok(())
/// }
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
/// let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?);
/// let handle = Route::builder(["orders"])
///     .publish_to("kafka", "orders.kafka")
///     .handler(|msg: Message, _| async move { Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?)) });
/// App::new(outbox)
///     .subscriber(handle)
///     .transport(MemoryTransport::new("kafka"))
///     .after_startup(publish_one)
///     .run()
///     .await
/// # }
/// ```
pub struct App {
    ctx: AppContext,
    routes: Vec<Route>,
    discover: bool,
    engine: Option<Box<dyn FnOnce(Engine) -> Engine + Send>>,
    on_startup: Vec<Hook>,
    after_startup: Vec<Hook>,
    on_shutdown: Vec<Hook>,
    after_shutdown: Vec<Hook>,
    pending: Vec<Error>,
    signals: bool,
    watch: watch::Watch,
    validate_schema: Option<crate::store::SchemaChecks>,
    /// Transports registered through startup hooks (name, bus), for the
    /// AsyncAPI document.
    hook_transports: Vec<(String, Option<crate::transport::ServerInfo>)>,
    /// The AsyncAPI `info`: title, version, description.
    doc_info: (String, String, Option<String>),
    /// Publishers registered for the AsyncAPI document ([`App::publisher`]).
    publishers: Vec<OutboxPublisher>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<std::net::SocketAddr>,
    /// The running engine (for [`AppHandle::health`]), the health
    /// endpoint's address, the metrics naming.
    ops: health::Ops,
    /// Background services ([`App::service`]), by name.
    services: Vec<(String, ServiceFn)>,
}

/// A service's start function, boxed ([`App::service`]).
type ServiceFn = Box<
    dyn FnOnce(
            AppHandle,
            ServiceStop,
        ) -> futures_util::future::BoxFuture<'static, Result<(), BoxError>>
        + Send,
>;

/// Tells a [service](App::service) when to stop: [`stopped`](Self::stopped)
/// resolves once the App has drained its subscribers at shutdown.
#[derive(Debug, Clone)]
pub struct ServiceStop(tokio_util::sync::CancellationToken);

impl ServiceStop {
    /// Resolves when the service should stop (at once if it already should).
    pub async fn stopped(&self) {
        self.0.cancelled().await;
    }

    /// Whether the service should stop.
    pub fn is_stopped(&self) -> bool {
        self.0.is_cancelled()
    }
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("ctx", &self.ctx)
            .field("routes", &self.routes)
            .field("discover", &self.discover)
            .finish_non_exhaustive()
    }
}

/// Stops a running [`App`] from elsewhere (tests, embedding), and reports
/// its [`health`](Self::health).
#[derive(Debug, Clone)]
pub struct AppHandle {
    ctx: AppContext,
    engine: health::EngineSlot,
}

impl AppHandle {
    /// Requests a graceful shutdown (same as SIGTERM).
    pub fn shutdown(&self) {
        self.ctx.shutdown();
    }

    /// The application's context.
    pub fn context(&self) -> &AppContext {
        &self.ctx
    }
}

impl App {
    /// An application over `broker`, discovering `#[subscriber]` routes.
    pub fn new(broker: OutboxBroker) -> Self {
        Self {
            ctx: AppContext::new(broker),
            routes: Vec::new(),
            discover: true,
            engine: None,
            on_startup: Vec::new(),
            after_startup: Vec::new(),
            on_shutdown: Vec::new(),
            after_shutdown: Vec::new(),
            pending: Vec::new(),
            signals: true,
            watch: watch::Watch::new(Some(Self::DEFAULT_OUTAGE_WARNING_AFTER)),
            validate_schema: None,
            hook_transports: Vec::new(),
            doc_info: (default_title(), "unversioned".to_owned(), None),
            publishers: Vec::new(),
            #[cfg(feature = "prometheus")]
            prometheus: None,
            ops: health::Ops::default(),
            services: Vec::new(),
        }
    }

    /// Registers a route explicitly: a [`Route`] built by hand, or a
    /// `#[subscriber]` fn's marker (`handle {}`).
    pub fn subscriber(mut self, route: impl IntoRoute) -> Self {
        self.routes.push(route.into_route());
        self
    }

    /// Lists `publisher` in the [AsyncAPI document](Self::asyncapi): a
    /// `send` operation on its queue's channel, named by its title (default
    /// `"<queue>:Publisher"`). For documentation only: the App does not
    /// publish through it.
    ///
    /// ```
    /// # fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let orders = outbox.publisher("orders")?.description("Orders placed at checkout");
    /// let app = outbox_core::App::new(outbox).publisher(&orders);
    /// # let _ = app; Ok(()) }
    /// ```
    pub fn publisher(mut self, publisher: &OutboxPublisher) -> Self {
        self.publishers.push(publisher.clone());
        self
    }

    /// Uses only explicitly registered routes (no `inventory` discovery).
    pub fn without_discovery(mut self) -> Self {
        self.discover = false;
        self
    }

    /// Registers a transport directly (instead of through a startup hook).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        if let Err(e) = self.ctx.add_transport(Arc::new(transport)) {
            self.pending.push(e);
        }
        self
    }

    /// Registers an [`OutboxTransport`] named `outbox` on this App's own
    /// broker: `#[publish_to(outbox, "queue")]` then turns a handler's result
    /// into a row of `queue` (queue chaining).
    pub fn outbox_transport(self) -> Self {
        let broker = self.ctx.broker().clone();
        self.transport(OutboxTransport::new(broker))
    }

    /// Shares `value` with handlers (`State<S>` parameters) and hooks.
    pub fn state<S: Send + Sync + 'static>(self, value: S) -> Self {
        self.ctx.insert_state(value);
        self
    }

    /// Adjusts the engine before it starts (LISTEN options, connection names).
    pub fn configure_engine(mut self, f: impl FnOnce(Engine) -> Engine + Send + 'static) -> Self {
        self.engine = Some(Box::new(f));
        self
    }

    /// How long [`outage_warning_after`](Self::outage_warning_after) waits by
    /// default: 5 s.
    pub const DEFAULT_OUTAGE_WARNING_AFTER: Duration = Duration::from_secs(5);

    /// Logs one WARN when a transport has confirmed nothing sent to a
    /// destination for `after` (default
    /// [`DEFAULT_OUTAGE_WARNING_AFTER`](Self::DEFAULT_OUTAGE_WARNING_AFTER),
    /// 5 s) while messages wait for it, and one INFO when it confirms again;
    /// `None` turns both off.
    ///
    /// The WARN names the transport and the destination (fields `transport`,
    /// `destination`), how many publishes wait for a confirmation
    /// (`waiting`), how many failed since the last one (`failed`) and since
    /// when (`since`, UTC); the INFO says how long the outage lasted
    /// (`outage_secs`), how many publishes failed during it and how many
    /// were confirmed since. Nothing is logged for an idle destination, nor
    /// for permanent refusals ([`BusRejection`](crate::BusRejection)), which
    /// are answers, not outages. Every transport is watched the same way;
    /// the cost on the hot path is a few atomic counters per publish.
    ///
    /// ```
    /// use std::time::Duration;
    /// # fn demo(outbox: outbox_core::OutboxBroker) {
    /// let app = outbox_core::App::new(outbox).outage_warning_after(Duration::from_secs(30));
    /// # let _ = app;
    /// # }
    /// ```
    ///
    /// A zero duration is refused when the App runs.
    pub fn outage_warning_after(mut self, after: impl Into<Option<Duration>>) -> Self {
        match after.into() {
            Some(d) if d.is_zero() => self.pending.push(Error::config(
                "outage_warning_after must be longer than zero; pass None to turn the outage \
                 warning off",
            )),
            after => self.watch = watch::Watch::new(after),
        }
        self
    }

    /// Does not install SIGINT/SIGTERM handlers: [`run`](Self::run) ends on
    /// [`AppHandle::shutdown`] only.
    pub fn without_signals(mut self) -> Self {
        self.signals = false;
        self
    }

    /// Checks the live tables with [`OutboxBroker::validate_schema`] before
    /// anything runs; a drift aborts startup with the fix to apply.
    pub fn validate_schema_at_startup(self) -> Self {
        self.validate_schema_at_startup_with(crate::store::SchemaChecks::new())
    }

    /// [`validate_schema_at_startup`](Self::validate_schema_at_startup) with
    /// the optional checks of [`SchemaChecks`](crate::SchemaChecks), e.g.
    /// `SchemaChecks::new().autovacuum(true)` to refuse to start on an outbox
    /// table whose autovacuum is not tuned.
    pub fn validate_schema_at_startup_with(mut self, checks: crate::store::SchemaChecks) -> Self {
        self.validate_schema = Some(checks);
        self
    }

    /// Serves the [metrics](crate::telemetry) in the Prometheus text format on
    /// `GET http://<addr>/metrics` (feature `prometheus`); installed first thing
    /// in [`run`](Self::run).
    #[cfg(feature = "prometheus")]
    pub fn prometheus(mut self, addr: std::net::SocketAddr) -> Self {
        self.prometheus = Some(addr);
        self
    }

    /// Serves `GET /healthz` (liveness) and `GET /readyz` (readiness) on
    /// `addr` for Kubernetes probes: 200 or 503 with a small JSON body
    /// ([`AppHandle::health`]; see [`health`](crate::health) for what each
    /// checks and a probe configuration). Bound first thing in
    /// [`run`](Self::run) (a port in use fails it), served until `run`
    /// returns; `/readyz` answers 503 from the moment shutdown begins.
    ///
    /// ```no_run
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// outbox_core::App::new(outbox)
    ///     .health_endpoint(([0, 0, 0, 0], 8081).into())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub fn health_endpoint(mut self, addr: std::net::SocketAddr) -> Self {
        self.ops.addr = Some(addr);
        self
    }

    /// Exports the metrics under other names: with
    /// [`MetricsNaming::FastStream`](crate::telemetry::MetricsNaming), the
    /// `faststream_*` families and labels of the Python package, so that
    /// its Grafana dashboards and alerts keep working. Process-wide (the
    /// metrics recorder is): set when [`run`](Self::run) starts, before the
    /// Prometheus exporter; see [`telemetry::set_metrics_naming`](crate::telemetry::set_metrics_naming).
    pub fn metrics_naming(mut self, naming: crate::instrument::MetricsNaming) -> Self {
        self.ops.naming = Some(naming);
        self
    }

    /// How long [`run`](Self::run) waits at shutdown for a
    /// [service](Self::service) to end after telling it to stop, before
    /// aborting it: 5 s.
    pub const SERVICE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

    /// Runs `start` as a background service of the app (an HTTP server such
    /// as the [operator dashboard], a sampler, ...): spawned by
    /// [`run`](Self::run) once the engine has started, given the app's
    /// [`AppHandle`] (health, context, shutdown) and a [`ServiceStop`].
    ///
    /// At shutdown, once the subscribers have drained (so a service can show
    /// the drain), `ServiceStop::stopped` resolves; the service then has
    /// [`SERVICE_STOP_TIMEOUT`](Self::SERVICE_STOP_TIMEOUT) to return before
    /// it is aborted; then the transports close. A service that returns an
    /// error (or panics) is logged at ERROR when it ends, the app keeps
    /// running, and `run` returns the first such error at the end, as it
    /// does for shutdown hooks (`Error::Hook` with stage `service`). If
    /// startup fails after the engine started, the services are aborted.
    /// To fail startup on a service's setup error (a port in use), do that
    /// setup in an [`on_startup`](Self::on_startup) hook.
    ///
    /// [operator dashboard]: https://docs.rs/outbox-dashboard
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// outbox_core::App::new(outbox)
    ///     .service("health-logger", |handle, stop| async move {
    ///         while !stop.is_stopped() {
    ///             let report = handle.health().await;
    ///             tracing::info!(ready = report.ready, "health");
    ///             tokio::select! {
    ///                 () = stop.stopped() => {}
    ///                 () = tokio::time::sleep(Duration::from_secs(60)) => {}
    ///             }
    ///         }
    ///         Ok::<_, outbox_core::BoxError>(())
    ///     })
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub fn service<F, Fut>(mut self, name: impl Into<String>, start: F) -> Self
    where
        F: FnOnce(AppHandle, ServiceStop) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.services.push((
            name.into(),
            Box::new(move |handle, stop| Box::pin(start(handle, stop))),
        ));
        self
    }

    /// Runs before the subscribers start; an error aborts startup.
    pub fn on_startup(mut self, hook: impl IntoHook) -> Self {
        let hook = hook.into_hook();
        if let Some(t) = hook.registers() {
            self.hook_transports.push(t.clone());
        }
        self.on_startup.push(hook);
        self
    }

    /// Runs once the subscribers are live; an error stops the app.
    pub fn after_startup(mut self, hook: impl IntoHook) -> Self {
        self.after_startup.push(hook.into_hook());
        self
    }

    /// Runs when shutdown begins, before the subscribers drain.
    pub fn on_shutdown(mut self, hook: impl IntoHook) -> Self {
        self.on_shutdown.push(hook.into_hook());
        self
    }

    /// Runs after the subscribers drained and the transports closed.
    pub fn after_shutdown(mut self, hook: impl IntoHook) -> Self {
        self.after_shutdown.push(hook.into_hook());
        self
    }

    /// A handle that stops the app once it runs, and reports its health.
    pub fn handle(&self) -> AppHandle {
        health::handle(&self.ctx, &self.ops.slot)
    }

    /// The context (broker, transports, state).
    pub fn context(&self) -> &AppContext {
        &self.ctx
    }

    /// The title, version and description of the AsyncAPI document
    /// ([`asyncapi`](Self::asyncapi)). Default: the executable's name,
    /// `unversioned`, a generated description.
    ///
    /// ```
    /// # fn demo(outbox: outbox_core::OutboxBroker) {
    /// let app = outbox_core::App::new(outbox)
    ///     .asyncapi_info("orders-relay", env!("CARGO_PKG_VERSION"), Some("Relays orders to Kafka"));
    /// # let _ = app;
    /// # }
    /// ```
    pub fn asyncapi_info(
        mut self,
        title: impl Into<String>,
        version: impl Into<String>,
        description: Option<&str>,
    ) -> Self {
        self.doc_info = (title.into(), version.into(), description.map(str::to_owned));
        self
    }

    /// The application's [AsyncAPI 3.0.0](https://www.asyncapi.com/docs/reference/specification/v3.0.0)
    /// document, built from its routes (the registered ones and, unless
    /// [`without_discovery`](Self::without_discovery), every `#[subscriber]`
    /// linked in) and its transports, without connecting anything: the
    /// outbox queues consumed and the destinations relayed to as channels,
    /// a `receive` and a `send` operation per route and target, the servers
    /// (the outbox's PostgreSQL host and database, each transport's bus;
    /// never credentials), messages with the envelope headers
    /// (`content-type`, `correlation_id`, `outbox-id`) and the payloads'
    /// JSON Schemas (feature `schemars`; a placeholder naming the Rust type
    /// otherwise), and an `x-outbox` extension with the table and each
    /// subscriber's options. See [`asyncapi`](crate::asyncapi) for the
    /// layout.
    ///
    /// Fails like [`run`](Self::run) would on the routes: none, or two with
    /// one name.
    ///
    /// Without writing code, `OUTBOX_ASYNCAPI=json` (or `yaml`) makes
    /// [`run`](Self::run) print it and exit, which `outbox docs gen -- <your
    /// program>` uses.
    ///
    /// ```
    /// use outbox_core::{App, MemoryTransport, OutboxBroker, OutboxTable, Response, Route};
    ///
    /// # async fn demo() -> Result<(), outbox_core::Error> {
    /// // A lazy pool: nothing connects to build the document.
    /// let pool = outbox_core::sqlx::PgPool::connect_lazy("postgres://db.internal:5432/shop")?;
    /// let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?);
    /// let route = Route::builder(["orders"])
    ///     .name("relay_orders")
    ///     .publish_to("kafka", "orders.kafka")
    ///     .to(|order_id: i64| async move { Response::new(order_id) });
    /// let doc = App::new(outbox)
    ///     .without_discovery()
    ///     .subscriber(route)
    ///     .transport(MemoryTransport::new("kafka"))
    ///     .asyncapi()?;
    /// let v = doc.as_value();
    /// assert_eq!(v["asyncapi"], "3.0.0");
    /// assert_eq!(v["channels"]["outbox.orders"]["address"], "orders");
    /// assert_eq!(v["channels"]["kafka.orders.kafka"]["address"], "orders.kafka");
    /// assert_eq!(v["operations"]["relay_orders.receive"]["action"], "receive");
    /// assert_eq!(v["operations"]["relay_orders.send.0"]["action"], "send");
    /// assert_eq!(v["servers"]["outbox"]["host"], "db.internal:5432");
    /// println!("{}", doc.to_json_pretty());
    /// # Ok(()) }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn asyncapi(&self) -> Result<asyncapi::AsyncApi> {
        let routes = self.routes_for_doc()?;
        let mut transports = self.hook_transports.clone();
        for t in self.ctx.transports() {
            if !transports.iter().any(|(n, _)| n == t.name()) {
                transports.push((t.name().to_owned(), t.server()));
            }
        }
        asyncapi::build(&asyncapi::Source {
            broker: self.ctx.broker(),
            routes: &routes,
            transports,
            title: &self.doc_info.0,
            version: &self.doc_info.1,
            description: self.doc_info.2.as_deref(),
            publishers: &self.publishers,
        })
    }

    /// The routes `run` would collect, without taking them.
    fn routes_for_doc(&self) -> Result<Vec<Route>> {
        let mut copy = Self {
            ctx: self.ctx.clone(),
            routes: self.routes.clone(),
            discover: self.discover,
            engine: None,
            on_startup: Vec::new(),
            after_startup: Vec::new(),
            on_shutdown: Vec::new(),
            after_shutdown: Vec::new(),
            pending: Vec::new(),
            signals: false,
            watch: watch::Watch::new(None),
            validate_schema: None,
            hook_transports: Vec::new(),
            doc_info: self.doc_info.clone(),
            publishers: Vec::new(),
            #[cfg(feature = "prometheus")]
            prometheus: None,
            ops: health::Ops::default(),
            services: Vec::new(),
        };
        copy.collect_routes()
    }

    /// `OUTBOX_ASYNCAPI=json|yaml`: writes the document (to
    /// `OUTBOX_ASYNCAPI_OUT`, else standard output) and exits the process.
    fn asyncapi_from_env(&self) -> Result<()> {
        let Some(format) = std::env::var_os(asyncapi::ASYNCAPI_ENV) else {
            return Ok(());
        };
        let format = format.to_string_lossy().into_owned();
        let text = self.asyncapi()?.render(&format)?;
        match std::env::var_os(asyncapi::ASYNCAPI_OUT_ENV) {
            Some(path) => std::fs::write(&path, text.as_bytes()).map_err(|e| {
                Error::config(format!(
                    "cannot write the AsyncAPI document to {}: {e}",
                    std::path::Path::new(&path).display()
                ))
            })?,
            None => {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())
                    .and_then(|()| out.write_all(b"\n"))
                    .and_then(|()| out.flush())
                    .map_err(|e| {
                        Error::config(format!("cannot write the AsyncAPI document: {e}"))
                    })?;
            }
        }
        std::process::exit(0)
    }

    /// Runs until SIGINT/SIGTERM or [`AppHandle::shutdown`], then shuts down
    /// gracefully. See [`App`] for the exact order.
    ///
    /// With the environment variable `OUTBOX_ASYNCAPI` set to `json` or
    /// `yaml`, it writes the [AsyncAPI document](Self::asyncapi) instead (to
    /// the file `OUTBOX_ASYNCAPI_OUT`, else standard output) and exits the
    /// process with status 0, before any hook runs.
    pub async fn run(mut self) -> Result<()> {
        // The first mistake made while building the App, as written.
        if !self.pending.is_empty() {
            return Err(self.pending.swap_remove(0));
        }
        self.asyncapi_from_env()?;
        // Listening from the very start: a SIGTERM while the App starts (a
        // broker still being retried, a slow hook) stops it gracefully too,
        // instead of killing the process with the signal's default action.
        let _signals = self
            .signals
            .then(|| SignalListener::start(self.ctx.stop_token().clone()));
        if let Some(naming) = self.ops.naming.take() {
            crate::instrument::set_metrics_naming(naming)?;
        }
        #[cfg(feature = "prometheus")]
        if let Some(addr) = self.prometheus {
            crate::instrument::install_prometheus(addr)?;
        }
        // Served until `run` returns (dropped: aborted).
        let _health = match self.ops.addr {
            Some(addr) => Some(health::Server::start(addr, self.handle()).await?),
            None => None,
        };
        let ctx = self.ctx.clone();
        let routes = self.collect_routes()?;
        let validate_schema = self.validate_schema.take();
        let on_startup = std::mem::take(&mut self.on_startup);
        let starting = async {
            if let Some(checks) = validate_schema {
                ctx.broker().validate_schema_with(checks).await?;
            }
            for hook in on_startup {
                run_hook("on_startup", hook, &ctx).await?;
            }
            let (engine, destinations) = self.build_engine(routes)?;
            if let Err(e) = verify_destinations(destinations).await {
                close_transports(&ctx).await;
                return Err(e);
            }
            // Once, before anything is consumed: what transports combine
            // with the outbox id into bus-side deduplication ids.
            match resolve_source(&ctx).await {
                Ok(source) => Ok((engine, source)),
                Err(e) => {
                    close_transports(&ctx).await;
                    Err(e)
                }
            }
        };
        // A shutdown requested before anything is consumed drops the step
        // in progress (a hook, a connection being retried): no later step,
        // no shutdown hook runs (they may rely on a finished startup).
        let (engine, source) = tokio::select! {
            biased;
            () = ctx.stop_token().cancelled() => {
                tracing::info!(
                    "outbox app stopped while starting: nothing was consumed; closing the \
                     transports connected so far"
                );
                close_transports(&ctx).await;
                return Ok(());
            }
            started = starting => started?,
        };
        tracing::info!(
            source = %source,
            "outbox source identity (bus-side deduplication ids combine it with the outbox id)"
        );
        ctx.set_source(source);
        engine.start().await?;
        self.ops.slot.set(Some(engine.clone()));
        // Aborted when dropped (an early return); stopped below.
        let services = Services::start(std::mem::take(&mut self.services), self.handle());
        // Stops when dropped: at shutdown below, or on an early return.
        let watching = self.watch.start();
        for hook in std::mem::take(&mut self.after_startup) {
            if let Err(e) = run_hook("after_startup", hook, &ctx).await {
                engine.stop().await;
                close_transports(&ctx).await;
                return Err(e);
            }
        }
        tracing::info!("outbox app started");
        ctx.stop_token().cancelled().await;
        tracing::info!("outbox app shutting down");
        let mut first_err = None;
        for hook in std::mem::take(&mut self.on_shutdown) {
            if let Err(e) = run_hook("on_shutdown", hook, &ctx).await {
                tracing::error!("{e}");
                first_err.get_or_insert(e);
            }
        }
        let report = engine.stop().await;
        self.ops.slot.set(None);
        drop(watching);
        tracing::info!(?report, "subscribers drained");
        if let Some(e) = services.stop().await {
            first_err.get_or_insert(e);
        }
        close_transports(&ctx).await;
        for hook in std::mem::take(&mut self.after_shutdown) {
            if let Err(e) = run_hook("after_shutdown", hook, &ctx).await {
                tracing::error!("{e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn collect_routes(&mut self) -> Result<Vec<Route>> {
        let mut routes = std::mem::take(&mut self.routes);
        if self.discover {
            let mut found = route::discovered();
            found.sort_by(|a, b| {
                (a.builder_queues(), a.name.as_deref())
                    .cmp(&(b.builder_queues(), b.name.as_deref()))
            });
            routes.extend(found);
        }
        if routes.is_empty() {
            return Err(Error::config(
                "no subscribers registered: annotate an async fn with #[subscriber(\"queue\")] in a crate \
                 linked into this binary (if the handlers live in another crate, reference it from main, \
                 e.g. `use my_handlers as _;`), or register one with App::subscriber(..)",
            ));
        }
        let mut seen: HashMap<String, &Route> = HashMap::new();
        for r in &routes {
            let name = r.effective_name();
            if let Some(prev) = seen.insert(name.clone(), r) {
                return Err(Error::config(format!(
                    "two subscribers are named `{name}`: {} and {}; give one of them another \
                     name with #[subscriber(\"..\", name = \"...\")]",
                    prev.describe(),
                    r.describe()
                )));
            }
        }
        Ok(routes)
    }

    /// The engine with every route, and the destinations to verify on
    /// their buses before it starts.
    fn build_engine(&mut self, routes: Vec<Route>) -> Result<(Engine, Vec<Destination>)> {
        let ctx = &self.ctx;
        let mut engine = Engine::new(ctx.broker().clone());
        let mut destinations: Vec<Destination> = Vec::new();
        for mut route in routes {
            let mut targets = Vec::new();
            for t in &route.targets {
                let Some(transport) = ctx.transport(&t.transport) else {
                    return Err(Error::config(format!(
                        "subscriber {} publishes to transport `{}`, which is not registered; \
                         registered transports: {:?}. Register it with App::transport(..) or a \
                         startup hook such as `App::on_startup(kafka.connect())`",
                        route.describe(),
                        t.transport,
                        ctx.transport_names()
                    )));
                };
                let lease = route.builder.options_ref().get_lease_ttl();
                // With the lease heartbeat on (the default), the lease is
                // extended while the publish waits: nothing to warn about.
                let heartbeat = route.builder.options_ref().get_lease_heartbeat();
                if let Some(max) = transport.max_publish_time()
                    && lease <= max
                    && heartbeat.is_none()
                {
                    let name = route.effective_name();
                    let who = match &route.location {
                        Some(l) => format!("`{name}` ({l})"),
                        None => format!("`{name}`"),
                    };
                    tracing::warn!(
                        subscriber = %name,
                        transport = %t.transport,
                        "subscriber {who}: lease_ttl ({lease:?}) is not longer than the {max:?} a \
                         publish to transport `{}` may take, and its lease heartbeat is off. The \
                         lease clock starts when the row is claimed: the row may wait in the subscriber's buffer, then the handler \
                         runs, then the publish waits up to {max:?} for the bus; once the lease \
                         has run out, another relay may claim the row and publish it again (a \
                         duplicate). Turn the lease heartbeat on, make lease_ttl longer than \
                         {max:?} plus the handler's worst case, or shorten the transport's timeout \
                         (Kafka: message_timeout)",
                        t.transport
                    );
                }
                if let Err(reason) = transport.check_destination(&t.destination) {
                    return Err(Error::config(format!(
                        "subscriber {} publishes to `{}` on transport `{}`, which refuses that \
                         destination: {reason}",
                        route.describe(),
                        t.destination,
                        t.transport
                    )));
                }
                let seen = destinations
                    .iter()
                    .any(|d| d.transport.name() == t.transport && d.destination == t.destination);
                if !seen {
                    destinations.push(Destination {
                        subscriber: route.describe(),
                        transport: transport.clone(),
                        destination: t.destination.clone(),
                    });
                }
                let watch = self.watch.tracker(&t.transport, &t.destination);
                targets.push((transport, t.destination.clone(), watch));
            }
            for req in &route.requirements {
                if !ctx.has_state(req.type_id) {
                    return Err(Error::config(format!(
                        "subscriber {} takes `State<{}>`, but no such state is registered; add \
                         App::state(..)",
                        route.describe(),
                        req.type_name
                    )));
                }
            }
            tracing::info!(
                subscriber = %route.effective_name(),
                queues = ?route.builder_queues(),
                targets = ?route.targets,
                "outbox route"
            );
            let handler = RouteHandler {
                call: route.call.clone(),
                ctx: ctx.clone(),
                targets: Arc::new(targets),
                propagate: route.propagate_headers,
            };
            let describe = route.describe();
            let lanes = match route.exactly_once {
                None => None,
                Some(n) => Some(lane_spec(&route, n, &handler.targets)?),
            };
            // A relay's workers mostly wait for the bus: the knobs it does
            // not set get the relay defaults.
            let relays = !route.targets.is_empty();
            route.builder = route.builder.relay_defaults(relays);
            let sub = route
                .into_subscriber(Arc::new(move |msg: Message| handler.clone().handle(msg)))
                .map_err(|e| Error::config(format!("subscriber {describe}: {e}")))?;
            let sub = match lanes {
                Some(spec) => sub.with_lanes(spec),
                None => sub,
            };
            engine = engine.subscriber(sub);
        }
        if let Some(f) = self.engine.take() {
            engine = f(engine);
        }
        Ok((engine, destinations))
    }
}

impl Route {
    fn builder_queues(&self) -> Vec<String> {
        self.builder.queues().to_vec()
    }

    fn effective_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.builder.queues().join(","))
    }
}

/// The executable's file name, the default AsyncAPI title.
fn default_title() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "outbox application".to_owned())
}

/// The broker's source identity ([`OutboxBroker::resolve_source`]). While
/// PostgreSQL cannot be reached (a connection failure, not an answer), it
/// retries with a backoff (1 s doubling to 30 s), a WARN per attempt, as
/// the engine's loops would: a relay may start before its database (a
/// shutdown request meanwhile stops `App::run`, which races its startup
/// against the stop token). Anything else (an invalid explicit id, a
/// refused statement) fails at once.
async fn resolve_source(ctx: &AppContext) -> Result<Arc<str>> {
    const FIRST: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(30);
    let mut wait = FIRST;
    loop {
        let e = match ctx.broker().resolve_source().await {
            Ok(source) => return Ok(source),
            Err(Error::SourceIdentity(e)) if !matches!(e, sqlx::Error::Database(_)) => e,
            Err(e) => return Err(e),
        };
        tracing::warn!(
            retry_in = ?wait,
            "cannot read this outbox's source identity from PostgreSQL yet ({e}); nothing is \
             consumed until it is read. Retrying in {wait:?}. Check that the database is \
             reachable, or set the identity with OutboxBroker::source_id(..)"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(CAP);
    }
}

async fn run_hook(stage: &'static str, hook: Hook, ctx: &AppContext) -> Result<()> {
    let name = hook.name().to_owned();
    tracing::debug!(stage, hook = %name, "running hook");
    hook.run(ctx.clone()).await.map_err(|source| Error::Hook {
        stage,
        name,
        source,
    })
}

/// The one registration path of every transport: a [`TransportBroker`]'s
/// [`connect`](TransportBroker::connect) step connects when the App starts,
/// then registers the transport under its name.
impl<B: TransportBroker> IntoHook for Connect<B> {
    fn into_hook(self) -> Hook {
        let b = self.broker();
        let (name, server) = (b.transport_name().to_owned(), b.server());
        Hook::new(self.hook_name(), move |ctx: AppContext| async move {
            let transport = self.open().await?;
            ctx.add_transport(Arc::new(transport))?;
            Ok::<_, BoxError>(())
        })
        .registering(name, server)
    }
}

async fn close_transports(ctx: &AppContext) {
    for t in ctx.transports() {
        if let Err(e) = t.close().await {
            tracing::error!(transport = t.name(), "closing the transport failed: {e}");
        }
    }
}

/// Cancels the App's stop token on SIGTERM or SIGINT, from the moment it
/// starts until it is dropped (the task is then aborted). The handlers are
/// installed at once, so a signal that arrives before the task first runs
/// is not missed.
struct SignalListener(tokio::task::JoinHandle<()>);

impl SignalListener {
    fn start(token: tokio_util::sync::CancellationToken) -> Self {
        #[cfg(unix)]
        let signals = {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("cannot listen for {name}: {e}");
                    None
                }
            };
            (
                listen(SignalKind::terminate(), "SIGTERM"),
                listen(SignalKind::interrupt(), "SIGINT"),
            )
        };
        Self(tokio::spawn(async move {
            #[cfg(unix)]
            {
                async fn recv(s: Option<tokio::signal::unix::Signal>) {
                    match s {
                        Some(mut s) => {
                            s.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                }
                let (term, int) = signals;
                tokio::select! {
                    () = recv(term) => tracing::info!("SIGTERM received"),
                    () = recv(int) => tracing::info!("SIGINT received"),
                }
            }
            #[cfg(not(unix))]
            {
                if let Err(e) = tokio::signal::ctrl_c().await {
                    tracing::warn!("cannot listen for Ctrl-C: {e}");
                    std::future::pending::<()>().await;
                }
                tracing::info!("Ctrl-C received");
            }
            token.cancel();
        }))
    }
}

impl Drop for SignalListener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The running [services](App::service) of an App: aborted when dropped.
struct Services {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<(String, tokio::task::JoinHandle<Result<(), BoxError>>)>,
}

impl Services {
    fn start(services: Vec<(String, ServiceFn)>, handle: AppHandle) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = services
            .into_iter()
            .map(|(name, start)| {
                tracing::debug!(service = %name, "starting service");
                let fut = start(handle.clone(), ServiceStop(stop.clone()));
                let label = name.clone();
                let task = tokio::spawn(async move {
                    let res = fut.await;
                    if let Err(e) = &res {
                        tracing::error!(service = %label, "service `{label}` failed: {e}");
                    }
                    res
                });
                (name, task)
            })
            .collect();
        Self { stop, tasks }
    }

    /// Tells every service to stop and waits for each (up to
    /// [`App::SERVICE_STOP_TIMEOUT`], then aborts it); the first failure.
    async fn stop(mut self) -> Option<Error> {
        self.stop.cancel();
        let mut first = None;
        for (name, mut task) in std::mem::take(&mut self.tasks) {
            let source: BoxError = match tokio::time::timeout(App::SERVICE_STOP_TIMEOUT, &mut task)
                .await
            {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(e))) => e,
                Ok(Err(join)) => {
                    tracing::error!(service = %name, "service `{name}` panicked: {join}");
                    format!("the service panicked: {join}").into()
                }
                Err(_) => {
                    task.abort();
                    tracing::warn!(
                        service = %name,
                        "service `{name}` did not stop within {:?} of being asked to; aborted it",
                        App::SERVICE_STOP_TIMEOUT
                    );
                    continue;
                }
            };
            first.get_or_insert(Error::Hook {
                stage: "service",
                name,
                source,
            });
        }
        first
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

/// A destination a route publishes to, verified on its bus at startup
/// ([`Transport::verify_destination`]).
struct Destination {
    /// The first subscriber naming it (`describe()`), for the error.
    subscriber: String,
    transport: Arc<dyn Transport>,
    destination: String,
}

/// How long the startup check of one destination may take, whatever the
/// transport does.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks each transport whether its destinations exist
/// ([`Transport::verify_destination`]), one at a time; the first refusal
/// fails startup, naming the subscriber, the destination and the transport.
async fn verify_destinations(destinations: Vec<Destination>) -> Result<()> {
    for d in destinations {
        let name = d.transport.name().to_owned();
        let checked = tokio::time::timeout(
            VERIFY_TIMEOUT,
            d.transport.verify_destination(&d.destination),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the check did not finish within {VERIFY_TIMEOUT:?} (is the bus reachable?)"
            ))
        });
        if let Err(reason) = checked {
            return Err(Error::config(format!(
                "subscriber {} publishes to `{}` on transport `{name}`, which is not ready for \
                 it: {reason}",
                d.subscriber, d.destination
            )));
        }
        tracing::debug!(transport = %name, destination = %d.destination, "destination verified");
    }
    Ok(())
}

/// The lanes of a route with `exactly_once(lanes)`: valid only with 1 to
/// 1024 lanes and exactly one target, on a transport that has lanes.
fn lane_spec(route: &Route, lanes: u32, targets: &[Target]) -> Result<LaneSpec> {
    let who = route.describe();
    if !(1..=1024).contains(&lanes) {
        return Err(Error::config(format!(
            "subscriber {who}: exactly_once({lanes}) is out of range; give 1 to 1024 lanes"
        )));
    }
    let [(transport, _, _)] = targets else {
        return Err(Error::config(format!(
            "subscriber {who} is exactly-once but publishes to {} targets; an exactly-once \
             route publishes to exactly one transport (one transaction per lot), so give it \
             one publish_to",
            targets.len()
        )));
    };
    let Some(bus) = transport.lanes() else {
        return Err(Error::config(format!(
            "subscriber {who} is exactly-once but transport `{}` has no exactly-once lanes; \
             for Kafka, configure the transport with KafkaBroker::transactional(app_id)",
            transport.name()
        )));
    };
    Ok(LaneSpec {
        lanes,
        transport: transport.name().to_owned(),
        bus,
    })
}

/// A transport, a destination on it, and the destination's outage tracker.
type Target = (Arc<dyn Transport>, String, Option<Arc<watch::Tracker>>);

/// Runs a route's handler and forwards its result to every target.
#[derive(Clone)]
struct RouteHandler {
    call: RouteCall,
    ctx: AppContext,
    targets: Arc<Vec<Target>>,
    propagate: bool,
}

impl RouteHandler {
    async fn handle(self, msg: Message) -> Result<(), BoxError> {
        let reply = (self.call)(msg.clone(), self.ctx.clone()).await?;
        let Some(reply) = reply else { return Ok(()) };
        if self.targets.is_empty() {
            return Ok(());
        }
        let headers = outgoing_headers(&msg, &reply, self.propagate)?;
        let source = self.ctx.source();
        // The handler's key, else the row's ordering key.
        let key = reply
            .key
            .clone()
            .or_else(|| msg.ordering_key().map(|k| k.as_bytes().to_vec()));
        // Delays and timers are the outbox's: a bus target would drop them.
        let outbox_only = reply.follow_on.set_names();
        if !outbox_only.is_empty()
            && let Some((t, dest, _)) = self
                .targets
                .iter()
                .find(|(t, _, _)| !t.takes_follow_on(crate::transport::Sealed))
        {
            return Err(Box::new(Error::Transport {
                transport: t.name().to_owned(),
                destination: dest.clone(),
                source: format!(
                    "the response sets {} (Response::{}), which only an OutboxTransport \
                     target can honour; transport `{}` is not one, so nothing was sent. \
                     Publish such responses to an outbox queue only",
                    outbox_only.join(", "),
                    outbox_only[0],
                    t.name()
                )
                .into(),
            }));
        }
        // In an exactly-once lane, the result is staged: the lane commits it
        // with the lot (crate::transport::lane).
        let outgoing = |dest: &String| Outgoing {
            destination: dest.clone(),
            key: key.clone(),
            payload: reply.payload.clone(),
            headers: headers.clone(),
            source: source.clone(),
            follow_on: reply.follow_on.clone(),
        };
        if let Some(stage) = crate::transport::lane::current() {
            for (t, dest, _) in self.targets.iter() {
                stage.push(t.name(), outgoing(dest));
            }
            return Ok(());
        }
        let sends = self.targets.iter().map(|(t, dest, watch)| {
            let out = outgoing(dest);
            let name = t.name().to_owned();
            let dest = dest.clone();
            // Counted as waiting for the bus until it resolves (outage WARN).
            let in_flight = watch.as_ref().map(|w| w.begin());
            let fut = t.publish(out);
            async move {
                let started = std::time::Instant::now();
                let res = fut.await;
                if let Some(f) = in_flight {
                    f.end(&res);
                }
                crate::instrument::transport_duration(&name, &dest, res.is_ok(), started.elapsed());
                res.map_err(|source| Error::Transport {
                    transport: name,
                    destination: dest,
                    source,
                })
            }
        });
        for r in join_all(sends).await {
            r?;
        }
        Ok(())
    }
}

/// Propagated inbound headers (if on, minus the envelope's own keys), then
/// the reply's explicit headers, then the envelope: content type, correlation
/// id (the reply's, else the inbound row's) and `outbox-id`.
fn outgoing_headers(msg: &Message, reply: &Reply, propagate: bool) -> Result<Headers, BoxError> {
    let mut headers = Headers::new();
    if propagate {
        headers.extend(
            msg.headers()
                .iter()
                .filter(|(k, _)| ![CONTENT_TYPE, CORRELATION_ID, OUTBOX_ID].contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    headers.extend(reply.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    let correlation = reply
        .correlation_id
        .clone()
        .or_else(|| reply.headers.get(CORRELATION_ID).cloned())
        .unwrap_or_else(|| msg.correlation_id());
    let mut headers = envelope::finish_headers(headers, reply.content_type, Some(&correlation))?;
    headers.insert(OUTBOX_ID.to_owned(), msg.id().to_string());
    #[cfg(feature = "otel")]
    crate::otel::inject_current_overriding(&mut headers);
    Ok(headers)
}
