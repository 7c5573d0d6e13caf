//! What handlers return: [`Response`] and the [`IntoReply`] conversions.

use serde::Serialize;

use crate::envelope::{self, Headers};
use crate::error::BoxError;

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
    pub(crate) content_type: Option<&'static str>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Headers,
    pub(crate) correlation_id: Option<String>,
}

/// What a handler may return: `()`, [`Response<T>`] with `T: Serialize`, and
/// `Option` / `Result` of those (`None`: nothing to forward; `Err`: a handler
/// error, the row is nacked). The `#[subscriber]` macro wraps plain values in
/// [`Response::new`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be forwarded by `#[publish_to]`",
    label = "the handler returns this",
    note = "return a value that implements `serde::Serialize` (it is encoded like a published body), `()`, an `Option` or `Result` of those, or `outbox_core::Response<T>` to set a key or headers"
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
