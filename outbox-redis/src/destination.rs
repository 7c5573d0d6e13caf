//! How a route names where a message goes: `stream:<key>` (or a bare key),
//! `list:<key>`, `channel:<name>`; the name rules
//! ([`check_destination`]).

use std::fmt;

use crate::error::{Error, Result};

/// Which Redis structure a destination is, and so which command publishes
/// to it (the three FastStream subscribes to: `StreamSub`, `ListSub`,
/// `channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A stream: `XADD <key> [MAXLEN ~ n] * __data__ <message>`. Durable
    /// (as far as Redis persists), read by consumer groups or `XREAD`.
    Stream,
    /// A list: `RPUSH <key> <message>`. Durable (as far as Redis persists);
    /// each element is taken by one consumer (`LPOP`/`BLPOP`).
    List,
    /// A Pub/Sub channel: `PUBLISH <channel> <message>`. At most once:
    /// only the subscribers connected at that moment get it.
    Channel,
}

impl Kind {
    /// The prefix naming this kind in a destination (`stream:`, `list:`,
    /// `channel:`).
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Stream => "stream:",
            Kind::List => "list:",
            Kind::Channel => "channel:",
        }
    }

    /// The Redis type the command needs (as `TYPE` names it).
    pub(crate) fn redis_type(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::List => "list",
            Kind::Channel => "channel",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.redis_type())
    }
}

/// A parsed destination: its [`Kind`] and the Redis key or channel name.
///
/// ```
/// use outbox_redis::{Destination, Kind};
///
/// let d = Destination::parse("list:jobs").unwrap();
/// assert_eq!((d.kind(), d.name()), (Kind::List, "jobs"));
/// // A bare name is a stream; `:` inside a key is fine.
/// let d = Destination::parse("orders:eu").unwrap();
/// assert_eq!((d.kind(), d.name()), (Kind::Stream, "orders:eu"));
/// assert!(Destination::parse("stream:").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    kind: Kind,
    name: String,
}

impl Destination {
    /// Parses a route's destination: `stream:<key>`, `list:<key>`,
    /// `channel:<name>`, or a bare `<key>` (a stream). Only these three
    /// prefixes are special: `orders:eu` is the stream `orders:eu`, and a
    /// stream whose key starts with `list:` is written `stream:list:…`.
    ///
    /// The name must not be empty, must not start or end with whitespace
    /// and must not hold control characters (Redis would take them, but
    /// they are almost always a typo in a route).
    pub fn parse(destination: &str) -> Result<Self> {
        let (kind, name) = [Kind::Stream, Kind::List, Kind::Channel]
            .into_iter()
            .find_map(|k| destination.strip_prefix(k.prefix()).map(|n| (k, n)))
            .unwrap_or((Kind::Stream, destination));
        let invalid = |reason: String| Error::InvalidDestination {
            destination: destination.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid(format!(
                "the {kind} name is empty: write `stream:<key>` (or just `<key>`), \
                 `list:<key>` or `channel:<name>`"
            )));
        }
        if name.trim() != name {
            return Err(invalid(format!(
                "the {kind} name {name:?} starts or ends with whitespace"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "the {kind} name {name:?} holds a control character"
            )));
        }
        Ok(Self {
            kind,
            name: name.to_owned(),
        })
    }

    /// The kind (which command publishes).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The Redis key (stream, list) or channel name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The transport's destination rules, as
/// [`Transport::check_destination`](outbox_core::Transport::check_destination)
/// applies them at startup: `Err` says what is wrong and how to write it.
pub fn check_destination(destination: &str) -> std::result::Result<(), String> {
    Destination::parse(destination)
        .map(|_| ())
        .map_err(|e| match e {
            Error::InvalidDestination { reason, .. } => reason,
            other => other.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_pick_the_kind() {
        let cases = [
            ("orders", Kind::Stream, "orders"),
            ("stream:orders", Kind::Stream, "orders"),
            ("stream:list:x", Kind::Stream, "list:x"),
            ("list:jobs", Kind::List, "jobs"),
            ("channel:events.*", Kind::Channel, "events.*"),
            ("app:orders", Kind::Stream, "app:orders"),
        ];
        for (dest, kind, name) in cases {
            let d = Destination::parse(dest).unwrap_or_else(|e| panic!("{dest}: {e}"));
            assert_eq!((d.kind(), d.name()), (kind, name), "{dest}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_fix() {
        for bad in ["", "stream:", "list:", "channel:", " orders", "a\nb"] {
            let err = check_destination(bad).expect_err(bad);
            assert!(!err.is_empty(), "{bad:?}");
        }
        let err = check_destination("list:").expect_err("empty list");
        assert!(err.contains("list:<key>"), "{err}");
    }
}
