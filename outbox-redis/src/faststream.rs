//! FastStream's Redis message format (`BinaryMessageFormatV1`, the default of
//! FastStream 0.7 on every Redis destination): [`encode`] writes what
//! FastStream's publisher writes, [`decode`] reads it back as FastStream's
//! parser does.
//!
//! A message is one binary string (a stream entry's [`DATA_FIELD`] field, a
//! list element, a Pub/Sub payload):
//!
//! ```text
//! magic  89 42 49 4E 0D 0A 1A 0A   ("\x89BIN\r\n\x1a\n")
//! u16    version = 1
//! u32    headers_start (= 18)
//! u32    data_start
//! u16    header count
//! count × (u16 len, UTF-8 name, u16 len, UTF-8 value)
//! body   (the rest, byte for byte)
//! ```
//!
//! All integers are big-endian. FastStream's own encoder counts a string's
//! length in characters instead of bytes (a bug for non-ASCII headers); this
//! encoder writes byte lengths, which FastStream's parser reads correctly.
//!
//! ```
//! use outbox_redis::faststream::{decode, encode};
//!
//! let frame = encode([("content-type", "text/plain"), ("message_id", "7")], b"hi").unwrap();
//! let (headers, body) = decode(&frame).unwrap();
//! assert_eq!(body, b"hi");
//! assert_eq!(headers[1], ("message_id".to_owned(), "7".to_owned()));
//! ```

use outbox_core::OUTBOX_ID;
use outbox_core::Outgoing;

use crate::error::{Error, Result};

/// The header FastStream reads the content type from.
const CONTENT_TYPE: &str = "content-type";
/// The header FastStream reads the correlation id from.
const CORRELATION_ID: &str = "correlation_id";

/// A frame's headers, in frame order: `(name, value)`.
pub type FrameHeaders = Vec<(String, String)>;

/// The stream-entry field FastStream reads a message from (`__data__`).
pub const DATA_FIELD: &str = "__data__";

/// The first bytes of every message (`\x89BIN\r\n\x1a\n`).
pub const MAGIC: &[u8; 8] = b"\x89BIN\r\n\x1a\n";

/// The format version FastStream 0.7 writes and reads.
pub const VERSION: u16 = 1;

/// Where the header count starts: after the magic, the version and the two
/// offsets.
const HEADERS_START: usize = MAGIC.len() + 2 + 4 + 4;

/// The FastStream frame of `body` with `headers` (in this order).
///
/// Fails with [`Error::InvalidMessage`] when a header name or value is
/// longer than 65,535 bytes, when there are more than 65,535 headers, or
/// when the frame would pass 4 GiB (FastStream's offsets are 16- and 32-bit).
pub fn encode<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
) -> Result<Vec<u8>> {
    let invalid = |reason: String| Error::InvalidMessage {
        destination: None,
        reason,
    };
    let mut table = Vec::new();
    let mut count: usize = 0;
    for (name, value) in headers {
        for s in [name, value] {
            let len = u16::try_from(s.len()).map_err(|_| {
                invalid(format!(
                    "header {:?} is {} bytes; FastStream's format allows 65,535",
                    truncated(name),
                    s.len()
                ))
            })?;
            table.extend_from_slice(&len.to_be_bytes());
            table.extend_from_slice(s.as_bytes());
        }
        count += 1;
    }
    let count = u16::try_from(count).map_err(|_| {
        invalid(format!(
            "{count} headers; FastStream's format allows 65,535"
        ))
    })?;
    let data_start = HEADERS_START + 2 + table.len();
    let data_start_u32 = u32::try_from(data_start)
        .ok()
        .filter(|d| u32::try_from(body.len()).is_ok_and(|b| d.checked_add(b).is_some()))
        .ok_or_else(|| invalid("the message is larger than 4 GiB".to_owned()))?;
    let mut out = Vec::with_capacity(data_start + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(HEADERS_START as u32).to_be_bytes());
    out.extend_from_slice(&data_start_u32.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&table);
    out.extend_from_slice(body);
    Ok(out)
}

/// The headers (in frame order) and body of a FastStream frame; `None` when
/// `frame` is not a well-formed version-1 frame (FastStream then treats the
/// bytes as a legacy JSON envelope or a raw body).
pub fn decode(frame: &[u8]) -> Option<(FrameHeaders, Vec<u8>)> {
    if !frame.starts_with(MAGIC) {
        return None;
    }
    let u16_at = |at: usize| -> Option<usize> {
        let b = frame.get(at..at + 2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    let u32_at = |at: usize| -> Option<usize> {
        let b = frame.get(at..at + 4)?;
        usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok()
    };
    if u16_at(MAGIC.len())? != usize::from(VERSION) {
        return None;
    }
    let headers_start = u32_at(MAGIC.len() + 2)?;
    let data_start = u32_at(MAGIC.len() + 6)?;
    let count = u16_at(headers_start)?;
    let mut at = headers_start + 2;
    let string = |at: &mut usize| -> Option<String> {
        let len = u16_at(*at)?;
        let s = frame.get(*at + 2..*at + 2 + len)?;
        *at += 2 + len;
        String::from_utf8(s.to_vec()).ok()
    };
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = string(&mut at)?;
        let value = string(&mut at)?;
        headers.push((name, value));
    }
    let body = frame.get(data_start..)?.to_vec();
    Some((headers, body))
}

/// The header FastStream reads its `message_id` from; the transport sets it
/// to the outbox row id (the `outbox-id` header) unless the message already
/// has one.
pub const MESSAGE_ID: &str = "message_id";

/// The header carrying [`Response::key`](outbox_core::Response::key)
/// (Redis messages have no key of their own).
pub const KEY: &str = "outbox-key";

/// The FastStream frame of an outgoing message, as the transport sends it:
/// the headers `correlation_id` and `content-type` first (as FastStream
/// writes them), then the others in name order, then `message_id` (the
/// `outbox-id`, unless the message has its own) and `outbox-key` (the key,
/// when there is one); the payload byte for byte.
///
/// Fails with [`Error::InvalidMessage`] for a header FastStream's format
/// cannot hold, or a key that is not UTF-8.
///
/// ```
/// use outbox_core::Outgoing;
/// use outbox_redis::faststream::{decode, encode_outgoing};
///
/// let mut out = Outgoing::new("orders", b"{}".to_vec());
/// out.headers.insert("content-type".into(), "application/json".into());
/// out.headers.insert("outbox-id".into(), "42".into());
/// out.key = Some(b"order-42".to_vec());
/// let (headers, body) = decode(&encode_outgoing(&out).unwrap()).unwrap();
/// assert_eq!(body, b"{}");
/// assert!(headers.contains(&("message_id".to_owned(), "42".to_owned())));
/// assert!(headers.contains(&("outbox-key".to_owned(), "order-42".to_owned())));
/// ```
pub fn encode_outgoing(msg: &Outgoing) -> Result<Vec<u8>> {
    let first = [CORRELATION_ID, CONTENT_TYPE];
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(msg.headers.len() + 2);
    for name in first {
        if let Some(v) = msg.headers.get(name) {
            headers.push((name, v));
        }
    }
    headers.extend(
        msg.headers
            .iter()
            .filter(|(k, _)| !first.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    if !msg.headers.contains_key(MESSAGE_ID)
        && let Some(id) = msg.headers.get(OUTBOX_ID)
    {
        headers.push((MESSAGE_ID, id));
    }
    if let Some(key) = &msg.key {
        let key = std::str::from_utf8(key).map_err(|_| Error::InvalidMessage {
            destination: None,
            reason: "the key (Response::key) is not UTF-8; Redis messages carry it in the \
                     `outbox-key` header, a UTF-8 string in FastStream's format"
                .to_owned(),
        })?;
        if !msg.headers.contains_key(KEY) {
            headers.push((KEY, key));
        }
    }
    encode(headers, &msg.payload)
}

/// The first 40 characters of `s`, for error messages.
fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes FastStream 0.7.8 writes for
    /// `broker.publish("hi", "s", headers={"x": "1"}, correlation_id="c")`:
    /// `BinaryMessageFormatV1.encode`, copied from its output.
    #[test]
    fn matches_faststreams_bytes() {
        let frame = encode(
            [
                ("correlation_id", "c"),
                ("content-type", "text/plain"),
                ("x", "1"),
            ],
            b"hi",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut want = Vec::new();
        want.extend_from_slice(b"\x89BIN\r\n\x1a\n\x00\x01");
        want.extend_from_slice(&18_u32.to_be_bytes());
        let table = b"\x00\x0ecorrelation_id\x00\x01c\x00\x0ccontent-type\x00\x0atext/plain\x00\x01x\x00\x011";
        want.extend_from_slice(&(18 + 2 + table.len() as u32).to_be_bytes());
        want.extend_from_slice(&3_u16.to_be_bytes());
        want.extend_from_slice(table);
        want.extend_from_slice(b"hi");
        assert_eq!(frame, want);
        let (headers, body) = decode(&frame).unwrap_or_else(|| panic!("decodes"));
        assert_eq!(body, b"hi");
        assert_eq!(headers.len(), 3);
        assert_eq!(headers[0], ("correlation_id".into(), "c".into()));
    }

    #[test]
    fn non_ascii_headers_and_binary_bodies_round_trip() {
        let body = [0_u8, 159, 146, 150];
        let frame = encode([("x-name", "Zoë ✓")], &body).unwrap_or_else(|e| panic!("{e}"));
        let (headers, got) = decode(&frame).unwrap_or_else(|| panic!("decodes"));
        assert_eq!(got, body);
        assert_eq!(headers, vec![("x-name".to_owned(), "Zoë ✓".to_owned())]);
        assert!(decode(b"plain bytes").is_none());
        assert!(decode(&frame[..12]).is_none());
    }

    #[test]
    fn an_overlong_header_is_an_invalid_message() {
        let long = "v".repeat(70_000);
        let err = encode([("x-big", long.as_str())], b"").expect_err("too long");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("x-big"), "{err}");
    }
}
