//! An online backup through hvm-core alone, on the in-memory array of each kind: a writer
//! keeps writing; it is quiesced, a snapshot is acquired, the writer resumes, the
//! snapshot is copied to a backup file and checked against the data at the snapshot
//! instant; the snapshot is deleted, resync runs while the writer goes on, and the legs
//! are checked identical. (The service-level demo, with NBD and hvmctl, comes with the
//! host-agent.)
//!
//! Run: `cargo run --release -p hvm-core --features mem-array --example online_backup`

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvm_core::journal::MemoryLog;
use hvm_core::mem_array::{ArrayKind, MemArray};
use hvm_core::{LuId, MirrorDefinition, PairConfig, SnapshotManager, VirtualLuId};

const LBAS: u64 = 16 * 1024; // 8 MiB per LU
const BYTES: usize = (LBAS * 512) as usize;
const ORIGIN: VirtualLuId = VirtualLuId(0);
const SNAPSHOT: VirtualLuId = VirtualLuId(1);

type Error = Box<dyn std::error::Error>;

fn setup(kind: ArrayKind) -> (Arc<MemArray>, PairConfig, LuId, LuId) {
    let (def, save, origin_leg, mate_leg) = match kind {
        ArrayKind::ModeSelect => (
            MirrorDefinition::Managed {
                lu: LuId(0),
                mates: vec![LuId(1)],
            },
            None,
            LuId(0),
            LuId(1),
        ),
        ArrayKind::Stateless => (
            MirrorDefinition::Triple {
                mirror: LuId(0),
                origin: LuId(1),
                mate: LuId(2),
            },
            None,
            LuId(1),
            LuId(2),
        ),
        ArrayKind::PreUpdate => (
            MirrorDefinition::Pair {
                mirror: LuId(0),
                mate: LuId(1),
            },
            Some(LuId(9)),
            LuId(0),
            LuId(1),
        ),
    };
    let extra: Vec<(LuId, u64)> = save.map(|lu| (lu, LBAS)).into_iter().collect();
    let array = Arc::new(MemArray::new(kind, vec![def.clone()], LBAS, &extra));
    let pair = PairConfig {
        origin: ORIGIN,
        snapshots: vec![SNAPSHOT],
        definition: def,
        save_area: save,
    };
    (array, pair, origin_leg, mate_leg)
}

fn run(kind: ArrayKind, dir: &std::path::Path) -> Result<(), Error> {
    let (array, pair, origin_leg, mate_leg) = setup(kind);
    let log = Arc::new(MemoryLog::new());
    let mgr = Arc::new(SnapshotManager::open(
        array.clone(),
        vec![pair],
        log.clone(),
        None,
    )?);
    let strategy = mgr.strategy(ORIGIN)?;

    // The "database": writes 4 KiB records at pseudo-random places until told to stop;
    // `paused` is its quiesce switch, `shadow` what it believes it wrote.
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(Mutex::new(()));
    let writes = Arc::new(AtomicU64::new(0));
    let shadow = Arc::new(Mutex::new(vec![0u8; BYTES]));
    let writer = {
        let (mgr, stop, paused, writes, shadow) = (
            mgr.clone(),
            stop.clone(),
            paused.clone(),
            writes.clone(),
            shadow.clone(),
        );
        std::thread::spawn(move || -> Result<(), hvm_core::ManagerError> {
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            while !stop.load(Ordering::SeqCst) {
                let _running = paused.lock().unwrap_or_else(|e| e.into_inner());
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (BYTES as u64 / 4096)) * 4096;
                let rec = [(x >> 8) as u8; 4096];
                mgr.write(ORIGIN, off, &rec, false)?;
                shadow.lock().unwrap_or_else(|e| e.into_inner())[off as usize..off as usize + 4096]
                    .copy_from_slice(&rec);
                writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(100));

    // Quiesce, acquire, resume ([0027]-[0028], [0068]).
    let t = Instant::now();
    let quiesced = paused.lock().unwrap_or_else(|e| e.into_inner());
    let at_snapshot = shadow.lock().unwrap_or_else(|e| e.into_inner()).clone();
    mgr.acquire(ORIGIN)?;
    drop(quiesced);
    let freeze = t.elapsed();

    // Back up the snapshot while the writer goes on ([0069]).
    let t = Instant::now();
    let path = dir.join(format!("backup-{kind:?}.img"));
    let mut out = std::fs::File::create(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut image = Vec::with_capacity(BYTES);
    for off in (0..BYTES).step_by(buf.len()) {
        mgr.read(SNAPSHOT, off as u64, &mut buf)?;
        out.write_all(&buf)?;
        image.extend_from_slice(&buf);
    }
    out.sync_all()?;
    let copy = t.elapsed();
    let backup_ok = image == at_snapshot;

    // Delete the snapshot and resync while the writer goes on ([0070], Fig. 7).
    let t = Instant::now();
    mgr.delete(ORIGIN)?;
    let dirty = mgr.resync_progress(ORIGIN)?.remaining;
    let progress = mgr.resync(ORIGIN, 2048, &AtomicBool::new(false), |_| {})?;
    let resync = t.elapsed();

    stop.store(true, Ordering::SeqCst);
    writer.join().map_err(|_| "writer panicked")??;
    let legs_ok = array.leg(origin_leg) == array.leg(mate_leg);
    let data_ok = array.leg(origin_leg) == *shadow.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "{:<11} {:<42} freeze {:>7.2?}  backup {:>8.2?} ({})  resync {:>8.2?} ({} LBAs recorded, {} copied)  writes {:>6}  legs {}  data {}",
        format!("{kind:?}"),
        strategy.to_string(),
        freeze,
        copy,
        if backup_ok { "equals snapshot instant" } else { "DIFFERS" },
        resync,
        dirty,
        progress.copied,
        writes.load(Ordering::Relaxed),
        if legs_ok { "identical" } else { "DIFFER" },
        if data_ok { "intact" } else { "LOST" },
    );
    if !(backup_ok && legs_ok && data_ok) {
        return Err(format!("{kind:?}: the online backup failed its checks").into());
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("hvm-online-backup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "online backup of an 8 MiB virtual LU on each array kind; backups in {}",
        dir.display()
    );
    for kind in [
        ArrayKind::ModeSelect,
        ArrayKind::Stateless,
        ArrayKind::PreUpdate,
    ] {
        run(kind, &dir)?;
    }
    std::fs::remove_dir_all(&dir)?;
    println!("all three backups verified");
    Ok(())
}
