//! `outbox_core::testing` as a user writes tests with it: `#[subscriber]` /
//! `#[publish_to]` handlers run by a `TestApp` with the outbox in memory and
//! Kafka captured, no PostgreSQL, no broker. (The same scenarios against
//! real PostgreSQL live in `contract.rs`.)
//!
//! `inventory` discovery sees every `#[subscriber]` of this binary: each
//! handler has a queue of its own, the discovery test registers what all of
//! them need, the other tests register their handler explicitly.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::retry::ConstantRetry;
use outbox_core::testing::{OutgoingExt, Step, TestApp, TestClock};
use outbox_core::{
    AckPolicy, BoxError, FailureReason, Message, PublishOptions, Response, Route, State,
    publish_to, subscriber,
};
use outbox_kafka::testing::test_kafka;

type R = anyhow::Result<()>;

// ---------------------------------------------------------------------------
// Handlers

/// The seed tutorial's handler, exactly.
#[publish_to(kafka, "orders.kafka")]
#[subscriber("orders")]
async fn handle(order_id: i64) -> i64 {
    println!("got order {order_id}");
    order_id
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct Order {
    id: i64,
    sku: String,
}

#[derive(Debug, Default)]
struct Seen {
    list: std::sync::Mutex<Vec<String>>,
}

/// Takes the body, the message and state; keys the record by order.
#[publish_to(kafka, "shipments.kafka")]
#[subscriber(
    "harness.shipments",
    retry = ConstantRetry::new(Duration::from_secs(5)).max_attempts(3)
)]
async fn ship(order: Order, msg: Message, seen: State<Seen>) -> Response<Order> {
    seen.list.lock().unwrap().push(format!(
        "{}:{}",
        msg.header("x-tenant").unwrap_or("-"),
        order.sku
    ));
    let key = format!("order-{}", order.id);
    Response::new(order).key(key).header("x-source", "billing")
}

/// Always fails: retried twice, then dead-lettered.
#[subscriber(
    "harness.failing",
    retry = ConstantRetry::new(Duration::from_secs(10)).max_attempts(3)
)]
async fn failing(n: i64) -> Result<(), std::io::Error> {
    Err(std::io::Error::other(format!("cannot handle {n}")))
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn the_seed_handler_relays_to_kafka_in_memory() -> R {
    let started = Instant::now();
    let kafka = test_kafka();
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(handle {})
        .transport(kafka.clone())
        .start()
        .await?;
    let id = app
        .publish_with(
            &1_i64,
            "orders",
            &PublishOptions::new().correlation_id("c-1"),
        )
        .await?
        .unwrap();
    // `publish` returned after the handler ran.
    assert_eq!(app.handled_bodies::<i64>("orders")?, [1]);
    let records = kafka.messages_to("orders.kafka");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.value::<i64>().unwrap(), 1);
    assert_eq!(r.payload, b"1");
    assert_eq!(r.key, None);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.correlation_id(), Some("c-1"));
    assert_eq!(r.header("outbox-id"), Some(id.to_string().as_str()));
    assert_eq!(app.history(id).to_string(), "claimed(1), acked");
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    assert!(kafka.is_closed(), "transports are closed at stop");
    let took = started.elapsed();
    println!("the seed handler test took {took:?}");
    // Milliseconds in fact; the bound leaves room for a loaded CI machine and
    // still rules out real-time waits (a 5-10 s poll, a lease, a drain).
    assert!(took < Duration::from_secs(5), "{took:?}");
    Ok(())
}

#[tokio::test]
async fn handlers_get_the_body_the_message_and_state() -> R {
    let kafka = test_kafka();
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(ship {})
        .transport(kafka.clone())
        .state(Seen::default())
        .start()
        .await?;
    let order = Order {
        id: 7,
        sku: "tea".into(),
    };
    let opts = PublishOptions::new().header("x-tenant", "acme");
    app.publish_with(&order, "harness.shipments", &opts).await?;
    let seen = app.context().state::<Seen>().unwrap();
    assert_eq!(*seen.list.lock().unwrap(), ["acme:tea"]);
    assert_eq!(app.handled_bodies::<Order>("harness.shipments")?, [order]);
    assert_eq!(
        app.handled("harness.shipments")[0].headers["x-tenant"],
        "acme"
    );
    // "topic shipments.kafka received value {..} with key order-7 and header x-source"
    let r = &kafka.messages_to("shipments.kafka")[0];
    assert_eq!(r.value::<Order>().unwrap().sku, "tea");
    assert_eq!(r.key_str(), Some("order-7"));
    assert_eq!(r.header("x-source"), Some("billing"));
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_failing_transport_is_retried_then_relayed() -> R {
    let kafka = test_kafka();
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(ship {})
        .transport(kafka.clone())
        .state(Seen::default())
        .clock(TestClock::frozen())
        .start()
        .await?;
    kafka.fail_next(2);
    let order = Order {
        id: 1,
        sku: "cup".into(),
    };
    let id = app.publish(&order, "harness.shipments").await?;
    assert_eq!(app.history(id).to_string(), "claimed(1), retried");
    let row = app.row(id).await?.unwrap();
    assert_eq!(row.attempts_count, 1);
    app.advance(Duration::from_secs(5)).await?;
    assert!(kafka.messages().is_empty(), "failed again");
    app.advance(Duration::from_secs(5)).await?;
    assert_eq!(kafka.messages_to("shipments.kafka").len(), 1);
    let h = app.history(id);
    assert_eq!(
        h.to_string(),
        "claimed(1), retried, claimed(2), retried, claimed(3), acked"
    );
    assert_eq!(
        h.steps()[1],
        Step::Retried {
            delay: Duration::from_secs(5)
        }
    );
    assert_eq!(app.handled("harness.shipments").len(), 3);
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn retried_twice_then_dead_lettered_with_retry_terminal() -> R {
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(failing {})
        .clock(TestClock::frozen())
        .start()
        .await?;
    let id = app.publish(&5_i64, "harness.failing").await?;
    app.advance(Duration::from_secs(10)).await?;
    app.advance(Duration::from_secs(10)).await?;
    let h = app.history(id);
    assert_eq!(h.retries(), 2);
    assert_eq!(h.failure_reason(), Some(FailureReason::RetryTerminal));
    assert_eq!(
        h.to_string(),
        "claimed(1), retried, claimed(2), retried, claimed(3), dead_lettered(retry_terminal)"
    );
    let dead = app.dead_letters().await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].original_id, id);
    assert_eq!(dead[0].failure_reason, "retry_terminal");
    assert_eq!(dead[0].last_exception.as_deref(), Some("cannot handle 5"));
    assert_eq!(dead[0].decode::<i64>()?, 5);
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn discovery_registers_every_subscriber_of_the_binary() -> R {
    let kafka = test_kafka();
    let app = TestApp::builder()
        .transport(kafka.clone())
        .outbox_transport() // for `bill`
        .state(Seen::default())
        .start()
        .await?;
    app.publish(&3_i64, "orders").await?;
    app.publish(&4_i64, "harness.failing").await?;
    assert_eq!(
        kafka.messages_to("orders.kafka")[0].value::<i64>().unwrap(),
        3
    );
    assert_eq!(app.handled_bodies::<i64>("harness.failing")?, [4]);
    let mut subscribers: Vec<String> = app.calls().into_iter().map(|c| c.subscriber).collect();
    subscribers.sort();
    assert_eq!(subscribers, ["harness::failing", "harness::handle"]);
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn startup_fails_like_app_run_when_a_transport_is_missing() -> R {
    let err = TestApp::builder()
        .without_discovery()
        .subscriber(handle {})
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transport `kafka`, which is not registered"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn publishing_validates_like_production() -> R {
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(handle {})
        .transport(test_kafka())
        .start()
        .await?;
    let err = app.publish(&1, "").await.unwrap_err();
    assert!(err.is_misuse());
    assert_eq!(err.to_string(), "queue must be a non-empty string");
    let err = app
        .publish_with(
            &1,
            "orders",
            &PublishOptions::new().timer_conflict(outbox_core::TimerConflict::Extend),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("requires a timer_id"), "{err}");
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn rows_of_unserved_queues_and_future_rows_stay() -> R {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let route = Route::builder(["reminders"]).handler(move |_m: Message, _| {
        c.fetch_add(1, Ordering::SeqCst);
        async {}
    });
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(route)
        .clock(TestClock::frozen())
        .start()
        .await?;
    let unserved = app.publish(&1, "nobody").await?;
    let later = PublishOptions::new().activate_in(Duration::from_secs(3600));
    let reminder = app.publish_with(&2, "reminders", &later).await?.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let rows = app.rows().await?;
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        [unserved, reminder]
    );
    assert!(app.history(unserved).is_empty());
    app.advance(Duration::from_secs(3599)).await?;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    app.advance(Duration::from_secs(1)).await?;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "due an hour later");
    assert_eq!(app.rows().await?.len(), 1, "the unserved row stays");
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn panics_and_undecodable_payloads_are_handler_errors() -> R {
    let panicking = Route::builder(["panics"])
        .retry(ConstantRetry::new(Duration::from_secs(1)).max_attempts(1))
        .handler(|m: Message, _| async move {
            if m.id() > 0 {
                panic!("kaboom");
            }
        });
    let typed = Route::builder(["typed"])
        .ack_policy(AckPolicy::RejectOnError)
        .handler(|m: Message, _| async move { m.decode::<i64>().map(|_| ()) });
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(panicking)
        .subscriber(typed)
        .start()
        .await?;
    let p = app.publish(&1, "panics").await?;
    let t = app.publish(&"not a number", "typed").await?;
    assert_eq!(
        app.history(p).failure_reason(),
        Some(FailureReason::RetryTerminal)
    );
    assert_eq!(
        app.history(t).failure_reason(),
        Some(FailureReason::Rejected)
    );
    let dead = app.dead_letters().await?;
    assert_eq!(
        dead[0].last_exception.as_deref(),
        Some("handler panicked: kaboom")
    );
    let decode = dead[1].last_exception.as_deref().unwrap();
    assert!(
        decode.contains(&format!("cannot decode the payload of row {t}")) && decode.contains("i64"),
        "{decode}"
    );
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn manual_decisions_follow_the_ack_policy() -> R {
    let route = Route::builder(["manual"])
        .ack_policy(AckPolicy::Manual)
        .retry(ConstantRetry::new(Duration::from_secs(1)))
        .handler(|m: Message, _| async move {
            match m.decode::<String>()?.as_str() {
                "ack" => {
                    m.ack();
                }
                "nack" => {
                    m.nack();
                }
                "reject" => {
                    m.reject();
                }
                _ => {} // silent: rejected, as faststream-outbox does
            }
            Ok::<(), BoxError>(())
        });
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(route)
        .without_dead_letter_table()
        .clock(TestClock::frozen())
        .start()
        .await?;
    let mut ids = Vec::new();
    for body in ["ack", "nack", "reject", "silent"] {
        ids.push(app.publish(&body, "manual").await?);
    }
    let outcomes: Vec<String> = ids.iter().map(|id| app.history(*id).to_string()).collect();
    assert_eq!(
        outcomes,
        [
            "claimed(1), acked",
            "claimed(1), retried",
            "claimed(1), deleted(rejected)",
            "claimed(1), deleted(rejected)",
        ]
    );
    assert!(app.dead_letters().await?.is_empty(), "no dead-letter table");
    assert_eq!(app.rows().await?.len(), 1);
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn loop_mode_runs_the_real_engine_and_stops_gracefully() -> R {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let route = Route::builder(["slow"])
        .max_workers(1)
        .fetch_batch_size(5)
        .handler(move |_m: Message, _| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
            }
        });
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(route)
        .loop_mode()
        .start()
        .await?;
    app.publish_batch(1..=5_i64, "slow").await?;
    // The worker holds row 1; the fetch loop buffered the other four.
    assert!(
        tests::wait_until(Duration::from_secs(5), || async {
            app.handled("slow").len() == 1
                && app
                    .rows()
                    .await
                    .unwrap()
                    .iter()
                    .all(|r| r.acquired_token.is_some())
        })
        .await
    );
    // Row 1 finishes once the stop is under way (acked); the unstarted ones
    // are released at once: row 1 is let go when they are.
    let stop = app.stop();
    tokio::pin!(stop);
    let let_row_1_go = async {
        let released = tests::wait_until(Duration::from_secs(10), || async {
            app.rows()
                .await
                .unwrap()
                .iter()
                .filter(|r| r.acquired_token.is_none())
                .count()
                == 4
        })
        .await;
        assert!(released, "the stop released the unstarted rows");
        gate.add_permits(1);
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = &mut stop => r?,
        () = let_row_1_go => unreachable!(),
        // A deadline, not a readiness wait.
        () = tokio::time::sleep(Duration::from_secs(10)) => panic!("stop hung"),
    }
    let rows = app.rows().await?;
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter()
            .all(|r| r.acquired_token.is_none() && r.deliveries_count == 0)
    );
    let first = app.handled("slow")[0].id;
    assert_eq!(app.history(first).to_string(), "claimed(1), acked");
    assert_eq!(app.history(rows[0].id).to_string(), "claimed(1), released");
    Ok(())
}

#[tokio::test]
async fn loop_mode_settles_many_rows_over_concurrent_workers() -> R {
    let kafka = test_kafka();
    let route = Route::builder(["bulk"])
        .max_workers(4)
        .fetch_batch_size(16)
        .fetch_concurrency(2)
        .publish_to("kafka", "bulk.kafka")
        .handler(
            |m: Message, _| async move { Ok::<_, BoxError>(Response::new(m.decode::<i64>()?)) },
        );
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(route)
        .transport(kafka.clone())
        .loop_mode()
        .start()
        .await?;
    assert_eq!(app.publish_batch(0..500_i64, "bulk").await?, 500);
    app.settle().await?;
    let mut values: Vec<i64> = kafka
        .messages_to("bulk.kafka")
        .iter()
        .map(|m| m.value().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..500).collect::<Vec<_>>(), "each exactly once");
    assert!(app.rows().await?.is_empty());
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stored_rows_are_copies() -> R {
    let route = Route::builder(["copies"]).handler(|mut_msg: Message, _| async move {
        let _ = mut_msg;
    });
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(route)
        .start()
        .await?;
    let later = PublishOptions::new()
        .header("h", "v")
        .activate_in(Duration::from_secs(60));
    let id = app.publish_with(&1, "copies", &later).await?.unwrap();
    let mut row = app.row(id).await?.unwrap();
    row.headers.insert("h".into(), "changed".into());
    assert_eq!(app.store().unwrap().row(id).unwrap().headers["h"], "v");
    assert!(app.is_memory());
    assert!(app.clock().is_some());
    app.stop().await?;
    Ok(())
}

#[publish_to(outbox, "harness.invoices")]
#[subscriber("harness.bills")]
async fn bill(order_id: i64) -> i64 {
    order_id * 100
}

#[subscriber("harness.invoices")]
async fn invoice(_amount: i64) {}

/// Queue chaining in memory: `#[publish_to(outbox, ..)]` with
/// `outbox_transport()` writes the result into the harness's own outbox,
/// where the next handler takes it, as on PostgreSQL.
#[tokio::test]
async fn results_published_to_the_outbox_chain_queues_in_memory() -> R {
    let app = TestApp::builder()
        .without_discovery()
        .subscriber(bill {})
        .subscriber(invoice {})
        .outbox_transport()
        .start()
        .await?;
    app.publish_with(
        &3_i64,
        "harness.bills",
        &PublishOptions::new().correlation_id("c-9"),
    )
    .await?;
    app.settle().await?;
    assert_eq!(app.handled_bodies::<i64>("harness.bills")?, [3]);
    assert_eq!(app.handled_bodies::<i64>("harness.invoices")?, [300]);
    let row = &app.handled("harness.invoices")[0];
    assert_eq!(row.correlation_id(), "c-9");
    assert!(!row.headers.contains_key("outbox-id"), "{:?}", row.headers);
    Ok(())
}
