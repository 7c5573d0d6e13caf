//! [`HandlerFn`]: an `async fn` whose parameters are extractors, as a route's
//! handler ([`RouteBuilder::to`](super::RouteBuilder::to)).

use std::future::Future;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::context::AppContext;
use super::extract::{FromDelivery, Requirement};
use super::reply::{IntoReply, Reply};
use crate::engine::message::Message;
use crate::error::BoxError;

/// A function a route runs: every parameter is extracted from the delivery
/// ([`FromDelivery`]) and the result is forwarded ([`IntoReply`]).
///
/// `Args` is the tuple of parameter types. Implemented for every
/// `Fn(T1, .., Tn) -> impl Future` (n = 0 to 12, `async fn`s and closures)
/// whose parameters are all [`FromDelivery`] and whose future is `Send` and
/// resolves to an [`IntoReply`]:
///
/// ```
/// use outbox_core::{Message, MessageHeaders, Response, Route, State};
///
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Order { id: i64 }
/// struct Db;
///
/// async fn handle(order: Order, msg: Message, headers: MessageHeaders, db: State<Db>) -> Response<Order> {
///     let _ = (msg.id(), headers.get("x-tenant"), &*db);
///     Response::new(order)
/// }
///
/// let route = Route::builder(["orders"]).publish_to("kafka", "orders.kafka").to(handle);
/// # let _ = route;
/// ```
///
/// The parameters are extracted in order, before the function runs; the first
/// that fails is the handler's error (the row is retried like any other).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a route's handler",
    label = "not a handler",
    note = "a handler is an `async fn` (or a closure returning a `Send` future) whose parameters are all `outbox_core::FromDelivery` (the body as any `serde::Deserialize` type, `Message`, `MessageHeaders`, `State<S>`, `Passthrough`) and whose result is `outbox_core::IntoReply`"
)]
pub trait HandlerFn<Args>: Send + Sync + 'static {
    /// Extracts the parameters from `msg`, runs the function, converts its
    /// result.
    fn call(
        &self,
        msg: Message,
        ctx: AppContext,
    ) -> BoxFuture<'static, Result<Option<Reply>, BoxError>>;

    /// What the parameters need from the application (checked at start).
    fn requirements() -> Vec<Requirement>;
}

macro_rules! handler_fn {
    ($($t:ident),*) => {
        impl<F, Fut, $($t,)*> HandlerFn<($($t,)*)> for F
        where
            F: Fn($($t),*) -> Fut + Send + Sync + 'static,
            Fut: Future + Send + 'static,
            Fut::Output: IntoReply,
            $($t: FromDelivery,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn call(
                &self,
                msg: Message,
                ctx: AppContext,
            ) -> BoxFuture<'static, Result<Option<Reply>, BoxError>> {
                $(
                    let $t = match $t::from_delivery(&msg, &ctx) {
                        Ok(v) => v,
                        Err(e) => return std::future::ready(Err(e)).boxed(),
                    };
                )*
                (self)($($t),*).map(IntoReply::into_reply).boxed()
            }

            fn requirements() -> Vec<Requirement> {
                let all: Vec<Option<Requirement>> = vec![$($t::requirement()),*];
                all.into_iter().flatten().collect()
            }
        }
    };
}

handler_fn!();
handler_fn!(T1);
handler_fn!(T1, T2);
handler_fn!(T1, T2, T3);
handler_fn!(T1, T2, T3, T4);
handler_fn!(T1, T2, T3, T4, T5);
handler_fn!(T1, T2, T3, T4, T5, T6);
handler_fn!(T1, T2, T3, T4, T5, T6, T7);
handler_fn!(T1, T2, T3, T4, T5, T6, T7, T8);
handler_fn!(T1, T2, T3, T4, T5, T6, T7, T8, T9);
handler_fn!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10);
handler_fn!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11);
handler_fn!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12);
