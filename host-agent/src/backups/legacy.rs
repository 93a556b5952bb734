//! The old format, `hvm-backup/1` (before issue 19): a directory with one raw image per
//! virtual LU (`<vlu>.img`), the small files, and `manifest.json` with each file's size
//! and SHA-256. `hvmctl backup verify DIR` and `hvmctl backup restore DIR` still read it,
//! on the host that has the directory; nothing writes it any more.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "hvm-backup/1";
const CHUNK: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub id: String,
    pub created: String,
    pub created_unix_ms: u64,
    pub info: Value,
    pub lus: Vec<LuEntry>,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LuEntry {
    pub vlu: String,
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// A plain name for a file in a backup directory.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// True if `dir` holds an `hvm-backup/1` manifest.
pub fn is_legacy(dir: &Path) -> bool {
    std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v["format"] == FORMAT)
}

/// Read and check a backup directory's manifest.
pub fn load(dir: &Path) -> Result<Manifest, String> {
    let p = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    if m.format != FORMAT {
        return Err(format!(
            "{}: format {:?}, expected {FORMAT:?}",
            p.display(),
            m.format
        ));
    }
    for name in m
        .lus
        .iter()
        .map(|l| &l.file)
        .chain(m.files.iter().map(|f| &f.name))
    {
        if !plain(name) {
            return Err(format!(
                "{}: {name:?} is not a plain file name",
                p.display()
            ));
        }
    }
    Ok(m)
}

/// Size and SHA-256 of `path`'s first `size` bytes (all of it if `None`), calling
/// `progress` as it reads.
pub fn digest(
    path: &Path,
    size: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, String), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let want = match size {
            Some(s) => (s - n).min(CHUNK as u64) as usize,
            None => CHUNK,
        };
        if want == 0 {
            break;
        }
        let r = f
            .read(&mut buf[..want])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if r == 0 {
            break;
        }
        hash.update(&buf[..r]);
        n += r as u64;
        progress(n);
    }
    Ok((n, hex::encode(hash.finalize())))
}

/// `hvmctl backup verify DIR`: every file's size and checksum against the manifest.
/// Returns the report, or the list of what does not match.
pub fn verify(dir: &Path, progress: &mut dyn FnMut(&str, u64, u64)) -> Result<Value, String> {
    let m = load(dir)?;
    let mut bad = Vec::new();
    let mut checked = Vec::new();
    let items = m
        .lus
        .iter()
        .map(|l| (&l.file, l.size, &l.sha256))
        .chain(m.files.iter().map(|f| (&f.name, f.size, &f.sha256)));
    for (name, size, sha) in items {
        let path = dir.join(name);
        let actual_size = std::fs::metadata(&path).map(|md| md.len());
        match actual_size {
            Err(e) => bad.push(format!("{name}: {e}")),
            Ok(s) if s != size => bad.push(format!("{name}: {s} bytes, the manifest says {size}")),
            Ok(_) => {
                let (_, got) = digest(&path, None, &mut |n| progress(name, n, size))?;
                if &got != sha {
                    bad.push(format!("{name}: SHA-256 {got}, the manifest says {sha}"));
                } else {
                    checked.push(json!({ "file": name, "size": size, "sha256": sha }));
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(json!({ "dir": dir, "id": m.id, "created": m.created, "ok": true, "files": checked }))
    } else {
        Err(format!(
            "{} does not match its manifest: {}",
            dir.display(),
            bad.join("; ")
        ))
    }
}

/// `hvmctl backup restore DIR --vlu NAME --to PATH`: check the image against the
/// manifest, then write it to PATH (a file, created or replaced, or a block device), sync
/// it and check what was written.
pub fn restore(
    dir: &Path,
    vlu: Option<&str>,
    to: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Value, String> {
    let m = load(dir)?;
    let lu = match vlu {
        Some(v) => m.lus.iter().find(|l| l.vlu == v).ok_or_else(|| {
            format!(
                "the backup has no virtual LU {v} (it has {})",
                m.lus
                    .iter()
                    .map(|l| l.vlu.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None if m.lus.len() == 1 => &m.lus[0],
        None => {
            return Err(format!(
                "the backup has several virtual LUs; name one with --vlu ({})",
                m.lus
                    .iter()
                    .map(|l| l.vlu.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    let src = dir.join(&lu.file);
    let (n, sha) = digest(&src, None, &mut |n| progress("verify", n, lu.size))?;
    if n != lu.size || sha != lu.sha256 {
        return Err(format!(
            "{}: does not match the manifest (size {n}, SHA-256 {sha}); nothing was written to {}",
            src.display(),
            to.display()
        ));
    }
    let is_block = std::fs::metadata(to)
        .map(|md| std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()))
        .unwrap_or(false);
    let io = |e: std::io::Error| format!("{}: {e}", to.display());
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .open(to)
        .map_err(io)?;
    let mut input = std::fs::File::open(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < lu.size {
        let want = (lu.size - at).min(CHUNK as u64) as usize;
        input
            .read_exact(&mut buf[..want])
            .map_err(|e| format!("{}: {e}", src.display()))?;
        out.write_all(&buf[..want]).map_err(io)?;
        at += want as u64;
        progress("restore", at, lu.size);
    }
    out.sync_all().map_err(io)?;
    super::restore::drop_cache(&out).map_err(io)?;
    drop(out);
    let (_, back) = digest(to, Some(lu.size), &mut |n| progress("check", n, lu.size))?;
    if back != lu.sha256 {
        return Err(format!(
            "{}: what was written reads back as SHA-256 {back}, not {}",
            to.display(),
            lu.sha256
        ));
    }
    Ok(json!({ "vlu": lu.vlu, "to": to, "size": lu.size, "sha256": lu.sha256 }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn old_directories_still_verify_and_restore() {
        let d = tempfile::tempdir().unwrap();
        let data = vec![5u8; 8192];
        std::fs::write(d.path().join("a.img"), &data).unwrap();
        let m = json!({ "format": FORMAT, "id": "x", "created": "c", "created_unix_ms": 1,
            "info": null, "files": [],
            "lus": [{ "vlu": "a", "file": "a.img", "size": 8192,
                      "sha256": hex::encode(Sha256::digest(&data)), "source": "s" }] });
        std::fs::write(d.path().join(MANIFEST), m.to_string()).unwrap();
        assert!(is_legacy(d.path()));
        verify(d.path(), &mut |_, _, _| {}).unwrap();
        let to = d.path().join("out.img");
        restore(d.path(), None, &to, &mut |_, _, _| {}).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), data);
        std::fs::write(d.path().join("a.img"), vec![6u8; 8192]).unwrap();
        assert!(verify(d.path(), &mut |_, _, _| {})
            .unwrap_err()
            .contains("a.img: SHA-256"));
    }
}
