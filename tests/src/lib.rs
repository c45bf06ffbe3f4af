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
