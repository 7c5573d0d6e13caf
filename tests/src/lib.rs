//! Shared support for the workspace's integration tests.
//!
//! Every test gets its own schema and its own table name (so its own NOTIFY
//! channel) inside the test database, which lets tests run in parallel
//! against one PostgreSQL server. The schema is dropped when the [`TestDb`]
//! is dropped.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outbox_core::{App, AppHandle, DlqTable, OutboxBroker, OutboxTable};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};
use tracing_subscriber::Layer as _;

pub mod browser;
pub mod crash;
pub mod kafka;
pub mod nats;
pub mod proxy;
pub mod rabbitmq;
pub mod redis;
pub mod relay_child;

/// The test database URL (`OUTBOX_TEST_DATABASE_URL`, default
/// `postgres://postgres@127.0.0.1:5432/outbox_test`).
pub fn database_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/outbox_test".to_owned())
}

/// Creates the test database if it does not exist yet.
pub async fn ensure_database() -> anyhow::Result<()> {
    let opts: PgConnectOptions = database_url().parse()?;
    let db = opts.get_database().unwrap_or("outbox_test").to_owned();
    let admin = opts.clone().database("postgres");
    let mut conn = admin.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach PostgreSQL at {}: {e}. Start it (scripts/test.sh does) or set OUTBOX_TEST_DATABASE_URL",
            database_url()
        )
    })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let res = conn
            .execute(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE \"{}\"",
                db.replace('"', "\"\"")
            )))
            .await;
        if let Err(e) = res {
            // Another test process may have created it meanwhile.
            let dup = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505");
            if !dup {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// A private schema and table for one test.
#[derive(Debug)]
pub struct TestDb {
    pub pool: PgPool,
    pub schema: String,
    pub table: OutboxTable,
    pub dlq: DlqTable,
    pub broker: OutboxBroker,
}

/// A short random lowercase suffix.
pub fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl TestDb {
    /// A fresh schema with a migrated outbox table and dead-letter table; the
    /// broker has the dead-letter table configured.
    pub async fn new() -> anyhow::Result<Self> {
        init_tracing();
        ensure_database().await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&database_url())
            .await?;
        let s = suffix();
        let schema = format!("t_{s}");
        let table = OutboxTable::new(&format!("ob_{s}"))?.schema(&schema)?;
        let dlq = DlqTable::new(&format!("ob_{s}_dlq"))?.schema(&schema)?;
        let broker = OutboxBroker::new(pool.clone(), table.clone()).dead_letter_table(dlq.clone());
        broker.migrate().await?;
        Ok(Self {
            pool,
            schema,
            table,
            dlq,
            broker,
        })
    }

    /// The qualified table name, for ad-hoc SQL in tests.
    pub fn t(&self) -> String {
        self.table.qualified_name()
    }

    /// The qualified dead-letter table name.
    pub fn d(&self) -> String {
        self.dlq.qualified_name()
    }

    /// Runs ad-hoc SQL (tests only).
    pub async fn exec(&self, sql: String) -> anyhow::Result<u64> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Waits up to `timeout` for the outbox table to be empty; whether it is.
    pub async fn drained(&self, timeout: std::time::Duration) -> bool {
        wait_until(timeout, || async { self.count().await.unwrap() == 0 }).await
    }

    /// Waits up to `timeout` until a session LISTENs on this table's NOTIFY
    /// channel (an engine's LISTEN loop is in place: every commit from now on
    /// wakes it); whether one does. A readiness signal for tests that need a
    /// NOTIFY to reach an engine that otherwise polls rarely.
    pub async fn listening(&self, timeout: Duration) -> bool {
        // sqlx's PgListener sends exactly this; pg_stat_activity shows a
        // session's last statement.
        let listen = format!("LISTEN \"{}\"", self.table.channel());
        wait_until(timeout, || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE query = $1")
                .bind(&listen)
                .fetch_one(&self.pool)
                .await
                .unwrap()
                > 0
        })
        .await
    }

    /// `SELECT count(*)` of the outbox table.
    pub async fn count(&self) -> anyhow::Result<i64> {
        self.scalar(format!("SELECT count(*) FROM {}", self.t()))
            .await
    }

    /// `SELECT count(*)` of the dead-letter table.
    pub async fn dlq_count(&self) -> anyhow::Result<i64> {
        self.scalar(format!("SELECT count(*) FROM {}", self.d()))
            .await
    }

    /// One `i64` from ad-hoc SQL.
    pub async fn scalar(&self, sql: String) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }

    /// A dedicated connection (not from the pool).
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect(&database_url()).await?)
    }

    /// An `App` on this outbox as the tests run one: no route discovery, no
    /// signal handling (stopped through its handle, see [`RunningApp`]).
    pub fn app(&self) -> App {
        App::new(self.broker.clone())
            .without_discovery()
            .without_signals()
    }
}

/// An `App` running on a task of its own (from [`RunningApp::start`]);
/// [`stop`](Self::stop) shuts it down and returns how `App::run` ended.
#[derive(Debug)]
pub struct RunningApp {
    handle: AppHandle,
    run: tokio::task::JoinHandle<outbox_core::Result<()>>,
}

impl RunningApp {
    /// Spawns `app.run()`.
    pub fn start(app: App) -> Self {
        Self {
            handle: app.handle(),
            run: tokio::spawn(app.run()),
        }
    }

    /// Shuts the app down once it has started (its engine runs, or `run`
    /// ended) and waits for `App::run`; its error, if any. A shutdown
    /// requested earlier would stop it while starting, before its services
    /// and shutdown hooks run.
    pub async fn stop(self) -> anyhow::Result<()> {
        let started = wait_until(Duration::from_secs(30), || async {
            self.run.is_finished() || self.handle.health().await.engine.is_some()
        })
        .await;
        anyhow::ensure!(started, "the app did not start within 30 s");
        self.handle.shutdown();
        self.run.await??;
        Ok(())
    }
}

/// The outbox of the conformance kit's tests
/// (`outbox_conformance::conformance_tests!`).
impl AsRef<OutboxBroker> for TestDb {
    fn as_ref(&self) -> &OutboxBroker {
        &self.broker
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        // Best effort, on a thread of its own: the test's runtime may be gone.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&database_url()).await {
                    // A test that panicked with an engine still running may
                    // leave a claim's transaction open on the schema's table,
                    // and that engine cannot finish it while this drop blocks
                    // its runtime: give up on the drop rather than wait forever.
                    let _ = c.execute("SET lock_timeout = '5s'").await;
                    let _ = c
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                        )))
                        .await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// One captured tracing event.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: tracing::Level,
    pub message: String,
    pub fields: std::collections::BTreeMap<String, String>,
}

static CAPTURED: std::sync::Mutex<Vec<Captured>> = std::sync::Mutex::new(Vec::new());

struct CaptureLayer;

struct Visitor<'a>(&'a mut Captured);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.message = value.to_owned();
        } else {
            self.0
                .fields
                .insert(field.name().to_owned(), value.to_owned());
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.record_str(field, &value.to_string());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.record_str(field, &value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CaptureLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if *event.metadata().level() > tracing::Level::INFO {
            return;
        }
        let mut c = Captured {
            level: *event.metadata().level(),
            message: String::new(),
            fields: Default::default(),
        };
        event.record(&mut Visitor(&mut c));
        CAPTURED.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }
}

/// Installs the test tracing subscriber once per process: a `RUST_LOG`
/// filtered printer, plus a capture of every INFO-or-worse event that tests
/// read with [`captured`].
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let printer = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        );
    let _ = tracing_subscriber::registry()
        .with(printer)
        .with(CaptureLayer)
        .try_init();
}

/// Captured events matching `pred` (events of every test in this process).
pub fn captured(pred: impl Fn(&Captured) -> bool) -> Vec<Captured> {
    CAPTURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|c| pred(c))
        .cloned()
        .collect()
}

/// The values of the fields `names` in `value`'s `Debug` output, space
/// separated (`"Transaction 2s"`): how a test reads options that a type
/// shows only through `Debug` (a `Route`'s). Panics naming a missing field.
pub fn debug_fields(value: &impl std::fmt::Debug, names: &[&str]) -> String {
    let debug = format!("{value:?}");
    let field = |name: &str| {
        let rest = debug
            .split(&format!("{name}: "))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} in {debug}"));
        rest.split([',', ' ', '}'])
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    names.iter().map(|n| field(n)).collect::<Vec<_>>().join(" ")
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Python of the interop venv: `OUTBOX_PYTHON`, else the default venv
/// path. Fails with the command to run when neither exists.
pub fn interop_python() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(p) = std::env::var("OUTBOX_PYTHON") {
        return Ok(p.into());
    }
    let default =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/py-venv/bin/python");
    if default.exists() {
        return Ok(default);
    }
    anyhow::bail!(
        "the interop tests need faststream-outbox 0.19 in a Python venv: run `bash scripts/python-env.sh` \
         (scripts/test.sh does) or set OUTBOX_PYTHON"
    )
}

/// Builds the workspace's examples and the `outbox` binary and returns their
/// paths by target name (`kafka_relay`, `outbox`, ...). scripts/test.sh runs
/// the same `cargo build` before the tests, so under it this is a no-op that
/// only reads the paths. Panics with the compiler's messages when the build
/// fails.
pub fn example_binaries() -> std::collections::BTreeMap<String, std::path::PathBuf> {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = std::process::Command::new(cargo);
    // The variables cargo sets for this test process (the `tests` package's
    // CARGO_MANIFEST_DIR, CARGO_PKG_*, OUT_DIR, ...) are ones that build
    // scripts watch (ring's: `rerun-if-env-changed=CARGO_PKG_NAME`, ...):
    // passed on, they make this cargo rebuild those crates and everything
    // above them (rustls, lapin, async-nats, redis) in the middle of the
    // test run, instead of finding scripts/test.sh's build fresh.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = ["CARGO_PKG_", "CARGO_BIN_", "CARGO_MANIFEST_"]
            .iter()
            .any(|p| name.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if set_by_cargo {
            cmd.env_remove(name.as_ref());
        }
    }
    let out = cmd
        .current_dir(repo)
        .args([
            "build",
            "--workspace",
            "--all-features",
            "--examples",
            "--bin",
            "outbox",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running cargo build");
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    // With --message-format=json the compiler's diagnostics go to stdout as
    // JSON, not to stderr: show them, or a failed build says nothing of why.
    assert!(
        out.status.success(),
        "cargo build of the examples failed ({}):\n{}",
        out.status,
        messages
            .iter()
            .filter(|m| m["reason"] == "compiler-message")
            .filter_map(|m| m["message"]["rendered"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            let exe = m["executable"].as_str()?;
            let name = m["target"]["name"].as_str()?;
            Some((name.to_owned(), std::path::PathBuf::from(exe)))
        })
        .collect()
}

/// `GET path` over a fresh HTTP/1.1 connection to `addr` (the Prometheus and
/// health endpoints of the tests): the whole response, status line and
/// headers included.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Decodes standard base64 (with or without padding).
pub fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const STANDARD_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    Ok(STANDARD_ANY_PADDING.decode(s)?)
}

/// A process-wide metrics recorder for tests: `metrics-util`'s
/// [`DebuggingRecorder`](metrics_util::debugging::DebuggingRecorder), read
/// through running totals so that nothing is lost between reads.
///
/// Its snapshots *consume* (counters and gauges are reset to 0, histograms
/// emptied), so every read folds a snapshot into the totals: counters add
/// up, histograms keep every sample, and a gauge keeps the last value it was
/// seen with. A snapshot cannot tell a gauge set to 0 from one not set since
/// the previous snapshot: a gauge reads 0 until it was first set to another
/// value, then its last non-zero value (the engine's gauges are samples
/// that tests compare with known, non-zero table counts).
pub mod metrics_capture {
    use std::collections::BTreeMap;
    use std::collections::btree_map::Entry;
    use std::sync::{Mutex, OnceLock};

    use metrics::Key;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    type K = (String, Vec<(String, String)>);

    #[derive(Default)]
    struct Totals {
        counters: BTreeMap<K, u64>,
        gauges: BTreeMap<K, f64>,
        histograms: BTreeMap<K, Vec<f64>>,
    }

    /// `Some` once our recorder is the global one.
    static SNAPSHOTTER: OnceLock<Option<Snapshotter>> = OnceLock::new();
    static TOTALS: Mutex<Option<Totals>> = Mutex::new(None);

    fn key(k: &Key) -> K {
        let mut labels: Vec<(String, String)> = k
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        labels.sort();
        (k.name().to_owned(), labels)
    }

    /// Folds a fresh snapshot into the totals, then reads them.
    fn with<T>(f: impl FnOnce(&Totals) -> T) -> T {
        let mut guard = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
        let totals = guard.get_or_insert_with(Totals::default);
        if let Some(Some(snapshotter)) = SNAPSHOTTER.get() {
            for (ck, _unit, _description, value) in snapshotter.snapshot().into_vec() {
                let k = key(ck.key());
                match value {
                    DebugValue::Counter(n) => *totals.counters.entry(k).or_default() += n,
                    DebugValue::Gauge(v) => match totals.gauges.entry(k) {
                        Entry::Vacant(e) => {
                            e.insert(v.0);
                        }
                        Entry::Occupied(mut e) if v.0 != 0.0 => {
                            e.insert(v.0);
                        }
                        Entry::Occupied(_) => {}
                    },
                    DebugValue::Histogram(samples) => totals
                        .histograms
                        .entry(k)
                        .or_default()
                        .extend(samples.into_iter().map(|v| v.0)),
                }
            }
        }
        f(totals)
    }

    /// Installs the recorder (once); must run before metrics are emitted.
    pub fn install() {
        SNAPSHOTTER.get_or_init(|| {
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            recorder.install().ok().map(|()| snapshotter)
        });
    }

    fn matches(k: &K, name: &str, labels: &[(&str, &str)]) -> bool {
        k.0 == name
            && labels
                .iter()
                .all(|(lk, lv)| k.1.iter().any(|(a, b)| a == lk && b == lv))
    }

    /// Sum of the counters `name` whose labels include `labels`.
    pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
        with(|s| {
            s.counters
                .iter()
                .filter(|(k, _)| matches(k, name, labels))
                .map(|(_, v)| *v)
                .sum()
        })
    }

    /// The value of the gauge `name` with `labels`, if set.
    pub fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        with(|s| {
            s.gauges
                .iter()
                .find(|(k, _)| matches(k, name, labels))
                .map(|(_, v)| *v)
        })
    }

    /// Every sample of the histograms `name` with `labels`.
    pub fn histogram(name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        with(|s| {
            s.histograms
                .iter()
                .filter(|(k, _)| matches(k, name, labels))
                .flat_map(|(_, v)| v.clone())
                .collect()
        })
    }
}
