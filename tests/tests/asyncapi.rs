//! The AsyncAPI document (`App::asyncapi`, `outbox docs gen|serve`), issue 18:
//!
//! - its content, for apps built here (channels, operations, servers without
//!   credentials, envelope headers, payload schemas from `#[subscriber]`
//!   types, `x-outbox` options);
//! - validated by the official parser, `@asyncapi/parser` run with Node.js
//!   (`tools/asyncapi/validate.js`; `npm ci` there, which `scripts/test.sh`
//!   does): the documents of these apps and of every example app, generated
//!   by `outbox docs gen -- <example binary>`, as JSON and YAML;
//! - the HTML page of `outbox docs serve`, loaded in headless Chromium
//!   (`chromium --headless --dump-dom`), showing every channel.
//!
//! Missing tools (node, the parser's node_modules, chromium) fail the tests
//! with the command that installs them: they never skip.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::asyncapi::PayloadSchema;
use outbox_core::envelope::CORRELATION_ID as CORRELATION_ID_HEADER;
use outbox_core::retry::ConstantRetry;
use outbox_core::{
    App, AsyncApi, DlqTable, MemoryTransport, OUTBOX_ID, OutboxBroker, OutboxTable, PoisonPolicy,
    Response, Route, State, publish_to, subscriber,
};
use serde_json::Value;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

// ---------------------------------------------------------------------------
// Handlers documented by the tests (discovered by `inventory`: only the
// tests that do not call `without_discovery` see them).

/// A payload type with a JSON Schema.
#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Order {
    /// The order's id.
    id: i64,
    /// Its lines.
    lines: Vec<Line>,
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Line {
    sku: String,
    quantity: u32,
}

/// A payload type without one.
#[derive(serde::Serialize, serde::Deserialize)]
struct Opaque {
    blob: String,
}

struct Db;

#[publish_to(kafka, "asyncapi.orders.kafka")]
#[publish_to(outbox, "asyncapi.audit")]
#[subscriber(
    "asyncapi.orders",
    ordered = true,
    poison_policy = DeadLetterAndContinue,
    max_deliveries = 7,
    retry = ConstantRetry::new(Duration::from_millis(250)),
)]
async fn relay_order(order: Order, _db: State<Db>) -> Result<Response<Order>, std::io::Error> {
    Ok(Response::new(order))
}

#[publish_to(kafka, "asyncapi.opaque.kafka")]
#[subscriber("asyncapi.opaque")]
async fn relay_opaque(msg: outbox_core::Message, body: Opaque) -> Opaque {
    let _ = msg.id();
    body
}

#[subscriber("asyncapi.audit")]
async fn audit(order: Order) {
    let _ = order.id;
}

// ---------------------------------------------------------------------------
// Helpers

/// An outbox over a lazy pool (nothing connects) at `url`.
fn outbox_at(url: &str) -> OutboxBroker {
    let pool = outbox_core::sqlx::PgPool::connect_lazy(url).unwrap();
    OutboxBroker::new(pool, OutboxTable::new("outbox").unwrap())
        .dead_letter_table(DlqTable::new("outbox_dlq").unwrap())
}

/// The discovered app of this file: Kafka (described, with credentials in
/// its URL that must not show), the outbox transport and the state.
fn discovered_app() -> App {
    let kafka = outbox_kafka::KafkaBroker::new("user:secret@broker1:9092,broker2:9092");
    App::new(outbox_at("postgres://app:hunter2@db.internal:6543/shop"))
        .state(Db)
        .outbox_transport()
        .on_startup(kafka.connect())
        .asyncapi_info("asyncapi-test", "1.2.3", Some("Test app"))
}

fn doc_of(app: &App) -> Value {
    app.asyncapi().unwrap().into_value()
}

/// `<repo>/tools/asyncapi`, checked to be installed; fails with the fix.
fn validator() -> PathBuf {
    let dir = Path::new(REPO).join("tools/asyncapi");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "Node.js is needed to run the official AsyncAPI parser: install Node.js 18+ \
         (Debian: apt-get install -y nodejs npm) ({node:?})"
    );
    assert!(
        dir.join("node_modules/@asyncapi/parser/package.json")
            .exists(),
        "the AsyncAPI parser is not installed: run `npm ci` in {} (scripts/test.sh does)",
        dir.display()
    );
    dir.join("validate.js")
}

/// Runs the official parser on `files`; panics with its diagnostics unless
/// every document is valid with zero errors.
fn validate(files: &[PathBuf]) {
    let script = validator();
    let out = Command::new("node")
        .arg(&script)
        .args(files)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "@asyncapi/parser found errors:\n{text}"
    );
    for f in files {
        assert!(
            text.contains(&format!("{}: valid AsyncAPI 3.0.0", f.display())),
            "no verdict for {}:\n{text}",
            f.display()
        );
    }
    assert!(!text.contains(": error:"), "{text}");
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-asyncapi-{tag}-{}", tests::suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The examples that run an `App` (standalone_outbox does not).
const APP_EXAMPLES: &[&str] = &[
    "first_outbox_app",
    "kafka_relay",
    "ordered_relay",
    "rabbitmq_relay",
    "nats_relay",
    "redis_relay",
];

/// Kills the child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// Content

#[tokio::test]
async fn channels_operations_and_servers_come_from_the_routes() {
    let doc = doc_of(&discovered_app());
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["title"], "asyncapi-test");
    assert_eq!(doc["info"]["version"], "1.2.3");
    // One channel per consumed queue and per relayed destination; the
    // outbox transport's destination is the queue's own channel.
    let ch = &doc["channels"];
    assert_eq!(ch["outbox.asyncapi.orders"]["address"], "asyncapi.orders");
    assert_eq!(
        ch["kafka.asyncapi.orders.kafka"]["address"],
        "asyncapi.orders.kafka"
    );
    assert_eq!(ch["outbox.asyncapi.audit"]["address"], "asyncapi.audit");
    assert_eq!(
        ch["kafka.asyncapi.opaque.kafka"]["address"],
        "asyncapi.opaque.kafka"
    );
    assert_eq!(ch.as_object().unwrap().len(), 5, "{ch:#}");
    assert_eq!(
        ch["kafka.asyncapi.orders.kafka"]["servers"][0]["$ref"],
        "#/servers/kafka"
    );
    assert_eq!(
        ch["outbox.asyncapi.audit"]["servers"][0]["$ref"],
        "#/servers/outbox"
    );
    // receive from the queue, send to each target.
    let name = "asyncapi__relay_order";
    let ops = &doc["operations"];
    let recv = &ops[format!("{name}.receive")];
    assert_eq!(recv["action"], "receive");
    assert_eq!(recv["channel"]["$ref"], "#/channels/outbox.asyncapi.orders");
    let sends: Vec<&str> = (0..2)
        .map(|i| {
            ops[format!("{name}.send.{i}")]["channel"]["$ref"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        sends,
        [
            "#/channels/kafka.asyncapi.orders.kafka",
            "#/channels/outbox.asyncapi.audit"
        ]
    );
    assert_eq!(ops[format!("{name}.send.0")]["action"], "send");
    assert_eq!(
        ops["asyncapi__audit.receive"]["channel"]["$ref"],
        "#/channels/outbox.asyncapi.audit"
    );
    // Operation messages point into their channel.
    let m = recv["messages"][0]["$ref"].as_str().unwrap();
    assert!(
        m.starts_with("#/channels/outbox.asyncapi.orders/messages/"),
        "{m}"
    );
    // Servers: where, never credentials.
    let servers = &doc["servers"];
    assert_eq!(servers["outbox"]["host"], "db.internal:6543");
    assert_eq!(servers["outbox"]["pathname"], "/shop");
    assert_eq!(servers["kafka"]["host"], "broker1:9092,broker2:9092");
    assert_eq!(servers["kafka"]["protocol"], "kafka");
    let text = doc.to_string();
    for secret in ["secret", "hunter2", "app:"] {
        assert!(
            !text.contains(secret),
            "`{secret}` leaked into the document"
        );
    }
    assert_eq!(doc["x-outbox"]["table"], "outbox");
    assert_eq!(doc["x-outbox"]["deadLetterTable"], "outbox_dlq");
}

#[tokio::test]
async fn messages_carry_the_envelope_headers_and_the_handler_types() {
    let doc = doc_of(&discovered_app());
    let msgs = &doc["components"]["messages"];
    let row = &msgs["asyncapi__relay_order.row"];
    let relayed = &msgs["asyncapi__relay_order.relayed"];
    // The header names are the envelope's own.
    for m in [row, relayed] {
        let props = &m["headers"]["properties"];
        assert!(props[CORRELATION_ID_HEADER].is_object(), "{m:#}");
        assert!(props["content-type"].is_object(), "{m:#}");
        assert_eq!(
            m["correlationId"]["location"],
            format!("$message.header#/{CORRELATION_ID_HEADER}")
        );
    }
    assert!(relayed["headers"]["properties"][OUTBOX_ID].is_object());
    assert!(
        row["headers"]["properties"][OUTBOX_ID].is_null(),
        "rows have no outbox-id header"
    );
    // The body and the result of `relay_order` are `Order`: its schema, with
    // the nested type as a component.
    assert_eq!(row["payload"]["$ref"], "#/components/schemas/Order");
    assert_eq!(relayed["payload"]["$ref"], "#/components/schemas/Order");
    assert!(row["x-rust-type"].as_str().unwrap().ends_with("::Order"));
    assert_eq!(row["contentType"], "application/json");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Order"]["properties"]["id"]["type"], "integer");
    assert_eq!(
        schemas["Order"]["properties"]["lines"]["items"]["$ref"],
        "#/components/schemas/Line"
    );
    assert_eq!(schemas["Line"]["properties"]["sku"]["type"], "string");
    // `Message` is not the body; `Opaque` has no schema: a placeholder
    // naming it.
    let opaque = &msgs["asyncapi__relay_opaque.row"]["payload"];
    assert!(
        opaque["x-rust-type"]
            .as_str()
            .unwrap()
            .ends_with("::Opaque"),
        "{opaque:#}"
    );
    assert!(
        opaque["description"]
            .as_str()
            .unwrap()
            .contains("no JSON Schema")
    );
    // A unit result relays nothing: `audit` has no relayed message.
    assert!(msgs["asyncapi__audit.relayed"].is_null());
}

#[tokio::test]
async fn x_outbox_shows_the_subscriber_options() {
    let doc = doc_of(&discovered_app());
    let x = &doc["operations"]["asyncapi__relay_order.receive"]["x-outbox"];
    assert_eq!(x["queues"], serde_json::json!(["asyncapi.orders"]));
    assert_eq!(x["table"], "outbox");
    assert_eq!(x["ordered"], true);
    assert_eq!(
        x["poisonPolicy"],
        format!("{:?}", PoisonPolicy::DeadLetterAndContinue)
    );
    assert_eq!(x["maxDeliveries"], 7);
    assert!(
        x["retry"].as_str().unwrap().starts_with("ConstantRetry"),
        "{x:#}"
    );
    assert_eq!(x["ackPolicy"], "NackOnError");
    // A relay gets the relay defaults (claim mode among them).
    let relay = outbox_core::SubscriberOptions::new().relay_defaults(true);
    assert_eq!(x["claimMode"], format!("{:?}", relay.get_claim_mode()));
    assert_eq!(x["maxWorkers"], relay.get_max_workers());
    let audit = &doc["operations"]["asyncapi__audit.receive"]["x-outbox"];
    let plain = outbox_core::SubscriberOptions::new();
    assert_eq!(audit["claimMode"], format!("{:?}", plain.get_claim_mode()));
    assert_eq!(audit["ordered"], false);
    assert!(audit["location"].as_str().unwrap().contains("asyncapi.rs"));
}

#[tokio::test]
async fn hand_built_routes_and_unknown_transports() {
    let route = Route::builder(["plain", "second"])
        .name("hand made")
        .payload_schema(PayloadSchema::of::<i64>())
        .reply_schema(PayloadSchema::placeholder::<Vec<u8>>())
        .publish_to("memory", "out")
        .publish_to("nowhere", "lost")
        .to(|n: i64| async move { Response::new(n) });
    let app = App::new(outbox_at("postgres://localhost/db"))
        .without_discovery()
        .subscriber(route)
        .transport(MemoryTransport::new("memory"));
    let doc = doc_of(&app);
    let ops = doc["operations"].as_object().unwrap();
    // Two queues: two receive operations; keys keep only [A-Za-z0-9._-].
    assert!(ops.contains_key("hand_made.receive"), "{ops:#?}");
    assert!(ops.contains_key("hand_made.receive.1"));
    assert_eq!(doc["channels"]["outbox.second"]["address"], "second");
    // The memory transport has no server; an unregistered one is flagged.
    assert!(doc["channels"]["memory.out"]["servers"].is_null());
    assert_eq!(
        doc["operations"]["hand_made.send.1"]["x-outbox"]["registered"],
        false
    );
    assert_eq!(
        doc["operations"]["hand_made.send.0"]["x-outbox"]["registered"],
        true
    );
    assert_eq!(
        doc["components"]["messages"]["hand_made.row"]["payload"]["type"],
        "integer"
    );
    // No routes: the same error as `run`.
    let err = App::new(outbox_at("postgres://localhost/db"))
        .without_discovery()
        .asyncapi()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("no subscribers"), "{err}");
}

#[tokio::test]
async fn json_and_yaml_render_the_same_document() {
    let doc: AsyncApi = discovered_app().asyncapi().unwrap();
    let yaml = doc.render("yaml").unwrap();
    assert!(yaml.contains("asyncapi: 3.0.0"), "{yaml}");
    let json: Value = serde_json::from_str(&doc.render("json").unwrap()).unwrap();
    assert_eq!(&json, doc.as_value());
    assert!(doc.render("xml").is_err());
}

// ---------------------------------------------------------------------------
// The official parser

#[tokio::test]
async fn the_official_parser_accepts_the_documents_of_these_apps() {
    let dir = temp_dir("apps");
    let app = discovered_app();
    let doc = app.asyncapi().unwrap();
    let json = dir.join("discovered.json");
    let yaml = dir.join("discovered.yaml");
    std::fs::write(&json, doc.to_json_pretty()).unwrap();
    std::fs::write(&yaml, doc.render("yaml").unwrap()).unwrap();
    validate(&[json, yaml]);
    // The parser does fail: a document with a dangling channel reference.
    let mut broken = doc.into_value();
    broken["operations"]["asyncapi__audit.receive"]["channel"]["$ref"] =
        "#/channels/missing".into();
    let bad = dir.join("broken.json");
    std::fs::write(&bad, broken.to_string()).unwrap();
    let out = Command::new("node")
        .arg(validator())
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the parser accepted a broken document"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `outbox docs gen -- <example>` for every example app, JSON and YAML,
/// then the parser on all of them. The examples connect to PostgreSQL (and
/// create their topics, queues, streams) before `App::run`, as in CI.
#[tokio::test]
async fn the_examples_documents_are_valid_asyncapi() {
    let bins = tests::example_binaries();
    let outbox = bins.get("outbox").expect("the outbox binary was built");
    let dir = temp_dir("examples");
    let mut files = Vec::new();
    for example in APP_EXAMPLES {
        let exe = bins
            .get(*example)
            .unwrap_or_else(|| panic!("example {example} was not built"));
        for format in ["json", "yaml"] {
            let file = dir.join(format!("{example}.{format}"));
            let out = Command::new(outbox)
                .args(["docs", "gen", "--format", format, "--timeout", "120s", "-o"])
                .arg(&file)
                .arg("--")
                .arg(exe)
                .env("DATABASE_URL", tests::database_url())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "outbox docs gen -- {example} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            files.push(file);
        }
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{example}.json"))).unwrap(),
        )
        .unwrap();
        // A channel per consumed queue, each received from.
        let queues: Vec<&str> = doc["channels"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|c| c["x-outbox"]["queue"].as_str())
            .collect();
        assert!(!queues.is_empty(), "{example}: no queue channel: {doc:#}");
        let receives = doc["operations"]
            .as_object()
            .unwrap()
            .values()
            .filter(|op| op["action"] == "receive")
            .count();
        assert!(receives >= 1, "{example}: no receive operation: {doc:#}");
        if *example != "first_outbox_app" {
            let sends = doc["operations"]
                .as_object()
                .unwrap()
                .values()
                .filter(|op| op["action"] == "send")
                .count();
            assert!(sends >= 1, "{example} relays: {doc:#}");
            assert!(
                doc["servers"].as_object().unwrap().len() >= 2,
                "{example}: {doc:#}"
            );
        }
    }
    validate(&files);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// The served page, in a real browser

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_owned();
        }
    }
    panic!(
        "no headless Chromium found: install it (Debian: apt-get install -y chromium; \
         scripts/test.sh checks it)"
    );
}

/// Starts `outbox docs serve --spec <file> --listen 127.0.0.1:0` and
/// returns it with the URL it printed.
fn serve(outbox: &Path, spec: &Path) -> (Reaped, String) {
    let mut child = Command::new(outbox)
        .args(["docs", "serve", "--listen", "127.0.0.1:0", "--spec"])
        .arg(spec)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Reaped(child);
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.split("http://").nth(1) {
            let url = format!("http://{}", rest.split_whitespace().next().unwrap());
            return (child, url);
        }
    }
    panic!("outbox docs serve printed no address");
}

#[tokio::test]
async fn the_served_page_renders_in_headless_chromium() {
    let browser = chromium();
    let bins = tests::example_binaries();
    let outbox = bins.get("outbox").expect("the outbox binary was built");
    let dir = temp_dir("serve");
    let spec = dir.join("spec.yaml");
    let doc = discovered_app().asyncapi().unwrap();
    std::fs::write(&spec, doc.render("yaml").unwrap()).unwrap();
    let (_server, url) = serve(outbox, &spec);
    let profile = dir.join("profile");
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "{browser} could not load {url}: {}\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every channel is on the page, with its address, as the browser built
    // the DOM.
    let channels = doc.as_value()["channels"].as_object().unwrap();
    assert_eq!(channels.len(), 5);
    for (key, ch) in channels {
        let address = ch["address"].as_str().unwrap();
        assert!(
            dom.contains(&format!("id=\"channel-{key}\"")),
            "channel {key} missing from the page:\n{dom}"
        );
        assert!(
            dom.contains(&format!("<h3 class=\"channel-name\">{address} ")),
            "address {address} missing from the page"
        );
    }
    // The operations, a payload schema and the x-outbox details too.
    assert!(dom.contains("asyncapi__relay_order.receive"));
    assert!(dom.contains("id=\"schema-Order\""));
    assert!(dom.contains("<th>poisonPolicy</th><td>DeadLetterAndContinue</td>"));
    // The raw documents are served too.
    let json = Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("{url}asyncapi.json"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&json.stdout).contains("\"asyncapi\": \"3.0.0\""));
    let _ = std::fs::remove_dir_all(&dir);
}
