//! A TCP relay on 127.0.0.1 that slows what a server sends down to a fixed
//! rate: a registry behind it serves pulls as slowly as a distant one. TLS
//! passes through untouched (the registry's certificate names 127.0.0.1,
//! whatever the port).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

/// How often the relay sends the next slice of a throttled stream.
const TICK: Duration = Duration::from_millis(50);

/// A running relay; stops accepting on drop (connections in flight end with
/// their peers).
#[derive(Debug)]
pub struct ThrottledRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl ThrottledRelay {
    /// Relays every connection to `target`; what `target` answers reaches the
    /// client at `bytes_per_second` at most, per connection. Requests pass at
    /// full speed.
    pub fn start(target: SocketAddr, bytes_per_second: usize) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        thread::Builder::new()
            .name("throttled-relay".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let (Ok(client_tx), Ok(server_rx)) = (client.try_clone(), server.try_clone())
                    else {
                        continue;
                    };
                    thread::spawn(move || copy(client, server, None));
                    thread::spawn(move || copy(server_rx, client_tx, Some(bytes_per_second)));
                }
            })?;
        Ok(Self { addr, stop })
    }

    /// `127.0.0.1:<port>`, where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, the host part of image references through it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for ThrottledRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` until either side ends, at most `rate` bytes per
/// second when given.
fn copy(mut from: TcpStream, mut to: TcpStream, rate: Option<usize>) {
    let slice = rate.map_or(64 * 1024, |r| (r * TICK.as_millis() as usize / 1000).max(1));
    let mut buf = vec![0u8; slice];
    let mut next = Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if rate.is_some() {
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            next = next.max(now) + TICK;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
