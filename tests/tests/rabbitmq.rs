//! `outbox-rabbitmq` end to end against the real RabbitMQ over TCP
//! (`RABBITMQ_URL`) and real PostgreSQL: a relay process killed with
//! SIGKILL, unroutable messages, a missing exchange, the startup check of
//! destinations (missing queue or exchange, the broker cut during it), a cut and a hung
//! connection (through an in-test proxy, never the shared broker), the
//! `exchange/routing-key` destinations, refused credentials, the broker's
//! own size limit, and FastStream's `RabbitBroker` reading what the relay
//! published.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::transport::TransportBroker;
use outbox_core::{
    BoxError, BusRejection, Message, Outgoing, PublishOptions, Raw, Response, Route, Transport,
};
use outbox_rabbitmq::{Error, ExchangeKind, RabbitBroker};
use serde_json::Value;
use tests::crash::{self, Arrivals, Arrived, RelayChild};
use tests::rabbitmq::{
    Msg, declare_queue, delete_queue, proxy, queue_len, read_queue, test_rabbit, unique, url,
};
use tests::{RunningApp, TestDb, base64_decode, interop_python, wait_until};

type R = anyhow::Result<()>;

fn fast(b: outbox_core::RouteBuilder) -> outbox_core::RouteBuilder {
    b.min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

/// The crate's error in a publish error's chain.
fn rabbit_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Error>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

fn outgoing(dest: &str, id: i64, body: &str) -> Outgoing {
    let mut out = Outgoing::new(dest, body.as_bytes().to_vec());
    out.headers
        .insert(outbox_core::OUTBOX_ID.to_owned(), id.to_string());
    out
}

fn ids_of(msgs: &[Msg]) -> BTreeSet<i64> {
    msgs.iter().filter_map(Msg::outbox_id).collect()
}

/// A relay process killed with SIGKILL mid-stream, then restarted: every
/// row arrives at least once, the outbox ends empty, nothing is
/// dead-lettered; duplicates only for rows that were in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_loses_nothing() -> R {
    let db = TestDb::new().await?;
    let queue = unique("crash");
    declare_queue(&queue).await?;

    const N: i64 = 400;
    let ids = crash::publish_rows(&db, N).await?;
    let killed = crash::kill_and_restart(&db, N - 80, |_run| {
        RelayChild::spawn(
            RelayChild::command(env!("CARGO_BIN_EXE_rabbitmq_relay"), &db)
                .env("RELAY_DESTINATION", &queue)
                .env("RABBITMQ_URL", url()),
        )
    })
    .await?;

    let want = ids.clone();
    let got = read_queue(&queue, Duration::from_secs(30), |m| {
        want.is_subset(&ids_of(m))
    })
    .await?;
    let arrivals = Arrivals::tally(
        &ids,
        got.iter().map(|m| Arrived {
            id: m.outbox_id().unwrap(),
            value: m.value().unwrap(),
            key: m.key.clone(),
        }),
    );
    arrivals.assert_duplicates_within(&killed);
    println!(
        "{} messages for {N} rows ({} duplicates)",
        got.len(),
        arrivals.duplicates()
    );
    delete_queue(&queue).await;
    Ok(())
}

/// A queue that refuses more messages (`x-overflow = reject-publish`) makes
/// the broker nack the publish: an error (retried), never an `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_an_error() -> R {
    let queue = unique("full");
    let conn = tests::rabbitmq::connect().await;
    let ch = conn.create_channel().await?;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongInt(600_000),
    );
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let _ = conn.close(200, "declared".into()).await;
    let t = test_rabbit(&url()).connect_transport().await?;
    t.publish(outgoing(&queue, 1, "fits")).await.unwrap();
    let err = t.publish(outgoing(&queue, 2, "full")).await.unwrap_err();
    let e = rabbit_error(&*err).unwrap();
    assert!(matches!(e, Error::Nacked { .. }), "{e:?}");
    assert!(e.is_retryable() && BusRejection::find(&*err).is_none());
    assert_eq!(queue_len(&queue).await?, 1);
    t.close().await.unwrap();
    delete_queue(&queue).await;
    Ok(())
}

/// A message no queue takes (mandatory, `basic.return`) is an error, not a
/// silent drop: retried, then dead-lettered as `retry_terminal` with the
/// broker's reason; the row never leaves without a trace. Directly: a
/// missing queue; through the App (whose startup refuses a missing queue):
/// an exchange without a binding for the routing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_retried_then_dead_lettered() -> R {
    let nowhere = unique("no.such.queue");
    let rabbit = test_rabbit(&url());
    let t = rabbit.connect_transport().await?;
    let err = t.publish(outgoing(&nowhere, 1, "x")).await.unwrap_err();
    assert!(BusRejection::find(&*err).is_none(), "transient: {err}");
    let e = rabbit_error(&*err).unwrap();
    assert!(matches!(e, Error::Unroutable { .. }), "{e:?}");
    assert!(e.is_retryable());
    let text = e.to_string();
    assert!(
        text.contains(&nowhere) && text.contains("NO_ROUTE"),
        "{text}"
    );
    // The channel survives a return: the next publish works.
    let queue = unique("routable");
    declare_queue(&queue).await?;
    t.publish(outgoing(&queue, 2, "y")).await.unwrap();
    t.close().await.unwrap();

    // Through the App: a missing queue fails startup (see
    // `a_missing_queue_or_exchange_fails_startup`), so the unroutable
    // destination is an existing exchange no queue is bound to (bindings
    // cannot be checked at startup).
    let unbound = unique("unbound");
    rabbit
        .ensure_exchange(&unbound, ExchangeKind::Direct)
        .await?;
    let unbound_dest = format!("{unbound}/nowhere");
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let id = db.broker.publish(&1_i64, "unroutable", &mut *tx).await?;
    tx.commit().await?;
    let route = fast(Route::builder(["unroutable"]))
        .retry(ConstantRetry::new(Duration::from_millis(100)).max_attempts(3))
        .publish_to("rabbit", unbound_dest.clone())
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let app = RunningApp::start(db.app().subscriber(route).on_startup(rabbit.connect()));
    assert!(
        wait_until(Duration::from_secs(30), || async {
            db.dlq_count().await.unwrap() == 1
        })
        .await,
        "the unroutable row was not dead-lettered"
    );
    app.stop().await?;
    let (reason, last): (String, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT failure_reason, last_exception FROM {} WHERE original_id = $1",
        db.d()
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(reason, "retry_terminal");
    assert!(
        last.contains("NO_ROUTE") && last.contains(&unbound_dest),
        "{last}"
    );
    assert_eq!(db.count().await?, 0);
    delete_queue(&queue).await;
    delete_exchange(&unbound).await;
    Ok(())
}

/// A publish to an exchange that does not exist: RabbitMQ closes the
/// channel (`404 NOT_FOUND`); the error names the exchange and the fix, is
/// retryable (the exchange may be declared later), and the next publish
/// opens a new channel; once declared and bound, the same destination works.
/// (Directly on the transport: `App::run` refuses a missing exchange at
/// startup, see `a_missing_queue_or_exchange_fails_startup`; one deleted
/// while the App runs is this case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_is_named_and_the_channel_reopens() -> R {
    let exchange = unique("no-such-exchange");
    let dest = format!("{exchange}/orders");
    let rabbit = test_rabbit(&url());
    let t = rabbit.connect_transport().await?;
    for attempt in 0..2 {
        let err = t.publish(outgoing(&dest, attempt, "x")).await.unwrap_err();
        let e = rabbit_error(&*err).unwrap();
        assert!(matches!(e, Error::ExchangeNotFound { .. }), "{e:?}");
        assert!(e.is_retryable());
        let text = e.to_string();
        assert!(
            text.contains(&format!("no exchange `{exchange}`")) && text.contains("ensure_exchange"),
            "{text}"
        );
    }
    let queue = unique("after404");
    declare_queue(&queue).await?;
    t.publish(outgoing(&queue, 3, "on a new channel"))
        .await
        .unwrap();

    rabbit
        .ensure_exchange(&exchange, ExchangeKind::Direct)
        .await?;
    rabbit.ensure_binding(&queue, &exchange, "orders").await?;
    t.publish(outgoing(&dest, 4, "via the exchange"))
        .await
        .unwrap();
    let got = read_queue(&queue, Duration::from_secs(10), |m| m.len() >= 2).await?;
    assert_eq!(ids_of(&got), [3, 4].into());
    let via = got.iter().find(|m| m.outbox_id() == Some(4)).unwrap();
    assert_eq!(
        (via.exchange.as_str(), via.routing_key.as_str()),
        (exchange.as_str(), "orders")
    );
    t.close().await.unwrap();
    delete_queue(&queue).await;
    delete_exchange(&exchange).await;
    Ok(())
}

async fn delete_exchange(exchange: &str) {
    let conn = tests::rabbitmq::connect().await;
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(exchange.into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// The startup check (`Transport::verify_destination`): a destination whose
/// queue (default exchange, also `/odd/queue`) or exchange does not exist
/// fails `App::run` before anything is consumed, naming the subscriber, the
/// destination, the transport, the missing queue or exchange and the
/// `ensure_*` call that declares it; the row stays in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_or_exchange_fails_startup() -> R {
    let rabbit = test_rabbit(&url());
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1_i64, "verify", &mut *tx).await?;
    tx.commit().await?;
    let queue = unique("no.such.queue");
    let slashed = format!("odd/{}", unique("no.such.queue"));
    let exchange = unique("no-such-exchange");
    let cases = [
        (
            queue.clone(),
            vec![
                format!("no queue `{queue}`"),
                format!("rabbit.ensure_queue(\"{queue}\")"),
            ],
        ),
        (
            format!("/{slashed}"),
            vec![
                format!("no queue `{slashed}`"),
                format!("rabbit.ensure_queue(\"{slashed}\")"),
            ],
        ),
        (
            format!("{exchange}/orders.created"),
            vec![
                format!("no exchange `{exchange}`"),
                format!("rabbit.ensure_exchange(\"{exchange}\""),
                "bindings are not checked".to_owned(),
            ],
        ),
    ];
    for (dest, wants) in cases {
        let route = fast(Route::builder(["verify"]))
            .name("to_missing")
            .publish_to("rabbit", dest.clone())
            .handler(|msg: Message, _| async move {
                Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
            });
        let run = db
            .app()
            .subscriber(route)
            .on_startup(rabbit.connect())
            .run();
        let err = tokio::time::timeout(Duration::from_secs(30), run)
            .await?
            .unwrap_err();
        let text = err.to_string();
        println!("{text}");
        assert!(
            text.contains("`to_missing`")
                && text.contains(&format!("`{dest}`"))
                && text.contains("transport `rabbit`"),
            "{text}"
        );
        for want in &wants {
            assert!(text.contains(want.as_str()), "lacks {want:?}: {text}");
        }
        assert_eq!(db.count().await?, 1, "a row was consumed ({dest})");
        assert_eq!(db.dlq_count().await?, 0);
    }
    Ok(())
}

/// Destinations that exist pass the check and the App relays to them: a
/// queue, a queue with a `/` in its name, an exchange (bound here; the check
/// looks at the exchange only). On the transport directly: a failed check
/// (the broker closes the throwaway channel with `404`) leaves the publish
/// channel alone (no reopened channel, the same link generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_destinations_pass_the_startup_check() -> R {
    let rabbit = test_rabbit(&url());
    let queue = unique("verified");
    let slashed = format!("odd/{}", unique("verified"));
    let exchange = unique("verified-x");
    let bound = unique("verified-bound");
    for q in [&queue, &slashed, &bound] {
        declare_queue(q).await?;
    }
    rabbit
        .ensure_exchange(&exchange, ExchangeKind::Topic)
        .await?;
    rabbit.ensure_binding(&bound, &exchange, "orders.*").await?;
    let dests = [
        queue.clone(),
        format!("/{slashed}"),
        format!("{exchange}/orders.created"),
    ];

    let t = rabbit.connect_transport().await?;
    let generation = |t: &outbox_rabbitmq::RabbitTransport| {
        let dbg = format!("{t:?}");
        assert!(dbg.contains("generation: Some("), "{dbg}");
        dbg.split("generation: ").nth(1).unwrap().to_owned()
    };
    let before = generation(&t);
    for d in &dests {
        t.verify_destination(d)
            .await
            .unwrap_or_else(|e| panic!("{d}: {e}"));
    }
    // The predeclared exchange `amq.topic` exists too.
    t.verify_destination("amq.topic/anything").await.unwrap();
    for _ in 0..3 {
        let missing = unique("no.such.queue");
        let err = t.verify_destination(&missing).await.unwrap_err();
        assert!(err.contains(&format!("no queue `{missing}`")), "{err}");
        let err = t
            .verify_destination(&format!("{}/k", unique("no-such-x")))
            .await
            .unwrap_err();
        assert!(err.contains("no exchange"), "{err}");
        t.publish(outgoing(&queue, 1, "after a failed check"))
            .await
            .unwrap();
    }
    assert_eq!(generation(&t), before, "the publish link was replaced");
    t.close().await.unwrap();

    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    for v in 0..3_i64 {
        db.broker.publish(&v, "verified", &mut *tx).await?;
    }
    tx.commit().await?;
    let mut app = db.app().on_startup(rabbit.connect());
    for (i, d) in dests.iter().enumerate() {
        app = app.subscriber(
            fast(Route::builder(["verified"]))
                .name(format!("to_{i}"))
                .publish_to("rabbit", d.clone())
                .handler(|msg: Message, _| async move {
                    Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
                }),
        );
    }
    let app = RunningApp::start(app);
    assert!(db.drained(Duration::from_secs(30)).await, "rows left");
    app.stop().await?;
    let total = queue_len(&queue).await? + queue_len(&slashed).await? + queue_len(&bound).await?;
    // `queue` also holds the 3 direct publishes above.
    assert_eq!(total, 3 + 3, "each row relayed once");
    for q in [&queue, &slashed, &bound] {
        delete_queue(q).await;
    }
    delete_exchange(&exchange).await;
    Ok(())
}

/// A broker that cannot be reached or does not answer during the check is a
/// startup error too (`could not check …`), within the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_fails_when_the_broker_is_cut_or_hangs() -> R {
    let (proxy, via) = proxy().await?;
    let queue = unique("checked");
    declare_queue(&queue).await?;
    let t = test_rabbit(&via)
        .connect_timeout(Duration::from_secs(1))
        .connect_transport()
        .await?;
    t.verify_destination(&queue).await.unwrap();

    proxy.pause();
    let started = std::time::Instant::now();
    let err = t.verify_destination(&queue).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "unbounded");
    assert!(
        err.contains(&format!("could not check the queue `{queue}`")) && err.contains("no answer"),
        "{err}"
    );
    proxy.cut();
    let err = t.verify_destination(&queue).await.unwrap_err();
    assert!(
        err.contains(&format!("could not check the queue `{queue}`"))
            && err.contains("cannot connect"),
        "{err}"
    );
    assert!(!err.contains(":guest@"), "leaks the password: {err}");
    proxy.restore();
    // Recovers: a fresh connection for the check, then the publish link.
    let mut ok = false;
    for _ in 0..10 {
        if t.verify_destination(&queue).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the check did not recover after the restore");
    let _ = t.close().await;
    delete_queue(&queue).await;
    Ok(())
}

/// The connection is cut (proxy): publishes fail instead of resolving Ok;
/// after the cut is restored the transport reconnects by itself on the next
/// publish, and many publishes share the new confirm channel at once. A
/// hung connection (proxy paused) times out and is replaced as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_connection_is_cut_or_hangs() -> R {
    let (proxy, via) = proxy().await?;
    let queue = unique("reconnect");
    declare_queue(&queue).await?;
    let t = test_rabbit(&via)
        .publish_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .connect_transport()
        .await?;
    t.publish(outgoing(&queue, 1, "before")).await.unwrap();

    proxy.cut();
    let err = t.publish(outgoing(&queue, 2, "cut")).await.unwrap_err();
    println!("while cut: {err}");
    assert!(rabbit_error(&*err).unwrap().is_retryable());
    proxy.restore();
    // The first publish after the restore may still meet the dead link.
    let mut ok = false;
    for i in 0..5 {
        if t.publish(outgoing(&queue, 10 + i, "after")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "no publish succeeded after the connection came back");
    let many: Vec<_> = (100..150)
        .map(|i| {
            let t = t.clone();
            let q = queue.clone();
            tokio::spawn(async move { t.publish(outgoing(&q, i, "concurrent")).await })
        })
        .collect();
    for h in many {
        h.await?.unwrap();
    }

    proxy.pause();
    let err = t.publish(outgoing(&queue, 3, "hung")).await.unwrap_err();
    let e = rabbit_error(&*err).unwrap();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    proxy.restore();
    t.publish(outgoing(&queue, 4, "after the hang"))
        .await
        .unwrap();

    let want: BTreeSet<i64> = [1, 4].into_iter().chain(100..150).collect();
    let w = want.clone();
    let got = read_queue(&queue, Duration::from_secs(10), |m| w.is_subset(&ids_of(m))).await?;
    assert!(want.is_subset(&ids_of(&got)), "{:?}", ids_of(&got));
    let _ = t.close().await;
    delete_queue(&queue).await;
    Ok(())
}

/// `exchange/routing.key` destinations, through the App: a topic exchange
/// routes by the key to the bound queue; `exchange/` (empty key) feeds a
/// fanout exchange; `/a/queue` reaches a queue whose name holds a slash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_and_routing_key_destinations() -> R {
    let rabbit = test_rabbit(&url());
    let topic_x = unique("orders-topic");
    let fan_x = unique("orders-fanout");
    let q_topic = unique("billing");
    let q_fan = unique("audit");
    let q_slash = format!("odd/{}", unique("queue"));
    rabbit
        .ensure_exchange(&topic_x, ExchangeKind::Topic)
        .await?;
    rabbit.ensure_exchange(&fan_x, ExchangeKind::Fanout).await?;
    for q in [&q_topic, &q_fan, &q_slash] {
        rabbit.ensure_queue(q).await?;
    }
    rabbit
        .ensure_binding(&q_topic, &topic_x, "orders.*")
        .await?;
    rabbit.ensure_binding(&q_fan, &fan_x, "").await?;

    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    for v in 0..3_i64 {
        db.broker.publish(&v, "xrk", &mut *tx).await?;
    }
    tx.commit().await?;
    let routes = [
        ("to_topic", format!("{topic_x}/orders.created")),
        ("to_fanout", format!("{fan_x}/")),
        ("to_slash", format!("/{q_slash}")),
    ];
    let mut app = db.app().on_startup(rabbit.connect());
    for (name, dest) in &routes {
        // One route per destination, all on the same rows: each handler
        // republishes the row under its own name.
        app = app.subscriber(
            fast(Route::builder(["xrk"]))
                .name(*name)
                .publish_to("rabbit", dest.clone())
                .handler(|msg: Message, _| async move {
                    Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
                }),
        );
    }
    let app = RunningApp::start(app);
    assert!(db.drained(Duration::from_secs(30)).await, "rows left");
    app.stop().await?;
    // The three routes share the rows: together they relayed each once.
    let total = queue_len(&q_topic).await? + queue_len(&q_fan).await? + queue_len(&q_slash).await?;
    assert_eq!(
        total, 3,
        "each row relayed once, by whichever route claimed it"
    );
    let topic = read_queue(&q_topic, Duration::from_secs(1), |_| false).await?;
    for m in &topic {
        assert_eq!(m.exchange, topic_x);
        assert_eq!(m.routing_key, "orders.created");
    }
    let fan = read_queue(&q_fan, Duration::from_secs(1), |_| false).await?;
    for m in &fan {
        assert_eq!(
            (m.exchange.as_str(), m.routing_key.as_str()),
            (fan_x.as_str(), "")
        );
    }
    let slash = read_queue(&q_slash, Duration::from_secs(1), |_| false).await?;
    for m in &slash {
        assert_eq!(
            (m.exchange.as_str(), m.routing_key.as_str()),
            ("", q_slash.as_str())
        );
    }
    // Direct publishes: every form reaches its queue.
    let t = rabbit.connect_transport().await?;
    t.publish(outgoing(&format!("{topic_x}/orders.paid"), 7, "t"))
        .await
        .unwrap();
    t.publish(outgoing(&format!("{fan_x}/"), 8, "f"))
        .await
        .unwrap();
    t.publish(outgoing(&format!("/{q_slash}"), 9, "s"))
        .await
        .unwrap();
    let unbound = t
        .publish(outgoing(&format!("{topic_x}/refunds.created"), 10, "u"))
        .await
        .unwrap_err();
    assert!(
        matches!(rabbit_error(&*unbound), Some(Error::Unroutable { .. })),
        "{unbound}"
    );
    t.close().await.unwrap();
    for (q, id) in [(&q_topic, 7), (&q_fan, 8), (&q_slash, 9)] {
        let got = read_queue(q, Duration::from_secs(10), |m| ids_of(m).contains(&id)).await?;
        assert!(ids_of(&got).contains(&id), "{q} lacks {id}");
        delete_queue(q).await;
    }
    delete_exchange(&topic_x).await;
    delete_exchange(&fan_x).await;
    Ok(())
}

/// Refused credentials and an unknown virtual host fail the startup with an
/// error naming the URL (password redacted) and what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_startup_clearly() -> R {
    let good = url();
    let bad_password = good.replacen("guest:guest@", "guest:hunter2@", 1);
    assert_ne!(
        good, bad_password,
        "RABBITMQ_URL has no guest:guest user info"
    );
    let unknown_vhost = good.replacen("/%2f", "/no-such-vhost", 1);
    for (u, what) in [(bad_password, "password"), (unknown_vhost, "vhost")] {
        let err = RabbitBroker::new(u.clone())
            .connect_timeout(Duration::from_secs(5))
            .connect_transport()
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::AccessRefused { .. }),
            "{what}: {err:?}"
        );
        let text = outbox_core::render_error_chain(&err);
        assert!(text.contains("refused the login"), "{what}: {text}");
        assert!(!text.contains("hunter2"), "{what}: {text}");
        assert!(text.contains("***@") || !u.contains(':'), "{what}: {text}");
    }

    let db = TestDb::new().await?;
    let broker = RabbitBroker::new(good.replacen("guest:guest@", "guest:hunter2@", 1));
    let route = Route::builder(["refused"])
        .publish_to("rabbit", "anywhere")
        .handler(|msg: Message, _| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let err = db
        .app()
        .subscriber(route)
        .on_startup(broker.connect())
        .run()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("rabbit.connect") && text.contains("refused the login"),
        "{text}"
    );
    assert!(
        text.contains("guest:***@") && !text.contains("hunter2"),
        "{text}"
    );
    println!("{text}");
    Ok(())
}

/// With no client-side limit, RabbitMQ's own `max_message_size` refusal
/// (`406 PRECONDITION_FAILED`, channel closed) is a `BusRejection` naming the
/// bus; the next publish works on a new channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_size_limit_is_a_bus_rejection() -> R {
    let queue = unique("huge");
    declare_queue(&queue).await?;
    let t = test_rabbit(&url())
        .max_message_bytes(None)
        .publish_timeout(Duration::from_secs(60))
        .connect_transport()
        .await?;
    // RabbitMQ 3.x's default max_message_size is 128 MiB.
    let mut out = Outgoing::new(&queue, vec![b'x'; 128 * 1024 * 1024 + 1]);
    out.headers
        .insert(outbox_core::OUTBOX_ID.to_owned(), "1".to_owned());
    let err = t.publish(out).await.unwrap_err();
    let rejection =
        BusRejection::find(&*err).unwrap_or_else(|| panic!("not a BusRejection: {err}"));
    assert_eq!(rejection.bus(), "rabbit");
    let e = rabbit_error(&*err).unwrap();
    assert!(matches!(e, Error::MessageTooLarge { .. }), "{e:?}");
    println!("{}", outbox_core::render_error_chain(&*err));
    t.publish(outgoing(&queue, 2, "small")).await.unwrap();
    assert_eq!(queue_len(&queue).await?, 1);
    t.close().await.unwrap();
    delete_queue(&queue).await;
    Ok(())
}

/// FastStream's `RabbitBroker` (Python) subscribes to the queue the Rust
/// relay published to and gets the body, content type, correlation id,
/// message id and headers intact, decoded by FastStream itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faststream_reads_what_the_relay_published() -> R {
    let rabbit = test_rabbit(&url());
    let queue = unique("faststream");
    rabbit.ensure_queue(&queue).await?;

    let db = TestDb::new().await?;
    let opts = PublishOptions::new().header("x-tenant", "acme");
    let mut tx = db.pool.begin().await?;
    let json_id = db
        .broker
        .publish_with(
            &serde_json::json!({"order": 7, "items": ["a", "b"]}),
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
    let raw_id = db
        .broker
        .publish_with(&Raw(vec![0, 159, 146, 150]), "fs", &opts, &mut *tx)
        .await?
        .unwrap();
    tx.commit().await?;

    let route = fast(Route::builder(["fs"]))
        .publish_to("rabbit", queue.clone())
        .handler(|msg: Message, ctx| async move {
            let body =
                <outbox_core::Passthrough as outbox_core::FromDelivery>::from_delivery(&msg, &ctx)?;
            Ok::<_, BoxError>(
                Response::new(body)
                    .key(format!("k{}", msg.id()))
                    .header("x-explicit", "yes")
                    .correlation_id(format!("corr-{}", msg.id())),
            )
        });
    let app = RunningApp::start(db.app().subscriber(route).on_startup(rabbit.connect()));
    assert!(db.drained(Duration::from_secs(30)).await, "rows left");
    app.stop().await?;

    let out = Command::new(interop_python()?)
        .arg(format!(
            "{}/python/fs_rabbitmq_consume.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(["--url", &url(), "--queue", &queue, "--expect", "3"])
        .args(["--timeout", "30"])
        .output()?;
    assert!(
        out.status.success(),
        "fs_rabbitmq_consume failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(got.len(), 3, "{got:?}");
    let by_id: BTreeMap<i64, &Value> = got
        .iter()
        .map(|m| (m["message_id"].as_str().unwrap().parse().unwrap(), m))
        .collect();
    let check = |id: i64, content_type: Option<&str>| -> &Value {
        let m = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("row {id} missing: {got:?}"));
        assert_eq!(m["content_type"].as_str(), content_type, "{m}");
        assert_eq!(m["correlation_id"], format!("corr-{id}"), "{m}");
        assert_eq!(m["headers"]["x-tenant"], "acme", "{m}");
        assert_eq!(m["headers"]["x-explicit"], "yes", "{m}");
        assert_eq!(m["headers"]["outbox-key"], format!("k{id}"), "{m}");
        assert_eq!(m["routing_key"], queue.as_str(), "{m}");
        assert_eq!(m["exchange"], "", "{m}");
        assert_eq!(m["delivery_mode"], 2, "{m}");
        m
    };
    let json = check(json_id, Some("application/json"));
    assert_eq!(
        json["decoded"],
        serde_json::json!({"order": 7, "items": ["a", "b"]})
    );
    assert_eq!(json["handler_body"], json["decoded"]);
    let text = check(text_id, Some("text/plain"));
    assert_eq!(text["decoded"], "héllo");
    assert_eq!(
        base64_decode(text["body_base64"].as_str().unwrap())?,
        "héllo".as_bytes()
    );
    let raw = check(raw_id, None);
    assert_eq!(
        base64_decode(raw["body_base64"].as_str().unwrap())?,
        vec![0, 159, 146, 150]
    );
    assert_eq!(
        base64_decode(raw["decoded"]["base64"].as_str().unwrap())?,
        vec![0, 159, 146, 150]
    );
    delete_queue(&queue).await;
    Ok(())
}

/// A RabbitBroker is a TransportBroker named `rabbit` by default (the name
/// `#[publish_to(rabbit, ...)]` uses).
#[test]
fn the_default_name_is_rabbit() {
    let r = RabbitBroker::new(url());
    assert_eq!(r.transport_name(), "rabbit");
    let _: Arc<dyn Transport> = Arc::new(outbox_rabbitmq::testing::test_rabbit());
}
