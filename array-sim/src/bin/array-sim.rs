//! `array-sim serve --config FILE --listen unix:PATH|tcp:HOST:PORT [--dir DIR]
//! [--channel-listen ADDR]`: run a simulated disk array as a daemon, as a real array is a
//! separate box on a SCSI or Fibre Channel link; with `--channel-listen`, its channel
//! port too (other arrays and copy agents, see `array_sim::channel`).
//!
//! `array-sim switch --listen ADDR` and `array-sim device --listen ADDR --dir DIR`: the
//! copy agents of EP 1 058 190 [0059] and [0060] (see `array_sim::switch`).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use array_sim::config::ArrayConfig;
use array_sim::engine::Engine;
use array_sim::server::{self, Address, Executor, Listener};
use array_sim::switch::Agent;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "array-sim",
    about = "A simulated disk array serving SCSI commands over a socket"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the array described by a config file.
    Serve {
        /// The array's YAML config.
        #[arg(long)]
        config: PathBuf,
        /// unix:PATH or tcp:HOST:PORT (port 0 picks a free port; the bound address is
        /// printed).
        #[arg(long)]
        listen: Address,
        /// Directory for the LU files and the mode table (default: the config's `dir`).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The channel port, for other arrays' paths and copy agents (needs the config's
        /// `backup` section); its bound address is printed after the host port's.
        #[arg(long)]
        channel_listen: Option<Address>,
    },
    /// The switch of EP 1 058 190 [0059]: executes EXTENDED COPY-like commands.
    Switch {
        #[arg(long)]
        listen: Address,
    },
    /// The backup device of [0060]: media are files of DIR.
    Device {
        #[arg(long)]
        listen: Address,
        #[arg(long)]
        dir: PathBuf,
    },
}

type Ports = Vec<(Arc<dyn Executor>, Address, &'static str)>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut engine = None;
    let ports: Ports = match cli.command {
        Cmd::Serve {
            config,
            listen,
            dir,
            channel_listen,
        } => {
            let e = match open(&config, dir) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("array-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut ports: Ports = vec![(e.clone(), listen, "listening on")];
            if let Some(addr) = channel_listen {
                let Some(port) = e.channel_port() else {
                    eprintln!(
                        "array-sim: --channel-listen: the array's config has no `backup` section"
                    );
                    return ExitCode::from(2);
                };
                ports.push((Arc::new(port), addr, "channel port on"));
            }
            engine = Some(e);
            ports
        }
        Cmd::Switch { listen } => vec![(Arc::new(Agent::switch()), listen, "switch on")],
        Cmd::Device { listen, dir } => {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                eprintln!("array-sim: {}: {e}", dir.display());
                return ExitCode::from(2);
            }
            vec![(Arc::new(Agent::device(dir)), listen, "device on")]
        }
    };
    let code = serve(ports);
    // An orderly stop: every command has ended with the runtime; the bitmaps are
    // written whole and marked clean.
    if let Some(e) = engine {
        if let Err(m) = e.shutdown() {
            eprintln!("array-sim: {m}");
            return ExitCode::FAILURE;
        }
    }
    code
}

fn open(config: &std::path::Path, dir: Option<PathBuf>) -> Result<Arc<Engine>, String> {
    let cfg = ArrayConfig::load(config).map_err(|e| e.to_string())?;
    Engine::open(&cfg, dir.as_deref())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Serve every port until SIGTERM or Ctrl-C; the runtime (and every command still
/// running) has ended when this returns.
fn serve(ports: Ports) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("array-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for (exec, addr, what) in ports {
            let listener = Listener::bind(&addr).await?;
            // Tests and scripts read these lines to learn a port picked by the system.
            println!("array-sim: {what} {}", listener.local_address()?);
            let mut rx = stop_rx.clone();
            let stop: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                let _ = rx.wait_for(|s| *s).await;
            });
            tasks.push(tokio::spawn(server::run(exec, listener, stop)));
        }
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        for t in tasks {
            t.await.map_err(std::io::Error::other)??;
        }
        Ok::<(), std::io::Error>(())
    });
    drop(rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("array-sim: {e}");
            ExitCode::FAILURE
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
