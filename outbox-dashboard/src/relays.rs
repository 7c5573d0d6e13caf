//! The relays page: the engines' PostgreSQL connections and, embedded in
//! an App, its subscribers and LISTEN connection.

use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};
use outbox_core::health::{ListenState, LoopState};
use outbox_core::ops::RelayConnection;

use crate::layout::{self, Nav};
use crate::web::{AppState, PageError, PageResult, Shared, respond};

pub(crate) async fn page(State(s): State<AppState>) -> Response {
    respond(&s, render(&s).await)
}

async fn render(s: &Shared) -> PageResult {
    let app = match &s.config.app {
        Some(handle) => Some(app_section(handle).await),
        None => None,
    };
    let conns = s.broker().connections().await.map_err(PageError::core)?;
    let (engines, others): (Vec<_>, Vec<_>) = conns.into_iter().partition(|c| c.role.is_some());
    let body = html! {
        @if let Some(app) = app { (app) }
        (section(
            "Engine connections (this database)",
            "Sessions whose application_name marks an outbox engine's loop (…-fetch, …-worker, …-listen, …-acker), from pg_stat_activity.",
            "connections",
            &engines,
            "No outbox engine is connected to this database.",
        ))
        (section(
            "Other sessions on the outbox table",
            "Sessions without an engine's name whose current or last statement names the outbox table: faststream-outbox relays (their LISTEN), producers, operators, this dashboard's own queries.",
            "other-sessions",
            &others,
            "None.",
        ))
    };
    Ok(layout::page(s, Nav::Relays, "Relays", body))
}

/// A heading, its note, and the table `id` of `conns` (or `empty` when
/// there are none).
fn section(title: &str, note: &str, id: &str, conns: &[RelayConnection], empty: &str) -> Markup {
    html! {
        h2 { (title) }
        p.note { (note) }
        @if conns.is_empty() {
            p { (empty) }
        } @else {
            (connections(id, conns))
        }
    }
}

fn connections(id: &str, conns: &[RelayConnection]) -> Markup {
    html! {
        table id=(id) {
            thead { tr {
                th { "pid" } th { "application" } th { "role" } th { "client" } th { "connected since" }
                th { "state" } th { "wait event" } th { "LISTEN" } th { "last statement" }
            } }
            tbody {
                @for c in conns {
                    tr data-pid=(c.pid) {
                        td.num { (c.pid) }
                        td.mono { (c.application_name) }
                        td { (c.role.as_deref().unwrap_or("-")) }
                        td.mono { (c.client_addr.as_deref().unwrap_or("local")) }
                        td.time { (c.backend_start.map(layout::time).unwrap_or_default()) }
                        td { (c.state.as_deref().unwrap_or("-")) }
                        td {
                            (c.wait_event_type.as_deref().unwrap_or("-"))
                            @if let Some(w) = &c.wait_event { " / " (w) }
                        }
                        td { @if c.is_listen { "yes" @if let Some(ch) = &c.listen_channel { " (" code { (ch) } ")" } } }
                        td.mono { (crate::render::truncate(&c.query, 120)) }
                    }
                }
            }
        }
    }
}

/// The App's own engine: subscribers, LISTEN, database.
async fn app_section(handle: &outbox_core::AppHandle) -> Markup {
    let report = handle.health().await;
    html! {
        h2 { "This application" }
        p {
            "live: " strong { (report.live) } " · ready: " strong { (report.ready) }
            @if report.stopping { " · " strong { "stopping" } }
        }
        @for p in report.problems() {
            (layout::flash(false, &p))
        }
        @match &report.engine {
            None => p { "The engine is not running." },
            Some(e) => {
                p {
                    "LISTEN connection: " strong { (e.listen.state.as_str()) }
                    @if let Some(pid) = e.listen.backend_pid { " (backend pid " (pid) ")" }
                    @if e.listen.state != ListenState::Connected {
                        @if let Some(err) = &e.listen.error { " · " (err) }
                    }
                    " · reconnects: " (e.listen.reconnects)
                }
                table #subscribers {
                    thead { tr {
                        th { "subscriber" } th { "queues" } th { "claim mode" } th { "state" } th { "loops" }
                    } }
                    tbody {
                        @for sub in &e.subscribers {
                            tr data-subscriber=(sub.name) {
                                td { (sub.name) }
                                td { (sub.queues.join(", ")) }
                                td { (format!("{:?}", sub.claim_mode).to_lowercase()) }
                                td class=(if sub.state == LoopState::Running { "ok" } else { "bad" }) { (sub.state.as_str()) }
                                td.num { (sub.loops_running) " / " (sub.loops_total) }
                            }
                        }
                    }
                }
            }
        }
    }
}
