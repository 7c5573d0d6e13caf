//! Opening an AMQP connection within a timeout, and what lapin's errors
//! mean: [`open`] maps a failed handshake to [`Error::Connect`] or
//! [`Error::AccessRefused`] (URL password redacted); [`amqp_reply`] reads a
//! broker's reply code out of a lapin error.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties, ErrorKind};

use crate::config::Settings;
use crate::error::{Error, LapinError, Result};

/// `403 ACCESS_REFUSED`.
pub(crate) const ACCESS_REFUSED: u16 = 403;
/// `404 NOT_FOUND`.
pub(crate) const NOT_FOUND: u16 = 404;
/// `405 RESOURCE_LOCKED` (e.g. an exclusive queue of another connection).
pub(crate) const RESOURCE_LOCKED: u16 = 405;
/// `406 PRECONDITION_FAILED`.
pub(crate) const PRECONDITION_FAILED: u16 = 406;
/// `530 NOT_ALLOWED` (e.g. an unknown virtual host).
pub(crate) const NOT_ALLOWED: u16 = 530;

/// The broker's reply code and text when `e` is an AMQP protocol error
/// (a channel or connection close sent by the broker).
pub(crate) fn amqp_reply(e: &LapinError) -> Option<(u16, String)> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some((p.get_id(), p.get_message().to_string())),
        _ => None,
    }
}

/// Opens a connection to `settings.url`, waiting at most `timeout` for the
/// handshake.
pub(crate) async fn open(settings: &Settings, timeout: Duration) -> Result<Connection> {
    let uri = settings.check()?;
    let props = ConnectionProperties::default()
        .with_connection_name(settings.connection_name.clone().into());
    let connect = |reason: String, source: Option<LapinError>| Error::Connect {
        transport: settings.name.clone(),
        url: settings.redacted_url(),
        timeout,
        reason,
        source: source.map(Box::new),
    };
    match tokio::time::timeout(timeout, Connection::connect_uri(uri, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            if let Some((code, _)) = amqp_reply(&e)
                && (code == ACCESS_REFUSED || code == NOT_ALLOWED)
            {
                return Err(Error::AccessRefused {
                    transport: settings.name.clone(),
                    url: settings.redacted_url(),
                    source: Box::new(e),
                });
            }
            Err(connect("the handshake failed".to_owned(), Some(e)))
        }
        Err(_elapsed) => Err(connect(
            format!("no AMQP handshake within {timeout:?}"),
            None,
        )),
    }
}
