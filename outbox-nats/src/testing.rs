//! NATS in handler tests (feature `testing`): capture what
//! `#[publish_to(nats, ...)]` handlers publish, without a server.
//!
//! [`TestNats`] is [`outbox_core::MemoryTransport`]: register
//! [`test_nats()`] (named `nats`, like
//! [`NatsBroker::connect`](crate::NatsBroker::connect)) on an
//! [`outbox_core::testing::TestApp`], then read the messages with
//! `messages_to("subject")` (subject, key, payload, headers as the runtime
//! assembled them; [`NatsTransport`](crate::NatsTransport) sends the key as
//! the `outbox-key` header) and make the next publishes fail with
//! `fail_next(n)` to test the retry path.
//!
//! ```
//! use outbox_core::testing::{OutgoingExt, TestApp};
//! use outbox_core::{BoxError, Message, Response, Route};
//! use outbox_nats::testing::test_nats;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let nats = test_nats();
//! let relay = Route::builder(["orders"])
//!     .publish_to("nats", "orders.created")
//!     .handler(|msg: Message, _| async move {
//!         let id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(id).header("x-source", "billing"))
//!     });
//! let app = TestApp::builder().without_discovery().subscriber(relay).transport(nats.clone()).start().await?;
//! app.publish(&1_i64, "orders").await?;
//! let msg = &nats.messages_to("orders.created")[0];
//! assert_eq!(msg.value::<i64>()?, 1);
//! assert_eq!(msg.header("x-source"), Some("billing"));
//! app.stop().await?;
//! # Ok(()) }
//! ```

use crate::config::DEFAULT_NAME;

pub use outbox_core::MemoryTransport as TestNats;

/// A capturing transport registered under [`DEFAULT_NAME`] (`nats`), in
/// place of [`NatsBroker::connect`](crate::NatsBroker::connect).
///
/// ```
/// assert_eq!(outbox_core::Transport::name(&outbox_nats::testing::test_nats()), "nats");
/// ```
pub fn test_nats() -> TestNats {
    TestNats::new(DEFAULT_NAME)
}
