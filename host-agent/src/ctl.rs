//! The control API's client side, shared by `hvmctl` and its demo: one HTTP/1.1 request
//! per connection on the Unix socket, and the progress bar both draw.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

/// A reply: the HTTP status and the JSON body (a string if it was not JSON).
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

/// One request on a fresh connection; an error says the agent could not be reached or
/// answered garbage.
pub fn call(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let mut s = UnixStream::connect(sock)
        .map_err(|e| format!("cannot reach host-agent at {}: {e}", sock.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: hvm\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed reply from host-agent")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed status line from host-agent")?;
    let mut payload = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    let body = serde_json::from_slice(&payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into_owned()));
    Ok(Reply { status, body })
}

/// Progress bars are drawn only on a terminal; logs and pipes get the results alone.
pub fn bars() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Draw (or redraw, with `\r`) a progress bar on standard error.
pub fn progress(label: &str, done: u64, total: u64, unit: &str) {
    let pct = done
        .saturating_mul(100)
        .checked_div(total)
        .unwrap_or(100)
        .min(100);
    let bar = "#".repeat((pct / 4) as usize);
    eprint!("\r{label} [{bar:<25}] {pct:>3}% {done}/{total} {unit}   ");
}

/// Poll resync progress of `vlu` until Synchronized, drawing a bar on stderr.
pub fn wait_resync(sock: &std::path::Path, vlu: &str, quiet: bool) -> Result<Value, String> {
    let quiet = quiet || !bars();
    let mut total = None;
    loop {
        let r = call(sock, "GET", "/v1/resync", None)?;
        let pair = r.body["pairs"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == vlu).cloned())
            .ok_or_else(|| format!("{vlu} is not an origin virtual LU"))?;
        let remaining = pair["remaining_lbas"].as_u64().unwrap_or(0);
        let copied = pair["copied_lbas"].as_u64().unwrap_or(0);
        let t = *total.get_or_insert(remaining + copied);
        if !quiet && t > 0 {
            let done = t.saturating_sub(remaining);
            progress(&format!("resync {vlu}"), done, t, "LBAs");
        }
        if pair["done"] == true {
            if !quiet {
                eprintln!();
            }
            return Ok(pair);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Follow the move of `vlu` until it ends, with a progress bar unless `quiet` or not on a
/// terminal; the move's last status, or why it did not end Done.
pub fn wait_move(sock: &std::path::Path, vlu: &str, quiet: bool) -> Result<Value, String> {
    let quiet = quiet || !bars();
    let path = format!("/v1/lus/{vlu}/move");
    loop {
        let r = call(sock, "GET", &path, None)?;
        if r.status >= 400 {
            return Err(r.body["error"].as_str().unwrap_or("no move").to_string());
        }
        let b = r.body;
        if !quiet {
            let (done, total) = (b["copied_bytes"].as_u64(), b["total_bytes"].as_u64());
            progress(
                &format!("move {vlu}"),
                done.unwrap_or(0) >> 20,
                total.unwrap_or(0) >> 20,
                "MiB",
            );
        }
        match b["phase"].as_str() {
            Some("copying") => std::thread::sleep(Duration::from_millis(200)),
            Some("done") => {
                if !quiet {
                    eprintln!();
                }
                return Ok(b);
            }
            other => {
                if !quiet {
                    eprintln!();
                }
                let why = b["reason"].as_str().unwrap_or("");
                return Err(format!(
                    "the move of {vlu} ended {}{}{why}; the data stays where it was",
                    other.unwrap_or("?"),
                    if why.is_empty() { "" } else { ": " }
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}
