//! The array-sim daemon's server: frames of [`crate::proto`] over a Unix or TCP socket.
//!
//! Each connection has a reader that takes whole frames, and a writer fed by a channel;
//! each command runs on the blocking pool (file I/O and the disk model sleep), at most
//! [`MAX_IN_FLIGHT`] per connection, and its reply is written when it completes, so
//! replies come back in completion order. A bad frame (too long, too short for its
//! header) or an injected drop closes the connection; other connections go on.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::engine::{Engine, Outcome};
use crate::proto::{self, Request, Response};

/// Commands one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 64;

/// Where the daemon listens: `unix:PATH` or `tcp:HOST:PORT` (hvm-scsi's, which its
/// client shares).
pub use hvm_scsi::socket::Address;

/// A bound listener.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub async fn bind(addr: &Address) -> std::io::Result<Listener> {
        Ok(match addr {
            Address::Unix(p) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::symlink_metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(p)?;
                }
                Listener::Unix(UnixListener::bind(p)?)
            }
            Address::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await?),
        })
    }

    /// The address actually bound (a TCP port 0 is resolved).
    pub fn local_address(&self) -> std::io::Result<Address> {
        Ok(match self {
            Listener::Unix(l) => Address::Unix(
                l.local_addr()?
                    .as_pathname()
                    .map(PathBuf::from)
                    .unwrap_or_default(),
            ),
            Listener::Tcp(l) => Address::Tcp(l.local_addr()?.to_string()),
        })
    }
}

/// Serve `engine` on `listener` until `shutdown` completes.
pub async fn run(
    engine: Arc<Engine>,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = accept(&listener) => {
                match accepted {
                    Ok(Conn::Unix(s)) => { tokio::spawn(serve_conn(engine.clone(), s)); }
                    Ok(Conn::Tcp(s)) => {
                        let _ = s.set_nodelay(true);
                        tokio::spawn(serve_conn(engine.clone(), s));
                    }
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                }
                backoff.succeeded();
            }
        }
    }
}

/// What the accept loop does after a failed accept. A connection that failed on its own
/// way in costs nothing; out of descriptors or memory, the listener stays readable and
/// every accept fails at once, so the loop pauses (10 ms doubling to 1 s) until one
/// succeeds, and prints one line per [`AcceptBackoff::REPORT_EVERY`] with the count of
/// failures since the last line, instead of a line per failure in a busy loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    pause: Duration,
    reported: Option<Instant>,
    unreported: u64,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            pause: Self::FIRST_PAUSE,
            reported: None,
            unreported: 0,
        }
    }
}

impl AcceptBackoff {
    pub const REPORT_EVERY: Duration = Duration::from_secs(10);
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    fn exhausted(e: &std::io::Error) -> bool {
        // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux).
        matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
    }

    pub fn succeeded(&mut self) {
        self.pause = Self::FIRST_PAUSE;
    }

    pub async fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .reported
            .is_none_or(|t| now.duration_since(t) >= Self::REPORT_EVERY)
        {
            eprintln!(
                "array-sim: accept failed: {e} ({} more since the last report){}",
                self.unreported,
                if Self::exhausted(e) {
                    "; pausing accepts"
                } else {
                    ""
                }
            );
            self.reported = Some(now);
            self.unreported = 0;
        } else {
            self.unreported += 1;
        }
        if Self::exhausted(e) {
            tokio::time::sleep(self.pause).await;
            self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    Ok(match l {
        Listener::Unix(l) => Conn::Unix(l.accept().await?.0),
        Listener::Tcp(l) => Conn::Tcp(l.accept().await?.0),
    })
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Send + 'static>(engine: Arc<Engine>, stream: S) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, Vec<u8>)>(MAX_IN_FLIGHT);
    let (close_tx, mut close_rx) = watch::channel(false);
    let writer = tokio::spawn(async move {
        while let Some((header, data)) = rx.recv().await {
            if wr.write_all(&header).await.is_err() || wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let frame = tokio::select! {
            _ = close_rx.changed() => break,
            f = read_frame(&mut rd) => f,
        };
        let Some(body) = frame else {
            break;
        };
        let Ok(req) = Request::parse(&body) else {
            break;
        };
        let (tag, lun, cdb) = (req.tag, req.lun, req.cdb.to_vec());
        let data_start = body.len() - req.data.len();
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (engine, tx, close_tx) = (engine.clone(), tx.clone(), close_tx.clone());
        tokio::spawn(async move {
            let outcome =
                tokio::task::spawn_blocking(move || engine.execute(lun, &cdb, &body[data_start..]))
                    .await;
            drop(permit);
            match outcome {
                Ok(Outcome::Reply(r)) => {
                    let sense = r.sense.map(|s| s.encode().to_vec()).unwrap_or_default();
                    let header = Response::header(tag, r.status, &sense, r.data.len());
                    let _ = tx.send((header, r.data)).await;
                }
                // An injected drop, or a command that panicked: close the connection.
                Ok(Outcome::Drop) | Err(_) => {
                    let _ = close_tx.send(true);
                }
            }
        });
    }
    drop(tx);
    if *close_rx.borrow() {
        writer.abort();
    } else {
        let _ = writer.await;
    }
}

/// One frame body, or `None` at end of stream or for a frame that cannot be trusted.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Option<Vec<u8>> {
    let mut prefix = [0u8; 4];
    rd.read_exact(&mut prefix).await.ok()?;
    let len = proto::body_len(prefix).ok()?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.ok()?;
    Some(body)
}
