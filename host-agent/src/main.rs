//! `host-agent --config FILE [--state-dir DIR]`: serve the configured virtual LUs over
//! NBD. `host-agent plugin check PATH`: inspect a backend plugin.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hvm_host_agent::agent::{Agent, LogHook};
use hvm_host_agent::config::{Config, LogLevel};
use hvm_host_agent::notify::notify;
use hvm_plugin_abi::host::Plugin;

#[derive(Parser)]
#[command(name = "host-agent", about = "hvm host volume manager service")]
struct Cli {
    /// The service's YAML config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where state (embedded arrays, the NBD socket) lives; overrides the config's.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log level; overrides the config's `log_level` (RUST_LOG overrides both).
    #[arg(long, value_enum)]
    log_level: Option<LogLevel>,
    /// Log lines as text or as JSON objects, on standard error.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect backend plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCmd,
    },
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
        (None, Some(config)) => run(&config, cli.state_dir, cli.log_level, cli.log_format),
        (None, None) => {
            eprintln!("host-agent: give --config FILE, or a subcommand (see --help)");
            ExitCode::from(2)
        }
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
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // A subscriber already set (impossible here) only means these lines go elsewhere.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
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
        let tls_server = match (nbd_tls, listeners.tcp.take()) {
            (Some(tls), Some(tcp)) => {
                let exports: std::sync::Arc<dyn hvm_host_agent::nbd::server::Exports> =
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
        // listen() recorded the TCP listener's bound address.
        let tcp = agent.tcp_bound.get();
        let coord = listeners
            .coordination
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok());
        println!(
            "host-agent: serving {} virtual LUs on unix:{}{}{}",
            agent.virtual_lus.len(),
            agent.socket.display(),
            tcp.map(|t| format!(" and tcp:{t}")).unwrap_or_default(),
            coord
                .map(|c| format!(", coordination on tls:{c}"))
                .unwrap_or_default()
        );
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
        reloads.abort();
        retries.abort();
        Ok::<(), hvm_host_agent::agent::AgentError>(())
    });
    // serve() ended with a checkpoint of every journal; one that failed is not a clean
    // stop: the next start replays the older file and copies more than needed, or finds
    // the state dir still full.
    let unsaved: Vec<String> = agent
        .journals
        .iter()
        .filter_map(|(name, j)| {
            j.failure()
                .map(|why| format!("backend {name}: journal {}: {why}", j.path().display()))
        })
        .collect();
    if result.is_ok() && !unsaved.is_empty() {
        eprintln!(
            "host-agent: the final checkpoint failed: {}",
            unsaved.join("; ")
        );
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
