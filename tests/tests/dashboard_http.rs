//! The operator dashboard (outbox-dashboard) over real TCP against real
//! PostgreSQL: every page with known data, the safety checks (read-only,
//! CSRF, Origin, basic and bearer auth), replay and purge through the
//! forms, HTML escaping, the database outage page, the App integration
//! (App::service, AppDashboardExt) and the `outbox serve` binary.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_core::{BoxError, Message, Route};
use outbox_dashboard::{AppDashboardExt, Dashboard};
use tests::{RunningApp, TestDb, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP answer: status, headers (names lowercased), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    /// Fails the test, showing the page, unless its body contains `text`.
    #[track_caller]
    fn assert_shows(&self, text: &str) {
        assert!(
            self.body.contains(text),
            "{text:?} is not on the page:\n{}",
            self.body
        );
    }

    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the page's CSRF field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body));
        let rest = &self.body[at + r#"name="csrf" value=""#.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    /// The page's hidden fields other than the CSRF token, form-encoded.
    fn hidden_fields(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for part in self.body.split(r#"<input type="hidden" name=""#).skip(1) {
            let name = &part[..part.find('"').unwrap()];
            let v = &part[part.find(r#"value=""#).unwrap() + 7..];
            let value = v[..v.find('"').unwrap()].replace("&amp;", "&");
            if name != "csrf" {
                out.push((name.to_owned(), value));
            }
        }
        out
    }
}

/// Percent-encoding for a form body.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One request over a fresh HTTP/1.1 connection (`Host: <addr>` unless
/// `headers` name another).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, &[], "").await
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> Answer {
    request(addr, "POST", path, &[], body).await
}

/// Serves `dashboard` on a free loopback port until the test ends.
async fn serve(dashboard: Dashboard) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(dashboard.serve_listener(listener, std::future::pending()));
    addr
}

/// Inserts an outbox row; its id.
async fn row(db: &TestDb, queue: &str, payload: &str, due_in_secs: i64) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (queue, payload, headers, next_attempt_at) \
         VALUES ($1, convert_to($2, 'UTF8'), '{{\"content-type\": \"text/plain\"}}', \
         now() + make_interval(secs => $3)) RETURNING id",
        db.t()
    )))
    .bind(queue)
    .bind(payload)
    .bind(due_in_secs as f64)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Inserts a dead letter; its id.
async fn dead_letter(db: &TestDb, queue: &str, payload: &str, reason: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (original_id, queue, payload, headers, deliveries_count, created_at, \
         failure_reason, last_exception) VALUES (4242, $1, convert_to($2, 'UTF8'), \
         '{{\"content-type\": \"application/json\", \"correlation_id\": \"corr-7\"}}', 3, now(), \
         $3, 'ValueError: boom') RETURNING id",
        db.d()
    )))
    .bind(queue)
    .bind(payload)
    .bind(reason)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn cell(body: &str, queue: &str, field: &str) -> String {
    let tr = body
        .split(&format!(r#"<tr data-queue="{queue}">"#))
        .nth(1)
        .unwrap_or_else(|| panic!("no row of queue {queue} in {body}"));
    let tr = &tr[..tr.find("</tr>").unwrap()];
    let td = tr
        .split(&format!(r#"data-field="{field}">"#))
        .nth(1)
        .unwrap_or_else(|| panic!("no {field} cell in {tr}"));
    let text = &td[..td.find("</td>").unwrap()];
    // The dead-letters cell links to the list.
    match text.find('>') {
        Some(i) if text.starts_with("<a ") => text[i + 1..text.find("</a>").unwrap()].to_owned(),
        _ => text.to_owned(),
    }
}

#[tokio::test]
async fn every_page_renders_the_known_data() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    row(&db, "orders", "first", -5).await;
    let second = row(&db, "orders", "second", -5).await;
    row(&db, "orders", "later", 3600).await;
    let dl = dead_letter(&db, "orders", r#"{"order": 17}"#, "rejected").await;
    let addr = serve(Dashboard::new(db.broker.clone())).await;

    let home = get(addr, "/").await;
    assert_eq!(home.status, 200, "{}", home.body);
    home.assert_shows(r#"<table id="queues">"#);
    home.assert_shows(r#"id="rate-chart""#);
    assert_eq!(cell(&home.body, "orders", "ready"), "2");
    assert_eq!(cell(&home.body, "orders", "scheduled"), "1");
    assert_eq!(cell(&home.body, "orders", "leased"), "0");
    assert_eq!(cell(&home.body, "orders", "retrying"), "0");
    assert_eq!(cell(&home.body, "orders", "dead_letters"), "1");
    assert_ne!(cell(&home.body, "orders", "oldest_ready_age"), "-");
    for nav in [
        ">Queues</a>",
        r#"<a href="/dead-letters">Dead letters</a>"#,
        r#"<a href="/relays">Relays</a>"#,
        r#"<a href="/rows">Rows</a>"#,
    ] {
        home.assert_shows(nav);
    }
    assert_eq!(
        home.header("content-security-policy").len(),
        1,
        "{:?}",
        home.headers
    );

    let list = get(addr, "/dead-letters?queue=orders").await;
    assert_eq!(list.status, 200, "{}", list.body);
    list.assert_shows(&format!(r#"<tr data-dlq-id="{dl}">"#));
    list.assert_shows(r#"{&quot;order&quot;:17}"#);
    list.assert_shows("1 matching dead letter.");
    let other = get(addr, "/dead-letters?queue=payments").await;
    other.assert_shows("No dead letter matches.");

    let one = get(addr, &format!("/dead-letters/{dl}")).await;
    assert_eq!(one.status, 200, "{}", one.body);
    for text in [
        "ValueError: boom",
        "corr-7",
        "rejected",
        "4242",
        "&quot;order&quot;: 17",
    ] {
        one.assert_shows(text);
    }
    one.assert_shows(r#"data-action="replay""#);
    one.assert_shows(r#"data-action="purge""#);

    let missing = get(addr, "/dead-letters/999999").await;
    assert_eq!(missing.status, 404);
    missing.assert_shows(r#"data-flash="error""#);
    let bad = get(addr, "/dead-letters/abc").await;
    assert_eq!(bad.status, 400);
    bad.assert_shows("not a dead-letter id");
    let bad_time = get(addr, "/dead-letters?since=yesterday").await;
    assert_eq!(bad_time.status, 400);
    bad_time.assert_shows("since is &quot;yesterday&quot;");

    let relays = get(addr, "/relays").await;
    assert_eq!(relays.status, 200, "{}", relays.body);
    // Engines of other tests may be connected to this database: only the
    // headings are known.
    relays.assert_shows("Engine connections (this database)");
    relays.assert_shows("Other sessions on the outbox table");

    let rows = get(addr, &format!("/rows?id={second}")).await;
    assert_eq!(rows.status, 200, "{}", rows.body);
    rows.assert_shows(&format!("Outbox row {second}"));
    rows.assert_shows(r#"data-state="ready""#);
    rows.assert_shows("second");
    let by_corr = get(addr, "/rows?correlation_id=corr-7").await;
    by_corr.assert_shows(&format!("Dead letter {dl}"));
    let by_dl = get(addr, &format!("/rows?dead_letter_id={dl}")).await;
    by_dl.assert_shows("1 found.");
    by_dl.assert_shows("4242");
    let none = get(addr, "/rows?id=abc").await;
    assert_eq!(none.status, 400);
    let both = get(addr, "/rows?id=1&correlation_id=x").await;
    assert_eq!(both.status, 400);
    both.assert_shows("not several");

    let css = get(addr, "/assets/dashboard.css").await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type")[0].starts_with("text/css"));
    let js = get(addr, "/assets/dashboard.js").await;
    js.assert_shows("getElementById(\"queues\")");
    assert_eq!(get(addr, "/nope").await.status, 404);
    Ok(())
}

#[tokio::test]
async fn a_read_only_dashboard_refuses_every_post_naming_the_flag() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dl = dead_letter(&db, "orders", "{}", "rejected").await;
    let addr = serve(Dashboard::new(db.broker.clone())).await;
    // The confirmation page still renders, with a note and the form.
    let page = get(addr, &format!("/dead-letters/{dl}/replay")).await;
    assert_eq!(page.status, 200);
    page.assert_shows("read-only");
    let csrf = page.csrf();
    for path in [
        format!("/dead-letters/{dl}/replay"),
        format!("/dead-letters/{dl}/purge"),
        "/dead-letters/purge".to_owned(),
    ] {
        let a = post(addr, &path, &form(&[("csrf", &csrf), ("all", "yes")])).await;
        assert_eq!(a.status, 403, "{path}: {}", a.body);
        a.assert_shows("--allow-writes");
        a.assert_shows(r#"data-flash="error""#);
    }
    assert_eq!(db.dlq_count().await?, 1);
    assert_eq!(db.count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn posts_need_this_process_csrf_token_and_origin() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dl = dead_letter(&db, "orders", "{}", "rejected").await;
    let addr = serve(Dashboard::new(db.broker.clone()).allow_writes(true)).await;
    let path = format!("/dead-letters/{dl}/purge");
    let csrf = get(addr, &path).await.csrf();
    assert_eq!(csrf.len(), 64);

    let missing = post(addr, &path, "").await;
    assert_eq!(missing.status, 403, "{}", missing.body);
    missing.assert_shows("CSRF");
    let wrong = post(addr, &path, &form(&[("csrf", &"0".repeat(64))])).await;
    assert_eq!(wrong.status, 403);
    wrong.assert_shows("CSRF");
    // Another dashboard process has another token.
    let other = serve(Dashboard::new(db.broker.clone()).allow_writes(true)).await;
    assert_ne!(get(other, &path).await.csrf(), csrf);
    // The right token from a page of another site.
    let foreign = request(
        addr,
        "POST",
        &path,
        &[("Origin", "http://evil.example")],
        &form(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(foreign.status, 403);
    foreign.assert_shows("another origin");
    // Not a form at all.
    let json = request(
        addr,
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        &format!(r#"{{"csrf": "{csrf}"}}"#),
    )
    .await;
    assert_eq!(json.status, 400, "{}", json.body);
    json.assert_shows("the form could not be read");
    assert_eq!(db.dlq_count().await?, 1, "nothing was purged");

    // Same origin and the right token: done.
    let origin = format!("http://{addr}");
    let ok = request(
        addr,
        "POST",
        &path,
        &[("Origin", &origin)],
        &form(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    ok.assert_shows(r#"data-flash="ok""#);
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn basic_and_bearer_authentication() -> anyhow::Result<()> {
    use base64::Engine as _;
    let db = TestDb::new().await?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

    let basic = serve(Dashboard::new(db.broker.clone()).basic_auth("ops", "s3cret")).await;
    let none = get(basic, "/").await;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.header("www-authenticate"),
        ["Basic realm=\"outbox dashboard\", charset=\"UTF-8\""]
    );
    for creds in ["ops:wrong", "ops:s3cre", "ops:s3cret2", "x:s3cret"] {
        let auth = format!("Basic {}", b64(creds));
        let a = request(basic, "GET", "/", &[("Authorization", &auth)], "").await;
        assert_eq!(a.status, 401, "{creds}");
    }
    let auth = format!("Basic {}", b64("ops:s3cret"));
    let ok = request(basic, "GET", "/", &[("Authorization", &auth)], "").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Assets and POSTs are behind the same check.
    assert_eq!(get(basic, "/assets/dashboard.js").await.status, 401);
    assert_eq!(
        post(basic, "/dead-letters/purge", "all=yes").await.status,
        401
    );

    let bearer = serve(Dashboard::new(db.broker.clone()).bearer_token("t0ken")).await;
    let none = get(bearer, "/dead-letters").await;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.header("www-authenticate"),
        ["Bearer realm=\"outbox dashboard\""]
    );
    let wrong = request(bearer, "GET", "/", &[("Authorization", "Bearer t0kem")], "").await;
    assert_eq!(wrong.status, 401);
    wrong.assert_shows("wrong");
    let ok = request(bearer, "GET", "/", &[("Authorization", "Bearer t0ken")], "").await;
    assert_eq!(ok.status, 200);

    // Both configured: either works, both challenges are offered.
    let both = serve(
        Dashboard::new(db.broker.clone())
            .basic_auth("ops", "s3cret")
            .bearer_token("t0ken"),
    )
    .await;
    assert_eq!(get(both, "/").await.header("www-authenticate").len(), 2);
    let a = request(both, "GET", "/", &[("Authorization", "Bearer t0ken")], "").await;
    assert_eq!(a.status, 200);
    let a = request(both, "GET", "/", &[("Authorization", &auth)], "").await;
    assert_eq!(a.status, 200);
    Ok(())
}

#[tokio::test]
async fn replaying_one_dead_letter_moves_it_back_into_the_outbox() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dl = dead_letter(&db, "orders", r#"{"order": 17}"#, "rejected").await;
    let addr = serve(Dashboard::new(db.broker.clone()).allow_writes(true)).await;
    let confirm = get(addr, &format!("/dead-letters/{dl}/replay")).await;
    assert_eq!(confirm.status, 200);
    confirm.assert_shows(r#"data-action="confirm""#);
    assert!(
        !confirm.body.contains("read-only: the buttons"),
        "{}",
        confirm.body
    );
    let done = post(
        addr,
        &format!("/dead-letters/{dl}/replay"),
        &form(&[("csrf", &confirm.csrf())]),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    done.assert_shows(r#"data-flash="ok""#);
    assert!(
        done.body
            .contains(&format!("Dead letter {dl} was replayed"))
    );
    assert_eq!(db.dlq_count().await?, 0);
    let (queue, payload): (String, Vec<u8>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT queue, payload FROM {}",
        db.t()
    )))
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(queue, "orders");
    assert_eq!(payload, br#"{"order": 17}"#);
    // Again: it is gone.
    let again = post(
        addr,
        &format!("/dead-letters/{dl}/replay"),
        &form(&[("csrf", &confirm.csrf())]),
    )
    .await;
    assert_eq!(again.status, 404, "{}", again.body);
    Ok(())
}

#[tokio::test]
async fn a_filtered_purge_shows_filter_and_count_then_deletes_only_those() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    for _ in 0..2 {
        dead_letter(&db, "a", "{}", "rejected").await;
    }
    dead_letter(&db, "a", "{}", "max_deliveries").await;
    dead_letter(&db, "b", "{}", "rejected").await;
    let addr = serve(Dashboard::new(db.broker.clone()).allow_writes(true)).await;

    let confirm = get(addr, "/dead-letters/purge?queue=a&reason=rejected").await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    confirm.assert_shows("queue = <code>a</code>");
    confirm.assert_shows("reason = <code>rejected</code>");
    assert!(
        confirm
            .body
            .contains("<strong>2</strong> dead letter(s) match now."),
        "{}",
        confirm.body
    );
    let mut fields = confirm.hidden_fields();
    assert_eq!(
        fields,
        [
            ("queue".to_owned(), "a".to_owned()),
            ("reason".to_owned(), "rejected".to_owned())
        ]
    );
    let csrf = confirm.csrf();
    fields.push(("csrf".to_owned(), csrf.clone()));
    let body: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let done = post(addr, "/dead-letters/purge", &form(&body)).await;
    assert_eq!(done.status, 200, "{}", done.body);
    done.assert_shows("2 dead letter(s) were purged.");
    let left: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT queue, failure_reason FROM {} ORDER BY id",
        db.d()
    )))
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        left,
        [
            ("a".to_owned(), "max_deliveries".to_owned()),
            ("b".to_owned(), "rejected".to_owned())
        ]
    );

    // No filter: the confirmation page asks for all=yes, the POST refuses.
    let page = get(addr, "/dead-letters/purge").await;
    page.assert_shows("No filter given");
    page.assert_shows("/dead-letters/purge?all=yes");
    let refused = post(addr, "/dead-letters/purge", &form(&[("csrf", &csrf)])).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    refused.assert_shows("all=yes");
    assert_eq!(db.dlq_count().await?, 2);
    let all = get(addr, "/dead-letters/purge?all=yes").await;
    all.assert_shows("every dead letter");
    all.assert_shows("<strong>2</strong>");
    let done = post(
        addr,
        "/dead-letters/purge",
        &form(&[("csrf", &csrf), ("all", "yes")]),
    )
    .await;
    done.assert_shows("2 dead letter(s) were purged.");
    assert_eq!(db.dlq_count().await?, 0);
    Ok(())
}

#[tokio::test]
async fn hostile_queue_names_and_payloads_are_escaped() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let evil = "<script>alert(1)</script>";
    row(&db, evil, "<script>alert(2)</script>", -1).await;
    let dl = dead_letter(
        &db,
        evil,
        r#"{"x": "<script>alert(3)</script>"}"#,
        "rejected",
    )
    .await;
    let addr = serve(Dashboard::new(db.broker.clone())).await;
    for path in [
        "/".to_owned(),
        "/dead-letters".to_owned(),
        format!("/dead-letters/{dl}"),
        format!("/dead-letters?queue={}", enc(evil)),
        format!("/rows?correlation_id={}", enc(evil)),
        format!("/dead-letters/purge?queue={}", enc(evil)),
    ] {
        let a = get(addr, &path).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert!(!a.body.contains("<script>alert"), "{path}: {}", a.body);
        assert!(
            a.body.contains("&lt;script&gt;alert("),
            "{path}: {}",
            a.body
        );
    }
    let home = get(addr, "/").await;
    assert!(
        home.body
            .contains(r#"<tr data-queue="&lt;script&gt;alert(1)&lt;/script&gt;">"#)
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_database_answers_503_with_what_to_do() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Nothing listens on port 1.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")?;
    let broker =
        outbox_core::OutboxBroker::new(pool, db.table.clone()).dead_letter_table(db.dlq.clone());
    let addr = serve(Dashboard::new(broker)).await;
    for path in [
        "/",
        "/dead-letters",
        "/dead-letters/1",
        "/relays",
        "/rows?id=1",
    ] {
        let a = get(addr, path).await;
        assert_eq!(a.status, 503, "{path}: {}", a.body);
        a.assert_shows("The database cannot be reached");
        a.assert_shows("Check that PostgreSQL is running");
    }
    Ok(())
}

/// A free loopback port (bound, then released).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn consumer() -> Route {
    Route::builder(["orders"])
        .name("orders_consumer")
        .handler(|_msg: Message, _| async move { Ok::<_, BoxError>(()) })
}

#[tokio::test]
async fn app_services_start_with_the_engine_and_stop_at_shutdown() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let started = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (started.clone(), stopped.clone());
    let app = db
        .app()
        .subscriber(consumer())
        .service("probe", move |handle, stop| async move {
            // The engine runs before any service starts.
            s1.store(handle.health().await.engine.is_some(), Ordering::SeqCst);
            stop.stopped().await;
            s2.store(stop.is_stopped(), Ordering::SeqCst);
            Ok::<_, BoxError>(())
        });
    let running = RunningApp::start(app);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            started.load(Ordering::SeqCst)
        })
        .await
    );
    assert!(!stopped.load(Ordering::SeqCst));
    running.stop().await?;
    assert!(stopped.load(Ordering::SeqCst));

    // A failing service is returned by run once the app stopped.
    let app = db
        .app()
        .subscriber(consumer())
        .service("broken", |_, _| async {
            Err::<(), BoxError>("it broke".into())
        });
    let err = RunningApp::start(app).stop().await.unwrap_err().to_string();
    assert!(
        err.contains("service hook `broken` failed: it broke"),
        "{err}"
    );

    // One that ignores the request to stop is aborted after
    // App::SERVICE_STOP_TIMEOUT, with a WARN, and the app still stops.
    let app = db.app().subscriber(consumer()).service("deaf", |_, _| {
        std::future::pending::<Result<(), BoxError>>()
    });
    RunningApp::start(app).stop().await?;
    let warned = tests::captured(|c| {
        c.level == tracing::Level::WARN
            && c.message.contains("service `deaf` did not stop within 5s")
    });
    assert_eq!(warned.len(), 1, "{warned:?}");
    Ok(())
}

#[tokio::test]
async fn app_dashboard_serves_while_the_app_runs_and_stops_with_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let addr = free_addr();
    let running = RunningApp::start(db.app().subscriber(consumer()).dashboard(addr));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            tests::http_get(addr, "/relays")
                .await
                .is_ok_and(|r| r.contains("orders_consumer"))
        })
        .await
    );
    let relays = get(addr, "/relays").await;
    relays.assert_shows("This application");
    assert!(
        relays
            .body
            .contains(r#"<tr data-subscriber="orders_consumer">"#)
    );
    relays.assert_shows("LISTEN connection");
    // The App's own engine connections are listed.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let body = get(addr, "/relays").await.body;
            body.split(r#"<table id="connections">"#)
                .nth(1)
                .and_then(|t| t.split("</table>").next())
                .is_some_and(|t| t.contains("<td>listen</td>") && t.contains("<td>fetch</td>"))
        })
        .await
    );
    // Read-only by default.
    assert_eq!(post(addr, "/dead-letters/purge", "").await.status, 403);
    running.stop().await?;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still serving"
    );

    // A port in use fails startup, naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let app = db
        .app()
        .subscriber(consumer())
        .dashboard(taken.local_addr()?);
    let err = app.run().await.unwrap_err().to_string();
    assert!(err.contains("cannot listen on"), "{err}");
    Ok(())
}

#[tokio::test]
async fn outbox_serve_starts_and_answers() -> anyhow::Result<()> {
    let bins = tokio::task::spawn_blocking(tests::example_binaries).await?;
    let db = TestDb::new().await?;
    row(&db, "orders", "x", -1).await;
    let child = std::process::Command::new(&bins["outbox"])
        .args([
            "--database-url",
            &tests::database_url(),
            "--schema",
            &db.schema,
            "--table",
            db.table.name(),
            "--dlq-table",
            db.dlq.name(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allow-writes",
        ])
        .env("OUTBOX_DASHBOARD_TOKEN", "cli-token")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    // The first line names the address (port 0: any free port).
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        }),
    )
    .await???;
    assert!(line.contains("(writes allowed)"), "{line}");
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap()
        .parse()?;
    assert_eq!(get(addr, "/").await.status, 401);
    let ok = request(
        addr,
        "GET",
        "/",
        &[("Authorization", "Bearer cli-token")],
        "",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(cell(&ok.body, "orders", "ready"), "1");
    Ok(())
}

/// Kills the child process when dropped (the test ends or fails).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The rate in the chart's legend after `label`, e.g. `relayed (deleted)`.
fn legend_rate(body: &str, label: &str) -> Option<f64> {
    let rest = body.split(&format!("</span> {label} <strong>")).nth(1)?;
    rest[..rest.find("/s</strong>")?].parse().ok()
}

#[tokio::test]
async fn the_rate_chart_follows_the_table_statistics() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let addr = serve(Dashboard::new(db.broker.clone())).await;
    let first = get(addr, "/").await;
    first.assert_shows("collecting samples");
    // Rows come and go until two samples (5 s apart) see them relayed.
    let seen = wait_until(Duration::from_secs(40), || async {
        db.exec(format!(
            "INSERT INTO {} (queue, payload) SELECT 'q', '\\x00' FROM generate_series(1, 20)",
            db.t()
        ))
        .await
        .unwrap();
        db.exec(format!("DELETE FROM {}", db.t())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = get(addr, "/").await.body;
        legend_rate(&body, "relayed (deleted)").is_some_and(|r| r > 0.0)
            && legend_rate(&body, "inserted").is_some_and(|r| r > 0.0)
    })
    .await;
    let body = get(addr, "/").await.body;
    assert!(seen, "{body}");
    assert!(!body.contains("collecting samples"), "{body}");
    let points = body
        .split(r#"<polyline class="deleted" points=""#)
        .nth(1)
        .unwrap();
    assert!(points.starts_with(|c: char| c.is_ascii_digit()), "{points}");
    Ok(())
}

#[tokio::test]
async fn a_loopback_dashboard_answers_loopback_host_names_only() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let addr = serve(Dashboard::new(db.broker.clone())).await;
    let port = addr.port();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let a = request(addr, "GET", "/", &[("Host", &host)], "").await;
        assert_eq!(a.status, 200, "{host}");
    }
    // A page of another site whose name resolves to 127.0.0.1 (DNS rebinding).
    let rebound = format!("evil.example:{port}");
    let a = request(addr, "GET", "/dead-letters", &[("Host", &rebound)], "").await;
    assert_eq!(a.status, 403, "{}", a.body);
    a.assert_shows("loopback host names only");
    Ok(())
}

#[tokio::test]
async fn serving_beyond_loopback_without_authentication_warns() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let warned = |addr: SocketAddr| {
        let port = addr.port().to_string();
        !tests::captured(|c| {
            c.level == tracing::Level::WARN
                && c.message
                    .contains("not a loopback address, without authentication")
                && c.fields.get("addr").is_some_and(|a| a.ends_with(&port))
        })
        .is_empty()
    };
    let open = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let open_addr = open.local_addr()?;
    let d = Dashboard::new(db.broker.clone()).allow_writes(true);
    tokio::spawn(d.serve_listener(open, std::future::pending()));
    let guarded = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let guarded_addr = guarded.local_addr()?;
    let d = Dashboard::new(db.broker.clone()).bearer_token("t");
    tokio::spawn(d.serve_listener(guarded, std::future::pending()));
    let local = serve(Dashboard::new(db.broker.clone())).await;
    // Each logs (or not) before it answers its first request.
    for addr in [open_addr, guarded_addr] {
        let port = addr.port();
        let a = request(
            SocketAddr::from(([127, 0, 0, 1], port)),
            "GET",
            "/assets/dashboard.css",
            &[("Authorization", "Bearer t")],
            "",
        )
        .await;
        assert_eq!(a.status, 200);
    }
    assert!(warned(open_addr), "no WARN for {open_addr}");
    assert!(
        !warned(guarded_addr),
        "a WARN for {guarded_addr} despite the token"
    );
    assert!(!warned(local), "a WARN for the loopback {local}");
    Ok(())
}

#[tokio::test]
async fn large_payloads_are_cut_in_the_list_and_capped_on_the_detail_page() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let big = format!(r#"{{"blob": "{}"}}"#, "y".repeat(400 * 1024));
    let dl = dead_letter(&db, "orders", &big, "rejected").await;
    let addr = serve(Dashboard::new(db.broker.clone())).await;
    let list = get(addr, "/dead-letters").await;
    assert_eq!(list.status, 200);
    let cell = list
        .body
        .split(r#"<td class="mono payload">"#)
        .nth(1)
        .unwrap();
    let cell = cell[..cell.find("</td>").unwrap()].replace("&quot;", "\"");
    assert!(cell.ends_with('…') && cell.chars().count() <= 81, "{cell}");
    assert!(
        list.body.len() < 20_000,
        "the list page has {} bytes",
        list.body.len()
    );
    let one = get(addr, &format!("/dead-letters/{dl}")).await;
    assert_eq!(one.status, 200);
    assert!(
        one.body
            .contains(&format!("The payload has {} bytes", big.len())),
        "{}",
        &one.body[..2000]
    );
    one.assert_shows(&format!("outbox dlq show {dl} --json"));
    assert!(one.body.len() < 300 * 1024, "{} bytes", one.body.len());
    Ok(())
}
