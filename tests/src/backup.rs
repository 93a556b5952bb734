//! Two hosts and an array for the backup coordination tests: an `array-sim` daemon (the
//! array both hosts reach, as over a SAN), a database host's agent with virtual LUs and a
//! backup host's agent with its own plugin for the same array, TLS certificates and a
//! token from `hvmctl tls init` ([`Hosts`]); and [`Site`], many database hosts (each
//! with its own embedded array) and one backup host, for the S3 and fleet tests.
#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::agent::Agent;
use crate::{binary, spawn_ready, Running};

/// The steps of a `hvmctl backup run --json` report: name and milliseconds.
pub fn steps(report: &serde_json::Value) -> Vec<(&str, f64)> {
    report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["step"].as_str().unwrap_or("?"),
                s["ms"].as_f64().unwrap_or(0.0),
            )
        })
        .collect()
}

pub struct Hosts {
    pub dir: PathBuf,
    /// The array-sim daemon, with [`Storage::ArraySim`].
    pub array: Option<Running>,
    pub db: Agent,
    pub backup: Agent,
    /// Coordination addresses, `127.0.0.1:PORT`.
    pub db_addr: String,
    pub backup_addr: String,
    /// The database host's NBD TCP address.
    pub db_nbd: String,
    pub tls: PathBuf,
    pub target_root: PathBuf,
}

/// What the hosts look like.
pub struct Setup<'a> {
    /// Bytes per virtual LU (a multiple of 512).
    pub lu_bytes: u64,
    /// Virtual LUs (two pairs: `a` on LUs 1/2, `b` on LUs 4/5), or `pg` alone.
    pub names: &'a [&'a str],
    /// YAML for `coordination.freeze` on the database host (indented by 4).
    pub freeze: &'a str,
}

/// What the database host's virtual LUs sit on.
#[derive(Clone, Copy, Debug)]
pub enum Storage<'a> {
    /// An array-sim daemon that both hosts reach, as over a SAN: LUs 3i+1 and 3i+2 for
    /// the i-th virtual LU, mirror LU 3i.
    ArraySim,
    /// The database host's own backends: YAML for `backends:` entries, one of them named
    /// `array0` with mirror LUs 0, 3, ... for the virtual LUs (a file, nbd or rbd
    /// backend). The backup host has no backend: it pulls snapshots over NBD (`--via
    /// nbd`).
    Backend(&'a str),
}

/// `hvmctl tls init DIR/tls --host 127.0.0.1`: a CA, the hosts' certificate, a console
/// certificate and a token for agents on 127.0.0.1; returns the directory.
pub fn tls_init(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    let out = Command::new(binary("hvmctl"))
        .args(["tls", "init"])
        .arg(&tls)
        .args(["--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tls init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tls
}

/// The `coordination:` section of an agent with `roles`, listening on a free port with
/// [`tls_init`]'s certificate and token; `extra` is appended (role sections).
pub fn coordination_config(tls: &Path, roles: &str, extra: &str) -> String {
    format!(
        "coordination:\n  listen: 127.0.0.1:0\n  cert: {t}/127.0.0.1.pem\n  key: {t}/127.0.0.1-key.pem\n  token_file: {t}/token\n  roles: [{roles}]\n{extra}",
        t = tls.display()
    )
}

/// The coordination address in host-agent's "serving" line.
pub fn coordination_address(line: &str) -> String {
    line.rsplit_once("coordination on tls:")
        .map(|(_, a)| a.trim().to_string())
        .unwrap_or_else(|| panic!("no coordination address in {line:?}"))
}

/// Start an array-sim daemon with one stateless row per virtual LU; returns it and the
/// `backends:` entry that reaches it.
fn start_array(dir: &Path, s: &Setup<'_>) -> (Running, String) {
    let blocks = s.lu_bytes / 512;
    let mut lus = String::new();
    let mut mirroring = String::new();
    for i in 0..s.names.len() as u32 {
        let (m, o, t) = (3 * i, 3 * i + 1, 3 * i + 2);
        lus.push_str(&format!(
                "  - {{lun: {o}, blocks: {blocks}, disk: d0}}\n  - {{lun: {t}, blocks: {blocks}, disk: d1}}\n"
            ));
        mirroring.push_str(&format!("  - {{mirror: {m}, origin: {o}, mate: {t}}}\n"));
    }
    let array_cfg = dir.join("array.yaml");
    std::fs::write(
            &array_cfg,
            format!(
                "kind: stateless\ndir: {}\ndisks: [{{name: d0}}, {{name: d1}}]\nlus:\n{lus}mirroring:\n{mirroring}",
                dir.join("array").display()
            ),
        )
        .unwrap();
    let sock = dir.join("array.sock");
    let (array, line) = spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(&array_cfg)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display())),
    );
    assert!(line.contains("listening"), "array-sim: {line:?}");
    let backend = format!(
            "  - name: array0\n    plugin: stateless\n    params: {{ array: {{ connect: \"unix:{}\" }} }}\n",
            sock.display()
        );
    (array, backend)
}

impl Hosts {
    /// The hosts on an array-sim daemon ([`Storage::ArraySim`]).
    pub fn start(dir: &Path, s: &Setup<'_>) -> Hosts {
        Hosts::start_on(dir, s, Storage::ArraySim)
    }

    pub fn start_on(dir: &Path, s: &Setup<'_>, storage: Storage<'_>) -> Hosts {
        let tls = tls_init(dir);
        let (array, db_backend, backup_backend) = match storage {
            Storage::ArraySim => {
                let (array, backend) = start_array(dir, s);
                (Some(array), backend.clone(), backend)
            }
            Storage::Backend(yaml) => (None, yaml.to_string(), String::new()),
        };
        let coordination = |roles: &str, extra: &str| coordination_config(&tls, roles, extra);
        let mut vlus = String::from("virtual_lus:\n");
        for (i, n) in s.names.iter().enumerate() {
            vlus.push_str(&format!(
                "  - {{ name: {n}, backend: array0, lu: {}, snapshots: [{n}-snap] }}\n",
                3 * i
            ));
        }
        let plugin_dir = crate::target_dir();
        let db_cfg = dir.join("db.yaml");
        std::fs::write(
            &db_cfg,
            format!(
                "plugin_dir: {}\nlisten:\n  unix: nbd.sock\n  tcp: 127.0.0.1:0\n  tls: {{ cert: {t}/127.0.0.1.pem, key: {t}/127.0.0.1-key.pem, ca: {t}/ca.pem }}\nbackends:\n{db_backend}{vlus}{}",
                plugin_dir.display(),
                coordination("database", &format!("  freeze:\n{}", s.freeze)),
                t = tls.display()
            ),
        )
        .unwrap();
        let target_root = dir.join("backups");
        let bk_cfg = dir.join("backup.yaml");
        std::fs::write(
            &bk_cfg,
            format!(
                "plugin_dir: {}\nlisten:\n  unix: nbd.sock\nbackends:\n{}{}",
                plugin_dir.display(),
                if backup_backend.is_empty() {
                    "  []\n"
                } else {
                    &backup_backend
                },
                coordination(
                    "backup",
                    &format!("  backup:\n    target_root: {}\n", target_root.display())
                )
            ),
        )
        .unwrap();
        let db_state = dir.join("db");
        let (proc, line) = spawn_ready(&mut Agent::command(&db_cfg, &db_state));
        assert!(
            line.starts_with("host-agent: serving"),
            "db agent: {line:?}"
        );
        let db_addr = coordination_address(&line);
        let db_nbd = line
            .split(" and tcp:")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap()
            .to_string();
        let db = Agent {
            proc,
            state: db_state,
        };
        let bk_state = dir.join("bk");
        let (proc, line) = spawn_ready(&mut Agent::command(&bk_cfg, &bk_state));
        assert!(
            line.starts_with("host-agent: serving"),
            "backup agent: {line:?}"
        );
        let backup_addr = coordination_address(&line);
        let backup = Agent {
            proc,
            state: bk_state,
        };
        Hosts {
            dir: dir.to_path_buf(),
            array,
            db,
            backup,
            db_addr,
            backup_addr,
            db_nbd,
            tls,
            target_root,
        }
    }

    /// `hvmctl backup ARGS` with this set-up's CA and token.
    pub fn hvmctl(&self, args: &[&str]) -> Output {
        let mut c = Command::new(binary("hvmctl"));
        c.arg("--json").args(args);
        let remote = ["run", "delete", "list", "verify", "restore", "prune"];
        if args.get(1).is_some_and(|a| remote.contains(a)) {
            c.arg("--ca")
                .arg(self.tls.join("ca.pem"))
                .arg("--token-file")
                .arg(self.tls.join("token"));
        }
        c.output().unwrap()
    }

    /// `hvmctl backup run` of `vlus` into `target`, with extra arguments.
    pub fn run(&self, vlus: &[&str], target: &str, extra: &[&str]) -> (Output, serde_json::Value) {
        let mut args = vec![
            "backup",
            "run",
            "--db",
            &self.db_addr,
            "--backup",
            &self.backup_addr,
            "--target",
            target,
        ];
        for v in vlus {
            args.extend(["--vlu", v]);
        }
        args.extend(extra);
        let out = self.hvmctl(&args);
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out, v)
    }

    /// `hvmctl backup restore` of `vlu` (the only one if `None`) at backup `id` to `to`
    /// (a new file on this, the backup host), expecting success.
    pub fn restore(&self, id: &str, vlu: Option<&str>, to: &Path) {
        let out = self.try_restore(id, vlu, to);
        assert!(
            out.status.success(),
            "restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `hvmctl backup restore` of `vlu` at backup `id` to `to`.
    pub fn try_restore(&self, id: &str, vlu: Option<&str>, to: &Path) -> Output {
        let mut args = vec![
            "backup",
            "restore",
            id,
            "--backup",
            &self.backup_addr,
            "--to",
            to.to_str().unwrap(),
        ];
        if let Some(v) = vlu {
            args.extend(["--vlu", v]);
        }
        self.hvmctl(&args)
    }

    /// `hvmctl backup verify ID`.
    pub fn verify(&self, id: &str) -> Output {
        self.hvmctl(&["backup", "verify", id, "--backup", &self.backup_addr])
    }

    /// `hvmctl backup list --json` (of one repository if `target` is given).
    pub fn list(&self, target: Option<&str>) -> serde_json::Value {
        let mut args = vec!["backup", "list", "--backup", &self.backup_addr];
        if let Some(t) = target {
            args.extend(["--target", t]);
        }
        let out = self.hvmctl(&args);
        assert!(
            out.status.success(),
            "list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The manifest of backup `id` in repository `target`, read directly.
    pub fn manifest(&self, target: &str, id: &str) -> serde_json::Value {
        let p = self
            .target_root
            .join(target)
            .join(format!("backups/{id}/manifest.json"));
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    }

    /// The file of chunk `hash` in repository `target`.
    pub fn chunk_path(&self, target: &str, hash: &str) -> PathBuf {
        self.target_root
            .join(target)
            .join(format!("chunks/{}/{hash}", &hash[..2]))
    }

    /// A small file of backup `id` (the PostgreSQL `backup_label`), decompressed from
    /// its chunk with the `zstd` tool.
    pub fn backup_file(&self, target: &str, id: &str, name: &str) -> Vec<u8> {
        let m = self.manifest(target, id);
        let f = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no file {name} in {m}"));
        let out = Command::new("zstd")
            .arg("-dc")
            .arg(self.chunk_path(target, f["chunk"].as_str().unwrap()))
            .output()
            .expect("zstd (Debian package zstd) is needed");
        assert!(out.status.success(), "zstd: {:?}", out);
        out.stdout
    }

    /// The database host's `snapshot_read_bytes` counter.
    pub fn db_snapshot_reads(&self) -> u64 {
        self.db.json(&["status"])["snapshot_read_bytes"]
            .as_u64()
            .unwrap()
    }

    /// The files of the array's real LU `lun`.
    pub fn lu_file(&self, lun: u32) -> PathBuf {
        self.dir.join(format!("array/lu{lun}.img"))
    }
}

/// Hosts for the backup tests on one machine: `n` database hosts (host-agent processes,
/// each with its own embedded stateless array and virtual LU `pg` on LUs 1/2) and one
/// backup host, all on 127.0.0.1 with free ports, sharing one CA and token. The backup
/// host gets `backup_env` (an [`Rgw`]'s [`Rgw::env`] for `s3://` targets).
pub struct Site {
    pub dir: PathBuf,
    pub tls: PathBuf,
    /// Database hosts and their coordination addresses.
    pub dbs: Vec<(crate::agent::Agent, String)>,
    pub backup: crate::agent::Agent,
    pub backup_addr: String,
    /// The backup host's target_root.
    pub repos: PathBuf,
}

impl Site {
    pub fn start(
        dir: &std::path::Path,
        n: usize,
        blocks: u64,
        backup_env: &[(&str, String)],
    ) -> Site {
        let tls = tls_init(dir);
        let dbs = (0..n)
            .map(|i| {
                let d = dir.join(format!("db{i:02}"));
                start_site_agent(&d, &db_config(&d, &tls, blocks), &[])
            })
            .collect();
        let bk = dir.join("bk");
        let repos = bk.join("repos");
        let bk_cfg = format!(
            "plugin_dir: {}\nlisten:\n  unix: nbd.sock\nbackends: []\n{}",
            crate::target_dir().display(),
            coordination_config(
                &tls,
                "backup",
                &format!("  backup:\n    target_root: {}\n", repos.display())
            )
        );
        let (backup, backup_addr) = start_site_agent(&bk, &bk_cfg, backup_env);
        Site {
            dir: dir.to_path_buf(),
            tls,
            dbs,
            backup,
            backup_addr,
            repos,
        }
    }

    /// hvmctl with this site's CA and token in its environment (`HVM_CA`,
    /// `HVM_TOKEN_FILE`; the console certificate beside the CA).
    pub fn hvmctl(&self) -> Command {
        let mut c = Command::new(crate::binary("hvmctl"));
        c.env("HVM_CA", self.tls.join("ca.pem"))
            .env("HVM_TOKEN_FILE", self.tls.join("token"))
            .env_remove("HVM_CERT")
            .env_remove("HVM_KEY")
            .env_remove("HVM_POLICY_STATE");
        c
    }

    /// `hvmctl --json ARGS`, expecting success; its JSON answer.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.hvmctl().arg("--json").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "hvmctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "hvmctl {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A database host with an embedded stateless array: virtual LU `pg` on LUs 1/2, NBD on
/// TCP with TLS (the backup host pulls the snapshot from there).
fn db_config(dir: &std::path::Path, tls: &std::path::Path, blocks: u64) -> String {
    format!(
        "plugin_dir: {}\nlisten:\n  unix: nbd.sock\n  tcp: 127.0.0.1:0\n  tls: {{ cert: {t}/127.0.0.1.pem, key: {t}/127.0.0.1-key.pem, ca: {t}/ca.pem }}\nbackends:\n  - name: array0\n    plugin: stateless\n    params:\n      array:\n        embedded:\n          kind: stateless\n          dir: {}\n          disks: [{{ name: d0 }}, {{ name: d1 }}]\n          lus:\n            - {{ lun: 1, blocks: {blocks}, disk: d0 }}\n            - {{ lun: 2, blocks: {blocks}, disk: d1 }}\n          mirroring:\n            - {{ mirror: 0, origin: 1, mate: 2 }}\nvirtual_lus:\n  - {{ name: pg, backend: array0, lu: 0, snapshots: [pg-snap] }}\n{}",
        crate::target_dir().display(),
        dir.join("array").display(),
        coordination_config(tls, "database", "  freeze:\n    deadline_ms: 5000\n"),
        t = tls.display()
    )
}

fn start_site_agent(
    dir: &std::path::Path,
    config: &str,
    env: &[(&str, String)],
) -> (crate::agent::Agent, String) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, config).unwrap();
    let state = dir.join("state");
    let mut cmd = crate::agent::Agent::command(&cfg, &state);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let (proc, line) = crate::spawn_ready(&mut cmd);
    assert!(
        line.starts_with("host-agent: serving"),
        "{}: {line:?}",
        dir.display()
    );
    let addr = coordination_address(&line);
    (crate::agent::Agent { proc, state }, addr)
}
