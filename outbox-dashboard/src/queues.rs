//! The queues page (`/`): a table of every queue and the relay-rate chart.

use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};

use crate::layout::{self, Nav};
use crate::web::{AppState, PageError, PageResult, Shared, respond};

/// One queue, as shown (counts already formatted).
#[derive(Debug)]
pub(crate) struct QueueLine {
    pub(crate) queue: String,
    pub(crate) ready: String,
    pub(crate) scheduled: String,
    pub(crate) leased: String,
    pub(crate) retrying: String,
    pub(crate) dead_letters: String,
    pub(crate) oldest_ready_age: String,
    pub(crate) oldest_lease_age: String,
    /// Whether the queue has dead letters (links to them).
    pub(crate) has_dead_letters: bool,
}

/// Every queue of both tables, sorted by name.
async fn load(s: &Shared) -> Result<Vec<QueueLine>, PageError> {
    let opts = outbox_core::ops::OverviewOptions::new();
    let queues = s.broker().overview(&opts).await.map_err(PageError::core)?;
    let has_dlq = s.broker().dlq().is_some();
    Ok(queues
        .into_iter()
        .map(|q| QueueLine {
            has_dead_letters: has_dlq
                && !matches!(q.dead_letters, outbox_core::ops::Count::Exact(0)),
            dead_letters: if has_dlq {
                q.dead_letters.to_string()
            } else {
                "-".to_owned()
            },
            queue: q.queue,
            ready: q.ready.to_string(),
            scheduled: q.scheduled.to_string(),
            leased: q.leased.to_string(),
            retrying: q.retrying.to_string(),
            oldest_ready_age: layout::opt_age(q.oldest_ready_age),
            oldest_lease_age: layout::opt_age(q.oldest_lease_age),
        })
        .collect())
}

pub(crate) async fn page(State(s): State<AppState>) -> Response {
    respond(&s, render(&s).await)
}

fn queue_link(q: &str) -> String {
    format!("/dead-letters?queue={}", crate::dlq::encode(q))
}

async fn render(s: &Shared) -> PageResult {
    let lines = load(s).await?;
    let body = html! {
        p.refresh {
            "Updated " span #updated { (layout::time(chrono::Utc::now())) }
            " · refreshes every " (s.config.refresh.as_secs()) " s · "
            a href="/" data-action="refresh" { "Refresh" }
        }
        (table(&lines))
        h2 { "Relay rate" }
        (crate::rate::chart(&s.sampler))
    };
    Ok(layout::page(s, Nav::Queues, "Queues", body))
}

fn table(lines: &[QueueLine]) -> Markup {
    html! {
        table #queues {
            thead { tr {
                th { "queue" }
                th.num title="due now, not leased" { "ready" }
                th.num title="due later" { "scheduled" }
                th.num title="claimed by a relay" { "leased" }
                th.num title="not leased, failed before (attempts > 0)" { "retrying" }
                th.num { "dead letters" }
                th.num title="age of the oldest ready row: the relay lag" { "oldest ready" }
                th.num title="age of the oldest lease" { "oldest lease" }
            } }
            tbody {
                @if lines.is_empty() {
                    tr.empty { td colspan="8" { "No queue has rows." } }
                }
                @for q in lines {
                    tr data-queue=(q.queue) {
                        th.queue scope="row" { (q.queue) }
                        td.num data-field="ready" { (q.ready) }
                        td.num data-field="scheduled" { (q.scheduled) }
                        td.num data-field="leased" { (q.leased) }
                        td.num data-field="retrying" { (q.retrying) }
                        td.num data-field="dead_letters" {
                            @if q.has_dead_letters {
                                a href=(queue_link(&q.queue)) { (q.dead_letters) }
                            } @else {
                                (q.dead_letters)
                            }
                        }
                        td.num data-field="oldest_ready_age" { (q.oldest_ready_age) }
                        td.num data-field="oldest_lease_age" { (q.oldest_lease_age) }
                    }
                }
            }
        }
    }
}
