//! The operator dashboard (`outbox-dashboard`) in a real browser: headless
//! Chromium over Debian's chromedriver (`tests::browser`).
//!
//! Missing chromium or chromedriver fails the tests with the apt packages
//! that install them: they never skip.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tests::browser::Browser;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Serves `html` to every request on a loopback port; its URL.
async fn static_page(html: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
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
async fn the_harness_runs_javascript_and_shuts_chromium_down() {
    let url = static_page(
        "<!doctype html><html><body><p id=\"js\">static</p>\
         <script>setTimeout(() => document.getElementById('js').textContent = 'ran', 300)</script>\
         </body></html>",
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
    assert!(
        tests::wait_until(Duration::from_secs(10), || async {
            group_alive(pgid).is_empty()
        })
        .await,
        "processes of the browser left after close: {:?}",
        group_alive(pgid)
    );
}
