//! Man pages and shell completions, made from the commands' clap definitions
//! (`clap_mangen`, `clap_complete`) so they never drift from `--help`: `hvmctl man DIR`,
//! `hvmctl completions SHELL`, and the same subcommands of `host-agent`. The package
//! (`scripts/package.sh`) installs their output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use clap_complete::Shell;

/// Write the man page of `cmd` and of each of its (visible) subcommands into `dir`
/// (`hvmctl.1`, `hvmctl-lu-list.1`, ...): the files written, sorted.
pub fn write_man(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|f| f.starts_with(&name) && f.ends_with(".1"))
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    Ok(files)
}

/// [`write_man`], listing the files written on standard output (`host-agent man DIR`).
pub fn man(cmd: clap::Command, dir: &Path) -> ExitCode {
    let name = cmd.get_name().to_string();
    match write_man(cmd, dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name} man: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// The completion script of `cmd` for `shell`, on standard output (a reader that stops
/// early, as `| head` does, is no error).
pub fn write_completions(mut cmd: clap::Command, shell: Shell) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// [`write_completions`] with its exit status (`host-agent completions SHELL`).
pub fn completions(cmd: clap::Command, shell: Shell) -> ExitCode {
    let name = cmd.get_name().to_string();
    match write_completions(cmd, shell) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} completions: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("demo")
            .about("a demo")
            .subcommand(clap::Command::new("list").about("list things"))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn pages_for_the_command_and_its_visible_subcommands() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(man(cli(), d.path()), ExitCode::SUCCESS);
        let mut files: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["demo-list.1", "demo.1"]);
        let page = std::fs::read_to_string(d.path().join("demo.1")).unwrap();
        assert!(
            page.contains(".TH demo 1") && page.contains("a demo"),
            "{page}"
        );
    }
}
