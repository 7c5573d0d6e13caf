//! One place for the per-delivery concerns layered around a handler: the
//! `outbox.deliver` tracing span, the continuation of the producer's
//! OpenTelemetry trace (feature `otel`), the observer's and the metrics'
//! "dispatched", the panic catch and the timing. The worker decides whether
//! the handler runs at all (`max_deliveries`) and what its result means (ack
//! policy, retry strategy); [`run`] only runs it.
//!
//! The layers, outermost first:
//!
//! 1. [`span`]: the `outbox.deliver` span (OpenTelemetry messaging
//!    attributes), which [`otel`] links to the producer's trace context;
//! 2. [`announce`]: the observer's `handler_called` and the `dispatched`
//!    counter, just before the handler starts;
//! 3. [`timed`]: the handler's duration, from just before its future is made
//!    to its result;
//! 4. [`catch_panic`]: a panicking handler is a [`HandlerPanic`] error.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tracing::{Instrument, Span};

use super::SubShared;
use crate::engine::message::{Delivery, Message};
use crate::error::{BoxError, HandlerPanic};
use crate::store::OutboxRow;
use crate::transport::outbox;

/// What a handler run gave: its result (a panic is an error) and how long it
/// took.
pub(super) struct Ran {
    pub(super) result: Result<(), BoxError>,
    pub(super) elapsed: Duration,
}

/// Runs the subscriber's handler for `delivery` inside every layer; keeps
/// the follow-on rows its result staged on the delivery (queue chaining:
/// an [`OutboxTransport`](crate::OutboxTransport) on the same database
/// stages them, see `engine::chain`).
pub(super) async fn run(shared: &SubShared, delivery: &Arc<Delivery>) -> Ran {
    let row = &delivery.row;
    let span = span(shared, row);
    otel(&span, row);
    let msg = Message::new(delivery.clone());
    announce(shared, row);
    let chain = outbox::Chain::new(shared.broker.clone());
    let (result, elapsed) = outbox::scope(
        chain.clone(),
        timed(|| catch_panic(shared.sub.handler().call(msg))),
    )
    .instrument(span)
    .await;
    delivery.set_chained(chain.take());
    Ran { result, elapsed }
}

/// Layer 1: the `outbox.deliver` span, with the OpenTelemetry messaging
/// attributes and the outbox's own fields.
fn span(shared: &SubShared, row: &OutboxRow) -> Span {
    tracing::info_span!(
        "outbox.deliver",
        otel.name = %format_args!("{} process", row.queue),
        otel.kind = "consumer",
        messaging.system = "outbox",
        messaging.operation.type = "process",
        messaging.destination.name = %row.queue,
        messaging.message.id = row.id,
        messaging.message.conversation_id = %row.correlation_id(),
        messaging.outbox.deliveries_count = row.deliveries_count,
        messaging.consumer.group.name = %shared.sub.name(),
        subscriber = %shared.sub.name(),
        queue = %row.queue,
        row_id = row.id,
        correlation_id = %row.correlation_id(),
        deliveries_count = row.deliveries_count,
    )
}

/// Layer 1, continued: the span continues the trace context the producer
/// stored in the row's headers (feature `otel`; nothing without it).
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
fn otel(span: &Span, row: &OutboxRow) {
    #[cfg(feature = "otel")]
    crate::otel::continue_trace(span, &row.headers, row.deliveries_count);
}

/// Layer 2: the handler is about to run (observer, `dispatched` counter).
fn announce(shared: &SubShared, row: &OutboxRow) {
    shared.handler_called(row);
    shared.metrics.dispatched(&row.queue);
}

/// Layer 3: how long `make()` and the future it returns take.
async fn timed<F: Future>(make: impl FnOnce() -> F) -> (F::Output, Duration) {
    let started = Instant::now();
    let out = make().await;
    (out, started.elapsed())
}

/// Layer 4: a panic while the handler's future runs becomes a
/// [`HandlerPanic`] error.
async fn catch_panic(fut: impl Future<Output = Result<(), BoxError>>) -> Result<(), BoxError> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(p) => Err(Box::new(HandlerPanic(panic_message(p))) as BoxError),
    }
}

/// The text of a panic payload (also what a panicking retry strategy logs).
pub(super) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_payloads_become_text() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
        assert_eq!(panic_message(Box::new(3)), "non-string panic payload");
    }

    #[tokio::test]
    async fn a_panicking_future_is_a_handler_panic() {
        let err = catch_panic(async { panic!("kaboom") })
            .await
            .expect_err("a panic is an error");
        assert!(err.downcast_ref::<HandlerPanic>().is_some());
        assert!(err.to_string().contains("kaboom"), "{err}");
        catch_panic(async { Ok(()) })
            .await
            .expect("no panic, no error");
    }

    #[tokio::test]
    async fn timing_covers_making_and_running_the_future() {
        let (out, elapsed) = timed(|| {
            std::thread::sleep(Duration::from_millis(5));
            async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                7
            }
        })
        .await;
        assert_eq!(out, 7);
        assert!(elapsed >= Duration::from_millis(10), "{elapsed:?}");
    }
}
