//! The rows page: an outbox row (and its dead letters) by id, a dead letter
//! by its id, or both by correlation id.

use axum::extract::{Query, State};
use axum::response::Response;
use maud::{Markup, html};
use outbox_core::envelope::CONTENT_TYPE;
use outbox_core::ops::{RowLookup, RowState, RowView};
use serde::Deserialize;

use crate::layout::{self, Nav};
use crate::render as payload;
use crate::web::{AppState, PageError, PageResult, Shared, respond};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RowsQuery {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    dead_letter_id: Option<String>,
}

pub(crate) async fn page(State(s): State<AppState>, Query(q): Query<RowsQuery>) -> Response {
    respond(&s, render(&s, &q).await)
}

fn lookup(q: &RowsQuery) -> Result<Option<RowLookup>, PageError> {
    let given = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (id, dl, cid) = (
        given(&q.id),
        given(&q.dead_letter_id),
        given(&q.correlation_id),
    );
    let number = |field: &str, v: &str| {
        v.parse::<i64>().map_err(|_| {
            PageError::bad_input(format!(
                "{field} {v:?} is not a row id: ids are whole numbers (search by correlation \
                 id for anything else)"
            ))
        })
    };
    match (id, dl, cid) {
        (None, None, None) => Ok(None),
        (Some(id), None, None) => Ok(Some(RowLookup::Id(number("id", &id)?))),
        (None, Some(dl), None) => Ok(Some(RowLookup::DeadLetterId(number(
            "dead_letter_id",
            &dl,
        )?))),
        (None, None, Some(c)) => Ok(Some(RowLookup::CorrelationId(c))),
        _ => Err(PageError::bad_input(
            "give one of id, dead_letter_id or correlation_id, not several",
        )),
    }
}

async fn render(s: &Shared, q: &RowsQuery) -> PageResult {
    let what = lookup(q)?;
    let rows = match &what {
        Some(l) => Some(s.broker().find_rows(l).await.map_err(PageError::core)?),
        None => None,
    };
    let body = html! {
        form.filter method="get" action="/rows" {
            label { "Outbox row id " input type="text" name="id" inputmode="numeric" value=[q.id.as_deref()]; }
            " or "
            label { "Dead-letter id " input type="text" name="dead_letter_id" inputmode="numeric" value=[q.dead_letter_id.as_deref()]; }
            " or "
            label { "Correlation id " input type="text" name="correlation_id" size="40" value=[q.correlation_id.as_deref()]; }
            button type="submit" { "Find" }
        }
        @if let Some(rows) = &rows {
            @if rows.is_empty() {
                p.summary { "Nothing found: no outbox row or dead letter matches. A row that was relayed is deleted from the outbox." }
            } @else {
                p.summary { (rows.len()) " found." }
                @for r in rows {
                    section.row {
                        (row_view(r))
                    }
                }
            }
        }
    };
    Ok(layout::page(s, Nav::Rows, "Rows", body))
}

fn row_view(r: &RowView) -> Markup {
    let content_type = r.headers.get(CONTENT_TYPE).map(String::as_str);
    let time =
        |t: Option<chrono::DateTime<chrono::Utc>>| t.map_or_else(|| "-".to_owned(), layout::time);
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let dead = r.state == RowState::DeadLetter;
    html! {
        h2 {
            @if dead {
                a href={ "/dead-letters/" (r.id) } { "Dead letter " (r.id) }
            } @else {
                "Outbox row " (r.id)
            }
            " · " span.state data-state=(r.state.as_str()) { (r.state.as_str()) }
        }
        table.fields data-row-id=(r.id) data-state=(r.state.as_str()) {
            tr { th { "queue" } td { (r.queue) } }
            @if let Some(o) = r.original_id { tr { th { "was outbox row" } td { (o) } } }
            tr { th { "correlation id" } td.mono { (r.correlation_id) } }
            tr { th { "created at" } td { (layout::time(r.created_at)) } }
            @if !dead {
                tr { th { "next attempt at" } td { (time(r.next_attempt_at)) } }
                tr { th { "attempts" } td { (r.attempts_count.map_or_else(|| "-".to_owned(), |n| n.to_string())) } }
                tr { th { "first / last attempt" } td { (time(r.first_attempt_at)) " / " (time(r.last_attempt_at)) } }
                tr { th { "leased since" } td { (time(r.acquired_at)) } }
            }
            tr { th { "deliveries" } td { (r.deliveries_count) } }
            @if dead {
                tr { th { "failed at" } td { (time(r.failed_at)) } }
                tr { th { "failure reason" } td { (opt(&r.failure_reason)) } }
            }
            tr { th { "timer id" } td { (opt(&r.timer_id)) } }
            tr { th { "ordering key" } td { (opt(&r.ordering_key)) } }
        }
        h3 { "Headers" }
        table.headers {
            @for (k, v) in &r.headers { tr { th.mono { (k) } td.mono { (v) } } }
        }
        h3 { "Payload (" (r.payload_len) " bytes)" }
        @if r.payload_truncated {
            p.note { "Only the first " (r.payload.len()) " bytes are shown." }
        }
        pre.payload { (payload::body_text(&r.payload, content_type)) }
        @if let Some(e) = &r.last_exception {
            h3 { "Last exception" }
            pre.exception { (e) }
        }
    }
}
