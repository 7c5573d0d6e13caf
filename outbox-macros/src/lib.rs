//! Attribute macros of `outbox-core`: [`macro@subscriber`] and
//! [`macro@publish_to`].
//!
//! This crate is an implementation detail: depend on `outbox-core` (default
//! feature `macros`) and use the attributes as `outbox_core::subscriber` and
//! `outbox_core::publish_to`. Its version is pinned exactly by `outbox-core`,
//! and the code it generates goes through `outbox_core::__private`, which is
//! not public API.
//!
//! Everything the attributes generate can be written by hand with
//! `outbox_core::Route::builder`; each macro's documentation ends with the
//! equivalent code.
//!
//! # Debugging
//!
//! Set `OUTBOX_MACROS_DEBUG=1` while building to print every expansion to
//! stderr (Cargo does not track the variable: touch the source file or
//! `cargo clean -p your-crate` so the attributes run again). The output is a
//! single line of tokens; `rustfmt` makes it readable.

mod ctxt;
mod debug;
mod duration;
mod expand;
mod fallback;
mod model;
mod parse;
mod paths;
mod publish_to;
mod subscriber;
mod symbol;
mod valid;

use proc_macro::TokenStream;

/// Registers an `async fn` as the handler of one or more outbox queues.
///
/// ```no_run
/// use outbox_core::{publish_to, subscriber};
///
/// #[publish_to(kafka, "orders.kafka")]
/// #[subscriber("orders")]
/// async fn handle(order_id: i64) -> i64 {
///     println!("got order {order_id}");
///     order_id
/// }
/// # fn main() {}
/// ```
///
/// Every row published to the queue `orders` is decoded as an `i64`, handed
/// to `handle`, and (because of `#[publish_to]`) its result is published to
/// the topic `orders.kafka` of the transport registered as `kafka`. The row is
/// deleted once the handler succeeded and every target confirmed.
///
/// # Grammar
///
/// ```text
/// subscriber := QUEUES (',' option)* ','?
/// QUEUES     := STRING | '[' STRING (',' STRING)* ','? ']'
/// option     := 'name' '=' STRING
///             | 'max_workers' '=' INT
///             | 'fetch_batch_size' '=' INT
///             | 'fetch_concurrency' '=' INT
///             | 'lease_ttl' '=' DURATION
///             | 'lease_heartbeat' '=' (DURATION | 'false')
///             | 'min_fetch_interval' '=' DURATION
///             | 'max_fetch_interval' '=' DURATION
///             | 'max_deliveries' '=' INT
///             | 'terminal_flush_batch_size' '=' INT
///             | 'ack_policy' '=' ('NackOnError' | 'RejectOnError' | 'Manual')
///             | 'retry' '=' EXPR
///             | 'propagate_headers' '=' BOOL
///             | 'ordered' ('=' BOOL)?
///             | 'poison_policy' '=' ('Block' | 'DeadLetterAndContinue')
///             | 'claim_mode' '=' ('Lease' | 'Transaction')
///             | 'max_hold' '=' DURATION
///             | 'exactly_once' '=' INT
///             | 'crate' '=' STRING
/// DURATION   := STRING of one or more parts NUMBER UNIT, added up:
///               "10s", "500ms", "1m", "1h", "2m30s", "1.5s"
/// NUMBER     := DIGITS ('.' DIGITS)?
/// UNIT       := 'h' | 'm' | 's' | 'ms' | 'us' | 'ns'
/// ```
///
/// The queue list comes first; options follow in any order, each at most
/// once. A queue name is 1 to 255 characters and appears once in the list.
/// Durations are read at compile time: a malformed duration (`"10"`,
/// `"10 s"`, `"10sec"`) or a zero one is a compile error at the string.
///
/// | option | value | default | builder call |
/// |---|---|---|---|
/// | `name` | string | `concat!(module_path!(), "::", "<fn>")` | `.name(..)` |
/// | `max_workers` | integer | `1` | `.max_workers(n)` |
/// | `fetch_batch_size` | integer | `10` | `.fetch_batch_size(n)` |
/// | `fetch_concurrency` | integer | `1` | `.fetch_concurrency(n)` |
/// | `lease_ttl` | duration | `"60s"` | `.lease_ttl(Duration)` |
/// | `lease_heartbeat` | duration shorter than `lease_ttl` (checked at compile time), or `false` (off) | a third of `lease_ttl` | `.lease_heartbeat(Some(Duration))` / `.lease_heartbeat(None)` |
/// | `min_fetch_interval` | duration | `"1s"` | `.min_fetch_interval(Duration)` |
/// | `max_fetch_interval` | duration | `"10s"` | `.max_fetch_interval(Duration)` |
/// | `max_deliveries` | integer | none (unlimited) | `.max_deliveries(n)` |
/// | `terminal_flush_batch_size` | integer | `1` | `.terminal_flush_batch_size(n)` |
/// | `ack_policy` | `NackOnError`, `RejectOnError` or `Manual` | `NackOnError` | `.ack_policy(AckPolicy::..)` |
/// | `retry` | any expression whose type implements `RetryStrategy` | `ExponentialRetry::default()`: 1 s ×2 up to 300 s, 10 attempts, jitter 0.2 | `.retry(expr)` |
/// | `propagate_headers` | `true` / `false` | `true`: the row's own headers go along (opt out with `propagate_headers = false`) | `.propagate_headers(b)` |
/// | `ordered` | none (a flag), or `true` / `false` | off: rows are claimed in parallel regardless of their key | `.ordered(true)` |
/// | `poison_policy` | `Block` or `DeadLetterAndContinue`; only with `ordered` | `Block` | `.poison_policy(PoisonPolicy::..)` |
/// | `claim_mode` | `Lease` or `Transaction` | `Transaction` with a `#[publish_to]` target (a relay), else `Lease` | `.claim_mode(ClaimMode::..)` |
/// | `max_hold` | duration; not with `claim_mode = Lease` | `"5s"` | `.max_hold(Duration)` |
/// | `exactly_once` | integer, the lanes: 1 to 1024 (checked at compile time); one `#[publish_to]` on a transport with lanes (`KafkaBroker::transactional`; checked by `App::run`) | off | `.exactly_once(n)` |
/// | `crate` | a path, as a string | `"::outbox_core"` | (where generated code finds `outbox_core`) |
///
/// The macro checks the *kind* of each value (an integer where an integer is
/// expected, …) and reads durations. The values themselves are checked by
/// the runtime when `App::run` builds the subscribers, exactly as for a
/// hand-written `Route`: `max_workers = 0` or a `min_fetch_interval` above
/// `max_fetch_interval` make `App::run` fail with a message naming the
/// subscriber and where it was declared. The `retry` expression is evaluated
/// in the scope of the fn, each time the route is built.
///
/// `ack_policy`, `poison_policy` and `claim_mode` take the variant's name
/// (`Manual`), or a path to it through its enum (`AckPolicy::Manual`,
/// `outbox_core::PoisonPolicy::Block`, `ClaimMode::Transaction`), used as
/// written.
///
/// **Ordered subscribers.** `ordered` (the same as `ordered = true`) makes
/// the subscriber deliver the rows of each ordering key
/// (`PublishOptions::key`) one at a time, in commit order, with different
/// keys in parallel (see `SubscriberOptions::ordered`). `poison_policy`
/// chooses what a key does when its oldest row fails: wait for it (`Block`,
/// the default) or dead-letter it and go on (`DeadLetterAndContinue`).
/// It means nothing to an unordered subscriber, so `poison_policy` without
/// `ordered` (or with `ordered = false`) is a compile error at the option.
///
/// **Claim modes.** `claim_mode` chooses how rows are claimed and their
/// outcomes recorded (see `outbox_core::ClaimMode`): `Lease` writes a lease
/// per claim and each outcome later; `Transaction` locks the claimed rows in
/// a transaction held open while their handlers run, and commits the
/// outcomes in it. `max_hold` bounds how long that transaction stays open
/// (`SubscriberOptions::max_hold`). Without `claim_mode` the runtime chooses
/// (`Transaction` for a route with a `#[publish_to]` target, `Lease`
/// otherwise), so `max_hold` may be given alone; with `claim_mode = Lease`
/// it means nothing, and is a compile error at the option.
///
/// **Deprecated spellings.** `lease_ttl_secs = 30` (seconds, integer or
/// float), `min_fetch_interval_ms = 500` and `max_fetch_interval_ms = 5000`
/// (integer milliseconds) still work, with a compiler deprecation warning at
/// the option naming the new spelling (`lease_ttl = "30s"`, …). Giving both
/// spellings of one option is an error.
///
/// # Typing requirements
///
/// | position | requirement |
/// |---|---|
/// | each parameter `p: T` | `T: FromDelivery`: any `T: serde::de::DeserializeOwned` (the body, decoded by content type), `outbox_core::Message` (the delivery: id, headers, `ack`/`nack`/`reject`), `outbox_core::State<S>` (state registered with `App::state`); a type written `Headers` (`outbox_core::Headers`, …) is the row's headers (`outbox_core::MessageHeaders`), not the body decoded as a map |
/// | the future of the fn | `Send + 'static` |
/// | the return type, without `#[publish_to]` | anything; the value is dropped, except that the `Err` of a `Result<_, E>` is the handler error (`E: Into<BoxError>`) |
/// | the return type, with `#[publish_to]` | see below |
///
/// With `#[publish_to]`, the return value is forwarded according to the
/// *syntactic shape* of the declared return type (the macro does not look
/// further than the last path segment):
///
/// | declared return type | forwarded |
/// |---|---|
/// | none, `()` | nothing |
/// | `Result<T, E>` | `Ok(v)`: `v` by the shape of `T`; `Err(e)`: handler error (`E: Into<BoxError>`) |
/// | `Option<T>` | `Some(v)`: `v` by the shape of `T`; `None`: nothing |
/// | `…::Response<T>` | as is (`T: Serialize`), with its key, headers and correlation id |
/// | any other `T` (including `impl Serialize`) | `Response::new(value)`: needs `T: serde::Serialize` |
///
/// A type alias named `Result` written without generic arguments is
/// forwarded as is and must itself implement `IntoReply`. A parameter type
/// that is not `FromDelivery`, or a forwarded type that is not `Serialize`,
/// is a compile error at that type.
///
/// # Semantics
///
/// For `async fn handle(..)`, the attribute emits:
///
/// 1. the fn itself, unchanged: call it directly in unit tests
///    (`handle(3).await`);
/// 2. a marker, `#[doc(hidden)] struct handle {}` (same visibility as the fn;
///    braced, so it lives in the type namespace next to the fn), implementing
///    `outbox_core::IntoRoute`. `App::new(broker).subscriber(handle {})`
///    registers the route explicitly (use `App::without_discovery()` to rely
///    on explicit registration only);
/// 3. inside `const _: () = { .. };`, a factory `fn() -> Route` that builds the
///    route with `Route::builder` (queues, name, `file!()`/`line!()` location,
///    the options, one `.publish_to(..)` per target, one `.requires::<T>()`
///    per parameter, checking it at its type) finished by `.to(..)`
///    (`outbox_core::HandlerFn`, which extracts each parameter with
///    `FromDelivery`) with a closure of the same parameters that awaits the fn
///    and converts its result (table above);
/// 4. `inventory::submit!` of that factory: `App::run` discovers every
///    `#[subscriber]` linked into the binary. If the handlers live in another
///    crate, make sure the binary references that crate (`use my_handlers as
///    _;`), or the linker may drop them.
///
/// At run time, a handler error (a failed extraction, an `Err` return, a
/// panic) follows the `ack_policy`: with the default `NackOnError` the row is
/// retried according to the `retry` strategy and dead-lettered once it gives
/// up. With `#[publish_to]`, the row is acked only after **every** target
/// confirmed the message; a failed publish is a handler error like any other
/// (retried, then dead-lettered), so a target may receive a message more than
/// once: deduplicate on the `outbox-id` header.
///
/// The attribute must be on a free `async fn` at item level (module scope),
/// not on a method or inside a fn body, and must not be generic. On any
/// error, the fn is still emitted unchanged (along with the marker), so the
/// rest of the crate keeps type-checking, and every error is reported at
/// once.
///
/// # Examples
///
/// Several queues, options, a retry strategy, the delivery handle and
/// shared state:
///
/// ```no_run
/// use std::time::Duration;
/// use outbox_core::retry::ConstantRetry;
/// use outbox_core::{Message, State, subscriber};
///
/// struct Mailer { from: String }
///
/// #[derive(serde::Deserialize)]
/// struct Signup { email: String }
///
/// #[subscriber(
///     ["signups", "signups.retry"],
///     name = "mail::welcome",
///     max_workers = 4,
///     lease_ttl = "30s",
///     max_fetch_interval = "2s",
///     ack_policy = NackOnError,
///     retry = ConstantRetry::new(Duration::from_secs(5)).max_attempts(3),
/// )]
/// async fn welcome(signup: Signup, msg: Message, mailer: State<Mailer>) -> Result<(), std::io::Error> {
///     println!("{} -> {} (row {})", mailer.from, signup.email, msg.id());
///     Ok(())
/// }
/// # fn main() {}
/// ```
///
/// Per-key FIFO, where a failing row goes to the dead-letter table at once
/// instead of holding its key back:
///
/// ```no_run
/// use outbox_core::subscriber;
///
/// #[subscriber("orders", ordered, poison_policy = DeadLetterAndContinue, max_workers = 8)]
/// async fn apply(event: String) {
///     println!("{event}");
/// }
/// # fn main() {}
/// ```
///
/// A relay whose claims hold their transaction at most two seconds:
///
/// ```no_run
/// use outbox_core::{publish_to, subscriber};
///
/// #[publish_to(kafka, "orders.kafka")]
/// #[subscriber("orders", claim_mode = Transaction, max_hold = "2s", max_workers = 64)]
/// async fn relay(order: serde_json::Value) -> serde_json::Value {
///     order
/// }
/// # fn main() {}
/// ```
///
/// Registering explicitly and running the application:
///
/// ```no_run
/// use outbox_core::{App, OutboxBroker, subscriber};
///
/// #[subscriber("orders")]
/// async fn handle(order_id: i64) {
///     println!("got order {order_id}");
/// }
///
/// async fn run(broker: OutboxBroker) -> Result<(), outbox_core::Error> {
///     App::new(broker)
///         .without_discovery()
///         .subscriber(handle {})
///         .run()
///         .await
/// }
/// # fn main() {}
/// ```
///
/// Misuse is a compile error at the offending token:
///
/// ```compile_fail
/// use outbox_core::subscriber;
///
/// #[subscriber("orders", max_workers = "4")] // expected an integer for `max_workers`
/// async fn handle(order_id: i64) {}
/// # fn main() {}
/// ```
///
/// ```compile_fail
/// use outbox_core::subscriber;
///
/// #[subscriber("orders", lease_ttl = "10")] // `10` has no unit: `"10s"` or `"10ms"`
/// async fn handle(order_id: i64) {}
/// # fn main() {}
/// ```
///
/// ```compile_fail
/// use outbox_core::subscriber;
///
/// #[subscriber("orders", poison_policy = Block)] // only applies to `ordered` subscribers
/// async fn handle(order_id: i64) {}
/// # fn main() {}
/// ```
///
/// ```compile_fail
/// use outbox_core::subscriber;
///
/// #[subscriber("orders", claim_mode = Lease, max_hold = "5s")] // only applies to `Transaction`
/// async fn handle(order_id: i64) {}
/// # fn main() {}
/// ```
///
/// ```compile_fail
/// use outbox_core::subscriber;
///
/// #[subscriber("orders")]
/// fn handle(order_id: i64) {} // `#[subscriber]` requires an `async fn`
/// # fn main() {}
/// ```
///
/// # Equivalent code without `#[subscriber]`
///
/// The seed example above (with its `#[publish_to]`) is the same as:
///
/// ```no_run
/// use outbox_core::{IntoRoute, Response, Route};
///
/// async fn handle(order_id: i64) -> i64 {
///     println!("got order {order_id}");
///     order_id
/// }
///
/// #[allow(non_camel_case_types)]
/// struct handle {}
///
/// impl IntoRoute for handle {
///     fn into_route(self) -> Route {
///         Route::builder(["orders"])
///             .name(concat!(module_path!(), "::", "handle"))
///             .location(file!(), line!(), column!())
///             .publish_to("kafka", "orders.kafka")
///             .to(|order_id: i64| async move { Response::new(handle(order_id).await) })
///     }
/// }
/// // Discovery: the macro also submits `|| handle {}.into_route()` to
/// // `inventory`; by hand, register it with `App::subscriber(handle {})`.
/// # fn main() {}
/// ```
#[proc_macro_attribute]
pub fn subscriber(args: TokenStream, item: TokenStream) -> TokenStream {
    subscriber::expand(args.into(), item.into()).into()
}

/// Publishes a `#[subscriber]`'s return value to a transport.
///
/// ```no_run
/// use outbox_core::{publish_to, subscriber};
///
/// #[publish_to(kafka, "orders.kafka")]
/// #[subscriber("orders")]
/// async fn handle(order_id: i64) -> i64 {
///     order_id
/// }
/// # fn main() {}
/// ```
///
/// # Grammar
///
/// ```text
/// publish_to := TRANSPORT ',' DESTINATION
/// TRANSPORT  := IDENT        (the transport's registered name: `kafka`)
/// DESTINATION := STRING      (topic, exchange, subject…; not empty)
/// ```
///
/// `#[publish_to]` goes **above** `#[subscriber]` on the same fn: attributes
/// expand top-down, and `#[publish_to]` hands its target to the
/// `#[subscriber]` below it. Stack several to publish to several targets:
///
/// ```no_run
/// use outbox_core::{Response, publish_to, subscriber};
///
/// #[derive(serde::Serialize)]
/// struct Shipped { order_id: i64 }
///
/// #[publish_to(kafka, "orders.shipped")]
/// #[publish_to(audit, "shipping")]
/// #[subscriber("orders")]
/// async fn ship(order_id: i64) -> Option<Response<Shipped>> {
///     (order_id > 0).then(|| Response::new(Shipped { order_id }).key(order_id.to_string()))
/// }
/// # fn main() {}
/// ```
///
/// # Typing requirements
///
/// The fn's return type decides what is published (see
/// [`macro@subscriber`] for the table of shapes): a plain `T` must implement
/// `serde::Serialize`; `Result`/`Option` forward their `Ok`/`Some` value;
/// `Response<T>` sets a key, headers or a correlation id; `()` and `None`
/// publish nothing. An unserializable type is a compile error at the return
/// type.
///
/// # Semantics
///
/// `#[publish_to(kafka, "orders.kafka")]` generates no code of its own: it
/// adds the target to the route `#[subscriber]` builds, as
/// `.publish_to("kafka", "orders.kafka")`. The transport name is checked by
/// `App::run`: it fails before consuming anything if no transport of that
/// name is registered (`App::transport(..)` or a startup hook such as
/// `kafka.connect()`).
///
/// For each row, the handler runs once; its encoded result goes to every
/// target concurrently, with the headers `content-type`, `correlation_id`
/// (the row's, unless the `Response` sets one) and `outbox-id` (the row id,
/// for deduplication), plus the row's own headers (by default; opt out with
/// `propagate_headers = false` on the `#[subscriber]`). The row is acked
/// only after **every** target confirmed; if any publish fails, that is a
/// handler error: the row is retried by the subscriber's retry strategy (and
/// every target is published again), then dead-lettered.
///
/// # Errors
///
/// At compile time, at the offending token: a missing or empty destination,
/// a transport that is not an identifier (`"kafka"` in quotes), extra
/// arguments, no `#[subscriber(..)]` below, or `#[publish_to]` placed under
/// `#[subscriber]`:
///
/// ```compile_fail
/// use outbox_core::{publish_to, subscriber};
///
/// #[subscriber("orders")]
/// #[publish_to(kafka, "orders.kafka")] // place `#[publish_to]` above `#[subscriber]`
/// async fn handle(order_id: i64) -> i64 { order_id }
/// # fn main() {}
/// ```
///
/// # Equivalent code without `#[publish_to]`
///
/// One `.publish_to(transport, destination)` per attribute on the route
/// builder, and the return value wrapped in `Response::new`:
///
/// ```no_run
/// use outbox_core::{Response, Route};
///
/// let route = Route::builder(["orders"])
///     .publish_to("kafka", "orders.shipped")
///     .publish_to("audit", "shipping")
///     .to(|order_id: i64| async move { Response::new(order_id) });
/// # let _ = route;
/// ```
#[proc_macro_attribute]
pub fn publish_to(args: TokenStream, item: TokenStream) -> TokenStream {
    publish_to::expand(args.into(), item.into()).into()
}

/// Not public API: the name of every `#[subscriber(..)]` option, as a
/// `&[&str]` expression. The workspace's tests compare it with the runtime
/// builders' options (`outbox_core::__private::SUBSCRIBER_OPTION_NAMES`), so
/// an option added to one and not the other fails a test naming it.
#[doc(hidden)]
#[proc_macro]
pub fn __subscriber_option_names(input: TokenStream) -> TokenStream {
    if !input.is_empty() {
        return quote::quote!(::core::compile_error!("takes no arguments")).into();
    }
    let names = symbol::OPTIONS;
    quote::quote!(&[#(#names),*]).into()
}
