//! A backup to S3 (Ceph radosgw on the project's throwaway cluster) against the upload a
//! user would otherwise run: `aws s3 cp` of the same image file, here boto3's
//! `upload_file` with the AWS CLI's defaults (8 MiB parts, 10 in flight), in the same
//! run. Then an incremental after 5 % of the virtual LU changed (random 64 KiB writes),
//! with the bytes it uploaded.
//!
//! `cargo bench -p hvm-tests --bench s3_backup` (HVM_BENCH_GIB: size, default 1).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use hvm_host_agent::backups::s3::{S3Options, S3Store};
use hvm_host_agent::backups::store::Store;
use hvm_tests::backup::Site;
use hvm_tests::rgw::Rgw;
use hvm_tests::tool;

const BUCKET: &str = "hvm-bench";
const PEER: &str = r#"
import sys, time, boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
endpoint, key, secret, bucket, path = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20,
                     max_concurrency=10)
t = time.monotonic()
s3.upload_file(path, bucket, "peer/image.img", Config=cfg)
print(time.monotonic() - t)
s3.delete_object(Bucket=bucket, Key="peer/image.img")
"#;

/// Pseudo-random bytes: nothing for zstd or the chunk hashes to save.
fn noise_file(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..bytes >> 20 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write");
    }
    f.flush().expect("flush");
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `hvmctl backup run` into `target`: (seconds, report).
fn backup(site: &Site, target: &str, full: bool) -> (f64, serde_json::Value) {
    let mut args = vec![
        "backup",
        "run",
        "--db",
        &site.dbs[0].1,
        "--backup",
        &site.backup_addr,
    ];
    args.extend(["--vlu", "pg", "--target", target, "--via", "nbd"]);
    if full {
        args.push("--full");
    }
    let t = Instant::now();
    let v = site.json(&args);
    (t.elapsed().as_secs_f64(), v)
}

/// Bytes of the objects under `chunks/` that are not in `before`.
fn new_bytes(s3: &S3Store, before: &[String]) -> (usize, u64) {
    let now = s3.list("chunks/").expect("list");
    let new: Vec<&String> = now.iter().filter(|k| !before.contains(k)).collect();
    let bytes = new
        .iter()
        .map(|k| s3.get(k).expect("get").len() as u64)
        .sum();
    (new.len(), bytes)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let gib: u64 = std::env::var("HVM_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let bytes = gib << 30;
    drop(tool("/usr/bin/python3"));
    let rgw = Rgw::start(&[BUCKET]);
    let work = tempfile::tempdir().expect("tempdir");
    let site = Site::start(work.path(), 1, bytes / 512, &rgw.env());
    let db = &site.dbs[0].0;
    let image = work.path().join("image.img");
    noise_file(&image, bytes);
    run(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(db.uri("pg")),
        "fill the virtual LU",
    );

    // The peer: the same image file uploaded by boto3, as `aws s3 cp` would.
    let peer: f64 = run(
        tool("/usr/bin/python3")
            .args([
                "-c",
                PEER,
                &rgw.endpoint,
                &rgw.access_key,
                &rgw.secret_key,
                BUCKET,
            ])
            .arg(&image),
        "boto3 upload",
    )
    .trim()
    .parse()
    .expect("seconds");
    rgw.gc();

    let target = format!("s3://{BUCKET}/db00");
    let opts = S3Options {
        endpoint: Some(rgw.endpoint.clone()),
        region: "us-east-1".into(),
        access_key: rgw.access_key.clone(),
        secret_key: rgw.secret_key.clone(),
        allow_http: true,
        retry_secs: 30,
        ..S3Options::default()
    };
    let s3 = S3Store::open_with(&target, &opts).expect("open");
    let (full_s, full) = backup(&site, &target, true);
    let (n, up) = new_bytes(&s3, &[]);
    let mib = bytes as f64 / 1048576.0;
    println!("image {gib} GiB of incompressible data, radosgw on memstore, this machine's 2 cores");
    println!(
        "  boto3 upload_file (8 MiB parts, 10 in flight): {peer:.2} s  {:.0} MiB/s",
        mib / peer
    );
    println!(
        "  hvm backup run --full to s3:// (snapshot, NBD pull, chunks, upload, manifest): {full_s:.2} s  {:.0} MiB/s  ({n} objects, {} MiB uploaded; kind {})",
        mib / full_s,
        up >> 20,
        full["copy"]["kind"]
    );
    println!(
        "  ratio (peer time / hvm time): {:.2}x (target >= 0.9x)",
        peer / full_s
    );

    // 5 % of the LU changed by random 64 KiB writes, then an incremental.
    let before = s3.list("chunks/").expect("list");
    run(
        tool("fio")
            .args([
                "--name=change",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=4",
                "--refill_buffers",
            ])
            .arg(format!("--uri={}", db.uri("pg")))
            .arg(format!("--size={bytes}"))
            .arg(format!("--io_size={}", bytes / 20)),
        "fio",
    );
    let (inc_s, inc) = backup(&site, &target, false);
    let (n, up) = new_bytes(&s3, &before);
    let copied: u64 = inc["copy"]["lus"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["copied_bytes"].as_u64())
        .sum();
    println!(
        "  incremental after 5 % changed ({} MiB written): {inc_s:.2} s, kind {}, {} MiB copied, {n} objects / {} MiB uploaded ({:.1} % of the full's time)",
        (bytes / 20) >> 20,
        inc["copy"]["kind"],
        copied >> 20,
        up >> 20,
        100.0 * inc_s / full_s
    );
}
