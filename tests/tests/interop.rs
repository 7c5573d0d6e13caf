//! Interoperability with the Python package faststream-outbox 0.19.0 on one
//! shared table, in both directions, through the real Python broker.
//!
//! Needs the venv of `scripts/python-env.sh` (`scripts/test.sh` provides it),
//! and for the relay tests at the end a Kafka-protocol broker
//! (`KAFKA_BOOTSTRAP`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{
    App, AppContext, BoxError, Engine, FromDelivery, Headers, Message, Passthrough, PublishOptions,
    Raw, Response, Route, Subscriber,
};
use serde_json::{Value, json};
use tests::kafka as kafka_support;
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
    let id = b.publish("hello from rust", queue, &mut *tx).await?;
    expected.push((id, json!("hello from rust"), Some("text/plain")));
    let id = b.publish(&42_i64, queue, &mut *tx).await?;
    expected.push((id, json!(42), Some("application/json")));
    let id = b.publish(&Raw(vec![0, 1, 2, 255]), queue, &mut *tx).await?;
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
    let id = b.publish(&(), queue, &mut *tx).await?;
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

// ---------------------------------------------------------------------------
// Python producer -> Rust relay -> the real Kafka-protocol broker
// (`KAFKA_BOOTSTRAP`; scripts/test.sh starts one).

/// A row as `py_publish_relay.py` reports it: id, case, stored payload and
/// stored headers.
struct PyRow {
    id: i64,
    case: String,
    payload: Vec<u8>,
    headers: Headers,
    content_type: Option<String>,
    body: Value,
}

fn py_publish_relay(db: &TestDb, queue: &str, set: &str) -> anyhow::Result<Vec<PyRow>> {
    let out = py(db, "py_publish_relay.py", queue)?
        .args(["--set", set])
        .output()?;
    assert!(
        out.status.success(),
        "py_publish_relay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    cases
        .iter()
        .map(|c| {
            let headers = headers_of(&c["stored_headers"]);
            let content_type = c["expected_content_type"].as_str().map(str::to_owned);
            assert_eq!(
                headers.get("content-type"),
                content_type.as_ref(),
                "{c}: stored content type"
            );
            Ok(PyRow {
                id: c["id"].as_i64().unwrap(),
                case: c["case"].as_str().unwrap().to_owned(),
                payload: base64_decode(c["stored_payload_base64"].as_str().unwrap())?,
                headers,
                content_type,
                body: c["expected_body"].clone(),
            })
        })
        .collect()
}

/// Runs `app` until every row of `rows` is on `topic` and the table is
/// empty; returns the records by `outbox-id`.
async fn relay_and_read(
    db: &TestDb,
    app: outbox_core::App,
    topic: &str,
    rows: &[PyRow],
) -> anyhow::Result<HashMap<i64, kafka_support::Record>> {
    let boot = kafka_support::bootstrap();
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    // Every record of a row carries the row's correlation id: records of an
    // earlier run on the same topic are not ours.
    let ours: HashMap<i64, String> = rows
        .iter()
        .map(|r| (r.id, r.headers["correlation_id"].clone()))
        .collect();
    let is_ours = |rec: &kafka_support::Record| {
        rec.headers
            .get("outbox-id")
            .and_then(|id| id.parse::<i64>().ok())
            .and_then(|id| ours.get(&id))
            .is_some_and(|c| rec.headers.get("correlation_id") == Some(c))
    };
    let mut reader = kafka_support::TopicReader::new(&boot, topic).await?;
    let all = reader
        .read_until(Duration::from_secs(60), |recs| {
            recs.iter().filter(|r| is_ours(r)).count() >= rows.len()
        })
        .await?;
    assert!(
        all,
        "only {} of {} records arrived",
        reader.records.iter().filter(|r| is_ours(r)).count(),
        rows.len()
    );
    assert!(db.drained(Duration::from_secs(10)).await, "rows left");
    stop.shutdown();
    run.await??;
    let mut by_id = HashMap::new();
    for rec in reader.records.iter().filter(|r| is_ours(r)) {
        let prev = by_id.insert(rec.outbox_id(), rec.clone());
        assert!(prev.is_none(), "row {} relayed twice", rec.outbox_id());
    }
    Ok(by_id)
}

/// A faststream-outbox producer's own headers (`x-tenant`, …) reach the Kafka
/// record through a relay with the default settings; the envelope headers are
/// derived: the content type of the re-encoded body, the row's correlation id,
/// the row id as `outbox-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_headers_reach_kafka_through_the_relay() -> R {
    let _lock = kafka_support::broker_lock(false).await?;
    let db = TestDb::new().await?;
    let queue = "py.headers";
    let rows = py_publish_relay(&db, queue, "headers")?;
    assert_eq!(rows.len(), 3);
    let topic = kafka_support::unique_topic("interop.headers");
    kafka_support::create_topic(&kafka_support::bootstrap(), &topic, 2).await?;

    // The README's shape: a typed body in, the value out (re-encoded).
    let route = Route::builder([queue])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("kafka", topic.clone())
        .handler(|msg: Message, ctx: AppContext| async move {
            let body = <Value as FromDelivery>::from_delivery(&msg, &ctx)?;
            Ok::<_, BoxError>(Response::new(body))
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(kafka_support::test_kafka(&kafka_support::bootstrap()).connect());
    let got = relay_and_read(&db, app, &topic, &rows).await?;

    for row in &rows {
        let rec = &got[&row.id];
        let name = &row.case;
        // Every header the producer stored, the envelope's re-derived.
        let mut want: BTreeMap<String, String> = row.headers.clone().into_iter().collect();
        want.insert("outbox-id".into(), row.id.to_string());
        assert_eq!(rec.headers, want, "{name}: headers");
        assert_eq!(rec.headers["x-tenant"], "acme", "{name}");
        assert_eq!(
            rec.headers.get("content-type"),
            row.content_type.as_ref(),
            "{name}: content type"
        );
        let body = if row.content_type.as_deref() == Some("text/plain") {
            Value::String(String::from_utf8(rec.payload.clone())?)
        } else {
            serde_json::from_slice(&rec.payload)?
        };
        assert_eq!(body, row.body, "{name}: body");
    }
    let corr = rows
        .iter()
        .find(|r| r.case == "object_with_correlation")
        .unwrap();
    assert_eq!(got[&corr.id].headers["correlation_id"], "corr-py-12");
    assert_eq!(got[&corr.id].headers["x-trace"], "t-12");
    Ok(())
}

/// The byte-exact relay, declared as the README shows it (the topic name is
/// fixed by the attribute; records of other runs are told apart by their
/// correlation ids).
#[outbox_core::publish_to(kafka, "interop.passthrough")]
#[outbox_core::subscriber("py.bodies")]
async fn passthrough_relay(body: Passthrough) -> Passthrough {
    body
}

/// Bodies a faststream-outbox producer published arrive on the Kafka topic
/// byte for byte, with the same content type (or none), through a
/// `Passthrough` relay: a JSON object with its keys in their order, unicode
/// and plain text, empty bodies, raw bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_bodies_reach_kafka_byte_for_byte_through_a_passthrough_relay() -> R {
    let _lock = kafka_support::broker_lock(false).await?;
    let db = TestDb::new().await?;
    let rows = py_publish_relay(&db, "py.bodies", "bodies")?;
    assert_eq!(rows.len(), 8);
    let object = rows.iter().find(|r| r.case == "json_object").unwrap();
    assert_eq!(object.payload, br#"{"order_id":11,"note":"x"}"#);
    let unicode = rows.iter().find(|r| r.case == "unicode_text").unwrap();
    assert_eq!(unicode.payload, "héllo ✓".as_bytes());
    let boot = kafka_support::bootstrap();
    let topic = "interop.passthrough";
    kafka_support::create_topic(&boot, topic, 2).await?;

    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(passthrough_relay {})
        .on_startup(kafka_support::test_kafka(&boot).connect());
    let got = relay_and_read(&db, app, topic, &rows).await?;

    for row in &rows {
        let rec = &got[&row.id];
        let name = &row.case;
        assert_eq!(rec.payload, row.payload, "{name}: bytes");
        assert_eq!(
            rec.headers.get("content-type"),
            row.content_type.as_ref(),
            "{name}: content type"
        );
        let mut want: BTreeMap<String, String> = row.headers.clone().into_iter().collect();
        want.insert("outbox-id".into(), row.id.to_string());
        assert_eq!(rec.headers, want, "{name}: headers");
    }
    assert_eq!(got[&object.id].payload, br#"{"order_id":11,"note":"x"}"#);
    assert_eq!(got[&unicode.id].payload, "héllo ✓".as_bytes());
    assert_eq!(
        got[&unicode.id].headers["content-type"], "text/plain",
        "unicode text"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// faststream-outbox peers and a transaction-mode Rust relay on one queue.

/// Sessions that LISTEN on `db`'s NOTIFY channel (sqlx and asyncpg both send
/// `LISTEN "<channel>"`, which `pg_stat_activity` shows as the session's last
/// statement).
async fn listeners(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query = $1")
        .bind(format!("LISTEN \"{}\"", db.table.channel()))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// One handler call of a Python peer (`py_share.py`).
#[derive(Debug, serde::Deserialize)]
struct PyCall {
    id: i64,
    start: f64,
    end: f64,
    deliveries_count: i64,
}

/// Seconds since the Unix epoch (the Python peers' `time.time()`).
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Two faststream-outbox 0.19 consumers (leases, 50 ms handlers) and a Rust
/// relay in `ClaimMode::Transaction` (lots of 10 rows locked while their
/// 40 ms handlers run and Kafka confirms) share one table and queue while
/// rows keep coming, handling rows at the same time: the Python side skips
/// the rows our lots lock, our lots skip the rows Python leased, so every
/// row is handled exactly once, by one side, and nothing is lost (a relay
/// whose claim ignored Python's leases would handle rows a Python handler
/// holds; a Python claim that waited for our locks would find them gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_peers_and_a_transaction_mode_relay_share_a_queue_without_handling_a_row_twice() -> R
{
    let _lock = kafka_support::broker_lock(false).await?;
    let boot = kafka_support::bootstrap();
    let db = TestDb::new().await?;
    let queue = "shared";
    let topic = kafka_support::unique_topic("interop.shared");
    kafka_support::create_topic(&boot, &topic, 2).await?;

    let mut peers = Vec::new();
    for _ in 0..2 {
        peers.push(
            py(&db, "py_share.py", queue)?
                .args(["--delay", "0.05", "--max-workers", "4", "--timeout", "90"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    assert!(
        wait_until(Duration::from_secs(30), || async {
            listeners(&db).await >= 2
        })
        .await,
        "the Python peers did not start"
    );

    // (row id, start, end) of every Rust handler call.
    let calls: Arc<Mutex<Vec<(i64, f64, f64)>>> = Arc::default();
    let c = calls.clone();
    let route = Route::builder([queue])
        .claim_mode(outbox_core::ClaimMode::Transaction)
        .max_workers(4)
        .fetch_batch_size(10)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("kafka", topic.clone())
        .handler(move |msg: Message, _ctx| {
            let c = c.clone();
            async move {
                let start = epoch_now();
                let v: i64 = msg.decode()?;
                tokio::time::sleep(Duration::from_millis(40)).await;
                c.lock().unwrap().push((msg.id(), start, epoch_now()));
                Ok::<_, BoxError>(Response::new(v))
            }
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(kafka_support::test_kafka(&boot).connect());
    let relay = tests::RunningApp::start(app);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            listeners(&db).await >= 3
        })
        .await,
        "the Rust relay did not start"
    );

    // 300 rows, 10 per transaction every 30 ms.
    let mut ids = std::collections::BTreeSet::new();
    for chunk in 0..30_i64 {
        let mut tx = db.pool.begin().await?;
        for v in chunk * 10..chunk * 10 + 10 {
            ids.insert(db.broker.publish(&v, queue, &mut *tx).await?);
        }
        tx.commit().await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        db.drained(Duration::from_secs(60)).await,
        "rows left: {}",
        db.count().await?
    );

    // Closing their stdin stops the peers (gracefully).
    let mut py_calls: Vec<PyCall> = Vec::new();
    for mut peer in peers {
        drop(peer.stdin.take());
        let out = peer.wait_with_output()?;
        assert!(
            out.status.success(),
            "py_share failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        py_calls.extend(serde_json::from_slice::<Vec<PyCall>>(&out.stdout)?);
    }
    relay.stop().await?;
    let rust_calls = calls.lock().unwrap().clone();

    // Every row handled once, by one side.
    let mut by_id: BTreeMap<i64, Vec<(&str, f64, f64)>> = BTreeMap::new();
    for c in &py_calls {
        assert_eq!(c.deliveries_count, 1, "row {} delivered before", c.id);
        by_id
            .entry(c.id)
            .or_default()
            .push(("python", c.start, c.end));
    }
    for (id, start, end) in &rust_calls {
        by_id.entry(*id).or_default().push(("rust", *start, *end));
    }
    let twice: Vec<_> = by_id.iter().filter(|(_, calls)| calls.len() > 1).collect();
    assert!(twice.is_empty(), "rows handled more than once: {twice:?}");
    let handled: std::collections::BTreeSet<i64> = by_id.keys().copied().collect();
    assert_eq!(handled, ids, "every row handled");
    println!(
        "{} rows: {} handled by the Python peers, {} by the Rust relay",
        ids.len(),
        py_calls.len(),
        rust_calls.len()
    );
    assert!(
        !py_calls.is_empty() && !rust_calls.is_empty(),
        "one side handled nothing: the queue was not shared"
    );
    // Both sides held rows at the same time (not one after the other).
    let concurrent = py_calls
        .iter()
        .filter(|p| {
            rust_calls
                .iter()
                .any(|(_, start, end)| p.start < *end && *start < p.end)
        })
        .count();
    println!("{concurrent} Python handler calls overlapped a Rust one");
    assert!(concurrent > 0, "the two sides never handled rows at once");

    // What the Rust relay handled reached Kafka, once each.
    let rust_ids: std::collections::BTreeSet<i64> =
        rust_calls.iter().map(|(id, _, _)| *id).collect();
    let records = kafka_support::read_ids(
        &boot,
        &topic,
        &rust_ids,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await?;
    let mut per_id: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &records {
        *per_id.entry(r.outbox_id()).or_default() += 1;
    }
    assert_eq!(
        per_id
            .keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        rust_ids,
        "records of rows Python handled, or missing ones"
    );
    assert!(per_id.values().all(|n| *n == 1), "duplicate records");
    Ok(())
}
