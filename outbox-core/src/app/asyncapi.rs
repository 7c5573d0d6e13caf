//! [`AsyncApi`]: the application's AsyncAPI 3.0.0 document, generated from
//! its routes and transports ([`App::asyncapi`](super::App::asyncapi)).
//!
//! What it lists:
//!
//! - **servers**: the outbox (`outbox`, protocol `postgresql`: host, port and
//!   database of the pool, never the user or password) and every registered
//!   transport that describes its bus ([`Transport::server`](crate::transport::Transport::server),
//!   [`TransportBroker::server`](crate::transport::TransportBroker::server)),
//!   under the transport's name;
//! - **channels**: one per outbox queue consumed (`outbox.<queue>`) and one
//!   per relayed destination (`<transport>.<destination>`; a destination of
//!   the `outbox` transport is the queue's own channel), the real name in
//!   `address`;
//! - **operations**: each route `receive`s from its queues
//!   (`<route>.receive`) and `send`s its result to each target
//!   (`<route>.send.<n>`); each registered
//!   [`OutboxPublisher`](crate::OutboxPublisher)
//!   ([`App::publisher`](super::App::publisher)) `send`s to its queue's
//!   channel (`<title>.send`, the title defaulting to `<queue>:Publisher`);
//! - **messages**: per route, the consumed row and the relayed result, with
//!   the envelope headers (`content-type`, `correlation_id`, and `outbox-id`
//!   on relayed messages), `correlationId` pointing at the header, and the
//!   payload's JSON Schema from the handler's types (feature `schemars`;
//!   definitions under `components.schemas`), or a placeholder naming the
//!   Rust type;
//! - **`x-outbox`**: the table and dead-letter table (document root), and
//!   per receive operation the subscriber's options (queues, retry and ack
//!   policy, ordering and poison policy, claim mode, lease, workers…).
//!
//! The document is checked by the official parser (`@asyncapi/parser`) in
//! `tests/tests/asyncapi.rs`.

use std::any::type_name;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde_json::{Map, Value, json};

use super::route::Route;
use crate::broker::OutboxBroker;
use crate::envelope::{CONTENT_TYPE, CORRELATION_ID, JSON, TEXT};
use crate::error::{Error, Result};
use crate::publisher::OutboxPublisher;
use crate::transport::ServerInfo;
use crate::transport::headers::OUTBOX_ID;
use crate::transport::outbox::OUTBOX_TRANSPORT;

/// The AsyncAPI version of the generated documents.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// The environment variable [`App::run`](super::App::run) reads: set to
/// `json` (or `yaml`, feature `yaml`), `run` writes the AsyncAPI document
/// and exits the process (status 0) before running any hook: nothing is
/// connected or consumed by the App. `outbox docs gen -- <program>` sets it.
pub const ASYNCAPI_ENV: &str = "OUTBOX_ASYNCAPI";

/// With [`ASYNCAPI_ENV`] set, the file the document is written to (default:
/// standard output).
pub const ASYNCAPI_OUT_ENV: &str = "OUTBOX_ASYNCAPI_OUT";

/// An AsyncAPI 3.0.0 document ([`App::asyncapi`](super::App::asyncapi)).
///
/// ```
/// # fn demo(doc: outbox_core::AsyncApi) -> Result<(), outbox_core::Error> {
/// let json: String = doc.to_json_pretty();
/// assert!(json.contains("\"asyncapi\": \"3.0.0\""));
/// let value: &serde_json::Value = doc.as_value();
/// assert!(value["channels"].is_object());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncApi {
    doc: Value,
}

impl AsyncApi {
    /// The document as a JSON value.
    pub fn as_value(&self) -> &Value {
        &self.doc
    }

    /// The document as a JSON value, owned.
    pub fn into_value(self) -> Value {
        self.doc
    }

    /// Compact JSON.
    pub fn to_json(&self) -> String {
        self.doc.to_string()
    }

    /// Indented JSON.
    pub fn to_json_pretty(&self) -> String {
        // A `Value` with string keys always serializes.
        serde_json::to_string_pretty(&self.doc).unwrap_or_else(|_| self.doc.to_string())
    }

    /// YAML (feature `yaml`).
    #[cfg(feature = "yaml")]
    pub fn to_yaml(&self) -> Result<String> {
        serde_norway::to_string(&self.doc)
            .map_err(|e| Error::config(format!("cannot write the AsyncAPI document as YAML: {e}")))
    }

    /// The document in `format`: `json` (indented) or `yaml` (feature
    /// `yaml`).
    pub fn render(&self, format: &str) -> Result<String> {
        match format.trim() {
            "json" => Ok(self.to_json_pretty()),
            #[cfg(feature = "yaml")]
            "yaml" | "yml" => self.to_yaml(),
            #[cfg(not(feature = "yaml"))]
            "yaml" | "yml" => Err(Error::config(
                "AsyncAPI as YAML needs outbox-core's `yaml` feature; ask for json (the \
                 `outbox docs gen` command converts it)",
            )),
            other => Err(Error::config(format!(
                "unknown AsyncAPI format `{other}`: json or yaml"
            ))),
        }
    }
}

/// Collects the JSON Schemas of payload types while a document is built;
/// definitions shared by several types end up in `components.schemas`.
/// A [`SchemaFn`] receives it.
pub struct SchemaGen {
    #[cfg(feature = "schemars")]
    inner: schemars::SchemaGenerator,
    _private: (),
}

impl std::fmt::Debug for SchemaGen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaGen").finish_non_exhaustive()
    }
}

impl SchemaGen {
    fn new() -> Self {
        Self {
            #[cfg(feature = "schemars")]
            inner: schemars::generate::SchemaSettings::draft07()
                .with(|s| {
                    s.definitions_path = "/components/schemas".into();
                    s.meta_schema = None;
                })
                .into_generator(),
            _private: (),
        }
    }

    /// The generator of `schemars` (feature `schemars`).
    #[cfg(feature = "schemars")]
    pub fn schemars(&mut self) -> &mut schemars::SchemaGenerator {
        &mut self.inner
    }

    #[cfg(feature = "schemars")]
    fn definitions(&mut self) -> Map<String, Value> {
        self.inner.take_definitions(true)
    }

    #[cfg(not(feature = "schemars"))]
    fn definitions(&mut self) -> Map<String, Value> {
        Map::new()
    }
}

/// A function producing the JSON Schema of a payload type (a route's body
/// or result), registered with
/// [`RouteBuilder::payload_schema`](super::RouteBuilder::payload_schema) /
/// [`RouteBuilder::reply_schema`](super::RouteBuilder::reply_schema);
/// `#[subscriber]` registers them from the fn's types. See [`schema_of`] and
/// [`placeholder_schema`].
pub type SchemaFn = fn(&mut SchemaGen) -> Value;

/// The schema of one payload type: the Rust type's name and how to build
/// its JSON Schema. `#[subscriber]` registers them from the fn's body and
/// result types; a hand-built route passes them to
/// [`RouteBuilder::payload_schema`](super::RouteBuilder::payload_schema) and
/// [`RouteBuilder::reply_schema`](super::RouteBuilder::reply_schema).
#[derive(Debug, Clone, Copy)]
pub struct PayloadSchema {
    rust_type: &'static str,
    schema: SchemaFn,
}

impl PayloadSchema {
    /// `schema` builds the JSON Schema of the type named `rust_type`.
    pub fn new(rust_type: &'static str, schema: SchemaFn) -> Self {
        Self { rust_type, schema }
    }

    /// The JSON Schema of `T` (feature `schemars`), see [`schema_of`].
    #[cfg(feature = "schemars")]
    pub fn of<T: schemars::JsonSchema + ?Sized>() -> Self {
        Self::new(type_name::<T>(), schema_of::<T>)
    }

    /// A placeholder naming `T`, see [`placeholder_schema`].
    pub fn placeholder<T: ?Sized>() -> Self {
        Self::new(type_name::<T>(), placeholder_schema::<T>)
    }

    /// The Rust type's name.
    pub fn rust_type(&self) -> &'static str {
        self.rust_type
    }
}

/// The JSON Schema of `T` (feature `schemars`): a `$ref` into
/// `components.schemas` for named types, inline for the others.
///
/// ```
/// # #[cfg(feature = "schemars")] {
/// use outbox_core::{Message, Response, Route, asyncapi::PayloadSchema};
///
/// let route = Route::builder(["orders"])
///     .payload_schema(PayloadSchema::of::<i64>())
///     .handler(|msg: Message, _| async move { msg.decode::<i64>().map(Response::new) });
/// # let _ = route;
/// # }
/// ```
#[cfg(feature = "schemars")]
pub fn schema_of<T: schemars::JsonSchema + ?Sized>(g: &mut SchemaGen) -> Value {
    g.inner.subschema_for::<T>().to_value()
}

/// The schema of a type that has none (no `schemars::JsonSchema`, or the
/// feature off): any value, described by the Rust type's name.
pub fn placeholder_schema<T: ?Sized>(_: &mut SchemaGen) -> Value {
    let ty = type_name::<T>();
    let mut s = json!({
        "description": format!(
            "`{ty}`: no JSON Schema (derive `schemars::JsonSchema` on it and enable \
             outbox-core's `schemars` feature)"
        ),
        "x-rust-type": ty,
    });
    if let Some(t) = text_type::<T>() {
        s["type"] = json!(t);
    }
    s
}

fn text_type<T: ?Sized>() -> Option<&'static str> {
    match type_name::<T>() {
        "alloc::string::String" | "&str" | "char" => Some("string"),
        _ => None,
    }
}

/// The content type the envelope gives a payload of type `T`: `text/plain`
/// for strings, none for `()`, else `application/json` (raw bytes have none;
/// they are documented as JSON's fallback).
fn content_type_of(ty: &str) -> Option<&'static str> {
    match ty {
        "alloc::string::String" | "&str" | "char" => Some(TEXT),
        "()" => None,
        _ => Some(JSON),
    }
}

/// The schema hook of one handler parameter or result, as `#[subscriber]`
/// emits it (not public API). Resolved by autoref specialisation on a
/// concrete type: parameters that are not a body ([`NotBody`]) give `None`,
/// types with a JSON Schema (feature `schemars`) give [`schema_of`], the
/// others [`placeholder_schema`].
#[doc(hidden)]
pub struct SchemaProbe<T: ?Sized>(PhantomData<T>);

impl<T: ?Sized> SchemaProbe<T> {
    /// The probe of `T`.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T: ?Sized> Default for SchemaProbe<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: ?Sized> std::fmt::Debug for SchemaProbe<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SchemaProbe<{}>", type_name::<T>())
    }
}

/// Handler parameters that are not the message body (`Message`,
/// `MessageHeaders`, `State<S>`, `Passthrough`, `AppContext`).
#[doc(hidden)]
pub trait NotBody {}
impl NotBody for crate::engine::message::Message {}
impl NotBody for super::extract::MessageHeaders {}
impl<S> NotBody for super::extract::State<S> {}
impl NotBody for crate::envelope::Passthrough {}
impl NotBody for super::context::AppContext {}

/// Priority 1 of the probe: not a body.
#[doc(hidden)]
pub trait ProbeNotBody {
    /// `None`.
    fn outbox_schema(&self) -> Option<PayloadSchema>;
}
impl<T: NotBody + ?Sized> ProbeNotBody for &&SchemaProbe<T> {
    fn outbox_schema(&self) -> Option<PayloadSchema> {
        None
    }
}

/// Priority 2 of the probe: a type with a JSON Schema.
#[doc(hidden)]
pub trait ProbeJsonSchema {
    /// [`schema_of`].
    fn outbox_schema(&self) -> Option<PayloadSchema>;
}
#[cfg(feature = "schemars")]
impl<T: schemars::JsonSchema + ?Sized> ProbeJsonSchema for &SchemaProbe<T> {
    fn outbox_schema(&self) -> Option<PayloadSchema> {
        Some(PayloadSchema::of::<T>())
    }
}

/// Priority 3 of the probe: any other type.
#[doc(hidden)]
pub trait ProbePlaceholder {
    /// [`placeholder_schema`].
    fn outbox_schema(&self) -> Option<PayloadSchema>;
}
impl<T: ?Sized> ProbePlaceholder for SchemaProbe<T> {
    fn outbox_schema(&self) -> Option<PayloadSchema> {
        Some(PayloadSchema::placeholder::<T>())
    }
}

/// What the document needs from an App.
pub(crate) struct Source<'a> {
    pub(crate) broker: &'a OutboxBroker,
    pub(crate) routes: &'a [Route],
    /// Registered transports: name, and where its bus is if it says.
    pub(crate) transports: Vec<(String, Option<ServerInfo>)>,
    pub(crate) title: &'a str,
    pub(crate) version: &'a str,
    pub(crate) description: Option<&'a str>,
    /// Publishers registered for the document ([`App::publisher`](super::App::publisher)).
    pub(crate) publishers: &'a [OutboxPublisher],
}

/// A key usable in `channels`, `operations` and `components` (AsyncAPI
/// allows `[A-Za-z0-9._-]`).
fn key(raw: &str) -> String {
    let k: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if k.is_empty() { "_".to_owned() } else { k }
}

fn headers_schema(relayed: bool) -> Value {
    let mut props = Map::new();
    props.insert(
        CONTENT_TYPE.to_owned(),
        json!({"type": "string", "description": "The payload's content type (absent for raw bytes and empty bodies)", "examples": [JSON, TEXT]}),
    );
    props.insert(
        CORRELATION_ID.to_owned(),
        json!({"type": "string", "description": "Correlation id: given at publish, else a new UUID; carried from the row to the relayed message"}),
    );
    let mut required = vec![json!(CORRELATION_ID)];
    if relayed {
        props.insert(
            OUTBOX_ID.to_owned(),
            json!({"type": "string", "pattern": "^[0-9]+$", "description": "The outbox row id, for consumer-side deduplication (unique within one outbox table)"}),
        );
        props.insert(
            "outbox-key".to_owned(),
            json!({"type": "string", "description": "The ordering or response key, on buses without a native key (RabbitMQ, NATS, Redis)"}),
        );
        required.push(json!(OUTBOX_ID));
    }
    json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": {"type": "string"},
    })
}

fn secs(d: std::time::Duration) -> Value {
    json!(d.as_secs_f64())
}

/// The route's options, as `x-outbox` shows them.
fn route_extension(route: &Route, table: &str, name: &str) -> Value {
    let relays = !route.targets.is_empty();
    let o = route
        .builder
        .options_ref()
        .clone()
        .relay_defaults(relays || route.builder.options_ref().get_relay_defaults());
    let mut x = json!({
        "subscriber": name,
        "table": table,
        "queues": route.builder.queues(),
        "retry": format!("{:?}", o.get_retry()),
        "ackPolicy": format!("{:?}", o.get_ack_policy()),
        "maxDeliveries": o.get_max_deliveries(),
        "ordered": o.get_ordered(),
        "poisonPolicy": format!("{:?}", o.get_poison_policy()),
        "claimMode": format!("{:?}", o.get_claim_mode()),
        "maxHoldSeconds": secs(o.get_max_hold()),
        "leaseTtlSeconds": secs(o.get_lease_ttl()),
        "maxWorkers": o.get_max_workers(),
        "fetchBatchSize": o.get_fetch_batch_size(),
        "fetchConcurrency": o.get_fetch_concurrency(),
        "minFetchIntervalSeconds": secs(o.get_min_fetch_interval()),
        "maxFetchIntervalSeconds": secs(o.get_max_fetch_interval()),
        "terminalFlushBatchSize": o.get_terminal_flush_batch_size(),
        "propagateHeaders": route.propagate_headers,
    });
    if let Some(l) = route.location {
        x["location"] = json!(l.to_string());
    }
    x
}

struct Builder {
    gen_: SchemaGen,
    channels: Map<String, Value>,
    operations: Map<String, Value>,
    messages: Map<String, Value>,
    /// channel key -> its messages (key -> $ref)
    channel_messages: BTreeMap<String, Map<String, Value>>,
}

impl Builder {
    fn message(
        &mut self,
        id: &str,
        title: String,
        schema: Option<PayloadSchema>,
        relayed: bool,
    ) -> String {
        let mut m = json!({
            "name": id,
            "title": title,
            "headers": headers_schema(relayed),
            "correlationId": {
                "description": "The envelope's correlation id",
                "location": format!("$message.header#/{CORRELATION_ID}"),
            },
        });
        match schema {
            Some(PayloadSchema {
                rust_type: ty,
                schema: f,
            }) => {
                m["payload"] = f(&mut self.gen_);
                m["x-rust-type"] = json!(ty);
                if let Some(ct) = content_type_of(ty) {
                    m["contentType"] = json!(ct);
                }
            }
            None => {
                m["payload"] = json!({"description": "The handler's payload (no type information: a route built with `handler(..)` and no `payload_schema`)"});
            }
        }
        let id = key(id);
        self.messages.insert(id.clone(), m);
        id
    }

    fn attach(&mut self, channel: &str, message: &str) -> Value {
        self.channel_messages
            .entry(channel.to_owned())
            .or_default()
            .insert(
                message.to_owned(),
                json!({"$ref": format!("#/components/messages/{message}")}),
            );
        json!({"$ref": format!("#/channels/{channel}/messages/{message}")})
    }
}

pub(crate) fn build(src: &Source<'_>) -> Result<AsyncApi> {
    let table = src.broker.table();
    let table_name = match table.schema_name() {
        Some(s) => format!("{s}.{}", table.name()),
        None => table.name().to_owned(),
    };
    let mut servers = Map::new();
    let mut outbox = json!({
        "host": "localhost",
        "protocol": "postgresql",
        "description": format!("The transactional outbox: table {table_name} (rows are consumed, and relayed, by this application)"),
    });
    if let Ok(pool) = src.broker.try_pool() {
        let opts = pool.connect_options();
        outbox["host"] = json!(format!("{}:{}", opts.get_host(), opts.get_port()));
        if let Some(db) = opts.get_database() {
            outbox["pathname"] = json!(format!("/{db}"));
        }
    }
    servers.insert("outbox".to_owned(), outbox);
    let mut known: BTreeMap<&str, bool> = BTreeMap::new();
    for (name, server) in &src.transports {
        known.insert(name, server.is_some());
        let Some(s) = server else { continue };
        if name == "outbox" {
            continue;
        }
        let mut v = json!({
            "host": s.host,
            "protocol": s.protocol,
            "description": s.description.clone().unwrap_or_else(|| format!("Transport `{name}`")),
        });
        if let Some(p) = &s.pathname {
            v["pathname"] = json!(p);
        }
        servers.insert(key(name), v);
    }

    let mut b = Builder {
        gen_: SchemaGen::new(),
        channels: Map::new(),
        operations: Map::new(),
        messages: Map::new(),
        channel_messages: BTreeMap::new(),
    };
    let queue_channel = |q: &str| key(&format!("outbox.{q}"));
    for route in src.routes {
        let name = route.effective_name();
        let rkey = key(&name);
        // Consumed queues.
        let in_msg = b.message(
            &format!("{rkey}.row"),
            format!("Outbox row consumed by `{name}`"),
            route.schemas.payload,
            false,
        );
        let mut in_refs = Vec::new();
        let mut first_queue = None;
        for q in route.builder.queues() {
            let ch = queue_channel(q);
            first_queue.get_or_insert_with(|| ch.clone());
            b.channels.entry(ch.clone()).or_insert_with(|| {
                json!({
                    "address": q,
                    "title": format!("outbox queue {q}"),
                    "description": format!("Rows of queue `{q}` in the outbox table {table_name}"),
                    "servers": [{"$ref": "#/servers/outbox"}],
                    "x-outbox": {"table": table_name, "queue": q},
                })
            });
            in_refs.push((ch.clone(), b.attach(&ch, &in_msg)));
        }
        for (i, (ch, msg_ref)) in in_refs.into_iter().enumerate() {
            let op = if i == 0 {
                format!("{rkey}.receive")
            } else {
                format!("{rkey}.receive.{i}")
            };
            b.operations.insert(
                op,
                json!({
                    "action": "receive",
                    "title": format!("{name}: consume queue {}", b.channels[&ch]["address"].as_str().unwrap_or_default()),
                    "summary": "Claims committed rows of the queue and runs the handler; the row is deleted once every target confirmed",
                    "channel": {"$ref": format!("#/channels/{ch}")},
                    "messages": [msg_ref],
                    "x-outbox": route_extension(route, &table_name, &name),
                }),
            );
        }
        // Relayed destinations.
        if route.targets.is_empty() {
            continue;
        }
        let out_msg = b.message(
            &format!("{rkey}.relayed"),
            format!("Result of `{name}`, relayed"),
            route.schemas.reply,
            true,
        );
        for (i, t) in route.targets.iter().enumerate() {
            let (ch, address) = if t.transport == OUTBOX_TRANSPORT {
                (queue_channel(&t.destination), t.destination.clone())
            } else {
                (
                    key(&format!("{}.{}", t.transport, t.destination)),
                    t.destination.clone(),
                )
            };
            if !b.channels.contains_key(&ch) {
                let mut c = if t.transport == OUTBOX_TRANSPORT {
                    json!({
                        "address": address,
                        "title": format!("outbox queue {address}"),
                        "description": format!("Rows of queue `{address}` in the outbox table {table_name}"),
                        "servers": [{"$ref": "#/servers/outbox"}],
                        "x-outbox": {"table": table_name, "queue": address},
                    })
                } else {
                    json!({
                        "address": address,
                        "title": format!("{} {address}", t.transport),
                        "description": format!("Destination `{address}` on transport `{}`", t.transport),
                        "x-outbox": {"transport": t.transport, "destination": address},
                    })
                };
                if t.transport != OUTBOX_TRANSPORT && known.get(t.transport.as_str()) == Some(&true)
                {
                    c["servers"] = json!([{"$ref": format!("#/servers/{}", key(&t.transport))}]);
                }
                b.channels.insert(ch.clone(), c);
            }
            let msg_ref = b.attach(&ch, &out_msg);
            b.operations.insert(
                format!("{rkey}.send.{i}"),
                json!({
                    "action": "send",
                    "title": format!("{name}: relay to {} {address}", t.transport),
                    "summary": "Publishes the handler's result; resolves once the bus confirmed it",
                    "channel": {"$ref": format!("#/channels/{ch}")},
                    "messages": [msg_ref],
                    "x-outbox": {
                        "subscriber": name,
                        "transport": t.transport,
                        "destination": address,
                        "registered": known.contains_key(t.transport.as_str()),
                        "fromQueue": first_queue.as_deref().map(|c| b.channels[c]["address"].clone()),
                    },
                }),
            );
        }
    }
    // Registered publishers: rows producers insert into a queue.
    for p in src.publishers {
        let queue = p.queue();
        let title = p.get_title();
        let ch = queue_channel(queue);
        b.channels.entry(ch.clone()).or_insert_with(|| {
            json!({
                "address": queue,
                "title": format!("outbox queue {queue}"),
                "description": format!("Rows of queue `{queue}` in the outbox table {table_name}"),
                "servers": [{"$ref": "#/servers/outbox"}],
                "x-outbox": {"table": table_name, "queue": queue},
            })
        });
        let mut pkey = key(&title);
        let mut n = 1;
        while b.operations.contains_key(&format!("{pkey}.send")) {
            n += 1;
            pkey = key(&format!("{title}.{n}"));
        }
        let msg = b.message(
            &format!("{pkey}.published"),
            format!("Row published by `{title}`"),
            None,
            false,
        );
        if let Some(m) = b.messages.get_mut(&msg) {
            m["payload"] = json!({"description": format!("The body given to `{title}` (any serializable value)")});
        }
        let msg_ref = b.attach(&ch, &msg);
        let mut op = json!({
            "action": "send",
            "title": title,
            "summary": format!("Inserts a row into queue {queue} in the producer's transaction"),
            "channel": {"$ref": format!("#/channels/{ch}")},
            "messages": [msg_ref],
            "x-outbox": {
                "publisher": title,
                "queue": queue,
                "table": table_name,
                "headers": p.defaults().get_headers(),
            },
        });
        if let Some(d) = p.get_description() {
            op["description"] = json!(d);
        }
        b.operations.insert(format!("{pkey}.send"), op);
    }
    for (ch, msgs) in std::mem::take(&mut b.channel_messages) {
        if let Some(c) = b.channels.get_mut(&ch) {
            c["messages"] = Value::Object(msgs);
        }
    }
    let mut components = Map::new();
    let schemas = b.gen_.definitions();
    if !schemas.is_empty() {
        components.insert("schemas".to_owned(), Value::Object(schemas));
    }
    components.insert("messages".to_owned(), Value::Object(b.messages));
    let mut info = json!({
        "title": src.title,
        "version": src.version,
        "description": src.description.map_or_else(
            || format!("Generated by outbox {} from the application's routes: the outbox queues it consumes and where it relays them.", env!("CARGO_PKG_VERSION")),
            str::to_owned,
        ),
    });
    if info["title"].as_str().is_some_and(str::is_empty) {
        info["title"] = json!("outbox application");
    }
    let mut x = json!({"table": table_name, "generator": format!("outbox-core {}", env!("CARGO_PKG_VERSION"))});
    if let Some(dlq) = src.broker.dlq() {
        x["deadLetterTable"] = json!(match dlq.schema_name() {
            Some(s) => format!("{s}.{}", dlq.name()),
            None => dlq.name().to_owned(),
        });
    }
    if src.routes.is_empty() {
        return Err(Error::config(
            "no subscribers to document: register routes (#[subscriber] or App::subscriber)",
        ));
    }
    Ok(AsyncApi {
        doc: json!({
            "asyncapi": ASYNCAPI_VERSION,
            "info": info,
            "defaultContentType": JSON,
            "servers": servers,
            "channels": b.channels,
            "operations": b.operations,
            "components": components,
            "x-outbox": x,
        }),
    })
}
