//! Screenshots of the operator dashboard for the docs (run by
//! `scripts/screenshots.sh`): seeds a demo outbox (schema `shop` of
//! `DATABASE_URL`, dropped and created again), runs an App on it with the
//! dashboard embedded and a few subscribers (a steady relay, a slow one, a
//! failing one) while orders keep coming in, then takes a 1280x800 PNG of
//! each page in headless Chromium:
//!
//!   dashboard-queues.png, dashboard-dead-letters.png,
//!   dashboard-dead-letter.png, dashboard-relays.png, dashboard-rows.png
//!
//! Usage: `dashboard_screenshots OUT_DIR` (env `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/outbox_demo`; `OUTBOX_SCREENSHOTS_WARMUP`
//! seconds of traffic before the pictures, default 150, for the rate chart).

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use outbox_core::{AppContext, BoxError, DlqTable, Message, OutboxBroker, OutboxTable, Route};
use outbox_dashboard::{AppDashboardExt as _, Dashboard};
use sqlx::{Connection as _, Executor as _};
use tests::browser::Browser;

const SCHEMA: &str = "shop";

/// Bulk rows of `queue` from SQL: `n` rows due `due` (an SQL interval
/// expression relative to now), `attempts` each, ids as correlation ids
/// `<prefix>-<n>`.
async fn seed(
    conn: &mut sqlx::PgConnection,
    t: &OutboxTable,
    queue: &str,
    n: i64,
    due: &str,
    attempts: i64,
    prefix: &str,
) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO {} (queue, payload, headers, attempts_count, next_attempt_at, created_at) \
         SELECT $1, convert_to(json_build_object('id', 1000 + g, 'customer', 'c-' || (g * 7919 % 500), \
         'total', round((g * 37 % 9000) / 100.0, 2))::text, 'UTF8'), \
         jsonb_build_object('correlation_id', $4 || '-' || (1000 + g), 'content-type', 'application/json'), \
         $3, now() + {due}, now() - make_interval(secs => $2 - g) \
         FROM generate_series(1, $2) g",
        t.qualified_name()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(queue)
        .bind(n)
        .bind(attempts)
        .bind(prefix)
        .execute(conn)
        .await?;
    Ok(())
}

async fn dead_letters(
    conn: &mut sqlx::PgConnection,
    d: &DlqTable,
    queue: &str,
    n: i64,
    reason: &str,
    exception: &str,
) -> anyhow::Result<Vec<i64>> {
    let sql = format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failed_at, failure_reason, last_exception) \
         SELECT 5000 + g, $1, convert_to(json_build_object('id', 5000 + g, 'amount', \
         round((g * 4111 % 50000) / 100.0, 2), 'currency', 'EUR', 'card', '**** ' || (1000 + g * 97 % 9000))::text, 'UTF8'), \
         jsonb_build_object('correlation_id', 'order-' || (1000 + g), 'content-type', 'application/json', \
         'traceparent', '00-' || md5(g::text) || '-' || left(md5((g * 3)::text), 16) || '-01'), \
         5, now() - make_interval(mins => (90 - g)::int), now() - make_interval(mins => (60 - g * 2)::int), $3, $4 \
         FROM generate_series(1, $2) g ORDER BY g RETURNING id",
        d.qualified_name()
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(queue)
        .bind(n)
        .bind(reason)
        .bind(exception)
        .fetch_all(conn)
        .await?)
}

/// A free loopback address for the App's dashboard.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: dashboard_screenshots OUT_DIR")?,
    );
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/outbox_demo".to_owned());
    let warmup = std::env::var("OUTBOX_SCREENSHOTS_WARMUP")
        .ok()
        .map(|s| s.parse::<u64>())
        .transpose()
        .context("OUTBOX_SCREENSHOTS_WARMUP must be whole seconds")?
        .unwrap_or(150);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url}: set DATABASE_URL"))?;
    pool.execute(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}"
    )))
    .await?;
    let table = OutboxTable::new("outbox")?.schema(SCHEMA)?;
    let dlq = DlqTable::new("outbox_dlq")?.schema(SCHEMA)?;
    let broker = OutboxBroker::new(pool.clone(), table.clone()).dead_letter_table(dlq.clone());
    broker.migrate().await?;

    // A backlog: orders the relay works through, invoices scheduled for
    // later, payments failing, emails slow. On a connection of its own,
    // closed before the dashboard starts: a session reports its inserts to
    // the statistics the rate chart reads when it ends, so they do not show
    // as a spike of the first minute.
    let mut c = sqlx::PgConnection::connect(&url).await?;
    seed(
        &mut c,
        &table,
        "orders",
        1800,
        "interval '-2 minutes'",
        0,
        "checkout",
    )
    .await?;
    seed(
        &mut c,
        &table,
        "invoices",
        340,
        "interval '1 hour'",
        0,
        "invoice",
    )
    .await?;
    seed(
        &mut c,
        &table,
        "payments",
        25,
        "interval '-30 seconds'",
        2,
        "order",
    )
    .await?;
    seed(
        &mut c,
        &table,
        "emails",
        60,
        "interval '-10 seconds'",
        0,
        "email",
    )
    .await?;
    let dead = dead_letters(
        &mut c,
        &dlq,
        "payments",
        14,
        "max_deliveries",
        "PaymentGatewayError: 503 Service Unavailable from https://psp.example/v2/charges \
         (attempt 5 of 5, gave up after 4m12s)",
    )
    .await?;
    dead_letters(
        &mut c,
        &dlq,
        "webhooks",
        3,
        "rejected",
        "InvalidPayload: field `callback_url` is not an absolute URL",
    )
    .await?;
    c.close().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let fast = |b: outbox_core::RouteBuilder| {
        b.min_fetch_interval(Duration::from_millis(50))
            .max_fetch_interval(Duration::from_millis(500))
    };
    let orders = fast(Route::builder(["orders"])).name("ship_order").handler(
        |_m: Message, _c: AppContext| async {
            tokio::time::sleep(Duration::from_millis(25)).await;
        },
    );
    let emails = fast(Route::builder(["emails"])).name("send_email").handler(
        |_m: Message, _c: AppContext| async {
            tokio::time::sleep(Duration::from_secs(120)).await;
        },
    );
    let payments = fast(Route::builder(["payments"]))
        .name("charge_card")
        .handler(|_m: Message, _c: AppContext| async {
            Err::<(), BoxError>("PaymentGatewayError: 503 Service Unavailable".into())
        });
    let addr = free_addr()?;
    let app = tests::RunningApp::start(
        outbox_core::App::new(broker.clone())
            .without_discovery()
            .without_signals()
            .subscriber(orders)
            .subscriber(emails)
            .subscriber(payments)
            .dashboard_with(Dashboard::new(broker.clone()).allow_writes(true), addr),
    );

    // New orders keep coming while the relay drains the backlog.
    let producer = {
        let publisher = broker.publisher("orders")?;
        let pool = pool.clone();
        tokio::spawn(async move {
            let (mut n, mut tick) = (0u64, 0u64);
            loop {
                tick += 1;
                if let Ok(mut conn) = pool.acquire().await {
                    // 10, 20, 30, 40 rows a second, 20 s each, round again.
                    let burst = 5 + (tick / 40) % 4 * 5;
                    for _ in 0..burst {
                        n += 1;
                        let body = serde_json::json!({ "id": 9000 + n, "customer": format!("c-{}", n % 500) });
                        let _ = publisher.publish(&body, &mut conn).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let base = format!("http://{addr}");
    let mut up = false;
    for _ in 0..100 {
        if tests::http_get(addr, "/").await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !up {
        bail!("the App's dashboard did not answer on {addr}");
    }
    eprintln!("dashboard_screenshots: {warmup} s of traffic for the rate chart ({base})");
    tokio::time::sleep(Duration::from_secs(warmup)).await;

    let browser = Browser::start().await?;
    let shots = [
        ("dashboard-queues.png", "/".to_owned()),
        ("dashboard-dead-letters.png", "/dead-letters".to_owned()),
        (
            "dashboard-dead-letter.png",
            format!("/dead-letters/{}", dead[3]),
        ),
        ("dashboard-relays.png", "/relays".to_owned()),
        (
            "dashboard-rows.png",
            "/rows?correlation_id=order-1004".to_owned(),
        ),
    ];
    for (file, path) in &shots {
        browser.goto(&format!("{base}{path}")).await?;
        if browser.exists("div.flash[data-flash=\"error\"]").await? {
            bail!(
                "{path} shows an error: {}",
                browser.text("div.flash").await?
            );
        }
        let dest = out.join(file);
        browser.screenshot(&dest).await?;
        eprintln!("dashboard_screenshots: {}", dest.display());
    }
    browser.close().await?;
    producer.abort();
    app.stop().await?;
    Ok(())
}
