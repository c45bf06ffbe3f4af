//! Entry point: parse, validate, run; map failures to exit codes.
//!
//! Every configuration error, whether clap, validation or start-up (a busy
//! port or socket, a kubeconfig that does not load) finds it, ends the
//! process with exit code 64 and one line on stderr naming the flag and its
//! environment variable ([`ConfigError`]). Other failures end with exit
//! code 1 and one line. Output written to a closed pipe (`| head`) is
//! dropped quietly.

use std::io::Write;
use std::process::ExitCode;

use clap::FromArgMatches;

use crate::config::{Cli, Command, ConfigError, EXIT_CONFIG, command_with_deprecated_env};
use crate::logging::LogFormat;

/// Runs the `credlet` command line.
pub fn main() -> ExitCode {
    let (mut command, env_warnings) = command_with_deprecated_env(|name| std::env::var_os(name));
    let parsed = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .map_err(|error| error.format(&mut command));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(error) => {
            // Logging is not set up yet: plain lines.
            for warning in &env_warnings {
                error_line(&format!("warning: {warning}"));
            }
            return clap_exit(&error);
        }
    };
    if let Err(error) = cli.validate() {
        return config_exit(&error);
    }
    // The demo talks to a person: keep its log quiet unless asked.
    let level = match (&cli.command, cli.log_level.trim()) {
        (Command::Demo(_), "info") => "warn",
        (_, level) => level,
    };
    crate::logging::init(cli.log_format, level);
    for warning in env_warnings {
        tracing::warn!("{warning}");
    }
    let runtime = Runtime {
        threads: cli.worker_threads.into(),
        log_format: cli.log_format,
    };
    match cli.command {
        Command::Agent(args) => match args.validate() {
            Ok(config) => runtime.run(crate::agent::run(config, crate::agent::shutdown_signal())),
            Err(error) => config_exit(&error),
        },
        Command::Ca(args) => match args.validate() {
            Ok(config) => runtime.run(crate::ca::run(config, crate::agent::shutdown_signal())),
            Err(error) => config_exit(&error),
        },
        Command::Demo(args) => match args.validate() {
            Ok(config) => runtime.run(crate::demo::run(config)),
            Err(error) => config_exit(&error),
        },
    }
}

/// Writes one line to stderr; a closed stderr is not worth a panic.
fn error_line(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "credlet: {line}");
}

fn config_exit(error: &ConfigError) -> ExitCode {
    error_line(&error.to_string());
    ExitCode::from(EXIT_CONFIG)
}

/// Help and version go to stdout (exit 0, quietly into a closed pipe);
/// parse errors become one [`ConfigError`] line.
fn clap_exit(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ => config_exit(&from_clap(error)),
    }
}

/// A clap error as a [`ConfigError`]: the flag and its variable, what is
/// wrong, on one line.
pub fn from_clap(error: &clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let strings = |kind| match error.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    };
    // `--ca-timeout <CA_TIMEOUT>` → `--ca-timeout`.
    let flags = |kind| -> Vec<String> {
        strings(kind)
            .iter()
            .map(|arg| arg.split([' ', '=']).next().unwrap_or(arg).to_owned())
            .collect()
    };
    let arg = flags(ContextKind::InvalidArg).into_iter().next();
    let value = strings(ContextKind::InvalidValue).into_iter().next();
    match (error.kind(), arg) {
        (ErrorKind::InvalidValue, Some(flag)) => {
            let valid = strings(ContextKind::ValidValue);
            let problem = match value.as_deref() {
                None | Some("") => "needs a value".to_owned(),
                Some(value) if valid.is_empty() => format!("{value:?} is not valid"),
                Some(value) => format!("{value:?} is not one of {}", valid.join(", ")),
            };
            ConfigError::new(&flag, problem)
        }
        (ErrorKind::ValueValidation, Some(flag)) => {
            let problem = std::error::Error::source(error).map_or_else(
                || format!("{:?} is not valid", value.unwrap_or_default()),
                ToString::to_string,
            );
            ConfigError::new(&flag, problem)
        }
        (ErrorKind::MissingRequiredArgument, _) => {
            let missing = flags(ContextKind::InvalidArg);
            let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
            ConfigError::of(&missing, "required, and not set")
        }
        (ErrorKind::ArgumentConflict, Some(flag)) => {
            let prior = flags(ContextKind::PriorArg);
            if prior.is_empty() || prior == [flag.clone()] {
                ConfigError::new(&flag, "given more than once")
            } else {
                let mut both = vec![flag.as_str()];
                both.extend(prior.iter().map(String::as_str));
                ConfigError::of(&both, "exclude each other: give only one")
            }
        }
        (ErrorKind::UnknownArgument, Some(flag)) => {
            let suggestion = strings(ContextKind::SuggestedArg)
                .first()
                .map(|s| format!("; did you mean {s}?"))
                .unwrap_or_default();
            ConfigError::general(format!("unknown flag {flag}{suggestion}"))
        }
        (ErrorKind::InvalidSubcommand, _) => ConfigError::general(format!(
            "unknown mode {:?}: the modes are agent, ca and demo",
            strings(ContextKind::InvalidSubcommand)
                .first()
                .cloned()
                .unwrap_or_default()
        )),
        (ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand, _) => {
            ConfigError::general(
                "no mode given: credlet agent, credlet ca or credlet demo (credlet --help)",
            )
        }
        _ => {
            let text = error.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            ConfigError::general(first.strip_prefix("error: ").unwrap_or(first).trim())
        }
    }
}

/// An error and its causes on one line, each cause once: a cause whose
/// text its wrapper already printed is left out.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string().replace('\n', " ");
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}

/// How the async part runs.
struct Runtime {
    /// `--worker-threads`. One thread means tokio's current-thread
    /// scheduler: a task it wakes runs after the tasks already queued, so
    /// the HTTP/2 connection task writes the answers of many finished calls
    /// in one `writev` instead of one each (the multi-thread scheduler's
    /// LIFO slot runs it straight after every call).
    threads: usize,
    log_format: LogFormat,
}

impl Runtime {
    fn run(self, future: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
        let mut builder = if self.threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(self.threads);
            builder
        };
        let runtime = match builder.enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                error_line(&format!("cannot start the async runtime: {error}"));
                return ExitCode::FAILURE;
            }
        };
        let Err(error) = runtime.block_on(future) else {
            return ExitCode::SUCCESS;
        };
        if let Some(config) = error.chain().find_map(|e| e.downcast_ref::<ConfigError>()) {
            return config_exit(config);
        }
        // Once: as a log event where logs are parsed, else as a plain line.
        let line = one_line(&error);
        match self.log_format {
            LogFormat::Json => tracing::error!(error = %line, "credlet stopped with an error"),
            LogFormat::Text => error_line(&line),
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(args: &[&str]) -> String {
        let (mut command, _) = command_with_deprecated_env(|_| None);
        let error = command.try_get_matches_from_mut(args).expect_err("invalid");
        from_clap(&error).to_string()
    }

    #[test]
    fn clap_errors_name_the_flag_and_its_variable() {
        for (args, line) in [
            (
                &["credlet", "--log-format", "xml", "demo"][..],
                r#"--log-format (CREDLET_LOG_FORMAT): "xml" is not one of text, json"#,
            ),
            (
                &["credlet", "demo", "--lifetime", "soon"],
                r#"--lifetime (CREDLET_LIFETIME): "soon" is not a duration like 90s, 45m, 24h or 1h30m"#,
            ),
            (
                &["credlet", "agent", "--csi-endpoint", "/x.sock"],
                "--node-id (CREDLET_NODE_ID): required, and not set",
            ),
            (
                &["credlet", "demo", "--lifetime", "5s", "--lifetime-s", "5"],
                "--lifetime (CREDLET_LIFETIME) and --lifetime-s (CREDLET_LIFETIME_S): exclude each other: give only one",
            ),
            (
                &["credlet", "demo", "--frobnicate"],
                "unknown flag --frobnicate",
            ),
            (
                &["credlet", "--worker-threads", "65", "demo"],
                "--worker-threads (CREDLET_WORKER_THREADS): 65 is not in 1..=64",
            ),
            (
                &["credlet"],
                "no mode given: credlet agent, credlet ca or credlet demo (credlet --help)",
            ),
        ] {
            assert_eq!(parse_error(args), line, "{args:?}");
        }
    }

    #[test]
    fn a_cause_already_printed_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let error = anyhow::Error::new(io)
            .context("reading /x: No such file")
            .context("loading the key");
        assert_eq!(
            one_line(&error),
            "loading the key: reading /x: No such file"
        );
    }
}
