//! The [`Handler`] trait: what a subscriber runs for each claimed row.

use std::future::Future;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::engine::message::Message;
use crate::error::BoxError;

/// What a handler's future may resolve to: `()` or `Result<(), E>`.
pub trait IntoHandlerResult {
    /// Converts into the engine's result type.
    fn into_handler_result(self) -> Result<(), BoxError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// Handles one claimed row.
///
/// Implemented for every `Fn(Message) -> impl Future<Output = R>` where `R` is
/// `()` or `Result<(), E>`, so a closure or an `async fn` is a handler:
///
/// ```
/// use outbox_core::{BoxError, Handler, Message};
///
/// async fn handle(msg: Message) -> Result<(), BoxError> {
///     let order_id: i64 = msg.decode()?;
///     println!("got order {order_id}");
///     Ok(())
/// }
/// fn assert_handler(_: impl Handler) {}
/// assert_handler(handle);
/// assert_handler(|msg: Message| async move { println!("{}", msg.id()) });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox handler",
    note = "a handler is an `async fn(Message) -> Result<(), E>` (or `-> ()`), or a closure returning such a future; it must be `Send + Sync + 'static`"
)]
pub trait Handler: Send + Sync + 'static {
    /// Runs the handler for `msg`.
    fn call(&self, msg: Message) -> BoxFuture<'static, Result<(), BoxError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoHandlerResult,
{
    fn call(&self, msg: Message) -> BoxFuture<'static, Result<(), BoxError>> {
        (self)(msg)
            .map(IntoHandlerResult::into_handler_result)
            .boxed()
    }
}
