//! The control API's client side, shared by `hvmctl` and its demo: one HTTP/1.1 request
//! per connection on the Unix socket (hyper's client: framing, chunked bodies and status
//! lines are hyper's, not ours), replies read into their `hvm_api` types, and the
//! progress bars both draw (indicatif's, on a terminal only).

use std::cell::RefCell;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde_json::Value;

/// A reply: the HTTP status and the JSON body (a string if it was not JSON).
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// How long a request may take, from connecting to the reply's last byte.
pub const TIMEOUT: Duration = Duration::from_secs(600);

/// Characters escaped in a path segment: controls, space, `"#%/<>?\^`{|}` and every
/// byte outside ASCII (RFC 3986's segment without `pchar`'s sub-delims we do not need).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// `name` as one path segment of a request (`/v1/lus/{segment}/move`): percent-encoded,
/// so a name with `/`, `%`, a space, a quote or a newline reaches the API whole.
pub fn segment(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, SEGMENT).to_string()
}

/// One request on a fresh connection; an error says the agent could not be reached or
/// answered garbage.
pub fn call(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let run = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        rt.block_on(async {
            tokio::time::timeout(TIMEOUT, request(sock, method, path, body))
                .await
                .unwrap_or_else(|_| Err(format!("host-agent did not answer within {TIMEOUT:?}")))
        })
    };
    // Called from inside a runtime (an async caller), the request gets a thread of its
    // own: a runtime cannot block on another on its own threads.
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(run).join())
            .unwrap_or_else(|_| Err("the request's thread panicked".into()))
    } else {
        run()
    }
}

async fn request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("cannot reach host-agent at {}: {e}", sock.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("host-agent: {e}"))?;
    // The connection is driven beside the request; it ends with the reply.
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "hvm");
    let body = match body {
        Some(b) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(body))
        .map_err(|e| format!("bad request {method} {path}: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("malformed reply from host-agent: {e}"))?;
    let status = res.status().as_u16();
    let payload = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("malformed reply from host-agent: {e}"))?
        .to_bytes();
    conn.abort();
    let body = serde_json::from_slice(&payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into_owned()));
    Ok(Reply { status, body })
}

/// Why a typed request failed: the agent could not be reached (or answered garbage), or
/// it refused (an error reply) or the operation it followed failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Refused(String),
}

/// One request whose reply is read as `T`; an error reply gives its message.
pub fn typed<T: DeserializeOwned>(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<T, CallError> {
    let r = call(sock, method, path, body).map_err(CallError::Unreachable)?;
    if r.status >= 400 {
        return Err(CallError::Refused(refusal(&r.body)));
    }
    read(&r.body).map_err(CallError::Unreachable)
}

/// The message of an error reply (`{"error": "..."}`), or the reply itself.
pub fn refusal(body: &Value) -> String {
    match hvm_api::ErrorReply::deserialize(body) {
        Ok(e) => e.error,
        Err(_) => body.to_string(),
    }
}

/// A reply read as its type.
pub fn read<T: DeserializeOwned>(body: &Value) -> Result<T, String> {
    T::deserialize(body).map_err(|e| format!("malformed reply from host-agent: {e}"))
}

/// Progress bars are drawn only on a terminal; logs and pipes get the results alone.
pub fn bars() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// The bar being drawn, and its label.
struct Bar {
    label: String,
    bar: indicatif::ProgressBar,
}

thread_local! {
    static BAR: RefCell<Option<Bar>> = const { RefCell::new(None) };
}

/// indicatif's style for a bar counting `unit`s (bytes get sizes and a rate).
fn style(unit: &str) -> indicatif::ProgressStyle {
    let template = if unit == "bytes" {
        "{prefix} [{bar:25}] {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}".to_string()
    } else {
        format!("{{prefix}} [{{bar:25}}] {{percent:>3}}% {{pos}}/{{len}} {unit}")
    };
    indicatif::ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>-")
}

/// Show progress `done` of `total` on standard error's bar labelled `label` (a new label
/// ends the previous bar; reaching `total` ends this one). Nothing is drawn when standard
/// error is not a terminal.
pub fn progress(label: &str, done: u64, total: u64, unit: &str) {
    if !bars() {
        return;
    }
    BAR.with_borrow_mut(|cur| {
        if cur.as_ref().is_some_and(|b| b.label != label) {
            if let Some(old) = cur.take() {
                old.bar.finish();
            }
        }
        let b = cur.get_or_insert_with(|| Bar {
            label: label.to_string(),
            bar: indicatif::ProgressBar::new(total)
                .with_style(style(unit))
                .with_prefix(label.to_string()),
        });
        b.bar.set_length(total);
        b.bar.set_position(done.min(total));
        if done >= total {
            b.bar.finish();
            *cur = None;
        }
    });
}

/// End the bar being drawn, if any, leaving it on the screen at its last state.
pub fn end_progress() {
    BAR.with_borrow_mut(|cur| {
        if let Some(b) = cur.take() {
            b.bar.abandon();
        }
    });
}

/// Poll resync progress of `vlu` until Synchronized, drawing a bar on stderr unless
/// `quiet`; the pair's last progress.
pub fn wait_resync_pair(
    sock: &std::path::Path,
    vlu: &str,
    quiet: bool,
) -> Result<hvm_api::ResyncPair, CallError> {
    let quiet = quiet || !bars();
    let mut total = None;
    loop {
        let r: hvm_api::Resync = typed(sock, "GET", "/v1/resync", None)?;
        let pair = r
            .pairs
            .into_iter()
            .find(|p| p.name == vlu)
            .ok_or_else(|| CallError::Refused(format!("{vlu} is not an origin virtual LU")))?;
        let t = *total.get_or_insert(pair.remaining_lbas + pair.copied_lbas);
        if !quiet && t > 0 {
            let done = if pair.done {
                t
            } else {
                t.saturating_sub(pair.remaining_lbas)
            };
            progress(&format!("resync {vlu}"), done, t, "LBAs");
        }
        if pair.done {
            return Ok(pair);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Follow the move of `vlu` until it ends, with a progress bar unless `quiet` or not on a
/// terminal; the move's last status, or why it did not end Done.
pub fn wait_move(
    sock: &std::path::Path,
    vlu: &str,
    quiet: bool,
) -> Result<hvm_api::Move, CallError> {
    use hvm_api::Phase;
    let quiet = quiet || !bars();
    let path = format!("/v1/lus/{}/move", segment(vlu));
    loop {
        let m: hvm_api::Move = typed(sock, "GET", &path, None)?;
        if !quiet {
            let done = if m.phase == Phase::Done {
                m.total_bytes
            } else {
                m.copied_bytes
            };
            progress(&format!("move {vlu}"), done, m.total_bytes, "bytes");
        }
        let why = match &m.phase {
            Phase::Copying => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Phase::Done => return Ok(m),
            Phase::Cancelled => "cancelled".to_string(),
            Phase::Failed(why) => format!("failed: {why}"),
        };
        end_progress();
        return Err(CallError::Refused(format!(
            "the move of {vlu} ended {why}; the data stays where it was"
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_path_segment() {
        assert_eq!(segment("db"), "db");
        assert_eq!(segment("a/b c%\"\n\u{e9}"), "a%2Fb%20c%25%22%0A%C3%A9");
    }

    /// A chunked reply and a reply cut short, from a server that is not hyper's.
    #[test]
    fn chunked_replies_are_read_and_cut_ones_refused() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for reply in [
                &b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n6\r\n\":17}\n\r\n0\r\n\r\n"[..],
                &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"[..],
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut head = [0u8; 1024];
                let _ = c.read(&mut head);
                let _ = c.write_all(reply);
            }
        });
        let r = call(&sock, "POST", "/x", Some(&serde_json::json!({"k": 1}))).unwrap();
        assert_eq!((r.status, r.body), (409, serde_json::json!({"a": 17})));
        let e = call(&sock, "GET", "/x", None).err().unwrap_or_default();
        assert!(e.contains("malformed reply"), "{e}");
        server.join().unwrap();
    }
}
