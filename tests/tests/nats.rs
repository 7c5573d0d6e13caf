//! `outbox-nats` end to end against the real nats-server with JetStream
//! (`NATS_URL`) and real PostgreSQL: a relay process killed with SIGKILL
//! (every row arrives, and `Nats-Msg-Id` keeps the stream free of
//! duplicates), server-side deduplication, a subject no stream captures
//! (refused at startup, retried at publish), oversized messages, refused credentials, a hung server, core publishing,
//! `ensure_stream`, and a FastStream `NatsBroker` subscriber decoding what
//! the relay sent. The conformance kit runs in `conformance_nats.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use outbox_core::retry::ConstantRetry;
use outbox_core::{
    BoxError, BusRejection, Message, OUTBOX_ID, Outgoing, PublishOptions, Response, Route,
    Transport,
};
use outbox_nats::{Delivery, Error, NatsBroker};
use tests::crash::{self, Arrivals, Arrived, RelayChild};
use tests::nats::{self as support, PrivateServer, Streams};
use tests::proxy::TcpProxy;
use tests::{RunningApp, TestDb, base64_decode, interop_python, wait_until};
use tokio::sync::Notify;

type R = anyhow::Result<()>;

fn fast(b: outbox_core::RouteBuilder) -> outbox_core::RouteBuilder {
    b.min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

/// A fresh stream and subject, deleted when `streams` drops.
async fn stream(streams: &Streams, label: &str) -> anyhow::Result<(String, String)> {
    let (stream, subject) = support::unique(label);
    support::create_stream(&stream, &[&subject], None).await?;
    streams.add(&stream);
    Ok((stream, subject))
}

fn out(subject: &str, id: i64, body: &str) -> Outgoing {
    let mut o = Outgoing::new(subject, body.as_bytes().to_vec());
    o.headers.insert(OUTBOX_ID.to_owned(), id.to_string());
    o
}

/// The `outbox_nats::Error` inside a publish error (through a BusRejection).
fn nats_error(e: &BoxError) -> Option<&Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
    while let Some(err) = cur {
        if let Some(n) = err.downcast_ref::<Error>() {
            return Some(n);
        }
        cur = err.source();
    }
    None
}

/// Publishing the same outbox id twice within the duplicate window stores
/// one message: the second PubAck says `duplicate`, the transport counts it.
/// A different `msg_id_prefix` (another outbox) is not a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_an_outbox_id_within_the_window_stores_one_message() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "dedup").await?;
    let nats = NatsBroker::new(support::url()).connect_transport().await?;
    let first = nats.send(out(&subject, 7, "seven")).await?.unwrap();
    assert!(!first.duplicate);
    let again = nats.send(out(&subject, 7, "seven again")).await?.unwrap();
    assert!(again.duplicate, "the server must drop the second copy");
    assert_eq!(
        again.sequence, first.sequence,
        "the ack names the stored copy"
    );
    nats.publish(out(&subject, 8, "eight")).await.unwrap();
    assert_eq!(nats.duplicates(), 1);

    let other = NatsBroker::new(support::url())
        .msg_id_prefix("other-outbox:")
        .connect_transport()
        .await?;
    let ack = other
        .send(out(&subject, 7, "another outbox's row 7"))
        .await?;
    assert!(!ack.unwrap().duplicate, "another prefix is another message");

    let msgs = support::read_stream(&name, Duration::from_secs(5), |m| m.len() >= 3).await?;
    let bodies: Vec<&[u8]> = msgs.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(
        bodies,
        [&b"seven"[..], b"eight", b"another outbox's row 7"],
        "one message per id and prefix"
    );
    assert_eq!(msgs[0].header("Nats-Msg-Id"), Some("7"));
    assert_eq!(msgs[2].header("Nats-Msg-Id"), Some("other-outbox:7"));
    assert_eq!(support::stream_len(&name).await?, 3);
    nats.close().await.unwrap();
    other.close().await.unwrap();
    Ok(())
}

/// A relay process killed with SIGKILL mid-stream, then restarted: every row
/// arrives, the outbox empties, and the stream holds each row exactly once:
/// the rows that were in flight at the kill were published again (their
/// leases ran out) with the same `Nats-Msg-Id`, within the duplicate window,
/// and the server dropped those copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_loses_nothing_and_the_stream_keeps_no_duplicate() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "crash").await?;
    let db = TestDb::new().await?;
    const N: i64 = 400;
    let ids = crash::publish_rows(&db, N).await?;

    // The crash window a SIGKILL rarely hits (the PubAck came, the row's
    // delete did not): the first 20 rows are already on the stream, as a
    // relay that died right after publishing them would have left them.
    // The relay's Nats-Msg-Id is `<source>:<outbox-id>`; the earlier
    // publishes carry the same source, as the crashed relay's would.
    let source = db.broker.resolve_source().await?;
    let earlier = NatsBroker::new(support::url()).connect_transport().await?;
    for (v, id) in ids.iter().take(20).enumerate() {
        let mut o = out(&subject, *id, &v.to_string()).with_source(source.clone());
        o.headers.insert("outbox-key".into(), format!("k{v}"));
        earlier.publish(o).await.unwrap();
    }
    let logs = std::env::temp_dir().join(format!("nats_relay_{}", tests::suffix()));
    std::fs::create_dir_all(&logs)?;
    const LOGS: [&str; 2] = ["first.log", "second.log"];
    // Each relay's stderr (with `outbox_nats` at debug: the dropped
    // duplicates) goes to its log.
    crash::kill_and_restart(&db, N - 80, |run| {
        RelayChild::spawn(
            RelayChild::command(env!("CARGO_BIN_EXE_nats_relay"), &db)
                .env("RUST_LOG", "warn,outbox_nats=debug")
                .stderr(std::fs::File::create(logs.join(LOGS[run]))?)
                .env("RELAY_SUBJECT", &subject)
                .env("NATS_URL", support::url()),
        )
    })
    .await?;

    let msgs = support::read_stream(&name, Duration::from_secs(30), |m| {
        ids.is_subset(&m.iter().filter_map(|m| m.outbox_id()).collect())
    })
    .await?;
    let mut arrived = Vec::new();
    for m in &msgs {
        let id = m.outbox_id().unwrap();
        assert_eq!(
            m.header("Nats-Msg-Id"),
            Some(format!("{source}:{id}").as_str())
        );
        arrived.push(Arrived {
            id,
            value: serde_json::from_slice(&m.payload)?,
            key: m.header("outbox-key").map(|k| k.as_bytes().to_vec()),
        });
    }
    let arrivals = Arrivals::tally(&ids, arrived);
    let mut dropped = 0;
    for log in LOGS {
        let text = std::fs::read_to_string(logs.join(log))?;
        dropped += text.matches("the redelivered copy was dropped").count();
    }
    let _ = std::fs::remove_dir_all(&logs);
    println!(
        "{} stream messages for {N} rows, {} distinct; the server dropped {dropped} \
         redelivered copies",
        arrivals.total,
        arrivals.per_id.len()
    );
    assert_eq!(
        arrivals.total,
        arrivals.per_id.len(),
        "Nats-Msg-Id: the redelivered rows must not be stored twice"
    );
    assert_eq!(support::stream_len(&name).await?, u64::try_from(N)?);
    assert!(
        dropped >= 20,
        "the 20 rows already on the stream were published again and dropped: {dropped}"
    );
    Ok(())
}

/// The relay SIGKILLed in the window at-least-once cannot close: after the
/// JetStream PubAck and before the row's ack (the relay child waits there,
/// `RELAY_STALL_AFTER_PUBLISH_MS`). Every row is still in the outbox, so the
/// restarted relay publishes the stored messages again with the same
/// `Nats-Msg-Id`, and the server drops those copies: the stream holds each
/// row once. In both claim modes (a transaction-held claim rolls back at the
/// kill; a lease expires after `lease_ttl`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_ack_leaves_no_duplicate_on_the_stream() -> R {
    let streams = Streams::default();
    for claim in ["transaction", "lease"] {
        let (name, subject) = stream(&streams, &format!("stall-{claim}")).await?;
        let db = TestDb::new().await?;
        const N: i64 = 60;
        let ids = crash::publish_rows(&db, N).await?;
        let relay = |stall_ms: &str, log: &std::path::Path| -> anyhow::Result<RelayChild> {
            RelayChild::spawn(
                RelayChild::command(env!("CARGO_BIN_EXE_nats_relay"), &db)
                    .env("RELAY_CLAIM", claim)
                    .env("RELAY_BATCH", "10")
                    .env("RELAY_DELAY_MS", "0")
                    .env("RELAY_STALL_AFTER_PUBLISH_MS", stall_ms)
                    .env("RUST_LOG", "warn,outbox_nats=debug")
                    .stderr(std::fs::File::create(log)?)
                    .env("RELAY_SUBJECT", &subject)
                    .env("NATS_URL", support::url()),
            )
        };
        let dir = std::env::temp_dir().join(format!("nats_stall_{}", tests::suffix()));
        std::fs::create_dir_all(&dir)?;
        let stalled = relay("600000", &dir.join("first.log"))?;
        // Published and confirmed, then stalled: wait until the stream stops
        // growing.
        assert!(
            wait_until(Duration::from_secs(30), || async {
                support::stream_len(&name).await.unwrap() > 0
            })
            .await,
            "{claim}: nothing reached the stream"
        );
        let mut on_stream = 0;
        while support::stream_len(&name).await? != on_stream {
            on_stream = support::stream_len(&name).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            db.count().await?,
            N,
            "{claim}: a row was acked before the kill"
        );
        stalled.sigkill()?;

        let second = relay("0", &dir.join("second.log"))?;
        assert!(
            db.drained(Duration::from_secs(60)).await,
            "{claim}: rows left after the restart"
        );
        second.sigterm()?;
        let msgs = support::read_stream(&name, Duration::from_secs(30), |m| {
            ids.is_subset(&m.iter().filter_map(|m| m.outbox_id()).collect())
        })
        .await?;
        let got: Vec<i64> = msgs.iter().filter_map(|m| m.outbox_id()).collect();
        let distinct: BTreeSet<i64> = got.iter().copied().collect();
        assert_eq!(distinct, ids, "{claim}: every row arrived");
        assert_eq!(got.len(), distinct.len(), "{claim}: a duplicate was stored");
        assert_eq!(support::stream_len(&name).await?, u64::try_from(N)?);
        let log = std::fs::read_to_string(dir.join("second.log"))?;
        let dropped = log.matches("the redelivered copy was dropped").count();
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "{claim}: {on_stream} messages on the stream at the kill, all {N} rows in the outbox; \
             the restarted relay's copies of {dropped} were dropped by the server"
        );
        assert_eq!(
            u64::try_from(dropped)?,
            on_stream,
            "{claim}: each message stored before the kill was published again and dropped"
        );
    }
    Ok(())
}

/// No stream captures the subject at publish time (here: the stream was
/// deleted after the App started; startup itself refuses such a subject,
/// see below): the server answers "no responders", a transient error (not
/// a BusRejection) naming the subject and the fix. Through the App the row
/// stays in the outbox, retried, and arrives once a stream is created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_stream_captures_keeps_its_rows_until_a_stream_exists() -> R {
    let streams = Streams::default();
    let (name, subject) = support::unique("nostream");
    let nats = NatsBroker::new(support::url()).connect_transport().await?;
    let err = nats.publish(out(&subject, 1, "x")).await.unwrap_err();
    assert!(BusRejection::find(&*err).is_none(), "transient: {err}");
    let e = nats_error(&err).unwrap();
    assert!(
        matches!(e, Error::NoStream { .. }) && e.is_retryable(),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains(&subject) && text.contains("ensure_stream"),
        "{text}"
    );

    // The App starts while the stream exists (startup checks it), then the
    // stream goes away before the row is written.
    support::create_stream(&name, &[&subject], None).await?;
    streams.add(&name);
    let db = TestDb::new().await?;
    let route = fast(Route::builder(["q"]))
        .retry(ConstantRetry::new(Duration::from_millis(200)))
        .publish_to("nats", subject.clone())
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let started = Arc::new(Notify::new());
    let app = RunningApp::start(
        db.app()
            .subscriber(route)
            .on_startup(NatsBroker::new(support::url()).connect())
            .after_startup(notify_on_start(&started)),
    );
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("the App did not start while the stream existed");
    support::delete_stream(&name).await;
    let mut tx = db.pool.begin().await?;
    let id = db.broker.publish(&1_i64, "q", &mut *tx).await?;
    tx.commit().await?;
    let retried = wait_until(Duration::from_secs(30), || async {
        db.scalar(format!(
            "SELECT coalesce(max(attempts_count), 0)::bigint FROM {}",
            db.t()
        ))
        .await
        .unwrap()
            >= 2
    })
    .await;
    assert!(retried, "the row was not retried");
    assert_eq!(db.count().await?, 1, "the row stays while no stream exists");
    assert_eq!(db.dlq_count().await?, 0);

    support::create_stream(&name, &[&subject], None).await?;
    assert!(db.drained(Duration::from_secs(30)).await, "not relayed");
    app.stop().await?;
    let msgs = support::read_stream(&name, Duration::from_secs(5), |m| !m.is_empty()).await?;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].outbox_id(), Some(id));
    Ok(())
}

/// An `after_startup` hook that wakes `started`.
fn notify_on_start(started: &Arc<Notify>) -> outbox_core::Hook {
    let started = started.clone();
    outbox_core::Hook::new("started", move |_: outbox_core::AppContext| {
        let started = started.clone();
        async move {
            started.notify_one();
            Ok::<_, BoxError>(())
        }
    })
}

/// Relays one row of queue `q` to `subject` through `nats`, an App of its
/// own: `App::run`'s result (`Ok` once the row is relayed and the App shut
/// down), within 60 s.
async fn run_relay(
    db: &TestDb,
    nats: impl Into<AppNats>,
    subject: &str,
) -> anyhow::Result<outbox_core::Result<()>> {
    let route = fast(Route::builder(["q"]))
        .publish_to("nats", subject.to_owned())
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let app = match nats.into() {
        AppNats::Broker(b) => db.app().subscriber(route).on_startup(b.connect()),
        AppNats::Transport(t) => db.app().subscriber(route).transport(t),
    };
    let handle = app.handle();
    let run = tokio::spawn(app.run());
    let stopper = {
        let handle = handle.clone();
        let db_t = db.t();
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let drained = wait_until(Duration::from_secs(30), || async {
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {db_t}"
                )))
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 0)
            })
            .await;
            handle.shutdown();
            drained
        })
    };
    let res = tokio::time::timeout(Duration::from_secs(60), run).await??;
    stopper.abort();
    Ok(res)
}

/// How [`run_relay`]'s App gets its transport.
enum AppNats {
    Broker(NatsBroker),
    Transport(outbox_nats::NatsTransport),
}

impl From<NatsBroker> for AppNats {
    fn from(b: NatsBroker) -> Self {
        Self::Broker(b)
    }
}

impl From<outbox_nats::NatsTransport> for AppNats {
    fn from(t: outbox_nats::NatsTransport) -> Self {
        Self::Transport(t)
    }
}

/// `App::run` checks at startup that a JetStream stream captures each
/// subject: with none it fails before anything is consumed, naming the
/// subscriber, the subject, the transport and the `ensure_stream` call
/// that fixes it; once a stream captures the subject (through a wildcard
/// here) the same App starts and relays. Core NATS has no destination to
/// check: it starts without a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_a_subject_no_stream_captures() -> R {
    let streams = Streams::default();
    let (name, subject) = support::unique("verify");
    let subject = format!("{subject}.created");
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1_i64, "q", &mut *tx).await?;
    tx.commit().await?;

    let err = run_relay(&db, NatsBroker::new(support::url()), &subject)
        .await?
        .expect_err("started without a stream")
        .to_string();
    println!("{err}");
    let (first, _) = subject.split_once('.').unwrap();
    assert!(
        err.contains(&format!("publishes to `{subject}` on transport `nats`"))
            && err.contains("no JetStream stream captures the subject")
            && err.contains(&format!(
                "nats.ensure_stream(\"{}\", [\"{first}.>\"])",
                first.to_uppercase()
            )),
        "{err}"
    );
    assert_eq!(db.count().await?, 1, "nothing consumed");
    assert_eq!(
        db.scalar(format!(
            "SELECT coalesce(max(attempts_count), 0)::bigint FROM {}",
            db.t()
        ))
        .await?,
        0,
        "no attempt"
    );

    // A stream capturing everything under the subject's parent.
    let parent = subject.trim_end_matches(".created");
    support::create_stream(&name, &[&format!("{parent}.>")], None).await?;
    streams.add(&name);
    let t = NatsBroker::new(support::url()).connect_transport().await?;
    assert_eq!(t.verify_subject(&subject).await, Ok(Some(name.clone())));
    run_relay(&db, NatsBroker::new(support::url()), &subject).await??;
    assert_eq!(db.count().await?, 0);
    assert_eq!(support::stream_len(&name).await?, 1);

    // Core NATS: no stream needed (nobody listens: at most once).
    let (_, core_subject) = support::unique("verify_core");
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&2_i64, "q", &mut *tx).await?;
    tx.commit().await?;
    let core = NatsBroker::new(support::url()).core_publish();
    assert_eq!(
        core.connect_transport()
            .await?
            .verify_subject(&core_subject)
            .await,
        Ok(None)
    );
    run_relay(&db, core, &core_subject).await??;
    assert_eq!(db.count().await?, 0, "relayed with core NATS");
    Ok(())
}

/// JetStream does not answer the startup check (the proxy holds every byte
/// back): `App::run` fails within the publish timeout with `could not
/// check ...`, nothing consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_check_nobody_answers_fails_within_the_publish_timeout() -> R {
    let streams = Streams::default();
    let (_, subject) = stream(&streams, "verify_hung").await?;
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1_i64, "q", &mut *tx).await?;
    tx.commit().await?;
    let proxy = TcpProxy::start(&support::addr()).await?;
    let nats = NatsBroker::new(format!("nats://{}", proxy.addr()))
        .publish_timeout(Duration::from_secs(2))
        .flush_timeout(Duration::from_secs(1))
        .connect_transport()
        .await?;
    proxy.pause();
    let began = std::time::Instant::now();
    let err = run_relay(&db, nats, &subject)
        .await?
        .expect_err("started though JetStream did not answer")
        .to_string();
    println!("{err}");
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    assert!(
        err.contains(&subject)
            && err.contains("could not check")
            && err.contains("did not answer within 2s"),
        "{err}"
    );
    assert_eq!(db.count().await?, 1, "nothing consumed");
    Ok(())
}

/// Over the server's `max_payload` (checked by the client from the server's
/// INFO) and over the stream's `max_msg_size` (refused by JetStream, err_code
/// 10054): both BusRejections naming the bus; through the App the row is
/// dead-lettered as `rejected`, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_rejections_and_dead_lettered() -> R {
    let streams = Streams::default();
    let (name, subject) = support::unique("small");
    support::create_stream(&name, &[&subject], Some(1000)).await?;
    streams.add(&name);
    let nats = NatsBroker::new(support::url()).connect_transport().await?;
    let max = nats.max_payload();
    assert!(max >= 1024, "max_payload from the server's INFO: {max}");

    let big = Outgoing::new(&subject, vec![b'x'; max + 1]);
    let err = nats.publish(big).await.unwrap_err();
    assert_eq!(BusRejection::find(&*err).map(|r| r.bus()), Some("nats"));
    assert!(
        matches!(nats_error(&err), Some(Error::TooLarge { max: m, .. }) if *m == max),
        "{err}"
    );

    let err = nats
        .publish(Outgoing::new(&subject, vec![b'y'; 5000]))
        .await
        .unwrap_err();
    assert_eq!(BusRejection::find(&*err).map(|r| r.bus()), Some("nats"));
    match nats_error(&err) {
        Some(Error::StreamRefused { err_code, .. }) => {
            assert_eq!(*err_code, outbox_nats::JS_ERR_MESSAGE_SIZE);
        }
        other => panic!("expected the stream's refusal: {other:?}"),
    }
    // A small one still goes through. (An id no row of the table below
    // has: the same id would make the row's publish a duplicate the server
    // drops, see msg_id_prefix.)
    nats.publish(out(&subject, -1, "small")).await.unwrap();

    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let id = db
        .broker
        .publish(&outbox_core::Raw(vec![b'z'; 5000]), "big", &mut *tx)
        .await?;
    tx.commit().await?;
    let route = fast(Route::builder(["big"]))
        .publish_to("nats", subject.clone())
        .handler(
            |msg: Message, ctx| async move { outbox_core::Passthrough::from_delivery(&msg, &ctx) },
        );
    let app = RunningApp::start(
        db.app()
            .subscriber(route)
            .on_startup(NatsBroker::new(support::url()).connect()),
    );
    let dead = wait_until(Duration::from_secs(30), || async {
        db.dlq_count().await.unwrap() == 1
    })
    .await;
    app.stop().await?;
    assert!(
        dead,
        "the oversized row was not dead-lettered: {} rows left, {} on the stream",
        db.count().await?,
        support::stream_len(&name).await?
    );
    let reason: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT failure_reason || ': ' || coalesce(last_exception, '') FROM {} WHERE original_id = $1",
        db.d()
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert!(
        reason.starts_with("rejected") && reason.contains("nats") && reason.contains("10054"),
        "{reason}"
    );
    assert_eq!(db.count().await?, 0);
    assert_eq!(support::stream_len(&name).await?, 1, "only the small one");
    Ok(())
}

use outbox_core::FromDelivery as _;

/// A server that requires a password: a wrong one fails `App::run` at
/// startup (refused credentials, the password redacted), the right one
/// connects; that server has no JetStream, which fails startup too (with the
/// fix), unless core publishing is opted in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_and_a_server_without_jetstream_fail_startup() -> R {
    let server = PrivateServer::start(&["--user", "relay", "--pass", "right-pw"]).await?;
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1_i64, "q", &mut *tx).await?;
    tx.commit().await?;
    let run = |nats: NatsBroker| {
        let route = fast(Route::builder(["q"]))
            .publish_to("nats", "anywhere")
            .handler(|msg: Message, _| async move {
                Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
            });
        db.app().subscriber(route).on_startup(nats.connect()).run()
    };

    let wrong = NatsBroker::new(format!("nats://relay:wrong-pw@{}", server.addr))
        .connect_timeout(Duration::from_secs(5));
    let err = tokio::time::timeout(Duration::from_secs(30), run(wrong))
        .await?
        .expect_err("wrong password")
        .to_string();
    assert!(
        err.contains("nats.connect") && err.contains("refused the credentials"),
        "{err}"
    );
    assert!(
        err.contains(&server.addr) && !err.contains("wrong-pw"),
        "{err}"
    );
    let typed_err = NatsBroker::new(format!("nats://{}", server.addr))
        .token("not-a-token")
        .connect_transport()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(typed_err, Error::Refused { .. }) && !typed_err.is_retryable(),
        "{typed_err:?}"
    );

    let right =
        NatsBroker::new(format!("nats://{}", server.addr)).user_password("relay", "right-pw");
    let err = tokio::time::timeout(Duration::from_secs(30), run(right.clone()))
        .await?
        .expect_err("no JetStream")
        .to_string();
    assert!(
        err.contains("JetStream does not answer") && err.contains("-js"),
        "{err}"
    );
    assert_eq!(db.count().await?, 1, "nothing consumed");
    right
        .core_publish()
        .connect_transport()
        .await?
        .close()
        .await
        .unwrap();
    // The credentials in the URL work too (async-nats itself ignores them).
    NatsBroker::new(format!("nats://relay:right-pw@{}", server.addr))
        .core_publish()
        .connect_transport()
        .await?
        .close()
        .await
        .unwrap();
    Ok(())
}

/// A server that hangs (the proxy holds every byte back): a publish fails
/// with the publish timeout instead of hanging, and goes through once the
/// server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_makes_publish_fail_within_its_deadline() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "hung").await?;
    let proxy = TcpProxy::start(&support::addr()).await?;
    let nats = NatsBroker::new(format!("nats://{}", proxy.addr()))
        .publish_timeout(Duration::from_secs(2))
        .connect_transport()
        .await?;
    assert_eq!(nats.max_publish_time(), Duration::from_secs(2));
    proxy.pause();
    let res = tokio::time::timeout(Duration::from_secs(20), nats.publish(out(&subject, 1, "a")))
        .await
        .expect("the publish hung past its deadline");
    let err = res.unwrap_err();
    assert!(
        matches!(nats_error(&err), Some(Error::Timeout { .. })),
        "{err}"
    );
    assert!(BusRejection::find(&*err).is_none());
    proxy.cut();
    let res = tokio::time::timeout(Duration::from_secs(20), nats.publish(out(&subject, 2, "b")))
        .await
        .expect("the publish hung past its deadline");
    assert!(res.is_err(), "Ok while the server was cut");
    proxy.restore();
    let back = wait_until(Duration::from_secs(30), || async {
        nats.publish(out(&subject, 3, "c")).await.is_ok()
    })
    .await;
    assert!(back, "no publish went through after the server came back");
    // The timed-out publishes may have reached the server after all (at
    // least once); each id at most once (Nats-Msg-Id).
    let msgs = support::read_stream(&name, Duration::from_secs(5), |m| {
        m.iter().any(|m| m.outbox_id() == Some(3))
    })
    .await?;
    let ids: Vec<i64> = msgs.iter().filter_map(|m| m.outbox_id()).collect();
    let distinct: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), distinct.len(), "{ids:?}");
    Ok(())
}

/// Core NATS, opted in: no stream, no ack; the subscriber online gets the
/// message with its headers (no `Nats-Msg-Id`); a publish nobody listens to
/// still resolves Ok: at most once, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_publish_is_an_explicit_at_most_once_opt_in() -> R {
    let (_, subject) = support::unique("core");
    let nats = NatsBroker::new(support::url())
        .core_publish()
        .connect_transport()
        .await?;
    assert_eq!(nats.delivery(), Delivery::Core);
    // Nobody listens: the message is gone, the publish is Ok anyway.
    nats.publish(out(&subject, 1, "lost")).await.unwrap();

    let client = support::connect().await;
    let mut sub = client.subscribe(subject.clone()).await?;
    client.flush().await?;
    let mut o = out(&subject, 2, "{\"a\":1}");
    o.headers
        .insert("content-type".into(), "application/json".into());
    o.headers.insert("correlation_id".into(), "c-2".into());
    o.key = Some(b"k2".to_vec());
    assert!(nats.send(o).await?.is_none(), "no PubAck in core mode");
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await?
        .unwrap();
    assert_eq!(&m.payload[..], b"{\"a\":1}");
    let h = m.headers.unwrap();
    let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
    assert_eq!(get("content-type").as_deref(), Some("application/json"));
    assert_eq!(get("correlation_id").as_deref(), Some("c-2"));
    assert_eq!(get("outbox-id").as_deref(), Some("2"));
    assert_eq!(get("message_id").as_deref(), Some("2"));
    assert_eq!(get("outbox-key").as_deref(), Some("k2"));
    assert_eq!(get("Nats-Msg-Id"), None);
    nats.close().await.unwrap();
    Ok(())
}

/// `ensure_stream` creates a stream once (2 min duplicate window), checks its
/// input before sending anything, and a publish to its subject is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_stream_creates_a_missing_stream_once_and_checks_its_input() -> R {
    let streams = Streams::default();
    let (name, subject) = support::unique("ensure");
    streams.add(&name);
    let nats = NatsBroker::new(support::url());
    assert!(nats.ensure_stream(&name, [format!("{subject}.>")]).await?);
    assert!(!nats.ensure_stream(&name, [format!("{subject}.>")]).await?);
    let js = support::js().await;
    let info = js.get_stream(&name).await?.get_info().await?;
    assert_eq!(
        info.config.duplicate_window,
        outbox_nats::DEFAULT_DUPLICATE_WINDOW
    );
    for (bad, subjects) in [
        ("a.b", vec!["x".to_owned()]),
        ("", vec!["x".to_owned()]),
        ("OK_NAME", vec![]),
        ("OK_NAME", vec!["a..b".to_owned()]),
    ] {
        let e = nats.ensure_stream(bad, subjects).await.err();
        assert!(matches!(e, Some(Error::Stream { .. })), "{bad}: {e:?}");
    }
    let t = nats.connect_transport().await?;
    t.publish(out(&format!("{subject}.created"), 1, "x"))
        .await
        .unwrap();
    assert_eq!(support::stream_len(&name).await?, 1);
    Ok(())
}

/// A FastStream `NatsBroker` subscriber (Python, faststream 0.7.8) on the
/// JetStream-captured subject decodes what the relay sent natively: body,
/// content type, correlation id, message id (the outbox id) and headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faststream_decodes_what_the_relay_sent() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "faststream").await?;
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let opts = PublishOptions::new().header("x-tenant", "acme");
    let json_id = db
        .broker
        .publish_with(
            &serde_json::json!({"order": 1, "items": ["a"]}),
            "fs",
            &opts,
            &mut *tx,
        )
        .await?
        .unwrap();
    let text_id = db
        .broker
        .publish_with(&"héllo", "fs", &opts, &mut *tx)
        .await?
        .unwrap();
    tx.commit().await?;
    let route = fast(Route::builder(["fs"]))
        .publish_to("nats", subject.clone())
        .handler(|msg: Message, ctx| async move {
            let body = outbox_core::Passthrough::from_delivery(&msg, &ctx)?;
            Ok::<_, BoxError>(
                Response::new(body)
                    .correlation_id(format!("corr-{}", msg.id()))
                    .header("x-explicit", "e")
                    .key(format!("k{}", msg.id())),
            )
        });
    let app = RunningApp::start(
        db.app()
            .subscriber(route)
            .on_startup(NatsBroker::new(support::url()).connect()),
    );
    assert!(db.drained(Duration::from_secs(30)).await, "not relayed");
    app.stop().await?;
    let source = db.broker.resolve_source().await?;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/fs_nats_consume.py");
    let output = Command::new(interop_python()?)
        .arg(script)
        .args([
            "--url",
            &support::url(),
            "--stream",
            &name,
            "--subject",
            &subject,
        ])
        .args(["--expect", "2", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "fs_nats_consume failed: {stderr}");
    let records: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    assert_eq!(records.len(), 2, "{records:?}");
    println!("{}", serde_json::to_string_pretty(&records)?);
    let by_id: BTreeMap<String, &serde_json::Value> = records
        .iter()
        .map(|r| (r["message_id"].as_str().unwrap_or_default().to_owned(), r))
        .collect();
    for (id, content_type, body, decoded) in [
        (
            json_id,
            "application/json",
            serde_json::to_vec(&serde_json::json!({"order": 1, "items": ["a"]}))?,
            serde_json::json!({"order": 1, "items": ["a"]}),
        ),
        (
            text_id,
            "text/plain",
            "héllo".as_bytes().to_vec(),
            serde_json::json!("héllo"),
        ),
    ] {
        let r = by_id
            .get(&id.to_string())
            .unwrap_or_else(|| panic!("message_id {id} missing: {records:?}"));
        assert_eq!(r["subject"], subject.as_str());
        assert_eq!(base64_decode(r["payload_base64"].as_str().unwrap())?, body);
        assert_eq!(r["decoded_body"], decoded, "FastStream's own decoding");
        assert_eq!(r["content_type"], content_type);
        assert_eq!(r["correlation_id"], format!("corr-{id}").as_str());
        let h = &r["headers"];
        assert_eq!(h["x-tenant"], "acme", "propagated");
        assert_eq!(h["x-explicit"], "e", "explicit");
        assert_eq!(h["outbox-id"], id.to_string().as_str());
        assert_eq!(h["outbox-key"], format!("k{id}").as_str());
        assert_eq!(h["Nats-Msg-Id"], format!("{source}:{id}").as_str());
    }
    Ok(())
}

/// A server with JetStream whose account has none: the JetStream check
/// answers with an API error, and startup fails with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_jetstream_fails_startup() -> R {
    let dir = std::env::temp_dir().join(format!("nats_nojs_{}", tests::suffix()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{ store_dir: {:?} }}\naccounts {{ NOJS {{ users: [{{ user: a, password: b }}] }} }}\n",
            dir.join("js")
        ),
    )?;
    let server = PrivateServer::start(&["-c", &conf.to_string_lossy()]).await;
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let err = NatsBroker::new(format!("nats://a:b@{}", server.addr))
        .connect_transport()
        .await
        .err();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let err = err.expect("an account without JetStream must fail the connect");
    assert!(matches!(err, Error::NoJetStream { .. }), "{err:?}");
    let chain = outbox_core::render_error_chain(&err);
    assert!(chain.contains("-js") && !chain.contains("a:b@"), "{chain}");
    println!("{chain}");
    Ok(())
}
