//! `MetricsNaming::FastStream`: the Prometheus endpoint exports the
//! `faststream_*` families and labels of the spec (§4.22) for rows that are
//! published, acked, retried, dead-lettered, lose their lease and time out
//! a drain, on the real PostgreSQL. In its own test binary: it installs the
//! process-wide recorder and naming.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_core::retry::ConstantRetry;
use outbox_core::telemetry::MetricsNaming;
use outbox_core::{BoxError, Message};
use outbox_core::{Route, sqlx};
use tests::{RunningApp, TestDb, wait_until};

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    tests::http_get(addr, "/metrics").await
}

/// One sample: the metric name, its labels, its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The samples of `name` whose labels include `with`.
fn find<'a>(samples: &'a [Sample], name: &str, with: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .collect()
}

const APP: &str = "orders-app";
const HANDLER: &str = "fs-handler";
const QUEUE: &str = "fs_q";

/// The consume labels of the spec plus `extra`.
fn consume<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("app_name", APP),
        ("broker", "outbox"),
        ("handler", HANDLER),
    ];
    v.extend_from_slice(extra);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_faststream_naming_exports_the_spec_families_and_labels() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let broker = db
        .broker
        .clone()
        .graceful_timeout(Duration::from_millis(300));
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let table = db.t();
    let pool = db.pool.clone();
    // 1: acked; 2: fails once, then acked (a retry); 3: rejected with an
    // error (terminal, dead-lettered); 4: its lease is taken away while it
    // runs, then it fails (the retry write finds the lease gone); 5: runs
    // past the drain at shutdown (drain timeout).
    let route = Route::builder([QUEUE])
        .name(HANDLER)
        .max_workers(4)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(100))
        .retry(ConstantRetry::new(Duration::from_millis(50)))
        .handler(move |m: Message, _ctx| {
            let (table, pool) = (table.clone(), pool.clone());
            async move {
                let n: i64 = m.decode()?;
                match n {
                    2 if m.deliveries_count() == 1 => Err("first try fails".into()),
                    3 => {
                        m.reject();
                        Err::<(), BoxError>("refused".into())
                    }
                    4 if m.deliveries_count() == 1 => {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "UPDATE {table} SET acquired_token = gen_random_uuid() WHERE id = $1"
                        )))
                        .bind(m.id())
                        .execute(&pool)
                        .await?;
                        Err("lease taken".into())
                    }
                    5 => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        });
    let app = outbox_core::App::new(broker.clone())
        .without_discovery()
        .without_signals()
        .metrics_naming(MetricsNaming::faststream(APP))
        .prometheus(addr)
        .subscriber(route);
    let app = RunningApp::start(app);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            scrape(addr).await.is_ok()
        })
        .await,
        "the exporter never answered on {addr}"
    );
    for n in 1..=4_i64 {
        let mut conn = db.pool.acquire().await?;
        broker.publish(&n, QUEUE, &mut conn).await?;
    }
    // Rows 1 to 3 finish; row 4 lost its lease and is claimed again once
    // it expires (the lease is 30 s): do not wait for it.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            db.dlq_count().await.unwrap() == 1 && db.count().await.unwrap() == 1
        })
        .await,
        "rows left: {}, dead letters: {}",
        db.count().await?,
        db.dlq_count().await?
    );
    let lease_lost = || async {
        parse(&scrape(addr).await.unwrap_or_default())
            .iter()
            .any(|s| s.name == "faststream_outbox_lease_lost_total")
    };
    assert!(wait_until(Duration::from_secs(10), lease_lost).await);
    // Row 5 runs when the app stops: its drain times out.
    let mut conn = db.pool.acquire().await?;
    broker.publish(&5_i64, QUEUE, &mut conn).await?;
    drop(conn);
    let running = || async {
        parse(&scrape(addr).await.unwrap_or_default())
            .iter()
            .any(|s| s.name == "faststream_received_messages_in_process" && s.value >= 1.0)
    };
    assert!(wait_until(Duration::from_secs(10), running).await);
    app.stop().await?;
    // The exporter outlives the app (the recorder is process-wide).
    let body = scrape(addr).await?;
    let s = parse(&body);
    println!("{body}");

    let one = |name: &str, with: &[(&str, &str)]| -> f64 {
        let found = find(&s, name, with);
        assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}\n{body}");
        found[0].value
    };
    // Publish families: app_name, broker, destination.
    let published = one(
        "faststream_published_messages_total",
        &[
            ("app_name", APP),
            ("broker", "outbox"),
            ("destination", QUEUE),
            ("status", "success"),
        ],
    );
    assert_eq!(published, 5.0);
    // Bus families.
    assert!(one("faststream_received_messages_total", &consume(&[])) >= 6.0);
    assert_eq!(
        one(
            "faststream_received_processed_messages_total",
            &consume(&[("status", "acked")])
        ),
        2.0
    );
    // Row 2's first try (retried) and row 3 (rejected); row 4's first try
    // closed with the lost lease: `error`.
    assert_eq!(
        one(
            "faststream_received_processed_messages_total",
            &consume(&[("status", "nacked")])
        ),
        2.0
    );
    assert_eq!(
        one(
            "faststream_received_processed_messages_total",
            &consume(&[("status", "error")])
        ),
        1.0
    );
    assert!(
        one(
            "faststream_received_processed_messages_exceptions_total",
            &consume(&[("exception_type", "handler")])
        ) >= 2.0
    );
    // The duration histogram has FastStream's buckets.
    for le in ["0.005", "0.075", "2.5", "10", "+Inf"] {
        one(
            "faststream_received_processed_messages_duration_seconds_bucket",
            &consume(&[("le", le)]),
        );
    }
    assert!(
        one(
            "faststream_received_processed_messages_duration_seconds_count",
            &consume(&[])
        ) >= 4.0
    );
    one("faststream_received_messages_in_process", &consume(&[]));
    // Outbox families.
    assert!(
        one(
            "faststream_outbox_fetch_batches_total",
            &consume(&[("non_empty", "true")])
        ) >= 1.0
    );
    assert!(
        one(
            "faststream_outbox_fetch_batches_total",
            &consume(&[("non_empty", "false")])
        ) >= 1.0
    );
    assert_eq!(
        one(
            "faststream_outbox_terminal_total",
            &consume(&[("reason", "rejected")])
        ),
        1.0
    );
    assert_eq!(
        one(
            "faststream_outbox_dlq_written_total",
            &consume(&[("reason", "rejected")])
        ),
        1.0
    );
    assert_eq!(
        one(
            "faststream_outbox_lease_lost_total",
            &consume(&[("phase", "retry")])
        ),
        1.0
    );
    assert_eq!(
        one("faststream_outbox_drain_timeout_total", &consume(&[])),
        1.0
    );
    // Every faststream_* sample carries app_name and broker="outbox"; the
    // families FastStream has are not exported under outbox_* names too.
    for x in s.iter().filter(|x| x.name.starts_with("faststream_")) {
        assert_eq!(
            x.labels.get("app_name").map(String::as_str),
            Some(APP),
            "{x:?}"
        );
        assert_eq!(
            x.labels.get("broker").map(String::as_str),
            Some("outbox"),
            "{x:?}"
        );
    }
    for gone in [
        "outbox_published_total",
        "outbox_dispatched_total",
        "outbox_acked_total",
        "outbox_nacked_retried_total",
        "outbox_nacked_terminal_total",
        "outbox_dlq_written_total",
        "outbox_lease_lost_total",
        "outbox_drain_timeout_total",
        "outbox_fetch_batches_total",
        "outbox_handler_duration_seconds",
    ] {
        assert!(
            !s.iter().any(|x| x.name.starts_with(gone)),
            "{gone} exported besides its faststream name\n{body}"
        );
    }
    // Metrics FastStream has no family for keep their outbox_* names.
    assert!(s.iter().any(|x| x.name == "outbox_fetched_total"), "{body}");
    // The naming is process-wide: another one is refused.
    let err = outbox_core::telemetry::set_metrics_naming(MetricsNaming::Outbox).unwrap_err();
    assert!(err.to_string().contains("already"), "{err}");
    outbox_core::telemetry::set_metrics_naming(MetricsNaming::faststream(APP))?;
    Ok(())
}
