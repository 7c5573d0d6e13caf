//! Subjects and streams: NATS's publish-subject rules ([`check_subject`]),
//! JetStream's stream-name rules, creating a stream that captures the
//! destination subjects ([`ensure_stream`]), and the stream a startup error
//! suggests for a subject no stream captures ([`suggested_stream`]).

use async_nats::jetstream::{self, stream};

use crate::config::Settings;
use crate::error::{Error, Result};

/// The longest subject accepted (the server's default `max_control_line` is
/// 4 KiB for the whole `HPUB` line).
const MAX_SUBJECT_LEN: usize = 2048;

/// NATS's rules for a subject one publishes to: not empty, no whitespace or
/// control characters, no empty token (leading, trailing or doubled `.`),
/// no wildcard token (`*`, `>`), at most 2048 bytes.
pub(crate) fn check_subject(subject: &str) -> std::result::Result<(), String> {
    if subject.is_empty() {
        return Err("the subject is empty".to_owned());
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "the subject is {} bytes long; at most {MAX_SUBJECT_LEN}",
            subject.len()
        ));
    }
    if let Some(bad) = subject
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "the subject contains {bad:?}; NATS subjects have no whitespace or control characters"
        ));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(
                "the subject has an empty token (a leading, trailing or doubled '.')".to_owned(),
            );
        }
        if token == "*" || token == ">" {
            return Err(format!(
                "the subject has the wildcard token '{token}'; one publishes to a concrete \
                 subject (wildcards are for subscriptions and stream subjects)"
            ));
        }
    }
    Ok(())
}

/// JetStream's rules for a stream name: not empty, no whitespace, `.`, `*`,
/// `>`, path separators or control characters.
pub(crate) fn check_stream_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the stream name is empty".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "the stream name contains {bad:?}; JetStream stream names have no whitespace, '.', \
             '*', '>', '/' or '\\'"
        ));
    }
    Ok(())
}

/// A stream subject may hold wildcards (`orders.>`), but no empty token or
/// whitespace.
fn check_stream_subject(subject: &str) -> std::result::Result<(), String> {
    if subject.is_empty() || subject.split('.').any(str::is_empty) {
        return Err(format!("the stream subject {subject:?} has an empty token"));
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the stream subject {subject:?} contains whitespace or control characters"
        ));
    }
    Ok(())
}

/// The `(stream name, stream subject)` a startup error suggests for a
/// subject no stream captures: the subject's first token, upper-cased, and
/// everything under it (`orders.created` -> `("ORDERS", "orders.>")`); a
/// one-token subject is captured as it is (`orders` -> `("ORDERS",
/// "orders")`). Characters a stream name cannot hold become `_`.
pub(crate) fn suggested_stream(subject: &str) -> (String, String) {
    let (first, rest) = subject.split_once('.').unwrap_or((subject, ""));
    let name: String = first
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let captured = if rest.is_empty() {
        subject.to_owned()
    } else {
        format!("{first}.>")
    };
    (name, captured)
}

/// Creates the stream `name` capturing `subjects` unless a stream of that
/// name exists (`true` when this call created it): the body of
/// [`NatsBroker::ensure_stream`](crate::NatsBroker::ensure_stream), which
/// documents the configuration and the checks.
pub(crate) async fn ensure_stream(
    settings: &Settings,
    name: &str,
    subjects: Vec<String>,
) -> Result<bool> {
    let fail = |reason: String, source: Option<crate::error::Source>| Error::Stream {
        stream: name.to_owned(),
        reason,
        source,
    };
    check_stream_name(name).map_err(|r| fail(r, None))?;
    if subjects.is_empty() {
        return Err(fail("no subjects given".to_owned(), None));
    }
    for s in &subjects {
        check_stream_subject(s).map_err(|r| fail(r, None))?;
    }
    settings.check()?;
    let addrs = settings.server_addrs()?;
    let opts = settings.connect_options().await?;
    let timeout = settings.connect_timeout;
    let client = match tokio::time::timeout(timeout, opts.connect(addrs)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(Error::Unreachable {
                transport: settings.name.clone(),
                url: settings.redacted_url(),
                timeout,
                source: Box::new(e),
            });
        }
        Err(elapsed) => {
            return Err(Error::Unreachable {
                transport: settings.name.clone(),
                url: settings.redacted_url(),
                timeout,
                source: Box::new(elapsed),
            });
        }
    };
    let js = jetstream::new(client.clone());
    let result = create(&js, name, subjects).await;
    let _ = tokio::time::timeout(timeout, client.drain()).await;
    let created = result.map_err(|(reason, source)| fail(reason, source))?;
    if created {
        tracing::info!(transport = %settings.name, stream = name, "created JetStream stream");
    }
    Ok(created)
}

async fn create(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
) -> std::result::Result<bool, (String, Option<crate::error::Source>)> {
    match js.get_stream(name).await {
        Ok(_) => return Ok(false),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
            _ => {
                return Err((
                    "looking it up failed (is JetStream enabled on the server: nats-server -js?)"
                        .to_owned(),
                    Some(Box::new(e)),
                ));
            }
        },
    }
    let config = stream::Config {
        name: name.to_owned(),
        subjects,
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            jetstream::context::CreateStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
            {
                Ok(false)
            }
            _ => Err((
                "creating it failed (another stream may already capture one of its subjects)"
                    .to_owned(),
                Some(Box::new(e)),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_subjects_follow_nats_rules() {
        for ok in ["orders.created", "a", "a.b-c_d.9", "$JS.x", "a*b.c"] {
            assert_eq!(check_subject(ok), Ok(()), "{ok}");
        }
        let err = |s: &str| check_subject(s).expect_err(s);
        assert!(err("").contains("empty"));
        assert!(err("orders created").contains("' '"));
        assert!(err("orders\tcreated").contains("'\\t'"));
        assert!(err(".orders").contains("empty token"));
        assert!(err("orders.").contains("empty token"));
        assert!(err("orders..created").contains("empty token"));
        assert!(err("orders.*").contains("wildcard"));
        assert!(err("orders.>").contains("wildcard"));
        assert!(err(&"x".repeat(3000)).contains("at most"));
    }

    #[test]
    fn stream_names_follow_jetstream_rules() {
        assert_eq!(check_stream_name("ORDERS_1-a"), Ok(()));
        for bad in ["", "a.b", "a b", "a*", "a>", "a/b"] {
            assert!(check_stream_name(bad).is_err(), "{bad}");
        }
        assert!(check_stream_subject("orders.>").is_ok());
        assert!(check_stream_subject("orders..x").is_err());
    }

    #[test]
    fn the_suggested_stream_captures_everything_under_the_first_token() {
        let s = |subject: &str| suggested_stream(subject);
        assert_eq!(
            s("orders.created"),
            ("ORDERS".to_owned(), "orders.>".to_owned())
        );
        assert_eq!(s("orders"), ("ORDERS".to_owned(), "orders".to_owned()));
        assert_eq!(s("a*b.c.d"), ("A_B".to_owned(), "a*b.>".to_owned()));
        let (name, captured) = s("$x.y");
        assert_eq!(check_stream_name(&name), Ok(()), "{name}");
        assert!(check_stream_subject(&captured).is_ok(), "{captured}");
    }
}
