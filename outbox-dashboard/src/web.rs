//! The router, the shared state, and the checks every request passes:
//! authentication, the write switch, the Origin check, CSRF; the error page.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{Markup, html};
use subtle::ConstantTimeEq as _;

use crate::Dashboard;
use crate::layout::{self, Nav};
use crate::rate::Sampler;

/// The name of the hidden form field carrying the CSRF token.
pub(crate) const CSRF_FIELD: &str = "csrf";

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Dashboard,
    /// Random per process (per router): 32 bytes, hex.
    pub(crate) csrf: String,
    pub(crate) sampler: Sampler,
}

impl Shared {
    pub(crate) fn new(config: Dashboard) -> Self {
        let bytes: [u8; 32] = rand::random();
        let csrf = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            config,
            csrf,
            sampler: Sampler::default(),
        }
    }

    pub(crate) fn broker(&self) -> &outbox_core::OutboxBroker {
        &self.config.broker
    }

    pub(crate) fn writes(&self) -> bool {
        self.config.allow_writes
    }

    /// The submitted CSRF token matches (constant time).
    pub(crate) fn check_csrf(&self, submitted: Option<&str>) -> Result<(), PageError> {
        let ok = submitted.is_some_and(|s| bool::from(s.as_bytes().ct_eq(self.csrf.as_bytes())));
        if ok {
            Ok(())
        } else {
            Err(PageError::new(
                StatusCode::FORBIDDEN,
                "Refused: missing or wrong CSRF token",
                "This form did not carry the token of this dashboard process (it may come from \
                 another site, or from a page served before the dashboard restarted).",
                "Reload the page and submit the form again.",
            ))
        }
    }
}

pub(crate) type AppState = Arc<Shared>;

pub(crate) fn router(shared: AppState) -> Router {
    crate::rate::start(&shared);
    Router::new()
        .route("/", get(crate::queues::page))
        .route("/assets/dashboard.css", get(css))
        .route("/assets/dashboard.js", get(js))
        .route("/favicon.ico", get(favicon))
        .route("/assets/favicon.svg", get(favicon))
        .route("/dead-letters", get(crate::dlq::list))
        .route(
            "/dead-letters/replay",
            get(crate::dlq::confirm_replay).post(crate::dlq::replay_set),
        )
        .route(
            "/dead-letters/purge",
            get(crate::dlq::confirm_purge).post(crate::dlq::purge_set),
        )
        .route("/dead-letters/{id}", get(crate::dlq::show))
        .route(
            "/dead-letters/{id}/replay",
            get(crate::dlq::confirm_replay_one).post(crate::dlq::replay_one),
        )
        .route(
            "/dead-letters/{id}/purge",
            get(crate::dlq::confirm_purge_one).post(crate::dlq::purge_one),
        )
        .route("/relays", get(crate::relays::page))
        .route("/rows", get(crate::rows::page))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/dashboard.css"),
    )
}

/// The tab icon (browsers ask for `/favicon.ico` on their own).
async fn favicon() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        include_str!("../assets/favicon.svg"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/dashboard.js"),
    )
}

async fn not_found(State(s): State<AppState>, req: Request) -> Response {
    PageError::new(
        StatusCode::NOT_FOUND,
        "Page not found",
        &format!("There is no page at {}.", req.uri().path()),
        "Use the navigation above.",
    )
    .render(&s)
}

/// Authentication, then (for POST) the write switch and the Origin check;
/// then the security headers on every answer.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if s.config.loopback
        && let Err(e) = check_loopback_host(req.headers())
    {
        return e.render(&s);
    }
    if let Err(r) = authenticate(&s, req.headers()) {
        return r;
    }
    if req.method() == Method::POST {
        if !s.writes() {
            return PageError::new(
                StatusCode::FORBIDDEN,
                "Refused: this dashboard is read-only",
                "Replaying and purging dead letters change the database, and this dashboard was \
                 started without allow_writes.",
                "Restart it with --allow-writes (outbox serve) or Dashboard::allow_writes(true) \
                 to allow write actions.",
            )
            .render(&s);
        }
        if let Err(e) = check_origin(req.headers()) {
            return e.render(&s);
        }
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// 401 with `WWW-Authenticate` unless the request carries configured
/// credentials (none configured: everyone is let in).
#[allow(clippy::result_large_err)]
fn authenticate(s: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let (basic, bearer) = (&s.config.basic, &s.config.bearer);
    if basic.is_none() && bearer.is_none() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (scheme, value) = given.split_once(' ').unwrap_or((given, ""));
    let value = value.trim();
    let ok = if scheme.eq_ignore_ascii_case("basic") {
        basic.as_ref().is_some_and(|(user, pass)| {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .unwrap_or_default();
            let expected = format!("{user}:{pass}");
            bool::from(decoded.as_slice().ct_eq(expected.as_bytes()))
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        bearer
            .as_ref()
            .is_some_and(|t| bool::from(value.as_bytes().ct_eq(t.as_bytes())))
    } else {
        false
    };
    if ok {
        return Ok(());
    }
    let mut res = (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        if given.is_empty() {
            "401 Unauthorized: this dashboard requires authentication; send the configured \
             credentials (basic auth or Authorization: Bearer <token>)\n"
        } else {
            "401 Unauthorized: the credentials sent are wrong; check the user and password or \
             the bearer token the dashboard was started with\n"
        },
    )
        .into_response();
    if basic.is_some() {
        res.headers_mut().append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"outbox dashboard\", charset=\"UTF-8\""),
        );
    }
    if bearer.is_some() {
        res.headers_mut().append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"outbox dashboard\""),
        );
    }
    Err(res)
}

/// The host part of a `Host` header (`[::1]:8090` -> `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// On a loopback address, the `Host` header must name a loopback host.
fn check_loopback_host(headers: &HeaderMap) -> Result<(), PageError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host_name(host).to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    Err(PageError::new(
        StatusCode::FORBIDDEN,
        "Refused: this dashboard answers loopback host names only",
        &format!(
            "The request names the host {host:?}, but this dashboard listens on a loopback \
             address, where only localhost, 127.0.0.1 and [::1] are answered (so that no web \
             page can reach it through a host name of its own that resolves to 127.0.0.1)."
        ),
        "Open it as http://127.0.0.1:PORT/ or http://localhost:PORT/; behind a reverse proxy, \
         have the proxy send a loopback Host header, or listen on another address with \
         authentication.",
    ))
}

/// When the browser names the page's origin, it must be this host.
fn check_origin(headers: &HeaderMap) -> Result<(), PageError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(PageError::new(
        StatusCode::FORBIDDEN,
        "Refused: the form was sent from another origin",
        &format!(
            "The request's Origin is {origin:?}, but this dashboard is {host:?}: a page of \
             another site tried to submit this form."
        ),
        "Open the dashboard itself and submit the form from there.",
    ))
}

/// An error page: status, what went wrong, what to do.
#[derive(Debug)]
pub(crate) struct PageError {
    pub(crate) status: StatusCode,
    pub(crate) title: String,
    pub(crate) problem: String,
    pub(crate) fix: String,
}

impl PageError {
    pub(crate) fn new(status: StatusCode, title: &str, problem: &str, fix: &str) -> Self {
        Self {
            status,
            title: title.to_owned(),
            problem: problem.to_owned(),
            fix: fix.to_owned(),
        }
    }

    /// 400 for a bad value in the URL or form.
    pub(crate) fn bad_input(problem: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            title: "Bad request".to_owned(),
            problem: problem.into(),
            fix: "Correct the value and try again.".to_owned(),
        }
    }

    /// The page for an error of `outbox_core`: 503 when the database
    /// cannot be reached, 400 for a bad argument, 500 otherwise.
    pub(crate) fn core(e: outbox_core::Error) -> Self {
        if e.is_misuse() {
            return Self {
                status: StatusCode::BAD_REQUEST,
                title: "Bad request".to_owned(),
                problem: e.to_string(),
                fix: "Correct the filter or value and try again.".to_owned(),
            };
        }
        let db = e.as_database_error();
        let unreachable = db.is_some_and(|d| {
            matches!(
                d,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed
            )
        });
        if unreachable {
            tracing::warn!("outbox dashboard: PostgreSQL cannot be reached: {e}");
            return Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                title: "The database cannot be reached".to_owned(),
                problem: format!("PostgreSQL did not answer: {e}."),
                fix: "Check that PostgreSQL is running and reachable from the dashboard; reload \
                      this page once it is back."
                    .to_owned(),
            };
        }
        let code = db
            .and_then(sqlx::Error::as_database_error)
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        let fix = match code.as_deref() {
            Some("42P01") => {
                "A table is missing: create it with `outbox migrate`, or start the dashboard \
                 with the right --table / --schema / --dlq-table."
            }
            Some("57P01" | "57P02" | "57P03") => {
                "The database is shutting down or starting; reload this page in a moment."
            }
            _ => "Check the dashboard's log and PostgreSQL's log for details.",
        };
        let status = if matches!(code.as_deref(), Some("57P01" | "57P02" | "57P03")) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        tracing::warn!("outbox dashboard: {e}");
        Self {
            status,
            title: "The query failed".to_owned(),
            problem: e.to_string(),
            fix: fix.to_owned(),
        }
    }

    pub(crate) fn render(&self, s: &Shared) -> Response {
        let body: Markup = html! {
            (layout::flash(false, &self.problem))
            p.fix { strong { "What to do: " } (self.fix) }
        };
        (self.status, layout::page(s, Nav::None, &self.title, body)).into_response()
    }
}

/// A handler's result: a page, or an error page rendered with the state.
pub(crate) type PageResult = Result<Markup, PageError>;

/// Renders a handler's result.
pub(crate) fn respond(s: &Shared, r: PageResult) -> Response {
    match r {
        Ok(m) => m.into_response(),
        Err(e) => e.render(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(h).expect("header"));
        m
    }

    #[test]
    fn only_loopback_host_names_pass_the_loopback_check() {
        for ok in [
            "127.0.0.1:8090",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8090",
            "127.1.2.3",
            "a.localhost:80",
        ] {
            assert!(check_loopback_host(&host(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:8090",
            "10.0.0.1",
            "[::2]:80",
            "localhost.evil.example",
            "",
        ] {
            let e = check_loopback_host(&host(bad)).expect_err(bad);
            assert_eq!(e.status, StatusCode::FORBIDDEN);
        }
    }

    #[test]
    fn origins_must_name_this_host() {
        let mut h = host("127.0.0.1:8090");
        assert!(check_origin(&h).is_ok(), "no Origin header");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8090"),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(check_origin(&h).is_err());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9999"),
        );
        assert!(check_origin(&h).is_err());
    }
}
