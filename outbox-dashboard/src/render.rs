//! How values are shown to a person: a row's payload (decoded JSON, text,
//! or a base64 dump) and ages. Shared by the dashboard's pages and the
//! `outbox` CLI (`outbox dlq show`, `outbox peek`, `outbox stats`), so both
//! show them the same way.

use serde_json::Value;

/// Standard base64 with padding.
///
/// ```
/// assert_eq!(outbox_dashboard::render::base64(b"fo"), "Zm8=");
/// ```
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The payload as a JSON value: the parsed document when the content type
/// is `application/json` and it parses, a string when it is UTF-8 text,
/// `null` for binary payloads (show [`base64()`] then).
///
/// ```
/// use outbox_dashboard::render::body_value;
/// assert_eq!(body_value(br#"{"a":1}"#, Some("application/json")), serde_json::json!({"a": 1}));
/// assert_eq!(body_value(b"hi", Some("text/plain")), serde_json::json!("hi"));
/// assert_eq!(body_value(&[0xff], None), serde_json::Value::Null);
/// ```
pub fn body_value(payload: &[u8], content_type: Option<&str>) -> Value {
    let is_json = content_type.is_some_and(|c| c.starts_with("application/json"));
    if is_json && let Ok(v) = serde_json::from_slice::<Value>(payload) {
        return v;
    }
    match std::str::from_utf8(payload) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => Value::Null,
    }
}

/// The payload for a person: pretty-printed JSON, the text itself, or
/// `(N bytes, not UTF-8) base64:...`; `(empty)` for an empty payload.
///
/// ```
/// use outbox_dashboard::render::body_text;
/// assert_eq!(body_text(br#"{"a":1}"#, Some("application/json")), "{\n  \"a\": 1\n}");
/// assert_eq!(body_text(&[0xff], None), "(1 bytes, not UTF-8) base64:/w==");
/// ```
pub fn body_text(payload: &[u8], content_type: Option<&str>) -> String {
    if payload.is_empty() {
        return "(empty)".to_owned();
    }
    match body_value(payload, content_type) {
        Value::String(s) => s,
        Value::Null => format!(
            "({} bytes, not UTF-8) base64:{}",
            payload.len(),
            base64(payload)
        ),
        v => serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string()),
    }
}

/// Payloads longer than this are not decoded for one line ([`body_line`]):
/// their first bytes are shown as text.
pub const LINE_DECODE_LIMIT: usize = 4096;

/// The payload on one line (for a table cell): JSON compact, text as is,
/// binary as [`body_text`] shows it. A payload longer than
/// [`LINE_DECODE_LIMIT`] is not parsed: its first bytes are shown as text
/// (up to the last whole UTF-8 character), then `…`.
///
/// ```
/// use outbox_dashboard::render::body_line;
/// assert_eq!(body_line(br#"{ "a": 1 }"#, Some("application/json")), r#"{"a":1}"#);
/// let big = "é".repeat(5000);
/// assert!(body_line(big.as_bytes(), None).ends_with("é…"));
/// ```
pub fn body_line(payload: &[u8], content_type: Option<&str>) -> String {
    if payload.len() > LINE_DECODE_LIMIT {
        return head_text(payload, LINE_DECODE_LIMIT);
    }
    match body_value(payload, content_type) {
        Value::String(s) if !s.is_empty() => s,
        Value::String(_) | Value::Null => body_text(payload, content_type),
        v => v.to_string(),
    }
}

/// The first `max` bytes of `payload` as text (up to the last whole UTF-8
/// character), then `…` when anything was cut; a payload that is not UTF-8
/// shows its length and the base64 of its first bytes (at most `max`).
///
/// ```
/// use outbox_dashboard::render::head_text;
/// assert_eq!(head_text("héllo".as_bytes(), 2), "h…");
/// assert_eq!(head_text(b"hi", 10), "hi");
/// ```
pub fn head_text(payload: &[u8], max: usize) -> String {
    let cut = payload.len() > max;
    let head = &payload[..payload.len().min(max)];
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        // Cut inside a character: keep what is whole.
        Err(e) if cut && e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => {
            let shown = &head[..head.len().min(48)];
            let more = if shown.len() < payload.len() {
                "…"
            } else {
                ""
            };
            return format!(
                "({} bytes, not UTF-8) base64:{}{more}",
                payload.len(),
                base64(shown)
            );
        }
    };
    if cut {
        format!("{text}…")
    } else {
        text.to_owned()
    }
}

/// `text` cut to its first `max` characters, with `…` when anything was
/// cut; line breaks become spaces (for one table cell).
///
/// ```
/// assert_eq!(outbox_dashboard::render::truncate("ab\ncd", 3), "ab …");
/// assert_eq!(outbox_dashboard::render::truncate("abc", 3), "abc");
/// ```
pub fn truncate(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// `1.2s`, `3m04s`, `2h03m`, `4d02h`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(outbox_dashboard::render::age(Duration::from_secs(184)), "3m04s");
/// ```
pub fn age(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0, 159, 255]), "AJ//");
    }

    #[test]
    fn ages_are_compact() {
        use std::time::Duration;
        assert_eq!(age(Duration::from_millis(1500)), "1.5s");
        assert_eq!(age(Duration::from_secs(184)), "3m04s");
        assert_eq!(age(Duration::from_secs(7380)), "2h03m");
        assert_eq!(age(Duration::from_secs(86400 * 4 + 7200)), "4d02h");
    }

    #[test]
    fn long_payloads_are_cut_before_decoding() {
        let mut bin = vec![0xff_u8; LINE_DECODE_LIMIT + 1];
        bin[0] = 0;
        assert!(body_line(&bin, None).starts_with("(4097 bytes, not UTF-8) base64:AP//"));
        let json = format!(r#"{{"a": "{}"}}"#, "x".repeat(LINE_DECODE_LIMIT));
        let line = body_line(json.as_bytes(), Some("application/json"));
        assert!(
            line.starts_with(r#"{"a": "xxx"#) && line.ends_with("x…"),
            "{line}"
        );
    }

    #[test]
    fn bodies_render_by_content_type() {
        // JSON only when the content type says so.
        assert_eq!(body_value(br#"{"a":1}"#, None), Value::from(r#"{"a":1}"#));
        assert_eq!(
            body_value(b"{bad", Some("application/json")),
            Value::from("{bad")
        );
        assert!(body_text(&[0xff], None).contains("base64:/w=="));
        assert_eq!(body_text(b"", None), "(empty)");
    }
}
