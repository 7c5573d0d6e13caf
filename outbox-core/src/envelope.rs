//! The payload/headers envelope, byte-compatible with faststream-outbox.
//!
//! Encoding picks the representation from the body's type, as FastStream does:
//!
//! | body | payload | `content-type` |
//! |---|---|---|
//! | `()`, `None` | empty | none |
//! | `String`, `&str`, `char` | UTF-8 text | `text/plain` |
//! | [`Raw`] (or any type serializing as bytes, e.g. `serde_bytes::ByteBuf`) | as is | none |
//! | anything else (`serde::Serialize`) | JSON | `application/json` |
//!
//! The headers are a JSON object of strings. `correlation_id` is always present
//! (given, or taken from the headers, or a new UUID); `content-type` is present
//! unless the body is raw bytes or empty. Decoding is the mirror image.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::ser::{self, Impossible, Serialize};
use serde::{Deserialize, Deserializer, Serializer};

use crate::error::{Error, Result};

/// Message headers: string keys, string values, stored as a JSONB object.
pub type Headers = BTreeMap<String, String>;

/// The header carrying the payload's content type.
pub const CONTENT_TYPE: &str = "content-type";
/// The header carrying the correlation id.
pub const CORRELATION_ID: &str = "correlation_id";

/// Content type of JSON payloads.
pub const JSON: &str = "application/json";
/// Content type of text payloads.
pub const TEXT: &str = "text/plain";

/// Raw bytes, stored as they are, with no content type.
///
/// `Vec<u8>` itself serializes as a JSON array (that is what serde does with
/// it); wrap bytes in `Raw` to publish them verbatim.
///
/// ```
/// use outbox_core::envelope::{encode, Raw};
///
/// let (payload, headers) = encode(&Raw(vec![0, 1, 2]), Default::default(), None)?;
/// assert_eq!(payload, [0, 1, 2]);
/// assert!(!headers.contains_key("content-type"));
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Raw(pub Vec<u8>);

impl Serialize for Raw {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<Raw, E> {
                Ok(Raw(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> std::result::Result<Raw, E> {
                Ok(Raw(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Raw, E> {
                Ok(Raw(v.as_bytes().to_vec()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Raw, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Raw(out))
            }
        }
        d.deserialize_byte_buf(RawVisitor)
    }
}

/// A payload and its content type, forwarded byte for byte: the byte-exact
/// relay.
///
/// As a handler parameter it holds the row's payload exactly as stored and
/// its `content-type` header exactly as stored (or none); as a handler result
/// it forwards those bytes under that content type, with no decoding and no
/// re-encoding: a JSON object keeps the order of its keys and its spacing,
/// text keeps its bytes, an empty body stays empty, and a missing content type
/// stays missing. The other envelope headers are handled as for any result:
/// `correlation_id` and `outbox-id` are derived, the row's own headers are
/// propagated unless the route opts out.
///
/// ```
/// use outbox_core::{publish_to, subscriber, Passthrough};
///
/// #[publish_to(kafka, "orders.kafka")]
/// #[subscriber("orders")]
/// async fn relay(body: Passthrough) -> Passthrough {
///     body
/// }
/// # fn main() {}
/// ```
///
/// A key, headers or another correlation id go through
/// [`Response`](crate::Response), as for any result:
///
/// ```
/// use outbox_core::{publish_to, subscriber, Message, Passthrough, Response};
///
/// #[publish_to(kafka, "orders.kafka")]
/// #[subscriber("orders")]
/// async fn relay(body: Passthrough, msg: Message) -> Response<Passthrough> {
///     Response::new(body).key(msg.id().to_string())
/// }
/// # fn main() {}
/// ```
///
/// `Passthrough` deliberately implements neither `serde::Serialize` nor
/// `serde::Deserialize`: it is not a body type to decode or encode but the
/// bytes themselves (to publish bytes from your own code, use [`Raw`] and a
/// `content-type` header).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Passthrough {
    payload: Vec<u8>,
    content_type: Option<String>,
}

impl Passthrough {
    /// A payload without a content type.
    ///
    /// ```
    /// use outbox_core::Passthrough;
    ///
    /// let p = Passthrough::new(br#"{"b":1,"a":2}"#.to_vec());
    /// assert_eq!(p.payload(), br#"{"b":1,"a":2}"#);
    /// assert_eq!(p.content_type(), None);
    /// ```
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: payload.into(),
            content_type: None,
        }
    }

    /// Labels the payload with a content type, used verbatim as the
    /// `content-type` header.
    ///
    /// ```
    /// use outbox_core::Passthrough;
    ///
    /// let p = Passthrough::new("héllo ✓").with_content_type("text/plain");
    /// assert_eq!(p.content_type(), Some("text/plain"));
    /// ```
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// The payload bytes.
    ///
    /// ```
    /// let p = outbox_core::Passthrough::new(vec![0, 159]);
    /// assert_eq!(p.payload(), [0, 159]);
    /// ```
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The content type, if the payload has one.
    ///
    /// ```
    /// let p = outbox_core::Passthrough::new("{}").with_content_type("application/json");
    /// assert_eq!(p.content_type(), Some("application/json"));
    /// ```
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The payload and the content type.
    ///
    /// ```
    /// let p = outbox_core::Passthrough::new("hi").with_content_type("text/plain");
    /// assert_eq!(p.into_parts(), (b"hi".to_vec(), Some("text/plain".to_owned())));
    /// ```
    pub fn into_parts(self) -> (Vec<u8>, Option<String>) {
        (self.payload, self.content_type)
    }
}

/// How a body is represented on the wire.
#[derive(Debug)]
enum Kind {
    Empty,
    Text(String),
    Bytes(Vec<u8>),
    Json,
}

/// A serializer that looks only at the top level of a value to pick its
/// representation; compound values stop it at once (they are JSON).
struct Detect;

#[derive(Debug)]
struct NotScalar;

impl fmt::Display for NotScalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a scalar")
    }
}
impl std::error::Error for NotScalar {}
impl ser::Error for NotScalar {
    fn custom<T: fmt::Display>(_: T) -> Self {
        NotScalar
    }
}

macro_rules! json_scalars {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, _: $ty) -> std::result::Result<Kind, NotScalar> { Ok(Kind::Json) })*
    };
}

impl Serializer for Detect {
    type Ok = Kind;
    type Error = NotScalar;
    type SerializeSeq = Impossible<Kind, NotScalar>;
    type SerializeTuple = Impossible<Kind, NotScalar>;
    type SerializeTupleStruct = Impossible<Kind, NotScalar>;
    type SerializeTupleVariant = Impossible<Kind, NotScalar>;
    type SerializeMap = Impossible<Kind, NotScalar>;
    type SerializeStruct = Impossible<Kind, NotScalar>;
    type SerializeStructVariant = Impossible<Kind, NotScalar>;

    json_scalars!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_f32: f32,
        serialize_f64: f64,
    );

    fn serialize_char(self, v: char) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Text(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Text(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Bytes(v.to_vec()))
    }
    fn serialize_none(self) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Empty)
    }
    fn serialize_some<T: ?Sized + Serialize>(
        self,
        value: &T,
    ) -> std::result::Result<Kind, NotScalar> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Empty)
    }
    fn serialize_unit_struct(self, _: &'static str) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Json)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> std::result::Result<Kind, NotScalar> {
        Ok(Kind::Json)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> std::result::Result<Kind, NotScalar> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> std::result::Result<Kind, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_seq(self, _: Option<usize>) -> std::result::Result<Self::SerializeSeq, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_tuple(self, _: usize) -> std::result::Result<Self::SerializeTuple, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self::SerializeTupleStruct, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self::SerializeTupleVariant, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_map(self, _: Option<usize>) -> std::result::Result<Self::SerializeMap, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self::SerializeStruct, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self::SerializeStructVariant, NotScalar> {
        Err(NotScalar)
    }
}

/// Encodes a body into `(payload, content type)`.
pub fn encode_body<T: Serialize + ?Sized>(body: &T) -> Result<(Vec<u8>, Option<&'static str>)> {
    match body.serialize(Detect).unwrap_or(Kind::Json) {
        Kind::Empty => Ok((Vec::new(), None)),
        Kind::Text(s) => Ok((s.into_bytes(), Some(TEXT))),
        Kind::Bytes(b) => Ok((b, None)),
        Kind::Json => serde_json::to_vec(body)
            .map(|v| (v, Some(JSON)))
            .map_err(Error::Encode),
    }
}

/// Merges the encoder's content type and the correlation id into the user's
/// headers, with the conflict rules of faststream-outbox.
pub(crate) fn finish_headers(
    mut headers: Headers,
    content_type: Option<&'static str>,
    correlation_id: Option<&str>,
) -> Result<Headers> {
    if let (Some(ct), Some(user)) = (content_type, headers.get(CONTENT_TYPE))
        && user != ct
    {
        {
            return Err(Error::arg(format!(
                "the `content-type` header {user:?} conflicts with the body's encoding ({ct}); \
                 drop the header, or publish the body as `Raw` bytes to label it yourself"
            )));
        }
    }
    if let Some(ct) = content_type {
        headers.insert(CONTENT_TYPE.to_owned(), ct.to_owned());
    }
    let correlation = match (correlation_id, headers.get(CORRELATION_ID)) {
        (Some(given), Some(header)) if given != header => {
            return Err(Error::arg(format!(
                "correlation_id {given:?} conflicts with the `correlation_id` header {header:?}; \
                 pass one of them, or the same value in both"
            )));
        }
        (Some(given), _) => given.to_owned(),
        (None, Some(header)) => header.clone(),
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    headers.insert(CORRELATION_ID.to_owned(), correlation);
    Ok(headers)
}

/// Encodes a body and completes its headers exactly as faststream-outbox does.
///
/// ```
/// use outbox_core::envelope::encode;
///
/// let (payload, headers) = encode(&serde_json::json!({"order_id": 1}), Default::default(), Some("c-1"))?;
/// assert_eq!(payload, br#"{"order_id":1}"#);
/// assert_eq!(headers["content-type"], "application/json");
/// assert_eq!(headers["correlation_id"], "c-1");
///
/// let (payload, headers) = encode("hello", Default::default(), None)?;
/// assert_eq!(payload, b"hello");
/// assert_eq!(headers["content-type"], "text/plain");
/// assert_eq!(headers["correlation_id"].len(), 36); // a fresh UUID
/// # Ok::<(), outbox_core::Error>(())
/// ```
pub fn encode<T: Serialize + ?Sized>(
    body: &T,
    headers: Headers,
    correlation_id: Option<&str>,
) -> Result<(Vec<u8>, Headers)> {
    let (payload, ct) = encode_body(body)?;
    let headers = finish_headers(headers, ct, correlation_id)?;
    Ok((payload, headers))
}

/// Decodes a payload into `T`, following the content type:
///
/// - `text/*`: the text itself if `T` takes a string, else the text parsed as JSON
///   (so `"42"` sent as text decodes into an `i64`, as FastStream casts it);
/// - `application/json` (and `+json` types): JSON;
/// - no content type: empty payload as `None`/`()`, else JSON if it parses,
///   else the raw bytes (into [`Raw`], `Vec<u8>` or, if UTF-8, a `String`).
///
/// The error says why in plain words: `not valid JSON: …` for a payload that
/// is not JSON at all, `number 1e20 does not fit in i64` for a number outside
/// the integer type asked for (also a negative number for an unsigned type),
/// `` JSON does not match `T`: … `` for other valid JSON of the wrong shape.
///
/// ```
/// use outbox_core::envelope::decode;
///
/// assert_eq!(decode::<i64>(b"42", Some("application/json")), Ok(42));
/// assert_eq!(
///     decode::<i64>(b"1e20", Some("application/json")).unwrap_err(),
///     "number 1e20 does not fit in i64"
/// );
/// assert_eq!(
///     decode::<u8>(b"-1", Some("application/json")).unwrap_err(),
///     "number -1 does not fit in u8"
/// );
/// assert_eq!(
///     decode::<i64>(b"{1:2}", Some("application/json")).unwrap_err(),
///     "not valid JSON: key must be a string at line 1 column 2"
/// );
/// assert_eq!(
///     decode::<i64>(br#""abc""#, Some("application/json")).unwrap_err(),
///     r#"JSON does not match `i64`: invalid type: string "abc", expected i64 at line 1 column 5"#
/// );
/// ```
pub fn decode<T: DeserializeOwned>(
    payload: &[u8],
    content_type: Option<&str>,
) -> std::result::Result<T, String> {
    decode_for(
        payload,
        content_type,
        Target(Some(std::any::type_name::<T>())),
    )
}

/// How error reasons name the type a payload was decoded into: by name, or,
/// when the caller's message already names it (a [`DecodeError`]), generically.
///
/// [`DecodeError`]: crate::error::DecodeError
#[derive(Debug, Clone, Copy)]
struct Target(Option<&'static str>);

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "`{name}`"),
            None => f.write_str("the expected type"),
        }
    }
}

fn decode_for<T: DeserializeOwned>(
    payload: &[u8],
    content_type: Option<&str>,
    target: Target,
) -> std::result::Result<T, String> {
    let ct = content_type.map(|c| c.trim().to_ascii_lowercase());
    match ct.as_deref() {
        Some(c) if c.starts_with("text/") => {
            let text = std::str::from_utf8(payload)
                .map_err(|e| format!("the payload is labelled {c} but is not UTF-8: {e}"))?;
            let as_str: std::result::Result<T, de::value::Error> =
                T::deserialize(text.into_deserializer());
            match as_str {
                Ok(v) => Ok(v),
                Err(as_text) => {
                    serde_json::from_str(text).map_err(|e| match json_syntax(payload) {
                        Some(syntax) => format!(
                            "{target} does not take text ({as_text}), and the text is not valid \
                             JSON ({syntax})"
                        ),
                        None => json_reason(payload, &e, target),
                    })
                }
            }
        }
        Some(c) if c.starts_with(JSON) || c.contains("+json") => serde_json::from_slice(payload)
            .map_err(|e| match json_syntax(payload) {
                Some(syntax) => format!("not valid JSON: {syntax}"),
                None => json_reason(payload, &e, target),
            }),
        _ => {
            if payload.is_empty() {
                return T::deserialize(RawDeserializer(payload)).map_err(|e| {
                    format!("the payload is empty, which {target} does not take ({e})")
                });
            }
            match serde_json::from_slice(payload) {
                Ok(v) => Ok(v),
                Err(json_err) => {
                    T::deserialize(RawDeserializer(payload)).map_err(|raw_err| {
                        match json_syntax(payload) {
                            Some(syntax) => format!(
                                "the payload is not JSON ({syntax}), and {target} does not take \
                                 raw bytes ({raw_err})"
                            ),
                            // Valid JSON: what matters is why the JSON did not fit.
                            None => json_reason(payload, &json_err, target),
                        }
                    })
                }
            }
        }
    }
}

/// Why `payload` is not JSON at all, if it is not: serde_json's syntax or
/// end-of-input error, or `empty payload`.
///
/// Checked apart from the typed parse, which can fail on the shape first
/// (`{1:2}` read as an `i64` is "invalid type: map" before the bad key).
fn json_syntax(payload: &[u8]) -> Option<String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Some("empty payload".to_owned());
    }
    match serde_json::from_slice::<de::IgnoredAny>(payload) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Why valid JSON did not decode: a number outside the integer type asked
/// for, in plain words, else serde_json's own reason.
fn json_reason(payload: &[u8], err: &serde_json::Error, target: Target) -> String {
    number_reason(payload, err).unwrap_or_else(|| format!("JSON does not match {target}: {err}"))
}

/// The integer types serde's primitive visitors name in their errors, with
/// whether they are signed and their width in bits.
const INTEGERS: [(&str, bool, u32); 12] = [
    ("i8", true, 8),
    ("i16", true, 16),
    ("i32", true, 32),
    ("i64", true, 64),
    ("i128", true, 128),
    ("isize", true, isize::BITS),
    ("u8", false, 8),
    ("u16", false, 16),
    ("u32", false, 32),
    ("u64", false, 64),
    ("u128", false, 128),
    ("usize", false, usize::BITS),
];

/// `number 1e20 does not fit in i64` (and its kin) for a JSON number that an
/// integer type refused; `None` for any other error.
///
/// serde reports these as "invalid type: floating point `1e+20`, expected
/// i64" (a number with a fraction or exponent, or too large for a `u64`) and
/// "invalid value: integer `-1`, expected u8" (an integer out of range). The
/// number is quoted as written in the payload when it can be found there.
fn number_reason(payload: &[u8], err: &serde_json::Error) -> Option<String> {
    if err.classify() != serde_json::error::Category::Data {
        return None;
    }
    let text = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    let message = text.strip_suffix(&position).unwrap_or(&text);
    let (float, rest) = if let Some(rest) = message.strip_prefix("invalid type: floating point `") {
        (true, rest)
    } else if let Some(rest) = message.strip_prefix("invalid value: integer `") {
        (false, rest)
    } else {
        return None;
    };
    let (shown, expected) = rest.split_once("`, expected ")?;
    let &(name, signed, bits) = INTEGERS.iter().find(|(name, ..)| *name == expected)?;
    let value: f64 = shown.parse().ok()?;
    let found = literal_at(payload, err.line(), err.column())
        .filter(|lit| lit.parse::<f64>().ok() == Some(value));
    let literal = found.unwrap_or(shown);
    // A number inside a larger document says where it is.
    let whole = std::str::from_utf8(payload).is_ok_and(|p| p.trim() == literal);
    let at = if whole { "" } else { &position };
    // serde refuses an integer literal only when it is out of range (serde_json
    // reads one beyond 64 bits as a float, hence the float error for it);
    // a literal with a fraction or exponent also when it is in range.
    let integer_literal = found.is_some_and(|lit| !lit.contains(['.', 'e', 'E']));
    let (min, end) = if signed {
        (-(2f64.powi(bits as i32 - 1)), 2f64.powi(bits as i32 - 1))
    } else {
        (0.0, 2f64.powi(bits as i32))
    };
    Some(
        if !float || integer_literal || value < min || value >= end {
            format!("number {literal} does not fit in {name}{at}")
        } else if value.fract() != 0.0 {
            format!("number {literal} is not a whole number, expected {name}{at}")
        } else {
            format!("number {literal} has a fraction or exponent; {name} takes only integers{at}")
        },
    )
}

/// The number literal that ends at serde_json's error position (line from 1,
/// column in bytes from 1, on the value's last byte), if there is one.
fn literal_at(payload: &[u8], line: usize, column: usize) -> Option<&str> {
    let line_start = if line <= 1 {
        0
    } else {
        payload
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)
            .map(|(i, _)| i + 1)?
    };
    let head = payload.get(..line_start.checked_add(column)?)?;
    let start = head
        .iter()
        .rposition(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .map_or(0, |i| i + 1);
    let literal = std::str::from_utf8(head.get(start..)?).ok()?;
    literal
        .bytes()
        .any(|b| b.is_ascii_digit())
        .then_some(literal)
}

/// Presents raw bytes to a `Deserialize` impl: as bytes, as a sequence of
/// `u8`, as a string when UTF-8, as `None`/`()` when empty.
struct RawDeserializer<'a>(&'a [u8]);

impl<'de> Deserializer<'de> for RawDeserializer<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> std::result::Result<V::Value, Self::Error> {
        if self.0.is_empty() {
            return v.visit_unit();
        }
        v.visit_bytes(self.0)
    }
    fn deserialize_bytes<V: Visitor<'de>>(
        self,
        v: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        v.visit_bytes(self.0)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(
        self,
        v: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        v.visit_byte_buf(self.0.to_vec())
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> std::result::Result<V::Value, Self::Error> {
        v.visit_seq(de::value::SeqDeserializer::new(self.0.iter().copied()))
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> std::result::Result<V::Value, Self::Error> {
        match std::str::from_utf8(self.0) {
            Ok(s) => v.visit_str(s),
            Err(_) => v.visit_bytes(self.0),
        }
    }
    fn deserialize_string<V: Visitor<'de>>(
        self,
        v: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        self.deserialize_str(v)
    }
    fn deserialize_option<V: Visitor<'de>>(
        self,
        v: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        if self.0.is_empty() {
            v.visit_none()
        } else {
            v.visit_some(self)
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> std::result::Result<V::Value, Self::Error> {
        if self.0.is_empty() {
            v.visit_unit()
        } else {
            Err(de::Error::invalid_length(self.0.len(), &"an empty payload"))
        }
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        v.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        unit_struct tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// The `content-type` header, if any.
pub(crate) fn content_type(headers: &Headers) -> Option<&str> {
    headers.get(CONTENT_TYPE).map(String::as_str)
}

/// The `correlation_id` header, else `fallback` (a row id) as text.
pub(crate) fn correlation_id_or(headers: &Headers, fallback: i64) -> String {
    headers
        .get(CORRELATION_ID)
        .cloned()
        .unwrap_or_else(|| fallback.to_string())
}

/// Decodes a stored payload into `T`; the error names `what` (`row`, `dead
/// letter`) and its id, the queue and the target type.
pub(crate) fn decode_stored<T: DeserializeOwned>(
    payload: &[u8],
    headers: &Headers,
    what: &'static str,
    id: i64,
    queue: &str,
) -> std::result::Result<T, crate::error::DecodeError> {
    let ct = content_type(headers);
    // The error names the type itself: the reason need not repeat it.
    decode_for(payload, ct, Target(None)).map_err(|reason| crate::error::DecodeError {
        what,
        row_id: id,
        queue: queue.to_owned(),
        content_type: ct.map(str::to_owned),
        target: std::any::type_name::<T>(),
        reason,
    })
}

/// The headers column of a stored row, read leniently (see
/// [`headers_from_json`]); a value that is not an object is logged.
pub(crate) fn headers_column(raw: Option<serde_json::Value>, what: &str, id: i64) -> Headers {
    let (headers, well_formed) = headers_from_json(raw);
    if !well_formed {
        tracing::warn!(
            id,
            "the headers of {what} {id} are not a JSON object; reading them as empty"
        );
    }
    headers
}

/// Reads a JSONB headers value as stored by any writer: an object's string
/// values as they are, other values as their JSON text. Anything that is not an
/// object yields no headers (and `false`, so the caller can warn).
pub(crate) fn headers_from_json(value: Option<serde_json::Value>) -> (Headers, bool) {
    match value {
        None | Some(serde_json::Value::Null) => (Headers::new(), true),
        Some(serde_json::Value::Object(map)) => (
            map.into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
            true,
        ),
        Some(_) => (Headers::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc<T: Serialize + ?Sized>(v: &T) -> (Vec<u8>, Option<&'static str>) {
        encode_body(v).expect("encodes")
    }

    #[test]
    fn body_kinds_follow_faststream() {
        assert_eq!(enc(&()), (vec![], None));
        assert_eq!(enc(&None::<i32>), (vec![], None));
        assert_eq!(enc("hi"), (b"hi".to_vec(), Some(TEXT)));
        assert_eq!(enc(&String::from("hi")), (b"hi".to_vec(), Some(TEXT)));
        assert_eq!(enc(&Some("hi")), (b"hi".to_vec(), Some(TEXT)));
        assert_eq!(enc(&Raw(vec![0, 159])), (vec![0, 159], None));
        assert_eq!(enc(&42i64), (b"42".to_vec(), Some(JSON)));
        assert_eq!(enc(&1.5f64), (b"1.5".to_vec(), Some(JSON)));
        assert_eq!(enc(&true), (b"true".to_vec(), Some(JSON)));
        assert_eq!(enc(&vec![1u8, 2]), (b"[1,2]".to_vec(), Some(JSON)));
        assert_eq!(
            enc(&json!({"a": [1, "x"]})),
            (br#"{"a":[1,"x"]}"#.to_vec(), Some(JSON))
        );
    }

    #[test]
    fn content_type_conflicts_are_errors() {
        let mut h = Headers::new();
        h.insert(CONTENT_TYPE.into(), "text/plain".into());
        let err = encode(&json!({"a": 1}), h.clone(), None).unwrap_err();
        assert!(err.to_string().contains("conflicts"), "{err}");
        // Equal is fine; raw bytes keep the user's label.
        let (_, hs) = encode("x", h.clone(), None).expect("same content type");
        assert_eq!(hs[CONTENT_TYPE], "text/plain");
        let mut xml = Headers::new();
        xml.insert(CONTENT_TYPE.into(), "application/xml".into());
        let (_, hs) = encode(&Raw(b"<a/>".to_vec()), xml, None).expect("bytes keep label");
        assert_eq!(hs[CONTENT_TYPE], "application/xml");
    }

    #[test]
    fn correlation_id_rules() {
        let mut h = Headers::new();
        h.insert(CORRELATION_ID.into(), "from-header".into());
        let (_, hs) = encode(&1, h.clone(), None).expect("header used");
        assert_eq!(hs[CORRELATION_ID], "from-header");
        let (_, hs) = encode(&1, h.clone(), Some("from-header")).expect("same is fine");
        assert_eq!(hs[CORRELATION_ID], "from-header");
        let err = encode(&1, h, Some("other")).unwrap_err().to_string();
        assert!(err.contains("conflicts"), "{err}");
        let (_, a) = encode(&1, Headers::new(), None).expect("fresh");
        let (_, b) = encode(&1, Headers::new(), None).expect("fresh");
        assert_ne!(a[CORRELATION_ID], b[CORRELATION_ID]);
    }

    #[test]
    fn decoding_mirrors_encoding() {
        assert_eq!(decode::<i64>(b"42", Some(JSON)), Ok(42));
        assert_eq!(decode::<String>(b"hi", Some(TEXT)), Ok("hi".to_owned()));
        assert_eq!(decode::<i64>(b"42", Some(TEXT)), Ok(42));
        assert_eq!(decode::<Raw>(&[0, 159], None), Ok(Raw(vec![0, 159])));
        assert_eq!(decode::<Vec<u8>>(&[0, 159], None), Ok(vec![0, 159]));
        assert_eq!(decode::<Option<i64>>(b"", None), Ok(None));
        assert_eq!(decode::<()>(b"", None), Ok(()));
        assert_eq!(decode::<i64>(b"7", None), Ok(7));
        assert_eq!(decode::<String>(b"plain", None), Ok("plain".to_owned()));
        let err = decode::<i64>(br#""abc""#, Some(JSON)).unwrap_err();
        assert!(err.contains("expected i64"), "{err}");
        let err = decode::<i64>(&[0xff], Some(TEXT)).unwrap_err();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    fn err<T: DeserializeOwned + fmt::Debug>(payload: &[u8], ct: Option<&str>) -> String {
        match decode::<T>(payload, ct) {
            Ok(v) => panic!("{payload:?} decoded as {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn numbers_that_do_not_fit_say_so() {
        let j = Some(JSON);
        assert_eq!(err::<i64>(b"1e20", j), "number 1e20 does not fit in i64");
        assert_eq!(
            err::<i64>(b"100000000000000000000", j),
            "number 100000000000000000000 does not fit in i64"
        );
        assert_eq!(
            err::<i64>(b" 9223372036854775808\n", j),
            "number 9223372036854775808 does not fit in i64"
        );
        assert_eq!(
            err::<i64>(b"-9223372036854775809", j),
            "number -9223372036854775809 does not fit in i64"
        );
        assert_eq!(err::<u8>(b"300", j), "number 300 does not fit in u8");
        assert_eq!(err::<u8>(b"256", j), "number 256 does not fit in u8");
        assert_eq!(err::<i8>(b"-129", j), "number -129 does not fit in i8");
        assert_eq!(
            err::<i32>(b"3000000000", j),
            "number 3000000000 does not fit in i32"
        );
        assert_eq!(err::<u64>(b"-1", j), "number -1 does not fit in u64");
        assert_eq!(err::<u32>(b"-1", j), "number -1 does not fit in u32");
        assert_eq!(
            err::<u64>(b"18446744073709551616", j),
            "number 18446744073709551616 does not fit in u64"
        );
        assert_eq!(err::<u16>(b"-2.5", j), "number -2.5 does not fit in u16");
        assert_eq!(
            err::<usize>(b"1e40", j),
            "number 1e40 does not fit in usize"
        );
        // In range, but not an integer.
        assert_eq!(
            err::<i64>(b"1.5", j),
            "number 1.5 is not a whole number, expected i64"
        );
        assert_eq!(
            err::<i64>(b"1e3", j),
            "number 1e3 has a fraction or exponent; i64 takes only integers"
        );
        // Inside a document: the position too; Option and containers alike.
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Order {
            id: i64,
            qty: u8,
        }
        assert_eq!(
            err::<Order>(br#"{"id": 1e20, "qty": 1}"#, j),
            "number 1e20 does not fit in i64 at line 1 column 11"
        );
        assert_eq!(
            err::<Order>(b"{\"id\": 1,\n \"qty\": -3}", j),
            "number -3 does not fit in u8 at line 2 column 10"
        );
        assert_eq!(err::<Option<u8>>(b"-5", j), "number -5 does not fit in u8");
        assert_eq!(
            err::<Vec<u8>>(b"[1, 2, 1000]", j),
            "number 1000 does not fit in u8 at line 1 column 11"
        );
        // Text and unlabelled payloads are read as JSON numbers the same way.
        assert_eq!(
            err::<i64>(b"1e20", Some(TEXT)),
            "number 1e20 does not fit in i64"
        );
        assert_eq!(err::<i64>(b"1e20", None), "number 1e20 does not fit in i64");
        // Floats are not integers: serde_json's own message stays.
        assert_eq!(decode::<f32>(b"1e20", j), Ok(1e20));
        let other = err::<std::num::NonZeroU8>(b"0", j);
        assert!(other.starts_with("JSON does not match"), "{other}");
    }

    #[test]
    fn payloads_that_are_not_json_say_so() {
        let j = Some(JSON);
        assert_eq!(
            err::<i64>(b"{1:2}", j),
            "not valid JSON: key must be a string at line 1 column 2"
        );
        assert_eq!(
            err::<serde_json::Value>(b"{1:2}", j),
            "not valid JSON: key must be a string at line 1 column 2"
        );
        assert_eq!(
            err::<i64>(b"[1", j),
            "not valid JSON: EOF while parsing a list at line 1 column 2"
        );
        assert_eq!(
            err::<i64>(b"12 34", j),
            "not valid JSON: trailing characters at line 1 column 4"
        );
        assert_eq!(err::<i64>(b"", j), "not valid JSON: empty payload");
        assert_eq!(err::<i64>(b" \n", j), "not valid JSON: empty payload");
        assert_eq!(
            err::<i64>(b"hello", Some("application/cloudevents+json")),
            "not valid JSON: expected value at line 1 column 1"
        );
    }

    #[test]
    fn json_of_the_wrong_shape_names_the_type() {
        let j = Some(JSON);
        assert_eq!(
            err::<i64>(br#""abc""#, j),
            r#"JSON does not match `i64`: invalid type: string "abc", expected i64 at line 1 column 5"#
        );
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Order {
            id: i64,
        }
        let e = err::<Order>(br#"{"note": "x"}"#, j);
        assert!(
            e.starts_with("JSON does not match `outbox_core::envelope::tests::")
                && e.ends_with("Order`: missing field `id` at line 1 column 13"),
            "{e}"
        );
    }

    #[test]
    fn text_and_unlabelled_payloads_say_why() {
        assert_eq!(
            err::<i64>(b"abc", Some(TEXT)),
            "`i64` does not take text (invalid type: string \"abc\", expected i64), and the \
             text is not valid JSON (expected value at line 1 column 1)"
        );
        assert_eq!(
            err::<i64>(b"", Some(TEXT)),
            "`i64` does not take text (invalid type: string \"\", expected i64), and the text \
             is not valid JSON (empty payload)"
        );
        let e = err::<i64>(&[0xff], Some(TEXT));
        assert!(
            e.starts_with("the payload is labelled text/plain but is not UTF-8"),
            "{e}"
        );
        assert_eq!(
            err::<i64>(br#""abc""#, Some(TEXT)),
            r#"JSON does not match `i64`: invalid type: string "abc", expected i64 at line 1 column 5"#
        );
        assert_eq!(
            err::<i64>(b"", None),
            "the payload is empty, which `i64` does not take (invalid type: unit value, expected \
             i64)"
        );
        assert_eq!(
            err::<i64>(&[0xff, 0], None),
            "the payload is not JSON (expected value at line 1 column 1), and `i64` does not \
             take raw bytes (invalid type: byte array, expected i64)"
        );
        assert_eq!(
            err::<i64>(br#"{"a": 1}"#, None),
            "JSON does not match `i64`: invalid type: map, expected i64 at line 1 column 0"
        );
    }

    #[test]
    fn decode_errors_name_row_queue_content_type_and_type() {
        let mut h = Headers::new();
        h.insert(CONTENT_TYPE.into(), JSON.into());
        let e = decode_stored::<i64>(b"100000000000000000000", &h, "row", 42, "orders")
            .expect_err("does not fit");
        assert_eq!(
            e.to_string(),
            "cannot decode the payload of row 42 (queue \"orders\", content-type \
             application/json) as `i64`: number 100000000000000000000 does not fit in i64"
        );
        assert_eq!(
            (e.row_id(), e.queue(), e.content_type(), e.expected_type()),
            (42, "orders", Some(JSON), "i64")
        );
        assert_eq!(
            e.reason(),
            "number 100000000000000000000 does not fit in i64"
        );
        let e = decode_stored::<i64>(b"{1:2}", &h, "dead letter", 7, "q").expect_err("not JSON");
        assert_eq!(
            e.to_string(),
            "cannot decode the payload of dead letter 7 (queue \"q\", content-type \
             application/json) as `i64`: not valid JSON: key must be a string at line 1 column 2"
        );
        // The type is named once, in the prefix.
        let e = decode_stored::<i64>(b"[]", &h, "row", 8, "q").expect_err("wrong shape");
        assert_eq!(
            e.to_string(),
            "cannot decode the payload of row 8 (queue \"q\", content-type application/json) \
             as `i64`: JSON does not match the expected type: invalid type: sequence, expected \
             i64 at line 1 column 0"
        );
        let e = decode_stored::<i64>(b"", &Headers::new(), "row", 9, "q").expect_err("empty");
        assert_eq!(
            e.to_string(),
            "cannot decode the payload of row 9 (queue \"q\", no content-type) as `i64`: the \
             payload is empty, which the expected type does not take (invalid type: unit \
             value, expected i64)"
        );
        assert_eq!(e.content_type(), None);
    }

    #[test]
    fn passthrough_keeps_bytes_and_label() {
        let p = Passthrough::new(br#"{"order_id":11,"note":"x"}"#.to_vec())
            .with_content_type("application/json");
        assert_eq!(p.payload(), br#"{"order_id":11,"note":"x"}"#);
        assert_eq!(p.content_type(), Some("application/json"));
        assert_eq!(
            p.clone().into_parts(),
            (
                br#"{"order_id":11,"note":"x"}"#.to_vec(),
                Some("application/json".to_owned())
            )
        );
        assert_eq!(Passthrough::default().into_parts(), (Vec::new(), None));
    }

    #[test]
    fn foreign_headers_are_read_leniently() {
        let (h, ok) = headers_from_json(Some(json!({"a": "x", "n": 1, "o": {"k": true}})));
        assert!(ok);
        assert_eq!(h["a"], "x");
        assert_eq!(h["n"], "1");
        assert_eq!(h["o"], r#"{"k":true}"#);
        let (h, ok) = headers_from_json(Some(json!([1, 2])));
        assert!(!ok);
        assert!(h.is_empty());
    }
}
