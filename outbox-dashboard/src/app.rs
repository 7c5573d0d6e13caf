//! The dashboard inside an [`App`]: [`AppDashboardExt`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use outbox_core::{App, BoxError, Hook};

use crate::Dashboard;

/// Serves the [`Dashboard`] from a running [`App`]: `use
/// outbox_dashboard::AppDashboardExt;` then `app.dashboard(addr)`.
///
/// The address is bound in an `on_startup` hook (a port in use fails
/// [`App::run`] with [`Error::Bind`](crate::Error::Bind)'s message); the
/// dashboard serves as an [App service](App::service) from the moment the
/// engine runs, shows the App's subscribers and LISTEN connection on its
/// relays page, and stops (in-flight requests finish) once the
/// subscribers have drained at shutdown.
///
/// ```no_run
/// use outbox_dashboard::{AppDashboardExt, Dashboard};
///
/// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
/// let dashboard = Dashboard::new(outbox.clone())
///     .allow_writes(true)
///     .basic_auth("ops", std::env::var("DASHBOARD_PASSWORD").unwrap_or_default());
/// outbox_core::App::new(outbox)
///     .dashboard_with(dashboard, ([0, 0, 0, 0], 8090).into())
///     .run()
///     .await
/// # }
/// ```
pub trait AppDashboardExt: Sized {
    /// A read-only [`Dashboard`] of the App's own outbox on `addr`.
    fn dashboard(self, addr: SocketAddr) -> Self;

    /// `dashboard` on `addr`.
    fn dashboard_with(self, dashboard: Dashboard, addr: SocketAddr) -> Self;
}

impl AppDashboardExt for App {
    fn dashboard(self, addr: SocketAddr) -> Self {
        let dashboard = Dashboard::new(self.context().broker().clone());
        self.dashboard_with(dashboard, addr)
    }

    fn dashboard_with(self, dashboard: Dashboard, addr: SocketAddr) -> Self {
        type Slot = Arc<Mutex<Option<tokio::net::TcpListener>>>;
        let slot: Slot = Arc::default();
        let bound = slot.clone();
        let bind = Hook::new("dashboard", move |_ctx| async move {
            let listener = crate::bind(addr).await?;
            *bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(listener);
            Ok::<_, BoxError>(())
        });
        self.on_startup(bind)
            .service("dashboard", move |handle, stop| async move {
                let listener = slot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .ok_or(
                        "the dashboard's address was not bound (its startup hook did not run)",
                    )?;
                dashboard
                    .app_handle(handle)
                    .serve_listener(listener, async move { stop.stopped().await })
                    .await?;
                Ok::<_, BoxError>(())
            })
    }
}
