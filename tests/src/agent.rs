//! A host-agent started for a test, driven through hvmctl and real NBD clients.
#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::{binary, spawn_ready, tool, workspace, Running};

/// A running host-agent with its state directory.
pub struct Agent {
    pub proc: Running,
    pub state: PathBuf,
}

impl Agent {
    /// host-agent on the quickstart config, its state in `state`.
    pub fn start(state: &Path) -> Agent {
        Agent::start_config(
            &workspace().join("host-agent/examples/quickstart.yaml"),
            state,
        )
    }

    /// host-agent on `config`, its state in `state`.
    pub fn start_config(config: &Path, state: &Path) -> Agent {
        Agent::spawn(&mut Agent::command(config, state), state)
    }

    /// The command that starts host-agent on `config` with its state in `state`.
    pub fn command(config: &Path, state: &Path) -> Command {
        let mut c = Command::new(binary("host-agent"));
        c.arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("NOTIFY_SOCKET");
        c
    }

    /// Start host-agent on `config` expecting it to refuse to start (a non-zero exit
    /// within 30 s); returns what it printed on stderr.
    pub fn refused_at_start(config: &Path, state: &Path) -> String {
        let mut child = Agent::command(config, state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("host-agent started on {}", config.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(!status.success());
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        err
    }

    /// Start `cmd` (from [`Agent::command`]) and wait until it serves.
    pub fn spawn(cmd: &mut Command, state: &Path) -> Agent {
        let (proc, line) = spawn_ready(cmd);
        assert!(line.starts_with("host-agent: serving"), "{line:?}");
        Agent {
            proc,
            state: state.to_path_buf(),
        }
    }

    pub fn control(&self) -> PathBuf {
        self.state.join("run/control.sock")
    }

    pub fn hvmctl(&self, args: &[&str]) -> Output {
        Command::new(binary("hvmctl"))
            .arg("--socket")
            .arg(self.control())
            .args(args)
            .output()
            .unwrap()
    }

    /// Run hvmctl with `--json`, expecting success.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.hvmctl(&a);
        assert!(
            out.status.success(),
            "hvmctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// hvmctl that must fail with exit status 1; returns its message.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.hvmctl(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "hvmctl {args:?} should be refused"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.state.join("nbd.sock").display()
        )
    }

    pub fn qemu_io(&self, export: &str, cmds: &[&str]) {
        let mut c = tool("qemu-io");
        c.args(["-f", "raw", &self.uri(export)]);
        if export.ends_with("-snap") {
            c.arg("-r"); // snapshot exports of the quickstart are read-only
        }
        for x in cmds {
            c.args(["-c", x]);
        }
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("failed"),
            "qemu-io {cmds:?}: {text}"
        );
    }

    pub fn mode(&self, name: &str) -> String {
        let lus = self.json(&["lu", "list"]);
        let lu = lus
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
            .clone();
        lu["mode"].as_str().unwrap().to_string()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.proc.0.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }
}
