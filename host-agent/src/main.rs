//! `host-agent`: the hvm service. Subcommands so far: `plugin check PATH`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hvm_plugin_abi::host::Plugin;

#[derive(Parser)]
#[command(name = "host-agent", about = "hvm host volume manager service")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
    match cli.command {
        Cmd::Plugin {
            command: PluginCmd::Check { path, verbose },
        } => match Plugin::load(&path) {
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
    }
}
