//! `outbox docs gen` and `outbox docs serve`: the AsyncAPI document of an
//! application, read from its own binary, and an HTML page of it.
//!
//! The mechanism: `App::run` (outbox-core) writes the document and exits
//! when the environment variable `OUTBOX_ASYNCAPI` is set (to the file named
//! by `OUTBOX_ASYNCAPI_OUT`), before any startup hook runs. So `outbox docs
//! gen -- <program> [args]` runs the program with both set, and reads the
//! file; any binary built on `App` works unchanged.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::html;
use crate::output::{EXIT_USAGE, Failure, exit};

/// `outbox docs ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DocsCommand {
    /// Write the AsyncAPI 3.0 document of an application: runs PROGRAM with
    /// OUTBOX_ASYNCAPI set (App::run then writes the document and exits,
    /// connecting nothing itself), or converts --spec FILE.
    ///
    /// Example: outbox docs gen --format yaml -o asyncapi.yaml -- target/debug/my-relay
    Gen {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// Write to FILE instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        source: SpecSource,
    },
    /// Serve the AsyncAPI document as an HTML page (channels, operations,
    /// messages, payload schemas, x-outbox details; no internet needed),
    /// plus /asyncapi.json and /asyncapi.yaml, until interrupted.
    ///
    /// Example: outbox docs serve --listen 127.0.0.1:8080 -- target/debug/my-relay
    Serve {
        /// Address to listen on (port 0: any free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        source: SpecSource,
    },
}

/// Where the document comes from.
#[derive(Debug, Args)]
pub(crate) struct SpecSource {
    /// Read the document from FILE (JSON or YAML) instead of running a program.
    #[arg(long, value_name = "FILE", conflicts_with = "program")]
    spec: Option<PathBuf>,
    /// How long PROGRAM may take to write the document.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The application's binary and its arguments (after `--`); it must
    /// reach `App::run`.
    #[arg(last = true, value_name = "PROGRAM")]
    program: Vec<String>,
}

/// The formats of `docs gen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Indented JSON.
    Json,
    /// YAML.
    Yaml,
}

pub(crate) async fn run(cmd: &DocsCommand) -> Result<ExitCode, Failure> {
    match cmd {
        DocsCommand::Gen {
            format,
            output,
            source,
        } => {
            let doc = load(source).await?;
            let text = render(&doc, *format)?;
            match output {
                Some(path) => std::fs::write(path, text.as_bytes()).map_err(|e| {
                    Failure::runtime(format!("cannot write {}: {e}", path.display()))
                })?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(|e| Failure::runtime(format!("cannot write the document: {e}")))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DocsCommand::Serve { listen, source } => {
            let doc = load(source).await?;
            serve(*listen, &doc).await
        }
    }
}

fn render(doc: &Value, format: Format) -> Result<String, Failure> {
    match format {
        Format::Json => serde_json::to_string_pretty(doc)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| Failure::runtime(format!("cannot write JSON: {e}"))),
        Format::Yaml => serde_norway::to_string(doc)
            .map_err(|e| Failure::runtime(format!("cannot write YAML: {e}"))),
    }
}

/// The document, from `--spec` or from the program.
async fn load(source: &SpecSource) -> Result<Value, Failure> {
    let doc = match (&source.spec, source.program.is_empty()) {
        (Some(path), _) => read_spec(path)?,
        (None, false) => {
            let program = source.program.clone();
            let timeout = source.timeout;
            tokio::task::spawn_blocking(move || from_program(&program, timeout))
                .await
                .map_err(|e| Failure::runtime(format!("internal error: {e}")))??
        }
        (None, true) => {
            return Err(exit(
                EXIT_USAGE,
                "no application given: pass its binary after `--` (outbox docs gen -- \
                 target/debug/my-app [args]) or a document with --spec FILE",
            ));
        }
    };
    if doc.get("asyncapi").and_then(Value::as_str).is_none() {
        return Err(Failure::runtime(
            "the document has no `asyncapi` version field: not an AsyncAPI document",
        ));
    }
    Ok(doc)
}

fn read_spec(path: &Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::runtime(format!("cannot read {}: {e}", path.display())))?;
    if text.trim_start().starts_with('{') {
        serde_json::from_str(&text)
            .map_err(|e| Failure::runtime(format!("{} is not valid JSON: {e}", path.display())))
    } else {
        serde_norway::from_str(&text).map_err(|e| {
            Failure::runtime(format!("{} is not valid JSON or YAML: {e}", path.display()))
        })
    }
}

/// Runs `program` with `OUTBOX_ASYNCAPI=json` and `OUTBOX_ASYNCAPI_OUT` set;
/// its own output goes to our stderr.
fn from_program(program: &[String], timeout: Duration) -> Result<Value, Failure> {
    let dir = std::env::temp_dir();
    let out = dir.join(format!(
        "outbox-asyncapi-{}-{}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let _cleanup = RemoveOnDrop(out.clone());
    let (exe, args) = program
        .split_first()
        .ok_or_else(|| exit(EXIT_USAGE, "no program given after `--`"))?;
    let mut child = Command::new(exe)
        .args(args)
        .env(outbox_core::asyncapi::ASYNCAPI_ENV, "json")
        .env(outbox_core::asyncapi::ASYNCAPI_OUT_ENV, &out)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure::runtime(format!("cannot run {exe}: {e}")))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::runtime(format!(
                    "{exe} wrote no AsyncAPI document within {} and was stopped: does it reach \
                     App::run? (work it does before App::run, such as connecting to the \
                     database, must succeed first; --timeout raises the limit)",
                    humantime::format_duration(timeout)
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Failure::runtime(format!("waiting for {exe}: {e}"))),
        }
    };
    let mut text = String::new();
    let read = std::fs::File::open(&out).and_then(|mut f| f.read_to_string(&mut text));
    if !status.success() || read.is_err() {
        return Err(Failure::runtime(format!(
            "{exe} exited ({status}) without writing an AsyncAPI document: it must build an \
             outbox_core::App and call run() (which writes the document when \
             {} is set); see its messages above",
            outbox_core::asyncapi::ASYNCAPI_ENV
        )));
    }
    serde_json::from_str(&text)
        .map_err(|e| Failure::runtime(format!("{exe} wrote a document that is not JSON: {e}")))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves the page until Ctrl-C / SIGTERM.
async fn serve(listen: SocketAddr, doc: &Value) -> Result<ExitCode, Failure> {
    let page = html::page(doc);
    let json = render(doc, Format::Json)?;
    let yaml = render(doc, Format::Yaml)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::runtime(format!("cannot read the listening address: {e}")))?;
    eprintln!(
        "serving the AsyncAPI document on http://{addr}/ (JSON: /asyncapi.json, YAML: /asyncapi.yaml); Ctrl-C stops"
    );
    let pages = std::sync::Arc::new((page, json, yaml));
    let stop = crate::stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(ExitCode::SUCCESS),
            accepted = listener.accept() => {
                let (mut sock, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("accept failed: {e}");
                        continue;
                    }
                };
                let pages = pages.clone();
                tokio::spawn(async move {
                    let _ = respond(&mut sock, &pages).await;
                });
            }
        }
    }
}

/// One HTTP/1.x exchange: GET (or HEAD) of `/`, `/asyncapi.json` or
/// `/asyncapi.yaml`; the connection is closed after the response.
async fn respond(
    sock: &mut tokio::net::TcpStream,
    pages: &(String, String, String),
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 1024];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::other("request timed out"))??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 16 * 1024 {
            return write(
                sock,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
                false,
            )
            .await;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("/"),
    );
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return write(
            sock,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
            false,
        )
        .await;
    }
    let (page, json, yaml) = pages;
    match path {
        "/" | "/index.html" => {
            write(
                sock,
                "200 OK",
                "text/html; charset=utf-8",
                page.as_bytes(),
                head_only,
            )
            .await
        }
        "/asyncapi.json" => {
            write(
                sock,
                "200 OK",
                "application/json",
                json.as_bytes(),
                head_only,
            )
            .await
        }
        "/asyncapi.yaml" => {
            write(
                sock,
                "200 OK",
                "application/yaml",
                yaml.as_bytes(),
                head_only,
            )
            .await
        }
        _ => {
            write(
                sock,
                "404 Not Found",
                "text/plain",
                b"not found\n",
                head_only,
            )
            .await
        }
    }
}

async fn write(
    sock: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(header.as_bytes()).await?;
    if !head_only {
        sock.write_all(body).await?;
    }
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_round_trip_the_document() {
        let doc = serde_json::json!({"asyncapi": "3.0.0", "info": {"title": "t", "version": "1"}, "channels": {"a.b": {"address": "a:b"}}});
        let yaml = render(&doc, Format::Yaml)
            .map_err(|f| f.message)
            .unwrap_or_default();
        assert!(yaml.contains("asyncapi: 3.0.0"), "{yaml}");
        let back: Value = serde_norway::from_str(&yaml).unwrap_or_default();
        assert_eq!(back, doc);
    }

    #[test]
    fn a_program_that_writes_nothing_is_an_error() {
        let err = from_program(&["true".to_owned()], Duration::from_secs(5)).err();
        let msg = err.map(|f| f.message).unwrap_or_default();
        assert!(
            msg.contains("without writing an AsyncAPI document"),
            "{msg}"
        );
    }
}
