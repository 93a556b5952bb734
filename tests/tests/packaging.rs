//! What a Linux admin expects, checked without building the package (scripts/package.sh
//! does that): man pages and completions made by the built binaries, the package's
//! metadata, unit, drop-in, postinst and example config; the `hvm` group's access to the
//! control socket; logs to journald with syslog priorities under systemd.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use hvm_tests::agent::Agent;
use hvm_tests::{binary, tool, workspace};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let listed = run(Command::new(binary("hvmctl")).arg("man").arg(dir.path()));
    run(Command::new(binary("host-agent"))
        .arg("man")
        .arg(dir.path()));
    for page in [
        "hvmctl.1",
        "hvmctl-snapshot-acquire.1",
        "hvmctl-completions.1",
        "host-agent.1",
    ] {
        assert!(
            dir.path().join(page).is_file(),
            "{page} missing; hvmctl listed {listed}"
        );
    }
    // Hidden subcommands get no page.
    assert!(!dir.path().join("hvmctl-man.1").exists());
    let render = |page: &str| {
        run(tool("man")
            .args(["-l", "-P", "cat"])
            .arg(dir.path().join(page))
            .env("MANWIDTH", "100"))
    };
    let hvmctl = render("hvmctl.1");
    for want in [
        "NAME",
        "SYNOPSIS",
        "hvmctl - control host-agent",
        "snapshot",
        "completions",
    ] {
        assert!(hvmctl.contains(want), "{want} not in\n{hvmctl}");
    }
    assert!(!hvmctl.contains("hvmctl-man"), "{hvmctl}");
    let agent = render("host-agent.1");
    assert!(
        agent.contains("--config") && agent.contains("/etc/hvm/host-agent.yaml"),
        "{agent}"
    );
}

#[test]
fn completions_complete() {
    let bash = run(Command::new(binary("hvmctl")).args(["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hvmctl.bash");
    std::fs::write(&script, &bash).unwrap();
    // Source it and complete `hvmctl sn<TAB>` and `hvmctl snapshot <TAB>` as bash would.
    let complete = |words: &str, cword: usize| {
        run(tool("bash").arg("-c").arg(format!(
            ". {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; \
             COMP_POINT=${{#COMP_LINE}}; \
             _hvmctl hvmctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        )))
    };
    assert_eq!(complete("hvmctl sn", 1).trim(), "snapshot");
    let sub = complete("hvmctl snapshot ''", 2);
    assert!(
        sub.lines().any(|l| l == "acquire") && sub.lines().any(|l| l == "delete"),
        "{sub}"
    );
    let zsh = run(Command::new(binary("hvmctl")).args(["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef hvmctl"), "{zsh}");
    let fish = run(Command::new(binary("hvmctl")).args(["completions", "fish"]));
    assert!(fish.contains("complete -c hvmctl"), "{fish}");
    let out = Command::new(binary("hvmctl"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The sources `[package.metadata.deb] assets` names, other than the build's outputs
/// (`target/release/...`, made by scripts/package.sh).
fn asset_sources(manifest: &str) -> Vec<String> {
    let table = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .expect("no [package.metadata.deb]");
    let assets = table.split("assets = [").nth(1).expect("no assets");
    let assets = &assets[..assets.find("\n]").expect("assets not closed")];
    assets
        .lines()
        .filter_map(|l| l.trim().strip_prefix("[\"")?.split('"').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_package_ships_what_the_unit_expects() {
    let pkg = workspace().join("host-agent");
    let manifest = std::fs::read_to_string(pkg.join("Cargo.toml")).unwrap();
    let sources = asset_sources(&manifest);
    for want in [
        "target/release/host-agent",
        "target/release/hvmctl",
        "target/release/libhvm_plugin_stateless.so",
        "target/release/libhvm_plugin_rbd.so",
        "target/release/hvm-doc/man/*.1.gz",
        "packaging/host-agent.yaml",
        "packaging/fsfreeze.conf",
    ] {
        assert!(
            sources.iter().any(|s| s == want),
            "{want} not in {sources:?}"
        );
    }
    for s in sources.iter().filter(|s| !s.starts_with("target/")) {
        let found = match s.split_once("*") {
            Some((dir, ext)) => std::fs::read_dir(pkg.join(dir))
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(ext)),
            None => pkg.join(s).is_file(),
        };
        assert!(found, "asset {s} missing");
    }
    assert!(!sources.iter().any(|s| s.contains("test")), "{sources:?}");
    // The unit: the default config, the group's access, journald; the drop-in for
    // fsfreeze hooks; the postinst's group.
    let unit = std::fs::read_to_string(pkg.join("packaging/hvm-host-agent.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/host-agent --state-dir /var/lib/hvm",
        "Group=hvm",
        "RuntimeDirectoryMode=0750",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} not in the unit");
    }
    let dropin = std::fs::read_to_string(pkg.join("packaging/fsfreeze.conf")).unwrap();
    assert!(dropin
        .lines()
        .any(|l| l == "CapabilityBoundingSet=CAP_SYS_ADMIN"));
    let postinst = pkg.join("packaging/debian/postinst");
    let text = std::fs::read_to_string(&postinst).unwrap();
    assert!(text.contains("addgroup --system hvm") && text.contains("#DEBHELPER#"));
    assert!(std::fs::metadata(&postinst).unwrap().permissions().mode() & 0o111 != 0);
    run(tool("sh").arg("-n").arg(&postinst));
    // The example config is the default --config's and parses.
    let yaml = std::fs::read_to_string(pkg.join("packaging/host-agent.yaml")).unwrap();
    let cfg = hvm_host_agent::config::Config::parse(&yaml, "host-agent.yaml").unwrap();
    assert_eq!(cfg.control_group.as_deref(), Some("hvm"));
    assert_eq!(
        cfg.plugin_dir.as_deref(),
        Some(Path::new("/usr/lib/hvm/plugins"))
    );
}

/// `control_group`: the socket 0660 and its directory 0750, both of that group (here the
/// test's own group, which needs no privilege); an unknown group is refused at start.
#[test]
fn the_control_group_may_use_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let gid = nix::unistd::getegid();
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    let quickstart =
        std::fs::read_to_string(workspace().join("host-agent/examples/quickstart.yaml")).unwrap();
    let cfg = dir.path().join("g.yaml");
    std::fs::write(&cfg, format!("control_group: {group}\n{quickstart}")).unwrap();
    let a = Agent::start_config(&cfg, &dir.path().join("s"));
    let sock = std::fs::metadata(a.control()).unwrap();
    let run_dir = std::fs::metadata(a.control().parent().unwrap()).unwrap();
    assert_eq!((sock.gid(), sock.mode() & 0o777), (gid.as_raw(), 0o660));
    assert_eq!(
        (run_dir.gid(), run_dir.mode() & 0o777),
        (gid.as_raw(), 0o750)
    );
    assert_eq!(a.json(&["status"])["virtual_lus"], 6);
    drop(a);
    std::fs::write(
        &cfg,
        format!("control_group: no-such-group-hvm\n{quickstart}"),
    )
    .unwrap();
    let err = Agent::refused_at_start(&cfg, &dir.path().join("s2"));
    assert!(
        err.contains("no group named \"no-such-group-hvm\""),
        "{err}"
    );
}

/// Under systemd (`JOURNAL_STREAM` names standard error) host-agent logs to journald with
/// syslog priorities (info is 6, where tracing-journald's default says 5) and not to
/// standard error. journald is a datagram socket of the test's, which host-agent finds at
/// /run/systemd/journal/socket in a mount namespace of its own (unshare: a tmpfs on /run).
#[test]
fn logs_go_to_journald_with_syslog_priorities() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("journal.sock");
    let journal = UnixDatagram::bind(&sock).unwrap();
    journal
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let setup = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
         ln -s {} /run/systemd/journal/socket && exec \"$@\"",
        sock.display()
    );
    let mut cmd = tool("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &setup,
        "sh",
    ])
    .arg(binary("host-agent"))
    .arg("--config")
    .arg(workspace().join("host-agent/examples/quickstart.yaml"))
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .env_remove("RUNTIME_DIRECTORY")
    .env_remove("NOTIFY_SOCKET")
    .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
    .stderr(stderr);
    let (proc, line) = hvm_tests::spawn_ready(&mut cmd);
    assert!(line.starts_with("host-agent: serving"), "{line:?}");
    let mut buf = vec![0u8; 64 << 10];
    let serving = loop {
        let n = journal
            .recv(&mut buf)
            .expect("no journal entry for `serving`");
        let entry = journal_fields(&buf[..n]);
        if entry.get("MESSAGE").map(String::as_str) == Some("serving") {
            break entry;
        }
    };
    assert_eq!(serving["PRIORITY"], "6", "{serving:?}");
    assert_eq!(serving["SYSLOG_IDENTIFIER"], "host-agent", "{serving:?}");
    drop(proc);
    let logged = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !logged.contains("serving"),
        "stderr has the log too: {logged}"
    );
}

/// The fields of one entry of journald's native protocol: `NAME=value\n`, or `NAME\n`, a
/// little-endian u64 length, the value and `\n`.
fn journal_fields(mut b: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    while let Some(end) = b.iter().position(|&c| c == b'=' || c == b'\n') {
        let name = String::from_utf8_lossy(&b[..end]).into_owned();
        let value;
        if b[end] == b'=' {
            let stop = end + 1 + b[end + 1..].iter().position(|&c| c == b'\n').unwrap();
            value = &b[end + 1..stop];
            b = &b[stop + 1..];
        } else {
            let len = u64::from_le_bytes(b[end + 1..end + 9].try_into().unwrap()) as usize;
            value = &b[end + 9..end + 9 + len];
            b = &b[end + 10 + len..];
        }
        out.insert(name, String::from_utf8_lossy(value).into_owned());
    }
    out
}
