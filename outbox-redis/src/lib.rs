// Module map. Each file uses only files listed above it, so dependencies point
// one way (no import cycle) and the list reads from the foundations up. The
// `layering` test (tests/layering.rs: outbox_conformance::layering) checks it
// against the code (`crate::` and `super::` paths, tests included), the
// `[uses ..]` lists too.
//
//   error.rs        the crate's one error enum and its classification (is_retryable)
//   faststream.rs   FastStream's binary Redis message format: encode, decode, the
//                   header mapping of an Outgoing [uses error]
//   config.rs       settings and defaults; the client and connection-manager
//                   configuration; URL password redaction [uses error]
//   destination.rs  destination syntax (stream:/list:/channel:) and name rules
//                   [uses error]
//   transport.rs    RedisTransport, the outbox_core::Transport impl: one command per
//                   message, the one deadline, BusRejection; the startup TYPE check
//                   [uses config, destination, error, faststream]
//   broker.rs       RedisBroker: the typed builder, its TransportBroker impl
//                   (connect_transport checks the server; connect() is outbox-core's
//                   shared registration step) [uses config, error, transport]
//   testing.rs      (feature testing) test_redis(), a capturing stand-in [uses config]
//   lib.rs          these docs and the re-exports: the public API
//
// In short (A <- B: B uses A): error <- faststream, config, destination <-
// transport <- broker <- lib.

//! # outbox-redis
//!
//! The Redis transport of [`outbox_core`]: handler results of routes with
//! `publish_to("redis", "stream:orders")` become Redis stream entries (or
//! list elements, or Pub/Sub messages) in the layout FastStream's Redis
//! subscriber reads natively, written with the
//! [redis](https://docs.rs/redis) crate.
//!
//! ```no_run
//! use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
//! use outbox_redis::RedisBroker;
//!
//! # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
//! let redis = RedisBroker::new("redis://127.0.0.1:6379");
//! let relay = Route::builder(["orders"])
//!     .publish_to("redis", "stream:orders") // or "orders", "list:orders", "channel:orders"
//!     .handler(|msg: Message, _| async move {
//!         let order_id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(order_id).key(order_id.to_string()))
//!     });
//! App::new(outbox)
//!     .subscriber(relay)
//!     .on_startup(redis.connect()) // connects, checks PING, registers "redis"
//!     .run()
//!     .await
//! # }
//! ```
//!
//! With the macro: `#[publish_to(redis, "stream:orders")]`. A FastStream
//! application reads the messages with `@broker.subscriber(stream="orders")`
//! (or `list="orders"`, `channel="orders"`) and gets the body, content type,
//! correlation id, headers and message id (the outbox row id) without custom
//! code.
//!
//! [`RedisBroker::connect`] is a startup hook: it connects, checks that the
//! server answers `PING` with the URL's credentials within
//! [`connect_timeout`](RedisBroker::connect_timeout) (10 s) and registers the
//! transport. If the server is unreachable or refuses the credentials,
//! `App::run` fails before anything is consumed, with an error naming the
//! URL (password redacted) and what to check.
//! [`RedisBroker::connect_transport`] gives a [`RedisTransport`] without an
//! `App`. `RedisBroker` is a
//! [`TransportBroker`](outbox_core::transport::TransportBroker) and the crate
//! passes the transport conformance kit (`tests/tests/conformance_redis.rs`)
//! against a real server.
//!
//! ## Destinations: which Redis structure
//!
//! The route's destination names the structure and the key, as FastStream's
//! subscribers do (`StreamSub`, `ListSub`, `channel`):
//!
//! | destination | command | FastStream subscriber | delivery |
//! |---|---|---|---|
//! | `stream:orders` or `orders` | `XADD orders [MAXLEN ~ n] * __data__ <msg>` | `stream="orders"` / `StreamSub("orders", group=…)` | durable as far as Redis persists; at least once |
//! | `list:orders` | `RPUSH orders <msg>` | `list="orders"` / `ListSub("orders")` | durable as far as Redis persists; at least once; each element taken by one consumer |
//! | `channel:orders` | `PUBLISH orders <msg>` | `channel="orders"` | **at most once**: only subscribers connected at that moment get it |
//!
//! Only these three prefixes are special: `orders:eu` is the stream
//! `orders:eu`; a stream whose key starts with `list:` is written
//! `stream:list:…`. An empty name, surrounding whitespace or a control
//! character fails `App::run` at startup
//! ([`check_destination`](outbox_core::Transport::check_destination)).
//!
//! ## The startup check on the server
//!
//! After the startup hooks connected the transport, `App::run` asks the
//! server about each distinct destination
//! ([`verify_destination`](outbox_core::Transport::verify_destination))
//! before anything is consumed. Redis creates a stream or a list on the
//! first `XADD` or `RPUSH`, so a **missing key is fine**; the check sends
//! `TYPE <key>` and refuses a key that holds **another type** (a string,
//! a hash, a list where a stream is expected…), which every publish would
//! fail with `WRONGTYPE`:
//!
//! ```text
//! subscriber `relay` publishes to `stream:orders` on transport `redis`, which is not ready
//! for it: Redis key "orders" holds a list, not a stream (XADD would fail with WRONGTYPE):
//! delete or rename the key (DEL / RENAME), or name the right kind in the route
//! (`list:orders`), or publish to another key
//! ```
//!
//! A `channel:` destination has nothing to check (Pub/Sub channels are not
//! keys; whether anyone listens is known only at `PUBLISH`). The check is
//! bounded by [`publish_timeout`](RedisBroker::publish_timeout): a server
//! that fails or does not answer by then fails startup with `could not
//! check the type of Redis key …: <cause>`. An ACL that denies `TYPE`
//! (`NOPERM`) skips the check with a warning. A key whose type changes
//! after startup is still refused at publish (`WRONGTYPE`, below).
//!
//! ## Delivery contract
//!
//! [`Transport::publish`](outbox_core::Transport::publish) resolves `Ok`
//! only on the command's successful reply: the `XADD` entry id, the `RPUSH`
//! length, a `PUBLISH` count (see below). The runtime deletes the outbox row
//! only after that. Any failure is an error and the row is retried.
//!
//! *Streams and lists* are then in the server's memory. Whether they survive
//! a Redis crash is Redis's persistence configuration: with `appendonly yes`
//! and `appendfsync everysec` (the usual setting) up to about one second of
//! acknowledged writes can be lost when the server (or its machine) dies;
//! `appendfsync always` loses none, at a throughput cost; with RDB snapshots
//! only, everything since the last snapshot. Replication is asynchronous:
//! a failover can lose writes the old primary acknowledged. The transport
//! does not send `WAIT` (it would block the shared multiplexed connection);
//! if you need replica acknowledgement, configure `min-replicas-to-write`
//! on the server. The outbox row is deleted on the primary's reply, so the
//! message is as durable as your Redis is.
//!
//! *Pub/Sub* keeps nothing: `PUBLISH` replies with the number of
//! subscribers that received the message. **Zero is an error by default**
//! ([`Error::NoSubscriber`], transient): the row stays in the outbox and is
//! retried until a subscriber listens (or the retry strategy dead-letters
//! it). [`RedisBroker::allow_no_subscribers`] confirms a zero count too, for
//! notifications that may be missed. Even with a subscriber, a subscriber
//! that disconnects before reading (or is too slow: `client-output-buffer-limit
//! pubsub`) loses it: Pub/Sub is at most once past the `PUBLISH`.
//!
//! A message can arrive **more than once** on streams and lists: when the
//! relay crashes between Redis's reply and the row's delete, or when a
//! publish timed out after Redis executed it, the row is published again.
//! Consumers deduplicate with the FastStream `message_id` (= the `outbox-id`
//! header, the outbox row id, the same on every copy).
//!
//! ## What a message looks like
//!
//! FastStream 0.7's default `BinaryMessageFormatV1` (see [`faststream`]):
//! one binary string holding a header table and the body. For a stream it is
//! the entry's only field, `__data__`; for a list the element; for Pub/Sub
//! the payload.
//!
//! | FastStream header | content | FastStream reads it as |
//! |---|---|---|
//! | `correlation_id` | the response's correlation id, else the inbound row's | `msg.correlation_id` |
//! | `content-type` | `application/json`, `text/plain`, … (absent for raw bytes) | `msg.content_type`, decoding of the body |
//! | `message_id` | the outbox row id (`outbox-id`), unless the headers have a `message_id` | `msg.message_id` |
//! | `outbox-id` | the outbox row id | `msg.headers["outbox-id"]` |
//! | `outbox-key` | [`Response::key`](outbox_core::Response::key), when given (must be UTF-8) | `msg.headers["outbox-key"]` |
//! | explicit and propagated headers | [`Response::header`](outbox_core::Response::header), the inbound row's headers | `msg.headers[...]` |
//!
//! The body is the handler's result encoded like a published body, byte for
//! byte. Redis structures have no message key: the key is carried as the
//! `outbox-key` header and does not affect where the message goes. A header
//! named `reply_to` is FastStream's reply address (a FastStream handler that
//! returns a value publishes it there).
//!
//! ## Settings
//!
//! | setter | default | why |
//! |---|---|---|
//! | [`RedisBroker::new`] | (required) | `redis://[[user]:password@]host[:port][/db]` |
//! | [`name`](RedisBroker::name) | `redis` | |
//! | [`connect_timeout`](RedisBroker::connect_timeout) | 10 s | the startup check, and each reconnect attempt |
//! | [`publish_timeout`](RedisBroker::publish_timeout) | 10 s | the one deadline of a publish, reconnects included: [`RedisTransport::max_publish_time`]; below the default `lease_ttl` (60 s) |
//! | [`stream_maxlen`](RedisBroker::stream_maxlen) | none | `MAXLEN ~ n` on every `XADD` |
//! | [`max_message_bytes`](RedisBroker::max_message_bytes) | 512 MiB | Redis's default `proto-max-bulk-len`; a larger message is a permanent refusal |
//! | [`allow_no_subscribers`](RedisBroker::allow_no_subscribers) | `false` | a `PUBLISH` that reached nobody fails |
//!
//! The password is redacted in `Debug` output and errors. `rediss://` (TLS)
//! needs a TLS feature of the re-exported [`redis`] crate in your own
//! `Cargo.toml` (`redis = { version = "1.8", features = ["tokio-rustls-comp"] }`;
//! cargo unifies features); unix sockets (`redis+unix:///path`) work as they
//! are. Redis Cluster and Sentinel are not supported.
//!
//! `max_message_bytes` defaults to Redis's default `proto-max-bulk-len`: a
//! larger bulk string makes the server drop the connection, which would look
//! like an outage, so the transport refuses it before sending. It is a
//! ceiling, not advice: Redis copies a large value while every other client
//! waits; lower it to what your consumers and memory take.
//!
//! ## Outages
//!
//! The transport uses one multiplexed connection (a redis-rs
//! `ConnectionManager`) that reconnects by itself after a failure. A publish
//! whose connection fails (refused, reset) is retried on the new connection
//! within the same deadline; a publish not confirmed within
//! `publish_timeout` fails with [`Error::Timeout`], the row is nacked and the
//! subscriber's retry strategy schedules the next attempt. A timeout also
//! replaces the connection, so that one that hangs without failing (a
//! half-open TCP connection after a network partition) is not used again. Rows survive an
//! outage of about `max_attempts × publish_timeout + the strategy's delays`
//! (with the default `ExponentialRetry`, 10 attempts, about 10 minutes);
//! then they are dead-lettered (`retry_terminal`). The App warns when a
//! transport confirmed nothing for `outage_warning_after` while messages
//! wait.
//!
//! ## Permanent refusals
//!
//! These come wrapped in an [`outbox_core::BusRejection`] (the row is
//! dead-lettered at once as `rejected` under the default retry strategy, the
//! [`enum@Error`] in `last_exception`):
//!
//! - `WRONGTYPE`: the destination key holds another type (a list where a
//!   stream is expected…): [`Error::WrongType`] names the key, both types and
//!   the fix (delete or rename the key, or name the right kind). A key of
//!   another type at startup fails `App::run` instead (see above); this is a
//!   key whose type changed since;
//! - a message over `max_message_bytes`: [`Error::TooLarge`];
//! - a header FastStream's format cannot hold (over 65,535 bytes) or a
//!   non-UTF-8 key: [`Error::InvalidMessage`];
//! - `NOPERM`: an ACL denies the command or the key.
//!
//! Transient (retried): timeouts and lost connections, `OOM` (memory at
//! `maxmemory` with `noeviction`: consumers trimming streams free memory),
//! `READONLY` (a replica after a failover), `LOADING`, `BUSY`, no Pub/Sub
//! subscriber. Refused credentials (`WRONGPASS`, `NOAUTH`) fail the startup
//! check with [`Error::Auth`]; if they start failing later (a rotated
//! password), the publishes fail and are retried.

mod broker;
mod config;
mod destination;
mod error;
pub mod faststream;
mod transport;

pub use broker::RedisBroker;
pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_NAME, DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_URL,
};
pub use destination::{Destination, Kind, check_destination};
pub use error::{Error, Result};
pub use transport::{Confirmed, RedisTransport};

/// The `redis` crate this transport is built on (for reading back, or the
/// connection of [`RedisTransport::connection`]).
pub use redis;

#[cfg(feature = "testing")]
pub mod testing;
