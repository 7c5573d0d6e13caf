//! The Redis transport against the real server (`REDIS_URL`): a relay
//! process killed with SIGKILL, the list and Pub/Sub kinds, `MAXLEN`,
//! a destination key of another type failing startup (missing keys start
//! fine), `WRONGTYPE` after startup dead-lettered, an unreachable server / refused credentials /
//! a cut or hung connection, and FastStream's own Redis subscriber reading
//! what the transport wrote.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use outbox_core::{
    AppContext, BoxError, BusRejection, FromDelivery, Message, Outgoing, Passthrough,
    PublishOptions, Raw, Response, Route, Transport,
};
use outbox_redis::{Confirmed, Error, RedisBroker};
use serde_json::{Value, json};
use tests::crash::{self, Arrivals, Arrived, RelayChild};
use tests::proxy::TcpProxy;
use tests::redis::{
    Keys, Msg, addr, conn, read_list, read_stream, read_stream_until, test_redis, url, url_via,
};
use tests::{RunningApp, TestDb, base64_decode, interop_python, wait_until};

type R = anyhow::Result<()>;

/// An outgoing message as the App assembles one for outbox row `id`.
fn outgoing(dest: &str, id: i64, body: &str) -> Outgoing {
    let mut out = Outgoing::new(dest, body.as_bytes().to_vec());
    out.headers
        .insert(outbox_core::OUTBOX_ID.to_owned(), id.to_string());
    out.headers
        .insert("content-type".to_owned(), "text/plain".to_owned());
    out.headers
        .insert("correlation_id".to_owned(), format!("corr-{id}"));
    out.key = Some(format!("k{id}").into_bytes());
    out
}

/// Relays `queue` to `dest` through an App until the outbox is empty:
/// each result is the row's own bytes with a key, an explicit header and a
/// correlation id.
async fn relay_all(db: &TestDb, queue: &str, dest: &str, broker: RedisBroker) -> R {
    let route = Route::builder([queue])
        .max_workers(2)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("redis", dest)
        .handler(|msg: Message, ctx: AppContext| async move {
            let body = Passthrough::from_delivery(&msg, &ctx)?;
            Ok::<_, BoxError>(
                Response::new(body)
                    .key(format!("k{}", msg.id()))
                    .header("x-explicit", "yes")
                    .correlation_id(format!("corr-{}", msg.id())),
            )
        });
    let app = RunningApp::start(db.app().subscriber(route).on_startup(broker.connect()));
    let drained = db.drained(Duration::from_secs(60)).await;
    app.stop().await?;
    assert!(drained, "{} rows left in the outbox", db.count().await?);
    Ok(())
}

/// Three rows (text, JSON, raw bytes) with a propagated header; their ids.
async fn three_rows(db: &TestDb, queue: &str) -> anyhow::Result<[i64; 3]> {
    let opts = PublishOptions::new().header("x-tenant", "acme");
    let mut tx = db.pool.begin().await?;
    let text = db
        .broker
        .publish_with(&"hello", queue, &opts, &mut *tx)
        .await?;
    let json = db
        .broker
        .publish_with(&json!({"b": 1, "a": [2]}), queue, &opts, &mut *tx)
        .await?;
    let raw = db
        .broker
        .publish_with(&Raw(vec![0, 159, 146, 150]), queue, &opts, &mut *tx)
        .await?;
    tx.commit().await?;
    Ok([text.unwrap(), json.unwrap(), raw.unwrap()])
}

/// Checks what the transport wrote for [`three_rows`], decoded in Rust.
fn check_three(got: &[Msg], ids: [i64; 3]) {
    assert_eq!(got.len(), 3, "{got:?}");
    let [text, json, raw] = ids;
    let find = |id: i64| {
        got.iter()
            .find(|m| m.header("outbox-id") == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("row {id} missing: {got:?}"))
    };
    for (id, body, ct) in [
        (text, b"hello".to_vec(), Some("text/plain")),
        (
            json,
            serde_json::to_vec(&json!({"b": 1, "a": [2]})).unwrap(),
            Some("application/json"),
        ),
        (raw, vec![0, 159, 146, 150], None),
    ] {
        let m = find(id);
        assert_eq!(m.payload, body, "row {id}");
        assert_eq!(m.header("content-type"), ct, "row {id}");
        assert_eq!(
            m.header("correlation_id"),
            Some(format!("corr-{id}").as_str())
        );
        assert_eq!(m.header("x-tenant"), Some("acme"));
        assert_eq!(m.header("x-explicit"), Some("yes"));
        assert_eq!(m.key, Some(format!("k{id}").into_bytes()));
        assert_eq!(
            m.raw_headers.get("message_id"),
            Some(&id.to_string()),
            "message_id = outbox id"
        );
    }
}

// ---------------------------------------------------------------- crash

/// A relay process killed with SIGKILL mid-batch, then restarted: every
/// row arrives at least once, the outbox ends empty, nothing is
/// dead-lettered; duplicates only for rows that were in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_loses_nothing() -> R {
    drop(conn().await);
    let db = TestDb::new().await?;
    let mut keys = Keys::new();
    let key = keys.key("crash");
    let dest = format!("stream:{key}");

    const N: i64 = 300;
    let ids = crash::publish_rows(&db, N).await?;
    let killed = crash::kill_and_restart(&db, N - 60, |_run| {
        RelayChild::spawn(
            RelayChild::command(env!("CARGO_BIN_EXE_redis_relay"), &db)
                .env("RELAY_DESTINATION", &dest)
                .env("REDIS_URL", url()),
        )
    })
    .await?;

    let got = read_stream(&mut conn().await, &key).await?;
    let mut arrived = Vec::new();
    for m in &got {
        arrived.push(Arrived {
            id: m.header("outbox-id").unwrap().parse()?,
            value: serde_json::from_slice(&m.payload)?,
            key: m.key.clone(),
        });
    }
    let arrivals = Arrivals::tally(&ids, arrived);
    arrivals.assert_duplicates_within(&killed);
    println!(
        "{} entries for {N} rows ({} duplicates)",
        got.len(),
        arrivals.duplicates()
    );
    Ok(())
}

// ---------------------------------------------------------------- kinds

/// `list:<key>`: each message is one `RPUSH`ed element in FastStream's
/// format; the reply is the list's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_destinations_get_one_element_per_message() -> R {
    let db = TestDb::new().await?;
    let mut keys = Keys::new();
    let key = keys.key("list");
    let dest = format!("list:{key}");
    let ids = three_rows(&db, "to_list").await?;
    relay_all(&db, "to_list", &dest, test_redis(&url())).await?;
    let got = read_list(&mut conn().await, &key).await?;
    check_three(&got, ids);

    let t = test_redis(&url()).connect_transport().await?;
    let reply = t.send(outgoing(&dest, 99, "four")).await?;
    assert_eq!(reply, Confirmed::ListLength(4));
    Ok(())
}

/// `channel:<name>`: a subscriber connected at the time gets the message;
/// with nobody listening the publish fails (transient: the row is kept)
/// unless `allow_no_subscribers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_destinations_reach_connected_subscribers_only() -> R {
    let channel = tests::redis::unique_key("channel");
    let dest = format!("channel:{channel}");
    let t = test_redis(&url()).connect_transport().await?;

    // Nobody listens: an error, retryable, not a rejection.
    let err = t
        .send(outgoing(&dest, 1, "lost"))
        .await
        .expect_err("no subscriber");
    assert!(matches!(err, Error::NoSubscriber { .. }), "{err}");
    assert!(err.is_retryable());
    let boxed = Transport::publish(&t, outgoing(&dest, 1, "lost"))
        .await
        .expect_err("no subscriber");
    assert!(BusRejection::find(&*boxed).is_none(), "{boxed}");
    let lenient = test_redis(&url())
        .allow_no_subscribers(true)
        .connect_transport()
        .await?;
    assert_eq!(
        lenient.send(outgoing(&dest, 1, "lost")).await?,
        Confirmed::Receivers(0)
    );

    // A subscriber: it gets the message, in FastStream's format.
    let client = redis::Client::open(url().as_str())?;
    let mut sub = client.get_async_pubsub().await?;
    sub.subscribe(&channel).await?;
    let reply = t.send(outgoing(&dest, 2, "heard")).await?;
    assert_eq!(reply, Confirmed::Receivers(1));
    let mut stream = sub.on_message();
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .expect("a message");
    let m = Msg::decode(String::new(), msg.get_payload_bytes())?;
    assert_eq!(m.payload, b"heard");
    assert_eq!(m.header("outbox-id"), Some("2"));
    assert_eq!(m.header("correlation_id"), Some("corr-2"));
    assert_eq!(m.key, Some(b"k2".to_vec()));
    Ok(())
}

/// `stream_maxlen(n)` trims with `XADD … MAXLEN ~ n`: the stream stays
/// near `n` entries (whole nodes of up to 100 entries are trimmed), while
/// without it every entry stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_maxlen_trims_the_stream() -> R {
    let mut keys = Keys::new();
    let (capped, full) = (keys.key("capped"), keys.key("full"));
    let capped_t = test_redis(&url())
        .stream_maxlen(10)
        .connect_transport()
        .await?;
    let full_t = test_redis(&url()).connect_transport().await?;
    for i in 0..500 {
        capped_t.send(outgoing(&capped, i, "x")).await?;
        full_t.send(outgoing(&full, i, "x")).await?;
    }
    let mut c = conn().await;
    let capped_len: u64 = redis::cmd("XLEN").arg(&capped).query_async(&mut c).await?;
    let full_len: u64 = redis::cmd("XLEN").arg(&full).query_async(&mut c).await?;
    println!("XLEN with MAXLEN ~ 10: {capped_len}; without: {full_len}");
    assert_eq!(full_len, 500);
    assert!(
        (10..=200).contains(&capped_len),
        "MAXLEN ~ 10 left {capped_len} entries"
    );
    // The newest entries are kept.
    let last = read_stream(&mut c, &capped).await?;
    assert_eq!(last.last().and_then(|m| m.header("outbox-id")), Some("499"));
    Ok(())
}

// ---------------------------------------------------------------- refusals

/// A destination key holding another type: `WRONGTYPE` is a permanent
/// refusal naming the key, both types and the fix. The startup check sees
/// a key of another type (see below), so through the App this is a key
/// whose type changed after startup: the row is dead-lettered as
/// `rejected`, never dropped, and the key is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongtype_is_dead_lettered_as_rejected() -> R {
    let db = TestDb::new().await?;
    let mut keys = Keys::new();
    let key = keys.key("wrongtype");
    let mut c = conn().await;
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg("not a stream")
        .query_async(&mut c)
        .await?;

    let t = test_redis(&url()).connect_transport().await?;
    let err = t.send(outgoing(&key, 1, "x")).await.expect_err("WRONGTYPE");
    let text = err.to_string();
    assert!(matches!(err, Error::WrongType { .. }), "{text}");
    assert!(!err.is_retryable());
    assert!(
        text.contains(&format!("{key:?}")) && text.contains("holds a list, not a stream"),
        "{text}"
    );
    assert!(text.contains("delete or rename the key"), "{text}");

    // The App starts on the missing key; a first row creates the stream.
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut c).await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&"first", "wrong", &mut *tx).await?;
    tx.commit().await?;
    // The default retry strategy: a rejection is terminal at once.
    let route = Route::builder(["wrong"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("redis", format!("stream:{key}"))
        .handler(
            |msg: Message, ctx: AppContext| async move { Passthrough::from_delivery(&msg, &ctx) },
        );
    let app = RunningApp::start(
        db.app()
            .subscriber(route)
            .on_startup(test_redis(&url()).connect()),
    );
    assert!(
        db.drained(Duration::from_secs(30)).await,
        "the first row was not relayed"
    );
    assert_eq!(read_stream(&mut c, &key).await?.len(), 1);

    // The key becomes a list while the relay runs.
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut c).await?;
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg("not a stream")
        .query_async(&mut c)
        .await?;
    let mut tx = db.pool.begin().await?;
    let id = db.broker.publish(&"x", "wrong", &mut *tx).await?;
    tx.commit().await?;
    let dead = wait_until(Duration::from_secs(30), || async {
        db.dlq_count().await.unwrap() == 1
    })
    .await;
    app.stop().await?;
    assert!(dead, "the row was not dead-lettered");
    assert_eq!(db.count().await?, 0);
    let reason: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT failure_reason || ': ' || last_exception FROM {} WHERE original_id = $1",
        db.d()
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert!(
        reason.starts_with("rejected") && reason.contains("redis") && reason.contains("WRONGTYPE"),
        "{reason}"
    );
    let len: i64 = redis::cmd("LLEN").arg(&key).query_async(&mut c).await?;
    assert_eq!(len, 1, "the list is untouched");
    Ok(())
}

/// An App relaying `queue` to each of `dests` (a channel reached by
/// nobody is confirmed).
fn relay_app(db: &TestDb, queue: &str, dests: &[String]) -> outbox_core::App {
    let mut route = Route::builder([queue])
        .name(format!("relay-{queue}"))
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200));
    for dest in dests {
        route = route.publish_to("redis", dest.clone());
    }
    let route = route.handler(|msg: Message, ctx: AppContext| async move {
        Passthrough::from_delivery(&msg, &ctx)
    });
    db.app()
        .subscriber(route)
        .on_startup(test_redis(&url()).allow_no_subscribers(true).connect())
}

/// The startup check (`verify_destination`): a stream or list destination
/// whose key holds another type fails `App::run` before anything is
/// consumed, naming the subscriber, the destination, the transport, the
/// key, both types and the fix; the row stays in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_key_of_another_type_fails_startup() -> R {
    let db = TestDb::new().await?;
    let mut keys = Keys::new();
    let (string, stream) = (keys.key("is-a-string"), keys.key("is-a-stream"));
    let mut c = conn().await;
    let _: () = redis::cmd("SET")
        .arg(&string)
        .arg("not a stream")
        .query_async(&mut c)
        .await?;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async(&mut c)
        .await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&"kept", "checked", &mut *tx).await?;
    tx.commit().await?;

    // A stream destination on a string key.
    let dest = format!("stream:{string}");
    let err = relay_app(&db, "checked", std::slice::from_ref(&dest))
        .run()
        .await
        .expect_err("a string is not a stream")
        .to_string();
    println!("{err}");
    assert!(err.contains("relay-checked"), "names the subscriber: {err}");
    assert!(
        err.contains(&format!("publishes to `{dest}` on transport `redis`")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "Redis key {string:?} holds a string, not a stream"
        )),
        "{err}"
    );
    assert!(err.contains("delete or rename the key"), "{err}");

    // A list destination on a stream key: the fix names the stream kind.
    let dest = format!("list:{stream}");
    let err = relay_app(&db, "checked", std::slice::from_ref(&dest))
        .run()
        .await
        .expect_err("a stream is not a list")
        .to_string();
    println!("{err}");
    assert!(
        err.contains(&format!("publishes to `{dest}` on transport `redis`")),
        "{err}"
    );
    assert!(
        err.contains(&format!("Redis key {stream:?} holds a stream, not a list")),
        "{err}"
    );
    assert!(err.contains(&format!("`stream:{stream}`")), "{err}");

    assert_eq!(db.count().await?, 1, "nothing consumed");
    assert_eq!(db.dlq_count().await?, 0);
    let kept: String = redis::cmd("GET").arg(&string).query_async(&mut c).await?;
    assert_eq!(kept, "not a stream", "the key is untouched");
    Ok(())
}

/// Redis creates streams and lists on the first write: destinations whose
/// keys do not exist yet (and channels, which are no keys) pass the
/// startup check, and the relay creates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_destination_keys_start_fine_and_are_created() -> R {
    let db = TestDb::new().await?;
    let mut keys = Keys::new();
    let (stream, list) = (keys.key("missing-stream"), keys.key("missing-list"));
    let channel = tests::redis::unique_key("missing-channel");
    let mut c = conn().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&stream)
        .arg(&list)
        .query_async(&mut c)
        .await?;
    assert_eq!(exists, 0);
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&"hello", "fresh", &mut *tx).await?;
    tx.commit().await?;

    let dests = [
        format!("stream:{stream}"),
        format!("list:{list}"),
        format!("channel:{channel}"),
    ];
    let app = RunningApp::start(relay_app(&db, "fresh", &dests));
    let drained = db.drained(Duration::from_secs(30)).await;
    app.stop().await?;
    assert!(drained, "{} rows left in the outbox", db.count().await?);
    assert_eq!(read_stream(&mut c, &stream).await?.len(), 1);
    assert_eq!(read_list(&mut c, &list).await?.len(), 1);
    Ok(())
}

/// Startup: nothing listening fails with `Unreachable`, refused credentials
/// with `Auth`, both naming the URL with its password redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_and_refused_credentials_fail_at_connect() -> R {
    let err = RedisBroker::new("redis://relay:hunter2@127.0.0.1:1")
        .connect_timeout(Duration::from_secs(2))
        .connect_transport()
        .await
        .expect_err("nothing listens on port 1");
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Unreachable { .. }), "{text}");
    assert!(text.contains("redis://relay:***@127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // A user that does not exist: the server answers WRONGPASS.
    let bad = url_via(&addr()).replacen("://", "://outbox-nobody:hunter2@", 1);
    let err = RedisBroker::new(bad)
        .connect_timeout(Duration::from_secs(5))
        .connect_transport()
        .await
        .expect_err("refused credentials");
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(text.contains("outbox-nobody:***@"), "{text}");
    // redis-rs reports the server's WRONGPASS as its own AuthenticationFailed.
    assert!(
        text.contains("refused the credentials") && text.contains("AuthenticationFailed"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!err.is_retryable());
    Ok(())
}

/// A server that goes away (connections reset, new ones refused) or hangs
/// (nothing answers): a publish ends with an error by the publish timeout,
/// never `Ok`, never a hang; after recovery publishes go through again on
/// the reconnected connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_hung_server_is_an_error_then_recovers() -> R {
    let mut keys = Keys::new();
    let key = keys.key("outage");
    let proxy = TcpProxy::start(&addr()).await?;
    let t = test_redis(&url_via(&proxy.addr().to_string()))
        .publish_timeout(Duration::from_secs(2))
        .connect_transport()
        .await?;
    t.send(outgoing(&key, 1, "before")).await?;

    for (what, outage) in [("cut", Mode::Cut), ("paused", Mode::Pause)] {
        let before = client_id(&t).await?;
        match outage {
            Mode::Cut => proxy.cut(),
            Mode::Pause => proxy.pause(),
        }
        let res = tokio::time::timeout(Duration::from_secs(30), t.send(outgoing(&key, 2, what)))
            .await
            .unwrap_or_else(|_| panic!("the publish hung while the server was {what}"));
        let err = res.expect_err("not confirmed during the outage");
        println!("{what}: {err}");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.is_retryable(), "{err}");
        let boxed = Transport::publish(&t, outgoing(&key, 2, what))
            .await
            .expect_err("not confirmed");
        assert!(BusRejection::find(&*boxed).is_none(), "{boxed}");
        proxy.restore();
        let ok = wait_until(Duration::from_secs(30), || async {
            t.send(outgoing(&key, 3, "after")).await.is_ok()
        })
        .await;
        assert!(
            ok,
            "no publish went through after the server was {what} and restored"
        );
        // A connection that failed or hung is not used again (a hung one is
        // replaced after the timeout, though it would resume here).
        let after = client_id(&t).await?;
        assert_ne!(
            before, after,
            "still the connection from before the outage ({what})"
        );
    }
    let got = read_stream_until(&key, Duration::from_secs(5), |m| m.len() >= 3).await?;
    assert!(got.iter().any(|m| m.payload == b"after"));
    Ok(())
}

enum Mode {
    Cut,
    Pause,
}

/// The server's id of the transport's current connection (`CLIENT ID`).
async fn client_id(t: &outbox_redis::RedisTransport) -> anyhow::Result<i64> {
    let mut c = t.connection();
    Ok(redis::cmd("CLIENT").arg("ID").query_async(&mut c).await?)
}

// ---------------------------------------------------------------- FastStream

fn script(name: &str) -> String {
    format!("{}/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Starts `fs_redis_consume.py` for `kind` `name`, expecting `count`.
fn faststream_consumer(kind: &str, name: &str, count: usize) -> anyhow::Result<Child> {
    Ok(Command::new(interop_python()?)
        .arg(script("fs_redis_consume.py"))
        .args(["--url", &url(), "--kind", kind, "--name", name])
        .args(["--count", &count.to_string(), "--timeout", "40"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// What FastStream decoded, one JSON object per message.
fn faststream_result(child: Child) -> anyhow::Result<Vec<Value>> {
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fs_redis_consume failed ({}): {stderr}",
        out.status
    );
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    Ok(doc["messages"].as_array().cloned().unwrap_or_default())
}

/// Checks FastStream's view of [`three_rows`]: body, decoded body, content
/// type, correlation id, message id and headers, all decoded by FastStream
/// itself (no custom parser).
fn check_faststream(got: &[Value], ids: [i64; 3]) -> R {
    assert_eq!(got.len(), 3, "{got:?}");
    let [text, json, raw] = ids;
    let expected = [
        (text, b"hello".to_vec(), json!("hello"), json!("text/plain")),
        (
            json,
            serde_json::to_vec(&json!({"b": 1, "a": [2]}))?,
            json!({"b": 1, "a": [2]}),
            json!("application/json"),
        ),
        (
            raw,
            vec![0, 159, 146, 150],
            json!({"bytes_b64": "AJ+Slg=="}),
            Value::Null,
        ),
    ];
    for (id, body, decoded, content_type) in expected {
        let m = got
            .iter()
            .find(|m| m["message_id"] == json!(id.to_string()))
            .unwrap_or_else(|| panic!("FastStream saw no message_id {id}: {got:?}"));
        assert_eq!(
            base64_decode(m["body_b64"].as_str().unwrap())?,
            body,
            "row {id}: body"
        );
        assert_eq!(m["decoded"], decoded, "row {id}: decoded body");
        assert_eq!(m["content_type"], content_type, "row {id}: content type");
        assert_eq!(m["correlation_id"], json!(format!("corr-{id}")), "row {id}");
        let h = &m["headers"];
        assert_eq!(h["outbox-id"], json!(id.to_string()), "row {id}: {h}");
        assert_eq!(h["x-tenant"], json!("acme"), "row {id}: {h}");
        assert_eq!(h["x-explicit"], json!("yes"), "row {id}: {h}");
        assert_eq!(h["outbox-key"], json!(format!("k{id}")), "row {id}: {h}");
    }
    Ok(())
}

/// FastStream's `RedisBroker` subscribers (`stream=`, `list=`, `channel=`)
/// read what the transport wrote with their default parser: body, content
/// type, correlation id, message id (the outbox id) and headers intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faststream_subscribers_decode_the_messages() -> R {
    let db = TestDb::new().await?;
    let mut keys = Keys::new();

    // Stream.
    let stream = keys.key("fs-stream");
    let ids = three_rows(&db, "fs").await?;
    relay_all(&db, "fs", &format!("stream:{stream}"), test_redis(&url())).await?;
    let got = faststream_result(faststream_consumer("stream", &stream, 3)?)?;
    check_faststream(&got, ids)?;

    // List.
    let list = keys.key("fs-list");
    let ids = three_rows(&db, "fs").await?;
    relay_all(&db, "fs", &format!("list:{list}"), test_redis(&url())).await?;
    let got = faststream_result(faststream_consumer("list", &list, 3)?)?;
    check_faststream(&got, ids)?;

    // Pub/Sub: the subscriber must listen before the relay publishes.
    let channel = tests::redis::unique_key("fs-channel");
    let consumer = faststream_consumer("channel", &channel, 3)?;
    let mut c = conn().await;
    let listening = wait_until(Duration::from_secs(30), || {
        let mut c = c.clone();
        let channel = channel.clone();
        async move {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async::<Vec<(String, u64)>>(&mut c)
                .await
                .unwrap()
                .pop()
                .unwrap();
            n > 0
        }
    })
    .await;
    assert!(listening, "the FastStream subscriber never subscribed");
    let ids = three_rows(&db, "fs").await?;
    relay_all(&db, "fs", &format!("channel:{channel}"), test_redis(&url())).await?;
    let got = faststream_result(consumer)?;
    check_faststream(&got, ids)?;
    let _: i64 = redis::cmd("EXISTS")
        .arg(&stream)
        .query_async(&mut c)
        .await?;
    Ok(())
}

/// The frames the transport writes are byte for byte the frames FastStream's
/// own publisher writes (`BinaryMessageFormatV1.encode`) for the same body
/// and headers: text, JSON, raw bytes, non-ASCII text.
#[test]
fn frames_are_byte_identical_to_faststreams() -> R {
    let out = Command::new(interop_python()?)
        .arg(script("fs_redis_encode.py"))
        .output()?;
    assert!(
        out.status.success(),
        "fs_redis_encode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(cases.len(), 4, "{cases:?}");
    for case in cases {
        let mut msg = Outgoing::new(
            "stream:any",
            base64_decode(case["body_b64"].as_str().unwrap())?,
        );
        msg.headers.insert(
            "correlation_id".to_owned(),
            case["correlation_id"].as_str().unwrap().to_owned(),
        );
        if let Some(ct) = case["content_type"].as_str() {
            msg.headers.insert("content-type".to_owned(), ct.to_owned());
        }
        msg.headers
            .insert(outbox_core::OUTBOX_ID.to_owned(), "7".to_owned());
        msg.headers.insert("x".to_owned(), "1".to_owned());
        let ours = outbox_redis::faststream::encode_outgoing(&msg)?;
        let theirs = base64_decode(case["frame_b64"].as_str().unwrap())?;
        assert_eq!(ours, theirs, "case {case}");
    }
    Ok(())
}
