//! The dead-letter pages: the filtered list, one dead letter, and replay
//! and purge (of one, or of the filtered set) through a confirmation page.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use maud::{Markup, html};
use outbox_core::ops::{DeadLetter, DlqFilter, ReplayReport};
use serde::Deserialize;

use crate::layout::{self, Nav};
use crate::render as payload;
use crate::web::{AppState, PageError, PageResult, Shared, respond};

/// The most dead letters one list page shows (the oldest first).
const LIST_LIMIT: u64 = 100;
/// Characters of a payload or exception shown in the list.
const CELL_CHARS: usize = 80;
/// The most payload bytes the detail page shows.
const DETAIL_BYTES: usize = 256 * 1024;
/// The reasons the engine writes (suggestions for the filter).
const REASONS: [&str; 3] = ["max_deliveries", "retry_terminal", "rejected"];

/// The filter as it comes from the query string or a form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FilterForm {
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    /// `yes` to select every dead letter (no criterion).
    #[serde(default)]
    all: Option<String>,
    /// The CSRF token (POST only).
    #[serde(default)]
    csrf: Option<String>,
}

/// A parsed filter and the values it was built from (absolute times).
#[derive(Debug)]
struct Selection {
    filter: DlqFilter,
    queue: Option<String>,
    reason: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    all: bool,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// RFC 3339, `YYYY-MM-DDTHH:MM[:SS]` (a browser's datetime-local, taken as
/// UTC) or a date (midnight UTC).
fn parse_time(field: &str, s: &str) -> Result<DateTime<Utc>, PageError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    Err(PageError::bad_input(format!(
        "{field} is {s:?}, which is not a time: expected RFC 3339 (2026-05-01T12:00:00Z), \
         2026-05-01T12:00 (UTC) or a date (2026-05-01, midnight UTC)"
    )))
}

impl FilterForm {
    fn selection(&self) -> Result<Selection, PageError> {
        let queue = nonempty(&self.queue);
        let reason = nonempty(&self.reason);
        let since = nonempty(&self.since)
            .map(|s| parse_time("since", &s))
            .transpose()?;
        let until = nonempty(&self.until)
            .map(|s| parse_time("until", &s))
            .transpose()?;
        let all = self.all.as_deref() == Some("yes");
        let mut filter = if all {
            DlqFilter::all()
        } else {
            DlqFilter::new()
        };
        if let Some(q) = &queue {
            filter = filter.queue(q.clone());
        }
        if let Some(r) = &reason {
            filter = filter.reason(r.clone());
        }
        if let Some(t) = since {
            filter = filter.since(t);
        }
        if let Some(t) = until {
            filter = filter.until(t);
        }
        Ok(Selection {
            filter,
            queue,
            reason,
            since,
            until,
            all,
        })
    }
}

impl Selection {
    /// The query string that reproduces this selection.
    fn query(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |k: &str, v: String| {
            parts.push(format!("{k}={}", encode(&v)));
        };
        if let Some(q) = &self.queue {
            add("queue", q.clone());
        }
        if let Some(r) = &self.reason {
            add("reason", r.clone());
        }
        if let Some(t) = self.since {
            add("since", t.to_rfc3339());
        }
        if let Some(t) = self.until {
            add("until", t.to_rfc3339());
        }
        if self.all {
            add("all", "yes".to_owned());
        }
        parts.join("&")
    }

    /// The criteria, for a person.
    fn describe(&self) -> Markup {
        html! {
            ul.criteria {
                @if let Some(q) = &self.queue { li { "queue = " code { (q) } } }
                @if let Some(r) = &self.reason { li { "reason = " code { (r) } } }
                @if let Some(t) = self.since { li { "failed at or after " (layout::time(t)) } }
                @if let Some(t) = self.until { li { "failed before " (layout::time(t)) } }
                @if self.filter.is_unrestricted() { li { strong { "every dead letter" } " (no filter)" } }
            }
        }
    }

    /// The selection as hidden form fields (absolute times, so that the
    /// POST touches what the confirmation page counted).
    fn hidden(&self) -> Markup {
        html! {
            @if let Some(q) = &self.queue { input type="hidden" name="queue" value=(q); }
            @if let Some(r) = &self.reason { input type="hidden" name="reason" value=(r); }
            @if let Some(t) = self.since { input type="hidden" name="since" value=(t.to_rfc3339()); }
            @if let Some(t) = self.until { input type="hidden" name="until" value=(t.to_rfc3339()); }
            @if self.all { input type="hidden" name="all" value="yes"; }
        }
    }
}

/// Percent-encoding of a query value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn require_dlq(s: &Shared) -> Result<(), PageError> {
    if s.broker().dlq().is_some() {
        return Ok(());
    }
    Err(PageError::new(
        StatusCode::NOT_FOUND,
        "No dead-letter table",
        "This dashboard was started without a dead-letter table, so there are no dead letters \
         to show.",
        "Start it with the dead-letter table: outbox serve --dlq-table NAME (the default is \
         <TABLE>_dlq; drop --no-dlq), or configure OutboxBroker::dead_letter_table.",
    ))
}

fn not_found(id: i64) -> PageError {
    PageError::new(
        StatusCode::NOT_FOUND,
        "No such dead letter",
        &format!("There is no dead letter with id {id}: it may have been replayed or purged."),
        "Go back to the list of dead letters.",
    )
}

// --- list ----------------------------------------------------------------------

pub(crate) async fn list(State(s): State<AppState>, Query(f): Query<FilterForm>) -> Response {
    respond(&s, list_page(&s, &f).await)
}

async fn list_page(s: &Shared, f: &FilterForm) -> PageResult {
    require_dlq(s)?;
    let sel = f.selection()?;
    let total = s
        .broker()
        .dlq_count(&sel.filter)
        .await
        .map_err(PageError::core)?;
    let rows = s
        .broker()
        .dlq_list(&sel.filter.clone().limit(LIST_LIMIT))
        .await
        .map_err(PageError::core)?;
    let q = sel.query();
    let body = html! {
        form.filter method="get" action="/dead-letters" {
            label { "Queue " input type="text" name="queue" value=[sel.queue.as_deref()]; }
            label { "Reason "
                input type="text" name="reason" list="reasons" value=[sel.reason.as_deref()];
                datalist id="reasons" { @for r in REASONS { option value=(r) {} } }
            }
            label { "Since " input type="text" name="since" placeholder="2026-05-01T12:00:00Z"
                value=[sel.since.map(|t| t.to_rfc3339())]; }
            label { "Until " input type="text" name="until" placeholder="2026-05-01"
                value=[sel.until.map(|t| t.to_rfc3339())]; }
            button type="submit" { "Filter" }
            a href="/dead-letters" { "Clear" }
        }
        p.summary {
            @if total == 0 {
                "No dead letter matches."
            } @else if u64::try_from(rows.len()).unwrap_or(u64::MAX) < total {
                "Showing the oldest " (rows.len()) " of " (total) " matching dead letters; narrow the filter to see others."
            } @else {
                (total) " matching dead letter" @if total != 1 { "s" } "."
            }
        }
        @if total > 0 {
            p.actions {
                a.button href={ "/dead-letters/replay?" (q) } data-action="replay" {
                    "Replay these " (total) "…"
                }
                " "
                a.button.danger href={ "/dead-letters/purge?" (q) } data-action="purge" {
                    "Purge these " (total) "…"
                }
            }
            table #dead-letters {
                thead { tr {
                    th { "id" } th { "was row" } th { "queue" } th { "reason" } th { "failed at" }
                    th { "deliveries" } th { "correlation id" } th { "payload" } th { "last exception" } th {}
                } }
                tbody {
                    @for d in &rows {
                        tr data-dlq-id=(d.id) {
                            td { a href={ "/dead-letters/" (d.id) } { (d.id) } }
                            td.num { (d.original_id) }
                            td { (d.queue) }
                            td { (d.failure_reason) }
                            td.time { (layout::time(d.failed_at)) }
                            td.num { (d.deliveries_count) }
                            td.mono { (d.correlation_id()) }
                            td.mono.payload { (payload::truncate(&payload::body_line(&d.payload, d.content_type()), CELL_CHARS)) }
                            td.exception { (d.last_exception.as_deref().map_or_else(|| "-".to_owned(), |e| payload::truncate(e, CELL_CHARS))) }
                            td.row-actions {
                                a href={ "/dead-letters/" (d.id) "/replay" } data-action="replay" { "replay" }
                                " "
                                a href={ "/dead-letters/" (d.id) "/purge" } data-action="purge" { "purge" }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(s, Nav::DeadLetters, "Dead letters", body))
}

// --- one dead letter -------------------------------------------------------------

pub(crate) async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    respond(&s, show_page(&s, &id).await)
}

fn parse_id(id: &str) -> Result<i64, PageError> {
    id.parse().map_err(|_| {
        PageError::bad_input(format!(
            "{id:?} is not a dead-letter id: ids are whole numbers (the id column of the list)"
        ))
    })
}

async fn fetch(s: &Shared, id: i64) -> Result<DeadLetter, PageError> {
    require_dlq(s)?;
    s.broker()
        .dlq_get(id)
        .await
        .map_err(PageError::core)?
        .ok_or_else(|| not_found(id))
}

fn details(d: &DeadLetter) -> Markup {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    html! {
        table.fields {
            tr { th { "id" } td { (d.id) } }
            tr { th { "was outbox row" } td { (d.original_id) } }
            tr { th { "queue" } td { (d.queue) } }
            tr { th { "failure reason" } td { (d.failure_reason) } }
            tr { th { "failed at" } td { (layout::time(d.failed_at)) } }
            tr { th { "created at" } td { (layout::time(d.created_at)) } }
            tr { th { "deliveries" } td { (d.deliveries_count) } }
            tr { th { "timer id" } td { (opt(&d.timer_id)) } }
            tr { th { "ordering key" } td { (opt(&d.ordering_key)) } }
            tr { th { "correlation id" } td.mono { (d.correlation_id()) } }
            tr { th { "content type" } td { (d.content_type().unwrap_or("(none)")) } }
        }
    }
}

async fn show_page(s: &Shared, id: &str) -> PageResult {
    let id = parse_id(id)?;
    let d = fetch(s, id).await?;
    let body = html! {
        (details(&d))
        h2 { "Headers" }
        @if d.headers.is_empty() {
            p { "(none)" }
        } @else {
            table.headers {
                @for (k, v) in &d.headers {
                    tr { th.mono { (k) } td.mono { (v) } }
                }
            }
        }
        h2 { "Payload" }
        @if d.payload.len() > DETAIL_BYTES {
            p.note {
                "The payload has " (d.payload.len()) " bytes; the first " (DETAIL_BYTES)
                " are shown. All of it: " code { "outbox dlq show " (d.id) " --json" } "."
            }
            pre.payload { (payload::head_text(&d.payload, DETAIL_BYTES)) }
        } @else {
            pre.payload { (payload::body_text(&d.payload, d.content_type())) }
        }
        h2 { "Last exception" }
        pre.exception { (d.last_exception.as_deref().unwrap_or("(none recorded)")) }
        p.actions {
            a.button href={ "/dead-letters/" (d.id) "/replay" } data-action="replay" { "Replay…" }
            " "
            a.button.danger href={ "/dead-letters/" (d.id) "/purge" } data-action="purge" { "Purge…" }
        }
    };
    Ok(layout::page(
        s,
        Nav::DeadLetters,
        &format!("Dead letter {}", d.id),
        body,
    ))
}

// --- replay / purge of one ------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Replay,
    Purge,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::Purge => "purge",
        }
    }
}

pub(crate) async fn confirm_replay_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    respond(&s, confirm_one(&s, &id, Action::Replay).await)
}

pub(crate) async fn confirm_purge_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    respond(&s, confirm_one(&s, &id, Action::Purge).await)
}

async fn confirm_one(s: &Shared, id: &str, action: Action) -> PageResult {
    let id = parse_id(id)?;
    let d = fetch(s, id).await?;
    let what = match action {
        Action::Replay => format!(
            "Replaying puts dead letter {id} back into {} as a new row of queue {:?} (same \
             payload and headers, fresh attempts), and removes it from the dead-letter table.",
            s.broker().table().qualified_name(),
            d.queue
        ),
        Action::Purge => format!("Purging deletes dead letter {id} for good."),
    };
    let body = html! {
        p { (what) }
        (details(&d))
        (layout::read_only_note(s))
        form method="post" action={ "/dead-letters/" (id) "/" (action.verb()) } {
            (layout::csrf(s))
            button type="submit" data-action="confirm"
                class=(if action == Action::Purge { "danger" } else { "" }) {
                @if action == Action::Replay { "Replay dead letter " (id) } @else { "Purge dead letter " (id) }
            }
            " "
            a href={ "/dead-letters/" (id) } { "Cancel" }
        }
    };
    let title = match action {
        Action::Replay => format!("Replay dead letter {id}?"),
        Action::Purge => format!("Purge dead letter {id}?"),
    };
    Ok(layout::page(s, Nav::DeadLetters, &title, body))
}

/// The POST body of a one-row action: only the CSRF token.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// A form body, or the page saying why it could not be read.
type FormBody<T> = Result<Form<T>, FormRejection>;

fn read_form<T>(form: FormBody<T>) -> Result<T, PageError> {
    form.map(|Form(f)| f).map_err(|e| {
        PageError::bad_input(format!(
            "the form could not be read ({e}); submit it from the dashboard's own page"
        ))
    })
}

pub(crate) async fn replay_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
    form: FormBody<TokenForm>,
) -> Response {
    respond(&s, act_one(&s, &id, form, Action::Replay).await)
}

pub(crate) async fn purge_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
    form: FormBody<TokenForm>,
) -> Response {
    respond(&s, act_one(&s, &id, form, Action::Purge).await)
}

async fn act_one(s: &Shared, id: &str, form: FormBody<TokenForm>, action: Action) -> PageResult {
    let form = read_form(form)?;
    s.check_csrf(form.csrf.as_deref())?;
    let id = parse_id(id)?;
    require_dlq(s)?;
    let filter = DlqFilter::new().ids([id]);
    let b = s.broker();
    let (ok, message) = match action {
        Action::Replay => {
            let r = b.dlq_replay(&filter).await.map_err(PageError::core)?;
            if r.replayed.is_empty() && r.skipped.is_empty() {
                return Err(not_found(id));
            }
            replay_message(s, &r)
        }
        Action::Purge => {
            let n = b.dlq_purge(&filter).await.map_err(PageError::core)?;
            if n == 0 {
                return Err(not_found(id));
            }
            (true, format!("Dead letter {id} was purged."))
        }
    };
    let body = html! {
        (layout::flash(ok, &message))
        p { a href="/dead-letters" { "Back to the dead letters" } }
    };
    let title = if ok { "Done" } else { "Nothing done" };
    Ok(layout::page(s, Nav::DeadLetters, title, body))
}

/// The flash of a replay: ok when nothing was skipped.
fn replay_message(s: &Shared, r: &ReplayReport) -> (bool, String) {
    let table = s.broker().table().qualified_name();
    let mut msg = match r.replayed.as_slice() {
        [one] => format!(
            "Dead letter {} was replayed into {table}{}.",
            one.dead_letter_id,
            one.new_id
                .map(|id| format!(" as row {id}"))
                .unwrap_or_default()
        ),
        many => format!("{} dead letters were replayed into {table}.", many.len()),
    };
    if !r.skipped.is_empty() {
        let ids: Vec<String> = r
            .skipped
            .iter()
            .take(20)
            .map(|x| format!("{} ({})", x.dead_letter_id, x.reason))
            .collect();
        msg.push_str(&format!(
            " {} skipped and left in place: {}{}. A live outbox row has the same (queue, \
             timer id): replay them once it is gone, or with `outbox dlq replay \
             --drop-timer-ids`.",
            r.skipped.len(),
            ids.join(", "),
            if r.skipped.len() > 20 { ", …" } else { "" }
        ));
    }
    (r.skipped.is_empty(), msg)
}

// --- replay / purge of the filtered set -----------------------------------------------

pub(crate) async fn confirm_replay(
    State(s): State<AppState>,
    Query(f): Query<FilterForm>,
) -> Response {
    respond(&s, confirm_set(&s, &f, Action::Replay).await)
}

pub(crate) async fn confirm_purge(
    State(s): State<AppState>,
    Query(f): Query<FilterForm>,
) -> Response {
    respond(&s, confirm_set(&s, &f, Action::Purge).await)
}

async fn confirm_set(s: &Shared, f: &FilterForm, action: Action) -> PageResult {
    require_dlq(s)?;
    let sel = f.selection()?;
    let verb = action.verb();
    let title = match action {
        Action::Replay => "Replay dead letters?",
        Action::Purge => "Purge dead letters?",
    };
    if sel.filter.is_unrestricted() && !sel.all {
        let body = html! {
            (layout::flash(false, &format!(
                "No filter given: this would {verb} every dead letter."
            )))
            p {
                "Choose a queue, reason or time range on the "
                a href="/dead-letters" { "dead letters page" } ", or, to " (verb)
                " every dead letter, "
                a href={ "/dead-letters/" (verb) "?all=yes" } data-action=(verb) { "confirm that you mean all of them" } "."
            }
        };
        return Ok(layout::page(s, Nav::DeadLetters, title, body));
    }
    let n = s
        .broker()
        .dlq_count(&sel.filter)
        .await
        .map_err(PageError::core)?;
    let what = match action {
        Action::Replay => format!(
            "Replaying puts these {n} dead letter(s) back into {} (same queue, payload and \
             headers, fresh attempts) and removes them from the dead-letter table, batch by batch.",
            s.broker().table().qualified_name()
        ),
        Action::Purge => format!("Purging deletes these {n} dead letter(s) for good."),
    };
    let body = html! {
        p { "Dead letters matching:" }
        (sel.describe())
        p.count { strong { (n) } " dead letter(s) match now." }
        @if n == 0 {
            p { "Nothing to " (verb) ". " a href={ "/dead-letters?" (sel.query()) } { "Back to the list" } }
        } @else {
            p { (what) }
            (layout::read_only_note(s))
            form method="post" action={ "/dead-letters/" (verb) } {
                (sel.hidden())
                (layout::csrf(s))
                button type="submit" data-action="confirm"
                    class=(if action == Action::Purge { "danger" } else { "" }) {
                    @if action == Action::Replay { "Replay " (n) " dead letter(s)" } @else { "Purge " (n) " dead letter(s)" }
                }
                " "
                a href={ "/dead-letters?" (sel.query()) } { "Cancel" }
            }
        }
    };
    Ok(layout::page(s, Nav::DeadLetters, title, body))
}

pub(crate) async fn replay_set(State(s): State<AppState>, form: FormBody<FilterForm>) -> Response {
    respond(&s, act_set(&s, form, Action::Replay).await)
}

pub(crate) async fn purge_set(State(s): State<AppState>, form: FormBody<FilterForm>) -> Response {
    respond(&s, act_set(&s, form, Action::Purge).await)
}

async fn act_set(s: &Shared, form: FormBody<FilterForm>, action: Action) -> PageResult {
    let form = read_form(form)?;
    let f = &form;
    s.check_csrf(f.csrf.as_deref())?;
    require_dlq(s)?;
    let sel = f.selection()?;
    if sel.filter.is_unrestricted() && !sel.all {
        return Err(PageError::bad_input(format!(
            "refusing to {} every dead letter without a filter: give a queue, reason, since or \
             until, or send all=yes to mean every dead letter",
            action.verb()
        )));
    }
    let b = s.broker();
    let (ok, message) = match action {
        Action::Replay => {
            let r = b.dlq_replay(&sel.filter).await.map_err(PageError::core)?;
            if r.replayed.is_empty() && r.skipped.is_empty() {
                (
                    true,
                    "No dead letter matched; nothing was replayed.".to_owned(),
                )
            } else {
                replay_message(s, &r)
            }
        }
        Action::Purge => {
            let n = b.dlq_purge(&sel.filter).await.map_err(PageError::core)?;
            (true, format!("{n} dead letter(s) were purged."))
        }
    };
    let body = html! {
        (layout::flash(ok, &message))
        (sel.describe())
        p { a href="/dead-letters" { "Back to the dead letters" } }
    };
    let title = if ok { "Done" } else { "Partly done" };
    Ok(layout::page(s, Nav::DeadLetters, title, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_accept_rfc3339_datetime_local_and_dates() {
        let t = parse_time("since", "2026-05-01T12:00:00+02:00").expect("rfc3339");
        assert_eq!(t.to_rfc3339(), "2026-05-01T10:00:00+00:00");
        let t = parse_time("since", "2026-05-01T12:30").expect("local");
        assert_eq!(t.to_rfc3339(), "2026-05-01T12:30:00+00:00");
        let t = parse_time("since", "2026-05-01").expect("date");
        assert_eq!(t.to_rfc3339(), "2026-05-01T00:00:00+00:00");
        let e = parse_time("until", "yesterday").expect_err("bad");
        assert!(
            e.problem.contains("until is \"yesterday\""),
            "{}",
            e.problem
        );
    }

    #[test]
    fn selections_round_trip_through_their_query() {
        let f = FilterForm {
            queue: Some("a b&c".into()),
            since: Some("2026-05-01".into()),
            reason: Some(" ".into()),
            ..FilterForm::default()
        };
        let sel = f.selection().expect("valid");
        assert_eq!(
            sel.query(),
            "queue=a%20b%26c&since=2026-05-01T00%3A00%3A00%2B00%3A00"
        );
        assert!(!sel.filter.is_unrestricted());
        let empty = FilterForm::default().selection().expect("valid");
        assert!(empty.filter.is_unrestricted() && !empty.all);
    }
}
