//! The ratchet: offenders that predate the check are listed in
//! `tools/architecture/baseline.txt`. The test fails when a new one appears or a listed
//! one gets worse (a longer function, a circle with more modules), and prints the lines
//! of the list that are fixed so they can be removed.

use std::collections::{BTreeMap, BTreeSet};

use hvm_architecture::{circle_allowed, scan, scan_crate, workspace, Findings, MAX_FN_LINES};

/// The baseline: `fn PATH::NAME LINES` and `circle MEMBER: a, b, c` lines.
fn baseline() -> (BTreeMap<String, usize>, BTreeSet<String>) {
    let path = workspace().join("tools/architecture/baseline.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut fns = BTreeMap::new();
    let mut circles = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("fn ") {
            let (name, n) = rest.rsplit_once(' ').expect("fn NAME LINES");
            fns.insert(name.to_string(), n.parse().expect("a line count"));
        } else if let Some(rest) = line.strip_prefix("circle ") {
            circles.insert(rest.to_string());
        }
    }
    (fns, circles)
}

#[test]
fn no_new_import_circles_and_no_new_long_functions() {
    let found = scan();
    let (fns, circles) = baseline();
    let mut problems = Vec::new();
    for (name, n) in &found.long_fns {
        match fns.get(name) {
            None => problems.push(format!(
                "{name} has {n} lines (at most {MAX_FN_LINES} outside tests)"
            )),
            Some(&was) if *n > was => problems.push(format!(
                "{name} grew from {was} to {n} lines (at most {MAX_FN_LINES} outside tests)"
            )),
            Some(_) => {}
        }
    }
    for c in &found.circles {
        if !circle_allowed(c, &circles) {
            problems.push(format!("a circle of imports in {c}"));
        }
    }
    let fixed: Vec<String> = fns
        .iter()
        .filter(|(name, _)| !found.long_fns.contains_key(*name))
        .map(|(name, n)| format!("fn {name} {n}"))
        .chain(
            circles
                .iter()
                .filter(|c| !found.circles.contains(*c))
                .map(|c| format!("circle {c}")),
        )
        .collect();
    if !fixed.is_empty() {
        println!(
            "fixed since the baseline (remove from tools/architecture/baseline.txt):\n  {}",
            fixed.join("\n  ")
        );
    }
    println!(
        "{} functions over {MAX_FN_LINES} lines, {} circles of imports ({} and {} in the baseline)",
        found.long_fns.len(),
        found.circles.len(),
        fns.len(),
        circles.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_a_circle_and_a_long_function() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("nbd")).expect("dirs");
    std::fs::write(src.join("lib.rs"), "pub mod nbd;\npub mod other;\n").expect("lib");
    std::fs::write(src.join("nbd/mod.rs"), "pub mod server;\npub mod wire;\n").expect("mod");
    std::fs::write(
        src.join("nbd/server.rs"),
        "use super::wire::Frame;\npub struct Server;\n",
    )
    .expect("server");
    let body = "    let _ = 1;\n".repeat(MAX_FN_LINES);
    std::fs::write(
        src.join("nbd/wire.rs"),
        format!("pub struct Frame;\nfn f() {{ let _ = crate::nbd::server::Server; }}\nfn long() {{\n{body}}}\n#[cfg(test)]\nmod tests {{ fn long_test() {{\n{body}}} }}\n"),
    )
    .expect("wire");
    std::fs::write(src.join("other.rs"), "use crate::nbd::server::Server;\n").expect("other");
    let mut f = Findings::default();
    scan_crate("demo", &src, &mut f);
    assert_eq!(
        f.circles.iter().collect::<Vec<_>>(),
        ["demo: nbd::server, nbd::wire"]
    );
    let names: Vec<&String> = f.long_fns.keys().collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with("nbd/wire.rs::long"), "{names:?}");
    assert!(circle_allowed(
        "demo: nbd::server, nbd::wire",
        &["demo: nbd::server, nbd::wire, other".to_string()].into()
    ));
    assert!(!circle_allowed(
        "demo: nbd::server, nbd::wire",
        &["else: nbd::server, nbd::wire".to_string()].into()
    ));
}
