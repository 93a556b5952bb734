//! `hvmctl backup policy run`: the due entries, at most N at once, each on its own thread
//! calling the console's backup run ([`console::run`]) as a library.
//!
//! Failure isolation: an entry's failure (an unreachable host, a failing hook, a refused
//! freeze, a full store) ends that entry only, with its reason; the others go on. A
//! transport error (the request's answer never came: connection refused, reset, closed) of
//! the snapshot, or of the copy once the console deleted the snapshot again, is retried
//! `retries` times with backoff (2 s, 4 s, 8 s .. at most 60 s). Anything else (a refused
//! request, a timeout of the freeze, a failed copy, a copy whose snapshot could not be
//! deleted, or any failure after the backup was stored) is final: a retry would start a
//! second backup beside what the first left.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::file::{Entry, Hooks, PolicyFile, TlsFiles};
use super::state::{Last, State};
use crate::coord::{console, tls, unix_ms, Peer};

/// What one entry's run came to.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: String,
    pub last: Last,
}

/// The console's TLS identity, loaded once for every entry.
pub struct Identity {
    tls: Arc<rustls::ClientConfig>,
    token: String,
}

impl Identity {
    /// The files of the policy's `tls:`, defaulting as `hvmctl backup run` does.
    pub fn load(t: &TlsFiles) -> Result<Identity, String> {
        let env_or = |v: &Option<std::path::PathBuf>, var: &str, default: &str| {
            v.clone()
                .or_else(|| std::env::var_os(var).map(Into::into))
                .unwrap_or_else(|| default.into())
        };
        let ca = env_or(&t.ca, "HVM_CA", "/etc/hvm/tls/ca.pem");
        let token = env_or(&t.token_file, "HVM_TOKEN_FILE", "/etc/hvm/tls/token");
        let dir = ca.parent().unwrap_or(Path::new(".")).to_path_buf();
        let beside = |n: &str| dir.join(n).display().to_string();
        let cert = env_or(&t.cert, "HVM_CERT", &beside("console.pem"));
        let key = env_or(&t.key, "HVM_KEY", &beside("console-key.pem"));
        Ok(Identity {
            tls: tls::client_config(&ca, Some((&cert, &key))).map_err(|e| e.to_string())?,
            token: tls::read_token(&token).map_err(|e| e.to_string())?,
        })
    }

    fn peer(&self, address: &str) -> Peer {
        Peer {
            address: address.to_string(),
            tls: self.tls.clone(),
            token: self.token.clone(),
        }
    }
}

/// Run `entries` (already chosen), `parallel` at a time; `done` sees each outcome as it
/// ends (the caller saves the state and prints a line).
pub fn run_all(
    entries: Vec<Entry>,
    id: &Identity,
    state: &State,
    parallel: usize,
    done: &(dyn Fn(&Outcome) + Sync),
) -> Vec<Outcome> {
    let queue = Mutex::new(entries.into_iter().collect::<VecDeque<_>>());
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                let Some(e) = next else { break };
                let before = state.entries.get(&e.name).cloned().unwrap_or_default();
                let o = Outcome {
                    name: e.name.clone(),
                    last: run_entry(&e, id, &before),
                };
                done(&o);
                outcomes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(o);
            });
        }
    });
    outcomes
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
}

/// One entry: before hook, the backup (retried on transport errors), prune, after hook.
fn run_entry(e: &Entry, id: &Identity, before: &Last) -> Last {
    let mut last = Last {
        start_unix_ms: unix_ms(),
        last_ok_start_unix_ms: before.last_ok_start_unix_ms,
        incrementals_since_full: before.incrementals_since_full,
        ..Last::default()
    };
    let result = hook(e, "before", e.hooks.before.as_deref(), None)
        .and_then(|()| backup(e, id, before, &mut last))
        .and_then(|()| prune(e, id));
    let verdict = result.as_ref().err().map(String::as_str);
    let after = hook(e, "after", e.hooks.after.as_deref(), Some(verdict));
    last.end_unix_ms = unix_ms();
    match result.and(after) {
        Ok(()) => {
            last.ok = true;
            last.last_ok_start_unix_ms = Some(last.start_unix_ms);
        }
        Err(reason) => last.reason = Some(reason),
    }
    last
}

/// The backup itself, retried on transport errors; fills `last` from the report.
fn backup(e: &Entry, id: &Identity, before: &Last, last: &mut Last) -> Result<(), String> {
    let full = wants_full(e, before);
    let o = console::Options {
        db: id.peer(&e.db),
        backup: id.peer(&e.backup),
        vlus: e.vlus.clone(),
        target: e.target.clone(),
        via: e.via,
        db_nbd: e.db_nbd.clone(),
        deadline_ms: e.deadline_ms,
        wait_resync: false,
        full,
        rate: e.rate,
        consistency: e.consistency,
        human: false,
    };
    loop {
        last.attempts += 1;
        let r = console::run(&o);
        let Some(err) = r.error else {
            record(&r.value, last);
            return Ok(());
        };
        if !transient(&r.value) || last.attempts > e.retries {
            return Err(err);
        }
        let wait = Duration::from_secs((2u64 << (last.attempts - 1).min(5)).min(60));
        tracing::warn!(entry = %e.name, error = %err, ?wait, "transport error: retrying");
        std::thread::sleep(wait);
    }
}

/// Whether the next backup must be a full one: the first, and every `full_every`-th
/// (the others are incremental when the repository holds the tracking's base).
fn wants_full(e: &Entry, before: &Last) -> bool {
    before.last_ok_start_unix_ms.is_none() || before.incrementals_since_full + 1 >= e.full_every
}

/// A failure whose answer never came (the console's `agent ADDR: ...` transport error),
/// before the backup was stored and with nothing left behind that the console knows of.
fn transient(report: &Value) -> bool {
    let err = &report["error"];
    let retryable = match err["step"].as_str() {
        Some("snapshot") => true,
        Some("copy") => err["clean"] == json!(true),
        // delete, resync, verify: the backup is stored already.
        _ => false,
    };
    retryable
        && err["code"] == json!("failed")
        && err["detail"].is_null()
        && err["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent "))
}

fn record(report: &Value, last: &mut Last) {
    let copy = &report["copy"];
    last.backup = report["id"].as_str().map(str::to_string);
    last.kind = copy["kind"].as_str().map(str::to_string);
    last.copied_bytes = copy["lus"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["copied_bytes"].as_u64())
        .sum();
    // A backup the array copied to its device (EP 1 058 190 CCOPY) is whole too.
    if matches!(
        last.kind.as_deref(),
        Some("full" | crate::pairs::medium::KIND)
    ) {
        last.incrementals_since_full = 0;
    } else {
        last.incrementals_since_full += 1;
    }
}

fn prune(e: &Entry, id: &Identity) -> Result<(), String> {
    let Some(keep) = e.keep else { return Ok(()) };
    console::prune(&id.peer(&e.backup), &e.target, Some(keep), false)
        .map(|_| ())
        .map_err(|f| format!("the backup is stored, but prune failed: {f}"))
}

/// Run a console-side hook; `result` is `None` before the backup, else the error if any.
fn hook(
    e: &Entry,
    which: &str,
    cmd: Option<&str>,
    result: Option<Option<&str>>,
) -> Result<(), String> {
    let Some(cmd) = cmd else { return Ok(()) };
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .env("HVM_POLICY", &e.name)
        .env("HVM_DB", &e.db)
        .env("HVM_TARGET", &e.target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(r) = result {
        c.env("HVM_RESULT", if r.is_none() { "ok" } else { "failed" })
            .env("HVM_REASON", r.unwrap_or(""));
    }
    run_hook(c, &e.hooks).map_err(|why| format!("{which} hook failed: {why}"))
}

/// Run a hook's command within its timeout (killed past it); stderr's last line is the
/// reason of a failure.
fn run_hook(mut c: Command, h: &Hooks) -> Result<(), String> {
    // Its own process group: a timeout kills what the hook started too (and so closes
    // the stderr pipe they hold).
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut child = c.spawn().map_err(|e| format!("cannot run sh: {e}"))?;
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = err {
            let _ =
                std::io::Read::read_to_string(&mut std::io::Read::take(&mut e, 64 << 10), &mut s);
        }
        s
    });
    let deadline = Instant::now() + Duration::from_secs(h.timeout_secs);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
        }
    };
    let stderr = reader.join().unwrap_or_default();
    let tail = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!(
            "{s}{}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        )),
        None => Err(format!("still running after {} s; killed", h.timeout_secs)),
    }
}

/// The entries of `f` to run now: those named by `only` (whether due or not), else the
/// due ones. An unknown name is an error.
pub fn choose(
    f: &PolicyFile,
    only: &[String],
    state: &State,
    now: u64,
) -> Result<Vec<Entry>, String> {
    for n in only {
        if !f.entries.iter().any(|e| &e.name == n) {
            return Err(format!("--only {n}: no entry of that name"));
        }
    }
    Ok(f.entries
        .iter()
        .filter(|e| {
            if only.is_empty() {
                let last = state
                    .entries
                    .get(&e.name)
                    .and_then(|l| l.last_ok_start_unix_ms);
                e.schedule.due(last, now)
            } else {
                only.contains(&e.name)
            }
        })
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(hooks: Hooks) -> Entry {
        let f: PolicyFile = serde_yaml::from_str(
            "entries: [{name: a, db: 'h:1', vlus: [pg], backup: 'b:2', target: t, schedule: always}]",
        )
        .unwrap();
        Entry {
            hooks,
            ..f.entries[0].clone()
        }
    }

    #[test]
    fn hooks_report_their_reason_and_are_bounded() {
        let h = |before: &str, secs| Hooks {
            before: Some(before.into()),
            after: None,
            timeout_secs: secs,
        };
        let e = entry(h("echo \"$HVM_POLICY $HVM_DB\" >&2; exit 0", 5));
        assert_eq!(hook(&e, "before", e.hooks.before.as_deref(), None), Ok(()));
        let e = entry(h("echo first >&2; echo 'no quiesce on a\n' >&2; exit 3", 5));
        let err = hook(&e, "before", e.hooks.before.as_deref(), None).unwrap_err();
        assert!(
            err.starts_with("before hook failed: exit status: 3: no quiesce on a"),
            "{err}"
        );
        let e = entry(h("sleep 30", 1));
        let t = Instant::now();
        let err = hook(&e, "before", e.hooks.before.as_deref(), None).unwrap_err();
        assert!(
            err.contains("killed") && t.elapsed() < Duration::from_secs(20),
            "{err}"
        );
        let e = entry(h(
            "test \"$HVM_RESULT\" = failed && test \"$HVM_REASON\" = boom",
            5,
        ));
        assert_eq!(
            hook(&e, "after", e.hooks.before.as_deref(), Some(Some("boom"))),
            Ok(())
        );
    }

    #[test]
    fn a_full_backup_every_full_every_th() {
        let e = Entry {
            full_every: 3,
            ..entry(Hooks::default())
        };
        let mut last = Last::default();
        let mut kinds = Vec::new();
        for _ in 0..7 {
            let full = wants_full(&e, &last);
            kinds.push(if full { 'F' } else { 'i' });
            last.last_ok_start_unix_ms = Some(1);
            let kind = if full { "full" } else { "incremental" };
            record(&json!({ "id": "x", "copy": { "kind": kind } }), &mut last);
        }
        assert_eq!(kinds.iter().collect::<String>(), "FiiFiiF");
        // The array's copy to its device counts as a full backup.
        record(
            &json!({ "id": "y", "copy": { "kind": "array-ccopy" } }),
            &mut last,
        );
        assert_eq!(last.incrementals_since_full, 0);
    }

    #[test]
    fn only_transport_errors_are_retried() {
        let t = json!({"error": {"step": "snapshot", "code": "failed", "message": "agent 127.0.0.1:9: Connection refused (os error 111)", "detail": null, "clean": false}});
        assert!(transient(&t));
        let refused = json!({"error": {"step": "snapshot", "code": "failed", "message": "hook pg failed", "detail": {"thawed": []}}});
        assert!(!transient(&refused));
        let bad = json!({"error": {"step": "snapshot", "code": "bad_request", "message": "agent x", "detail": null}});
        assert!(!transient(&bad));
        // The copy: retried only once its snapshot was deleted again.
        let mut copy = t.clone();
        copy["error"]["step"] = json!("copy");
        assert!(!transient(&copy));
        copy["error"]["clean"] = json!(true);
        assert!(transient(&copy));
        // The backup is stored; only deleting the snapshot failed: no second backup.
        let mut delete = copy.clone();
        delete["error"]["step"] = json!("delete");
        assert!(!transient(&delete));
    }

    #[test]
    fn only_names_entries_and_unknown_ones_are_refused() {
        let f: PolicyFile = serde_yaml::from_str(
            "entries: [{name: a, db: 'h:1', vlus: [x], backup: 'b:2', target: t, schedule: daily 02:00}, {name: b, db: 'h:1', vlus: [y], backup: 'b:2', target: t, schedule: always}]",
        )
        .unwrap();
        let mut s = State::default();
        let now = unix_ms();
        s.entries.insert(
            "a".into(),
            Last {
                last_ok_start_unix_ms: Some(now - 1000),
                ..Last::default()
            },
        );
        let names = |v: Vec<Entry>| v.into_iter().map(|e| e.name).collect::<Vec<_>>();
        // a ran a second ago (not due unless it is 02:00:00 now), b is always due.
        let due = names(choose(&f, &[], &s, now).unwrap());
        assert!(due.contains(&"b".to_string()));
        assert_eq!(names(choose(&f, &["a".into()], &s, now).unwrap()), ["a"]);
        assert!(choose(&f, &["zz".into()], &s, now)
            .unwrap_err()
            .contains("zz"));
    }
}
