//! `array-sim serve --config FILE --listen unix:PATH|tcp:HOST:PORT [--dir DIR]`: run a
//! simulated disk array as a daemon, as a real array is a separate box on a SCSI or Fibre
//! Channel link.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use array_sim::config::ArrayConfig;
use array_sim::engine::Engine;
use array_sim::server::{self, Address, Listener};
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Cmd::Serve {
        config,
        listen,
        dir,
    } = cli.command;
    let cfg = match ArrayConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("array-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let engine = match Engine::open(&cfg, dir.as_deref()) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("array-sim: {e}");
            return ExitCode::from(2);
        }
    };
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
        let listener = Listener::bind(&listen).await?;
        // Tests and scripts read this line to learn a port picked by the system.
        println!("array-sim: listening on {}", listener.local_address()?);
        server::run(engine, listener, shutdown_signal()).await
    });
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
