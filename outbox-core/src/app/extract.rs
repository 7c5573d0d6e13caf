//! [`FromDelivery`]: how handler parameters are obtained from a delivery.

use std::any::TypeId;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::context::AppContext;
use crate::engine::message::Message;
use crate::envelope::{Headers, Passthrough};
use crate::error::{BoxError, Error};

/// Something a handler parameter needs from the application, checked before
/// anything is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    pub(crate) type_id: TypeId,
    pub(crate) type_name: &'static str,
}

/// A handler parameter.
///
/// Implemented for every `serde::de::DeserializeOwned` type (the body, decoded
/// by content type), for [`Passthrough`] (the payload bytes and content type
/// as stored, undecoded), for [`Message`] (the delivery handle: id, headers,
/// ack/nack/reject), for [`MessageHeaders`] (the row's headers) and for
/// [`State<S>`] (shared application state).
///
/// [`Headers`](crate::Headers) is a map, so as a parameter type of a
/// hand-written handler it would be the *body* decoded as a map: take
/// [`MessageHeaders`] for the headers. (In a `#[subscriber]` fn a parameter
/// written `Headers` is given the headers.)
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a `#[subscriber]` handler parameter",
    label = "this parameter",
    note = "a parameter is the body (any type implementing `serde::Deserialize`), `outbox_core::Message` (the delivery handle), `outbox_core::Headers` (its headers; `MessageHeaders` in a hand-written handler) or `outbox_core::State<S>` (application state)"
)]
pub trait FromDelivery: Sized + Send + 'static {
    /// Extracts the parameter.
    fn from_delivery(msg: &Message, ctx: &AppContext) -> Result<Self, BoxError>;

    /// What the application must provide for this parameter (checked at start).
    fn requirement() -> Option<Requirement> {
        None
    }
}

impl<T: DeserializeOwned + Send + 'static> FromDelivery for T {
    fn from_delivery(msg: &Message, _: &AppContext) -> Result<Self, BoxError> {
        Ok(msg.decode()?)
    }
}

/// The row's payload and `content-type` header exactly as stored; never
/// fails.
impl FromDelivery for Passthrough {
    fn from_delivery(msg: &Message, _: &AppContext) -> Result<Self, BoxError> {
        Ok(Passthrough::from_message(msg))
    }
}

impl FromDelivery for Message {
    fn from_delivery(msg: &Message, _: &AppContext) -> Result<Self, BoxError> {
        Ok(msg.clone())
    }
}

/// The row's headers (all of them, `content-type` and `correlation_id`
/// included), as a parameter: `headers: MessageHeaders` (it dereferences to
/// [`Headers`]). A `#[subscriber]` fn may write the parameter `headers: Headers`.
///
/// ```
/// use outbox_core::{MessageHeaders, Route};
///
/// async fn audit(headers: MessageHeaders) {
///     println!("tenant {:?}", headers.get("x-tenant"));
/// }
/// let route = Route::builder(["audit"]).to(audit);
/// # let _ = route;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageHeaders(pub Headers);

impl MessageHeaders {
    /// The headers.
    pub fn into_inner(self) -> Headers {
        self.0
    }
}

impl Deref for MessageHeaders {
    type Target = Headers;
    fn deref(&self) -> &Headers {
        &self.0
    }
}

impl From<MessageHeaders> for Headers {
    fn from(h: MessageHeaders) -> Self {
        h.0
    }
}

impl FromDelivery for MessageHeaders {
    fn from_delivery(msg: &Message, _: &AppContext) -> Result<Self, BoxError> {
        Ok(Self(msg.headers().clone()))
    }
}

/// Shared application state, registered with [`App::state`](super::App::state).
///
/// ```
/// use outbox_core::State;
/// struct Db { url: String }
/// async fn handle(order_id: i64, db: State<Db>) {
///     println!("{order_id} -> {}", db.url);
/// }
/// ```
pub struct State<S>(pub Arc<S>);

impl<S> Clone for State<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S: fmt::Debug> fmt::Debug for State<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("State").field(&self.0).finish()
    }
}

impl<S: Send + Sync + 'static> FromDelivery for State<S> {
    fn from_delivery(_: &Message, ctx: &AppContext) -> Result<Self, BoxError> {
        ctx.state::<S>().map(State).ok_or_else(|| {
            Box::new(Error::config(format!(
                "no application state of type `{}`; register it with App::state(..)",
                std::any::type_name::<S>()
            ))) as BoxError
        })
    }

    fn requirement() -> Option<Requirement> {
        Some(Requirement {
            type_id: TypeId::of::<S>(),
            type_name: std::any::type_name::<S>(),
        })
    }
}
