//! Trace context across the outbox (feature `otel`): a trace started around
//! `publish` is continued by the delivery span and carried on the message a
//! handler publishes through a transport. Its own test binary: it installs
//! a global tracing subscriber with an OpenTelemetry layer.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_core::{App, BoxError, MemoryTransport, Message, Response, Route};
use tests::TestDb;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn parse_traceparent(v: &str) -> (TraceId, SpanId) {
    let parts: Vec<&str> = v.split('-').collect();
    (
        TraceId::from_hex(parts[1]).unwrap(),
        SpanId::from_hex(parts[2]).unwrap(),
    )
}

static OTEL: std::sync::OnceLock<(InMemorySpanExporter, SdkTracerProvider)> =
    std::sync::OnceLock::new();

/// Installs (once per process) a subscriber exporting spans to memory.
fn otel() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    OTEL.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
        tracing::subscriber::set_global_default(subscriber).unwrap();
        (exporter, provider)
    })
}

fn delivery_spans(exporter: &InMemorySpanExporter, row_id: i64) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.attributes.iter().any(|kv| {
                kv.key.as_str() == "messaging.message.id" && kv.value.as_str() == row_id.to_string()
            })
        })
        .collect()
}

#[tokio::test]
async fn a_trace_crosses_the_outbox_into_the_transport() -> anyhow::Result<()> {
    let (exporter, provider) = otel();

    let db = TestDb::new().await?;
    let kafka = MemoryTransport::new("kafka");
    let route = Route::builder(["traced"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("kafka", "traced.kafka")
        .handler(
            |m: Message, _| async move { Ok::<_, BoxError>(Response::new(m.decode::<i64>()?)) },
        );
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(kafka.clone())
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());

    // The producer's request span.
    let request = tracing::info_span!("http.request");
    let (row_id, request_trace) = async {
        let mut conn = db.pool.acquire().await?;
        let id = db.broker.publish(&5_i64, "traced", &mut conn).await?;
        Ok::<_, anyhow::Error>(id)
    }
    .instrument(request.clone())
    .await
    .map(|id| {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        (id, request.context().span().span_context().trace_id())
    })?;
    drop(request);

    let mut conn = db.pool.acquire().await?;
    let stored = db
        .broker
        .fetch_unprocessed(Some("traced"), 1, &mut conn)
        .await;
    // (it may already be handled; the header is checked on the outgoing message)
    let _ = stored;

    let got = kafka.wait_for(1, Duration::from_secs(10)).await;
    assert!(db.drained(Duration::from_secs(5)).await);
    stop.shutdown();
    run.await??;
    let _ = provider.force_flush();

    let spans: Vec<SpanData> = exporter.get_finished_spans().unwrap();
    let request_span = spans
        .iter()
        .find(|s| s.name == "http.request")
        .expect("request span");
    assert_eq!(request_span.span_context.trace_id(), request_trace);
    let deliver = spans
        .iter()
        .find(|s| {
            s.attributes.iter().any(|kv| {
                kv.key.as_str() == "messaging.message.id" && kv.value.as_str() == row_id.to_string()
            })
        })
        .expect("a delivery span for the row");
    assert_eq!(deliver.name, "traced process");
    assert_eq!(
        deliver.span_context.trace_id(),
        request_trace,
        "the delivery continues the trace"
    );
    assert_eq!(deliver.parent_span_id, request_span.span_context.span_id());
    let attr = |k: &str| {
        deliver
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| kv.value.as_str().into_owned())
    };
    assert_eq!(attr("messaging.system").as_deref(), Some("outbox"));
    assert_eq!(
        attr("messaging.destination.name").as_deref(),
        Some("traced")
    );

    let tp = got[0]
        .headers
        .get("traceparent")
        .expect("the record carries the trace");
    let (trace, parent) = parse_traceparent(tp);
    assert_eq!(trace, request_trace);
    assert_eq!(
        parent,
        deliver.span_context.span_id(),
        "its parent is the delivery span"
    );
    Ok(())
}

#[tokio::test]
async fn a_redelivery_links_to_the_original_trace() -> anyhow::Result<()> {
    use opentelemetry::trace::TraceContextExt;
    use outbox_core::Subscriber;
    use outbox_core::retry::ConstantRetry;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let (exporter, provider) = otel();
    let db = TestDb::new().await?;
    let sub = Subscriber::builder(["flaky"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(10)))
        .build(|m: Message| async move {
            if m.deliveries_count() == 1 {
                Err::<(), BoxError>("first attempt fails".into())
            } else {
                Ok(())
            }
        })?;
    let engine = outbox_core::Engine::new(db.broker.clone()).subscriber(sub);
    engine.start().await?;
    let request = tracing::info_span!("job.enqueue");
    let row_id = async {
        let mut conn = db.pool.acquire().await?;
        Ok::<_, anyhow::Error>(db.broker.publish(&1, "flaky", &mut conn).await?)
    }
    .instrument(request.clone())
    .await?;
    let origin = request.context().span().span_context().clone();
    drop(request);
    assert!(db.drained(Duration::from_secs(10)).await);
    engine.stop().await;
    let _ = provider.force_flush();
    let spans = delivery_spans(exporter, row_id);
    assert_eq!(spans.len(), 2, "two deliveries");
    let first = spans
        .iter()
        .find(|s| s.parent_span_id == origin.span_id())
        .expect("first delivery");
    assert_eq!(first.span_context.trace_id(), origin.trace_id());
    let second = spans
        .iter()
        .find(|s| s.parent_span_id != origin.span_id())
        .expect("redelivery");
    assert_ne!(
        second.span_context.trace_id(),
        origin.trace_id(),
        "a new trace"
    );
    assert!(
        second
            .links
            .iter()
            .any(|l| l.span_context.trace_id() == origin.trace_id()
                && l.span_context.span_id() == origin.span_id()),
        "linked to the original trace: {:?}",
        second.links
    );
    Ok(())
}

#[tokio::test]
async fn the_trace_is_found_in_the_kafka_record_headers() -> anyhow::Result<()> {
    use opentelemetry::trace::TraceContextExt;
    use tests::kafka::{
        Relay, TopicReader, bootstrap, broker_lock, create_topic, test_kafka, unique_topic,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let _ = otel();
    let _shared = broker_lock(false).await?;
    let boot = bootstrap();
    let topic = unique_topic("traced");
    create_topic(&boot, &topic, 2).await?;
    let db = TestDb::new().await?;
    let relay = Relay::start(&db, "traced_kafka", &topic, test_kafka(&boot));
    let request = tracing::info_span!("checkout");
    async {
        let mut conn = db.pool.acquire().await?;
        db.broker.publish(&7_i64, "traced_kafka", &mut conn).await?;
        Ok::<_, anyhow::Error>(())
    }
    .instrument(request.clone())
    .await?;
    let trace = request.context().span().span_context().trace_id();
    drop(request);
    let mut reader = TopicReader::new(&boot, &topic).await?;
    assert!(
        reader
            .read_until(Duration::from_secs(30), |r| !r.is_empty())
            .await?
    );
    relay.stop().await?;
    let record = &reader.records[0];
    let tp = record
        .headers
        .get("traceparent")
        .expect("the Kafka record carries traceparent");
    let (record_trace, _) = parse_traceparent(tp);
    assert_eq!(
        record_trace, trace,
        "the Kafka consumer continues the producer's trace"
    );
    Ok(())
}
