//! Kafka in handler tests (feature `testing`): capture what `#[publish_to(kafka, ...)]`
//! handlers produce, without a cluster.
//!
//! [`TestKafka`] is [`outbox_core::MemoryTransport`]:
//! register [`test_kafka()`] (named `kafka`, like
//! [`KafkaBroker::connect`](crate::KafkaBroker::connect)) on an
//! [`outbox_core::testing::TestApp`], then read the records with
//! `messages_to("topic")` (topic, key, value, headers exactly as
//! [`KafkaTransport`](crate::KafkaTransport) would produce them) and make the
//! next publishes fail with `fail_next(n)` to test the retry path.
//!
//! ```
//! use outbox_core::testing::{OutgoingExt, TestApp};
//! use outbox_core::{BoxError, Message, Response, Route};
//! use outbox_kafka::testing::test_kafka;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let kafka = test_kafka();
//! let relay = Route::builder(["orders"])
//!     .publish_to("kafka", "orders.kafka")
//!     .handler(|msg: Message, _| async move {
//!         let id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(id).key(format!("order-{id}")).header("x-source", "billing"))
//!     });
//! let app = TestApp::builder().without_discovery().subscriber(relay).transport(kafka.clone()).start().await?;
//! app.publish(&1_i64, "orders").await?;
//! let record = &kafka.messages_to("orders.kafka")[0];
//! assert_eq!(record.value::<i64>()?, 1);
//! assert_eq!(record.key_str(), Some("order-1"));
//! assert_eq!(record.header("x-source"), Some("billing"));
//! app.stop().await?;
//! # Ok(()) }
//! ```

use crate::config::DEFAULT_NAME;

pub use outbox_core::MemoryTransport as TestKafka;

/// A capturing transport registered under [`DEFAULT_NAME`]
/// (`kafka`), in place of [`KafkaBroker::connect`](crate::KafkaBroker::connect).
///
/// ```
/// assert_eq!(outbox_core::Transport::name(&outbox_kafka::testing::test_kafka()), "kafka");
/// ```
pub fn test_kafka() -> TestKafka {
    TestKafka::new(DEFAULT_NAME)
}
