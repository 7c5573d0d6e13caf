//! Lifecycle hooks.

use std::fmt;
use std::future::Future;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::context::AppContext;
use crate::engine::handler::IntoHandlerResult;
use crate::error::BoxError;
use crate::transport::ServerInfo;

type HookFn = Box<dyn FnOnce(AppContext) -> BoxFuture<'static, Result<(), BoxError>> + Send>;

/// A named lifecycle hook: an async function of the [`AppContext`] returning
/// `()` or `Result<(), E>`. An error from a startup hook aborts startup.
///
/// Transports provide their connect step as a hook (`kafka.connect()`); any
/// `async fn(AppContext) -> Result<(), E>` (or closure) is one too.
pub struct Hook {
    name: String,
    f: HookFn,
    /// The transport this hook registers (a `TransportBroker`'s connect
    /// step): its name and bus, for the AsyncAPI document.
    registers: Option<(String, Option<ServerInfo>)>,
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hook").field("name", &self.name).finish()
    }
}

impl Hook {
    /// A hook named `name`.
    pub fn new<F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        F: FnOnce(AppContext) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoHandlerResult,
    {
        Self {
            name: name.into(),
            f: Box::new(move |ctx| f(ctx).map(IntoHandlerResult::into_handler_result).boxed()),
            registers: None,
        }
    }

    /// Marks the hook as the one registering transport `name` (at `server`).
    pub(crate) fn registering(mut self, name: String, server: Option<ServerInfo>) -> Self {
        self.registers = Some((name, server));
        self
    }

    /// The transport the hook registers, if it is a transport's connect step.
    pub(crate) fn registers(&self) -> Option<&(String, Option<ServerInfo>)> {
        self.registers.as_ref()
    }

    /// The hook's name (for logs and errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) async fn run(self, ctx: AppContext) -> Result<(), BoxError> {
        (self.f)(ctx).await
    }
}

/// Anything usable as a hook: a [`Hook`], or an async function / closure
/// taking the [`AppContext`] (named after its type).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an application hook",
    note = "a hook is an `async fn(AppContext) -> Result<(), E>` (or `-> ()`), a closure returning such a future, or an `outbox_core::Hook`"
)]
pub trait IntoHook {
    /// Converts into a hook.
    fn into_hook(self) -> Hook;
}

impl IntoHook for Hook {
    fn into_hook(self) -> Hook {
        self
    }
}

impl<F, Fut> IntoHook for F
where
    F: FnOnce(AppContext) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoHandlerResult,
{
    fn into_hook(self) -> Hook {
        Hook::new(std::any::type_name::<F>(), self)
    }
}
