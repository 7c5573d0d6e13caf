//! [`OutboxPublisher`] on real PostgreSQL: a publish handle bound to one queue
//! with default options, its rows committed or rolled back with the caller's
//! transaction, received by a subscriber, and listed in the AsyncAPI document
//! (checked by the official parser).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{
    App, Engine, Message, OutboxPublisher, PublishOptions, Response, Route, Subscriber,
};
use serde_json::{Value, json};
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The headers of every row of `queue`, by id.
async fn headers_of(db: &TestDb, queue: &str) -> anyhow::Result<Vec<Value>> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT headers FROM {} WHERE queue = $1 ORDER BY id",
        db.t()
    )))
    .bind(queue)
    .fetch_all(&db.pool)
    .await?)
}

#[tokio::test]
async fn rows_follow_the_transaction_with_merged_headers() -> R {
    let db = TestDb::new().await?;
    let orders: OutboxPublisher = db
        .broker
        .publisher("orders")?
        .header("x-source", "checkout")
        .header("x-tenant", "default");

    // Rolled back: no row.
    let mut tx = db.pool.begin().await?;
    orders.publish(&json!({"order_id": 1}), &mut *tx).await?;
    tx.rollback().await?;
    assert_eq!(db.count().await?, 0, "a rolled-back publish leaves no row");

    // Committed: the defaults, and a per-call header that wins.
    let mut tx = db.pool.begin().await?;
    let id = orders.publish(&json!({"order_id": 2}), &mut *tx).await?;
    let second = orders
        .publish_with(
            &json!({"order_id": 3}),
            &PublishOptions::new()
                .header("x-tenant", "acme")
                .header("x-call", "yes")
                .correlation_id("corr-3"),
            &mut *tx,
        )
        .await?
        .unwrap();
    assert!(second > id);
    tx.commit().await?;
    let h = headers_of(&db, "orders").await?;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["x-source"], "checkout");
    assert_eq!(h[0]["x-tenant"], "default");
    assert!(h[0].get("x-call").is_none());
    assert_eq!(h[1]["x-source"], "checkout");
    assert_eq!(h[1]["x-tenant"], "acme", "per-call headers win");
    assert_eq!(h[1]["x-call"], "yes");
    assert_eq!(h[1]["correlation_id"], "corr-3");

    // A batch: defaults on every row, one statement.
    let mut tx = db.pool.begin().await?;
    let n = orders
        .publish_batch_with(
            [json!(4), json!(5), json!(6)],
            &PublishOptions::new().header("x-batch", "1"),
            &mut *tx,
        )
        .await?;
    assert_eq!(n, 3);
    tx.commit().await?;
    let h = headers_of(&db, "orders").await?;
    assert_eq!(h.len(), 5);
    for row in &h[2..] {
        assert_eq!(row["x-source"], "checkout");
        assert_eq!(row["x-batch"], "1");
    }
    // A batch refuses per-row options, as OutboxBroker::publish_batch_with does.
    let mut conn = db.pool.acquire().await?;
    let err = orders
        .publish_batch_with([1], &PublishOptions::new().timer_id("t"), &mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not supported for batch"), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_default_delay_applies_unless_the_call_sets_one() -> R {
    let db = TestDb::new().await?;
    let later = db
        .broker
        .publisher("later")?
        .activate_in(Duration::from_secs(3600));
    let mut conn = db.pool.acquire().await?;
    later.publish(&1, &mut conn).await?;
    later
        .publish_with(
            &2,
            &PublishOptions::new().activate_at(chrono::Utc::now()),
            &mut conn,
        )
        .await?;
    let future = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE next_attempt_at > now() + interval '59 minutes'",
            db.t()
        ))
        .await?;
    assert_eq!(future, 1, "the default delay, then the call's own schedule");
    assert_eq!(db.count().await?, 2);
    Ok(())
}

#[tokio::test]
async fn a_subscriber_receives_what_the_publisher_sends() -> R {
    let db = TestDb::new().await?;
    type Seen = Arc<Mutex<Vec<(Value, Option<String>)>>>;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let sub = Subscriber::builder(["events"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .build(move |m: Message| {
            let s = s.clone();
            async move {
                let body: Value = m.decode()?;
                let h = m.headers().get("x-source").cloned();
                s.lock().unwrap().push((body, h));
                Ok::<_, outbox_core::BoxError>(())
            }
        })?;
    let engine = Engine::new(db.broker.clone()).subscriber(sub);
    engine.start().await?;
    let events = db.broker.publisher("events")?.header("x-source", "api");
    let mut tx = db.pool.begin().await?;
    events.publish(&json!({"n": 1}), &mut *tx).await?;
    tx.commit().await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            seen.lock().unwrap().len() == 1
        })
        .await,
        "the subscriber got the row"
    );
    engine.stop().await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(got, [(json!({"n": 1}), Some("api".to_owned()))]);
    assert!(db.drained(Duration::from_secs(5)).await);
    Ok(())
}

#[tokio::test]
async fn the_queue_is_validated_when_the_publisher_is_made() -> R {
    let db = TestDb::new().await?;
    let err = db.broker.publisher("").unwrap_err();
    assert!(matches!(err, outbox_core::Error::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("OutboxBroker::publisher: queue must be a non-empty string"),
        "{err}"
    );
    let err = db.broker.publisher("q".repeat(256)).unwrap_err();
    assert!(err.to_string().contains("at most 255 characters"), "{err}");
    Ok(())
}

/// The document of an app with one route and two publishers (one on the
/// route's queue, one on a queue nobody here consumes).
fn documented_app(db: &TestDb) -> anyhow::Result<(App, OutboxPublisher, OutboxPublisher)> {
    let orders = db
        .broker
        .publisher("orders")?
        .header("x-source", "checkout")
        .description("Orders placed at checkout");
    let audit = db.broker.publisher("audit")?.title("AuditTrail");
    let route = Route::builder(["orders"])
        .name("relay_orders")
        .publish_to("kafka", "orders.kafka")
        .to(|order_id: i64| async move { Response::new(order_id) });
    let app = db
        .app()
        .subscriber(route)
        .transport(outbox_core::MemoryTransport::new("kafka"))
        .publisher(&orders)
        .publisher(&audit);
    Ok((app, orders, audit))
}

#[tokio::test]
async fn registered_publishers_are_send_operations_in_the_asyncapi_document() -> R {
    let db = TestDb::new().await?;
    let (app, _orders, _audit) = documented_app(&db)?;
    let doc = app.asyncapi()?.into_value();
    let op = &doc["operations"]["orders_Publisher.send"];
    assert_eq!(op["action"], "send", "{doc:#}");
    assert_eq!(op["title"], "orders:Publisher");
    assert_eq!(op["description"], "Orders placed at checkout");
    assert_eq!(op["channel"]["$ref"], "#/channels/outbox.orders");
    assert_eq!(op["x-outbox"]["headers"]["x-source"], "checkout");
    // The route's receive shares the channel; its message is listed there.
    assert_eq!(
        doc["operations"]["relay_orders.receive"]["channel"]["$ref"],
        "#/channels/outbox.orders"
    );
    let msgs = doc["channels"]["outbox.orders"]["messages"]
        .as_object()
        .unwrap();
    assert!(msgs.contains_key("orders_Publisher.published"), "{msgs:?}");
    // A publisher on a queue nobody consumes gets its own channel.
    let audit = &doc["operations"]["AuditTrail.send"];
    assert_eq!(audit["channel"]["$ref"], "#/channels/outbox.audit");
    assert_eq!(doc["channels"]["outbox.audit"]["address"], "audit");

    // The official parser accepts the document.
    let dir = std::env::temp_dir().join(format!("outbox-publisher-{}", tests::suffix()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("publishers.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc)?)?;
    let script = Path::new(REPO).join("tools/asyncapi/validate.js");
    assert!(
        Path::new(REPO)
            .join("tools/asyncapi/node_modules/@asyncapi/parser/package.json")
            .exists(),
        "the AsyncAPI parser is not installed: run `npm ci` in tools/asyncapi (scripts/test.sh does)"
    );
    let out = Command::new("node").arg(&script).arg(&file).output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "@asyncapi/parser found errors:\n{text}"
    );
    assert!(
        text.contains(&format!("{}: valid AsyncAPI 3.0.0", file.display())),
        "{text}"
    );
    assert!(!text.contains(": error:"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
