//! `outbox_core::inbox`: consumer-side deduplication in the consumer's own
//! transaction, against the real PostgreSQL (and the Kafka-protocol broker
//! for the example service killed mid-batch).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::inbox::Inbox;
use outbox_core::retry::ConstantRetry;
use outbox_core::{BoxError, Engine, Message, Subscriber};
use rand::Rng;
use tests::TestDb;

type R = anyhow::Result<()>;

async fn inbox_in(db: &TestDb, consumer: &str) -> anyhow::Result<Inbox> {
    let inbox = Inbox::new("inbox", consumer)?.schema(&db.schema)?;
    inbox.migrate(&db.pool).await?;
    Ok(inbox)
}

#[tokio::test]
async fn accept_commits_with_the_transaction() -> R {
    let db = TestDb::new().await?;
    let inbox = inbox_in(&db, "billing").await?;
    inbox.migrate(&db.pool).await?; // idempotent

    // Rolled back: nothing recorded, the message is new again.
    let mut tx = db.pool.begin().await?;
    assert!(inbox.accept(&mut *tx, "orders.kafka:1").await?);
    tx.rollback().await?;
    assert!(!inbox.contains(&db.pool, "orders.kafka:1").await?);

    let mut tx = db.pool.begin().await?;
    assert!(inbox.accept(&mut *tx, "orders.kafka:1").await?);
    // Seen again in the same transaction: already recorded.
    assert!(!inbox.accept(&mut *tx, "orders.kafka:1").await?);
    tx.commit().await?;
    assert!(inbox.contains(&db.pool, "orders.kafka:1").await?);

    let mut tx = db.pool.begin().await?;
    assert!(
        !inbox.accept(&mut *tx, "orders.kafka:1").await?,
        "a redelivery"
    );
    assert!(inbox.accept(&mut *tx, "orders.kafka:2").await?);
    tx.commit().await?;

    // Another consumer of the same table has its own records.
    let audit = inbox_in(&db, "audit").await?;
    assert!(audit.accept(&db.pool, "orders.kafka:1").await?);
    assert!(!audit.contains(&db.pool, "orders.kafka:3").await?);
    Ok(())
}

#[tokio::test]
async fn concurrent_accepts_of_one_id_are_serialized() -> R {
    let db = TestDb::new().await?;
    let inbox = inbox_in(&db, "billing").await?;
    for first_commits in [true, false] {
        let id = format!("m-{first_commits}");
        let mut first = db.pool.begin().await?;
        assert!(inbox.accept(&mut *first, &id).await?);
        // The second transaction waits on the first one's key...
        let (inbox2, pool, id2) = (inbox.clone(), db.pool.clone(), id.clone());
        let second = tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            let accepted = inbox2.accept(&mut *tx, &id2).await?;
            tx.commit().await?;
            anyhow::Ok(accepted)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second accept must wait");
        // ...and gets the first one's outcome.
        if first_commits {
            first.commit().await?;
        } else {
            first.rollback().await?;
        }
        let accepted = tokio::time::timeout(Duration::from_secs(10), second).await???;
        assert_eq!(accepted, !first_commits, "first committed: {first_commits}");
    }
    Ok(())
}

#[tokio::test]
async fn bad_ids_are_refused_before_sql() -> R {
    let db = TestDb::new().await?;
    // No table at all: the id check comes first.
    let inbox = Inbox::new("no_such_inbox", "billing")?.schema(&db.schema)?;
    let err = inbox.accept(&db.pool, "").await.unwrap_err();
    assert!(err.is_misuse(), "{err}");
    let err = inbox.accept(&db.pool, &"x".repeat(1025)).await.unwrap_err();
    assert!(err.to_string().contains("1-1024 bytes"), "{err}");
    // A real id reaches the database, which names the missing table.
    let err = inbox.accept(&db.pool, "1").await.unwrap_err();
    assert!(err.as_database_error().is_some(), "{err}");
    Ok(())
}

#[tokio::test]
async fn cleanup_removes_what_is_older_than_the_retention() -> R {
    let db = TestDb::new().await?;
    let inbox = inbox_in(&db, "billing")
        .await?
        .retention(Duration::from_secs(3600));
    let other = inbox_in(&db, "audit").await?;
    let t = inbox.qualified_name();
    // 25,000 old records (three cleanup statements), 10 recent ones, and
    // another consumer's old records, which are not this inbox's to remove.
    db.exec(format!(
        "INSERT INTO {t} (consumer, message_id, accepted_at) \
         SELECT 'billing', 'old-' || g, now() - interval '2 hours' FROM generate_series(1, 25000) g"
    ))
    .await?;
    db.exec(format!(
        "INSERT INTO {t} (consumer, message_id) SELECT 'billing', 'new-' || g FROM generate_series(1, 10) g"
    ))
    .await?;
    db.exec(format!(
        "INSERT INTO {t} (consumer, message_id, accepted_at) \
         SELECT 'audit', 'old-' || g, now() - interval '2 hours' FROM generate_series(1, 5) g"
    ))
    .await?;
    assert_eq!(inbox.cleanup(&db.pool).await?, 25_000);
    assert_eq!(inbox.cleanup(&db.pool).await?, 0);
    let left = db
        .scalar(format!(
            "SELECT count(*) FROM {t} WHERE consumer = 'billing'"
        ))
        .await?;
    assert_eq!(left, 10);
    assert!(inbox.contains(&db.pool, "new-1").await?);
    assert!(other.contains(&db.pool, "old-1").await?);

    // The background task does the same on its own.
    db.exec(format!(
        "UPDATE {t} SET accepted_at = now() - interval '2 hours' WHERE message_id = 'new-1'"
    ))
    .await?;
    let task = inbox.spawn_cleanup(db.pool.clone(), Duration::from_millis(50));
    let gone = tests::wait_until(Duration::from_secs(10), || async {
        !inbox.contains(&db.pool, "new-1").await.unwrap()
    })
    .await;
    task.abort();
    assert!(gone, "the cleanup task removed the expired record");
    assert!(inbox.contains(&db.pool, "new-2").await?);
    Ok(())
}

/// A `#[subscriber]`-style handler whose first run commits its domain row
/// and then fails (as if the relay died before the ack): the row is handled
/// again, and the inbox keeps the domain row single.
#[tokio::test]
async fn a_subscriber_handler_redelivered_after_its_commit_writes_once() -> R {
    let db = TestDb::new().await?;
    let inbox = inbox_in(&db, "shipping").await?;
    let domain = format!(
        "{}.shipments",
        outbox_core::sqlx::query_scalar::<_, String>("SELECT quote_ident($1)")
            .bind(&db.schema)
            .fetch_one(&db.pool)
            .await?
    );
    db.exec(format!(
        "CREATE TABLE {domain} (id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL)"
    ))
    .await?;
    let runs = Arc::new(AtomicUsize::new(0));
    let (pool, inbox2, runs2, domain2) =
        (db.pool.clone(), inbox.clone(), runs.clone(), domain.clone());
    let handler = move |msg: Message| {
        let (pool, inbox, runs, domain) =
            (pool.clone(), inbox2.clone(), runs2.clone(), domain2.clone());
        async move {
            let order_id: i64 = msg.decode()?;
            let mut tx = pool.begin().await?;
            if inbox.accept(&mut *tx, &msg.id().to_string()).await? {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {domain} (order_id) VALUES ($1)"
                )))
                .bind(order_id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            // The first run of each message fails after its commit.
            if runs.fetch_add(1, Ordering::SeqCst) < 3 {
                return Err::<(), BoxError>("crashed after the commit".into());
            }
            Ok(())
        }
    };
    let queue = "inbox.shipments";
    let sub = Subscriber::builder([queue])
        .retry(ConstantRetry::new(Duration::from_millis(50)))
        .max_workers(1)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .build(handler)?;
    let engine = Engine::new(db.broker.clone()).subscriber(sub);
    engine.start().await?;
    for order_id in 1..=3_i64 {
        let mut tx = db.pool.begin().await?;
        db.broker.publish(&order_id, queue, &mut *tx).await?;
        tx.commit().await?;
    }
    assert!(db.drained(Duration::from_secs(30)).await, "every row acked");
    engine.stop().await;
    assert!(
        runs.load(Ordering::SeqCst) >= 6,
        "each row ran twice at least"
    );
    let counts: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT order_id, count(*) FROM {domain} GROUP BY order_id ORDER BY order_id"
    )))
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(counts, vec![(1, 1), (2, 1), (3, 1)]);
    Ok(())
}

/// The example service (examples/inbox_consumer.rs) consumes a topic with
/// duplicates (as a relay killed between Kafka's confirmation and its delete
/// produces), is SIGKILLed at random points mid-batch and restarted, and
/// still writes every invoice exactly once.
#[tokio::test]
async fn the_example_consumer_killed_mid_batch_writes_each_invoice_once() -> R {
    let bins = tests::example_binaries();
    let consumer = bins
        .get("inbox_consumer")
        .expect("the inbox_consumer example was built")
        .clone();
    tests::ensure_database().await?;
    let bootstrap = tests::kafka::bootstrap();
    let topic = tests::kafka::unique_topic("inbox");
    tests::kafka::create_topic(&bootstrap, &topic, 3).await?;
    const N: i64 = 3_000;
    const DUPLICATED: i64 = 300;
    produce(&bootstrap, &topic, (1..=N).chain(1..=DUPLICATED)).await?;

    let pool = outbox_core::sqlx::PgPool::connect(&tests::database_url()).await?;
    let group = format!("inbox-test-{}", tests::suffix());
    let count = async || -> anyhow::Result<(i64, i64)> {
        // The example creates its table on its first start.
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('inbox_demo_invoices') IS NOT NULL")
                .fetch_one(&pool)
                .await?;
        if !exists {
            return Ok((0, 0));
        }
        Ok(sqlx::query_as(
            "SELECT count(*), count(DISTINCT message_id) FROM inbox_demo_invoices WHERE topic = $1",
        )
        .bind(&topic)
        .fetch_one(&pool)
        .await?)
    };
    let run = |pause_ms: &str| {
        std::process::Command::new(&consumer)
            .env("DATABASE_URL", tests::database_url())
            .env("KAFKA_BOOTSTRAP", &bootstrap)
            .env("INBOX_TOPIC", &topic)
            .env("INBOX_GROUP", &group)
            .env("INBOX_BATCH", "20")
            .env("INBOX_BATCH_PAUSE_MS", pause_ms)
            .env("INBOX_IDLE_EXIT_SECS", "4")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };

    let mut mid_batch_kills = 0;
    let mut seen = BTreeMap::new();
    let mut before = 0;
    for round in 0..8 {
        // About 10 s of work in all (165 batches, 50 ms pause each). Each
        // round is killed at a random point once it has made progress (its
        // start-up time varies with the machine's load).
        let mut child = run("50")?;
        let progressed = tests::wait_until(Duration::from_secs(60), || async {
            count().await.unwrap().0 > before
        })
        .await;
        let wait = rand::rng().random_range(0..400);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill()?; // SIGKILL
        child.wait()?;
        assert!(progressed, "round {round}: no invoice written within 60 s");
        let (rows, distinct) = count().await?;
        assert_eq!(rows, distinct, "round {round}: a duplicate invoice");
        if rows < N {
            mid_batch_kills += 1;
        }
        seen.insert(round, rows);
        before = rows;
        if rows == N {
            break;
        }
    }
    assert!(
        mid_batch_kills >= 3,
        "too few kills landed mid-stream (invoices after each kill: {seen:?})"
    );
    // The last run reads to the end and exits by itself.
    let out = run("0")?.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{N} invoices for {topic}, 0 duplicates")),
        "{stdout}"
    );
    assert_eq!(count().await?, (N, N), "every invoice exactly once");
    println!("after the kills ({seen:?}), the last run printed:\n{stdout}");
    let inbox = Inbox::new("inbox", &group)?;
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = $1")
        .bind(inbox.consumer())
        .fetch_one(&pool)
        .await?;
    assert_eq!(recorded, N);
    Ok(())
}

/// Produces one record per id, with the id in the `outbox-id` header and as
/// the value, keyed by the id (spread over the partitions).
async fn produce(bootstrap: &str, topic: &str, ids: impl Iterator<Item = i64>) -> R {
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()?;
    let mut pending = Vec::new();
    for id in ids {
        let (key, value) = (id.to_string(), id.to_string());
        let headers = OwnedHeaders::new().insert(Header {
            key: outbox_core::OUTBOX_ID,
            value: Some(&key),
        });
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&value)
            .headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}
