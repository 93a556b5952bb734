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

use hvm_scsi::ReadBuffers;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::channel::ChannelPort;
use crate::engine::{Engine, Outcome};
use crate::geometry::{BLOCK_SIZE, MAX_TRANSFER_BLOCKS};
use crate::proto::{self, Request, Response};
use crate::scsi::Command;

/// Commands one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 64;

/// Connections served at once; past it a new connection is closed at once. With
/// [`BUFFER_BUDGET`] per connection this bounds what clients can make the daemon hold.
pub const MAX_CONNECTIONS: usize = 128;

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

/// What a port of the daemon runs its commands on: the array's host port (an
/// [`Engine`]), its channel port (`crate::channel::ChannelPort`), or a copy agent.
pub trait Executor: Send + Sync + 'static {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Outcome;

    /// As [`Executor::execute`], but a READ whose data-in is exactly `data_in.len()`
    /// bytes may land in `data_in`, and the reply then carries no data.
    fn execute_into(&self, lun: u8, cdb: &[u8], data_out: &[u8], data_in: &mut [u8]) -> Outcome {
        let _ = data_in;
        self.execute(lun, cdb, data_out)
    }
}

impl Executor for Engine {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Outcome {
        Engine::execute(self, lun, cdb, data_out)
    }

    fn execute_into(&self, lun: u8, cdb: &[u8], data_out: &[u8], data_in: &mut [u8]) -> Outcome {
        Engine::execute_into(self, lun, cdb, data_out, data_in)
    }
}

/// What a connection keeps of its READ (16) replies' buffers ([`ReadBuffers`]): a READ
/// fills its buffer whole, so one used before needs no zero-filling, as a new one would
/// (a full-speed reader of the array paid as much for that as for reading the file).
/// At most 4 of at most 4 MiB: an idle connection holds at most 16 MiB, a quarter of the
/// [`BUFFER_BUDGET`] it may hold while busy.
const KEPT_BUFFERS: (usize, usize) = (4, 4 << 20);

/// The data-in length of a READ (16), the read the hosts' clients send, if it is within
/// the transfer cap: a longer one is refused by the engine before it reads, and no
/// buffer is made for it here either.
fn read16_len(cdb: &[u8]) -> Option<usize> {
    match Command::parse(cdb) {
        Ok(Command::Read16 { blocks, .. }) if blocks <= MAX_TRANSFER_BLOCKS => {
            Some(blocks as usize * BLOCK_SIZE as usize)
        }
        _ => None,
    }
}

/// Run one command on the blocking pool, into a pooled buffer if it is a READ (16):
/// the reply, or `None` for an injected drop or a command that panicked.
async fn run_command(
    engine: Arc<dyn Executor>,
    buffers: Arc<ReadBuffers>,
    (lun, cdb): (u8, Vec<u8>),
    body: Vec<u8>,
    data_start: usize,
) -> Option<crate::outcome::Response> {
    let mut data_in = read16_len(&cdb).map(|n| buffers.filled(n));
    let ran = tokio::task::spawn_blocking(move || {
        let data_out = &body[data_start..];
        let outcome = match data_in.as_mut() {
            Some(b) => engine.execute_into(lun, &cdb, data_out, b),
            None => engine.execute(lun, &cdb, data_out),
        };
        (outcome, data_in)
    })
    .await;
    match ran {
        Ok((Outcome::Reply(mut r), Some(b))) => {
            if r.status == crate::scsi::GOOD && r.data.is_empty() {
                r.data = b;
            } else {
                buffers.give(b);
            }
            Some(r)
        }
        Ok((Outcome::Reply(r), None)) => Some(r),
        Ok((Outcome::Drop, _)) | Err(_) => None,
    }
}

/// Serve `engine` on `listener` until `shutdown` completes.
pub async fn run(
    engine: Arc<dyn Executor>,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = accept(&listener) => {
                let conn = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                };
                backoff.succeeded();
                // Over the cap: dropping the stream closes it.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let engine = engine.clone();
                match conn {
                    Conn::Unix(s) => {
                        tokio::spawn(async move { serve_conn(engine, s).await; drop(slot) });
                    }
                    Conn::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        tokio::spawn(async move { serve_conn(engine, s).await; drop(slot) });
                    }
                }
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

/// Bytes of request frames and reply data one connection may hold at once. A client that
/// sends commands and never reads the replies stops being read from once its replies
/// reach this; without it every reply waited in memory (gigabytes from one client).
pub const BUFFER_BUDGET: usize = 64 << 20;

/// Largest SCSI block on the simulated arrays; a READ's reply is charged blocks × this.
const BLOCK: usize = 512;
/// What any other command's reply is charged before it runs (INQUIRY, MODE SENSE, ...).
const SMALL_REPLY: usize = 64 << 10;

/// The data-in bytes a command may return, for the budget: the transfer length of the
/// READ commands, a small charge for the rest; at most the whole budget.
fn expected_reply(cdb: &[u8]) -> usize {
    let be = |r: std::ops::Range<usize>| {
        cdb.get(r)
            .map(|b| b.iter().fold(0usize, |n, x| (n << 8) | usize::from(*x)))
    };
    let blocks = match cdb.first() {
        Some(0x08) => be(4..5).map(|n| if n == 0 { 256 } else { n }),
        Some(0x28) => be(7..9),
        Some(0xa8) => be(6..10),
        Some(0x88) => be(10..14),
        _ => None,
    };
    blocks
        .map_or(SMALL_REPLY, |b| b.saturating_mul(BLOCK).max(SMALL_REPLY))
        .min(BUFFER_BUDGET)
}

/// Hold `n` bytes of the connection's budget (at most all of it), waiting while others
/// hold it.
async fn hold(budget: &Arc<Semaphore>, n: usize) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(n.clamp(1, BUFFER_BUDGET)).ok()?;
    budget.clone().acquire_many_owned(n).await.ok()
}

/// A reply on its way to the writer, with the budget its command holds until written.
type Queued = (Vec<u8>, Vec<u8>, OwnedSemaphorePermit);

async fn serve_conn<S: AsyncRead + AsyncWrite + Send + 'static>(
    engine: Arc<dyn Executor>,
    stream: S,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Queued>(MAX_IN_FLIGHT);
    let (close_tx, mut close_rx) = watch::channel(false);
    let buffers = Arc::new(ReadBuffers::new(KEPT_BUFFERS.0, KEPT_BUFFERS.1));
    let pool = buffers.clone();
    let writer = tokio::spawn(async move {
        while let Some((header, data, held)) = rx.recv().await {
            if wr.write_all(&header).await.is_err() || wr.write_all(&data).await.is_err() {
                break;
            }
            drop(held);
            pool.give(data);
        }
        let _ = wr.shutdown().await;
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(BUFFER_BUDGET));
    loop {
        let frame = tokio::select! {
            _ = close_rx.changed() => break,
            f = read_frame(&mut rd, &budget) => f,
        };
        let Some((body, mut held)) = frame else {
            break;
        };
        let Ok(req) = Request::parse(&body) else {
            break;
        };
        let (tag, lun, cdb) = (req.tag, req.lun, req.cdb.to_vec());
        let data_start = body.len() - req.data.len();
        // The reply's bytes are held before the command runs and allocates them; one
        // command never holds more than the whole budget, so it can always go on alone.
        let room = BUFFER_BUDGET - held.num_permits();
        let Some(reply) = hold(&budget, expected_reply(&cdb).min(room)).await else {
            break;
        };
        held.merge(reply);
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (engine, tx, close_tx) = (engine.clone(), tx.clone(), close_tx.clone());
        let buffers = buffers.clone();
        tokio::spawn(async move {
            let reply = run_command(engine, buffers, (lun, cdb), body, data_start).await;
            drop(permit);
            match reply {
                Some(r) => {
                    let sense = r.sense.map(|s| s.encode().to_vec()).unwrap_or_default();
                    let header = Response::header(tag, r.status, &sense, r.data.len());
                    let _ = tx.send((header, r.data, held)).await;
                }
                // An injected drop, or a command that panicked: close the connection.
                None => {
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

/// One frame body and the budget it holds, or `None` at end of stream or for a frame
/// that cannot be trusted. The budget is held before the body is allocated.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    budget: &Arc<Semaphore>,
) -> Option<(Vec<u8>, OwnedSemaphorePermit)> {
    let mut prefix = [0u8; 4];
    rd.read_exact(&mut prefix).await.ok()?;
    let len = proto::body_len(prefix).ok()?;
    let held = hold(budget, len).await?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.ok()?;
    Some((body, held))
}

/// The channel port answers channel commands the way the host port answers SCSI ones.
impl Executor for ChannelPort {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Outcome {
        ChannelPort::execute(self, lun, cdb, data_out)
    }
}
