//! The opt-in Prometheus exporter (feature `prometheus`): the App serves the
//! metrics on `/metrics`. In its own test binary: it installs the global
//! recorder.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outbox_core::{App, Message, Route};
use tests::TestDb;

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    tests::http_get(addr, "/metrics").await
}

#[tokio::test]
async fn the_app_serves_prometheus_metrics() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let route = Route::builder(["prom"])
        .name("prom-sub")
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(100))
        .handler(|_m: Message, _c| async {});
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .prometheus(addr)
        .subscriber(route);
    let stop = app.handle();
    let run = tokio::spawn(app.run());
    // App::run installs the exporter (the global recorder) when it starts;
    // a publish counted before that goes to no recorder. Wait until it
    // answers, so the publish below is counted.
    let mut up = false;
    for _ in 0..100 {
        if scrape(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the exporter never answered on {addr}");
    let mut conn = db.pool.acquire().await?;
    db.broker.publish(&1, "prom", &mut conn).await?;
    assert!(db.drained(Duration::from_secs(10)).await);
    let mut body = String::new();
    for _ in 0..100 {
        body = scrape(addr).await.unwrap_or_default();
        if body.contains("outbox_acked_total") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body.contains("outbox_published_total{queue=\"prom\",status=\"success\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("outbox_acked_total{queue=\"prom\",subscriber=\"prom-sub\"} 1"),
        "{body}"
    );
    stop.shutdown();
    run.await??;
    Ok(())
}
