//! The `credlet` binary, rebuilt inside this package so integration tests
//! can spawn it through `CARGO_BIN_EXE_credlet-under-test`.

fn main() -> std::process::ExitCode {
    credlet::cli::main()
}
