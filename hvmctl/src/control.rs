//! The commands that are one request to host-agent's control API (`status`, `lu`,
//! `snapshot`, `extents`, `verify`, `resync`, `backends`, `reload`): the request, the
//! wait that `--wait` adds, and the reply read into its `hvm_api` type for the human
//! output (`--json` prints the agent's JSON as it came).

use std::path::Path;

use hvm_host_agent::ctl::{self, segment, CallError};
use serde_json::{json, Value};

use crate::cli::{parse_rate, Cmd, LuCmd, ResyncCmd, SnapCmd};
use crate::error::{Error, Result};
use crate::render;

impl From<CallError> for Error {
    fn from(e: CallError) -> Error {
        match e {
            CallError::Unreachable(m) => Error::Unreachable(m),
            CallError::Refused(m) => Error::Failed(m),
        }
    }
}

/// One request to the control API.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Value>,
}

fn get(path: impl Into<String>) -> Result<Request> {
    Ok(Request {
        method: "GET",
        path: path.into(),
        body: None,
    })
}

fn send(method: &'static str, path: impl Into<String>, body: Option<Value>) -> Result<Request> {
    Ok(Request {
        method,
        path: path.into(),
        body,
    })
}

/// `/v1/lus/{vlu}/{what}`.
fn lu_path(vlu: &str, what: &str) -> String {
    format!("/v1/lus/{}/{what}", segment(vlu))
}

/// A rate argument, or the usage error.
fn rate_arg(rate: &str) -> Result<u64> {
    parse_rate(rate).ok_or_else(|| Error::not_a_rate(rate))
}

/// The request `cmd` makes.
pub fn request(cmd: &Cmd) -> Result<Request> {
    match cmd {
        Cmd::Status => get("/v1/status"),
        Cmd::Lu { command } => lu_request(command),
        Cmd::Snapshot { command } => match command {
            SnapCmd::Acquire { vlu } => send("POST", lu_path(vlu, "snapshot"), None),
            SnapCmd::Delete { vlu, .. } => send("DELETE", lu_path(vlu, "snapshot"), None),
            SnapCmd::Rollback { vlu, .. } => send("POST", lu_path(vlu, "rollback"), None),
        },
        Cmd::Extents { vlu } => get(lu_path(vlu, "extents")),
        Cmd::Verify { vlu, rate, repair } => {
            let rate = rate.as_deref().map(rate_arg).transpose()?.unwrap_or(0);
            let body = hvm_api::VerifyRequest {
                rate,
                repair: *repair,
            };
            send("POST", lu_path(vlu, "verify"), Some(json!(body)))
        }
        Cmd::Resync { command } => match command {
            ResyncCmd::Status => get("/v1/resync"),
            ResyncCmd::Pause => send("POST", "/v1/resync/pause", None),
            ResyncCmd::Resume => send("POST", "/v1/resync/resume", None),
            ResyncCmd::Rate { rate } => {
                let body = hvm_api::Rate {
                    bytes_per_second: rate_arg(rate)?,
                };
                send("PUT", "/v1/resync/rate", Some(json!(body)))
            }
        },
        Cmd::Backends => get("/v1/backends"),
        Cmd::Reload => send("POST", "/v1/reload", None),
        _ => Err(Error::Usage("not a control API command".into())),
    }
}

fn lu_request(cmd: &LuCmd) -> Result<Request> {
    match cmd {
        LuCmd::List => get("/v1/lus"),
        LuCmd::Move {
            vlu, cancel: true, ..
        } => send("DELETE", lu_path(vlu, "move"), None),
        LuCmd::Move {
            vlu, to, lus, rate, ..
        } => {
            let to = to
                .clone()
                .ok_or_else(|| Error::Usage("lu move needs --to BACKEND or --cancel".into()))?;
            let body = hvm_api::MoveRequest {
                to,
                lus: *lus,
                rate: rate.as_deref().map(rate_arg).transpose()?,
            };
            send("POST", lu_path(vlu, "move"), Some(json!(body)))
        }
    }
}

/// Send `r`: the reply's JSON, or why not.
fn call(sock: &Path, r: &Request) -> Result<Value> {
    let reply = ctl::call(sock, r.method, &r.path, r.body.as_ref()).map_err(Error::Unreachable)?;
    if reply.status >= 400 {
        return Err(Error::Failed(ctl::refusal(&reply.body)));
    }
    Ok(reply.body)
}

/// A reply read as its type.
fn read<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T> {
    ctl::read(body).map_err(Error::Unreachable)
}

/// What `--wait` waits for after the request.
fn follow(sock: &Path, cmd: &Cmd, mut body: Value, json: bool) -> Result<Value> {
    match cmd {
        Cmd::Lu {
            command:
                LuCmd::Move {
                    vlu,
                    wait: true,
                    cancel: false,
                    ..
                },
        } => Ok(json!(ctl::wait_move(sock, vlu, json)?)),
        Cmd::Snapshot {
            command: SnapCmd::Delete { vlu, wait: true } | SnapCmd::Rollback { vlu, wait: true },
        } => {
            body["resync"] = json!(ctl::wait_resync_pair(sock, vlu, json)?);
            Ok(body)
        }
        _ => Ok(body),
    }
}

/// The human output of `cmd`'s reply.
fn human(cmd: &Cmd, body: &Value) -> Result<String> {
    Ok(match cmd {
        Cmd::Status => render::status(&read(body)?),
        Cmd::Lu {
            command: LuCmd::List,
        } => render::lus(&read::<Vec<hvm_api::Lu>>(body)?),
        Cmd::Lu {
            command: LuCmd::Move { vlu, .. },
        } => format!("{vlu}: {}\n", render::move_line(&read(body)?)),
        Cmd::Snapshot { command } => {
            let mut out = match command {
                SnapCmd::Rollback { .. } => render::rollback(&read(body)?),
                _ => render::snapshot(&read(body)?),
            };
            if let Some(pair) = body.get("resync") {
                let p: hvm_api::ResyncPair = read(pair)?;
                out += &format!(
                    "{}: {} after copying {} LBAs\n",
                    p.name, p.mode, p.copied_lbas
                );
            }
            out
        }
        Cmd::Extents { .. } => render::extents(&read(body)?),
        Cmd::Verify { .. } => format!("{}\n", render::verify_line(&read(body)?)),
        Cmd::Resync {
            command: ResyncCmd::Status,
        } => render::resync(&read(body)?),
        Cmd::Resync {
            command: ResyncCmd::Pause | ResyncCmd::Resume,
        } => {
            let p: hvm_api::Paused = read(body)?;
            format!("resync {}\n", if p.paused { "paused" } else { "running" })
        }
        Cmd::Resync {
            command: ResyncCmd::Rate { .. },
        } => {
            let r: hvm_api::Rate = read(body)?;
            format!(
                "resync rate: {} bytes per second per backend\n",
                r.bytes_per_second
            )
        }
        Cmd::Backends => render::backends(&read(body)?),
        Cmd::Reload => render::reload(&read(body)?),
        _ => format!("{body}\n"),
    })
}

/// Run a control-API command: request, wait if asked, print; a verify that found legs
/// differing (and did not repair them) is an [`Error::Differ`] after its report.
pub fn run(sock: &Path, cmd: &Cmd, json: bool) -> Result {
    let req = request(cmd)?;
    let body = call(sock, &req)?;
    let body = follow(sock, cmd, body, json)?;
    if json {
        println!("{body}");
    } else {
        print!("{}", human(cmd, &body)?);
    }
    if let Cmd::Verify { .. } = cmd {
        let v: hvm_api::Verify = read(&body)?;
        if !v.identical && !v.repaired {
            return Err(Error::Differ(format!(
                "{}: the legs differ in {} LBAs (not repaired)",
                v.name, v.differing_lbas
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_typed_bodies_and_encoded_names() {
        let r = request(&Cmd::Verify {
            vlu: "a/b".into(),
            rate: Some("1M".into()),
            repair: true,
        })
        .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/lus/a%2Fb/verify");
        assert_eq!(r.body, Some(json!({ "rate": 1 << 20, "repair": true })));
        let bad = request(&Cmd::Resync {
            command: ResyncCmd::Rate {
                rate: "fast".into(),
            },
        });
        assert_eq!(bad.err().map(|e| e.exit_status()), Some(2));
    }
}
