//! [`OutgoingExt`]: reading captured transport messages in assertions.

use serde::de::DeserializeOwned;

use crate::envelope::{self, CORRELATION_ID};
use crate::transport::Outgoing;

/// Reads a message a [`MemoryTransport`](crate::MemoryTransport) captured:
/// its value decoded like a handler decodes a row, its key and headers as
/// text.
///
/// ```
/// use outbox_core::Outgoing;
/// use outbox_core::testing::OutgoingExt;
///
/// let mut m = Outgoing::new("orders.kafka", b"42".to_vec());
/// m.key = Some(b"order-42".to_vec());
/// m.headers.insert("content-type".into(), "application/json".into());
/// assert_eq!(m.value::<i64>().unwrap(), 42);
/// assert_eq!(m.key_str(), Some("order-42"));
/// assert_eq!(m.header("content-type"), Some("application/json"));
/// ```
pub trait OutgoingExt {
    /// The payload decoded into `T` following its `content-type` (see
    /// [`envelope::decode`]).
    fn value<T: DeserializeOwned>(&self) -> Result<T, String>;

    /// The key as UTF-8 text, if there is one and it is text.
    fn key_str(&self) -> Option<&str>;

    /// One header.
    fn header(&self, name: &str) -> Option<&str>;

    /// The `correlation_id` header.
    fn correlation_id(&self) -> Option<&str> {
        self.header(CORRELATION_ID)
    }
}

impl OutgoingExt for Outgoing {
    fn value<T: DeserializeOwned>(&self) -> Result<T, String> {
        envelope::decode(&self.payload, self.content_type())
    }

    fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}
