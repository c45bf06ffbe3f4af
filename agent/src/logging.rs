//! `tracing` set-up: human-readable text or JSON lines, filtered by
//! `RUST_LOG` or `--log-level`.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber, writing to stderr. `level` is used when
/// `RUST_LOG` is unset.
///
/// Without `RUST_LOG` a plain level filter is enough: it avoids building an
/// `EnvFilter`, whose directive parsing compiles regular expressions — a
/// few hundred kilobytes of code touched once and then resident for the
/// agent's lifetime.
pub fn init(format: LogFormat, level: &str) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A closed stderr (`2>&1 | head`) loses log lines silently; the
    // subscriber's own report of it would panic writing to stderr.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .log_internal_errors(false);
    let directives = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let plain_level = level.parse::<LevelFilter>().ok();
    let _ = match (directives, plain_level, format) {
        (None, Some(max), LogFormat::Text) => builder.with_max_level(max).try_init(),
        (None, Some(max), LogFormat::Json) => builder
            .with_max_level(max)
            .json()
            .flatten_event(true)
            .try_init(),
        // RUST_LOG, or a --log-level with per-target directives.
        (directives, _, format) => {
            let directives = directives.unwrap_or_else(|| level.to_owned());
            let filter = EnvFilter::try_new(&directives)
                .unwrap_or_else(|_| EnvFilter::new(LevelFilter::INFO.to_string()));
            let builder = builder.with_env_filter(filter);
            match format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().flatten_event(true).try_init(),
            }
        }
    };
}
