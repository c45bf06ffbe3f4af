//! Integration tests and benchmarks of credlet against real processes,
//! Unix sockets and tmpfs mounts (run as root).
//!
//! [`harness`] starts the agent binary in a throw-away kubelet root, talks
//! CSI to it over its socket and checks what it writes; [`cluster`] adds
//! `credlet ca` as a real process behind an in-process fake API server.

pub mod cluster;
pub mod harness;

/// Path of the agent binary built by this package, for integration tests
/// (`CARGO_BIN_EXE_*` is only set when compiling tests and benches).
#[macro_export]
macro_rules! agent_bin {
    () => {
        env!("CARGO_BIN_EXE_credlet-under-test")
    };
}

/// A free loopback port (bound and released; good enough for tests that
/// start a server right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// `GET http://<addr><path>` over a plain HTTP/1.1 connection: the status
/// code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `name_and_labels` (exact text before the value)
/// in a Prometheus text exposition.
pub fn metric_value(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}
