//! The page shell (head, navigation, footer) and small rendering helpers.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::web::{CSRF_FIELD, Shared};

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Queues,
    DeadLetters,
    Relays,
    Rows,
    None,
}

/// A whole page.
pub(crate) fn page(s: &Shared, nav: Nav, title: &str, body: Markup) -> Markup {
    let b = s.broker();
    let tables = match b.dlq() {
        Some(d) => format!("{} · {}", b.table().qualified_name(), d.qualified_name()),
        None => b.table().qualified_name(),
    };
    let entry = |n: Nav, href: &str, label: &str| {
        html! {
            @if n == nav {
                a href=(href) aria-current="page" { (label) }
            } @else {
                a href=(href) { (label) }
            }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · outbox" }
                link rel="stylesheet" href="/assets/dashboard.css";
                link rel="icon" type="image/svg+xml" href="/assets/favicon.svg";
                script src="/assets/dashboard.js" defer {}
            }
            body data-refresh-ms=(s.config.refresh.as_millis()) {
                header {
                    span.brand { "outbox" }
                    nav {
                        (entry(Nav::Queues, "/", "Queues"))
                        (entry(Nav::DeadLetters, "/dead-letters", "Dead letters"))
                        (entry(Nav::Relays, "/relays", "Relays"))
                        (entry(Nav::Rows, "/rows", "Rows"))
                    }
                    span.tables title="outbox table · dead-letter table" { (tables) }
                    @if s.writes() {
                        span.mode.writes { "writes allowed" }
                    } @else {
                        span.mode { "read-only" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// `<div class="flash" data-flash="ok|error">TEXT</div>`.
pub(crate) fn flash(ok: bool, text: &str) -> Markup {
    html! {
        div.flash data-flash=(if ok { "ok" } else { "error" }) { (text) }
    }
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf(s: &Shared) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(s.csrf); }
}

/// A note shown above write forms when writes are off.
pub(crate) fn read_only_note(s: &Shared) -> Markup {
    html! {
        @if !s.writes() {
            p.note {
                "This dashboard is read-only: the buttons below will be refused. Start it with "
                code { "--allow-writes" } " (or " code { "Dashboard::allow_writes(true)" } ") to replay or purge."
            }
        }
    }
}

/// `2026-05-01 12:00:00Z`.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
        .replace('T', " ")
}

pub(crate) use crate::render::age;

/// An optional age, `-` when absent.
pub(crate) fn opt_age(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_ages_show_a_dash() {
        assert_eq!(opt_age(Some(Duration::from_secs(184))), "3m04s");
        assert_eq!(opt_age(None), "-");
    }

    #[test]
    fn flashes_carry_their_kind_and_escape_their_text() {
        let m = flash(false, "<b>").into_string();
        assert_eq!(
            m,
            r#"<div class="flash" data-flash="error">&lt;b&gt;</div>"#
        );
    }
}
