//! The module-map check of a transport crate (`layering`): the files of its
//! `src/` refer to each other without a cycle, and exactly as the module map
//! at the top of its `lib.rs` says. Each transport crate runs it from a test:
//!
//! ```no_run
//! // outbox-<bus>/tests/layering.rs
//! #[test]
//! fn the_files_of_src_form_no_cycle_and_follow_the_module_map() {
//!     outbox_conformance::layering::assert_module_map(env!("CARGO_MANIFEST_DIR"));
//! }
//! ```
//!
//! The map is the leading `//` comment of `lib.rs`: entries
//! `//   name.rs  what it holds [uses a, b]`, each continued on the lines
//! indented further below it, listed from the foundations up (a file uses
//! only files above it).
//!
//! A file refers to another by `crate::<module>`, `super::<module>` (both
//! also inside `use crate::{..}` groups), or `crate::<Item>` where `lib.rs`
//! re-exports `Item` from that module. Any other `crate::<Item>` is an item of
//! the crate root, and counts as a reference to `lib.rs`; `pub use
//! <other crate>;` in `lib.rs` is not a file. Comments (doc comments and
//! their examples included) and string literals are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A file's name without `.rs` (`lib` is the crate root).
type Module = String;

/// Each file and the other files it refers to.
type Graph = BTreeMap<Module, BTreeSet<Module>>;

/// `src` with comments and string and character literals replaced by
/// spaces: what is left is code.
fn code_only(src: &str) -> String {
    let s: Vec<char> = src.chars().collect();
    let at = |i: usize| s.get(i).copied().unwrap_or('\0');
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let before = if i == 0 { ' ' } else { s[i - 1] };
        if c == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == 'r' && !ident(before) && matches!(at(i + 1), '"' | '#') {
            // A raw string r"..", r#".."#, ..: ends at `"` and as many `#`.
            let hashes = (i + 1..s.len()).take_while(|&j| s[j] == '#').count();
            if at(i + 1 + hashes) != '"' {
                out.push(c);
                i += 1;
                continue;
            }
            i += hashes + 2;
            while i < s.len() && !(s[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#')) {
                i += 1;
            }
            i += hashes + 1;
        } else if c == '\'' && at(i + 1) == '\\' {
            i += 2;
            while i < s.len() && s[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && at(i + 2) == '\'' {
            i += 3;
        } else {
            // Code, a lifetime's quote included.
            out.push(c);
            i += 1;
            continue;
        }
        out.push(' ');
    }
    out
}

/// `code` as identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut word = c.to_string();
            while let Some(&n) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                word.push(n);
                chars.next();
            }
            out.push(word);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.push("::".to_owned());
        } else if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    out
}

/// The crate layout as `lib.rs` declares it: its modules, and which module
/// each item it re-exports comes from.
struct Root {
    modules: BTreeSet<Module>,
    reexported_from: BTreeMap<String, Module>,
    external: BTreeSet<String>,
}

impl Root {
    /// Reads the `use` statements (`pub use m::{..};`) of `lib.rs`'s code;
    /// `modules` are the files next to it.
    fn new(lib: &[String], modules: BTreeSet<Module>) -> Self {
        let mut reexported_from = BTreeMap::new();
        let mut external = BTreeSet::new();
        for (i, t) in lib.iter().enumerate() {
            if t != "use" {
                continue;
            }
            let mut statement: Vec<&String> =
                lib[i + 1..].iter().take_while(|t| *t != ";").collect();
            if statement.len() > 1 && matches!(statement[0].as_str(), "crate" | "self") {
                statement.drain(..2);
            }
            let Some(first) = statement.first().map(|t| t.to_string()) else {
                continue;
            };
            if !modules.contains(&first) {
                // `pub use rdkafka;`: another crate, not a file of this one.
                external.insert(first);
                continue;
            }
            let names = statement.iter().skip(1);
            for name in names.filter(|t| is_ident(t) && !matches!(t.as_str(), "as" | "self")) {
                reexported_from.insert(name.to_string(), first.clone());
            }
        }
        Self {
            modules,
            reexported_from,
            external,
        }
    }

    /// The file `crate::<name>` is in.
    fn resolve(&self, name: &str) -> Option<Module> {
        if self.modules.contains(name) {
            Some(name.to_owned())
        } else if let Some(module) = self.reexported_from.get(name) {
            Some(module.clone())
        } else if self.external.contains(name) || name == "self" {
            None
        } else {
            Some("lib".to_owned())
        }
    }
}

fn is_ident(t: &str) -> bool {
    t.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// The names right after `crate::` / `super::` in `tokens`: one name, or
/// the first name of each entry of a `{..}` group. Each comes with the
/// prefix it followed.
fn paths(tokens: &[String]) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let (Some(sep), Some(next)) = (tokens.get(i + 1), tokens.get(i + 2)) else {
            continue;
        };
        if !matches!(t.as_str(), "crate" | "super") || sep != "::" {
            continue;
        }
        if next != "{" {
            out.push((t.as_str(), next.as_str()));
            continue;
        }
        let mut depth = 0;
        let mut entry_start = true;
        for u in &tokens[i + 2..] {
            match u.as_str() {
                "{" => {
                    depth += 1;
                    entry_start = depth == 1;
                }
                "}" => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                "," if depth == 1 => entry_start = true,
                name if entry_start && depth == 1 => {
                    out.push((t.as_str(), name));
                    entry_start = false;
                }
                _ => {}
            }
        }
    }
    out
}

/// Which files each file refers to, from each file's source text. `lib`
/// refers to every module it declares.
fn graph(sources: &BTreeMap<Module, String>) -> Graph {
    let tokens: BTreeMap<&Module, Vec<String>> = sources
        .iter()
        .map(|(m, src)| (m, self::tokens(&code_only(src))))
        .collect();
    let modules: BTreeSet<Module> = sources.keys().filter(|m| *m != "lib").cloned().collect();
    let lib = tokens.get(&"lib".to_owned()).cloned().unwrap_or_default();
    let root = Root::new(&lib, modules.clone());
    let mut graph = Graph::new();
    for (module, tokens) in &tokens {
        let uses = graph.entry((*module).clone()).or_default();
        for (prefix, name) in paths(tokens) {
            let target = match prefix {
                "crate" => root.resolve(name),
                // `super::x` names a file only when x is one: elsewhere it is
                // an item of the file around a nested module (`mod tests`).
                _ => modules.contains(name).then(|| name.to_owned()),
            };
            uses.extend(target.filter(|t| t != *module));
        }
    }
    let declared = lib
        .windows(2)
        .filter(|w| w[0] == "mod")
        .map(|w| w[1].clone());
    graph.entry("lib".to_owned()).or_default().extend(declared);
    graph
}

/// The files in an order where each comes after the files it refers to, or
/// a cycle (its files, the first repeated at the end).
fn order(graph: &Graph) -> Result<Vec<Module>, Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        m: &Module,
        graph: &Graph,
        marks: &mut BTreeMap<Module, Mark>,
        path: &mut Vec<Module>,
        out: &mut Vec<Module>,
    ) -> Result<(), Vec<Module>> {
        match marks.get(m) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Open) => {
                let start = path.iter().position(|p| p == m).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(m.clone());
                return Err(cycle);
            }
            None => {}
        }
        marks.insert(m.clone(), Mark::Open);
        path.push(m.clone());
        for dep in graph.get(m).into_iter().flatten() {
            visit(dep, graph, marks, path, out)?;
        }
        path.pop();
        marks.insert(m.clone(), Mark::Done);
        out.push(m.clone());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        visit(m, graph, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// The module map in the leading `//` comment of `lib.rs`, in order: its
/// entries `//   name.rs  what it holds [uses a, b]`, each continued on the
/// lines indented further below it.
fn module_map(lib: &str) -> Vec<(Module, BTreeSet<Module>)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut open = false;
    for line in lib
        .lines()
        .take_while(|l| l.starts_with("//") && !l.starts_with("//!"))
    {
        let text = &line[2..];
        let indent = text.len() - text.trim_start().len();
        match entries.last_mut() {
            Some((_, rest)) if open && indent > 3 => {
                rest.push(' ');
                rest.push_str(text.trim());
            }
            _ if indent == 3 => {
                let (file, rest) = text
                    .trim()
                    .split_once(char::is_whitespace)
                    .unwrap_or((text.trim(), ""));
                entries.push((file.to_owned(), rest.trim().to_owned()));
                open = true;
            }
            _ => open = false,
        }
    }
    entries
        .into_iter()
        .filter_map(|(file, rest)| {
            let module = file.strip_suffix(".rs")?;
            let uses = match rest.rsplit_once("[uses ") {
                Some((_, list)) => list
                    .trim_end()
                    .trim_end_matches(']')
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .collect(),
                None => BTreeSet::new(),
            };
            Some((module.to_owned(), uses))
        })
        .collect()
}

/// Everything wrong with `graph` against the map, one line each.
fn map_errors(map: &[(Module, BTreeSet<Module>)], graph: &Graph) -> Vec<String> {
    let mut errors = Vec::new();
    let listed: Vec<&Module> = map.iter().map(|(m, _)| m).collect();
    for m in graph.keys().filter(|m| !listed.contains(m)) {
        errors.push(format!("{m}.rs is missing from the module map"));
    }
    for (i, (m, documented)) in map.iter().enumerate() {
        let Some(actual) = graph.get(m) else {
            errors.push(format!("the module map lists {m}.rs, which does not exist"));
            continue;
        };
        if m == "lib" {
            continue;
        }
        if actual != documented {
            errors.push(format!(
                "{m}.rs uses [{}], the module map says [{}]",
                actual.iter().cloned().collect::<Vec<_>>().join(", "),
                documented.iter().cloned().collect::<Vec<_>>().join(", "),
            ));
        }
        let above: Vec<&Module> = map[..i].iter().map(|(m, _)| m).collect();
        for dep in actual.iter().filter(|d| !above.contains(d)) {
            errors.push(format!(
                "{m}.rs uses {dep}.rs, which the module map lists below it"
            ));
        }
    }
    errors
}

/// Checks the crate at `manifest_dir` (its `src/` files and the module map
/// of its `lib.rs`); panics with every discrepancy, one per line, or with the
/// cycle.
///
/// # Panics
///
/// When the files refer to each other in a cycle, when the code and the map
/// disagree, or when `src/` cannot be read or holds a folder.
pub fn assert_module_map(manifest_dir: impl AsRef<Path>) {
    if let Err(e) = check_module_map(manifest_dir.as_ref()) {
        panic!("{e}");
    }
}

/// [`assert_module_map`]'s check, returning what is wrong instead of
/// panicking.
pub fn check_module_map(manifest_dir: &Path) -> Result<(), String> {
    let src = manifest_dir.join("src");
    let mut sources = BTreeMap::new();
    let entries = std::fs::read_dir(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", src.display()))?.path();
        if path.is_dir() {
            return Err(format!(
                "{}: this check reads only the files directly in src/; extend it for folders",
                path.display()
            ));
        }
        if let Some(module) = path
            .file_stem()
            .filter(|_| path.extension().is_some_and(|e| e == "rs"))
        {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            sources.insert(module.to_string_lossy().into_owned(), text);
        }
    }
    let Some(lib) = sources.get("lib") else {
        return Err(format!("{}: no lib.rs", src.display()));
    };
    let graph = graph(&sources);
    if let Err(cycle) = order(&graph) {
        return Err(format!(
            "the files of src/ refer to each other in a cycle: {} (see the module map in lib.rs)",
            cycle.join(" -> ")
        ));
    }
    let errors = map_errors(&module_map(lib), &graph);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "update the code or the module map in lib.rs:\n{}",
            errors.join("\n")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_sees_references_in_code_only_and_names_a_cycle() {
        let files = |list: &[(&str, &str)]| -> BTreeMap<Module, String> {
            list.iter()
                .map(|(m, s)| ((*m).to_owned(), (*s).to_owned()))
                .collect()
        };
        let sources = files(&[
            (
                "lib",
                "mod a; mod b; mod c; pub use rdkafka; pub use c::{Thing, Other as O};
                 pub use crate::error::Fault;",
            ),
            ("a", "use crate::{b::X, error};\n// crate::c in a comment\n"),
            (
                "b",
                "/* crate::a /* nested */ crate::a */ fn f() -> crate::Fault { crate::O::new() }",
            ),
            (
                "c",
                r##"const S: &str = "crate::a \" crate::a"; const R: &str = r#"crate::a"#;
                 const Q: char = '"'; fn g<'a>(_: &'a str) { crate::rdkafka::x(); super::error::y() }"##,
            ),
            ("error", "mod tests { use super::*; use super::Helper; }"),
        ]);
        let graph = graph(&sources);
        let edges = |m: &str| graph[m].iter().map(String::as_str).collect::<Vec<_>>();
        assert_eq!(edges("a"), ["b", "error"]);
        assert_eq!(
            edges("b"),
            ["c", "error"],
            "lib.rs re-exports O from c, Fault from error"
        );
        assert_eq!(edges("c"), ["error"]);
        assert!(edges("error").is_empty());
        assert_eq!(edges("lib"), ["a", "b", "c", "error"]);
        let order = order(&graph).expect("no cycle");
        assert_eq!(order, ["error", "c", "b", "a", "lib"]);

        // c -> a closes a -> b -> c -> a; so does c -> lib (an item of the root).
        let mut cyclic = sources.clone();
        cyclic.insert("c".into(), "use crate::a::Y;".into());
        assert_eq!(
            super::order(&super::graph(&cyclic)),
            Err(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        cyclic.insert("c".into(), "fn h() { crate::root_item() }".into());
        let cycle = super::order(&super::graph(&cyclic)).expect_err("c uses the root");
        assert_eq!(cycle.join(" -> "), "a -> b -> c -> lib -> a");
    }

    #[test]
    fn the_module_map_is_compared_with_the_code() {
        let lib = "\
// Module map:
//
//   c.rs   leaf
//   b.rs   middle [uses c]
//   a.rs   top, its line
//          wrapped [uses b,
//          c]
// prose
//      not an entry [uses d]
//   lib.rs root
//! docs
//   x.rs after the map
";
        let map = module_map(lib);
        let names: Vec<&str> = map.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(names, ["c", "b", "a", "lib"]);
        let graph: Graph = [
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["b"]),
            ("d", vec![]),
            ("lib", vec!["a", "b", "c", "d"]),
        ]
        .into_iter()
        .map(|(m, uses)| (m.to_owned(), uses.into_iter().map(str::to_owned).collect()))
        .collect();
        assert_eq!(
            map_errors(&map, &graph),
            [
                "d.rs is missing from the module map",
                "c.rs uses [b], the module map says []",
                "c.rs uses b.rs, which the module map lists below it",
                "a.rs uses [b], the module map says [b, c]",
            ]
        );
    }
}
