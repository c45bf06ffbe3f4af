//! `credlet`: the node agent, the CA and the demo in one binary.

fn main() -> std::process::ExitCode {
    credlet::cli::main()
}
