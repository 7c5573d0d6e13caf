//! RabbitMQ in handler tests (feature `testing`): capture what
//! `#[publish_to(rabbit, ...)]` handlers publish, without a broker.
//!
//! [`TestRabbit`] is [`outbox_core::MemoryTransport`]: register
//! [`test_rabbit()`] (named `rabbit`, like
//! [`RabbitBroker::connect`](crate::RabbitBroker::connect)) on an
//! [`outbox_core::testing::TestApp`], then read the messages with
//! `messages_to("destination")` (destination, key, body and headers as the
//! App hands them to [`RabbitTransport`](crate::RabbitTransport), before the
//! AMQP property mapping) and make the next publishes fail with
//! `fail_next(n)` to test the retry path.
//!
//! ```
//! use outbox_core::testing::{OutgoingExt, TestApp};
//! use outbox_core::{BoxError, Message, Response, Route};
//! use outbox_rabbitmq::testing::test_rabbit;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let rabbit = test_rabbit();
//! let relay = Route::builder(["orders"])
//!     .publish_to("rabbit", "billing/orders.created")
//!     .handler(|msg: Message, _| async move {
//!         let id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(id).header("x-source", "billing"))
//!     });
//! let app = TestApp::builder().without_discovery().subscriber(relay).transport(rabbit.clone()).start().await?;
//! app.publish(&1_i64, "orders").await?;
//! let sent = &rabbit.messages_to("billing/orders.created")[0];
//! assert_eq!(sent.value::<i64>()?, 1);
//! assert_eq!(sent.header("x-source"), Some("billing"));
//! app.stop().await?;
//! # Ok(()) }
//! ```

use crate::config::DEFAULT_NAME;

pub use outbox_core::MemoryTransport as TestRabbit;

/// A capturing transport registered under [`DEFAULT_NAME`] (`rabbit`), in
/// place of [`RabbitBroker::connect`](crate::RabbitBroker::connect).
///
/// ```
/// assert_eq!(outbox_core::Transport::name(&outbox_rabbitmq::testing::test_rabbit()), "rabbit");
/// ```
pub fn test_rabbit() -> TestRabbit {
    TestRabbit::new(DEFAULT_NAME)
}
