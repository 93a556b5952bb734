//! `host-agent [--config FILE] [--state-dir DIR]`: serve the configured virtual LUs over
//! NBD (default config: /etc/hvm/host-agent.yaml, as the package installs it).
//! `host-agent plugin check PATH`: inspect a backend plugin. `host-agent man DIR`,
//! `host-agent completions SHELL`: its man page and completions, for packaging.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hvm_host_agent::agent::{Agent, LogHook};
use hvm_host_agent::config::{Config, LogLevel};
use hvm_host_agent::notify::notify;
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
    let agent = match Agent::build(&cfg, &base, state_dir.as_deref()) {
        Ok(mut a) => {
            a.config_file = Some(config.to_path_buf());
            let _ = a.log_level.set(hook);
            std::sync::Arc::new(a)
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
    let nbd_tls = match nbd_tls_config(&cfg, &base) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("host-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let mut listeners = agent.listen().await?;
        // With listen.tls the NBD TCP listener is served here, each connection upgraded
        // with STARTTLS; the agent serves the rest.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = admin_extras(&cfg, &agent, stop_rx.clone()).await?;
        let tls_server = match (nbd_tls, listeners.tcp.take()) {
            (Some(tls), Some(tcp)) => {
                let exports: std::sync::Arc<dyn hvm_host_agent::nbd::export::Exports> =
                    agent.exports.clone();
                let mut rx = stop_rx;
                Some(tokio::spawn(hvm_host_agent::nbd::server::run_tcp_tls(
                    tcp,
                    exports,
                    hvm_host_agent::nbd::server::Limits::default(),
                    Some(tls),
                    async move {
                        let _ = rx.changed().await;
                    },
                )))
            }
            (_, tcp) => {
                listeners.tcp = tcp;
                None
            }
        };
        // Scripts and tests wait for this line: the sockets are bound.
        let tcp = agent.tcp_bound.get();
        println!("{}", serving_line(&agent, &listeners, metrics.as_ref().map(|m| m.0)));
        tracing::info!(socket = %agent.socket.display(), tcp = ?tcp, control = %agent.control.display(), "serving");
        let status = format!("serving {} virtual LUs", agent.virtual_lus.len());
        notify(&format!("READY=1\nSTATUS={status}"));
        let reloads = tokio::spawn(reload_on_sighup(agent.clone(), status));
        let retries = tokio::spawn(retry_failed_journals(agent.clone()));
        agent
            .serve(listeners, async {
                shutdown_signal().await;
                notify("STOPPING=1\nSTATUS=draining connections");
                let _ = stop_tx.send(true);
            })
            .await;
        if let Some(t) = tls_server {
            let _ = t.await;
        }
        if let Some((_, m)) = metrics {
            let _ = m.await;
        }
        reloads.abort();
        retries.abort();
        Ok::<(), hvm_host_agent::agent::AgentError>(())
    });
    if let (Ok(()), Some(unsaved)) = (&result, unsaved_journals(&agent)) {
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

/// On each SIGHUP: reload the config (see `hvm_host_agent::reload`), telling the service
/// manager around it.
async fn reload_on_sighup(agent: std::sync::Arc<Agent>, status: String) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP; reload through the control API");
            return;
        }
    };
    while hup.recv().await.is_some() {
        notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            hvm_host_agent::notify::monotonic_usec()
        ));
        let a = agent.clone();
        let report = tokio::task::spawn_blocking(move || a.reload()).await;
        let line = match report {
            Ok(r) if r.error.is_some() => "reload failed; config unchanged".to_string(),
            Ok(r) if !r.needs_restart.is_empty() => {
                format!(
                    "reloaded; {} change(s) need a restart",
                    r.needs_restart.len()
                )
            }
            _ => "reloaded".to_string(),
        };
        notify(&format!("READY=1\nSTATUS={status}; {line}"));
    }
}

/// The line scripts and tests wait for: what is served where (listen() recorded the TCP
/// listener's bound address).
fn serving_line(
    agent: &Agent,
    listeners: &hvm_host_agent::agent::Listeners,
    metrics: Option<std::net::SocketAddr>,
) -> String {
    let coord = listeners
        .coordination
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok());
    format!(
        "host-agent: serving {} virtual LUs on unix:{}{}{}{}",
        agent.virtual_lus.len(),
        agent.socket.display(),
        agent
            .tcp_bound
            .get()
            .map(|t| format!(" and tcp:{t}"))
            .unwrap_or_default(),
        coord
            .map(|c| format!(", coordination on tls:{c}"))
            .unwrap_or_default(),
        metrics
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default()
    )
}

/// serve() ends with a checkpoint of every journal; one that failed is not a clean stop:
/// the next start replays the older file and copies more than needed, or finds the state
/// dir still full.
fn unsaved_journals(agent: &Agent) -> Option<String> {
    let unsaved: Vec<String> = agent
        .journals
        .iter()
        .filter_map(|(name, j)| {
            j.failure()
                .map(|why| format!("backend {name}: journal {}: {why}", j.path().display()))
        })
        .collect();
    (!unsaved.is_empty()).then(|| unsaved.join("; "))
}

/// What an admin's config adds once the sockets are bound: `control_group` on the
/// control socket, and with `listen.metrics` a listener serving `GET /metrics` until
/// `stop` changes (its bound address, the port chosen when it was 0, and its task).
async fn admin_extras(
    cfg: &Config,
    agent: &std::sync::Arc<Agent>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<
    Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>,
    hvm_host_agent::agent::AgentError,
> {
    if let Some(group) = &cfg.control_group {
        hvm_host_agent::control::share_with_group(&agent.control, group).map_err(|source| {
            hvm_host_agent::agent::AgentError::Io {
                path: agent.control.clone(),
                source,
            }
        })?;
    }
    serve_metrics(cfg, agent, stop).await
}

/// With `listen.metrics`: bind it and serve `GET /metrics` there until `stop` changes;
/// the bound address (the port chosen when it was 0) and the server's task.
async fn serve_metrics(
    cfg: &Config,
    agent: &std::sync::Arc<Agent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<
    Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>,
    hvm_host_agent::agent::AgentError,
> {
    let Some(addr) = &cfg.listen.metrics else {
        return Ok(None);
    };
    let io = |source| hvm_host_agent::agent::AgentError::Io {
        path: PathBuf::from(format!("listen.metrics {addr}")),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
    let bound = listener.local_addr().map_err(io)?;
    tracing::info!(address = %bound, "metrics listening (GET /metrics, plain HTTP)");
    let task = tokio::spawn(hvm_host_agent::control::serve_metrics(
        listener,
        agent.clone(),
        async move {
            let _ = stop.changed().await;
        },
    ));
    Ok(Some((bound, task)))
}

/// The TLS server config of `listen.tls` (files relative to the config's directory).
fn nbd_tls_config(
    cfg: &Config,
    base: &std::path::Path,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
    let Some(t) = &cfg.listen.tls else {
        return Ok(None);
    };
    let at = |p: &std::path::Path| base.join(p);
    hvm_host_agent::coord::tls::mutual_server_config(&at(&t.cert), &at(&t.key), &at(&t.ca))
        .map(Some)
        .map_err(|e| format!("listen.tls: {e}"))
}

/// Write failed journals again now and then, so the agent recovers when the disk has
/// room again even while no write comes to do it.
async fn retry_failed_journals(agent: std::sync::Arc<Agent>) {
    let mut tick = tokio::time::interval(hvm_host_agent::durable::RETRY_EVERY);
    loop {
        tick.tick().await;
        let failed: Vec<_> = agent
            .journals
            .values()
            .filter(|j| j.failure().is_some())
            .cloned()
            .collect();
        for j in failed {
            let _ = tokio::task::spawn_blocking(move || j.retry()).await;
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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
