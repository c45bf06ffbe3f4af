//! gRPC servers on Unix sockets, as the kubelet and other real clients
//! reach them: [`socket::bind`] takes a socket path without stealing it
//! from a live server, [`Normalized`] makes a path-shaped `:authority`
//! acceptable to h2 ([`authority`]), and [`incoming`] accepts connections
//! wrapped in it for tonic's `serve_with_incoming`.

pub mod authority;
mod io;
pub mod socket;

pub use authority::{Error, Rewriter};
pub use io::Normalized;

use tokio::net::{UnixListener, UnixStream};

/// Accepted connections of `listener`, each [`Normalized`]: the stream
/// tonic's `Server::serve_with_incoming` takes.
pub fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<Normalized<UnixStream>>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|r| r.map(Normalized::new))
}
