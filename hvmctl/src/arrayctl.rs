//! hvmctl's commands for the array-side backup functions of EP 1 058 190, named after
//! CCI's where one exists (`paircreate`, `pairsplit`, `pairresync`, `pairdisplay`,
//! `pairevtwait`):
//!
//! ```sh
//! hvmctl pair create 10 11 --wait          # step 40: form the pair, initial copy
//! hvmctl pair split 10 --area 0+2048       # Fig. 5: freeze one area of the secondary
//! hvmctl pair status 10                    # step 43: the Inquiry of pairing
//! hvmctl backup ccopy 11 --device tape0 --range 0+2048 --wait   # [0029]-[0030]
//! hvmctl pair resync 10 --wait             # [0031], Fig. 7
//! hvmctl backup auto 10 --device tape0 --wait                   # [0037]-[0040]
//! hvmctl backup cow 10 --device tape1 --wait                    # [0062]-[0097]
//! hvmctl volume attribute 20 work          # [0103]
//! hvmctl device list
//! hvmctl device restore tape0.rec --to lu11.img
//! hvmctl array counters                    # bytes the array moved against the host's
//! ```
//!
//! LU numbers are the array's own. `--backend` names the array; it may be left out when
//! only one backend offers the functions.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use hvm_core::array_backup::{
    Area, BackupOp, BackupReply, JobState, JobStatus, PairState, PairStatus,
};
use hvm_host_agent::ctl::{self, bars, progress};
use serde_json::Value;

use crate::error::{Error, Result};

/// Which array.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The backend (array) [default: the only one offering array-side backup functions].
    #[arg(long)]
    pub backend: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PairCmd {
    /// Form a pair and start its initial copy (step 40; paircreate).
    Create {
        primary: u32,
        secondary: u32,
        /// Wait until the initial copy ends (the pair is duplex).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Split the pair of user volume LU, freezing the secondary: the listed areas, or
    /// all of it (Fig. 5; pairsplit).
    Split {
        lu: u32,
        /// START+BLOCKS; repeat for several areas.
        #[arg(long = "area")]
        areas: Vec<Area>,
        #[command(flatten)]
        target: Target,
    },
    /// Resynchronise the listed split areas, or all of them; only blocks marked in the
    /// difference bitmap are copied (Fig. 7; pairresync).
    Resync {
        lu: u32,
        #[arg(long = "area")]
        areas: Vec<Area>,
        /// Wait until the pair is duplex again (or the areas left stay split).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Dissolve the pair (pairsplit -S).
    Delete {
        lu: u32,
        #[command(flatten)]
        target: Target,
    },
    /// The pair LU belongs to (step 43; pairdisplay).
    Status {
        lu: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Wait until the pair reaches a state (pairevtwait); exit status 4 at the timeout.
    Wait {
        lu: u32,
        #[arg(long, value_enum)]
        state: WaitState,
        /// Seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitState {
    Duplex,
    Split,
}

/// A copy to a backup device inside the array.
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// CCOPY: the split secondary volume; AUTO and COW: the user volume.
    pub lu: u32,
    /// The backup device (`hvmctl device list`).
    #[arg(long)]
    pub device: String,
    /// START+BLOCKS, copied in the order given; repeat for several [default: the whole LU].
    #[arg(long = "range")]
    pub ranges: Vec<Area>,
    /// Wait for the copy to end, with a progress bar (the command itself returns once
    /// the array has checked and started the copy, [0030]).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub target: Target,
}

/// A working-volume copy-on-write backup.
#[derive(Args, Debug)]
pub struct CowArgs {
    #[command(flatten)]
    pub copy: CopyArgs,
    /// Save a block at its own number in the working volume ([0081]) instead of
    /// compactly ([0122]).
    #[arg(long)]
    pub same_block: bool,
    /// The prior art of [0005]-[0006], for comparison: writes to blocks still to be
    /// copied wait for the copy instead of saving the old data.
    #[arg(long)]
    pub wait_for_copy: bool,
}

#[derive(Args, Debug)]
pub struct JobArgs {
    pub id: u32,
    /// Wait for the job to end, with a progress bar.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Make a volume a user volume or a working volume of the pool ([0103]); refused
    /// while the volume is under copying.
    Attribute {
        lu: u32,
        #[arg(value_enum)]
        attribute: Attribute,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    User,
    Work,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// The array's backup devices.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Write every record of a backup medium (its file) at its own place in a file or
    /// block device, after checking the whole medium (headers, CRCs, trailer).
    Restore {
        medium: PathBuf,
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ArrayCmd {
    /// Bytes the array moved (to backup devices, between paired volumes, to working
    /// volumes) against the bytes hosts read and wrote.
    Counters {
        #[command(flatten)]
        target: Target,
    },
}

/// A command's result: its JSON and its text.
type Outcome = Result<(Value, String)>;

fn refused(m: impl Into<String>) -> Error {
    Error::Failed(m.into())
}

/// Finish a command: print its JSON or its text, or name the command in its error.
fn finish(what: &str, json: bool, r: Outcome) -> Result {
    let (v, text) = r.map_err(|e| e.during(what))?;
    if json {
        println!("{v}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// The backend to use: the one named, or the only one offering backup functions.
fn backend(sock: &Path, t: &Target) -> Result<String> {
    if let Some(b) = &t.backend {
        return Ok(b.clone());
    }
    let list: hvm_api::Backends = ctl::typed(sock, "GET", "/v1/backends", None)?;
    let offering: Vec<String> = list
        .backends
        .into_iter()
        .filter(|b| b.backup.any())
        .map(|b| b.name)
        .collect();
    match offering.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(refused(
            "no backend offers array-side backup functions (an array needs a `backup:` section in its config)",
        )),
        many => Err(Error::Usage(
            format!(
                "several backends offer array-side backup functions ({}); say which with --backend",
                many.join(", ")
            ),
        )),
    }
}

/// Send one operation to the backend's array.
fn op(sock: &Path, backend: &str, op: &BackupOp) -> Result<BackupReply> {
    let body = serde_json::to_value(op).map_err(|e| Error::Usage(e.to_string()))?;
    let path = format!("/v1/backends/{}/backup", ctl::segment(backend));
    Ok(ctl::typed(sock, "POST", &path, Some(&body))?)
}

fn pair_status(sock: &Path, backend: &str, lu: u32) -> Result<PairStatus> {
    match op(sock, backend, &BackupOp::PairStatus { lu })? {
        BackupReply::Pair(p) => Ok(p),
        r => Err(refused(format!("unexpected reply {r:?}"))),
    }
}

fn job_status(sock: &Path, backend: &str, id: u32) -> Result<JobStatus> {
    match op(sock, backend, &BackupOp::Job { id })? {
        BackupReply::Job(j) => Ok(j),
        r => Err(refused(format!("unexpected reply {r:?}"))),
    }
}

fn areas(list: &[Area]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    list.iter()
        .map(Area::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// pairdisplay's lines for a pair.
pub fn pair_text(p: &PairStatus) -> String {
    format!(
        "pair LU {} -> LU {}: {}\n  bitmaps: {} units of {} blocks; split {}, different {}\n  split areas: {}\n  copied by the array: {} bytes\n",
        p.primary,
        p.secondary,
        p.state,
        p.units,
        p.blocks_per_bit,
        p.split_units,
        p.diff_units,
        areas(&p.split_areas),
        p.copied_bytes
    )
}

/// A job's line.
pub fn job_text(j: &JobStatus) -> String {
    let mut t = format!(
        "job {}: {} of LU {} to {}: {}, {}/{} blocks, {:.3} s",
        j.id,
        j.kind,
        j.lu,
        j.device,
        j.state,
        j.done_blocks,
        j.total_blocks,
        j.elapsed_us as f64 / 1e6
    );
    if let Some(w) = j.working_volume {
        t.push_str(&format!(
            ", working volume LU {w}, {} blocks saved",
            j.saved_blocks
        ));
    }
    if let Some(m) = &j.message {
        t.push_str(&format!(" ({m})"));
    }
    t.push('\n');
    t
}

fn wait_pair(
    sock: &Path,
    backend: &str,
    lu: u32,
    want: WaitState,
    timeout: Option<Duration>,
) -> Result<PairStatus> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let p = pair_status(sock, backend, lu)?;
        let reached = match want {
            WaitState::Duplex => p.state == PairState::Duplex,
            WaitState::Split => p.state == PairState::Split,
        };
        if reached {
            return Ok(p);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::Deadline(format!(
                "the pair of LU {lu} is {} after {} s, not {}",
                p.state,
                timeout.unwrap_or_default().as_secs(),
                match want {
                    WaitState::Duplex => "duplex",
                    WaitState::Split => "split",
                }
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a resync: duplex, or split when some areas stay split.
fn wait_resynced(sock: &Path, backend: &str, lu: u32) -> Result<PairStatus> {
    loop {
        let p = pair_status(sock, backend, lu)?;
        if p.state != PairState::Resyncing && p.state != PairState::Forming {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_job(sock: &Path, backend: &str, id: u32, json: bool) -> Result<JobStatus> {
    let draw = !json && bars();
    loop {
        let j = job_status(sock, backend, id)?;
        if draw {
            progress(
                &format!("job {id} {}", j.kind),
                j.done_blocks,
                j.total_blocks,
                "blocks",
            );
        }
        if j.state != JobState::Running {
            ctl::end_progress();
            return match j.state {
                JobState::Failed => Err(refused(job_text(&j).trim_end().to_string())),
                _ => Ok(j),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn run_pair(sock: &Path, cmd: &PairCmd) -> Outcome {
    match cmd {
        PairCmd::Create {
            primary,
            secondary,
            wait,
            target,
        } => {
            let b = backend(sock, target)?;
            op(
                sock,
                &b,
                &BackupOp::PairCreate {
                    primary: *primary,
                    secondary: *secondary,
                },
            )?;
            let p = if *wait {
                wait_pair(sock, &b, *primary, WaitState::Duplex, None)?
            } else {
                pair_status(sock, &b, *primary)?
            };
            Ok((value(&p), pair_text(&p)))
        }
        PairCmd::Split { lu, areas, target }
        | PairCmd::Resync {
            lu, areas, target, ..
        } => {
            let b = backend(sock, target)?;
            let o = if matches!(cmd, PairCmd::Split { .. }) {
                BackupOp::PairSplit {
                    lu: *lu,
                    areas: areas.clone(),
                }
            } else {
                BackupOp::PairResync {
                    lu: *lu,
                    areas: areas.clone(),
                }
            };
            op(sock, &b, &o)?;
            let p = match cmd {
                PairCmd::Resync { wait: true, .. } => wait_resynced(sock, &b, *lu)?,
                _ => pair_status(sock, &b, *lu)?,
            };
            Ok((value(&p), pair_text(&p)))
        }
        PairCmd::Delete { lu, target } => {
            let b = backend(sock, target)?;
            op(sock, &b, &BackupOp::PairDelete { lu: *lu })?;
            Ok((
                serde_json::json!({ "deleted": lu }),
                format!("the pair of LU {lu} is dissolved\n"),
            ))
        }
        PairCmd::Status { lu, target } => {
            let p = pair_status(sock, &backend(sock, target)?, *lu)?;
            Ok((value(&p), pair_text(&p)))
        }
        PairCmd::Wait {
            lu,
            state,
            timeout,
            target,
        } => {
            let b = backend(sock, target)?;
            let p = wait_pair(sock, &b, *lu, *state, Some(Duration::from_secs(*timeout)))?;
            Ok((value(&p), pair_text(&p)))
        }
    }
}

/// `hvmctl pair ...`
pub fn pair(sock: &Path, json: bool, cmd: &PairCmd) -> Result {
    finish("pair", json, run_pair(sock, cmd))
}

/// Which copy to a backup device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    Ccopy,
    Auto,
}

fn start_copy(sock: &Path, json: bool, args: &CopyArgs, o: BackupOp) -> Outcome {
    let b = backend(sock, &args.target)?;
    let id = match op(sock, &b, &o)? {
        BackupReply::Started { job } => job,
        r => return Err(refused(format!("unexpected reply {r:?}"))),
    };
    let j = if args.wait {
        wait_job(sock, &b, id, json)?
    } else {
        job_status(sock, &b, id)?
    };
    Ok((value(&j), job_text(&j)))
}

/// `hvmctl backup ccopy|auto ...`
pub fn copy(sock: &Path, json: bool, kind: CopyKind, args: &CopyArgs) -> Result {
    let o = BackupOp::Ccopy {
        lu: args.lu,
        device: args.device.clone(),
        ranges: args.ranges.clone(),
        auto: kind == CopyKind::Auto,
    };
    let what = match kind {
        CopyKind::Ccopy => "backup ccopy",
        CopyKind::Auto => "backup auto",
    };
    finish(what, json, start_copy(sock, json, args, o))
}

/// `hvmctl backup cow ...`
pub fn cow(sock: &Path, json: bool, args: &CowArgs) -> Result {
    let c = &args.copy;
    let o = BackupOp::Cow {
        lu: c.lu,
        device: c.device.clone(),
        ranges: c.ranges.clone(),
        same_block: args.same_block,
        wait_for_copy: args.wait_for_copy,
    };
    finish("backup cow", json, start_copy(sock, json, c, o))
}

/// `hvmctl backup job ...`
pub fn job(sock: &Path, json: bool, args: &JobArgs) -> Result {
    let r = (|| {
        let b = backend(sock, &args.target)?;
        let j = if args.wait {
            wait_job(sock, &b, args.id, json)?
        } else {
            job_status(sock, &b, args.id)?
        };
        Ok((value(&j), job_text(&j)))
    })();
    finish("backup job", json, r)
}

/// `hvmctl volume ...`
pub fn volume(sock: &Path, json: bool, cmd: &VolumeCmd) -> Result {
    let VolumeCmd::Attribute {
        lu,
        attribute,
        target,
    } = cmd;
    let r = (|| {
        let b = backend(sock, target)?;
        let work = *attribute == Attribute::Work;
        op(sock, &b, &BackupOp::Attribute { lu: *lu, work })?;
        let (name, text) = if work {
            ("work", "a working volume of the pool")
        } else {
            ("user", "a user volume")
        };
        Ok((
            serde_json::json!({ "lu": lu, "attribute": name }),
            format!("LU {lu} is {text}\n"),
        ))
    })();
    finish("volume attribute", json, r)
}

fn restore(medium: &Path, to: &Path) -> Outcome {
    let tape = array_sim::tape::Tape::open(medium).map_err(|e| refused(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
        .map_err(|e| refused(format!("{}: {e}", to.display())))?;
    let blocks = tape.restore(&mut f).map_err(|e| refused(e.to_string()))?;
    Ok((
        serde_json::json!({
            "medium": medium,
            "to": to,
            "source_lun": tape.source_lun,
            "records": tape.records.len(),
            "blocks": blocks,
        }),
        format!(
            "restored {blocks} blocks in {} records of LU {} from {} to {}\n",
            tape.records.len(),
            tape.source_lun,
            medium.display(),
            to.display()
        ),
    ))
}

/// `hvmctl device ...`
pub fn device(sock: &Path, json: bool, cmd: &DeviceCmd) -> Result {
    let r = match cmd {
        DeviceCmd::List { target } => (|| {
            let b = backend(sock, target)?;
            match op(sock, &b, &BackupOp::Devices)? {
                BackupReply::Devices { devices } => {
                    let w = devices
                        .iter()
                        .map(|d| d.name.len())
                        .max()
                        .unwrap_or(0)
                        .max(4);
                    let mut text = format!("{:<w$}  BUSY  FILE\n", "NAME");
                    for d in &devices {
                        let busy = if d.busy { "yes" } else { "no" };
                        text.push_str(&format!("{:<w$}  {busy:<4}  {}\n", d.name, d.path));
                    }
                    Ok((value(&devices), text))
                }
                r => Err(refused(format!("unexpected reply {r:?}"))),
            }
        })(),
        DeviceCmd::Restore { medium, to } => restore(medium, to),
    };
    finish("device", json, r)
}

/// `hvmctl array ...`
pub fn array(sock: &Path, json: bool, cmd: &ArrayCmd) -> Result {
    let ArrayCmd::Counters { target } = cmd;
    let r = (|| {
        let b = backend(sock, target)?;
        match op(sock, &b, &BackupOp::Counters)? {
            BackupReply::Counters(c) => {
                let v = value(&c);
                let text = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, x)| format!("{k}: {x}\n"))
                    .collect();
                Ok((v, text))
            }
            r => Err(refused(format!("unexpected reply {r:?}"))),
        }
    })();
    finish("array counters", json, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        pair: PairCmd,
    }

    #[test]
    fn areas_parse_from_the_command_line() {
        let c =
            Cli::try_parse_from(["x", "split", "10", "--area", "0+64", "--area", "128+8"]).unwrap();
        match c.pair {
            PairCmd::Split { lu, areas, target } => {
                assert_eq!(lu, 10);
                assert_eq!(areas.len(), 2);
                assert_eq!(areas[1].to_string(), "128+8");
                assert!(target.backend.is_none());
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["x", "split", "10", "--area", "64"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("START+BLOCKS"), "{e}");
    }
}
