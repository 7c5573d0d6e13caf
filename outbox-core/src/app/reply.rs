//! What handlers return: [`Response`] and the [`IntoReply`] conversions.

use serde::Serialize;

use crate::envelope::{self, CONTENT_TYPE, Headers, Passthrough};
use crate::error::{BoxError, Error};

/// A handler result with a key and headers for the transport.
///
/// A plain value returned by a `#[publish_to]` handler is the same as
/// `Response::new(value)`.
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
}

impl<T> Response<T> {
    /// A response carrying `body`, no key, no extra headers.
    pub fn new(body: T) -> Self {
        Self {
            body,
            key: None,
            headers: Headers::new(),
            correlation_id: None,
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
        let (payload, content_type) = envelope::encode_body(&self.body)?;
        Ok(Some(Reply {
            payload,
            content_type,
            key: self.key,
            headers: self.headers,
            correlation_id: self.correlation_id,
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
        } = self;
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
