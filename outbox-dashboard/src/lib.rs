//! The operator dashboard of a PostgreSQL transactional outbox: a small web
//! UI over [`outbox_core::ops`].
//!
//! | page | what it shows |
//! |---|---|
//! | `/` | every queue (ready, scheduled, leased, retrying, dead letters, oldest ready and leased ages; refreshed every few seconds without reloading) and a chart of the relay rate (rows inserted and deleted per second, the last 15 minutes) |
//! | `/dead-letters` | dead letters filtered by queue, reason and time (`?queue=&reason=&since=&until=`), each with its payload, headers and last exception; replay or purge one, or the filtered set through a confirmation page |
//! | `/relays` | the engines' PostgreSQL connections (fetch, worker, acker, LISTEN); embedded in an [`App`](outbox_core::App), also its subscribers and LISTEN state |
//! | `/rows` | an outbox row (and its dead letters) by id, a dead letter by its id, or both by correlation id |
//!
//! Server-rendered HTML (maud escapes every value), a little vanilla
//! JavaScript, CSS and JS embedded in the binary: nothing is fetched from
//! the internet.
//!
//! # Safety
//!
//! - Read-only unless [`Dashboard::allow_writes`]: a POST (replay, purge)
//!   answers 403 naming the flag otherwise.
//! - Every form carries a CSRF token (random per process, compared in
//!   constant time); a POST whose `Origin` header names another host is
//!   refused.
//! - Optional [basic auth](Dashboard::basic_auth) or [bearer
//!   token](Dashboard::bearer_token) (401 with `WWW-Authenticate`; compared
//!   in constant time). Serving on a non-loopback address without either
//!   logs a WARN.
//! - Every value from a page reaches SQL only as a bind parameter (through
//!   [`outbox_core::ops`]); bad input gets a page naming the problem; a
//!   database outage answers 503.
//!
//! # Stand-alone
//!
//! ```no_run
//! use outbox_core::{DlqTable, OutboxBroker, OutboxTable};
//! use outbox_dashboard::Dashboard;
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?)
//!     .dead_letter_table(DlqTable::new("outbox_dlq")?);
//! Dashboard::new(outbox)
//!     .allow_writes(true)
//!     .basic_auth("ops", "s3cret")
//!     .serve(([127, 0, 0, 1], 8090).into())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Or mount [`Dashboard::router`] in an axum application of your own. The
//! `outbox serve` command of the CLI serves it too.
//!
//! # In an App
//!
//! ```no_run
//! use outbox_dashboard::{AppDashboardExt, Dashboard};
//!
//! # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
//! outbox_core::App::new(outbox.clone())
//!     // Served from startup (a port in use fails `run`) until shutdown.
//!     .dashboard(([127, 0, 0, 1], 8090).into())
//!     .run()
//!     .await
//! # }
//! ```

mod app;
mod dlq;
mod error;
mod layout;
mod queues;
mod rate;
mod relays;
mod rows;
mod web;

pub mod render;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{AppHandle, OutboxBroker};

pub use app::AppDashboardExt;
pub use error::Error;

/// The default address: `127.0.0.1:8090`.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8090);

/// How often the queues page refreshes itself by default: 5 s.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);

/// The dashboard: a builder, then a [`Router`](axum::Router) or a server.
///
/// ```no_run
/// use std::time::Duration;
/// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_dashboard::Error> {
/// let dashboard = outbox_dashboard::Dashboard::new(outbox)
///     .allow_writes(true)
///     .bearer_token("a-long-random-token")
///     .refresh(Duration::from_secs(10));
/// // Serves until Ctrl-C.
/// dashboard
///     .serve_with_shutdown(([127, 0, 0, 1], 8090).into(), async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Dashboard {
    broker: OutboxBroker,
    allow_writes: bool,
    basic: Option<(String, String)>,
    bearer: Option<String>,
    refresh: Duration,
    app: Option<AppHandle>,
    /// Served on a loopback address: only loopback `Host` headers are
    /// answered (set by `serve_listener`).
    loopback: bool,
}

impl Dashboard {
    /// A read-only dashboard over `broker` (its outbox table and, when
    /// configured, its dead-letter table), without authentication.
    pub fn new(broker: OutboxBroker) -> Self {
        Self {
            broker,
            allow_writes: false,
            basic: None,
            bearer: None,
            refresh: DEFAULT_REFRESH,
            app: None,
            loopback: false,
        }
    }

    /// Allows the write actions (replay and purge of dead letters). Off by
    /// default: every POST then answers 403 naming this setting.
    pub fn allow_writes(mut self, allow: bool) -> Self {
        self.allow_writes = allow;
        self
    }

    /// Requires HTTP basic authentication with this user and password.
    /// Combined with [`bearer_token`](Self::bearer_token), either is accepted.
    pub fn basic_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.basic = Some((user.into(), password.into()));
        self
    }

    /// Requires `Authorization: Bearer <token>`. Combined with
    /// [`basic_auth`](Self::basic_auth), either is accepted.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }

    /// How often the queues page refreshes its table and chart
    /// ([`DEFAULT_REFRESH`]; at least 1 s).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_secs(1));
        self
    }

    /// Shows this running App's subscribers and LISTEN connection on the
    /// relays page ([`AppDashboardExt`] sets it).
    pub fn app_handle(mut self, handle: AppHandle) -> Self {
        self.app = Some(handle);
        self
    }

    /// Whether authentication is configured.
    pub fn has_auth(&self) -> bool {
        self.basic.is_some() || self.bearer.is_some()
    }

    /// The dashboard as an axum [`Router`](axum::Router), to serve or to
    /// nest in an application of your own. Call it inside a Tokio runtime:
    /// it starts the relay-rate sampler (every 5 s), which stops when the
    /// router and its clones are dropped.
    pub fn router(&self) -> axum::Router {
        web::router(Arc::new(web::Shared::new(self.clone())))
    }

    /// Binds `addr` and serves until the process ends. See
    /// [`serve_with_shutdown`](Self::serve_with_shutdown).
    pub fn serve(self, addr: SocketAddr) -> impl Future<Output = Result<(), Error>> + Send {
        self.serve_with_shutdown(addr, std::future::pending::<()>())
    }

    /// Binds `addr` and serves until `shutdown` resolves, then lets
    /// in-flight requests finish. Fails with [`Error::Bind`] when the
    /// address cannot be bound. Logs a WARN when `addr` is not a loopback
    /// address and no authentication is configured.
    ///
    /// On a loopback address, only requests whose `Host` header names a
    /// loopback host (`localhost`, `127.0.0.1`, `[::1]`, any port) are
    /// answered, others get 403: a web page cannot reach the dashboard
    /// through DNS rebinding (a name of its own resolving to 127.0.0.1).
    // Not an `async fn`: the signature promises a `Send` future (spawnable).
    #[allow(clippy::manual_async_fn)]
    pub fn serve_with_shutdown(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            let listener = bind(addr).await?;
            self.serve_listener(listener, shutdown).await
        }
    }

    /// Serves on an already bound `listener` until `shutdown` resolves
    /// (as [`serve_with_shutdown`](Self::serve_with_shutdown)).
    pub async fn serve_listener(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let addr = listener.local_addr().map_err(Error::Serve)?;
        if !addr.ip().is_loopback() && !self.has_auth() {
            tracing::warn!(
                %addr,
                "the outbox dashboard listens on {addr}, which is not a loopback address, without \
                 authentication: anyone who reaches it can read payloads{}. Set basic auth or a \
                 bearer token (outbox serve --basic-auth USER:PASS or --bearer-token T), or \
                 listen on 127.0.0.1",
                if self.allow_writes {
                    " and replay or purge dead letters"
                } else {
                    ""
                }
            );
        }
        tracing::info!(%addr, writes = self.allow_writes, "outbox dashboard serving on http://{addr}/");
        let router = Self {
            loopback: addr.ip().is_loopback(),
            ..self
        }
        .router();
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(Error::Serve)
    }
}

/// Binds `addr`, or [`Error::Bind`] naming it.
pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}
