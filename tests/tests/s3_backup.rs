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

