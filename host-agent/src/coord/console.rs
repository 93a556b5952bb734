//! The management console: `hvmctl backup run`. It asks the database host to quiesce,
//! snapshot the virtual LUs at one instant and resume; asks the backup host to copy the
//! snapshots; asks the database host to delete them (resync starts) and, if asked, waits
//! for the resync. Each step is printed with its duration. If a step fails, it says which
//! and leaves the system clean: the snapshots deleted and resync started, or the exact
//! command to finish by hand.

use std::time::Instant;

use serde_json::{json, Value};

use super::{new_id, Code, CopyLu, CopyRequest, Failure, Op, Peer, Source};
use crate::ctl;

/// Where the backup host reads the snapshot from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The array when the snapshot is a real LU there (E1, E2), else NBD.
    Auto,
    /// The array only; an E4 snapshot is refused.
    Array,
    /// The database host's snapshot export over NBD.
    Nbd,
}

pub struct Options {
    pub db: Peer,
    pub backup: Peer,
    pub vlus: Vec<String>,
    pub target: String,
    pub via: Via,
    /// `HOST:PORT` of the database host's NBD listener, if not its `listen.tcp` with the
    /// host of `--db`.
    pub db_nbd: Option<String>,
    pub deadline_ms: Option<u64>,
    pub wait_resync: bool,
    /// Print step lines and bars (false with --json).
    pub human: bool,
}

/// What a run did, and how it failed if it did.
pub struct Report {
    pub value: Value,
    pub error: Option<String>,
}

struct Run<'a> {
    o: &'a Options,
    id: String,
    steps: Vec<Value>,
}

impl Run<'_> {
    fn say(&self, line: &str) {
        if self.o.human {
            println!("{line}");
        }
    }

    fn step(&mut self, name: &str, ms: f64, note: &str) {
        self.say(&format!("  {name:<40} {:>10}{note}", fmt_ms(ms)));
        self.steps.push(json!({ "step": name, "ms": ms }));
    }

    /// The steps an agent reported (`{"steps": [{"step", "ms"}]}`).
    fn agent_steps(&mut self, reply: &Value) {
        for s in reply["steps"].as_array().into_iter().flatten() {
            let name = s["step"].as_str().unwrap_or("?").to_string();
            self.step(&name, s["ms"].as_f64().unwrap_or(0.0), "");
        }
    }

    /// Delete the snapshots: what every failure after a snapshot does.
    fn cleanup(&mut self) -> Result<String, String> {
        let t = Instant::now();
        match self.o.db.call(
            &format!("{}-delete", self.id),
            &Op::Delete { vlus: self.o.vlus.clone() },
            3,
            &mut |_, _| {},
        ) {
            Ok(_) => {
                self.step("delete snapshot (cleanup)", ms(t), "  resync started");
                Ok("the snapshots were deleted and resync started".into())
            }
            Err(e) => Err(format!(
                "the snapshots could not be deleted ({e}); finish by hand with `hvmctl backup delete --db {} --ca CA --token-file TOKEN {}` or, on the database host, `hvmctl snapshot delete NAME` for each of {}",
                self.o.db.address,
                self.o.vlus.iter().map(|v| format!("--vlu {v}")).collect::<Vec<_>>().join(" "),
                self.o.vlus.join(", ")
            )),
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

/// Run one backup.
pub fn run(o: &Options) -> Report {
    let mut r = Run {
        o,
        id: new_id(),
        steps: Vec::new(),
    };
    let mut out =
        json!({ "id": r.id, "db": o.db.address, "backup": o.backup.address, "vlus": o.vlus });
    let fail = |r: &mut Run<'_>,
                mut out: Value,
                step: &str,
                f: &Failure,
                cleanup: Result<String, String>| {
        let (cleaned, msg) = match &cleanup {
            Ok(m) => (true, m.clone()),
            Err(m) => (false, m.clone()),
        };
        let error = format!("{step} failed: {f}; {msg}");
        out["ok"] = json!(false);
        out["steps"] = json!(r.steps);
        out["error"] = json!({ "step": step, "code": f.code, "message": f.message, "detail": f.detail, "clean": cleaned, "cleanup": msg });
        Report {
            value: out,
            error: Some(error),
        }
    };
    r.say(&format!(
        "backup {}: database host {}, backup host {}, virtual LUs {}",
        r.id,
        o.db.address,
        o.backup.address,
        o.vlus.join(", ")
    ));

    // 1. Quiesce, snapshot, resume: one request, inside the database host's deadline.
    let snap = o.db.call(
        &format!("{}-snapshot", r.id),
        &Op::Snapshot {
            vlus: o.vlus.clone(),
            deadline_ms: o.deadline_ms,
            backup: None,
            vars: [
                ("target".to_string(), o.target.clone()),
                ("backup_host".to_string(), o.backup.address.clone()),
            ]
            .into_iter()
            .collect(),
        },
        2,
        &mut |_, _| {},
    );
    let snap = match snap {
        Ok(v) => v,
        Err(f) => {
            r.agent_steps(&f.detail);
            // The database host rolled back what it did; if no answer came at all, a
            // snapshot may exist: delete to be sure.
            let cleanup = if f.detail.is_null() {
                r.cleanup()
            } else {
                Ok(format!(
                    "the database host thawed {} and rolled back {}",
                    f.detail["thawed"], f.detail["rolled_back"]
                ))
            };
            return fail(&mut r, out, "snapshot", &f, cleanup);
        }
    };
    r.agent_steps(&snap);
    let freeze_ms = snap["freeze_ms"].as_f64().unwrap_or(0.0);
    r.say(&format!(
        "  {:<40} {:>10}  (deadline {} ms)",
        "freeze window (quiesce to resume)",
        fmt_ms(freeze_ms),
        snap["deadline_ms"]
    ));
    out["freeze_ms"] = json!(freeze_ms);
    out["instant_unix_ms"] = snap["instant_unix_ms"].clone();

    // 2. The copy, on the backup host.
    let nbd_address = o.db_nbd.clone().or_else(|| {
        snap["nbd_tcp"].as_str().map(|a| match a.rsplit_once(':') {
            Some((h, p)) if h == "0.0.0.0" || h == "[::]" => format!("{}:{p}", o.db.host()),
            _ => a.to_string(),
        })
    });
    let mut lus = Vec::new();
    for s in snap["snapshots"].as_array().into_iter().flatten() {
        let vlu = s["vlu"].as_str().unwrap_or_default().to_string();
        let array = match (s["backend"].as_str(), s["array_lu"].as_u64()) {
            (Some(b), Some(lu)) => Some(Source::Array {
                backend: b.into(),
                lu: lu as u32,
            }),
            _ => None,
        };
        let nbd = nbd_address.as_ref().map(|a| Source::Nbd {
            address: a.clone(),
            export: s["export"].as_str().unwrap_or_default().into(),
        });
        let source = match o.via {
            Via::Array => array,
            Via::Nbd => nbd,
            Via::Auto => array.or(nbd),
        };
        let Some(source) = source else {
            let f = Failure::new(
                Code::BadRequest,
                format!(
                    "no way to read the snapshot of {vlu} with --via {:?}: {}",
                    o.via,
                    if s["array_lu"].is_null() {
                        "its snapshot is kept by the database host (pre-update array); use --via nbd with an NBD TCP listener"
                    } else {
                        "the database host has no listen.tcp; give --db-nbd HOST:PORT"
                    }
                ),
            );
            let c = r.cleanup();
            return fail(&mut r, out, "copy", &f, c);
        };
        lus.push(CopyLu {
            vlu,
            size: s["size"].as_u64().unwrap_or(0),
            source,
        });
    }
    let files = snap["files"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let req = CopyRequest {
        target: o.target.clone(),
        lus,
        files,
        info: json!({
            "database_host": o.db.address,
            "instant_unix_ms": snap["instant_unix_ms"],
            "freeze_ms": freeze_ms,
            "snapshots": snap["snapshots"],
        }),
    };
    let t = Instant::now();
    let bars = o.human && ctl::bars();
    let copied = o.backup.call(
        &format!("{}-copy", r.id),
        &Op::Copy(req),
        2,
        &mut |d, total| {
            if bars {
                ctl::progress("  copy", d, total, "bytes");
            }
        },
    );
    if bars {
        eprintln!();
    }
    let copied = match copied {
        Ok(v) => v,
        Err(f) => {
            let c = r.cleanup();
            return fail(&mut r, out, "copy", &f, c);
        }
    };
    let bytes: u64 = copied["lus"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    let secs = t.elapsed().as_secs_f64();
    let note = format!(
        "  {} MiB at {:.0} MiB/s from {}",
        bytes >> 20,
        bytes as f64 / 1048576.0 / secs.max(1e-9),
        copied["lus"][0]["source"].as_str().unwrap_or("?")
    );
    r.step("copy", secs * 1000.0, &note);
    out["copy"] = copied.clone();

    // 3. Delete the snapshots; resync starts.
    let t = Instant::now();
    if let Err(f) = o.db.call(
        &format!("{}-delete", r.id),
        &Op::Delete {
            vlus: o.vlus.clone(),
        },
        3,
        &mut |_, _| {},
    ) {
        let cleanup = Err(format!(
            "the backup at {} is complete; finish by hand with `hvmctl backup delete --db {} --ca CA --token-file TOKEN {}`",
            copied["dir"].as_str().unwrap_or("?"),
            o.db.address,
            o.vlus.iter().map(|v| format!("--vlu {v}")).collect::<Vec<_>>().join(" ")
        ));
        return fail(&mut r, out, "delete", &f, cleanup);
    }
    r.step("delete snapshot", ms(t), "  resync started");

    // 4. Optionally wait for the resync.
    if o.wait_resync {
        let t = Instant::now();
        loop {
            match o.db.call(
                &new_id(),
                &Op::Resync {
                    vlus: o.vlus.clone(),
                },
                3,
                &mut |_, _| {},
            ) {
                Ok(v) => {
                    let all = v["vlus"].as_array().cloned().unwrap_or_default();
                    let remaining: u64 = all
                        .iter()
                        .filter_map(|x| x["remaining_lbas"].as_u64())
                        .sum();
                    if bars {
                        eprint!("\r  resync: {remaining} LBAs to copy        ");
                    }
                    if all.iter().all(|x| x["done"] == true) {
                        if bars {
                            eprintln!();
                        }
                        out["resync"] = v;
                        break;
                    }
                }
                Err(f) => {
                    return fail(
                        &mut r,
                        out,
                        "resync",
                        &f,
                        Ok("the backup is complete; the resync goes on".into()),
                    )
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        r.step("resync", ms(t), "");
        // Compared, not assumed: each pair's legs are read and compared.
        let t = Instant::now();
        match o.db.call(
            &new_id(),
            &Op::Verify {
                vlus: o.vlus.clone(),
            },
            3,
            &mut |_, _| {},
        ) {
            Ok(v) => {
                let all = v["vlus"].as_array().cloned().unwrap_or_default();
                let differ: Vec<String> = all
                    .iter()
                    .filter(|x| x["identical"] != true)
                    .map(|x| {
                        format!(
                            "{} differs in {} LBAs",
                            x["name"].as_str().unwrap_or("?"),
                            x["differing_lbas"]
                        )
                    })
                    .collect();
                out["verify"] = v;
                if !differ.is_empty() {
                    let f = Failure::new(
                        Code::Failed,
                        format!(
                            "{}; `hvmctl verify VLU` on the database host lists the ranges, --repair writes them again from the origin",
                            differ.join(", ")
                        ),
                    );
                    return fail(
                        &mut r,
                        out,
                        "verify",
                        &f,
                        Ok("the backup is complete".into()),
                    );
                }
                let mib: u64 = all
                    .iter()
                    .filter_map(|x| x["compared_bytes"].as_u64())
                    .sum::<u64>()
                    >> 20;
                r.step(
                    "verify legs",
                    ms(t),
                    &format!("  legs compared: identical ({mib} MiB)"),
                );
            }
            Err(f) => {
                return fail(
                    &mut r,
                    out,
                    "verify",
                    &f,
                    Ok("the backup is complete".into()),
                )
            }
        }
    }
    r.say(&format!(
        "backup written to {} (manifest.json)",
        copied["dir"].as_str().unwrap_or("?")
    ));
    out["ok"] = json!(true);
    out["steps"] = json!(r.steps);
    Report {
        value: out,
        error: None,
    }
}

/// `hvmctl backup delete`: delete the snapshots by hand.
pub fn delete(db: &Peer, vlus: &[String]) -> Result<Value, Failure> {
    db.call(
        &new_id(),
        &Op::Delete {
            vlus: vlus.to_vec(),
        },
        3,
        &mut |_, _| {},
    )
}
