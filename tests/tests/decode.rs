//! Undecodable payloads on real PostgreSQL: the handler error names the row,
//! queue, content type and expected type, and says why in plain words; the
//! row is retried, then dead-lettered with that text; nothing panics and the
//! other rows are handled.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::{
    App, AppContext, BoxError, FromDelivery, Message, PublishOptions, Raw, Route, State,
};
use tests::{TestDb, captured, wait_until};

type R = anyhow::Result<()>;

#[derive(Default)]
struct Handled(Mutex<Vec<i64>>);

#[tokio::test]
async fn undecodable_rows_are_reported_in_plain_words_and_do_not_block_others() -> R {
    let db = TestDb::new().await?;
    let queue = format!("decode.{}", tests::suffix());
    let json = || PublishOptions::new().header("content-type", "application/json");

    let mut tx = db.pool.begin().await?;
    let mut publish = async |body: &[u8], opts: PublishOptions| {
        db.broker
            .publish_with(&Raw(body.to_vec()), &queue, &opts, &mut *tx)
            .await
            .map(Option::unwrap)
    };
    let good_1 = publish(b"7", json()).await?;
    let float = publish(b"1e20", json()).await?;
    let wide = publish(b"100000000000000000000", json()).await?;
    let not_json = publish(b"{1:2}", json()).await?;
    let unlabelled = publish(b"", PublishOptions::new()).await?;
    let good_2 = publish(b"8", json()).await?;
    tx.commit().await?;
    let bad: BTreeMap<i64, (&str, &str)> = [
        (
            float,
            ("application/json", "number 1e20 does not fit in i64"),
        ),
        (
            wide,
            (
                "application/json",
                "number 100000000000000000000 does not fit in i64",
            ),
        ),
        (
            not_json,
            (
                "application/json",
                "not valid JSON: key must be a string at line 1 column 2",
            ),
        ),
        (
            unlabelled,
            (
                "",
                "the payload is empty, which the expected type does not take (invalid type: \
                 unit value, expected i64)",
            ),
        ),
    ]
    .into_iter()
    .collect();

    // What `async fn take(n: i64, seen: State<Handled>)` under #[subscriber]
    // expands to: each parameter through FromDelivery.
    let route = Route::builder([queue.as_str()])
        .name("decode::take")
        .max_workers(2)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(20)).max_attempts(2))
        .requires::<State<Handled>>()
        .handler(|msg: Message, ctx: AppContext| async move {
            let n = <i64 as FromDelivery>::from_delivery(&msg, &ctx)?;
            let seen = <State<Handled> as FromDelivery>::from_delivery(&msg, &ctx)?;
            seen.0.0.lock().unwrap().push(n);
            Ok::<_, BoxError>(())
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .state(Handled::default())
        .subscriber(route);
    let stop = app.handle();
    let ctx = app.context().clone();
    let run = tokio::spawn(app.run());

    assert!(
        wait_until(Duration::from_secs(15), || async {
            db.count().await.unwrap() == 0 && db.dlq_count().await.unwrap() == 4
        })
        .await,
        "rows left: {}, dead letters: {}",
        db.count().await?,
        db.dlq_count().await?
    );
    let mut handled = ctx.state::<Handled>().unwrap().0.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, [7, 8], "the good rows were handled");
    let _ = (good_1, good_2);

    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT original_id, failure_reason, last_exception FROM {} ORDER BY original_id",
        db.d()
    )))
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(rows.len(), bad.len());
    for (id, reason, last_exception) in &rows {
        let (ct, why) = bad[id];
        let ct = if ct.is_empty() {
            "no content-type".to_owned()
        } else {
            format!("content-type {ct}")
        };
        let expected = format!(
            "cannot decode the payload of row {id} (queue {queue:?}, {ct}) as `i64`: {why}"
        );
        assert_eq!(reason, "retry_terminal", "row {id}");
        let text = last_exception.as_deref().unwrap_or_default();
        assert!(
            text.starts_with(&expected),
            "row {id}: last_exception {text:?}\nexpected it to start with {expected:?}"
        );
        // The retry log says the same.
        let retries: Vec<String> = captured(|c| {
            c.fields.get("row_id").map(String::as_str) == Some(id.to_string().as_str())
                && c.fields.get("queue").map(String::as_str) == Some(queue.as_str())
                && c.message.starts_with("outbox handler failed; retrying")
        })
        .into_iter()
        .map(|c| c.message)
        .collect();
        assert_eq!(retries.len(), 1, "row {id}: {retries:?}");
        assert!(retries[0].contains(&expected), "row {id}: {}", retries[0]);
    }

    stop.shutdown();
    run.await??;
    Ok(())
}
