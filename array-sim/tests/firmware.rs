//! The firmware rules of the three array kinds, each test citing its paragraph of
//! EP 1 148 416, driven through `Engine::execute` with raw CDBs.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use array_sim::config::ArrayConfig;
use array_sim::engine::{Engine, Outcome, Response, BLOCK_SIZE};
use array_sim::fault::{FaultAction, FaultOp, FaultRule};
use array_sim::scsi::{self, Command, Sense, CHECK_CONDITION, GOOD};
use hvm_core::mode::{decode_mirror_page, decode_mode_sense, MirrorPage, Mode};
use hvm_core::LuId;

const BLOCKS: u64 = 256;

fn engine(yaml: &str, dir: &std::path::Path) -> Engine {
    let cfg = ArrayConfig::parse(yaml, "test.yaml").unwrap();
    Engine::open(&cfg, Some(dir)).unwrap()
}

/// Fig. 9's first row: mirroring LU 0 = origin LU 1 (disk d0) + mate LU 2 (disk d1).
fn stateless() -> String {
    format!(
        "kind: stateless
disks: [{{name: d0}}, {{name: d1}}]
lus:
  - {{lun: 1, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 2, blocks: {BLOCKS}, disk: d1}}
mirroring:
  - {{mirror: 0, origin: 1, mate: 2}}
"
    )
}

fn mode_select_array(dir: &std::path::Path) -> Engine {
    engine(
        &format!(
            "kind: mode-select
disks: [{{name: d0}}, {{name: d1}}, {{name: d2}}]
lus:
  - {{lun: 1, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 4, blocks: {BLOCKS}, disk: d1}}
  - {{lun: 5, blocks: {BLOCKS}, disk: d2}}
  - {{lun: 7, blocks: {BLOCKS}, disk: d0}}
mirroring:
  - {{lu: 1, mates: [4, 5]}}
"
        ),
        dir,
    )
}

fn run(e: &Engine, lun: u8, cmd: Command, data: &[u8]) -> Response {
    match e.execute(lun, &cmd.encode(), data) {
        Outcome::Reply(r) => r,
        Outcome::Drop => panic!("connection dropped"),
    }
}

fn write(e: &Engine, lun: u8, lba: u64, fill: u8) -> Response {
    let data = vec![fill; BLOCK_SIZE as usize];
    run(
        e,
        lun,
        Command::Write16 {
            lba,
            blocks: 1,
            fua: false,
        },
        &data,
    )
}

fn read(e: &Engine, lun: u8, lba: u64) -> Response {
    run(
        e,
        lun,
        Command::Read16 {
            lba,
            blocks: 1,
            fua: false,
        },
        &[],
    )
}

fn read_byte(e: &Engine, lun: u8, lba: u64) -> u8 {
    let r = read(e, lun, lba);
    assert_eq!(r.status, GOOD, "read LU {lun}: {:?}", r.sense);
    r.data[0]
}

fn select(e: &Engine, lun: u8, mode: Mode) -> Response {
    let page = hvm_core::mode::encode_mode_select(mode).unwrap();
    let data = scsi::encode_mode_select_6(&page);
    run(
        e,
        lun,
        Command::ModeSelect6 {
            param_len: data.len() as u8,
        },
        &data,
    )
}

fn sense_mode(e: &Engine, lun: u8) -> Mode {
    let r = run(
        e,
        lun,
        Command::ModeSense6 {
            page: 0,
            alloc_len: 255,
        },
        &[],
    );
    assert_eq!(r.status, GOOD);
    decode_mode_sense(scsi::mode_page_6(&r.data).unwrap()).unwrap()
}

fn check(r: &Response, sense: Sense) {
    assert_eq!((r.status, r.sense), (CHECK_CONDITION, Some(sense)));
}

/// [0025], Fig. 2/4: Mode Select sets 0/1/2, Mode Sense answers the mode, or 4 for a
/// mate or an LU that is not duplicated; the table survives an array restart.
#[test]
fn mode_select_and_sense_persist() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    assert_eq!(sense_mode(&e, 1), Mode::Synchronized);
    assert_eq!(sense_mode(&e, 4), Mode::Undefined);
    assert_eq!(sense_mode(&e, 7), Mode::Undefined);
    assert_eq!(select(&e, 1, Mode::Snapshot).status, GOOD);
    assert_eq!(sense_mode(&e, 1), Mode::Snapshot);
    check(
        &select(&e, 4, Mode::Snapshot),
        Sense::INVALID_FIELD_IN_PARAMETERS,
    );
    // A malformed page: page code 3Fh.
    let data = scsi::encode_mode_select_6(&[0x3f, 1]);
    check(
        &run(&e, 1, Command::ModeSelect6 { param_len: 6 }, &data),
        Sense::INVALID_FIELD_IN_PARAMETERS,
    );
    drop(e);
    let e = mode_select_array(dir.path());
    assert_eq!(
        sense_mode(&e, 1),
        Mode::Snapshot,
        "mode lost across restart"
    );
}

/// Fig. 6 and [0040]-[0041]: writes go to the LU and every mate unless the LU is in
/// Snapshot; a mate is written only in Snapshot; [0020]: two mates make a triple mirror.
#[test]
fn fig6_writes() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    assert_eq!(write(&e, 1, 3, 0xaa).status, GOOD);
    select(&e, 1, Mode::Snapshot);
    assert_eq!((read_byte(&e, 4, 3), read_byte(&e, 5, 3)), (0xaa, 0xaa));
    assert_eq!(write(&e, 1, 3, 0xbb).status, GOOD);
    assert_eq!(read_byte(&e, 1, 3), 0xbb);
    assert_eq!(
        read_byte(&e, 4, 3),
        0xaa,
        "Snapshot: the mate keeps the old data"
    );
    assert_eq!(
        write(&e, 4, 9, 0xcc).status,
        GOOD,
        "step 905: mate writable in Snapshot"
    );
    select(&e, 1, Mode::Resynchronizing);
    check(&write(&e, 4, 9, 0xdd), Sense::NOT_ACCESSIBLE);
    // Claim 13: no reads of the mate while Re-synchronizing.
    check(&read(&e, 4, 9), Sense::NOT_ACCESSIBLE);
    assert_eq!(write(&e, 1, 5, 0xee).status, GOOD);
    select(&e, 1, Mode::Snapshot);
    assert_eq!(
        read_byte(&e, 4, 5),
        0xee,
        "Re-synchronizing: writes are mirrored"
    );
}

/// [0034]: in Synchronized, reads of the LU are spread over both legs; 10 000 random
/// reads put 40-60 % on each (with three legs here, a third each).
#[test]
fn reads_spread_over_legs_when_synchronized() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&stateless(), dir.path());
    let mut x: u64 = 1;
    for _ in 0..10_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        assert_eq!(read(&e, 0, (x >> 33) % BLOCKS).status, GOOD);
    }
    let r1 = e.lu_disk_stats(1).unwrap().reads;
    let r2 = e.lu_disk_stats(2).unwrap().reads;
    assert_eq!(r1 + r2, 10_000);
    assert!((4000..=6000).contains(&r1), "leg 1 got {r1} of 10000");

    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    for i in 0..9_000 {
        read(&e, 1, i % BLOCKS);
    }
    for lun in [1, 4, 5] {
        let n = e.lu_disk_stats(lun).unwrap().reads;
        assert!((2500..=3500).contains(&n), "LU {lun} got {n} of 9000");
    }
}

/// [0077]: with one leg busy with a backup's reads, the database's reads of the mirroring
/// LU go mostly to the other leg.
#[test]
fn reads_avoid_the_loaded_leg() {
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(engine(
        &format!(
            "kind: pre-update
disks: [{{name: d0, iops: 2000}}, {{name: d1, iops: 2000}}]
lus:
  - {{lun: 0, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 1, blocks: {BLOCKS}, disk: d1}}
mirroring:
  - {{mirror: 0, mate: 1}}
"
        ),
        dir.path(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    // The backup: four readers of the mate LU (leg d1) keep it busy.
    let backups: Vec<_> = (0..4)
        .map(|_| {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    read(&e, 1, 7);
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = (
        e.lu_disk_stats(0).unwrap().reads,
        e.lu_disk_stats(1).unwrap().reads,
    );
    // The database reads the mirroring LU meanwhile.
    let db_reads = 200;
    for i in 0..db_reads {
        read(&e, 0, i % BLOCKS);
    }
    let after = (
        e.lu_disk_stats(0).unwrap().reads,
        e.lu_disk_stats(1).unwrap().reads,
    );
    stop.store(true, Ordering::SeqCst);
    for b in backups {
        b.join().unwrap();
    }
    let on_d0 = after.0 - before.0;
    assert!(
        on_d0 * 10 >= db_reads * 8,
        "only {on_d0} of {db_reads} database reads went to the idle leg"
    );
}

/// [0051], [0058]: the stateless array mirrors writes to the mirroring LU onto origin and
/// mate; both are accessible alone; Mode Sense answers Fig. 11; no Mode Select.
#[test]
fn stateless_rules() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&stateless(), dir.path());
    assert_eq!(e.luns(), vec![0, 1, 2]);
    assert_eq!(write(&e, 0, 1, 0x11).status, GOOD);
    assert_eq!((read_byte(&e, 1, 1), read_byte(&e, 2, 1)), (0x11, 0x11));
    assert_eq!(write(&e, 1, 1, 0x22).status, GOOD);
    assert_eq!((read_byte(&e, 1, 1), read_byte(&e, 2, 1)), (0x22, 0x11));
    let r = run(
        &e,
        0,
        Command::ModeSense6 {
            page: 0,
            alloc_len: 255,
        },
        &[],
    );
    let page = decode_mirror_page(scsi::mode_page_6(&r.data).unwrap()).unwrap();
    assert_eq!(
        page,
        MirrorPage::Mirror {
            origin: LuId(1),
            mate: LuId(2)
        }
    );
    let r = run(
        &e,
        2,
        Command::ModeSense6 {
            page: 0,
            alloc_len: 255,
        },
        &[],
    );
    assert_eq!(
        decode_mirror_page(scsi::mode_page_6(&r.data).unwrap()),
        Ok(MirrorPage::Other)
    );
    check(&select(&e, 0, Mode::Snapshot), Sense::INVALID_FIELD_IN_CDB);
    // READ CAPACITY(16) of the mirroring LU: the legs' size.
    let r = run(&e, 0, Command::ReadCapacity16 { alloc_len: 32 }, &[]);
    assert_eq!(scsi::decode_read_capacity_16(&r.data), Some((BLOCKS, 512)));
}

/// [0073]: the pre-update array's mate is read-only (DATA PROTECT 27h/00h) and shows the
/// mirroring LU's data; Mode Sense answers the Fig. 14 pairing.
#[test]
fn pre_update_rules() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(
        &format!(
            "kind: pre-update
disks: [{{name: d0}}, {{name: d1}}]
lus:
  - {{lun: 0, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 1, blocks: {BLOCKS}, disk: d1}}
  - {{lun: 9, blocks: 64, disk: d0}}
mirroring:
  - {{mirror: 0, mate: 1}}
"
        ),
        dir.path(),
    );
    assert_eq!(write(&e, 0, 2, 0x33).status, GOOD);
    assert_eq!(read_byte(&e, 1, 2), 0x33);
    check(&write(&e, 1, 2, 0x44), Sense::WRITE_PROTECTED);
    assert_eq!(
        write(&e, 9, 2, 0x55).status,
        GOOD,
        "a plain LU (save area) is writable"
    );
    let r = run(
        &e,
        0,
        Command::ModeSense6 {
            page: 0,
            alloc_len: 255,
        },
        &[],
    );
    let page = decode_mirror_page(scsi::mode_page_6(&r.data).unwrap()).unwrap();
    assert_eq!(page, MirrorPage::PreUpdate { mate: LuId(1) });
    let r = run(
        &e,
        1,
        Command::ModeSense6 {
            page: 0,
            alloc_len: 255,
        },
        &[],
    );
    assert_eq!(r.data[2] & 0x80, 0x80, "the mate reports write protection");
}

/// [0049]: the array copies LBA ranges between the LUs of one mirroring row itself.
#[test]
fn array_copy() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    select(&e, 1, Mode::Snapshot);
    for lba in 10..20 {
        write(&e, 1, lba, lba as u8);
    }
    select(&e, 1, Mode::Resynchronizing);
    let copy = Command::ArrayCopy {
        lba: 10,
        blocks: 10,
        dest_lun: 4,
    };
    assert_eq!(run(&e, 1, copy, &[]).status, GOOD);
    assert_eq!(e.counters.copied_bytes.load(Ordering::SeqCst), 10 * 512);
    select(&e, 1, Mode::Snapshot);
    assert_eq!(read_byte(&e, 4, 15), 15);
    assert_eq!(read_byte(&e, 5, 15), 0, "only the named mate was copied to");
    check(
        &run(
            &e,
            1,
            Command::ArrayCopy {
                lba: 0,
                blocks: 1,
                dest_lun: 7,
            },
            &[],
        ),
        Sense::INVALID_FIELD_IN_CDB,
    );
    check(
        &run(
            &e,
            1,
            Command::ArrayCopy {
                lba: BLOCKS,
                blocks: 1,
                dest_lun: 4,
            },
            &[],
        ),
        Sense::LBA_OUT_OF_RANGE,
    );
}

/// Bad commands are CHECK CONDITION with the documented sense, never a panic.
#[test]
fn bad_commands() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    let reply = |lun, cdb: &[u8], data: &[u8]| match e.execute(lun, cdb, data) {
        Outcome::Reply(r) => r,
        Outcome::Drop => panic!("dropped"),
    };
    check(
        &reply(1, &[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
        Sense::INVALID_OPCODE,
    );
    check(&reply(1, &[0x88, 0, 0], &[]), Sense::INVALID_FIELD_IN_CDB);
    check(&reply(1, &[], &[]), Sense::INVALID_FIELD_IN_CDB);
    check(&read(&e, 1, BLOCKS), Sense::LBA_OUT_OF_RANGE);
    check(
        &run(
            &e,
            1,
            Command::Read16 {
                lba: u64::MAX,
                blocks: 2,
                fua: false,
            },
            &[],
        ),
        Sense::LBA_OUT_OF_RANGE,
    );
    check(&read(&e, 42, 0), Sense::LUN_NOT_SUPPORTED);
    check(
        &run(
            &e,
            1,
            Command::Write16 {
                lba: 0,
                blocks: 2,
                fua: false,
            },
            &[0; 512],
        ),
        Sense::PARAMETER_LIST_LENGTH,
    );
    check(
        &run(
            &e,
            1,
            Command::ModeSense6 {
                page: 0x08,
                alloc_len: 255,
            },
            &[],
        ),
        Sense::INVALID_FIELD_IN_CDB,
    );
    // The next good command still works.
    assert_eq!(read(&e, 1, 0).status, GOOD);
}

/// INQUIRY, its pairing VPD page, and REPORT LUNS describe the array to a driver.
#[test]
fn discovery() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    let r = run(&e, 0, Command::ReportLuns { alloc_len: 1024 }, &[]);
    assert_eq!(scsi::decode_report_luns(&r.data), Some(vec![1, 4, 5, 7]));
    let r = run(
        &e,
        1,
        Command::Inquiry {
            evpd: false,
            page: 0,
            alloc_len: 96,
        },
        &[],
    );
    assert_eq!((r.data[0], &r.data[8..16]), (0x00, &b"HVM     "[..]));
    let r = run(
        &e,
        1,
        Command::Inquiry {
            evpd: true,
            page: scsi::VPD_PAIRING,
            alloc_len: 96,
        },
        &[],
    );
    // kind 0 (mode-select), role 1 (mirrored LU), two mates: 4 and 5.
    assert_eq!(&r.data[4..], &[0, 1, 2, 4, 5]);
    let r = run(
        &e,
        5,
        Command::Inquiry {
            evpd: true,
            page: scsi::VPD_PAIRING,
            alloc_len: 96,
        },
        &[],
    );
    assert_eq!(&r.data[4..], &[0, 3, 1, 1]);
}

/// Fault injection from the config and at runtime by SET FAULT: errors with chosen
/// sense for the next N commands, a dropped connection, and clearing.
#[test]
fn fault_injection() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    let rule = FaultRule {
        lun: Some(1),
        op: FaultOp::Write,
        action: FaultAction::Error,
        sense: Some([0x4, 0x44, 0x00]),
        count: Some(2),
        rate: None,
        delay_ms: None,
    };
    let data = FaultRule::encode(Some(&rule));
    let set = Command::SetFault {
        param_len: data.len() as u32,
    };
    assert_eq!(run(&e, 1, set, &data).status, GOOD);
    check(&write(&e, 1, 0, 1), Sense::INTERNAL_FAILURE);
    assert_eq!(read(&e, 1, 0).status, GOOD, "reads are not affected");
    check(&write(&e, 1, 0, 1), Sense::INTERNAL_FAILURE);
    assert_eq!(write(&e, 1, 0, 1).status, GOOD, "two failures, then served");

    let drop_rule = FaultRule {
        action: FaultAction::Drop,
        sense: None,
        count: None,
        ..rule
    };
    let data = FaultRule::encode(Some(&drop_rule));
    run(&e, 1, set, &data);
    let cdb = Command::Write16 {
        lba: 0,
        blocks: 1,
        fua: false,
    }
    .encode();
    assert_eq!(e.execute(1, &cdb, &[0; 512]), Outcome::Drop);
    let clear = FaultRule::encode(None);
    assert_eq!(run(&e, 1, set, &clear).status, GOOD);
    assert_eq!(write(&e, 1, 0, 1).status, GOOD);

    // From the config.
    let dir = tempfile::tempdir().unwrap();
    let cfg = stateless() + "faults:\n  - {lun: 2, op: read, action: error, count: 1}\n";
    let e = engine(&cfg, dir.path());
    check(&read(&e, 2, 0), Sense::UNRECOVERED_READ_ERROR);
    assert_eq!(read(&e, 2, 0).status, GOOD);
}

/// An injected delay holds the command at least that long; other LUs are not delayed.
#[test]
fn injected_delay() {
    let dir = tempfile::tempdir().unwrap();
    let e = mode_select_array(dir.path());
    let rule = FaultRule {
        lun: Some(7),
        op: FaultOp::Read,
        action: FaultAction::Delay,
        sense: None,
        count: Some(1),
        rate: None,
        delay_ms: Some(30.0),
    };
    let data = FaultRule::encode(Some(&rule));
    run(
        &e,
        7,
        Command::SetFault {
            param_len: data.len() as u32,
        },
        &data,
    );
    let t = std::time::Instant::now();
    assert_eq!(read(&e, 7, 0).status, GOOD);
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(30),
        "{:?}",
        t.elapsed()
    );
}

/// Reads of a mirroring LU from many threads at once: the leg choice never fails while
/// the disks' outstanding counts change under it (a race that once divided by zero).
#[test]
fn concurrent_reads_pick_a_leg() {
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(engine(&stateless(), dir.path()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for i in 0..5000 {
                    assert_eq!(read(&e, 0, (t * 31 + i) % BLOCKS).status, GOOD);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The array's non-volatile memory for mirrored writes: a process that died after one
/// leg was written and before the other leaves the legs different; the next start makes
/// them agree (the write was never acknowledged, so either content is allowed).
#[test]
fn a_mirrored_write_cut_between_its_legs_is_repaired_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&stateless(), dir.path());
    assert_eq!(write(&e, 0, 10, 0x11).status, GOOD);
    drop(e);
    // What a death between the legs leaves: the slot in use and only LU 1 written.
    {
        let (w, _) = array_sim::mirror::WriteIntents::open(dir.path()).unwrap();
        std::mem::forget(w.begin(&[1, 2], 10, 1).unwrap());
    }
    let leg = |lun: u8| std::fs::read(dir.path().join(format!("lu{lun}.img"))).unwrap();
    let mut one = leg(1);
    one[10 * 512..11 * 512].fill(0x22);
    std::fs::write(dir.path().join("lu1.img"), &one).unwrap();
    assert_ne!(leg(1), leg(2));
    let e = engine(&stateless(), dir.path());
    assert_eq!(leg(1), leg(2), "the restart left the legs different");
    assert_eq!(read_byte(&e, 2, 10), 0x22);
    drop(e);
    // Repaired once: the slot is free now.
    let (_, pending) = array_sim::mirror::WriteIntents::open(dir.path()).unwrap();
    assert!(pending.is_empty());
}
