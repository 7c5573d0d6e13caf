//! W3C trace context across the outbox (feature `otel`).
//!
//! - [`publish`](crate::OutboxBroker::publish) stores the current span's
//!   `traceparent` / `tracestate` in the row's headers (unless the caller set
//!   them), so the trace survives the database;
//! - the delivery span (`outbox.deliver`, OpenTelemetry messaging attributes)
//!   continues that trace on the first delivery and links to it on
//!   redeliveries;
//! - messages a handler publishes through a transport carry the delivery
//!   span's context, so a Kafka consumer continues the same trace.
//!
//! It works with any `tracing` subscriber that has a
//! `tracing_opentelemetry::OpenTelemetryLayer`; without one, nothing is added.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::Headers;

/// The W3C trace-context header names.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// Adds the current span's context to `headers` (keeping values the caller
/// set explicitly). Nothing is added when there is no valid span context.
pub(crate) fn inject_current(headers: &mut Headers) {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    for (k, v) in carrier {
        headers.entry(k).or_insert(v);
    }
}

/// Like [`inject_current`], but the current span's context replaces any
/// propagated one (used for outgoing transport messages).
pub(crate) fn inject_current_overriding(headers: &mut Headers) {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    headers.remove(TRACESTATE);
    headers.extend(carrier);
}

/// Makes `span` continue the trace stored in `headers`: as its parent on the
/// first delivery, as a link on redeliveries (the first attempt's trace is
/// already closed).
pub(crate) fn continue_trace(span: &tracing::Span, headers: &Headers, deliveries_count: i64) {
    let Some(parent) = headers.get(TRACEPARENT) else {
        return;
    };
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert(TRACEPARENT.to_owned(), parent.clone());
    if let Some(state) = headers.get(TRACESTATE) {
        carrier.insert(TRACESTATE.to_owned(), state.clone());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let remote = cx.span().span_context().clone();
    if !remote.is_valid() {
        return;
    }
    if deliveries_count <= 1 {
        let _ = span.set_parent(cx);
    } else {
        span.add_link(remote);
    }
}
