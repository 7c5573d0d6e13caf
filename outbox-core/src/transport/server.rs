//! [`ServerInfo`]: where a transport's bus is, as the AsyncAPI document
//! (`App::asyncapi`) lists it under `servers`. Never carries credentials.

/// A transport's bus, as documentation shows it: host (with port), protocol
/// and optional path, **without credentials** (no user, password, token or
/// query string). Returned by [`Transport::server`](super::Transport::server)
/// and [`TransportBroker::server`](super::TransportBroker::server).
///
/// ```
/// use outbox_core::transport::ServerInfo;
///
/// let s = ServerInfo::from_url("amqp", "amqp://guest:secret@rabbit.internal:5672/%2f?heartbeat=10");
/// assert_eq!(s.host, "rabbit.internal:5672");
/// assert_eq!(s.protocol, "amqp");
/// assert_eq!(s.pathname.as_deref(), Some("/%2f"));
/// assert!(!format!("{s:?}").contains("secret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// `host:port` (several, comma-separated, for a cluster's seed list).
    pub host: String,
    /// The AsyncAPI protocol name: `kafka`, `amqp`, `nats`, `redis`, …
    pub protocol: String,
    /// The path part of the URL (a RabbitMQ vhost, a Redis database), if any.
    pub pathname: Option<String>,
    /// A one-line description.
    pub description: Option<String>,
}

impl ServerInfo {
    /// A server at `host` speaking `protocol`. `host` is taken as given:
    /// pass a host and port, not a URL (see [`from_url`](Self::from_url)).
    pub fn new(protocol: impl Into<String>, host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            protocol: protocol.into(),
            pathname: None,
            description: None,
        }
    }

    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Parses a connection URL (`scheme://user:pass@host:port/path?query`)
    /// or a plain `host:port[,host:port]` list, dropping the scheme, the
    /// user info and the query string: what stays is the host (every host
    /// of a comma-separated list) and the path. A scheme of the URL
    /// (`rediss`, `amqps`, `tls`) becomes the protocol when it names a
    /// secure variant; otherwise `protocol` is used.
    pub fn from_url(protocol: &str, url: &str) -> Self {
        let url = url.trim();
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, url),
        };
        // Query and fragment may carry tokens: never kept.
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let mut hosts = Vec::new();
        let mut pathname = None;
        for part in rest.split(',') {
            // The last '@' ends the user info (a password may contain '@').
            let part = part.rsplit_once('@').map_or(part, |(_, h)| h);
            let part = part.split_once("://").map_or(part, |(_, h)| h);
            let (host, path) = match part.find('/') {
                Some(i) => (&part[..i], Some(&part[i..])),
                None => (part, None),
            };
            if !host.is_empty() {
                hosts.push(host.to_owned());
            }
            if let Some(p) = path.filter(|p| *p != "/") {
                pathname = Some(p.to_owned());
            }
        }
        let protocol = match scheme {
            Some("tls") => format!("{protocol}-secure"),
            Some(s) if s.len() > 1 && s.ends_with('s') && s != "nats" && s != "redis" => {
                s.to_owned()
            }
            _ => protocol.to_owned(),
        };
        Self {
            host: hosts.join(","),
            protocol,
            pathname,
            description: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_and_queries() {
        let s = ServerInfo::from_url("redis", "redis://:p%40ss@cache:6379/2?token=abc");
        assert_eq!(
            (s.host.as_str(), s.protocol.as_str(), s.pathname.as_deref()),
            ("cache:6379", "redis", Some("/2"))
        );
        let s = ServerInfo::from_url("redis", "rediss://u:pw@cache:6380");
        assert_eq!(
            (s.host.as_str(), s.protocol.as_str()),
            ("cache:6380", "rediss")
        );
        let s = ServerInfo::from_url("nats", "nats://u:pw@a:4222,nats://b:4222");
        assert_eq!(s.host, "a:4222,b:4222");
        assert_eq!(s.pathname, None);
        let s = ServerInfo::from_url("nats", "tls://tok@a:4222");
        assert_eq!(
            (s.host.as_str(), s.protocol.as_str()),
            ("a:4222", "nats-secure")
        );
        let s = ServerInfo::from_url("kafka", "b1:9092,b2:9092");
        assert_eq!(
            (s.host.as_str(), s.protocol.as_str()),
            ("b1:9092,b2:9092", "kafka")
        );
        let s = ServerInfo::from_url("amqp", "amqp://guest:g@st@127.0.0.1:5672/%2f");
        assert_eq!(s.host, "127.0.0.1:5672");
        assert!(!format!("{s:?}").contains("st@"), "{s:?}");
    }
}
