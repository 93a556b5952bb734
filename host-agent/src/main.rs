//! `host-agent [--config FILE] [--state-dir DIR]`: serve the configured virtual LUs over
//! NBD (default config: /etc/hvm/host-agent.yaml, as the package installs it).
//! `host-agent plugin check PATH`: inspect a backend plugin. `host-agent man DIR`,
//! `host-agent completions SHELL`: its man page and completions, for packaging.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use hvm_host_agent::config::{Config, LogLevel};
use hvm_host_agent::host::LogHook;
use hvm_host_agent::{agent, service};
use hvm_plugin_abi::host::Plugin;

#[derive(Parser)]
#[command(name = "host-agent", about = "hvm host volume manager service")]
struct Cli {
    /// The service's YAML config.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Where state (embedded arrays, the NBD socket) lives; overrides the config's.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log level; overrides the config's `log_level` (RUST_LOG overrides both).
    #[arg(long, value_enum)]
    log_level: Option<LogLevel>,
    /// Where log lines go: auto is journald when standard error is the journal
    /// (systemd's JOURNAL_STREAM), else text; text or JSON objects on standard error;
    /// journald, with syslog priorities (error 3, warn 4, info 6, debug and trace 7).
    #[arg(long, value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// The config the package installs, and the default of `--config`.
const DEFAULT_CONFIG: &str = "/etc/hvm/host-agent.yaml";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
    Journald,
}

impl LogFormat {
    /// `auto` decided: journald when standard error is the journal stream.
    fn resolve(self) -> LogFormat {
        if self != LogFormat::Auto {
            return self;
        }
        let stderr = nix::sys::stat::fstat(std::io::stderr()).ok();
        let var = std::env::var("JOURNAL_STREAM").ok();
        match stderr {
            Some(st) if is_journal_stream(var.as_deref(), st.st_dev, st.st_ino) => {
                LogFormat::Journald
            }
            _ => LogFormat::Text,
        }
    }
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for a service whose standard error is the
/// journal; the variable is inherited by children whose stderr may be elsewhere, so it
/// counts only when it names this stderr.
fn is_journal_stream(var: Option<&str>, dev: u64, ino: u64) -> bool {
    var.and_then(|v| v.split_once(':'))
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect backend plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCmd,
    },
    /// Write host-agent's man page into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Print the shell completion script of host-agent.
    #[command(hide = true)]
    Completions { shell: hvm_host_agent::docs::Shell },
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Load a plugin and print its name, version, capabilities and thread model, or why
    /// it cannot be loaded (exit status 1).
    Check {
        /// The plugin's shared library.
        path: PathBuf,
        /// On failure, also print abi_stable's full report.
        #[arg(long)]
        verbose: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match (cli.command, cli.config) {
        (
            Some(Cmd::Plugin {
                command: PluginCmd::Check { path, verbose },
            }),
            _,
        ) => match Plugin::load(&path) {
            Ok(p) => {
                print!("{}", hvm_host_agent::plugin_check(&p));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("host-agent: {e}");
                if verbose {
                    if let Some(detail) = std::error::Error::source(&e) {
                        eprintln!("{detail}");
                    }
                }
                ExitCode::FAILURE
            }
        },
        (Some(Cmd::Man { dir }), _) => hvm_host_agent::docs::man(Cli::command(), &dir),
        (Some(Cmd::Completions { shell }), _) => {
            hvm_host_agent::docs::completions(Cli::command(), shell)
        }
        (None, config) => run(&config, cli.state_dir, cli.log_level, cli.log_format),
    }
}

/// Set up logging on standard error. Returns the hook that changes the level on a
/// reload, which refuses when `--log-level` or `RUST_LOG` decided the level.
fn init_logging(level: LogLevel, overridden: bool, format: LogFormat) -> LogHook {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, EnvFilter, Layer};
    let from_env = EnvFilter::try_from_default_env().ok();
    let by_env = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level.as_str()));
    let (filter, handle) = reload::Layer::new(filter);
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let mut no_journal = None;
    let out = match format.resolve() {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Journald => match journald() {
            Ok(j) => j.boxed(),
            Err(e) => {
                no_journal = Some(e);
                fmt.boxed()
            }
        },
        LogFormat::Text | LogFormat::Auto => fmt.boxed(),
    };
    // A subscriber already set (impossible here) only means these lines go elsewhere.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(out)
        .try_init();
    if let Some(e) = no_journal {
        tracing::warn!(error = %e, "cannot log to journald; logging text on standard error");
    }
    Box::new(move |level: LogLevel| {
        if by_env {
            return Err("RUST_LOG overrides the config's log_level".into());
        }
        if overridden {
            return Err("--log-level overrides the config's log_level".into());
        }
        handle
            .reload(EnvFilter::new(level.as_str()))
            .map_err(|e| e.to_string())
    })
}

/// The journald layer, with syslog's priorities for tracing's levels (tracing-journald's
/// own default puts info at notice).
fn journald() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    let p = PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    };
    Ok(tracing_journald::layer()?
        .with_priority_mappings(p)
        .with_syslog_identifier("host-agent".into()))
}

fn run(
    config: &std::path::Path,
    state_dir: Option<PathBuf>,
    log_level: Option<LogLevel>,
    log_format: LogFormat,
) -> ExitCode {
    let (cfg, base) = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let hook = init_logging(
        log_level.unwrap_or(cfg.log_level),
        log_level.is_some(),
        log_format,
    );
    let host = match agent::build(&cfg, &base, state_dir.as_deref()) {
        Ok(mut h) => {
            h.config_file = Some(config.to_path_buf());
            let _ = h.log_level.set(hook);
            Arc::new(h)
        }
        Err(e) => {
            eprintln!("host-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("host-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(service::run(host.clone(), &cfg, &base));
    if let (Ok(()), Some(unsaved)) = (&result, service::unsaved_journals(&host)) {
        eprintln!("host-agent: the final checkpoint failed: {unsaved}");
        return ExitCode::FAILURE;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_counts_only_for_this_stderr() {
        assert!(is_journal_stream(Some("8:1234"), 8, 1234));
        assert!(!is_journal_stream(Some("8:1234"), 8, 1235));
        assert!(!is_journal_stream(Some("8"), 8, 1234));
        assert!(!is_journal_stream(None, 8, 1234));
        // Not under systemd here: auto is text.
        std::env::remove_var("JOURNAL_STREAM");
        assert_eq!(LogFormat::Auto.resolve(), LogFormat::Text);
        assert_eq!(LogFormat::Json.resolve(), LogFormat::Json);
    }

    #[test]
    fn the_default_config_is_the_packaged_one() {
        let cli = Cli::try_parse_from(["host-agent"]).unwrap();
        assert_eq!(cli.config, PathBuf::from("/etc/hvm/host-agent.yaml"));
        Cli::command().debug_assert();
    }
}
