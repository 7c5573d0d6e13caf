//! A headless Chromium for the tests, driven over WebDriver: Debian's
//! `chromedriver` (package `chromium-driver`) started on a free loopback port,
//! one `fantoccini` session on it.
//!
//! ```ignore
//! let browser = tests::browser::Browser::start().await?;
//! browser.goto("http://127.0.0.1:8090/").await?;
//! let ready = browser.text(r#"tr[data-queue="orders"] td[data-field="ready"]"#).await?;
//! browser.close().await?;
//! ```
//!
//! A missing `chromium` or `chromedriver` fails with the apt packages that
//! install them (scripts/test.sh installs both): the browser tests never skip.
//! [`Browser::close`] ends the session (Chromium quits) and then
//! chromedriver; a `Browser` dropped without it (a failed test) kills
//! chromedriver's whole process group, Chromium included, so no browser
//! outlives its test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// The window (and so screenshot) size of every session: 1280x800.
pub const WINDOW: (u32, u32) = (1280, 800);

/// How long [`Browser::start`] waits for chromedriver and the session.
const START_TIMEOUT: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "install them (Debian: apt-get install -y chromium chromium-driver; \
                            bash scripts/test.sh does when run as root)";

/// `chromedriver`: `OUTBOX_CHROMEDRIVER`, else Debian's `/usr/bin/chromedriver`,
/// else the first on `PATH`.
pub fn chromedriver_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("OUTBOX_CHROMEDRIVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "OUTBOX_CHROMEDRIVER={} is not a file: point it at chromedriver or unset it",
            p.display()
        );
    }
    find_program("/usr/bin/chromedriver", &["chromedriver"]).with_context(|| {
        format!("chromedriver not found (/usr/bin/chromedriver, PATH): {INSTALL_HINT}")
    })
}

/// The Chromium binary: `OUTBOX_CHROMIUM`, else Debian's `/usr/bin/chromium`,
/// else `chromium`, `chromium-browser` or `google-chrome` on `PATH`.
pub fn chromium_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("OUTBOX_CHROMIUM") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "OUTBOX_CHROMIUM={} is not a file: point it at chromium or unset it",
            p.display()
        );
    }
    find_program(
        "/usr/bin/chromium",
        &["chromium", "chromium-browser", "google-chrome"],
    )
    .with_context(|| format!("chromium not found (/usr/bin/chromium, PATH): {INSTALL_HINT}"))
}

fn find_program(default: &str, names: &[&str]) -> Option<PathBuf> {
    if Path::new(default).is_file() {
        return Some(default.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to take).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// chromedriver, in a process group of its own (Chromium joins it), and its
/// scratch directory (log, Chromium profile); both gone on drop.
#[derive(Debug)]
struct Driver {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Driver {
    fn log_path(&self) -> PathBuf {
        self.dir.join("chromedriver.log")
    }

    /// The end of chromedriver's log, for error messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kills the process group: chromedriver and any Chromium it started.
    fn kill_group(&mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill_group();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A headless Chromium session (1280x800) over a private chromedriver.
#[derive(Debug)]
pub struct Browser {
    client: Client,
    driver: Driver,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium
    /// session. Fails naming the apt packages when chromium or chromedriver
    /// is missing, with chromedriver's log when it does not come up.
    pub async fn start() -> anyhow::Result<Self> {
        let chromedriver = chromedriver_path()?;
        let chromium = chromium_path()?;
        let dir = std::env::temp_dir().join(format!("outbox-browser-{}", crate::suffix()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let mut cmd = Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}: {INSTALL_HINT}", chromedriver.display()))?;
        let mut driver = Driver { child, dir, port };
        let url = format!("http://127.0.0.1:{port}");
        driver_ready(&mut driver).await?;

        let profile = driver.dir.join("profile");
        let caps = json!({
            // The page's console, for console_errors.
            "goog:loggingPrefs": { "browser": "ALL" },
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--force-device-scale-factor=1",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("a JSON object literal")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let session = tokio::time::timeout(
            START_TIMEOUT,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url),
        )
        .await;
        let client = match session {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => bail!(
                "chromedriver could not start {}: {e}\nchromedriver log:\n{}",
                chromium.display(),
                driver.log_tail()
            ),
            Err(_) => bail!(
                "no Chromium session within {START_TIMEOUT:?}\nchromedriver log:\n{}",
                driver.log_tail()
            ),
        };
        let browser = Self { client, driver };
        browser.fit_viewport().await?;
        Ok(browser)
    }

    /// Sizes the window so that the page's viewport (what a screenshot
    /// shows) is [`WINDOW`]: `--window-size` counts the browser's frame too.
    async fn fit_viewport(&self) -> anyhow::Result<()> {
        let frame = self
            .client
            .execute(
                "return [window.outerWidth - window.innerWidth, \
                 window.outerHeight - window.innerHeight]",
                vec![],
            )
            .await?;
        let px = |i: usize| frame[i].as_u64().and_then(|v| u32::try_from(v).ok());
        let (Some(dx), Some(dy)) = (px(0), px(1)) else {
            bail!("unexpected window frame size from Chromium: {frame}");
        };
        self.client
            .set_window_size(WINDOW.0 + dx, WINDOW.1 + dy)
            .await?;
        Ok(())
    }

    /// The WebDriver session, for what the helpers here do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The port chromedriver listens on.
    pub fn driver_port(&self) -> u16 {
        self.driver.port
    }

    /// chromedriver's pid, which is also the id of the process group it and
    /// Chromium run in.
    pub fn driver_pid(&self) -> u32 {
        self.driver.child.id()
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("loading {url}"))
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        Ok(self.find(css).await?.text().await?)
    }

    /// The rendered text of every element matching `css` (none: empty).
    pub async fn texts(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for el in self.client.find_all(Locator::Css(css)).await? {
            out.push(el.text().await?);
        }
        Ok(out)
    }

    /// The value of attribute `name` of every element matching `css`.
    pub async fn attrs(&self, css: &str, name: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for el in self.client.find_all(Locator::Css(css)).await? {
            if let Some(v) = el.attr(name).await? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Whether an element matches `css` now.
    pub async fn exists(&self, css: &str) -> anyhow::Result<bool> {
        Ok(!self.client.find_all(Locator::Css(css)).await?.is_empty())
    }

    /// Clicks the first element matching `css`, a link or a submit button,
    /// and waits (at most [`START_TIMEOUT`]) until the page it leads to has
    /// loaded. WebDriver's click may return while the old document is still
    /// there, so the old one is marked first and the wait is for a document
    /// without the mark.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let el = self.find(css).await?;
        self.client
            .execute("window.outboxTestOldPage = true; return null", vec![])
            .await?;
        el.click()
            .await
            .with_context(|| format!("clicking {css}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Mid-navigation the script may fail: not loaded yet.
            let loaded = self
                .client
                .execute(
                    "return window.outboxTestOldPage === undefined \
                     && document.readyState === 'complete'",
                    vec![],
                )
                .await;
            if matches!(loaded, Ok(serde_json::Value::Bool(true))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("clicking {css} led to no new page within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the text of the first element matching `css` every 100 ms until
    /// `pred` holds, for at most `timeout`; the text that did. Fails with the
    /// last text seen (or that nothing matched).
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                // The element may be swapped out between find and text.
                if let Ok(text) = el.text().await {
                    if pred(&text) {
                        return Ok(text);
                    }
                    last = Some(text);
                }
            }
            if Instant::now() >= deadline {
                match last {
                    Some(text) => bail!("{css} still reads {text:?} after {timeout:?}"),
                    None => bail!("{} (after {timeout:?})", self.missing(css).await),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until an element matches `css` (or, with `present: false`, none
    /// does), for at most `timeout`.
    pub async fn wait_present(
        &self,
        css: &str,
        present: bool,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.exists(css).await? != present {
            if Instant::now() >= deadline {
                bail!(
                    "{css} {} after {timeout:?}",
                    if present {
                        "never appeared"
                    } else {
                        "is still there"
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The browser console's errors (level SEVERE: script errors, failed
    /// loads, Content-Security-Policy refusals) since the last call, as
    /// `source: message`. Read through chromedriver's log endpoint.
    pub async fn console_errors(&self) -> anyhow::Result<Vec<String>> {
        let sid = self
            .client
            .session_id()
            .await?
            .context("the WebDriver session has no id")?;
        let v = driver_post(
            self.driver.port,
            &format!("/session/{sid}/se/log"),
            &json!({ "type": "browser" }),
        )
        .await?;
        let entries = v["value"]
            .as_array()
            .with_context(|| format!("chromedriver's log answer has no entries: {v}"))?;
        Ok(entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| {
                format!(
                    "{}: {}",
                    e["source"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("?")
                )
            })
            .collect())
    }

    /// The page's HTML as the browser has it now.
    pub async fn source(&self) -> anyhow::Result<String> {
        Ok(self.client.source().await?)
    }

    /// Writes a PNG screenshot of the window (1280x800) to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let png = self.client.screenshot().await?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// The message of a failed lookup: the selector, the page's URL and the
    /// start of its text, which shows what the page has instead.
    async fn missing(&self, css: &str) -> String {
        let url = match self.client.current_url().await {
            Ok(u) => u.to_string(),
            Err(e) => format!("(no URL: {e})"),
        };
        let body = match self.client.find(Locator::Css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let body: String = body.chars().take(1500).collect();
        format!("no element matches {css} on {url}; the page reads:\n{body}")
    }

    /// The first element matching `css`, or an error showing the page.
    async fn find(&self, css: &str) -> anyhow::Result<fantoccini::elements::Element> {
        match self.client.find(Locator::Css(css)).await {
            Ok(el) => Ok(el),
            Err(e) => bail!("{} ({e})", self.missing(css).await),
        }
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(self) -> anyhow::Result<()> {
        let Self { client, driver } = self;
        let closed = tokio::time::timeout(Duration::from_secs(20), client.close()).await;
        drop(driver);
        match closed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("closing the WebDriver session: {e}")),
            Err(_) => bail!("the WebDriver session did not close within 20 s"),
        }
    }
}

/// Waits until chromedriver accepts connections on its port (it listens
/// once it is ready for sessions).
async fn driver_ready(driver: &mut Driver) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], driver.port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = driver.child.try_wait()? {
            bail!(
                "chromedriver exited ({status}) before it was ready\nchromedriver log:\n{}",
                driver.log_tail()
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "chromedriver not listening on port {} after {START_TIMEOUT:?}\nchromedriver log:\n{}",
                driver.port,
                driver.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST path` with a JSON body to chromedriver; its JSON answer. (For the
/// endpoints fantoccini has no call for; chromedriver keeps connections
/// open, so the body is read by its Content-Length.)
async fn driver_post(
    port: u16,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut r = tokio::io::BufReader::new(s);
    let (mut status, mut length) = (String::new(), None);
    r.read_line(&mut status).await?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse::<usize>()?);
        }
    }
    let length =
        length.with_context(|| format!("chromedriver answered {path} without a length"))?;
    let mut buf = vec![0; length];
    tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut buf))
        .await
        .context("chromedriver's answer did not arrive")??;
    if !status.contains(" 200 ") {
        bail!(
            "chromedriver answered {path}: {} {}",
            status.trim(),
            String::from_utf8_lossy(&buf)
        );
    }
    Ok(serde_json::from_slice(&buf)?)
}
