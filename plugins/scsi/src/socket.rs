//! The transport to an `array-sim serve` daemon (`connect: unix:PATH` or `tcp:HOST:PORT`):
//! frames of [`crate::wire`], many tagged commands in flight on one connection, each
//! bounded by a timeout; a lost or stalled connection is re-established with backoff.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::buffers::ReadBuffers;
use crate::reconnect::{Connector, Reconnecting};
use crate::sense::{Sense, GOOD};
use crate::transport::{copy_data_in, Response, Transport, TransportError};
use crate::wire::{self, Request};

/// How long a command may go unanswered unless the configuration says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an array-sim daemon listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Address::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(Address::Tcp(a.to_string()))
        } else {
            Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// What the reader thread hands a caller: the reply, and whether its data-in was placed
/// in the caller's buffer (the reply then carries none).
type Delivery = Result<(Response, bool), TransportError>;

/// A caller waiting for its reply: where to send it and, for `execute_into`, the buffer
/// its data-in goes to.
struct Waiter {
    tx: mpsc::Sender<Delivery>,
    into: Option<Arc<Destination>>,
}

type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

/// The caller's data-in buffer, while the caller waits in `execute_into`: the reader
/// thread reads a reply's data straight into it, holding the lock, so the data crosses
/// no buffer of ours and is never copied. The caller clears it (taking the lock, so
/// after any read into it has ended) before it returns, by any path: the reader never
/// writes to a buffer its caller has given up.
struct Destination(Mutex<Option<Place>>);

/// A caller's buffer, as a pointer: it outlives every use because its owner clears the
/// [`Destination`] before the borrow ends.
struct Place {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is only dereferenced under the destination's lock, while the
// caller that owns the buffer is blocked in `execute_into` and keeps it alive.
unsafe impl Send for Place {}

impl Destination {
    /// # Safety
    /// The caller must [`clear`](Destination::clear) it before `buf`'s borrow ends and
    /// must not touch `buf` until then ([`Cleared`] does the first on every path).
    unsafe fn new(buf: &mut [u8]) -> Arc<Destination> {
        Arc::new(Destination(Mutex::new(Some(Place {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }))))
    }

    /// Read `len` bytes of data-in from `r` into the buffer, if it is still there and of
    /// that length; `Ok(false)` if not (the caller gets them in a buffer instead).
    fn fill(&self, r: &mut dyn Read, len: usize) -> std::io::Result<bool> {
        let place = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match place.as_ref() {
            Some(p) if p.len == len => {
                // SAFETY: see `Place`: the owner waits on this lock before it reuses or
                // frees the buffer, and nothing else refers to it meanwhile.
                let buf = unsafe { std::slice::from_raw_parts_mut(p.ptr, p.len) };
                r.read_exact(buf)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Give the buffer back: after this, the reader thread does not touch it.
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Clears its destination when `execute_into` returns or unwinds. On a timeout the
/// connection is shut first, so a reader blocked inside `fill` returns and the clear
/// does not wait on a stalled array.
struct Cleared(Arc<Destination>);

impl Drop for Cleared {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// The two ends of a stream socket: what the reader thread reads, what callers write, and
/// a handle to shut both down.
enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn open(addr: &Address, timeout: Duration) -> std::io::Result<Socket> {
        let s = match addr {
            Address::Unix(p) => Socket::Unix(UnixStream::connect(p)?),
            Address::Tcp(a) => {
                let sa = a.to_socket_addrs()?.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{a}: no address"))
                })?;
                let s = TcpStream::connect_timeout(&sa, timeout)?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
        };
        // A stalled array must not hold a writer (and every caller behind it) forever.
        match &s {
            Socket::Unix(u) => u.set_write_timeout(Some(timeout))?,
            Socket::Tcp(t) => t.set_write_timeout(Some(timeout))?,
        }
        Ok(s)
    }

    fn try_clone(&self) -> std::io::Result<Socket> {
        Ok(match self {
            Socket::Unix(u) => Socket::Unix(u.try_clone()?),
            Socket::Tcp(t) => Socket::Tcp(t.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(u) => u.shutdown(Shutdown::Both),
            Socket::Tcp(t) => t.shutdown(Shutdown::Both),
        };
    }

    fn stream(self) -> Box<dyn Stream> {
        match self {
            Socket::Unix(u) => Box::new(u),
            Socket::Tcp(t) => Box::new(t),
        }
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One connection to an array-sim daemon. Many threads may issue commands at once; each
/// carries a tag and a reader thread hands every reply to its caller, in whatever order
/// the array completes them. A command unanswered within the timeout closes the
/// connection, failing every other command on it.
pub struct SocketLink {
    writer: Mutex<Box<dyn Stream>>,
    control: Socket,
    pending: Pending,
    next_tag: AtomicU64,
    closed: Arc<AtomicBool>,
    timeout: Duration,
    /// Data-in buffers the reader fills and `execute_into` gives back.
    buffers: Arc<ReadBuffers>,
}

/// What a link keeps of its READ buffers: 4 of up to 4 MiB (a backup's piece).
const KEPT_BUFFERS: (usize, usize) = (4, 4 << 20);

impl SocketLink {
    pub fn connect(addr: &Address, timeout: Duration) -> std::io::Result<SocketLink> {
        let socket = Socket::open(addr, timeout)?;
        let reader = socket.try_clone()?.stream();
        let control = socket.try_clone()?;
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let buffers = Arc::new(ReadBuffers::new(KEPT_BUFFERS.0, KEPT_BUFFERS.1));
        {
            let (pending, closed, buffers) = (pending.clone(), closed.clone(), buffers.clone());
            std::thread::Builder::new()
                .name("array-sim-client".into())
                .spawn(move || read_replies(reader, &pending, &closed, &buffers))?;
        }
        Ok(SocketLink {
            writer: Mutex::new(socket.stream()),
            control,
            pending,
            next_tag: AtomicU64::new(1),
            closed,
            timeout,
            buffers,
        })
    }

    fn fail(&self, tag: u64, e: TransportError) -> Delivery {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tag);
        Err(e)
    }
}

impl Drop for SocketLink {
    /// Ends the reader thread with the connection.
    fn drop(&mut self) {
        self.control.shutdown();
    }
}

fn read_replies(
    mut r: Box<dyn Stream>,
    pending: &Pending,
    closed: &AtomicBool,
    buffers: &ReadBuffers,
) {
    let waiter = |tag| {
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tag)
    };
    while let Some((waiter, reply)) = read_reply(&mut r, buffers, waiter) {
        if let Some(w) = waiter {
            let _ = w.tx.send(reply);
        }
    }
    // Set before draining, so a caller that registers after the drain sees it.
    closed.store(true, Ordering::SeqCst);
    for (_, w) in pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        let _ = w.tx.send(Err(TransportError::Disconnected));
    }
}

/// One reply off the stream, with the waiter `waiter` gives for its tag (taken as soon
/// as the header names it) and what the reply says; `None` at the end of the stream or
/// at a frame that cannot be trusted. The header and sense are read first, then the
/// data-in straight into the waiter's buffer if it gave one of that length, else into a
/// buffer of its own (a kept one if any), neither zero-filled first nor copied out of
/// the frame afterwards (a READ's data crosses this thread once, and no buffer at all
/// when it is placed).
fn read_reply(
    r: &mut Box<dyn Stream>,
    buffers: &ReadBuffers,
    waiter: impl FnOnce(u64) -> Option<Waiter>,
) -> Option<(Option<Waiter>, Delivery)> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).ok()?;
    let len = wire::body_len(prefix).ok()?;
    // The fixed part, then the sense its last byte announces (at most 255 bytes).
    let mut head = [0u8; wire::RESPONSE_HEADER + u8::MAX as usize];
    let (fixed, sense) = head.split_at_mut(wire::RESPONSE_HEADER);
    if len < fixed.len() {
        return None;
    }
    r.read_exact(fixed).ok()?;
    let head_len = wire::Response::head_len(&(*fixed).try_into().ok()?);
    let data_len = len.checked_sub(head_len)?;
    r.read_exact(&mut sense[..head_len - wire::RESPONSE_HEADER])
        .ok()?;
    let resp = wire::Response::parse(&head[..head_len]).ok()?;
    let w = waiter(resp.tag);
    let placed = match w.as_ref().and_then(|w| w.into.as_ref()) {
        // Only GOOD data: an error's text stays in the reply, the buffer untouched.
        Some(d) if data_len > 0 && resp.status == GOOD => d.fill(&mut **r, data_len).ok()?,
        _ => false,
    };
    let data = if placed {
        Vec::new()
    } else {
        read_data(r, buffers, data_len)?
    };
    let sense = if resp.sense.is_empty() {
        Ok(None)
    } else {
        Sense::parse(resp.sense).map(Some)
    };
    let reply = sense
        .map(|sense| {
            let r = Response {
                status: resp.status,
                sense,
                data,
            };
            (r, placed)
        })
        .map_err(|e| TransportError::Protocol(e.to_string()));
    Some((w, reply))
}

/// `len` bytes of data-in off the stream into a buffer of its own (a kept one if any),
/// not zero-filled first; `None` if the stream ends before them.
fn read_data(r: &mut Box<dyn Stream>, buffers: &ReadBuffers, len: usize) -> Option<Vec<u8>> {
    let mut data = buffers.empty(len);
    Read::take(&mut **r, len as u64)
        .read_to_end(&mut data)
        .ok()?;
    (data.len() == len).then_some(data)
}

impl SocketLink {
    /// Send one command and wait for its reply; its data-in goes to `into` when that
    /// holds a buffer of its length.
    fn run(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        into: Option<Arc<Destination>>,
    ) -> Delivery {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tag, Waiter { tx, into });
        if self.closed.load(Ordering::SeqCst) {
            return self.fail(tag, TransportError::Disconnected);
        }
        let frame = Request {
            tag,
            lun,
            cdb,
            data: data_out,
        }
        .encode();
        let sent = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&frame);
        if let Err(e) = sent {
            self.control.shutdown();
            return self.fail(tag, TransportError::Send(e.to_string()));
        }
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.control.shutdown();
                self.fail(tag, TransportError::Timeout(self.timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransportError::Disconnected),
        }
    }
}

impl Transport for SocketLink {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError> {
        self.run(lun, cdb, data_out, None).map(|(r, _)| r)
    }

    /// The reader thread reads the data-in straight into `data_in` (see [`Destination`]).
    fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Response, TransportError> {
        // SAFETY: `cleared` clears it on every path out of here, and `data_in` is not
        // touched before that.
        let into = unsafe { Destination::new(data_in) };
        let cleared = Cleared(into.clone());
        let ran = self.run(lun, cdb, data_out, Some(into));
        // The buffer is ours again only once the destination is cleared.
        drop(cleared);
        let (mut r, placed) = ran?;
        if !placed {
            copy_data_in(self, &mut r, data_in)?;
        }
        Ok(r)
    }

    /// A spent READ buffer is kept for a later reply.
    fn reuse(&self, spent: Vec<u8>) {
        self.buffers.give(spent);
    }
}

/// Makes [`SocketLink`]s to one address.
#[derive(Debug, Clone)]
pub struct SocketConnector {
    pub addr: Address,
    pub timeout: Duration,
}

impl Connector for SocketConnector {
    type Link = SocketLink;

    fn connect(&self) -> Result<SocketLink, TransportError> {
        SocketLink::connect(&self.addr, self.timeout)
            .map_err(|e| TransportError::Send(format!("cannot connect to {}: {e}", self.addr)))
    }

    fn name(&self) -> String {
        self.addr.to_string()
    }
}

/// The client of an array-sim daemon: a [`SocketLink`] re-established with backoff when
/// the daemon is restarted or stalls.
#[derive(Debug)]
pub struct SocketClient(Reconnecting<SocketConnector>);

impl SocketClient {
    /// Connect with the default timeout of [`DEFAULT_TIMEOUT`].
    pub fn connect(addr: &Address) -> std::io::Result<SocketClient> {
        SocketClient::connect_with_timeout(addr, DEFAULT_TIMEOUT)
    }

    pub fn connect_with_timeout(
        addr: &Address,
        timeout: Duration,
    ) -> std::io::Result<SocketClient> {
        let connector = SocketConnector {
            addr: addr.clone(),
            timeout,
        };
        Reconnecting::connect(connector)
            .map(SocketClient)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string()))
    }

    pub fn address(&self) -> &Address {
        &self.0.connector().addr
    }
}

impl Transport for SocketClient {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError> {
        self.0.execute(lun, cdb, data_out)
    }

    fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Response, TransportError> {
        self.0.execute_into(lun, cdb, data_out, data_in)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    static KEPT: ReadBuffers = ReadBuffers::new(2, 1 << 20);

    fn reader(bytes: Vec<u8>) -> Box<dyn Stream> {
        Box::new(std::io::Cursor::new(bytes))
    }

    /// The next reply of `r`, with no waiter: its tag and what it says.
    fn next(r: &mut Box<dyn Stream>) -> Option<(u64, Delivery)> {
        let mut tag = 0;
        let (_, d) = read_reply(r, &KEPT, |t| {
            tag = t;
            None
        })?;
        Some((tag, d))
    }

    fn frame(tag: u64, status: u8, sense: &[u8], data: &[u8]) -> Vec<u8> {
        let mut f = wire::Response::header(tag, status, sense, data.len());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn replies_are_read_whole_with_their_sense_and_data() {
        let sense = Sense::LBA_OUT_OF_RANGE.encode();
        let data: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let mut bytes = frame(7, 0, &[], &data);
        bytes.extend(frame(8, 2, &sense, &[]));
        bytes.extend(frame(9, 0, &[], &[]));
        let mut r = reader(bytes);
        let (tag, reply) = next(&mut r).unwrap();
        let (reply, placed) = reply.unwrap();
        assert!(!placed);
        let got = reply.data;
        assert_eq!((tag, &got), (7, &data));
        // Kept; the replies below carry no data and get buffers of their own.
        KEPT.give(got);
        let (tag, reply) = next(&mut r).unwrap();
        let reply = reply.unwrap().0;
        assert_eq!((tag, reply.status), (8, 2));
        assert_eq!(reply.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let (tag, reply) = next(&mut r).unwrap();
        assert_eq!((tag, reply.unwrap().0.data.len()), (9, 0));
        assert!(next(&mut r).is_none(), "end of stream");
    }

    #[test]
    fn frames_that_cannot_be_trusted_end_the_stream() {
        let whole = frame(1, 0, &[], &[5; 100]);
        // Cut short in the data, in the header, in the prefix.
        for cut in [whole.len() - 1, 8, 2] {
            assert!(read_reply(&mut reader(whole[..cut].to_vec()), &KEPT, |_| None).is_none());
        }
        // A body shorter than its header, and one shorter than the sense it announces.
        let mut short = 5u32.to_le_bytes().to_vec();
        short.extend([0; 5]);
        assert!(read_reply(&mut reader(short), &KEPT, |_| None).is_none());
        let mut lying = frame(1, 2, &[0x70; 18], &[]);
        lying[..4].copy_from_slice(&(wire::RESPONSE_HEADER as u32 + 4).to_le_bytes());
        assert!(read_reply(&mut reader(lying), &KEPT, |_| None).is_none());
        // Over the frame limit.
        let huge = (wire::MAX_FRAME + 1).to_le_bytes().to_vec();
        assert!(read_reply(&mut reader(huge), &KEPT, |_| None).is_none());
    }

    fn waiter(into: &Arc<Destination>) -> Option<Waiter> {
        let (tx, _) = mpsc::channel();
        Some(Waiter {
            tx,
            into: Some(into.clone()),
        })
    }

    #[test]
    fn data_in_goes_straight_into_the_waiting_buffer() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let other = vec![0xee; data.len()];
        let sense = Sense::LBA_OUT_OF_RANGE.encode();
        let mut bytes = frame(1, 0, &[], &data);
        bytes.extend(frame(2, 0, &[], &other[..100]));
        bytes.extend(frame(3, 2, &sense, &other));
        bytes.extend(frame(4, 0, &[], &other));
        let mut r = reader(bytes);
        let mut buf = vec![0u8; data.len()];
        // SAFETY: cleared below before `buf` is read.
        let into = unsafe { Destination::new(&mut buf) };
        let (_, d) = read_reply(&mut r, &KEPT, |_| waiter(&into)).unwrap();
        let (reply, placed) = d.unwrap();
        assert!(placed && reply.data.is_empty());
        // Not of the buffer's length: in a buffer of its own, the waiting one untouched.
        let (_, d) = read_reply(&mut r, &KEPT, |_| waiter(&into)).unwrap();
        let (reply, placed) = d.unwrap();
        assert!(!placed);
        assert_eq!(reply.data, &other[..100]);
        // An error's data, even of the buffer's length, stays in the reply.
        let (_, d) = read_reply(&mut r, &KEPT, |_| waiter(&into)).unwrap();
        let (reply, placed) = d.unwrap();
        assert!(!placed);
        assert_eq!((reply.status, reply.data.len()), (2, other.len()));
        // Given up: never written again.
        into.clear();
        let (_, d) = read_reply(&mut r, &KEPT, |_| waiter(&into)).unwrap();
        assert!(!d.unwrap().1);
        drop(into);
        assert_eq!(buf, data);
    }

    /// A daemon on a Unix socket that writes `reply(tag)` for each request (a frame, or
    /// part of one), the last request first once it has `batch` of them (out of order).
    fn daemon(
        batch: usize,
        reply: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> (tempfile::TempDir, Address) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("array.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut tags = Vec::new();
            loop {
                let mut prefix = [0u8; 4];
                if s.read_exact(&mut prefix).is_err() {
                    return;
                }
                let mut body = vec![0u8; wire::body_len(prefix).unwrap()];
                s.read_exact(&mut body).unwrap();
                tags.push(Request::parse(&body).unwrap().tag);
                if tags.len() < batch {
                    continue;
                }
                for tag in tags.drain(..).rev() {
                    let _ = s.write_all(&reply(tag));
                }
            }
        });
        (d, Address::Unix(path))
    }

    #[test]
    fn concurrent_reads_land_in_their_own_buffers() {
        let (_d, addr) = daemon(4, |tag| frame(tag, 0, &[], &vec![tag as u8; 300_000]));
        let link = SocketLink::connect(&addr, Duration::from_secs(10)).unwrap();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut buf = vec![0u8; 300_000];
                        let r = link.execute_into(0, &[0x88; 16], &[], &mut buf).unwrap();
                        assert_eq!((r.status, r.data.len()), (GOOD, 0));
                        buf
                    })
                })
                .collect();
            runs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut firsts: Vec<u8> = got.iter().map(|b| b[0]).collect();
        assert!(got.iter().all(|b| b.iter().all(|&x| x == b[0])));
        firsts.sort_unstable();
        assert_eq!(firsts, [1, 2, 3, 4], "each reply in its caller's buffer");
        // A reply of another length is an error, not a short read.
        let (_d, addr) = daemon(1, |tag| frame(tag, 0, &[], &[9; 10]));
        let link = SocketLink::connect(&addr, Duration::from_secs(10)).unwrap();
        let e = link
            .execute_into(0, &[0x88; 16], &[], &mut [0u8; 20])
            .unwrap_err();
        assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    }

    #[test]
    fn a_read_that_stalls_halfway_times_out_and_its_buffer_is_given_back() {
        // The header and half the data, then nothing: the reader thread is inside the
        // buffer when the caller's time runs out.
        let (_d, addr) = daemon(1, |tag| {
            let f = frame(tag, 0, &[], &[7; 4096]);
            f[..f.len() - 2048].to_vec()
        });
        let link = SocketLink::connect(&addr, Duration::from_millis(300)).unwrap();
        let mut buf = vec![0u8; 4096];
        // Returning at all shows the caller did not wait on the stalled reader.
        let e = link
            .execute_into(0, &[0x88; 16], &[], &mut buf)
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout(_)), "{e}");
        assert!(link.pending.lock().unwrap().is_empty());
        // The link is closed: the next command fails at once.
        let e = link.execute(0, &[0x88; 16], &[]).unwrap_err();
        assert!(
            matches!(e, TransportError::Disconnected | TransportError::Send(_)),
            "{e}"
        );
    }
}
