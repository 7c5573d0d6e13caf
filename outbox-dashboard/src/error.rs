//! The crate's error type.

use std::net::SocketAddr;

/// What can go wrong serving the dashboard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address could not be bound.
    #[error(
        "cannot listen on {addr}: {source}; is another process using that port? Pick another \
         address (outbox serve --listen HOST:PORT; port 0 takes any free port)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("the dashboard server failed: {0}")]
    Serve(#[source] std::io::Error),
}
