//! The operator dashboard (`outbox-dashboard`) in a real browser: headless
//! Chromium over Debian's chromedriver (`tests::browser`), on real
//! PostgreSQL. The pages are read through their stable hooks
//! (`tr[data-queue]`, `td[data-field]`, `tr[data-dlq-id]`,
//! `[data-action]`, `div.flash[data-flash]`), the actions are clicked as an
//! operator would, and the database is checked afterwards.
//!
//! Missing chromium or chromedriver fails the tests with the apt packages
//! that install them: they never skip.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use outbox_core::{Message, Route};
use outbox_dashboard::{AppDashboardExt as _, Dashboard};
use serde_json::json;
use sqlx::types::Json;
use tests::browser::Browser;
use tests::{RunningApp, TestDb};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type R = anyhow::Result<()>;

/// How long a page may take to show what the test waits for (bounded polls;
/// a loaded CI machine is slow, a correct page is there long before).
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Seeding and serving

/// Inserts an outbox row of `queue`, due `due_in` seconds from now
/// (negative: in the past), with `attempts` recorded attempts, leased if
/// `leased`. Returns its id.
async fn row(
    db: &TestDb,
    queue: &str,
    due_in: f64,
    attempts: i64,
    leased: bool,
) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (queue, payload, headers, attempts_count, next_attempt_at, acquired_at, \
         acquired_token) VALUES ($1, '\\x7b7d', '{{}}', $2, now() + make_interval(secs => $3), \
         CASE WHEN $4 THEN now() END, CASE WHEN $4 THEN gen_random_uuid() END) RETURNING id",
        db.t()
    )))
    .bind(queue)
    .bind(attempts)
    .bind(due_in)
    .bind(leased)
    .fetch_one(&db.pool)
    .await?)
}

/// Inserts a dead letter of `queue` with a JSON `payload` (correlation id
/// `corr`). Returns its id.
async fn dead_letter(
    db: &TestDb,
    queue: &str,
    payload: &serde_json::Value,
    corr: &str,
) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failure_reason, last_exception) VALUES \
         ((SELECT coalesce(max(original_id), 0) + 1 FROM {0}), $1, $2, $3, 3, \
         now() - interval '10 minutes', 'max_deliveries', 'ConnectionError: the payment provider timed out') \
         RETURNING id",
        db.d()
    )))
    .bind(queue)
    .bind(serde_json::to_vec(payload)?)
    .bind(Json(json!({ "correlation_id": corr, "content-type": "application/json" })))
    .fetch_one(&db.pool)
    .await?)
}

/// A dashboard served on a free loopback port until dropped.
struct Served {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Served {
    async fn start(dashboard: Dashboard) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(dashboard.serve_listener(listener, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            base: format!("http://{addr}"),
            stop: Some(stop),
        })
    }

    /// The URL of `path` (starting with `/`).
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A free loopback port (bound, then released for the App to bind).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The `td[data-field=FIELD]` cell of `tr[data-queue=QUEUE]`.
fn cell(queue: &str, field: &str) -> String {
    format!(r#"#queues tr[data-queue="{queue}"] td[data-field="{field}"]"#)
}

/// The page's heading.
async fn heading(browser: &Browser) -> anyhow::Result<String> {
    browser.text("main h1").await
}

/// The status of `method path` fetched by the page itself (same origin,
/// same credentials), through `fetch`.
async fn fetch_status(browser: &Browser, method: &str, path: &str) -> anyhow::Result<u64> {
    let v = browser
        .client()
        .execute(
            "return fetch(arguments[1], { method: arguments[0], credentials: 'same-origin' })\
             .then(r => r.status)",
            vec![json!(method), json!(path)],
        )
        .await?;
    v.as_u64()
        .ok_or_else(|| anyhow::anyhow!("fetch returned {v} instead of a status"))
}

// ---------------------------------------------------------------------------
// The harness itself

/// Serves `html` to every request on a loopback port; its URL.
async fn static_page(html: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/")
}

/// Fails unless every process of the group `pgid` is gone within 10 s
/// (`after`: what ended the browser).
async fn assert_group_ends(pgid: u32, after: &str) {
    assert!(
        tests::wait_until(Duration::from_secs(10), || async {
            group_alive(pgid).is_empty()
        })
        .await,
        "processes of the browser left after {after}: {:?}",
        group_alive(pgid)
    );
}

/// The live (not zombie) processes of process group `pgid`, from /proc.
fn group_alive(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces and parens.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn the_harness_runs_javascript_and_shuts_chromium_down_on_close_and_on_drop() {
    let url = static_page(
        "<!doctype html><html><body><p id=\"js\">static</p>\
         <script>setTimeout(() => document.getElementById('js').textContent = 'ran', 300)</script>\
         </body></html>"
            .to_owned(),
    )
    .await;
    let browser = Browser::start().await.unwrap();
    browser.goto(&url).await.unwrap();
    // The script changes the text after the load: a bounded poll sees it.
    let text = browser
        .wait_text("#js", Duration::from_secs(10), |t| t == "ran")
        .await
        .unwrap();
    assert_eq!(text, "ran");
    // Screenshots are of the whole 1280x800 window (PNG IHDR: width, height).
    let png = browser.client().screenshot().await.unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), tests::browser::WINDOW);
    let pgid = browser.driver_pid();
    assert!(
        group_alive(pgid).len() >= 2,
        "chromedriver and chromium run in the group {pgid}"
    );
    browser.close().await.unwrap();
    assert_group_ends(pgid, "close").await;
    // A browser dropped without close (a test that failed) takes its
    // Chromium along too.
    let dropped = Browser::start().await.unwrap();
    dropped.goto(&url).await.unwrap();
    let pgid = dropped.driver_pid();
    assert!(group_alive(pgid).len() >= 2);
    drop(dropped);
    assert_group_ends(pgid, "drop").await;
}

// ---------------------------------------------------------------------------
// The dashboard

#[tokio::test]
async fn the_queues_page_shows_a_known_tables_counts_and_refreshes_them_in_place() -> R {
    let db = TestDb::new().await?;
    // orders: 2 fresh ready rows, 1 ready retry, 2 scheduled, 1 leased;
    // 2 dead letters. refunds: 1 ready row.
    row(&db, "orders", -30.0, 0, false).await?;
    row(&db, "orders", -1.0, 0, false).await?;
    row(&db, "orders", -5.0, 2, false).await?;
    row(&db, "orders", 3600.0, 0, false).await?;
    row(&db, "orders", 600.0, 0, false).await?;
    row(&db, "orders", -60.0, 1, true).await?;
    dead_letter(&db, "orders", &json!({"order": 1}), "c1").await?;
    dead_letter(&db, "orders", &json!({"order": 2}), "c2").await?;
    row(&db, "refunds", -2.0, 0, false).await?;

    let served =
        Served::start(Dashboard::new(db.broker.clone()).refresh(Duration::from_secs(1))).await?;
    let browser = Browser::start().await?;
    browser.goto(&served.url("/")).await?;
    let mut seen = Vec::new();
    for field in ["ready", "scheduled", "leased", "retrying", "dead_letters"] {
        seen.push(browser.text(&cell("orders", field)).await?);
    }
    assert_eq!(
        seen,
        ["3", "2", "1", "1", "2"],
        "ready, scheduled, leased, retrying, dead letters of orders"
    );
    assert_eq!(browser.text(&cell("refunds", "ready")).await?, "1");
    assert_eq!(browser.text(&cell("refunds", "dead_letters")).await?, "0");
    // The oldest ready row of orders is 30 s old (an age, not a dash).
    let age = browser.text(&cell("orders", "oldest_ready_age")).await?;
    assert!(age.ends_with('s') && age != "-", "oldest ready age {age:?}");
    assert!(
        browser.exists("#rate-chart").await?,
        "the relay-rate chart is on the page"
    );

    // The page refreshes its table without reloading: a marker set on this
    // document survives while the count moves.
    browser
        .client()
        .execute(
            "window.outboxTestMarker = 'same document'; return null",
            vec![],
        )
        .await?;
    for _ in 0..4 {
        row(&db, "orders", -1.0, 0, false).await?;
    }
    row(&db, "shipments", -1.0, 0, false).await?;
    browser
        .wait_text(&cell("orders", "ready"), PATIENCE, |t| t == "7")
        .await?;
    browser
        .wait_text(&cell("shipments", "ready"), PATIENCE, |t| t == "1")
        .await?;
    let marker = browser
        .client()
        .execute("return window.outboxTestMarker || null", vec![])
        .await?;
    assert_eq!(
        marker,
        json!("same document"),
        "the page was reloaded instead of refreshed in place"
    );
    browser.close().await
}

#[tokio::test]
async fn a_dead_letter_replayed_from_the_page_is_delivered_by_the_running_subscriber() -> R {
    let db = TestDb::new().await?;
    let payload = json!({"payment": 77, "amount": "12.50"});
    let id = dead_letter(&db, "payments", &payload, "corr-payment-77").await?;
    // Another dead letter of the queue stays where it is.
    let other = dead_letter(&db, "payments", &json!({"payment": 78}), "corr-payment-78").await?;

    let (tx, mut delivered) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let route = Route::builder(["payments"])
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .handler(move |m: Message, _c| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((m.queue().to_owned(), m.payload().to_vec()));
            }
        });
    // The dashboard embedded in the App that runs the subscriber.
    let addr = free_addr();
    let app = RunningApp::start(
        db.app()
            .subscriber(route)
            .dashboard_with(Dashboard::new(db.broker.clone()).allow_writes(true), addr),
    );
    let base = format!("http://{addr}");
    let browser = Browser::start().await?;
    // The App binds its dashboard at startup: wait for it to answer.
    let mut up = false;
    for _ in 0..150 {
        if tests::http_get(addr, "/relays")
            .await
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the App's dashboard never answered on {addr}");

    // The relays page shows the App's subscriber on its queue.
    browser.goto(&format!("{base}/relays")).await?;
    let subs = browser.texts("#subscribers tr[data-subscriber]").await?;
    assert!(
        subs.iter().any(|s| s.contains("payments")),
        "subscribers: {subs:?}"
    );

    // Dead letters -> the row -> Replay… -> confirm.
    browser.goto(&format!("{base}/dead-letters")).await?;
    let listed = browser.attrs("tr[data-dlq-id]", "data-dlq-id").await?;
    assert_eq!(listed, [id.to_string(), other.to_string()]);
    browser
        .click(&format!(
            r#"tr[data-dlq-id="{id}"] a[href="/dead-letters/{id}"]"#
        ))
        .await?;
    assert_eq!(heading(&browser).await?, format!("Dead letter {id}"));
    assert!(browser.text("pre.payload").await?.contains("\"payment\""));
    browser
        .click(r#"p.actions a[data-action="replay"]"#)
        .await?;
    assert_eq!(
        heading(&browser).await?,
        format!("Replay dead letter {id}?")
    );
    browser.click(r#"button[data-action="confirm"]"#).await?;
    let flash = browser.text(r#"div.flash[data-flash="ok"]"#).await?;
    assert!(
        flash.contains(&format!("Dead letter {id} was replayed")),
        "{flash}"
    );

    // The running subscriber gets it, with its payload; then its row is gone
    // (acked) and only the other dead letter is left.
    let (queue, got) = tokio::time::timeout(PATIENCE, delivered.recv())
        .await
        .map_err(|_| {
            anyhow::anyhow!("the replayed dead letter was not delivered within {PATIENCE:?}")
        })?
        .unwrap();
    assert_eq!(queue, "payments");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&got)?, payload);
    assert!(
        db.drained(PATIENCE).await,
        "the replayed row is still in the outbox"
    );
    let left: Vec<i64> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT id FROM {}", db.d())))
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(left, [other]);
    assert!(
        delivered.try_recv().is_err(),
        "only the replayed dead letter was delivered"
    );

    // The list no longer shows it.
    browser.goto(&format!("{base}/dead-letters")).await?;
    assert_eq!(
        browser.attrs("tr[data-dlq-id]", "data-dlq-id").await?,
        [other.to_string()]
    );
    browser.close().await?;
    app.stop().await
}

#[tokio::test]
async fn a_write_action_of_a_read_only_dashboard_is_refused_and_changes_nothing() -> R {
    let db = TestDb::new().await?;
    let id = dead_letter(&db, "orders", &json!({"order": 5}), "c5").await?;
    let served = Served::start(Dashboard::new(db.broker.clone())).await?;
    let browser = Browser::start().await?;

    browser
        .goto(&served.url(&format!("/dead-letters/{id}")))
        .await?;
    browser.click(r#"p.actions a[data-action="purge"]"#).await?;
    // The confirmation page warns before the click...
    let note = browser.text("p.note").await?;
    assert!(
        note.contains("read-only") && note.contains("--allow-writes"),
        "{note}"
    );
    browser.click(r#"button[data-action="confirm"]"#).await?;
    // ...and the POST is refused, naming the flag.
    assert_eq!(
        heading(&browser).await?,
        "Refused: this dashboard is read-only"
    );
    let flash = browser.text(r#"div.flash[data-flash="error"]"#).await?;
    assert!(flash.contains("allow_writes"), "{flash}");
    assert!(browser.text("p.fix").await?.contains("--allow-writes"));
    // With a 403, for replay too.
    assert_eq!(
        fetch_status(&browser, "POST", &format!("/dead-letters/{id}/replay")).await?,
        403
    );
    assert_eq!(
        fetch_status(&browser, "POST", "/dead-letters/purge").await?,
        403
    );

    assert_eq!(db.dlq_count().await?, 1, "the dead letter is still there");
    assert_eq!(db.count().await?, 0, "nothing was replayed");
    browser.close().await
}

#[tokio::test]
async fn a_filtered_purge_confirmed_on_the_page_purges_only_the_filtered_dead_letters() -> R {
    let db = TestDb::new().await?;
    let mut keep = Vec::new();
    for i in 0..3 {
        dead_letter(&db, "emails", &json!({"email": i}), &format!("e{i}")).await?;
    }
    keep.push(dead_letter(&db, "invoices", &json!({"invoice": 1}), "i1").await?);
    keep.push(dead_letter(&db, "invoices", &json!({"invoice": 2}), "i2").await?);
    let served = Served::start(Dashboard::new(db.broker.clone()).allow_writes(true)).await?;
    let browser = Browser::start().await?;

    // Filter by queue with the form, as an operator would.
    browser.goto(&served.url("/dead-letters")).await?;
    assert_eq!(
        browser.attrs("tr[data-dlq-id]", "data-dlq-id").await?.len(),
        5
    );
    let form = browser
        .client()
        .form(fantoccini::Locator::Css("form.filter"))
        .await?;
    form.set_by_name("queue", "emails").await?;
    browser
        .click(r#"form.filter button[type="submit"]"#)
        .await?;
    assert!(
        browser
            .client()
            .current_url()
            .await?
            .as_str()
            .ends_with("/dead-letters?queue=emails&reason=&since=&until=")
    );
    assert_eq!(
        browser.attrs("tr[data-dlq-id]", "data-dlq-id").await?.len(),
        3
    );

    // Purge these 3… -> the confirmation names the filter and the count.
    browser.click(r#"p.actions a[data-action="purge"]"#).await?;
    assert_eq!(heading(&browser).await?, "Purge dead letters?");
    assert!(
        browser
            .text("ul.criteria")
            .await?
            .contains("queue = emails")
    );
    assert!(browser.text("p.count").await?.starts_with("3 "));
    assert_eq!(
        db.dlq_count().await?,
        5,
        "nothing happens before the confirmation"
    );
    browser.click(r#"button[data-action="confirm"]"#).await?;
    let flash = browser.text(r#"div.flash[data-flash="ok"]"#).await?;
    assert_eq!(flash, "3 dead letter(s) were purged.");

    let mut left: Vec<i64> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT id FROM {}", db.d())))
            .fetch_all(&db.pool)
            .await?;
    left.sort_unstable();
    assert_eq!(left, keep, "only the invoices' dead letters are left");
    browser.close().await
}

#[tokio::test]
async fn a_forged_csrf_token_or_another_sites_form_is_refused() -> R {
    let db = TestDb::new().await?;
    let id = dead_letter(&db, "orders", &json!({"order": 9}), "c9").await?;
    let served = Served::start(Dashboard::new(db.broker.clone()).allow_writes(true)).await?;
    let browser = Browser::start().await?;

    // The dashboard's own form, with its token replaced.
    browser
        .goto(&served.url(&format!("/dead-letters/{id}/purge")))
        .await?;
    let token = browser.attrs(r#"input[name="csrf"]"#, "value").await?;
    assert_eq!(token.len(), 1);
    browser
        .client()
        .execute(
            "document.querySelector('input[name=csrf]').value = 'forged'; return null",
            vec![],
        )
        .await?;
    browser.click(r#"button[data-action="confirm"]"#).await?;
    assert_eq!(
        heading(&browser).await?,
        "Refused: missing or wrong CSRF token"
    );

    // A page of another origin (another port) posting the right token: the
    // browser names its origin, and the dashboard refuses it.
    let evil = static_page(format!(
        "<!doctype html><html><body><form method=\"post\" action=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\" id=\"go\">win a prize</button></form></body></html>",
        served.url(&format!("/dead-letters/{id}/purge")),
        token[0]
    ))
    .await;
    browser.goto(&evil).await?;
    browser.click("#go").await?;
    assert_eq!(
        heading(&browser).await?,
        "Refused: the form was sent from another origin"
    );

    assert_eq!(db.dlq_count().await?, 1, "the dead letter is still there");
    browser.close().await
}

#[tokio::test]
async fn a_dashboard_with_basic_auth_loads_with_credentials_and_refuses_without() -> R {
    let db = TestDb::new().await?;
    row(&db, "orders", -1.0, 0, false).await?;
    let served = Served::start(
        Dashboard::new(db.broker.clone())
            .basic_auth("ops", "s3cret")
            .refresh(Duration::from_secs(1)),
    )
    .await?;
    let port = served.base.rsplit(':').next().unwrap().to_owned();
    let browser = Browser::start().await?;

    // Without credentials (first: Chromium remembers them once given), the
    // browser gets the challenge and no page: it waits for a login.
    browser.goto(&served.url("/")).await?;
    assert!(!browser.exists("#queues").await?);
    assert_eq!(
        browser.text("body").await?,
        "",
        "nothing of the dashboard shows"
    );
    let addr: SocketAddr = served.base.trim_start_matches("http://").parse()?;
    let raw = tests::http_get(addr, "/").await?;
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"outbox dashboard\""),
        "{raw}"
    );

    // With the right ones in the URL: the page, and its refresh, work.
    browser
        .goto(&format!("http://ops:s3cret@127.0.0.1:{port}/"))
        .await?;
    assert_eq!(browser.text(&cell("orders", "ready")).await?, "1");
    row(&db, "orders", -1.0, 0, false).await?;
    browser
        .wait_text(&cell("orders", "ready"), PATIENCE, |t| t == "2")
        .await?;
    browser.close().await
}

/// A page's console errors.
async fn console_errors(browser: &Browser) -> anyhow::Result<Vec<String>> {
    browser.console_errors().await
}

/// What only a browser sees: script errors, assets that fail to load, and
/// what the pages' Content-Security-Policy refuses (an inline style or
/// script, a request to another origin) on every page and during the queues
/// page's refresh.
#[tokio::test]
async fn no_page_logs_an_error_in_the_browser_console() -> R {
    let db = TestDb::new().await?;
    row(&db, "orders", -1.0, 0, false).await?;
    let id = dead_letter(&db, "orders", &json!({"order": 1}), "corr-1").await?;
    let served = Served::start(
        Dashboard::new(db.broker.clone())
            .allow_writes(true)
            .refresh(Duration::from_secs(1)),
    )
    .await?;
    let browser = Browser::start().await?;
    let pages = [
        "/".to_owned(),
        "/dead-letters".to_owned(),
        format!("/dead-letters/{id}"),
        format!("/dead-letters/{id}/replay"),
        format!("/dead-letters/{id}/purge"),
        "/dead-letters/purge?queue=orders".to_owned(),
        "/relays".to_owned(),
        "/rows?correlation_id=corr-1".to_owned(),
        format!("/rows?id={id}"),
    ];
    for page in &pages {
        browser.goto(&served.url(page)).await?;
        // The stylesheet applied (a refused or missing one leaves the
        // header unstyled).
        let header_bg = browser
            .client()
            .execute(
                "return getComputedStyle(document.querySelector('header')).backgroundColor",
                vec![],
            )
            .await?;
        assert_ne!(
            header_bg,
            json!("rgba(0, 0, 0, 0)"),
            "{page}: dashboard.css not applied"
        );
        assert_eq!(
            console_errors(&browser).await?,
            Vec::<String>::new(),
            "console errors on {page}"
        );
    }
    // Two refreshes of the queues page (its fetch and DOM swap) log nothing.
    browser.goto(&served.url("/")).await?;
    let first = browser.text("#updated").await?;
    browser
        .wait_text("#updated", PATIENCE, |t| t != first)
        .await?;
    let second = browser.text("#updated").await?;
    browser
        .wait_text("#updated", PATIENCE, |t| t != second)
        .await?;
    assert_eq!(
        console_errors(&browser).await?,
        Vec::<String>::new(),
        "console errors while refreshing"
    );
    browser.close().await
}
