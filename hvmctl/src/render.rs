//! The human tables and lines of the control API's replies, from their `hvm_api` types.

use hvm_api::{
    Backends, Extents, Lu, Move, Phase, Reload, Resync, Rollback, SnapshotChange, Status, Tracking,
    Verify,
};

/// Rows as columns padded to their widest cell, two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A table's header row.
fn header(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// An optional cell: the value, or `-`.
fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `hvmctl lu list`: one row per virtual LU.
pub fn lus(list: &[Lu]) -> String {
    let mut rows = vec![header(&[
        "NAME",
        "BACKEND",
        "MODE",
        "READ",
        "WRITE",
        "SNAPSHOT OF",
        "SIZE",
        "RECORDED LBAS",
        "CHANGED SINCE BACKUP",
        "DATA ON",
        "NBD CLIENTS",
        "MOVE",
    ])];
    for l in list {
        rows.push(vec![
            l.name.clone(),
            l.backend.clone(),
            l.mode.clone(),
            or_dash(l.read.map(|x| format!("LU {x}"))),
            or_dash(l.write.map(|x| format!("LU {x}"))),
            or_dash(l.snapshot_of.as_ref()),
            format!("{} MiB", l.size_bytes >> 20),
            l.recorded_lbas.to_string(),
            l.tracking.as_ref().map_or("-".into(), tracking_cell),
            l.placement.clone().unwrap_or_else(|| l.backend.clone()),
            clients(l),
            l.moving.as_ref().map_or("-".into(), move_line),
        ]);
    }
    table(&rows)
}

/// NBD connections on an LU's export, and the fence of a restore in place.
fn clients(l: &Lu) -> String {
    if l.restore_fence {
        format!("{} (fenced: restoring)", l.nbd_clients)
    } else {
        l.nbd_clients.to_string()
    }
}

/// An LU's changed-block tracking: bytes since the base, and the backup being copied.
fn tracking_cell(t: &Tracking) -> String {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let base = t.base.as_deref().unwrap_or("no backup");
    let mut out = format!("{:.1} MiB since {base}", mib(t.current_bytes));
    if let Some(p) = &t.pending {
        out += &format!(", {} copying {:.1} MiB", p.backup, mib(p.bytes));
    }
    if t.granule > 512 {
        out += &format!(" ({} KiB granules)", t.granule >> 10);
    }
    out
}

/// A move's status in one line.
pub fn move_line(m: &Move) -> String {
    let to =
        m.to.first()
            .map_or("-".into(), |p| format!("{}:{}", p.backend, p.lu));
    match &m.phase {
        Phase::Copying => {
            let pct = m.copied_bytes * 100 / m.total_bytes.max(1);
            format!("MOVING {pct}% to {to}")
        }
        Phase::Done => format!(
            "moved to {to} in {:.1} s (switch {:.2} ms)",
            m.elapsed_ms / 1e3,
            m.switch_ms.unwrap_or(0.0)
        ),
        Phase::Cancelled => format!("move to {to} cancelled -"),
        Phase::Failed(why) => format!("move to {to} failed {why}"),
    }
}

/// One line for a verify result: identical, or the differing ranges.
pub fn verify_line(v: &Verify) -> String {
    let mib = v.compared_bytes >> 20;
    if v.identical {
        return format!(
            "{}: legs identical ({mib} MiB compared in {:.2} s)",
            v.name, v.seconds
        );
    }
    let ranges: Vec<String> = v
        .differing
        .iter()
        .map(|r| format!("{}-{}", r[0], r[1]))
        .collect();
    format!(
        "{}: legs differ in {} LBAs (LBA ranges {}){}",
        v.name,
        v.differing_lbas,
        ranges.join(", "),
        if v.repaired {
            "; repaired from the origin"
        } else {
            ""
        }
    )
}

/// `hvmctl extents`: the update-location table.
pub fn extents(e: &Extents) -> String {
    let mut out = format!("{}: {}, {} LBAs recorded\n", e.name, e.mode, e.total_lbas);
    let mut rows = vec![header(&["FIRST LBA", "LAST LBA", "LBAS"])];
    for [a, b] in &e.ranges {
        let n = b.saturating_sub(*a) + 1;
        rows.push(vec![a.to_string(), b.to_string(), n.to_string()]);
    }
    out.push_str(&table(&rows));
    out
}

/// A rate per second, or unlimited.
fn rate(bytes_per_second: u64) -> String {
    match bytes_per_second {
        0 => "unlimited".to_string(),
        r => format!("{} MiB/s", r >> 20),
    }
}

/// `hvmctl resync status`.
pub fn resync(r: &Resync) -> String {
    let state = if r.paused { "paused" } else { "running" };
    let mut out = format!("resync: {state}, rate {}\n", rate(r.bytes_per_second));
    let mut rows = vec![header(&[
        "NAME",
        "BACKEND",
        "MODE",
        "REMAINING LBAS",
        "COPIED LBAS",
        "SKIPPED LBAS",
    ])];
    for p in &r.pairs {
        rows.push(vec![
            p.name.clone(),
            p.backend.clone(),
            p.mode.clone(),
            p.remaining_lbas.to_string(),
            p.copied_lbas.to_string(),
            p.skipped_lbas.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// `hvmctl backends`: one row per backend, then each LU's identity.
pub fn backends(b: &Backends) -> String {
    let mut rows = vec![header(&[
        "NAME",
        "HEALTH",
        "ARRAY-SIDE BACKUP",
        "JOURNAL",
        "JOURNAL BYTES",
        "FLUSHES",
    ])];
    for b in &b.backends {
        let functions = b.backup_functions();
        let j = b.journal.as_ref();
        rows.push(vec![
            b.name.clone(),
            b.health.clone(),
            if functions.is_empty() {
                "-".into()
            } else {
                functions.join(",")
            },
            or_dash(j.map(|j| j.path.display())),
            or_dash(j.map(|j| j.stats.file_bytes)),
            or_dash(j.map(|j| j.stats.flushes)),
        ]);
    }
    let mut out = table(&rows);
    for b in &b.backends {
        for l in &b.lus {
            let id = l.identity.as_deref().unwrap_or("(the driver does not say)");
            out.push_str(&format!("{} LU {}: {id}\n", b.name, l.lu));
        }
    }
    out
}

/// A list, or `none`.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// `hvmctl reload`.
pub fn reload(r: &Reload) -> String {
    format!(
        "reloaded {}\napplied:       {}\nneeds restart: {}\nnot applied:   {}\n",
        r.file,
        list(&r.applied),
        list(&r.needs_restart),
        list(&r.not_applied)
    )
}

/// `hvmctl status`.
pub fn status(s: &Status) -> String {
    let mut out = format!(
        "version:             {}\nhealth:              {}\nbackends:            {}\nvirtual LUs:         {}\nNBD socket:          {}\nconfig file:         {}\nresync:              {}, rate {}, chunk {} KiB\nsnapshot read bytes: {}\n",
        s.version,
        s.health,
        s.backends,
        s.virtual_lus,
        s.nbd_socket.display(),
        or_dash(s.config_file.as_ref().map(|f| f.display())),
        if s.resync.paused { "paused" } else { "running" },
        rate(s.resync.bytes_per_second),
        s.resync.chunk_bytes >> 10,
        s.snapshot_read_bytes,
    );
    if let Some(c) = &s.coordination {
        let roles: Vec<String> = c
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        out += &format!("coordination:        {} ({})\n", c.listen, roles.join(", "));
    }
    for p in &s.problems {
        out += &format!("problem:             {p}\n");
    }
    if let Some(r) = &s.last_reload {
        out += &format!(
            "last reload:         {} at {} ({} applied, {} need a restart{})\n",
            r.file,
            r.at,
            r.applied.len(),
            r.needs_restart.len(),
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!(", failed: {e}"))
        );
    }
    out
}

/// A snapshot acquire's or delete's reply.
pub fn snapshot(c: &SnapshotChange) -> String {
    let what = if c.changed { "" } else { " (no change)" };
    format!("{}: {}{what}\n", c.name, c.mode)
}

/// A rollback's reply.
pub fn rollback(r: &Rollback) -> String {
    format!(
        "{}: {}, {} LBAs rolled back to the snapshot\n",
        r.name, r.mode, r.rolled_back_lbas
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvm_api::Place;

    #[test]
    fn tables_pad_columns_and_trim_line_ends() {
        let t = table(&[header(&["A", "BB"]), vec!["xyz".into(), "".into()]]);
        assert_eq!(t, "A    BB\nxyz\n");
    }

    #[test]
    fn moves_and_verifies_read_as_one_line() {
        let mut m = Move {
            vlu: "db".into(),
            from: vec![],
            to: vec![Place {
                backend: "b".into(),
                lu: 2,
            }],
            phase: Phase::Copying,
            copied_bytes: 1,
            total_bytes: 4,
            rate_bytes: 0,
            elapsed_ms: 1500.0,
            switch_ms: Some(0.5),
        };
        assert_eq!(move_line(&m), "MOVING 25% to b:2");
        m.phase = Phase::Failed("leg gone".into());
        assert_eq!(move_line(&m), "move to b:2 failed leg gone");
        let v = Verify {
            name: "db".into(),
            compared_bytes: 8 << 20,
            seconds: 0.5,
            identical: false,
            differing_lbas: 8,
            differing: vec![[2048, 2055]],
            repaired: false,
        };
        assert_eq!(
            verify_line(&v),
            "db: legs differ in 8 LBAs (LBA ranges 2048-2055)"
        );
    }
}
