//! [`Route`]: a subscriber of the application runtime: queues, engine
//! options, the handler, and where its result is published.
//!
//! This is what `#[subscriber]` and `#[publish_to]` expand to; it can be
//! written by hand.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::asyncapi::PayloadSchema;
use super::context::AppContext;
use super::extract::{FromDelivery, Requirement};
use super::handler::HandlerFn;
use super::reply::{IntoReply, Reply};
use crate::engine::message::Message;
use crate::engine::retry::RetryStrategy;
use crate::engine::subscriber::{Subscriber, SubscriberBuilder, SubscriberOptions};
use crate::error::BoxError;

/// The type-erased handler of a route.
pub type RouteCall = Arc<
    dyn Fn(Message, AppContext) -> BoxFuture<'static, Result<Option<Reply>, BoxError>>
        + Send
        + Sync,
>;

/// Where a handler's result goes: a transport name and a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishTarget {
    /// The transport's registered name (`kafka`).
    pub transport: String,
    /// The topic / exchange / subject (`orders.kafka`).
    pub destination: String,
}

/// Where a route was declared (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Source file.
    pub file: &'static str,
    /// Line.
    pub line: u32,
    /// Column.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// A subscriber of the application: what `#[subscriber]` generates.
///
/// The equivalent of
///
/// ```ignore
/// #[publish_to(kafka, "orders.kafka")]
/// #[subscriber("orders", max_workers = 4)]
/// async fn handle(order_id: i64) -> i64 { order_id }
/// ```
///
/// written by hand:
///
/// ```
/// use outbox_core::{Response, Route};
///
/// async fn handle(order_id: i64) -> Response<i64> {
///     Response::new(order_id)
/// }
///
/// let route = Route::builder(["orders"])
///     .name("handle")
///     .max_workers(4)
///     .publish_to("kafka", "orders.kafka")
///     .to(handle);
/// assert_eq!(route.name(), Some("handle"));
/// ```
///
/// or, extracting by hand, with a closure of the delivery and the context:
///
/// ```
/// use outbox_core::{AppContext, BoxError, Message, Response, Route};
///
/// let route = Route::builder(["orders"])
///     .publish_to("kafka", "orders.kafka")
///     .handler(|msg: Message, _ctx: AppContext| async move {
///         let order_id: i64 = msg.decode()?;
///         Ok::<_, BoxError>(Response::new(order_id))
///     });
/// # let _ = route;
/// ```
#[derive(Clone)]
pub struct Route {
    pub(crate) builder: SubscriberBuilder,
    pub(crate) name: Option<String>,
    pub(crate) call: RouteCall,
    pub(crate) targets: Vec<PublishTarget>,
    pub(crate) propagate_headers: bool,
    pub(crate) requirements: Vec<Requirement>,
    pub(crate) location: Option<Location>,
    pub(crate) schemas: RouteSchemas,
    /// `exactly_once(lanes)`: the number of lanes.
    pub(crate) exactly_once: Option<u32>,
}

/// The payload types a route documents in its AsyncAPI messages.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RouteSchemas {
    /// The consumed row's body.
    pub(crate) payload: Option<PayloadSchema>,
    /// The relayed result.
    pub(crate) reply: Option<PayloadSchema>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("subscriber", &self.builder)
            .field("targets", &self.targets)
            .field("propagate_headers", &self.propagate_headers)
            .field("location", &self.location)
            .field("exactly_once", &self.exactly_once)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// Starts a route on `queues`.
    pub fn builder<I, S>(queues: I) -> RouteBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RouteBuilder {
            queues: queues.into_iter().map(Into::into).collect(),
            name: None,
            options: SubscriberOptions::default(),
            targets: Vec::new(),
            propagate_headers: true,
            requirements: Vec::new(),
            location: None,
            schemas: RouteSchemas::default(),
            exactly_once: None,
        }
    }

    /// The explicit name, if any (the runtime defaults to the queue list).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Where the route was declared, if known.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// The publish targets.
    pub fn targets(&self) -> &[PublishTarget] {
        &self.targets
    }

    pub(crate) fn describe(&self) -> String {
        let name = self.name.as_deref().unwrap_or("<unnamed>");
        match self.location {
            Some(l) => format!("`{name}` ({l})"),
            None => format!("`{name}`"),
        }
    }

    /// Validates the engine settings into a [`Subscriber`] running `handler`.
    pub(crate) fn into_subscriber(
        self,
        handler: Arc<dyn crate::engine::handler::Handler>,
    ) -> crate::error::Result<Subscriber> {
        let mut b = self.builder;
        if let Some(n) = self.name {
            b = b.name(n);
        }
        b.build_arc(handler)
    }
}

/// Builds a [`Route`].
#[derive(Debug, Clone)]
pub struct RouteBuilder {
    queues: Vec<String>,
    name: Option<String>,
    options: SubscriberOptions,
    targets: Vec<PublishTarget>,
    propagate_headers: bool,
    requirements: Vec<Requirement>,
    location: Option<Location>,
    schemas: RouteSchemas,
    exactly_once: Option<u32>,
}

impl RouteBuilder {
    /// Names the subscriber (default: `module::fn` for the macro, else the queues).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Replaces every engine option.
    pub fn options(mut self, options: SubscriberOptions) -> Self {
        self.options = options;
        self
    }

    crate::engine::subscriber::option_setters!();

    /// See [`SubscriberOptions::retry`](crate::SubscriberOptions::retry).
    pub fn retry(mut self, strategy: impl RetryStrategy) -> Self {
        self.options = self.options.retry(strategy);
        self
    }

    /// Publishes the handler's result to `destination` on the transport
    /// registered as `transport`; the row is acked only once every target
    /// confirmed. Call once per target.
    pub fn publish_to(
        mut self,
        transport: impl Into<String>,
        destination: impl Into<String>,
    ) -> Self {
        self.targets.push(PublishTarget {
            transport: transport.into(),
            destination: destination.into(),
        });
        self
    }

    /// Publishes this route's results **exactly once** for `read_committed`
    /// consumers, through `lanes` lanes (1 to 1024): the route must publish
    /// to exactly one transport that has lanes (Kafka:
    /// `KafkaBroker::transactional(app_id)`), which `App::run` checks. Each
    /// lane's lots commit with their progress in one bus transaction; a
    /// relay owns a lane through a PostgreSQL session advisory lock, and
    /// relays share the lanes (design and guarantees: `docs/exactly-once.md`).
    ///
    /// A row's lane is `hash(ordering_key) mod lanes` (else `id mod lanes`),
    /// so a key's rows stay in one lane, in id order. The lot size is
    /// `fetch_batch_size`. Changing `lanes` needs the outbox drained first.
    ///
    /// ```
    /// use outbox_core::{BoxError, Message, Response, Route};
    ///
    /// let route = Route::builder(["orders"])
    ///     .publish_to("kafka", "orders.kafka")
    ///     .exactly_once(4)
    ///     .fetch_batch_size(500)
    ///     .handler(|msg: Message, _ctx| async move {
    ///         Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
    ///     });
    /// assert!(format!("{route:?}").contains("exactly_once: Some(4)"));
    /// ```
    pub fn exactly_once(mut self, lanes: u32) -> Self {
        self.exactly_once = Some(lanes);
        self
    }

    /// Whether the inbound row's own headers are copied onto published
    /// messages. Default: **on**, so a relay keeps the producer's headers
    /// (`x-tenant`, trace context, …); `false` opts this route out.
    ///
    /// Explicit [`Response::header`](crate::Response::header)s win over
    /// copied ones. The envelope keys are never copied, whatever the setting:
    /// `content-type` comes from the result's encoding, `correlation_id` from
    /// the response or else the row, `outbox-id` is the row id.
    ///
    /// ```
    /// use outbox_core::{BoxError, Message, Response, Route};
    ///
    /// // Publishes only the envelope headers and the response's own.
    /// let route = Route::builder(["orders"])
    ///     .publish_to("kafka", "orders.kafka")
    ///     .propagate_headers(false)
    ///     .handler(|msg: Message, _ctx| async move {
    ///         Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
    ///     });
    /// assert!(format!("{route:?}").contains("propagate_headers: false"));
    /// ```
    pub fn propagate_headers(mut self, on: bool) -> Self {
        self.propagate_headers = on;
        self
    }

    /// Declares that the handler needs parameter type `P` (checked at start,
    /// e.g. a missing [`State`](super::State)).
    pub fn requires<P: FromDelivery>(mut self) -> Self {
        if let Some(r) = P::requirement() {
            self.requirements.push(r);
        }
        self
    }

    /// Documents the consumed rows' body type in the AsyncAPI document
    /// ([`App::asyncapi`](super::App::asyncapi)); the first `Some` wins
    /// (`#[subscriber]` passes one per parameter, `None` for the ones that
    /// are not the body).
    pub fn payload_schema(mut self, schema: impl Into<Option<PayloadSchema>>) -> Self {
        if self.schemas.payload.is_none() {
            self.schemas.payload = schema.into();
        }
        self
    }

    /// Documents the relayed result's type in the AsyncAPI document; the
    /// first `Some` wins.
    pub fn reply_schema(mut self, schema: impl Into<Option<PayloadSchema>>) -> Self {
        if self.schemas.reply.is_none() {
            self.schemas.reply = schema.into();
        }
        self
    }

    /// Records where the route was declared.
    pub fn location(mut self, file: &'static str, line: u32, column: u32) -> Self {
        self.location = Some(Location { file, line, column });
        self
    }

    /// Finishes the route with `handler`: an `async fn` (or closure) whose
    /// parameters are extracted from the delivery and whose result is
    /// forwarded, the hand-written equivalent of `#[subscriber]`. The
    /// application state its parameters need is checked at start, as with
    /// [`requires`](Self::requires). See [`HandlerFn`].
    ///
    /// ```
    /// use outbox_core::{Message, Response, Route, State};
    ///
    /// #[derive(serde::Deserialize, serde::Serialize)]
    /// struct Order { id: i64 }
    /// struct Db;
    ///
    /// async fn handle(order: Order, msg: Message, db: State<Db>) -> Response<Order> {
    ///     let _ = (msg.id(), &*db);
    ///     Response::new(order)
    /// }
    ///
    /// let route = Route::builder(["orders"]).publish_to("kafka", "t").to(handle);
    /// # let _ = route;
    /// ```
    pub fn to<H, Args>(mut self, handler: H) -> Route
    where
        H: HandlerFn<Args>,
        Args: 'static,
    {
        for r in H::requirements() {
            if !self.requirements.contains(&r) {
                self.requirements.push(r);
            }
        }
        let handler = Arc::new(handler);
        self.finish(Arc::new(move |msg, ctx| handler.call(msg, ctx)))
    }

    /// Finishes the route with a handler of the delivery and the context,
    /// returning anything that implements [`IntoReply`] (parameters are then
    /// extracted by hand; [`to`](Self::to) does it for you).
    pub fn handler<F, Fut>(self, f: F) -> Route
    where
        F: Fn(Message, AppContext) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoReply,
    {
        self.finish(Arc::new(move |msg, ctx| {
            f(msg, ctx).map(IntoReply::into_reply).boxed()
        }))
    }

    fn finish(self, call: RouteCall) -> Route {
        Route {
            builder: Subscriber::builder(self.queues).options(self.options),
            name: self.name,
            call,
            targets: self.targets,
            propagate_headers: self.propagate_headers,
            requirements: self.requirements,
            location: self.location,
            schemas: self.schemas,
            exactly_once: self.exactly_once,
        }
    }
}

/// Anything that can be registered as a route: a [`Route`], or the marker a
/// `#[subscriber]` fn generates (`App::new(b).subscriber(handle {})`).
pub trait IntoRoute {
    /// Converts into a route.
    fn into_route(self) -> Route;
}

impl IntoRoute for Route {
    fn into_route(self) -> Route {
        self
    }
}

/// The options a [`RouteBuilder`] adds to the subscriber's own
/// (`SUBSCRIBER_OPTION_NAMES`), under the names `#[subscriber(..)]` takes
/// (`tests/tests/macros.rs` compares the lists).
#[doc(hidden)]
pub const ROUTE_OPTION_NAMES: &[&str] = &["name", "propagate_headers", "exactly_once"];

/// A route factory collected by `inventory` (not public API; generated by
/// `#[subscriber]`).
#[doc(hidden)]
#[derive(Debug)]
pub struct RouteFactory {
    pub make: fn() -> Route,
}

inventory::collect!(RouteFactory);

pub(crate) fn discovered() -> Vec<Route> {
    inventory::iter::<RouteFactory>
        .into_iter()
        .map(|f| (f.make)())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_propagate_headers_unless_told_not_to() {
        let on = Route::builder(["q"]).handler(|_m: Message, _c| async {});
        assert!(on.propagate_headers, "default: on");
        let off = Route::builder(["q"])
            .propagate_headers(false)
            .handler(|_m: Message, _c| async {});
        assert!(!off.propagate_headers);
    }
}
