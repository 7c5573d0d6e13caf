//! Interoperability with the Python package faststream-outbox 0.19.0 on one
//! shared table, in both directions, through the real Python broker.
//!
//! Needs the venv of `scripts/python-env.sh` (`scripts/test.sh` provides it).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Engine, Headers, Message, PublishOptions, Raw, Subscriber};
use serde_json::{Value, json};
use tests::{TestDb, base64_decode, database_url, interop_python, wait_until};

type R = anyhow::Result<()>;

fn script(name: &str) -> String {
    format!("{}/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn py(db: &TestDb, name: &str, queue: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(interop_python()?);
    cmd.arg(script(name))
        .args(["--dsn", &database_url()])
        .args(["--table", db.table.name()])
        .args(["--schema", &db.schema])
        .args(["--queue", queue]);
    Ok(cmd)
}

fn headers_of(v: &Value) -> Headers {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn rows_published_by_python_are_handled_by_rust() -> R {
    let db = TestDb::new().await?;
    let out = py(&db, "py_publish.py", "from_py")?.output()?;
    assert!(
        out.status.success(),
        "py_publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert!(cases.len() >= 7, "{cases:?}");

    // Handle them with a Rust subscriber.
    let got: Arc<Mutex<HashMap<i64, Message>>> = Arc::default();
    let g = got.clone();
    let sub = Subscriber::builder(["from_py"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .build(move |m: Message| {
            g.lock().unwrap().insert(m.id(), m);
            async {}
        })?;
    let engine = Engine::new(db.broker.clone()).subscriber(sub);
    engine.start().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            got.lock().unwrap().len() == cases.len()
        })
        .await
    );
    engine.stop().await;
    assert_eq!(db.count().await?, 0, "every Python row acked by Rust");

    let got = got.lock().unwrap();
    for case in &cases {
        let name = case["case"].as_str().unwrap();
        let id = case["id"].as_i64().unwrap();
        let msg = &got[&id];
        assert_eq!(
            msg.headers(),
            &headers_of(&case["stored_headers"]),
            "{name}: headers"
        );
        assert_eq!(
            msg.correlation_id(),
            case["stored_headers"]["correlation_id"].as_str().unwrap(),
            "{name}"
        );
        if let Some(c) = case["correlation_id"].as_str() {
            assert_eq!(msg.correlation_id(), c, "{name}: explicit correlation id");
        }
        assert_eq!(
            msg.content_type(),
            case["expected_content_type"].as_str(),
            "{name}: content-type"
        );
        assert_eq!(
            msg.payload(),
            base64_decode(case["stored_payload_base64"].as_str().unwrap())?,
            "{name}"
        );
        for (k, v) in case["headers"].as_object().unwrap() {
            assert_eq!(msg.header(k), v.as_str(), "{name}: header {k}");
        }
        let expected = &case["expected_body"];
        match name {
            "str" | "empty_str" => assert_eq!(
                msg.decode::<String>()?,
                expected.as_str().unwrap(),
                "{name}"
            ),
            "bytes" => {
                let raw = base64_decode(expected["base64"].as_str().unwrap())?;
                assert_eq!(msg.decode::<Raw>()?, Raw(raw), "{name}");
            }
            "none" => {
                assert_eq!(msg.decode::<Option<Value>>()?, None, "{name}");
                msg.decode::<()>()?;
            }
            _ => assert_eq!(&msg.decode::<Value>()?, expected, "{name}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn rows_published_by_rust_are_handled_by_python() -> R {
    let db = TestDb::new().await?;
    let queue = "from_rust";
    // Rust publishes first, in one transaction.
    let mut tx = db.pool.begin().await?;
    let b = &db.broker;
    let mut expected: Vec<(i64, Value, Option<&str>)> = Vec::new();
    let obj = json!({"order_id": 7, "note": "ünïcode", "nested": {"a": [1, 2.5, null, true]}});
    let id = b
        .publish_with(
            &obj,
            queue,
            &PublishOptions::new().header("x-tenant", "acme"),
            &mut *tx,
        )
        .await?
        .unwrap();
    expected.push((id, obj, Some("application/json")));
    let id = b
        .publish("hello from rust", queue, &mut *tx)
        .await?
        .unwrap();
    expected.push((id, json!("hello from rust"), Some("text/plain")));
    let id = b.publish(&42_i64, queue, &mut *tx).await?.unwrap();
    expected.push((id, json!(42), Some("application/json")));
    let id = b
        .publish(&Raw(vec![0, 1, 2, 255]), queue, &mut *tx)
        .await?
        .unwrap();
    expected.push((id, json!({"base64": "AAEC/w=="}), None));
    let id = b
        .publish_with(
            &vec!["a", "b"],
            queue,
            &PublishOptions::new().correlation_id("corr-rust"),
            &mut *tx,
        )
        .await?
        .unwrap();
    expected.push((id, json!(["a", "b"]), Some("application/json")));
    let id = b.publish(&(), queue, &mut *tx).await?.unwrap();
    expected.push((id, json!({"base64": ""}), None));
    b.publish_batch([json!({"batch": 1}), json!({"batch": 2})], queue, &mut *tx)
        .await?;
    tx.commit().await?;
    let mut conn = db.pool.acquire().await?;
    let rows = b.fetch_unprocessed(Some(queue), 100, &mut conn).await?;
    for r in &rows[rows.len() - 2..] {
        let v: Value = r.decode()?;
        expected.push((r.id, v, Some("application/json")));
    }
    let stored: HashMap<i64, Headers> = rows.iter().map(|r| (r.id, r.headers.clone())).collect();

    let out = py(&db, "py_consume.py", queue)?
        .args(["--expect", &expected.len().to_string(), "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?
        .wait_with_output()?;
    assert!(
        out.status.success(),
        "py_consume failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let handled: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let by_id: HashMap<i64, &Value> = handled
        .iter()
        .map(|h| (h["id"].as_i64().unwrap(), h))
        .collect();
    assert_eq!(by_id.len(), expected.len());
    for (id, body, ct) in &expected {
        let h = by_id[id];
        assert_eq!(h["decode_error"], Value::Null, "row {id}");
        assert_eq!(&h["decoded_body"], body, "row {id}: body");
        assert_eq!(h["content_type"].as_str(), *ct, "row {id}: content-type");
        assert_eq!(headers_of(&h["headers"]), stored[id], "row {id}: headers");
        assert_eq!(
            h["correlation_id"].as_str(),
            stored[id].get("correlation_id").map(String::as_str)
        );
    }
    assert_eq!(by_id[&expected[0].0]["headers"]["x-tenant"], "acme");
    assert_eq!(by_id[&expected[4].0]["correlation_id"], "corr-rust");
    assert_eq!(db.count().await?, 0, "every Rust row acked by Python");
    Ok(())
}
