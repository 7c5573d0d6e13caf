//! Redis in handler tests (feature `testing`): capture what
//! `#[publish_to(redis, ...)]` handlers publish, without a server.
//!
//! [`TestRedis`] is [`outbox_core::MemoryTransport`]: register
//! [`test_redis()`] (named `redis`, like
//! [`RedisBroker::connect`](crate::RedisBroker::connect)) on an
//! [`outbox_core::testing::TestApp`], then read the messages with
//! `messages_to("stream:orders")` (destination, key, payload, headers as the
//! runtime handed them to the transport; the transport would write them in
//! FastStream's format, see [`crate::faststream::encode_outgoing`]) and make
//! the next publishes fail with `fail_next(n)` to test the retry path.
//!
//! ```
//! use outbox_core::testing::{OutgoingExt, TestApp};
//! use outbox_core::{BoxError, Message, Response, Route};
//! use outbox_redis::testing::test_redis;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let redis = test_redis();
//! let relay = Route::builder(["orders"])
//!     .publish_to("redis", "stream:orders")
//!     .handler(|msg: Message, _| async move {
//!         let id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(id).header("x-source", "billing"))
//!     });
//! let app = TestApp::builder().without_discovery().subscriber(relay).transport(redis.clone()).start().await?;
//! app.publish(&1_i64, "orders").await?;
//! let message = &redis.messages_to("stream:orders")[0];
//! assert_eq!(message.value::<i64>()?, 1);
//! assert_eq!(message.header("x-source"), Some("billing"));
//! app.stop().await?;
//! # Ok(()) }
//! ```

use crate::config::DEFAULT_NAME;

pub use outbox_core::MemoryTransport as TestRedis;

/// A capturing transport registered under [`DEFAULT_NAME`] (`redis`), in
/// place of [`RedisBroker::connect`](crate::RedisBroker::connect).
///
/// ```
/// assert_eq!(outbox_core::Transport::name(&outbox_redis::testing::test_redis()), "redis");
/// ```
pub fn test_redis() -> TestRedis {
    TestRedis::new(DEFAULT_NAME)
}
