//! Entry point: parse, validate, run; map failures to exit codes.

use std::process::ExitCode;

use clap::Parser;

use crate::config::{Cli, Command, EXIT_CONFIG};

/// Runs the `credlet` command line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    // The demo talks to a person: keep its log quiet unless asked.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Demo(_), "info") => "warn",
        (_, level) => level,
    };
    crate::logging::init(cli.log_format, level);
    match cli.command {
        Command::Agent(args) => {
            let config = match args.validate() {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("credlet: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            run_async(crate::agent::run(config, crate::agent::shutdown_signal()))
        }
        Command::Ca(args) => {
            let config = match args.validate() {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("credlet: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            run_async(crate::ca::run(config, crate::agent::shutdown_signal()))
        }
        Command::Demo(args) => run_async(crate::demo::run(args)),
    }
}

/// Runtime threads: `CREDLET_WORKER_THREADS`, default 1. A node agent's work
/// is short CPU bursts; one thread avoids cross-thread wake-ups, which cost
/// more than the work itself. One thread means tokio's current-thread
/// scheduler: a task it wakes runs after the tasks already queued, so the
/// HTTP/2 connection task writes the answers of many finished calls in one
/// `writev` instead of one each (the multi-thread scheduler's LIFO slot runs
/// it straight after every call).
fn worker_threads() -> usize {
    std::env::var("CREDLET_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(1)
}

fn run_async(future: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let threads = worker_threads();
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("credlet: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "credlet stopped with an error"
            );
            eprintln!("credlet: {error:#}");
            ExitCode::FAILURE
        }
    }
}
