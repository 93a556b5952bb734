//! `hvmctl demo`: the whole online backup, end to end, against a real host-agent.
//!
//! In a temporary directory it writes a config with one embedded array of each kind,
//! starts the `host-agent` binary that sits beside hvmctl (with the plugins), and for
//! each array kind:
//!
//! 1. starts a writer: 64 KiB writes at random offsets of the virtual LU over NBD,
//!    remembering what it wrote;
//! 2. quiesces it (no write in flight, a flush), acquires the snapshot through the
//!    control API and resumes it: the freeze;
//! 3. copies the snapshot export to a backup file over NBD, with a progress bar, while
//!    the writer goes on;
//! 4. checks the backup equals the data at the snapshot instant;
//! 5. deletes the snapshot and waits for resync, the writer still going;
//! 6. stops the writer and checks both legs (the array's LU files) are identical and the
//!    virtual LU holds exactly what the writer wrote;
//!
//! then stops host-agent with SIGTERM (it must exit 0) and prints a summary.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::ctl::{bars, progress, typed, wait_resync_pair};
use crate::nbd::client::Client;

/// What `hvmctl demo` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Work here (kept afterwards) instead of a temporary directory.
    pub dir: Option<PathBuf>,
    /// Size of each virtual LU in MiB.
    pub size_mib: u64,
    /// How long the writer runs before the snapshot, and at least during the copy.
    pub warmup: Duration,
    /// No progress bars (the summary is still printed).
    pub quiet: bool,
}

/// One array kind of the demo.
struct Kind {
    label: &'static str,
    strategy: &'static str,
    vlu: &'static str,
    /// The two legs' files, relative to the state directory.
    legs: [&'static str; 2],
}

const KINDS: [Kind; 3] = [
    Kind {
        label: "ModeSelect",
        strategy: "E1 (Mode Select)",
        vlu: "logs",
        legs: ["modeselect0/lu1.img", "modeselect0/lu4.img"],
    },
    Kind {
        label: "Stateless",
        strategy: "E2 (virtual-LU routing)",
        vlu: "db",
        legs: ["stateless0/lu1.img", "stateless0/lu2.img"],
    },
    Kind {
        label: "PreUpdate",
        strategy: "E4 (copy-on-write with read distribution)",
        vlu: "files",
        legs: ["preupdate0/lu0.img", "preupdate0/lu1.img"],
    },
];

/// The result of one array kind.
#[derive(Debug, Clone)]
pub struct KindResult {
    pub label: &'static str,
    pub strategy: &'static str,
    /// From the quiesce request to the writer's resume.
    pub freeze: Duration,
    /// Of which: the writer's quiesce (its flush included) and the snapshot acquire.
    pub quiesce: Duration,
    pub acquire: Duration,
    pub backup: Duration,
    pub backup_bytes: u64,
    pub resync: Duration,
    pub recorded_lbas: u64,
    pub copied_lbas: u64,
    pub writes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind}: {message}")]
    Failed { kind: &'static str, message: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// The demo's config: one embedded array of each kind with LUs of `size_mib`, the
/// plugins in `plugin_dir`. The crash test uses it too.
pub fn config(size_mib: u64, plugin_dir: &Path) -> String {
    let b = size_mib * 2048;
    format!(
        "# Written by hvmctl demo: one embedded array of each kind.
log_level: warn
plugin_dir: {plugins}
listen: {{ unix: nbd.sock }}
backends:
  - name: modeselect0
    plugin: mode-select
    params: {{ array: {{ embedded: {{ kind: mode-select, dir: modeselect0,
      disks: [{{ name: d0 }}, {{ name: d1 }}],
      lus: [{{ lun: 1, blocks: {b}, disk: d0 }}, {{ lun: 4, blocks: {b}, disk: d1 }}],
      mirroring: [{{ lu: 1, mates: [4] }}] }} }} }}
  - name: stateless0
    plugin: stateless
    params: {{ array: {{ embedded: {{ kind: stateless, dir: stateless0,
      disks: [{{ name: d0 }}, {{ name: d1 }}],
      lus: [{{ lun: 1, blocks: {b}, disk: d0 }}, {{ lun: 2, blocks: {b}, disk: d1 }}],
      mirroring: [{{ mirror: 0, origin: 1, mate: 2 }}] }} }} }}
  - name: preupdate0
    plugin: pre-update
    params: {{ array: {{ embedded: {{ kind: pre-update, dir: preupdate0,
      disks: [{{ name: d0 }}, {{ name: d1 }}],
      lus: [{{ lun: 0, blocks: {b}, disk: d0 }}, {{ lun: 1, blocks: {b}, disk: d1 }},
            {{ lun: 9, blocks: {b}, disk: d0 }}],
      mirroring: [{{ mirror: 0, mate: 1 }}] }} }} }}
virtual_lus:
  - {{ name: logs, backend: modeselect0, lu: 1, snapshots: [logs-snap] }}
  - {{ name: db, backend: stateless0, lu: 0, snapshots: [db-snap] }}
  - {{ name: files, backend: preupdate0, lu: 0, snapshots: [files-snap], save_area: 9 }}
",
        plugins = plugin_dir.display()
    )
}

/// host-agent, stopped with SIGTERM when dropped (killed if it will not stop).
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn start(bin: &Path, cfg: &Path, state: &Path, log: &Path) -> Result<Daemon, DemoError> {
        let log_file = std::fs::File::create(log).map_err(io(log.display().to_string()))?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(cfg)
            .arg("--state-dir")
            .arg(state)
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(io(format!("start {}", bin.display())))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        if !line.starts_with("host-agent: serving") {
            let _ = child.kill();
            let _ = child.wait();
            let why = std::fs::read_to_string(log).unwrap_or_default();
            return Err(DemoError::Setup(format!(
                "host-agent did not start:\n{why}"
            )));
        }
        Ok(Daemon { child: Some(child) })
    }

    /// SIGTERM, and the exit status: 0 means it drained and checkpointed.
    fn stop(mut self) -> Result<std::process::ExitStatus, DemoError> {
        let Some(mut child) = self.child.take() else {
            return Err(DemoError::Setup("host-agent was already stopped".into()));
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().map_err(io("wait for host-agent"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The writer's state, shared with the thread that runs it.
struct Writer {
    /// What the virtual LU holds, as far as the writer knows: every acknowledged write.
    model: Mutex<Vec<u8>>,
    /// From the snapshot instant on: the first earlier content of each block written
    /// since, so the data at the instant is known without copying the model in the
    /// freeze.
    undo: Mutex<Option<HashMap<u64, Box<[u8]>>>>,
    /// Quiesce: `pause` asks, `paused` answers once nothing is in flight and a flush
    /// returned.
    gate: Mutex<(bool, bool)>,
    cv: Condvar,
    stop: AtomicBool,
    writes: AtomicU64,
    error: Mutex<Option<String>>,
}

const BLOCK: usize = 64 << 10;
/// Writes between the writer's flushes (4 MiB).
const FLUSH_EVERY: u64 = 64;

impl Writer {
    fn run(&self, mut c: Client, seed: u64) {
        let blocks = (c.size() / BLOCK as u64).max(1);
        let mut rng = seed | 1;
        let mut buf = vec![0u8; BLOCK];
        let result = (|| -> Result<(), String> {
            while !self.stop.load(Ordering::SeqCst) {
                {
                    let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
                    if g.0 {
                        c.flush().map_err(|e| e.to_string())?;
                        g.1 = true;
                        self.cv.notify_all();
                        while g.0 && !self.stop.load(Ordering::SeqCst) {
                            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                        }
                        g.1 = false;
                        continue;
                    }
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let offset = (rng % blocks) * BLOCK as u64;
                let n = self.writes.fetch_add(1, Ordering::SeqCst);
                for (i, chunk) in buf.chunks_mut(16).enumerate() {
                    chunk[..8].copy_from_slice(&n.to_le_bytes());
                    chunk[8..].copy_from_slice(&(offset + i as u64 * 16).to_le_bytes());
                }
                c.write(offset, &buf, false).map_err(|e| e.to_string())?;
                // Like a database's commits, a flush every few MiB: a quiesce then has
                // little left to flush.
                if n % FLUSH_EVERY == FLUSH_EVERY - 1 {
                    c.flush().map_err(|e| e.to_string())?;
                }
                let o = offset as usize;
                let mut undo = self.undo.lock().unwrap_or_else(PoisonError::into_inner);
                let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(u) = undo.as_mut() {
                    u.entry(offset)
                        .or_insert_with(|| model[o..o + BLOCK].into());
                }
                model[o..o + BLOCK].copy_from_slice(&buf);
            }
            c.flush().map_err(|e| e.to_string())?;
            c.disconnect();
            Ok(())
        })();
        if let Err(e) = result {
            *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
            let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            g.1 = true;
            self.cv.notify_all();
        }
    }

    /// Stop issuing writes, wait for the flush; the model is then the LU's content.
    fn quiesce(&self) {
        let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 = true;
        while !g.1 {
            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn resume(&self) {
        let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 = false;
        self.cv.notify_all();
    }

    fn failed(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn same_files(a: &Path, b: &Path) -> Result<Option<u64>, DemoError> {
    let mut fa = std::fs::File::open(a).map_err(io(a.display().to_string()))?;
    let mut fb = std::fs::File::open(b).map_err(io(b.display().to_string()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(io(a.display().to_string()))?;
        let m = read_full(&mut fb, &mut bb).map_err(io(b.display().to_string()))?;
        if n != m || ba[..n] != bb[..m] {
            let i = ba[..n.min(m)]
                .iter()
                .zip(&bb[..n.min(m)])
                .position(|(x, y)| x != y)
                .unwrap_or(n.min(m));
            return Ok(Some(at + i as u64));
        }
        if n == 0 {
            return Ok(None);
        }
        at += n as u64;
    }
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn api<T: serde::de::DeserializeOwned>(
    sock: &Path,
    method: &str,
    path: &str,
    kind: &'static str,
) -> Result<T, DemoError> {
    typed(sock, method, path, None).map_err(|e| match e {
        crate::ctl::CallError::Unreachable(m) => DemoError::Setup(m),
        crate::ctl::CallError::Refused(m) => DemoError::Failed {
            kind,
            message: format!("{method} {path}: {m}"),
        },
    })
}

/// One array kind's run: where its virtual LU is served and controlled.
struct Case<'a> {
    k: &'a Kind,
    /// The NBD socket.
    nbd: PathBuf,
    control: &'a Path,
}

/// The freeze's durations: whole, quiesce, acquire.
type Freeze = (Duration, Duration, Duration);

impl Case<'_> {
    fn fail(&self, message: String) -> DemoError {
        DemoError::Failed {
            kind: self.k.label,
            message,
        }
    }

    fn connect(&self, export: &str) -> Result<Client, DemoError> {
        Client::connect(&self.nbd, export).map_err(|e| self.fail(e.to_string()))
    }

    fn api<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
    ) -> Result<T, DemoError> {
        api(self.control, method, path, self.k.label)
    }

    /// A writer whose model starts as the LU is now (zeros on a fresh array), and the
    /// client it writes with.
    fn writer(&self) -> Result<(Arc<Writer>, Client), DemoError> {
        let client = self.connect(self.k.vlu)?;
        let w = Arc::new(Writer {
            model: Mutex::new(vec![0u8; client.size() as usize]),
            undo: Mutex::new(None),
            gate: Mutex::new((false, false)),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        {
            let mut m = w.model.lock().unwrap_or_else(PoisonError::into_inner);
            let mut c = self.connect(self.k.vlu)?;
            for (i, chunk) in m.chunks_mut(1 << 20).enumerate() {
                c.read(i as u64 * (1 << 20), chunk)
                    .map_err(|e| self.fail(e.to_string()))?;
            }
            c.disconnect();
        }
        Ok((w, client))
    }

    /// The freeze: quiesce (no write in flight, a flush), acquire, resume.
    fn freeze(&self, w: &Writer) -> Result<Freeze, DemoError> {
        let t = Instant::now();
        w.quiesce();
        let quiesced = t.elapsed();
        if let Some(e) = w.failed() {
            return Err(self.fail(format!("writer: {e}")));
        }
        *w.undo.lock().unwrap_or_else(PoisonError::into_inner) = Some(HashMap::new());
        let a = Instant::now();
        let acquired: Result<hvm_api::SnapshotChange, _> =
            self.api("POST", &format!("/v1/lus/{}/snapshot", self.k.vlu));
        let acquire = a.elapsed();
        w.resume();
        let freeze = t.elapsed();
        acquired?;
        Ok((freeze, quiesced, acquire))
    }

    /// The backup: copy the snapshot export to `path` while the writer goes on.
    fn backup(&self, size: u64, path: &Path, opts: &Options) -> Result<Duration, DemoError> {
        let snap = format!("{}-snap", self.k.vlu);
        let draw = !opts.quiet && bars();
        let t = Instant::now();
        let mut src = self.connect(&snap)?;
        let mut out = std::fs::File::create(path).map_err(io(path.display().to_string()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            src.read(at, &mut buf[..n])
                .map_err(|e| self.fail(e.to_string()))?;
            out.write_all(&buf[..n])
                .map_err(io(path.display().to_string()))?;
            at += n as u64;
            if draw {
                progress(&format!("backup {snap}"), at >> 20, size >> 20, "MiB");
            }
        }
        out.sync_all().map_err(io(path.display().to_string()))?;
        src.disconnect();
        let backup = t.elapsed();
        if draw {
            eprintln!();
        }
        Ok(backup)
    }

    /// The backup at `path` equals the data at the snapshot instant: the model, with each
    /// block written since put back.
    fn check_backup(&self, w: &Writer, path: &Path) -> Result<(), DemoError> {
        let mut copy = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut copy))
            .map_err(io(path.display().to_string()))?;
        let mut undo = w.undo.lock().unwrap_or_else(PoisonError::into_inner);
        let model = w.model.lock().unwrap_or_else(PoisonError::into_inner);
        let before = undo.take().unwrap_or_default();
        if copy.len() != model.len() {
            return Err(self.fail(format!(
                "the backup has {} bytes, the LU {}",
                copy.len(),
                model.len()
            )));
        }
        for (i, (got, now)) in copy.chunks(BLOCK).zip(model.chunks(BLOCK)).enumerate() {
            let at = (i * BLOCK) as u64;
            let want = before.get(&at).map_or(now, |b| &b[..]);
            if let Some(j) = first_difference(got, want) {
                return Err(self.fail(format!(
                    "the backup differs from the data at the snapshot instant at byte {}",
                    at + j as u64
                )));
            }
        }
        Ok(())
    }

    /// Both legs identical, and the LU holds what the writer wrote.
    fn check_data(&self, state: &Path, w: &Writer) -> Result<(), DemoError> {
        let legs = self.k.legs.map(|l| state.join(l));
        if let Some(at) = same_files(&legs[0], &legs[1])? {
            return Err(self.fail(format!(
                "the legs {} and {} differ at byte {at} after resync",
                legs[0].display(),
                legs[1].display()
            )));
        }
        let mut c = self.connect(self.k.vlu)?;
        let model = w.model.lock().unwrap_or_else(PoisonError::into_inner);
        let mut buf = vec![0u8; 1 << 20];
        for (i, want) in model.chunks(1 << 20).enumerate() {
            c.read(i as u64 * (1 << 20), &mut buf[..want.len()])
                .map_err(|e| self.fail(e.to_string()))?;
            if let Some(j) = first_difference(&buf[..want.len()], want) {
                return Err(self.fail(format!(
                    "the virtual LU lost a write: byte {} differs",
                    i * (1 << 20) + j
                )));
            }
        }
        c.disconnect();
        Ok(())
    }
}

/// What the steps under the writer measured: the freeze, the backup, the resync, the
/// LBAs recorded, and the resync's pair.
type Measured = (Freeze, Duration, Duration, u64, hvm_api::ResyncPair);

/// The steps while the writer runs: warm up, freeze, back up and check, delete the
/// snapshot and wait for the resync.
fn under_writer(
    c: &Case<'_>,
    w: &Writer,
    size: u64,
    work: &Path,
    opts: &Options,
) -> Result<Measured, DemoError> {
    std::thread::sleep(opts.warmup);
    let freeze = c.freeze(w)?;
    let path = work.join(format!("backup-{}.img", c.k.vlu));
    let backup = c.backup(size, &path, opts)?;
    c.check_backup(w, &path)?;
    let recorded = c
        .api::<hvm_api::Extents>("GET", &format!("/v1/lus/{}/extents", c.k.vlu))?
        .total_lbas;
    // Delete and resync, the writer still going.
    let t = Instant::now();
    c.api::<hvm_api::SnapshotChange>("DELETE", &format!("/v1/lus/{}/snapshot", c.k.vlu))?;
    let pair =
        wait_resync_pair(c.control, c.k.vlu, opts.quiet).map_err(|e| c.fail(e.to_string()))?;
    Ok((freeze, backup, t.elapsed(), recorded, pair))
}

fn one_kind(
    k: &Kind,
    state: &Path,
    control: &Path,
    work: &Path,
    opts: &Options,
    seed: u64,
) -> Result<KindResult, DemoError> {
    let c = Case {
        k,
        nbd: state.join("nbd.sock"),
        control,
    };
    let (w, client) = c.writer()?;
    let size = client.size();
    let thread = {
        let w = w.clone();
        std::thread::spawn(move || w.run(client, seed))
    };
    let result = under_writer(&c, &w, size, work, opts);
    w.stop.store(true, Ordering::SeqCst);
    w.resume();
    let _ = thread.join();
    let ((freeze, quiesce, acquire), backup, resync, recorded, pair) = result?;
    if let Some(e) = w.failed() {
        return Err(c.fail(format!("writer: {e}")));
    }
    c.check_data(state, &w)?;
    Ok(KindResult {
        label: k.label,
        strategy: k.strategy,
        freeze,
        quiesce,
        acquire,
        backup,
        backup_bytes: size,
        resync,
        recorded_lbas: recorded,
        copied_lbas: pair.copied_lbas,
        writes: w.writes.load(Ordering::SeqCst),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1e3)
}

/// One summary line.
pub fn summary_line(r: &KindResult) -> String {
    let mib = r.backup_bytes as f64 / f64::from(1 << 20);
    format!(
        "{:<11} {:<42} freeze {} (quiesce {}, acquire {})  backup {mib:.0} MiB in {} ({:.0} MiB/s, equals snapshot instant)  resync {} ({} LBAs recorded, {} copied)  {} writes  legs identical  data intact",
        r.label,
        r.strategy,
        ms(r.freeze),
        ms(r.quiesce),
        ms(r.acquire),
        ms(r.backup),
        mib / r.backup.as_secs_f64().max(1e-9),
        ms(r.resync),
        r.recorded_lbas,
        r.copied_lbas,
        r.writes,
    )
}

/// host-agent and the plugins must sit beside hvmctl.
fn check_beside(bin_dir: &Path, agent: &Path) -> Result<(), DemoError> {
    let missing: Vec<String> = std::iter::once(agent.to_path_buf())
        .chain(
            ["stateless", "mode_select", "pre_update"]
                .iter()
                .map(|p| bin_dir.join(format!("libhvm_plugin_{p}.so"))),
        )
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(DemoError::Setup(format!(
            "hvmctl demo needs host-agent and the plugins beside hvmctl; missing: {}. Build them with `cargo build --release --workspace`",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Run the demo; the results of the three array kinds, in order.
pub fn run(opts: &Options) -> Result<Vec<KindResult>, DemoError> {
    let exe = std::env::current_exe().map_err(io("find hvmctl's own path"))?;
    let bin_dir = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let agent = bin_dir.join("host-agent");
    check_beside(&bin_dir, &agent)?;
    let tmp;
    let work = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io(d.display().to_string()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("hvm-demo-")
                .tempdir()
                .map_err(io("create a temporary directory"))?;
            tmp.path().to_path_buf()
        }
    };
    let state = work.join("state");
    let cfg = work.join("demo.yaml");
    std::fs::write(&cfg, config(opts.size_mib, &bin_dir)).map_err(io(cfg.display().to_string()))?;
    let log = work.join("host-agent.log");
    let t0 = Instant::now();
    let daemon = Daemon::start(&agent, &cfg, &state, &log)?;
    let control = state.join("run/control.sock");
    if !opts.quiet {
        eprintln!(
            "host-agent started on {} (config {}, log {})",
            state.join("nbd.sock").display(),
            cfg.display(),
            log.display()
        );
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut results = Vec::new();
    for (i, k) in KINDS.iter().enumerate() {
        let r = one_kind(
            k,
            &state,
            &control,
            &work,
            opts,
            seed.wrapping_add(i as u64),
        )?;
        println!("{}", summary_line(&r));
        results.push(r);
    }
    let st = daemon.stop()?;
    if !st.success() {
        return Err(DemoError::Setup(format!(
            "host-agent did not stop cleanly on SIGTERM ({st}); see {}",
            log.display()
        )));
    }
    println!(
        "all three backups verified; host-agent stopped cleanly; {:.1}s in all",
        t0.elapsed().as_secs_f64()
    );
    Ok(results)
}
