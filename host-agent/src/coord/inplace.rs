//! Restore in place (`hvmctl backup restore ID --vlu V --in-place [--force]`): the
//! backup host writes the backup's image onto the live virtual LU over the database
//! host's NBD listener, and nothing else may have that export open meanwhile.
//!
//! The steps, driven by the console:
//! 0. `backup_restore_check` on the backup host: a backup it would refuse to restore in
//!    place (no such backup or virtual LU, or one on the array's backup device) is
//!    refused before the database host fences or stops anything.
//! 1. `restore_fence` on the database host: the export's fence goes up (a new NBD
//!    connection is refused with `NBD_REP_ERR_POLICY` unless its export name carries
//!    the fence's ticket), then the export's connections are counted. Any: the fence
//!    comes down and the restore is refused, unless `--force`, which runs
//!    `coordination.restore.stop` (the command that stops the database, unmounts its
//!    filesystem, disconnects `nbd-client`) and waits until no connection is left.
//! 2. `backup_restore` on the backup host, to the export named with the ticket.
//! 3. `restore_unfence` on the database host, whether the restore worked or not.
//!
//! No hook starts the database again: the freeze hooks quiesce and resume a running
//! database around a snapshot, and there is no start hook. The DBA mounts the
//! filesystem and starts the database on the restored data (it recovers as after a
//! crash at the backup's instant).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    hooks, new_id, Code, Failure, Fenced, Op, Peer, RestoreCheck, RestoreRequest, RestoreTo,
    Restored, Unfenced,
};
use crate::config::RestoreConfig;
use crate::host::Host;
use crate::nbd::export::{with_ticket, Clients};

/// How long the stop command may run.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the connections may take to close after the stop command ended.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

fn failed(m: impl Into<String>) -> Failure {
    Failure::new(Code::Failed, m)
}

/// A `restore_fence` request.
pub struct Fence {
    pub vlu: String,
    pub force: bool,
    pub backup: String,
}

fn clients_of(agent: &Host, vlu: &str) -> Result<Arc<Clients>, Failure> {
    agent
        .exports
        .export(vlu)
        .map(|e| e.nbd_clients().clone())
        .ok_or_else(|| Failure::new(Code::BadRequest, format!("no virtual LU named {vlu:?}")))
}

/// Wait (a bounded while) until `clients` has no connection; the count left.
async fn closed(clients: &Clients) -> usize {
    let until = Instant::now() + CLOSE_WAIT;
    while clients.open() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    clients.open()
}

/// `restore_fence`: the fence up and no connection left, or the fence down again and
/// an error that says why.
pub async fn fence(agent: &Host, cfg: &RestoreConfig, req: &Fence) -> Result<Fenced, Failure> {
    let clients = clients_of(agent, &req.vlu)?;
    let ticket = new_id();
    let vlu = &req.vlu;
    let (open, replaced) = clients.fence(&ticket, req.force).map_err(|e| {
        failed(format!(
            "virtual LU {vlu}: {e}; if that restore is gone, give --force"
        ))
    })?;
    // Refused: the fence as it was (down, or the one this took over).
    let refuse = |m: String| {
        clients.lift_to(&ticket, replaced.clone());
        Err(failed(m))
    };
    if open > 0 && !req.force {
        return refuse(format!(
            "virtual LU {vlu} has {open} NBD client(s) connected: stop them (the database, its mount, nbd-client) or give --force to run the database host's coordination.restore.stop"
        ));
    }
    if open > 0 {
        let Some(stop) = &cfg.stop else {
            return refuse(format!(
                "virtual LU {vlu} has {open} NBD client(s) connected and --force needs coordination.restore.stop on the database host"
            ));
        };
        tracing::info!(vlu = %vlu, clients = open, command = %stop, "restore in place: stopping the clients");
        let env = [
            ("HVM_VLU".to_string(), vlu.clone()),
            ("HVM_BACKUP".to_string(), req.backup.clone()),
            ("HVM_CLIENTS".to_string(), open.to_string()),
            ("HVM_PHASE".to_string(), "stop".to_string()),
        ];
        let mut running = None;
        let r = tokio::time::timeout(STOP_TIMEOUT, hooks::run_command(stop, &env, &mut running))
            .await
            .unwrap_or_else(|_| Err(format!("`{stop}` did not end within {STOP_TIMEOUT:?}")));
        if let Some(pgid) = running {
            use nix::sys::signal::{killpg, Signal};
            let _ = killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
        }
        if let Err(e) = r {
            return refuse(format!("virtual LU {vlu}: the stop command failed: {e}"));
        }
        let left = closed(&clients).await;
        if left > 0 {
            return refuse(format!(
                "virtual LU {vlu} still has {left} NBD client(s) connected {CLOSE_WAIT:?} after coordination.restore.stop ended; nothing was written"
            ));
        }
    }
    Ok(Fenced {
        vlu: vlu.clone(),
        ticket,
        clients_stopped: open as u64,
        nbd_tcp: agent.tcp_bound.get().cloned(),
    })
}

/// `restore_unfence`.
pub fn unfence(agent: &Host, vlu: &str, ticket: &str) -> Result<Unfenced, Failure> {
    let clients = clients_of(agent, vlu)?;
    let lifted = clients.lift(ticket);
    Ok(Unfenced {
        vlu: vlu.to_string(),
        lifted,
        fenced: clients.fenced(),
    })
}

/// The console's restore in place of `vlu` at backup `id`.
pub struct InPlace<'a> {
    pub backup_host: &'a Peer,
    pub db: &'a Peer,
    pub id: &'a str,
    pub vlu: &'a str,
    /// The database host's NBD TCP address; default: its `listen.tcp`.
    pub db_nbd: Option<&'a str>,
    pub force: bool,
}

/// `address` as the console reaches it: a wildcard host is the database host's.
fn reachable(db: &Peer, address: &str) -> String {
    match address.rsplit_once(':') {
        Some((h, p)) if h == "0.0.0.0" || h == "[::]" => format!("{}:{p}", db.host()),
        _ => address.to_string(),
    }
}

/// Check, fence, restore, unfence (see the module's steps); `progress` sees the
/// restore's.
pub fn restore(r: &InPlace<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<Restored, Failure> {
    let check = Op::BackupRestoreCheck {
        backup: r.id.to_string(),
        vlu: Some(r.vlu.to_string()),
        in_place: true,
    };
    let _: RestoreCheck = r.backup_host.ask(&new_id(), &check, 3, &mut |_, _| {})?;
    let op = Op::RestoreFence {
        vlu: r.vlu.to_string(),
        force: r.force,
        backup: r.id.to_string(),
    };
    let fence: Fenced = r.db.ask(&new_id(), &op, 3, &mut |_, _| {})?;
    let ticket = fence.ticket;
    let address = match (r.db_nbd, fence.nbd_tcp.as_deref()) {
        (Some(a), _) => Ok(a.to_string()),
        (None, Some(a)) => Ok(reachable(r.db, a)),
        (None, None) => Err(Failure::new(
            Code::BadRequest,
            "the database host has no listen.tcp; give --db-nbd HOST:PORT",
        )),
    };
    let restored = address.and_then(|address| {
        let op = Op::BackupRestore(RestoreRequest {
            backup: r.id.to_string(),
            vlu: Some(r.vlu.to_string()),
            to: RestoreTo::Nbd {
                address,
                export: with_ticket(r.vlu, &ticket),
            },
        });
        r.backup_host.ask::<Restored>(&new_id(), &op, 3, progress)
    });
    let op = Op::RestoreUnfence {
        vlu: r.vlu.to_string(),
        ticket,
    };
    let lifted = r.db.ask::<Unfenced>(&new_id(), &op, 3, &mut |_, _| {});
    let mut v = match (restored, &lifted) {
        (Ok(v), _) => v,
        (Err(f), Ok(_)) => return Err(f),
        (Err(mut f), Err(e)) => {
            f.message = format!("{}; and the fence is still up: {e}", f.message);
            return Err(f);
        }
    };
    v.clients_stopped = Some(fence.clients_stopped);
    v.fence = Some(match lifted {
        Ok(_) => "lifted".to_string(),
        Err(e) => format!(
            "still up ({e}): new NBD connections to {} are refused until the database host's agent restarts or another restore --force takes it over",
            r.vlu
        ),
    });
    Ok(v)
}
