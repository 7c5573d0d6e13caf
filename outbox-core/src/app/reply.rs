//! What handlers return: [`Response`] and the [`IntoReply`] conversions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::envelope::{self, CONTENT_TYPE, Headers, Passthrough};
use crate::error::{BoxError, Error};
use crate::store::producer::TimerConflict;
use crate::transport::outbox::FollowOn;

/// A handler result with a key and headers for the transport.
///
/// A plain value returned by a `#[publish_to]` handler is the same as
/// `Response::new(value)`.
///
/// For an [`OutboxTransport`](crate::OutboxTransport) target (queue
/// chaining, faststream-outbox's `OutboxResponse`), the response can also
/// delay the follow-on row ([`activate_in`](Self::activate_in),
/// [`activate_at`](Self::activate_at)) or make it a timer
/// ([`timer_id`](Self::timer_id), [`timer_conflict`](Self::timer_conflict)).
/// Those options mean nothing to a bus: a response that sets any of them and
/// is published to another transport fails (the handler's error, naming the
/// option and the transport), before anything is sent.
///
/// ```
/// use outbox_core::Response;
///
/// let r = Response::new(serde_json::json!({"order_id": 7}))
///     .key("order-7")
///     .header("x-source", "billing");
/// # let _ = r;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Response<T> {
    body: T,
    key: Option<Vec<u8>>,
    headers: Headers,
    correlation_id: Option<String>,
    follow_on: FollowOn,
}

impl<T> Response<T> {
    /// A response carrying `body`, no key, no extra headers.
    pub fn new(body: T) -> Self {
        Self {
            body,
            key: None,
            headers: Headers::new(),
            correlation_id: None,
            follow_on: FollowOn::default(),
        }
    }

    /// The record key (Kafka partitioning key, routing key…).
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (explicit headers win over propagated ones).
    pub fn header(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.headers.insert(k.into(), v.into());
        self
    }

    /// Overrides the correlation id (default: the inbound row's).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Makes the follow-on row due `delay` after it is written, measured on
    /// the database clock (`now() + delay`, `now()` being the start of the
    /// transaction that writes it: the ack's, or the lot's in
    /// [`ClaimMode::Transaction`](crate::ClaimMode::Transaction)), as
    /// [`PublishOptions::activate_in`](crate::PublishOptions::activate_in).
    /// [`OutboxTransport`](crate::OutboxTransport) targets only; at most one
    /// of `activate_in` / `activate_at`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use outbox_core::Response;
    ///
    /// // The invoice's reminder, due in one hour.
    /// let r = Response::new(7_i64).activate_in(Duration::from_secs(3600));
    /// # let _ = r;
    /// ```
    pub fn activate_in(mut self, delay: Duration) -> Self {
        self.follow_on.activate_in = Some(delay);
        self
    }

    /// Makes the follow-on row due at `at` (stored as given), as
    /// [`PublishOptions::activate_at`](crate::PublishOptions::activate_at).
    /// [`OutboxTransport`](crate::OutboxTransport) targets only; at most one
    /// of `activate_in` / `activate_at`.
    ///
    /// ```
    /// use outbox_core::Response;
    ///
    /// let at = chrono::Utc::now() + chrono::Duration::days(1);
    /// let r = Response::new("close the ticket").activate_at(at);
    /// # let _ = r;
    /// ```
    pub fn activate_at(mut self, at: DateTime<Utc>) -> Self {
        self.follow_on.activate_at = Some(at);
        self
    }

    /// Makes the follow-on row a timer: at most one live row per
    /// `(queue, timer_id)`. When one exists, [`timer_conflict`](Self::timer_conflict)
    /// says what happens (default [`TimerConflict::Ignore`]: the existing
    /// row stays and no follow-on row is written; the inbound row is acked
    /// all the same). [`OutboxTransport`](crate::OutboxTransport) targets
    /// only; a timer can be cancelled with
    /// [`OutboxBroker::cancel_timer`](crate::OutboxBroker::cancel_timer).
    ///
    /// ```
    /// use std::time::Duration;
    /// use outbox_core::{Response, TimerConflict};
    ///
    /// // One reminder per cart, pushed back by each new activity.
    /// let r = Response::new(42_i64)
    ///     .activate_in(Duration::from_secs(1800))
    ///     .timer_id("cart-42-reminder")
    ///     .timer_conflict(TimerConflict::Extend);
    /// # let _ = r;
    /// ```
    pub fn timer_id(mut self, id: impl Into<String>) -> Self {
        self.follow_on.timer_id = Some(id.into());
        self
    }

    /// What a [`timer_id`](Self::timer_id) does when the timer already
    /// exists (see [`TimerConflict`]); needs a `timer_id` (else the handler
    /// fails when it returns the response).
    /// [`OutboxTransport`](crate::OutboxTransport) targets only.
    ///
    /// ```
    /// use outbox_core::{IntoReply, Response, TimerConflict};
    ///
    /// let ok = Response::new(1_i64).timer_id("t").timer_conflict(TimerConflict::Extend);
    /// assert!(ok.into_reply().is_ok());
    /// let no_timer = Response::new(1_i64).timer_conflict(TimerConflict::Extend);
    /// assert!(no_timer.into_reply().is_err());
    /// ```
    pub fn timer_conflict(mut self, mode: TimerConflict) -> Self {
        self.follow_on.timer_conflict = mode;
        self
    }

    /// The body.
    pub fn body(&self) -> &T {
        &self.body
    }
}

/// A handler result, encoded and ready to be addressed to transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub(crate) payload: Vec<u8>,
    /// The content type the encoder chose for the body. A [`Passthrough`]
    /// has none here: it labels its bytes itself, with a `content-type` entry
    /// in `headers`, as a `Raw` body published with that header is labelled
    /// (the envelope keeps such a label; an encoder's type would conflict).
    pub(crate) content_type: Option<&'static str>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Headers,
    pub(crate) correlation_id: Option<String>,
    /// The outbox-only options ([`Response::activate_in`], …), checked.
    pub(crate) follow_on: FollowOn,
}

/// What a handler may return: `()`, [`Response<T>`] with `T: Serialize`,
/// [`Passthrough`] and `Response<Passthrough>` (the bytes and content type
/// unchanged), and `Option` / `Result` of those (`None`: nothing to forward;
/// `Err`: a handler error, the row is nacked). The `#[subscriber]` macro wraps
/// plain values in [`Response::new`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be forwarded by `#[publish_to]`",
    label = "the handler returns this",
    note = "return a value that implements `serde::Serialize` (it is encoded like a published body), `outbox_core::Passthrough` (bytes forwarded unchanged), `()`, an `Option` or `Result` of those, or `outbox_core::Response<T>` to set a key or headers"
)]
pub trait IntoReply {
    /// Encodes the result; `Ok(None)` means there is nothing to forward.
    fn into_reply(self) -> Result<Option<Reply>, BoxError>;
}

impl IntoReply for () {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        Ok(None)
    }
}

impl<T: Serialize> IntoReply for Response<T> {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        self.follow_on.validate()?;
        let (payload, content_type) = envelope::encode_body(&self.body)?;
        Ok(Some(Reply {
            payload,
            content_type,
            key: self.key,
            headers: self.headers,
            correlation_id: self.correlation_id,
            follow_on: self.follow_on,
        }))
    }
}

/// The bytes and content type as they are: no encoding, no content type
/// when the pass-through has none.
impl IntoReply for Passthrough {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        Response::new(self).into_reply()
    }
}

/// The bytes and content type as they are, with the response's key, headers
/// and correlation id. A `content-type` header that differs from the
/// pass-through's content type is an error (relabel with
/// [`Passthrough::with_content_type`] instead); on a pass-through without a
/// content type it labels the bytes.
impl IntoReply for Response<Passthrough> {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        let Response {
            body,
            key,
            mut headers,
            correlation_id,
            follow_on,
        } = self;
        follow_on.validate()?;
        let (payload, content_type) = body.into_parts();
        if let Some(ct) = content_type {
            match headers.get(CONTENT_TYPE) {
                Some(user) if *user != ct => {
                    return Err(Box::new(Error::arg(format!(
                        "the `content-type` header {user:?} conflicts with the pass-through's \
                         content type {ct:?}; drop the header, or relabel the body with \
                         Passthrough::with_content_type"
                    ))));
                }
                _ => {
                    headers.insert(CONTENT_TYPE.to_owned(), ct);
                }
            }
        }
        Ok(Some(Reply {
            payload,
            content_type: None,
            key,
            headers,
            correlation_id,
            follow_on,
        }))
    }
}

/// Already encoded.
impl IntoReply for Reply {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        Ok(Some(self))
    }
}

impl<R: IntoReply> IntoReply for Option<R> {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        match self {
            Some(r) => r.into_reply(),
            None => Ok(None),
        }
    }
}

impl<R: IntoReply, E: Into<BoxError>> IntoReply for Result<R, E> {
    fn into_reply(self) -> Result<Option<Reply>, BoxError> {
        self.map_err(Into::into)?.into_reply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(r: impl IntoReply) -> Reply {
        r.into_reply()
            .expect("a reply")
            .expect("something to forward")
    }

    #[test]
    fn passthrough_forwards_bytes_and_label_unchanged() {
        let body = br#"{"order_id":11,"note":"x"}"#;
        let r = reply(Passthrough::new(body.to_vec()).with_content_type("application/json"));
        assert_eq!(r.payload, body);
        assert_eq!(r.content_type, None, "not re-encoded");
        assert_eq!(r.headers[CONTENT_TYPE], "application/json");
        assert_eq!((r.key, r.correlation_id), (None, None));
        // A label is kept verbatim, whatever it says.
        let r = reply(Passthrough::new("héllo ✓").with_content_type("Text/Plain; charset=utf-8"));
        assert_eq!(r.payload, "héllo ✓".as_bytes());
        assert_eq!(r.headers[CONTENT_TYPE], "Text/Plain; charset=utf-8");
        // No content type stays none; an empty body stays empty.
        let r = reply(Passthrough::new(Vec::new()));
        assert!(r.payload.is_empty());
        assert!(r.headers.is_empty(), "{:?}", r.headers);
    }

    #[test]
    fn passthrough_response_adds_key_headers_and_correlation() {
        let r = reply(
            Response::new(Passthrough::new("x").with_content_type("text/plain"))
                .key("k")
                .header("x-source", "relay")
                .correlation_id("c-1"),
        );
        assert_eq!(r.payload, b"x");
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.headers[CONTENT_TYPE], "text/plain");
        assert_eq!(r.headers["x-source"], "relay");
        assert_eq!(r.correlation_id.as_deref(), Some("c-1"));
        // The same label is fine; a different one is an error; on unlabelled
        // bytes the header labels them.
        let same = Response::new(Passthrough::new("x").with_content_type("text/plain"))
            .header(CONTENT_TYPE, "text/plain");
        assert_eq!(reply(same).headers[CONTENT_TYPE], "text/plain");
        let err = Response::new(Passthrough::new("x").with_content_type("text/plain"))
            .header(CONTENT_TYPE, "application/json")
            .into_reply()
            .expect_err("conflicting label");
        assert!(err.to_string().contains("conflicts"), "{err}");
        let labelled = Response::new(Passthrough::new("<a/>")).header(CONTENT_TYPE, "text/xml");
        assert_eq!(reply(labelled).headers[CONTENT_TYPE], "text/xml");
    }

    #[test]
    fn follow_on_options_are_carried_and_checked() {
        let r = reply(
            Response::new(1_i64)
                .activate_in(Duration::from_secs(5))
                .timer_id("t-1")
                .timer_conflict(TimerConflict::Extend),
        );
        assert_eq!(r.follow_on.activate_in, Some(Duration::from_secs(5)));
        assert_eq!(r.follow_on.timer_id.as_deref(), Some("t-1"));
        assert_eq!(
            r.follow_on.set_names(),
            ["activate_in", "timer_id", "timer_conflict"]
        );
        assert!(reply(Response::new(1_i64)).follow_on.set_names().is_empty());
        let both = Response::new(1_i64)
            .activate_in(Duration::from_secs(5))
            .activate_at(Utc::now())
            .into_reply()
            .expect_err("both activations");
        assert!(
            both.to_string()
                .contains("at most one of activate_in / activate_at"),
            "{both}"
        );
        let extend = Response::new(Passthrough::new("x"))
            .timer_conflict(TimerConflict::Extend)
            .into_reply()
            .expect_err("extend without a timer");
        assert!(
            extend.to_string().contains("requires a timer_id"),
            "{extend}"
        );
    }

    #[test]
    fn other_replies_keep_their_encoding() {
        let r = reply(Response::new(serde_json::json!({"b": 1, "a": 2})));
        assert_eq!(
            r.payload, br#"{"a":2,"b":1}"#,
            "serde_json::Value sorts keys"
        );
        assert_eq!(r.content_type, Some(envelope::JSON));
        assert!(r.headers.is_empty());
        let r = reply(Response::new("hi"));
        assert_eq!(r.content_type, Some(envelope::TEXT));
        assert!(().into_reply().expect("unit").is_none());
        assert!(None::<Passthrough>.into_reply().expect("none").is_none());
    }
}
