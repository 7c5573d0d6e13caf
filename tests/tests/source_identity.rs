//! The outbox's source identity (`OutboxBroker::resolve_source`,
//! `Outgoing::source`) and what `outbox-nats` builds from it, against real
//! PostgreSQL and the real nats-server with JetStream (`NATS_URL`).
//!
//! Row ids are unique within one outbox table only. Before the source
//! existed, `Nats-Msg-Id` was the bare row id: two outbox tables relaying
//! into one stream had the second table's row 1 acknowledged as a duplicate
//! of the first table's row 1, not stored, and its row deleted (lost). Now
//! the id is `<source>:<outbox-id>`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route, Transport};
use outbox_nats::{NATS_MSG_ID, NatsBroker, NatsTransport};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tests::nats::{self as support, Streams};
use tests::{TestDb, captured, database_url};

type R = anyhow::Result<()>;

/// A fresh stream and subject, deleted when `streams` drops.
async fn stream(streams: &Streams, label: &str) -> anyhow::Result<(String, String)> {
    let (stream, subject) = support::unique(label);
    support::create_stream(&stream, &[&subject], None).await?;
    streams.add(&stream);
    Ok((stream, subject))
}

/// Publishes `n` rows (bodies `0..n`) to queue `q` in one transaction;
/// their ids.
async fn publish_rows(db: &TestDb, n: i64) -> anyhow::Result<Vec<i64>> {
    let mut tx = db.pool.begin().await?;
    let mut ids = Vec::new();
    for v in 0..n {
        ids.push(db.broker.publish(&v, "q", &mut *tx).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

/// Runs an App relaying queue `q` of `broker` to `subject` through
/// `nats` until `db` is drained; returns the source the App resolved.
async fn relay(
    db: &TestDb,
    broker: OutboxBroker,
    nats: NatsTransport,
    subject: &str,
) -> anyhow::Result<String> {
    let route = Route::builder(["q"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("nats", subject.to_owned())
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let app = App::new(broker)
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .transport(nats);
    let handle = app.handle();
    let run = tokio::spawn(app.run());
    let drained = db.drained(Duration::from_secs(30)).await;
    handle.shutdown();
    run.await??;
    anyhow::ensure!(drained, "rows left in {}: {}", db.t(), db.count().await?);
    handle
        .context()
        .source()
        .map(|s| s.to_string())
        .ok_or_else(|| anyhow::anyhow!("App::run resolved no source"))
}

async fn nats() -> anyhow::Result<NatsTransport> {
    Ok(NatsBroker::new(support::url()).connect_transport().await?)
}

/// `<system_identifier>/<db oid>/<schema>.<table>` of `db`, computed here.
async fn expected_source(db: &TestDb) -> anyhow::Result<String> {
    let (sysid, oid): (String, String) = sqlx::query_as(
        "SELECT system_identifier::text, (SELECT oid::text FROM pg_database \
         WHERE datname = current_database()) FROM pg_control_system()",
    )
    .fetch_one(&db.pool)
    .await?;
    Ok(format!("{sysid}/{oid}/{}.{}", db.schema, db.table.name()))
}

/// The bug: two outbox tables (two schemas, like two services) whose rows
/// have the same ids relay into ONE stream. Every message must be stored:
/// with the bare row id as `Nats-Msg-Id`, the second table's rows were
/// acknowledged as duplicates within the 2-minute window and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_outbox_tables_with_the_same_ids_keep_every_message_in_one_stream() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "two_tables").await?;
    let a = TestDb::new().await?;
    let b = TestDb::new().await?;
    const N: i64 = 20;
    let ids_a = publish_rows(&a, N).await?;
    let ids_b = publish_rows(&b, N).await?;
    assert_eq!(ids_a, ids_b, "two fresh tables give the same row ids");

    let nats_a = nats().await?;
    let nats_b = nats().await?;
    let src_a = relay(&a, a.broker.clone(), nats_a.clone(), &subject).await?;
    let src_b = relay(&b, b.broker.clone(), nats_b.clone(), &subject).await?;
    assert_eq!(src_a, expected_source(&a).await?);
    assert_eq!(src_b, expected_source(&b).await?);
    assert_ne!(src_a, src_b);

    let msgs = support::read_stream(&name, Duration::from_secs(10), |m| {
        m.len() >= usize::try_from(2 * N).unwrap_or(usize::MAX)
    })
    .await?;
    assert_eq!(
        nats_b.duplicates(),
        0,
        "the second table's rows were taken for duplicates of the first's"
    );
    assert_eq!(
        msgs.len(),
        2 * ids_a.len(),
        "every row of both tables is stored: {:?}",
        msgs.iter()
            .map(|m| m.header(NATS_MSG_ID))
            .collect::<Vec<_>>()
    );
    let mut per_source: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for m in &msgs {
        let id = m.outbox_id().unwrap();
        let msg_id = m.header(NATS_MSG_ID).unwrap();
        let (src, tail) = msg_id.rsplit_once(':').unwrap();
        assert_eq!(tail, id.to_string(), "{msg_id}");
        assert_eq!(m.header("message_id"), Some(id.to_string().as_str()));
        per_source.entry(src.to_owned()).or_default().insert(id);
    }
    let all: BTreeSet<i64> = ids_a.iter().copied().collect();
    assert_eq!(
        per_source,
        BTreeMap::from([(src_a, all.clone()), (src_b, all)])
    );
    assert_eq!(support::stream_len(&name).await?, u64::try_from(2 * N)?);
    Ok(())
}

/// The same row (same table, same id) relayed again, by a second App run
/// (as after a crash between the PubAck and the row's delete): the source
/// is the same across runs, so `Nats-Msg-Id` is the same and JetStream
/// still drops the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_row_is_still_deduplicated_and_the_source_is_stable_across_runs() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "redeliver").await?;
    let db = TestDb::new().await?;
    let ids = publish_rows(&db, 3).await?;
    let first_nats = nats().await?;
    let first = relay(&db, db.broker.clone(), first_nats.clone(), &subject).await?;
    assert_eq!(first_nats.duplicates(), 0);

    // The row comes back with its id: what a relay that crashed after the
    // PubAck leaves behind.
    db.exec(format!(
        "INSERT INTO {} (id, queue, payload, headers) VALUES ({}, 'q', '1'::bytea, \
         '{{\"content-type\": \"application/json\"}}'::jsonb)",
        db.t(),
        ids[1]
    ))
    .await?;
    let second_nats = nats().await?;
    let second = relay(&db, db.broker.clone(), second_nats.clone(), &subject).await?;
    assert_eq!(first, second, "the source identity is stable across runs");
    assert_eq!(
        db.broker.resolve_source().await?.as_ref(),
        first.as_str(),
        "resolve_source gives what App::run stamped"
    );
    assert_eq!(
        second_nats.duplicates(),
        1,
        "JetStream dropped the redelivered copy"
    );
    let msgs = support::read_stream(&name, Duration::from_secs(2), |m| m.len() > 3).await?;
    let got: Vec<(Option<i64>, Option<&str>)> = msgs
        .iter()
        .map(|m| (m.outbox_id(), m.header(NATS_MSG_ID)))
        .collect();
    let want: Vec<String> = ids.iter().map(|id| format!("{first}:{id}")).collect();
    assert_eq!(
        got,
        ids.iter()
            .zip(&want)
            .map(|(id, w)| (Some(*id), Some(w.as_str())))
            .collect::<Vec<_>>(),
        "each row once"
    );
    assert_eq!(support::stream_len(&name).await?, 3);
    Ok(())
}

/// `OutboxBroker::source_id` replaces the identity read from PostgreSQL;
/// an explicit `msg_id_prefix` replaces the source in `Nats-Msg-Id`; an
/// invalid explicit id fails startup naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explicit_source_id_and_msg_id_prefix_are_used() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "explicit").await?;
    let db = TestDb::new().await?;
    let named = db.broker.clone().source_id("orders-service");
    assert_eq!(named.get_source_id(), Some("orders-service"));
    assert_eq!(named.resolve_source().await?.as_ref(), "orders-service");

    let ids = publish_rows(&db, 2).await?;
    let src = relay(&db, named.clone(), nats().await?, &subject).await?;
    assert_eq!(src, "orders-service");
    let prefixed = NatsBroker::new(support::url())
        .msg_id_prefix("legacy:")
        .connect_transport()
        .await?;
    let more = publish_rows(&db, 1).await?;
    relay(&db, named, prefixed, &subject).await?;

    let msgs = support::read_stream(&name, Duration::from_secs(5), |m| m.len() >= 3).await?;
    let got: Vec<Option<&str>> = msgs.iter().map(|m| m.header(NATS_MSG_ID)).collect();
    let want = [
        format!("orders-service:{}", ids[0]),
        format!("orders-service:{}", ids[1]),
        format!("legacy:{}", more[0]),
    ];
    assert_eq!(
        got,
        want.iter().map(|w| Some(w.as_str())).collect::<Vec<_>>()
    );

    for bad in ["", "two\nlines"] {
        publish_rows(&db, 1).await?;
        let app = App::new(db.broker.clone().source_id(bad))
            .without_discovery()
            .without_signals()
            .subscriber(
                Route::builder(["q"])
                    .publish_to("nats", subject.clone())
                    .handler(|msg: Message, _| async move {
                        Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
                    }),
            )
            .transport(nats().await?);
        let err = tokio::time::timeout(Duration::from_secs(10), app.run())
            .await?
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("source id") && err.contains("OutboxBroker::source_id"),
            "{bad:?}: {err}"
        );
        assert_eq!(db.count().await?, 1, "nothing consumed");
        db.exec(format!("DELETE FROM {}", db.t())).await?;
    }
    Ok(())
}

/// Where `pg_control_system()` is refused (a managed service revoking it),
/// the identity falls back to the server's address, port and database name,
/// with a WARN naming the fix. The refusal is played by a function of the
/// same name earlier on the `search_path` (revoking the real one would touch
/// the whole cluster), raising `insufficient_privilege` as PostgreSQL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pg_control_system_falls_back_with_a_warning() -> R {
    let db = TestDb::new().await?;
    db.exec(format!(
        "CREATE FUNCTION \"{}\".pg_control_system() RETURNS TABLE (system_identifier bigint) \
         LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'permission denied for function \
         pg_control_system' USING ERRCODE = '42501'; END $$",
        db.schema
    ))
    .await?;
    let opts: PgConnectOptions = database_url().parse()?;
    let opts = opts.options([("search_path", format!("\"{}\",pg_catalog", db.schema))]);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts.clone())
        .await?;
    let refused: Result<(i64,), _> =
        sqlx::query_as("SELECT system_identifier FROM pg_control_system()")
            .fetch_one(&pool)
            .await;
    assert!(
        refused
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|c| c == "42501"),
        "the stand-in refuses: {refused:?}"
    );

    let broker = OutboxBroker::new(pool.clone(), db.table.clone());
    let src = broker.resolve_source().await?;
    let (addr, port, dbname): (Option<String>, Option<i32>, String) = sqlx::query_as(
        "SELECT host(inet_server_addr()), inet_server_port(), current_database()::text",
    )
    .fetch_one(&db.pool)
    .await?;
    let host = match (addr, port) {
        (Some(a), Some(p)) => format!("{a}:{p}"),
        _ => "local".to_owned(),
    };
    let want = format!("{host}/{dbname}/{}.{}", db.schema, db.table.name());
    assert_eq!(src.as_ref(), want);
    assert_eq!(
        broker.resolve_source().await?,
        src,
        "stable across resolutions"
    );
    let warned = captured(|c| {
        c.level == tracing::Level::WARN
            && c.fields.get("source").map(String::as_str) == Some(want.as_str())
    });
    let text = warned
        .first()
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        text.contains("pg_control_system")
            && text.contains("may collide")
            && text.contains("OutboxBroker::source_id"),
        "{warned:?}"
    );

    // An unqualified table name resolves its schema through the search_path.
    let unqualified = OutboxBroker::new(
        pool.clone(),
        outbox_core::OutboxTable::new(db.table.name())?,
    );
    assert_eq!(unqualified.resolve_source().await?.as_ref(), want);
    pool.close().await;
    Ok(())
}

/// A database that cannot be reached at startup: `App::run` keeps trying
/// to read the source (a WARN per attempt, nothing consumed) instead of
/// failing, as the engine's own loops would (each WARN names the fix); a
/// shutdown meanwhile stops it before anything is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_startup_is_retried_until_shutdown() -> R {
    tests::init_tracing();
    let mut opts: PgConnectOptions = database_url().parse()?;
    opts = opts.host("127.0.0.1").port(1);
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy_with(opts);
    let table = outbox_core::OutboxTable::new(&format!("ob_{}", tests::suffix()))?;
    let broker = OutboxBroker::new(pool, table.clone());
    let app = App::new(broker)
        .without_discovery()
        .without_signals()
        .subscriber(Route::builder(["q"]).handler(|_: Message, _| async { Ok::<_, BoxError>(()) }));
    let handle = app.handle();
    let run = tokio::spawn(app.run());
    let warned = tests::wait_until(Duration::from_secs(10), || async {
        !captured(|c| {
            c.level == tracing::Level::WARN
                && c.message.contains("source identity")
                && c.message.contains("Retrying")
        })
        .is_empty()
    })
    .await;
    assert!(warned, "no WARN about the source identity");
    assert!(!run.is_finished(), "App::run gave up instead of retrying");
    assert!(handle.context().source().is_none());
    assert!(
        !captured(|c| c.message.contains("source identity")
            && c.message.contains("OutboxBroker::source_id"))
        .is_empty(),
        "the WARN names the fix"
    );
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), run).await???;
    assert!(
        !captured(|c| c.message.contains("stopped while starting")).is_empty(),
        "the stop is logged"
    );
    Ok(())
}

/// A message without a source (not built by an App) and no prefix keeps
/// the bare outbox id, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_source_keeps_the_bare_id() -> R {
    let streams = Streams::default();
    let (name, subject) = stream(&streams, "bare").await?;
    let t = nats().await?;
    let mut plain = outbox_core::Outgoing::new(subject.clone(), b"1".to_vec());
    plain
        .headers
        .insert(outbox_core::OUTBOX_ID.to_owned(), "5".to_owned());
    let sourced = plain.clone().with_source("svc-a");
    assert_eq!(t.msg_id(&plain).as_deref(), Some("5"));
    assert_eq!(t.msg_id(&sourced).as_deref(), Some("svc-a:5"));
    t.publish(plain).await.unwrap();
    t.publish(sourced).await.unwrap();
    let msgs = support::read_stream(&name, Duration::from_secs(5), |m| m.len() >= 2).await?;
    let got: Vec<Option<&str>> = msgs.iter().map(|m| m.header(NATS_MSG_ID)).collect();
    assert_eq!(got, [Some("5"), Some("svc-a:5")]);
    Ok(())
}
