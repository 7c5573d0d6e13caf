//! The layering of `outbox-core/src` (see the module map in `lib.rs`): every
//! `crate::…` / `super::…` path a source file uses (in `use` lines and
//! inline, doc comments aside) must lead to the file's own layer or to one
//! that [`LAYERS`] lets it use. A failure names the file, the line, the path
//! and the forbidden edge.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The layers, bottom first, and the layers each may use besides itself.
/// Every layer may use only layers listed before it (checked), so the
/// dependencies point one way. `lib.rs` is the crate's façade (module
/// declarations and public re-exports) and is not a layer.
const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("envelope", &["error"]),
    ("otel", &["envelope", "error"]),
    ("instrument", &["error"]),
    ("store", &["envelope", "error"]),
    ("inbox", &["store", "error"]),
    ("publish", &["store", "otel", "envelope", "error"]),
    (
        "broker",
        &["publish", "store", "instrument", "envelope", "error"],
    ),
    (
        "publisher",
        &["broker", "publish", "store", "envelope", "error"],
    ),
    (
        "transport",
        &["broker", "publish", "store", "envelope", "error"],
    ),
    (
        "engine",
        &[
            "transport",
            "broker",
            "publish",
            "store",
            "instrument",
            "otel",
            "envelope",
            "error",
        ],
    ),
    ("ops", &["broker", "publish", "store", "envelope", "error"]),
    (
        "app",
        &[
            "engine",
            "ops",
            "transport",
            "publisher",
            "broker",
            "publish",
            "store",
            "instrument",
            "otel",
            "envelope",
            "error",
        ],
    ),
    (
        "testing",
        &[
            "app",
            "engine",
            "ops",
            "transport",
            "publisher",
            "broker",
            "publish",
            "store",
            "instrument",
            "otel",
            "envelope",
            "error",
        ],
    ),
    // The public metrics module: re-exports of `instrument` and of the
    // engine's one-shot gauge sampler, nothing of its own.
    ("telemetry", &["engine", "instrument"]),
];

/// Known edges against the layering, each with its reason: `(file, path
/// prefix after crate::, why)`. Each must still occur (a stale entry fails),
/// so an entry goes away with the code that needed it.
const EXCEPTIONS: &[(&str, &str, &str)] = &[];

fn allowed(layer: &str) -> Option<&'static [&'static str]> {
    LAYERS.iter().find(|(l, _)| *l == layer).map(|(_, a)| *a)
}

/// The layer of a file, from its path under `src/`.
fn layer_of(rel: &str) -> Option<&'static str> {
    let first = rel.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().map(|(l, _)| *l).find(|l| *l == name)
}

/// The module path of a file (`engine/worker.rs` -> `engine::worker`,
/// `store/mod.rs` -> `store`).
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// One use of a crate path.
#[derive(Debug)]
struct Edge {
    line: usize,
    /// As written (`crate::store::conn`, `super::row::OutboxRow`).
    written: String,
    /// Resolved from the crate root (`store::conn`).
    resolved: Vec<String>,
}

/// `line` without string and character literal contents and without a
/// trailing `//` comment.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            // A character literal ('"', '\'', '{'); a lifetime has no closing quote.
            '\'' => {
                let ahead: Vec<char> = chars.clone().take(3).collect();
                let skip = match ahead.as_slice() {
                    ['\\', _, '\'', ..] => 3,
                    [_, '\'', ..] => 2,
                    _ => 0,
                };
                for _ in 0..skip {
                    chars.next();
                }
                out.push('\'');
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Skips spaces and an ` as name` after a path of a `use` tree.
fn skip_alias(s: &[char], i: &mut usize) {
    while *i < s.len() && s[*i] == ' ' {
        *i += 1;
    }
    if s[*i..].starts_with(&['a', 's', ' ']) {
        *i += 3;
        while *i < s.len() && (s[*i] == ' ' || is_ident(s[*i])) {
            *i += 1;
        }
    }
}

/// The paths of a `use` tree or an inline path starting at `s` (just after
/// `crate::` / `super::`): `a::b`, `a::{b, c::d}`, `{a, b}`.
fn paths_at(s: &str) -> Vec<Vec<String>> {
    fn tree(s: &[char], i: &mut usize) -> Vec<Vec<String>> {
        let mut prefix = Vec::new();
        loop {
            while *i < s.len() && s[*i] == ' ' {
                *i += 1;
            }
            if *i < s.len() && s[*i] == '{' {
                *i += 1;
                let mut out = Vec::new();
                loop {
                    for mut p in tree(s, i) {
                        let mut full = prefix.clone();
                        full.append(&mut p);
                        out.push(full);
                    }
                    skip_alias(s, i);
                    match s.get(*i) {
                        Some(',') => *i += 1,
                        Some('}') => {
                            *i += 1;
                            return out;
                        }
                        _ => return out,
                    }
                    while *i < s.len() && s[*i] == ' ' {
                        *i += 1;
                    }
                    if s.get(*i) == Some(&'}') {
                        *i += 1;
                        return out;
                    }
                }
            }
            let start = *i;
            while *i < s.len() && is_ident(s[*i]) {
                *i += 1;
            }
            if *i == start {
                return vec![prefix];
            }
            prefix.push(s[start..*i].iter().collect());
            if s.get(*i) == Some(&':') && s.get(*i + 1) == Some(&':') {
                *i += 2;
            } else {
                return vec![prefix];
            }
        }
    }
    let chars: Vec<char> = s.chars().collect();
    tree(&chars, &mut 0)
}

/// Every `crate::` / `$crate::` / `super::` path in `src` (a file at module
/// path `module`), resolved from the crate root. Doc comments and comments
/// are skipped; an inline `mod name {` at the start of a line (such as
/// `mod tests`) is followed until its closing `}` at the start of a line.
fn edges(src: &str, module: &[String]) -> Vec<Edge> {
    let mut out = Vec::new();
    let mut inline: Vec<String> = Vec::new();
    // `use` trees spanning several lines are joined before they are parsed.
    let mut pending: Option<(usize, String)> = None;
    for (n, raw) in src.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let code = code_of(raw);
        if raw.starts_with('}') && !inline.is_empty() {
            inline.pop();
        }
        let head = code
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub ");
        if let Some(rest) = head.strip_prefix("mod ")
            && code.trim_end().ends_with('{')
            && !raw.starts_with(' ')
        {
            inline.push(rest.trim_end_matches(['{', ' ']).to_owned());
        }
        let (line_no, text) = match pending.take() {
            Some((l, mut acc)) => {
                acc.push(' ');
                acc.push_str(code.trim());
                (l, acc)
            }
            None => (n + 1, code.clone()),
        };
        let is_use = text
            .trim_start()
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ")
            .starts_with("use ");
        if is_use && text.matches('{').count() > text.matches('}').count() {
            pending = Some((line_no, text));
            continue;
        }
        let mut here: Vec<String> = module.to_vec();
        here.extend(inline.iter().cloned());
        scan(&text, line_no, &here, &mut out);
    }
    out
}

fn scan(text: &str, line: usize, here: &[String], out: &mut Vec<Edge>) {
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..].iter().collect();
        let preceded_ok = i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == ':');
        let kw = ["crate::", "super::"]
            .into_iter()
            .find(|k| rest.starts_with(k));
        let Some(kw) = kw.filter(|_| preceded_ok) else {
            i += 1;
            continue;
        };
        // Count `super::super::…`.
        let mut base: Vec<String> = if kw == "crate::" {
            Vec::new()
        } else {
            here.to_vec()
        };
        let mut j = i;
        if kw == "super::" {
            while bytes[j..].iter().collect::<String>().starts_with("super::") {
                base.pop();
                j += "super::".len();
            }
        } else {
            j += kw.len();
        }
        let after: String = bytes[j..].iter().collect();
        for p in paths_at(&after) {
            let mut resolved = base.clone();
            resolved.extend(p.iter().filter(|s| s.as_str() != "self").cloned());
            let shown = if kw == "crate::" {
                format!("crate::{}", p.join("::"))
            } else {
                format!("{}{}", "super::".repeat((j - i) / 7), p.join("::"))
            };
            out.push(Edge {
                line,
                written: shown,
                resolved,
            });
        }
        i = j;
    }
}

/// Every violation in `files` (`(path under src/, source)`), and the
/// exceptions that were used.
fn check(files: &[(String, String)]) -> (Vec<String>, BTreeSet<usize>) {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (rel, src) in files {
        if rel == "lib.rs" {
            continue;
        }
        let Some(layer) = layer_of(rel) else {
            problems.push(format!(
                "src/{rel}: not in any layer; add it to LAYERS in tests/layers.rs (and to the \
                 module map in lib.rs)"
            ));
            continue;
        };
        let ok = allowed(layer).unwrap_or(&[]);
        for e in edges(src, &module_of(rel)) {
            let Some(first) = e.resolved.first() else {
                continue;
            };
            let Some(target) = layer_of(&format!("{first}.rs")) else {
                problems.push(format!(
                    "src/{rel}:{}: `{}` goes through the crate root (`{first}` is not a layer \
                     module): use the path of the module that defines it, so the layering \
                     can be checked",
                    e.line, e.written
                ));
                continue;
            };
            if target == layer || ok.contains(&target) {
                continue;
            }
            let joined = e.resolved.join("::");
            if let Some(k) = EXCEPTIONS
                .iter()
                .position(|(f, prefix, _)| f == rel && joined.starts_with(prefix))
            {
                used.insert(k);
                continue;
            }
            problems.push(format!(
                "src/{rel}:{}: {layer} -> {target} (`{}`) is not allowed; {layer} may use {}",
                e.line,
                e.written,
                if ok.is_empty() {
                    "nothing else".to_owned()
                } else {
                    ok.join(", ")
                }
            ));
        }
    }
    (problems, used)
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sources(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p
                .strip_prefix(root)
                .expect("under src/")
                .to_string_lossy()
                .replace('\\', "/");
            let src = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            out.push((rel, src));
        }
    }
}

#[test]
fn the_table_points_one_way() {
    for (i, (layer, deps)) in LAYERS.iter().enumerate() {
        for d in *deps {
            let j = LAYERS.iter().position(|(l, _)| l == d);
            assert!(
                j.is_some_and(|j| j < i),
                "{layer} may use {d}, which is not a layer listed before it"
            );
        }
    }
}

#[test]
fn every_dependency_goes_to_the_same_or_a_lower_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    assert!(files.len() > 30, "found only {} files", files.len());
    let (problems, used) = check(&files);
    let mut msg = String::new();
    for p in &problems {
        let _ = writeln!(msg, "  {p}");
    }
    for (k, (file, prefix, why)) in EXCEPTIONS.iter().enumerate() {
        if !used.contains(&k) {
            let _ = writeln!(
                msg,
                "  stale exception: src/{file} no longer uses crate::{prefix}… ({why}); \
                 remove it from EXCEPTIONS"
            );
        }
    }
    assert!(msg.is_empty(), "layering violations:\n{msg}");
}

#[test]
fn the_check_catches_upward_and_root_paths() {
    let files = vec![
        (
            "store/conn.rs".to_owned(),
            "use crate::error::Error;\n/// [`crate::engine::Engine`] in a doc comment is fine.\nuse crate::engine::{Engine, store};\n".to_owned(),
        ),
        (
            "ops/dlq.rs".to_owned(),
            "use super::{Arg, Clause};\nfn f() -> crate::Result<()> { crate::app::run() }\n"
                .to_owned(),
        ),
        (
            "engine/worker.rs".to_owned(),
            "use crate::transport::BusRejection;\n#[cfg(test)]\nmod tests {\n    use super::super::super::ops::DlqFilter;\n}\n".to_owned(),
        ),
        ("newlayer.rs".to_owned(), String::new()),
    ];
    let (problems, _) = check(&files);
    let expect = [
        "src/store/conn.rs:3: store -> engine (`crate::engine::Engine`)",
        "src/store/conn.rs:3: store -> engine (`crate::engine::store`)",
        "src/ops/dlq.rs:2: `crate::Result` goes through the crate root",
        "src/ops/dlq.rs:2: ops -> app (`crate::app::run`)",
        "src/engine/worker.rs:4: engine -> ops (`super::super::super::ops::DlqFilter`)",
        "src/newlayer.rs: not in any layer",
    ];
    for e in expect {
        assert!(
            problems.iter().any(|p| p.starts_with(e)),
            "expected a problem starting with {e:?}, got {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}
