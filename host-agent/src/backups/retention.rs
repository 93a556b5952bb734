//! Retention: which backups a policy `keep: {last: N, daily: D, weekly: W}` keeps, and
//! the prune that deletes the rest, crash-safe.
//!
//! Backups are grouped by their set of virtual LUs; in each group the policy keeps the
//! newest N, the newest backup of each of the D most recent days (UTC) that have one,
//! and the newest of each of the W most recent weeks (Monday to Sunday, UTC). The
//! newest backup of a group is always kept: the database host's tracking counts
//! changes from it, so the next incremental needs it.
//!
//! Order: the manifests go first (a backup without its manifest does not exist), then
//! the chunks no remaining manifest names. A crash in between leaves unreferenced chunks
//! (garbage the next prune removes), never a manifest that names a missing chunk. No
//! backup into the repository runs meanwhile (the repository's lock).

use std::collections::{BTreeMap, BTreeSet};

use hvm_api::coord::Pruned;

use super::format::{chunk_key, Repo};

/// The policy, as `coordination.backup.keep`, a policy file and `backup_prune` give it.
pub use hvm_api::coord::Keep;

/// A backup as retention sees it.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    pub created_unix_ms: u64,
    pub vlus: Vec<String>,
}

/// The ids `keep` keeps among `items`.
pub fn kept(keep: &Keep, items: &[Item]) -> BTreeSet<String> {
    let mut groups: BTreeMap<Vec<String>, Vec<&Item>> = BTreeMap::new();
    for i in items {
        let mut k = i.vlus.clone();
        k.sort();
        groups.entry(k).or_default().push(i);
    }
    let mut out = BTreeSet::new();
    for g in groups.values_mut() {
        // Newest first.
        g.sort_by(|a, b| (b.created_unix_ms, &b.id).cmp(&(a.created_unix_ms, &a.id)));
        let last = keep.last.max(1) as usize;
        out.extend(g.iter().take(last).map(|i| i.id.clone()));
        let day = |i: &Item| i.created_unix_ms / 86_400_000;
        // 1970-01-01 was a Thursday: shift so weeks start on Monday.
        let week = |i: &Item| (day(i) + 3) / 7;
        for (period, n) in [
            (&day as &dyn Fn(&Item) -> u64, keep.daily),
            (&week, keep.weekly),
        ] {
            let mut seen = BTreeSet::new();
            for i in g.iter() {
                if seen.len() as u32 >= n {
                    break;
                }
                if seen.insert(period(i)) {
                    out.insert(i.id.clone());
                }
            }
        }
    }
    out
}

/// Delete what `keep` does not keep (nothing if `dry_run`), then the chunks no manifest
/// names. Returns the report; `deleted(id)` is called after each manifest is gone.
pub fn prune(
    repo: &Repo,
    keep: &Keep,
    dry_run: bool,
    deleted: &mut dyn FnMut(&str),
) -> Result<Pruned, String> {
    let ids = repo.backup_ids().map_err(|e| e.to_string())?;
    let mut items = Vec::new();
    for id in &ids {
        let m = repo.manifest(id).map_err(|e| e.to_string())?;
        items.push(Item {
            id: id.clone(),
            created_unix_ms: m.created_unix_ms,
            vlus: m.vlus(),
        });
    }
    let keep_ids = kept(keep, &items);
    let delete: Vec<String> = ids
        .iter()
        .filter(|i| !keep_ids.contains(*i))
        .cloned()
        .collect();
    let mut report = Pruned {
        dry_run,
        keep: keep_ids.into_iter().collect(),
        delete,
        chunks_deleted: None,
        bytes_freed: None,
        location: repo.location(),
        policy: *keep,
    };
    if dry_run {
        return Ok(report);
    }
    for id in &report.delete {
        repo.delete_backup(id).map_err(|e| e.to_string())?;
        deleted(id);
    }
    let (chunks, freed) = collect_garbage(repo)?;
    report.chunks_deleted = Some(chunks);
    report.bytes_freed = Some(freed);
    // The staged files of copies that died are garbage too (a live process's stay).
    match repo.store().sweep() {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "removed the staged files of copies that died"),
        Err(e) => tracing::warn!(error = %e, "staged files of copies that died not removed"),
    }
    Ok(report)
}

/// Delete every chunk that no manifest names; returns how many and their bytes.
pub fn collect_garbage(repo: &Repo) -> Result<(u64, u64), String> {
    let mut referenced = BTreeSet::new();
    for id in repo.backup_ids().map_err(|e| e.to_string())? {
        let m = repo.manifest(&id).map_err(|e| e.to_string())?;
        referenced.extend(m.chunks().into_iter().map(str::to_string));
    }
    let (mut n, mut bytes) = (0, 0);
    for c in repo.chunk_names().map_err(|e| e.to_string())? {
        if !referenced.contains(&c) {
            let key = chunk_key(&c);
            bytes += repo.store().size(&key).unwrap_or(0);
            repo.store().delete(&key).map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    Ok((n, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, hours: u64) -> Item {
        Item {
            id: id.into(),
            created_unix_ms: hours * 3_600_000,
            vlus: vec!["pg".into()],
        }
    }

    #[test]
    fn policy() {
        // Day 0 (a Thursday): 3 backups; day 1: 2; day 5 (Tuesday of the next week): 1.
        let items = vec![
            item("a", 1),
            item("b", 2),
            item("c", 3),
            item("d", 25),
            item("e", 26),
            item("f", 5 * 24 + 1),
        ];
        let k = |last, daily, weekly| {
            kept(
                &Keep {
                    last,
                    daily,
                    weekly,
                },
                &items,
            )
            .into_iter()
            .collect::<Vec<_>>()
        };
        assert_eq!(k(0, 0, 0), vec!["f"]);
        assert_eq!(k(2, 0, 0), vec!["e", "f"]);
        assert_eq!(k(1, 3, 0), vec!["c", "e", "f"]);
        assert_eq!(k(1, 0, 2), vec!["e", "f"]);
        assert_eq!(k(0, 0, 9), vec!["e", "f"]);
        // Groups are kept apart.
        let mut two = items.clone();
        two.push(Item {
            id: "z".into(),
            created_unix_ms: 0,
            vlus: vec!["other".into()],
        });
        assert!(kept(&Keep::default(), &two).contains("z"));
    }
}
