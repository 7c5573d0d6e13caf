//! The HTML page of an AsyncAPI 3.0 document (`outbox docs serve`): one
//! self-contained page (inline CSS, no script, no external asset), with the
//! servers, channels, operations, messages (headers and payload schemas)
//! and the `x-outbox` details; `$ref`s are links within the page.

use std::fmt::Write as _;

use serde_json::{Map, Value};

const STYLE: &str = r#"
:root { --fg: #1d2330; --muted: #5b6475; --line: #d8dde6; --bg: #f6f8fb; --accent: #1f5fbf; --recv: #1d7a46; --send: #9a4d00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: #fff; }
header { padding: 24px 32px; background: var(--bg); border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 26px; }
header .meta { color: var(--muted); }
nav { padding: 8px 32px; border-bottom: 1px solid var(--line); position: sticky; top: 0; background: #fff; }
nav a { margin-right: 18px; }
main { padding: 8px 32px 48px; max-width: 1200px; }
h2 { margin-top: 36px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
section.item { border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin: 14px 0; }
section.item h3 { margin: 0 0 6px; font-size: 18px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 4px; padding: 10px; overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 700; text-transform: uppercase; color: #fff; vertical-align: middle; }
.receive { background: var(--recv); } .send { background: var(--send); }
.muted { color: var(--muted); }
.id { color: var(--muted); font-weight: normal; font-size: 14px; }
"#;

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page's anchor of a local `$ref` (`#/channels/x` -> `channel-x`).
fn anchor_of(reference: &str) -> Option<String> {
    let path = reference.strip_prefix("#/")?;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["servers", name] => Some(format!("server-{name}")),
        ["channels", name] => Some(format!("channel-{name}")),
        ["channels", _, "messages", msg] | ["components", "messages", msg] => {
            Some(format!("message-{msg}"))
        }
        ["operations", name] => Some(format!("operation-{name}")),
        ["components", "schemas", name] => Some(format!("schema-{name}")),
        _ => None,
    }
}

/// A CommonMark description as the page shows it: escaped, with `code`
/// spans (the only markup the generated documents use) rendered.
fn md(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", esc(part));
        } else {
            out.push_str(&esc(part));
        }
    }
    out
}

/// A link to a `$ref`, labelled with its last segment.
fn ref_link(reference: &str) -> String {
    let label = reference.rsplit('/').next().unwrap_or(reference);
    match anchor_of(reference) {
        Some(a) => format!("<a href=\"#{}\">{}</a>", esc(&a), esc(label)),
        None => format!("<code>{}</code>", esc(reference)),
    }
}

fn reference(v: &Value) -> Option<&str> {
    v.get("$ref").and_then(Value::as_str)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A JSON value, indented, with `$ref` values as links.
fn json_html(v: &Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent + 1);
    let end = "  ".repeat(indent);
    match v {
        Value::Object(m) if m.is_empty() => out.push_str("{}"),
        Value::Object(m) => {
            out.push_str("{\n");
            for (i, (k, val)) in m.iter().enumerate() {
                let _ = write!(out, "{pad}\"{}\": ", esc(k));
                match (k.as_str(), val.as_str()) {
                    ("$ref", Some(r)) => {
                        let _ = write!(out, "\"{}\"", ref_link_full(r));
                    }
                    _ => json_html(val, indent + 1, out),
                }
                if i + 1 < m.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            let _ = write!(out, "{end}}}");
        }
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, val) in a.iter().enumerate() {
                out.push_str(&pad);
                json_html(val, indent + 1, out);
                if i + 1 < a.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            let _ = write!(out, "{end}]");
        }
        other => out.push_str(&esc(&other.to_string())),
    }
}

fn ref_link_full(reference: &str) -> String {
    match anchor_of(reference) {
        Some(a) => format!("<a href=\"#{}\">{}</a>", esc(&a), esc(reference)),
        None => esc(reference),
    }
}

fn pre_json(v: &Value) -> String {
    let mut s = String::from("<pre>");
    json_html(v, 0, &mut s);
    s.push_str("</pre>");
    s
}

/// `x-outbox` (or any flat object) as a two-column table.
fn details_table(v: &Value) -> String {
    let Some(m) = v.as_object() else {
        return String::new();
    };
    let mut s = String::from("<table class=\"x-outbox\"><tbody>");
    for (k, val) in m {
        let shown = match val {
            Value::String(t) => esc(t),
            Value::Null => "<span class=\"muted\">none</span>".to_owned(),
            Value::Array(a) => a
                .iter()
                .map(|x| esc(x.as_str().map_or(&x.to_string(), |t| t)))
                .collect::<Vec<_>>()
                .join(", "),
            other => esc(&other.to_string()),
        };
        let _ = write!(s, "<tr><th>{}</th><td>{shown}</td></tr>", esc(k));
    }
    s.push_str("</tbody></table>");
    s
}

fn object<'a>(doc: &'a Value, key: &str) -> Option<&'a Map<String, Value>> {
    doc.get(key).and_then(Value::as_object)
}

/// Follows a local `$ref` inside `doc` (one level).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let Some(r) = reference(v) else { return v };
    let Some(path) = r.strip_prefix('#') else {
        return v;
    };
    doc.pointer(path).map_or(v, |target| resolve(doc, target))
}

/// The whole page.
pub(crate) fn page(doc: &Value) -> String {
    let info = doc.get("info").cloned().unwrap_or(Value::Null);
    let title = match text(&info, "title") {
        "" => "AsyncAPI document",
        t => t,
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} – AsyncAPI</title><style>{STYLE}</style></head><body>",
        esc(title)
    );
    let _ = write!(
        s,
        "<header><h1>{}</h1><div class=\"meta\">version {} · AsyncAPI {} · default content type <code>{}</code></div><p>{}</p></header>",
        esc(title),
        esc(text(&info, "version")),
        esc(text(doc, "asyncapi")),
        esc(text(doc, "defaultContentType")),
        md(text(&info, "description")),
    );
    s.push_str(
        "<nav><a href=\"#servers\">Servers</a><a href=\"#channels\">Channels</a>\
         <a href=\"#operations\">Operations</a><a href=\"#messages\">Messages</a>\
         <a href=\"#schemas\">Schemas</a><a href=\"asyncapi.json\">asyncapi.json</a>\
         <a href=\"asyncapi.yaml\">asyncapi.yaml</a></nav><main>",
    );
    if let Some(x) = doc.get("x-outbox") {
        s.push_str("<h2 id=\"outbox\">Outbox</h2>");
        s.push_str(&details_table(x));
    }
    servers(doc, &mut s);
    channels(doc, &mut s);
    operations(doc, &mut s);
    messages(doc, &mut s);
    schemas(doc, &mut s);
    s.push_str("</main></body></html>\n");
    s
}

fn servers(doc: &Value, s: &mut String) {
    s.push_str("<h2 id=\"servers\">Servers</h2>");
    let Some(servers) = object(doc, "servers").filter(|m| !m.is_empty()) else {
        s.push_str("<p class=\"muted\">none</p>");
        return;
    };
    s.push_str("<table><thead><tr><th>name</th><th>protocol</th><th>host</th><th>path</th><th>description</th></tr></thead><tbody>");
    for (name, v) in servers {
        let _ = write!(
            s,
            "<tr id=\"server-{}\"><td><b>{}</b></td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
            esc(name),
            esc(name),
            esc(text(v, "protocol")),
            esc(text(v, "host")),
            esc(text(v, "pathname")),
            md(text(v, "description")),
        );
    }
    s.push_str("</tbody></table>");
}

fn channels(doc: &Value, s: &mut String) {
    s.push_str("<h2 id=\"channels\">Channels</h2>");
    let Some(channels) = object(doc, "channels").filter(|m| !m.is_empty()) else {
        s.push_str("<p class=\"muted\">none</p>");
        return;
    };
    let ops = object(doc, "operations");
    for (key, ch) in channels {
        let address = match text(ch, "address") {
            "" => key.as_str(),
            a => a,
        };
        let _ = write!(
            s,
            "<section class=\"item channel\" id=\"channel-{}\"><h3 class=\"channel-name\">{} <span class=\"id\">{}</span></h3><p>{}</p>",
            esc(key),
            esc(address),
            esc(key),
            md(text(ch, "description")),
        );
        if let Some(list) = ch.get("servers").and_then(Value::as_array) {
            let links: Vec<String> = list.iter().filter_map(reference).map(ref_link).collect();
            let _ = write!(s, "<p>servers: {}</p>", links.join(", "));
        }
        if let Some(msgs) = ch.get("messages").and_then(Value::as_object) {
            let links: Vec<String> = msgs
                .iter()
                .map(|(k, m)| reference(m).map_or_else(|| esc(k), ref_link))
                .collect();
            let _ = write!(s, "<p>messages: {}</p>", links.join(", "));
        }
        if let Some(ops) = ops {
            let target = format!("#/channels/{key}");
            let on: Vec<String> = ops
                .iter()
                .filter(|(_, op)| op.get("channel").and_then(reference) == Some(target.as_str()))
                .map(|(id, op)| {
                    let action = text(op, "action");
                    format!(
                        "<span class=\"badge {}\">{}</span> <a href=\"#operation-{}\">{}</a>",
                        esc(action),
                        esc(action),
                        esc(id),
                        esc(id)
                    )
                })
                .collect();
            if !on.is_empty() {
                let _ = write!(s, "<p>operations: {}</p>", on.join(" · "));
            }
        }
        if let Some(x) = ch.get("x-outbox") {
            s.push_str(&details_table(x));
        }
        s.push_str("</section>");
    }
}

fn operations(doc: &Value, s: &mut String) {
    s.push_str("<h2 id=\"operations\">Operations</h2>");
    let Some(ops) = object(doc, "operations").filter(|m| !m.is_empty()) else {
        s.push_str("<p class=\"muted\">none</p>");
        return;
    };
    for (id, op) in ops {
        let action = text(op, "action");
        let channel = op.get("channel").and_then(reference).unwrap_or_default();
        let address = text(
            resolve(doc, op.get("channel").unwrap_or(&Value::Null)),
            "address",
        );
        let _ = write!(
            s,
            "<section class=\"item operation\" id=\"operation-{}\"><h3><span class=\"badge {}\">{}</span> {} <span class=\"id\">{}</span></h3><p>{}</p><p>channel: {} (<code>{}</code>)</p>",
            esc(id),
            esc(action),
            esc(action),
            esc(text(op, "title")),
            esc(id),
            md(text(op, "summary")),
            ref_link(channel),
            esc(address),
        );
        if let Some(msgs) = op.get("messages").and_then(Value::as_array) {
            let links: Vec<String> = msgs.iter().filter_map(reference).map(ref_link).collect();
            let _ = write!(s, "<p>messages: {}</p>", links.join(", "));
        }
        if let Some(x) = op.get("x-outbox") {
            s.push_str(&details_table(x));
        }
        s.push_str("</section>");
    }
}

fn messages(doc: &Value, s: &mut String) {
    s.push_str("<h2 id=\"messages\">Messages</h2>");
    let Some(msgs) = doc
        .pointer("/components/messages")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
    else {
        s.push_str("<p class=\"muted\">none</p>");
        return;
    };
    for (id, m) in msgs {
        let _ = write!(
            s,
            "<section class=\"item message\" id=\"message-{}\"><h3>{} <span class=\"id\">{}</span></h3>",
            esc(id),
            esc(text(m, "title")),
            esc(id),
        );
        let ct = match text(m, "contentType") {
            "" => text(doc, "defaultContentType"),
            c => c,
        };
        let _ = write!(s, "<p>content type: <code>{}</code>", esc(ct));
        if let Some(t) = m.get("x-rust-type").and_then(Value::as_str) {
            let _ = write!(s, " · Rust type: <code>{}</code>", esc(t));
        }
        if let Some(loc) = m.pointer("/correlationId/location").and_then(Value::as_str) {
            let _ = write!(s, " · correlation id: <code>{}</code>", esc(loc));
        }
        s.push_str("</p>");
        if let Some(h) = m.get("headers") {
            let h = resolve(doc, h);
            let required: Vec<&str> = h
                .get("required")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = h.get("properties").and_then(Value::as_object) {
                s.push_str("<h4>Headers</h4><table><thead><tr><th>header</th><th>type</th><th>required</th><th>description</th></tr></thead><tbody>");
                for (name, p) in props {
                    let _ = write!(
                        s,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(name),
                        esc(text(p, "type")),
                        if required.contains(&name.as_str()) {
                            "yes"
                        } else {
                            "no"
                        },
                        md(text(p, "description")),
                    );
                }
                s.push_str("</tbody></table>");
            }
        }
        if let Some(p) = m.get("payload") {
            s.push_str("<h4>Payload schema</h4>");
            s.push_str(&pre_json(p));
        }
        s.push_str("</section>");
    }
}

fn schemas(doc: &Value, s: &mut String) {
    s.push_str("<h2 id=\"schemas\">Schemas</h2>");
    let Some(schemas) = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
    else {
        s.push_str("<p class=\"muted\">none (payload schemas are inline)</p>");
        return;
    };
    for (name, schema) in schemas {
        let _ = write!(
            s,
            "<section class=\"item schema\" id=\"schema-{}\"><h3>{}</h3>{}</section>",
            esc(name),
            esc(name),
            pre_json(schema)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_page_shows_channels_and_escapes_names() {
        let doc = json!({
            "asyncapi": "3.0.0",
            "info": {"title": "<shop>", "version": "1"},
            "channels": {"outbox.orders": {"address": "orders<x>", "messages": {"m": {"$ref": "#/components/messages/m"}}}},
            "operations": {"h.receive": {"action": "receive", "channel": {"$ref": "#/channels/outbox.orders"}, "messages": [{"$ref": "#/channels/outbox.orders/messages/m"}], "x-outbox": {"queues": ["orders"], "ordered": false}}},
            "components": {"messages": {"m": {"title": "row", "payload": {"$ref": "#/components/schemas/Order"}}}, "schemas": {"Order": {"type": "object"}}},
        });
        let p = page(&doc);
        assert!(p.contains("orders&lt;x&gt;"), "{p}");
        assert!(!p.contains("<shop>"));
        assert!(p.contains("id=\"channel-outbox.orders\""));
        assert!(p.contains("href=\"#schema-Order\""));
        assert!(p.contains("href=\"#message-m\""));
        assert!(p.contains("<th>ordered</th><td>false</td>"));
        assert_eq!(
            md("queue `a<b>` of `t`"),
            "queue <code>a&lt;b&gt;</code> of <code>t</code>"
        );
    }
}
