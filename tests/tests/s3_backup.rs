//! Backups to S3 on a real object store: Ceph's radosgw started by the project's own
//! fixture ([`hvm_tests::rgw`]).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use hvm_host_agent::backups::s3::{S3Options, S3Store, MULTIPART_FROM};
use hvm_host_agent::backups::store::{Store, StoreError};
use hvm_tests::rgw::Rgw;

fn options(rgw: &Rgw) -> S3Options {
    S3Options {
        endpoint: Some(rgw.endpoint.clone()),
        region: "us-east-1".into(),
        access_key: rgw.access_key.clone(),
        secret_key: rgw.secret_key.clone(),
        allow_http: true,
        retry_secs: 10,
        ..S3Options::default()
    }
}

/// A pseudo-random buffer (no two chunks alike; no compression gains).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The [`Store`] contract on radosgw, as the directory store's unit test checks it, and
/// what only a remote store has: multipart objects, prefixes sharing a bucket, calls
/// from many threads and from inside a tokio runtime, and one-line errors.
#[test]
fn store_contract_on_radosgw() {
    let rgw = Rgw::start(&["hvm-backups"]);
    let o = options(&rgw);
    let s = S3Store::open_with("s3://hvm-backups/site1/db1", &o).unwrap();
    assert_eq!(s.location(), "s3://hvm-backups/site1/db1");

    s.put("backups/b1/manifest.json", b"{}").unwrap();
    assert!(s.put_if_absent("chunks/ab/abcd", b"x").unwrap());
    assert!(!s.put_if_absent("chunks/ab/abcd", b"y").unwrap());
    assert_eq!(s.get("chunks/ab/abcd").unwrap(), b"x");
    assert_eq!(s.size("chunks/ab/abcd").unwrap(), 1);
    s.put("chunks/ab/abce", b"").unwrap();
    assert_eq!(s.get("chunks/ab/abce").unwrap(), b"");
    assert_eq!(
        s.list("").unwrap(),
        [
            "backups/b1/manifest.json",
            "chunks/ab/abcd",
            "chunks/ab/abce"
        ]
    );
    assert_eq!(
        s.list("chunks/").unwrap(),
        ["chunks/ab/abcd", "chunks/ab/abce"]
    );
    // A prefix is a string prefix, not only whole parts.
    assert_eq!(s.list("chunks/ab/abcd").unwrap(), ["chunks/ab/abcd"]);
    assert_eq!(s.list("back").unwrap(), ["backups/b1/manifest.json"]);
    assert!(s.list("nothing/").unwrap().is_empty());
    s.delete("chunks/ab/abcd").unwrap();
    s.delete("chunks/ab/abcd").unwrap();
    assert!(!s.exists("chunks/ab/abcd").unwrap());
    assert!(s.exists("chunks/ab/abce").unwrap());
    match s.get("chunks/ab/abcd") {
        Err(StoreError::NotFound { key, location }) => {
            assert_eq!(key, "chunks/ab/abcd");
            assert_eq!(location, "s3://hvm-backups/site1/db1");
        }
        other => panic!("a missing key gave {other:?}"),
    }
    for bad in ["", "/abs", "a/../b", "a//b", ".hidden", "sp ace"] {
        assert!(
            matches!(s.put(bad, b""), Err(StoreError::BadKey { .. })),
            "{bad:?}"
        );
    }

    // Another prefix in the same bucket sees none of it, and a store without a prefix
    // sees it under the full names.
    let other = S3Store::open_with("s3://hvm-backups/site1/db10", &o).unwrap();
    assert!(other.list("").unwrap().is_empty());
    let whole = S3Store::open_with("s3://hvm-backups", &o).unwrap();
    assert_eq!(
        whole.list("site1/").unwrap(),
        [
            "site1/db1/backups/b1/manifest.json",
            "site1/db1/chunks/ab/abce"
        ]
    );

    // Multipart: large objects, whole or absent, and put_if_absent on them.
    let big = noise(MULTIPART_FROM + (5 << 20) + 123, 7);
    assert!(s.put_if_absent("big/one", &big).unwrap());
    assert!(!s.put_if_absent("big/one", &big).unwrap());
    assert!(s.get("big/one").unwrap() == big, "multipart object differs");
    s.delete("big/one").unwrap();

    parallel_and_async_callers(Arc::new(s));

    // Wrong keys: a one-line error naming the store, no panic.
    let bad = S3Store::open_with(
        "s3://hvm-backups/x",
        &S3Options {
            secret_key: "wrong".into(),
            ..o.clone()
        },
    )
    .unwrap();
    let e = bad.put("k", b"v").unwrap_err().to_string();
    assert!(
        e.starts_with("s3://hvm-backups/x: ") && !e.contains('\n'),
        "{e}"
    );
    // A bucket that does not exist.
    let none = S3Store::open_with("s3://no-such-bucket/x", &o).unwrap();
    let e = none.list("").unwrap_err().to_string();
    assert!(
        e.contains("s3://no-such-bucket/x") && !e.contains('\n'),
        "{e}"
    );
}

/// 8 threads putting and reading 32 objects each (the format's writer runs several), and
/// calls from a tokio runtime's worker and blocking threads (the coordination server
/// runs the copy in `spawn_blocking`).
fn parallel_and_async_callers(s: Arc<S3Store>) {
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let s = s.clone();
            sc.spawn(move || {
                for i in 0..32u64 {
                    let data = noise(4096 + i as usize, t * 100 + i);
                    let key = format!("par/{t}/{i}");
                    assert!(s.put_if_absent(&key, &data).unwrap());
                    assert_eq!(s.get(&key).unwrap(), data);
                }
            });
        }
    });
    assert_eq!(s.list("par/").unwrap().len(), 256);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s2 = s.clone();
    rt.block_on(async move {
        let s3 = s2.clone();
        tokio::task::spawn_blocking(move || s3.put("async/blocking", b"1").unwrap())
            .await
            .unwrap();
        // On a worker thread itself: blocks that worker, must not panic.
        s2.put("async/worker", b"2").unwrap();
        assert_eq!(s2.get("async/blocking").unwrap(), b"1");
    });
    // Dropped inside a runtime: no panic either.
    let s4 = Arc::new(
        S3Store::open_with(
            &s.location(),
            &S3Options {
                endpoint: None,
                region: "us-east-1".into(),
                ..S3Options::default()
            },
        )
        .unwrap(),
    );
    rt.block_on(async move { drop(s4) });
    for k in s.list("").unwrap() {
        s.delete(&k).unwrap();
    }
    assert!(s.list("").unwrap().is_empty());
}

/// `qemu-img convert` of raw `from` to raw `to` (a file or an NBD URI); `-n`: `to`
/// exists already (an export).
fn convert(from: &std::ffi::OsStr, to: &std::ffi::OsStr, existing: bool) {
    let out = hvm_tests::tool("qemu-img")
        .arg("convert")
        .args(existing.then_some("-n"))
        .args(["-f", "raw", "-O", "raw"])
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert {from:?} {to:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole image of `pg` on database host `db` now, through its NBD export.
fn image(db: &hvm_tests::agent::Agent, to: &std::path::Path) -> Vec<u8> {
    convert(db.uri("pg").as_ref(), to.as_ref(), false);
    std::fs::read(to).unwrap()
}

/// Object keys of the repository (under its prefix) as the S3 API lists them.
fn chunk_keys(s: &S3Store) -> std::collections::BTreeSet<String> {
    s.list("chunks/").unwrap().into_iter().collect()
}

/// The ids of a `backup list` answer.
fn ids(list: &serde_json::Value) -> Vec<String> {
    list["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect()
}

/// `hvmctl backup run` of `pg` into `target`; its JSON report.
fn run(site: &hvm_tests::backup::Site, target: &str, extra: &[&str]) -> serde_json::Value {
    let db = &site.dbs[0].1;
    let mut args = vec!["backup", "run", "--db", db, "--backup", &site.backup_addr];
    args.extend(["--vlu", "pg", "--target", target, "--via", "nbd"]);
    args.extend(extra);
    site.json(&args)
}

/// Full and incremental backups of a virtual LU to `s3://` on radosgw: listed, verified,
/// one object corrupted and named by verify, every point restored equal to its instant,
/// a prune by policy that keeps the chains restorable.
#[test]
fn full_and_incremental_backups_on_radosgw() {
    let rgw = Rgw::start(&["hvm-backups"]);
    let work = tempfile::tempdir().unwrap();
    let site = hvm_tests::backup::Site::start(work.path(), 1, 16384, &rgw.env());
    let db = &site.dbs[0].0;
    let target = "s3://hvm-backups/fleet/db00";
    let s3 = S3Store::open_with(target, &options(&rgw)).unwrap();
    let bk = site.backup_addr.clone();

    // Three points: a full backup, then two incrementals after small writes.
    let writes: [&[&str]; 3] = [
        &["write -P 0x11 0 4k"],
        &["write -P 0x22 1M 64k", "write -P 0x23 5M 4k"],
        &["write -P 0x33 2M 512k", "write -P 0x34 7M 1M"],
    ];
    let mut points = Vec::new();
    let mut chunks_before = chunk_keys(&s3);
    let mut new_chunks = Vec::new();
    let noise_file = work.path().join("noise.img");
    std::fs::write(&noise_file, noise(8 << 20, 3)).unwrap();
    for (i, w) in writes.iter().enumerate() {
        if i == 0 {
            // Incompressible data for the full backup, written through the export.
            convert(noise_file.as_ref(), db.uri("pg").as_ref(), true);
        }
        db.qemu_io("pg", w);
        let r = run(&site, target, &[]);
        let id = r["id"].as_str().unwrap().to_string();
        let kind = r["copy"]["kind"].as_str().unwrap_or("?").to_string();
        assert_eq!(kind, if i == 0 { "full" } else { "incremental" }, "{r}");
        let img = image(db, &work.path().join(format!("instant{i}.img")));
        let now = chunk_keys(&s3);
        new_chunks.push(now.difference(&chunks_before).cloned().collect::<Vec<_>>());
        chunks_before = now;
        eprintln!(
            "backup {i}: {id} {kind}, {} new objects",
            new_chunks[i].len()
        );
        points.push((id, img));
    }
    // The manifests are in the bucket, under the repository's prefix.
    for (id, _) in &points {
        assert!(s3.exists(&format!("backups/{id}/manifest.json")).unwrap());
    }
    // An incremental stored only what changed: far fewer bytes than the full.
    let stored: Vec<usize> = new_chunks
        .iter()
        .map(|ks| ks.iter().map(|k| s3.get(k).unwrap().len()).sum())
        .collect();
    eprintln!("bytes stored per backup: {stored:?}");
    assert!(
        stored[1] * 4 < stored[0] && stored[2] * 4 < stored[0],
        "{stored:?}"
    );

    // Listed by the backup host's catalog.
    let list = site.json(&["backup", "list", "--backup", &bk, "--target", target]);
    let listed = ids(&list);
    for (id, _) in &points {
        assert!(listed.contains(id), "{id} not listed: {list}");
    }

    // Verified; every point restored equals its instant.
    for (i, (id, img)) in points.iter().enumerate() {
        let to = work.path().join(format!("restored{i}.img"));
        verify_and_restore(&site, id, &to, img, &format!("restore of point {i}"));
    }

    // One object of the first incremental corrupted: verify names it, and the full
    // backup (which does not use it) still verifies.
    let victim = new_chunks[1][0].clone();
    let good = s3.get(&victim).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0xff;
    s3.put(&victim, &bad).unwrap();
    let out = site
        .hvmctl()
        .args(["--json", "backup", "verify", &points[1].0, "--backup", &bk])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "verify passed a corrupted object: {said}"
    );
    let hash = victim.rsplit('/').next().unwrap();
    assert!(said.contains(hash), "verify does not name {victim}: {said}");
    site.json(&["backup", "verify", &points[0].0, "--backup", &bk]);
    s3.put(&victim, &good).unwrap();
    site.json(&["backup", "verify", &points[1].0, "--backup", &bk]);

    // Prune by policy (keep the last one): the chain the kept point needs stays whole,
    // and every point still listed restores equal to its instant.
    site.json(&[
        "backup",
        "prune",
        "--backup",
        &bk,
        "--target",
        target,
        "--keep-last",
        "1",
    ]);
    let list = site.json(&["backup", "list", "--backup", &bk, "--target", target]);
    let listed = ids(&list);
    eprintln!("after prune --keep-last 1: {listed:?}");
    let kept: Vec<_> = points
        .iter()
        .enumerate()
        .filter(|(_, (id, _))| listed.contains(id))
        .collect();
    assert!(
        kept.iter().any(|(i, _)| *i == 2),
        "the newest point is kept: {list}"
    );
    assert!(kept.len() < points.len(), "prune removed nothing: {list}");
    for (i, (id, img)) in kept {
        let to = work.path().join(format!("after-prune{i}.img"));
        verify_and_restore(&site, id, &to, img, &format!("after prune, point {i}"));
    }
}

/// `backup verify` of `id`, then its restore to `to`, which must equal `img` (the
/// instant's image).
fn verify_and_restore(
    site: &hvm_tests::backup::Site,
    id: &str,
    to: &std::path::Path,
    img: &[u8],
    what: &str,
) {
    let bk = &site.backup_addr;
    site.json(&["backup", "verify", id, "--backup", bk]);
    site.json(&[
        "backup",
        "restore",
        id,
        "--vlu",
        "pg",
        "--to",
        to.to_str().unwrap(),
        "--backup",
        bk,
    ]);
    assert!(
        std::fs::read(to).unwrap() == img,
        "{what} differs from its instant"
    );
}
