//! A relay is faithful by default: `Passthrough` forwards payload bytes and
//! content type unchanged, and the row's own headers are propagated unless a
//! route opts out. In memory, through `testing::TestApp` and the macros.
//! (The same against real Kafka, with a Python producer, is in `interop.rs`.)

#![allow(clippy::unwrap_used)]

use outbox_core::testing::{OutgoingExt, TestApp, TestClock};
use outbox_core::{
    MemoryTransport, Message, Passthrough, PublishOptions, Raw, Response, Route, publish_to,
    subscriber,
};

type R = anyhow::Result<()>;

/// The byte-exact relay, as the README shows it.
#[publish_to(kafka, "pt.out")]
#[subscriber("pt.in")]
async fn relay(body: Passthrough) -> Passthrough {
    body
}

/// The same bytes, with a key and an extra header.
#[publish_to(kafka, "pt.keyed.out")]
#[subscriber("pt.keyed")]
async fn keyed(body: Passthrough, msg: Message) -> Response<Passthrough> {
    Response::new(body)
        .key(format!("row-{}", msg.id()))
        .header("x-relayed-by", "rust")
}

/// A relay that opts out of header propagation.
#[publish_to(kafka, "pt.private.out")]
#[subscriber("pt.private", propagate_headers = false)]
async fn private(body: Passthrough) -> Passthrough {
    body
}

async fn start(
    route: impl outbox_core::IntoRoute,
    kafka: &MemoryTransport,
) -> anyhow::Result<TestApp> {
    Ok(TestApp::builder()
        .without_discovery()
        .subscriber(route)
        .transport(kafka.clone())
        .clock(TestClock::frozen())
        .start()
        .await?)
}

fn labelled(ct: &str) -> PublishOptions {
    PublishOptions::new().header("content-type", ct)
}

#[tokio::test]
async fn passthrough_relays_bytes_and_content_type_unchanged() -> R {
    let kafka = MemoryTransport::new("kafka");
    let app = start(relay {}, &kafka).await?;
    // (payload as stored, content type as stored)
    let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
        // Key order and spacing a serde_json::Value would change.
        (
            br#"{"order_id":11,"note":"x"}"#.to_vec(),
            Some("application/json"),
        ),
        (
            br#"{ "z": 1.50, "a": [3, 1] }"#.to_vec(),
            Some("application/json"),
        ),
        ("héllo ✓".as_bytes().to_vec(), Some("text/plain")),
        (b"plain text".to_vec(), Some("text/plain")),
        (Vec::new(), Some("text/plain")),
        (Vec::new(), None),
        (vec![0, 159, 255], None),
        // A label is forwarded verbatim, even one the decoder would normalise.
        (b"<a/>".to_vec(), Some("Application/XML; charset=utf-8")),
        // Even a payload that is not what its label says is not touched.
        (b"{1:2}".to_vec(), Some("application/json")),
    ];
    let mut ids = Vec::new();
    for (payload, ct) in &cases {
        let opts = ct.map_or_else(PublishOptions::new, labelled);
        ids.push(
            app.publish_with(&Raw(payload.clone()), "pt.in", &opts)
                .await?
                .unwrap(),
        );
    }
    let sent = kafka.messages_to("pt.out");
    assert_eq!(sent.len(), cases.len());
    for ((payload, ct), (m, id)) in cases.iter().zip(sent.iter().zip(&ids)) {
        assert_eq!(&m.payload, payload, "row {id}: bytes");
        assert_eq!(m.content_type(), *ct, "row {id}: content type");
        assert_eq!(m.header("outbox-id"), Some(id.to_string().as_str()));
        assert!(m.correlation_id().is_some());
        assert_eq!(app.history(*id).to_string(), "claimed(1), acked");
    }
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

/// Bodies published by the encoder come out as they went in, too.
#[tokio::test]
async fn passthrough_of_encoded_bodies() -> R {
    let kafka = MemoryTransport::new("kafka");
    let app = start(relay {}, &kafka).await?;
    app.publish(&serde_json::json!({"b": 1, "a": 2}), "pt.in")
        .await?;
    app.publish("héllo ✓", "pt.in").await?;
    app.publish(&(), "pt.in").await?;
    let sent = kafka.messages_to("pt.out");
    let got: Vec<(&[u8], Option<&str>)> = sent
        .iter()
        .map(|m| (&m.payload[..], m.content_type()))
        .collect();
    assert_eq!(
        got,
        [
            (&br#"{"a":2,"b":1}"#[..], Some("application/json")),
            ("héllo ✓".as_bytes(), Some("text/plain")),
            (&b""[..], None),
        ]
    );
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn passthrough_response_sets_key_and_headers() -> R {
    let kafka = MemoryTransport::new("kafka");
    let app = start(keyed {}, &kafka).await?;
    let body = br#"{"order_id":11,"note":"x"}"#;
    let opts = labelled("application/json")
        .header("x-tenant", "acme")
        .correlation_id("c-7");
    let id = app
        .publish_with(&Raw(body.to_vec()), "pt.keyed", &opts)
        .await?
        .unwrap();
    let m = &kafka.messages_to("pt.keyed.out")[0];
    assert_eq!(m.payload, body);
    assert_eq!(m.key_str(), Some(format!("row-{id}").as_str()));
    assert_eq!(m.content_type(), Some("application/json"));
    assert_eq!(m.header("x-relayed-by"), Some("rust"));
    assert_eq!(m.header("x-tenant"), Some("acme"), "propagated by default");
    assert_eq!(m.correlation_id(), Some("c-7"));
    app.stop().await?;
    Ok(())
}

/// The producer's headers reach the bus by default; the envelope keys are
/// derived, never copied; `propagate_headers = false` keeps them back.
#[tokio::test]
async fn headers_propagate_by_default_and_routes_can_opt_out() -> R {
    let opts = labelled("text/plain")
        .header("x-tenant", "acme")
        .header("outbox-id", "999999")
        .correlation_id("c-1");

    let kafka = MemoryTransport::new("kafka");
    let app = start(relay {}, &kafka).await?;
    let id = app
        .publish_with(&Raw(b"x".to_vec()), "pt.in", &opts)
        .await?
        .unwrap();
    let m = &kafka.messages_to("pt.out")[0];
    assert_eq!(m.header("x-tenant"), Some("acme"));
    assert_eq!(
        m.header("outbox-id"),
        Some(id.to_string().as_str()),
        "derived"
    );
    assert_eq!(m.correlation_id(), Some("c-1"));
    assert_eq!(m.content_type(), Some("text/plain"));
    assert_eq!(m.headers.len(), 4, "{:?}", m.headers);
    app.stop().await?;

    for route in [
        outbox_core::IntoRoute::into_route(private {}),
        Route::builder(["pt.private"])
            .publish_to("kafka", "pt.private.out")
            .propagate_headers(false)
            .handler(|msg: Message, _ctx| async move { Passthrough::from_message(&msg) }),
    ] {
        let kafka = MemoryTransport::new("kafka");
        let app = start(route, &kafka).await?;
        let id = app
            .publish_with(&Raw(b"x".to_vec()), "pt.private", &opts)
            .await?
            .unwrap();
        let m = &kafka.messages_to("pt.private.out")[0];
        assert_eq!(m.header("x-tenant"), None, "opted out");
        assert_eq!(m.header("outbox-id"), Some(id.to_string().as_str()));
        assert_eq!(m.correlation_id(), Some("c-1"));
        assert_eq!(m.content_type(), Some("text/plain"));
        app.stop().await?;
    }
    Ok(())
}
