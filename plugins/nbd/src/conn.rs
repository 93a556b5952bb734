//! One NBD connection with many requests in flight.
//!
//! Callers are host-agent's blocking worker threads (one per request in flight), so the
//! client is built for blocking callers, not on an async runtime: a caller registers its
//! request under a cookie, writes it under the writer lock, and parks. One reader thread
//! per connection reads every reply and hands it to the caller by cookie, reading a READ's
//! data straight into the caller's buffer. A tokio runtime would add a hand-off between
//! the caller's thread and the runtime's on both ways of every request, and a copy of
//! the data, for no gain here.
//!
//! Failure handling: a request that gets no reply within the timeout fails, and the
//! connection is dropped (shut down, so the reader wakes and fails every other request
//! in flight). A protocol violation (bad magic, unknown cookie, an impossible chunk, a
//! short read) drops the connection too: the stream can no longer be trusted. A dead
//! connection takes no new requests; the leg opens a new one.

use std::collections::HashMap;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::handshake::{handshake, Export, Stream};
use crate::proto::*;
use crate::uri::Target;

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The server answered the request with an error.
    #[error("the server replied {} ({errno}){}", errno_name(*errno), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server { errno: u32, message: String },
    /// The connection failed or was dropped; the request's fate is unknown.
    #[error("connection lost: {0}")]
    Lost(String),
    /// No reply in time; the connection was dropped.
    #[error("no reply within {0} ms; the connection was dropped")]
    Timeout(u128),
}

/// The buffer of a READ in flight, written by the reader thread.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is only dereferenced by the reader thread while the request's owner
// is parked waiting for it (see `Conn::read`), never by two threads at once.
unsafe impl Send for RawBuf {}

/// A request in flight.
struct Slot {
    waiter: Thread,
    offset: u64,
    len: u32,
    /// For a READ: where its data goes.
    buf: Option<RawBuf>,
    /// The reader thread is writing into `buf` with the state lock released; the owner
    /// must not return (and free the buffer) until this is false.
    claimed: bool,
    outcome: Option<Result<(), ConnError>>,
    /// The group the request belongs to: its owner is woken once, by the last reply.
    group: Option<Arc<Group>>,
    /// Structured reply so far: content ranges received (relative to `offset`) and the
    /// first error chunk.
    ranges: Vec<(u64, u64)>,
    error: Option<ConnError>,
}

/// Requests in flight by cookie, in shards (by cookie) so that callers and the reader
/// rarely wait for each other's lock.
type Pending = HashMap<u64, Slot>;
const SHARDS: usize = 16;

/// What the reader thread and the callers share.
struct Shared {
    shards: [Mutex<Pending>; SHARDS],
    next_cookie: AtomicU64,
    /// Set once, after `why`; no request is registered after it is set (registration
    /// checks it under its shard's lock, and the reader fails every registered request
    /// after setting it).
    dead: AtomicBool,
    why: Mutex<Option<ConnError>>,
    /// A handle on the socket to shut it down.
    socket: Stream,
    structured: bool,
}

/// Requests one thread sends on one or more connections and then waits for together (a
/// mirrored write's two legs): the owner is woken once, when the last one completes,
/// instead of once per reply.
pub struct Group {
    /// Requests not yet completed, plus one while the owner is still sending.
    left: AtomicUsize,
}

impl Group {
    pub fn new() -> Arc<Group> {
        Arc::new(Group {
            left: AtomicUsize::new(1),
        })
    }

    /// The owner has sent every request: wait until all have completed, or `deadline`.
    /// Each request's outcome is then taken with [`Conn::wait`].
    pub fn wait(&self, deadline: Instant) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            return;
        }
        loop {
            let now = Instant::now();
            if self.left.load(Ordering::Acquire) == 0 || now >= deadline {
                return;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

/// A request sent and not yet waited for.
#[must_use = "wait for every ticket, or its slot is never freed"]
pub struct Ticket {
    cookie: u64,
    deadline: Instant,
}

/// A connection in the transmission phase.
pub struct Conn {
    shared: Arc<Shared>,
    writer: Mutex<Stream>,
    export: Export,
    timeout: Duration,
    reader: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    /// Connect to `target`, do the handshake, and start the reader.
    pub fn open(target: &Target, timeout: Duration) -> Result<Conn, String> {
        let mut s = Stream::connect(&target.address, timeout)
            .map_err(|e| format!("connect to {}: {e}", target.address))?;
        s.set_timeouts(Some(timeout), Some(timeout))
            .map_err(|e| format!("socket options: {e}"))?;
        let export = handshake(&mut s, target)
            .map_err(|e| format!("handshake with {}: {e}", target.address))?;
        Conn::start(s, export, timeout).map_err(|e| format!("start the reader: {e}"))
    }

    /// Start transmission on a stream whose handshake gave `export`.
    pub fn start(stream: Stream, export: Export, timeout: Duration) -> io::Result<Conn> {
        // The reader waits for replies without limit; requests time out on their own.
        // Sends time out, so a server that stops reading cannot hold the writer lock.
        stream.set_timeouts(None, Some(timeout))?;
        let shared = Arc::new(Shared {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_cookie: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            why: Mutex::new(None),
            socket: stream.try_clone()?,
            structured: export.structured,
        });
        let rd = stream.try_clone()?;
        let sh = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || sh.read_replies(rd))?;
        Ok(Conn {
            shared,
            writer: Mutex::new(stream),
            export,
            timeout,
            reader: Some(reader),
        })
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Why the connection died, if it did.
    pub fn why_dead(&self) -> Option<ConnError> {
        self.is_dead().then(|| self.shared.why()).flatten()
    }

    /// Read `buf.len()` bytes (at most the export's maximum payload) at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ConnError> {
        let len = u32::try_from(buf.len()).map_err(|_| too_long(buf.len()))?;
        let raw = RawBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        let ticket = self.register(offset, len, Some(raw), None)?;
        // From here the reader thread may write into `buf`: the guard makes sure this
        // function does not return or unwind before it has stopped (`finish` or
        // `abandon` only return once the slot is completed or removed unclaimed).
        let mut guard = Guard {
            conn: self,
            cookie: ticket.cookie,
            armed: true,
        };
        self.transmit(&request(0, CMD_READ, ticket.cookie, offset, len), &[]);
        let r = self.finish(&ticket);
        guard.armed = false;
        r
    }

    /// Send a request that carries no reply data (WRITE with `data`, FLUSH,
    /// WRITE_ZEROES); wait for it with [`Conn::wait`].
    pub fn send(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        group: Option<&Arc<Group>>,
    ) -> Result<Ticket, ConnError> {
        let ticket = self.register(offset, len, None, group)?;
        self.transmit(&request(flags, kind, ticket.cookie, offset, len), data);
        Ok(ticket)
    }

    /// Wait for the reply to a request sent by this thread.
    pub fn wait(&self, ticket: Ticket) -> Result<(), ConnError> {
        self.finish(&ticket)
    }

    fn register(
        &self,
        offset: u64,
        len: u32,
        buf: Option<RawBuf>,
        group: Option<&Arc<Group>>,
    ) -> Result<Ticket, ConnError> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let mut st = self.shared.shard(cookie);
        if self.is_dead() {
            return Err(self
                .shared
                .why()
                .unwrap_or(ConnError::Lost("closed".into())));
        }
        if let Some(g) = group {
            g.left.fetch_add(1, Ordering::AcqRel);
        }
        st.insert(
            cookie,
            Slot {
                waiter: std::thread::current(),
                offset,
                len,
                buf,
                claimed: false,
                outcome: None,
                group: group.cloned(),
                ranges: Vec::new(),
                error: None,
            },
        );
        Ok(Ticket {
            cookie,
            deadline: Instant::now() + self.timeout,
        })
    }

    /// Write a request; a failed send kills the connection, and the reader then fails
    /// the request with the others.
    fn transmit(&self, header: &[u8], data: &[u8]) {
        let r = write_both(&mut lock(&self.writer), header, data);
        if let Err(e) = r {
            self.shared.die(ConnError::Lost(format!("send: {e}")));
        }
    }

    /// The request's outcome, or a timeout once its deadline has passed.
    fn finish(&self, t: &Ticket) -> Result<(), ConnError> {
        let mut st = self.shared.shard(t.cookie);
        loop {
            let Some(slot) = st.get_mut(&t.cookie) else {
                return Err(ConnError::Lost("request forgotten".into()));
            };
            if let Some(out) = slot.outcome.take() {
                st.remove(&t.cookie);
                return out;
            }
            let now = Instant::now();
            if now >= t.deadline {
                drop(st);
                let e = ConnError::Timeout(self.timeout.as_millis());
                self.abandon(t.cookie, e.clone());
                return Err(e);
            }
            drop(st);
            std::thread::park_timeout(t.deadline - now);
            st = self.shared.shard(t.cookie);
        }
    }

    /// Give up on a request: drop the connection, and return once the reader no longer
    /// touches the request's buffer.
    fn abandon(&self, cookie: u64, why: ConnError) {
        let mut st = self.shared.shard(cookie);
        let Some(slot) = st.get(&cookie) else {
            return;
        };
        let claimed = slot.claimed && slot.outcome.is_none();
        if !claimed {
            st.remove(&cookie);
        }
        drop(st);
        self.shared.die(why);
        if claimed {
            // The shutdown in `die` ends the reader's read; it then fails every request.
            let mut st = self.shared.shard(cookie);
            while st.get(&cookie).is_some_and(|s| s.outcome.is_none()) {
                drop(st);
                std::thread::park_timeout(Duration::from_millis(10));
                st = self.shared.shard(cookie);
            }
            st.remove(&cookie);
        }
    }
}

/// Ends a READ that did not finish normally (a panic on the way).
struct Guard<'a> {
    conn: &'a Conn,
    cookie: u64,
    armed: bool,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn
                .abandon(self.cookie, ConnError::Lost("request abandoned".into()));
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.is_dead() {
            // Soft disconnect; nothing of ours is in flight (requests hold the Conn).
            let _ = write_both(
                &mut lock(&self.writer),
                &request(0, CMD_DISC, u64::MAX, 0, 0),
                &[],
            );
        }
        self.shared.die(ConnError::Lost("connection closed".into()));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn too_long(n: usize) -> ConnError {
    ConnError::Lost(format!("a request of {n} bytes is longer than NBD allows"))
}

/// Write `a` then `b` with as few system calls as the socket allows.
fn write_both(w: &mut Stream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    let mut rest: &mut [IoSlice<'_>] = &mut bufs;
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A reply for a request that is not in flight: the stream cannot be trusted.
fn unknown(cookie: u64) -> String {
    format!("reply for cookie {cookie}, which is not in flight")
}

/// Give a request its outcome; the caller unparks the returned owner once it has let go
/// of the shard's lock, so the owner does not wake only to wait for that lock.
/// A request in a group wakes its owner only if it is the group's last.
#[must_use = "unpark the owner"]
fn complete(slot: &mut Slot, r: Result<(), ConnError>) -> Option<Thread> {
    slot.claimed = false;
    slot.outcome = Some(r);
    match &slot.group {
        Some(g) if g.left.fetch_sub(1, Ordering::AcqRel) != 1 => None,
        _ => Some(slot.waiter.clone()),
    }
}

fn wake(owner: Option<Thread>) {
    if let Some(t) = owner {
        t.unpark();
    }
}

impl Shared {
    fn shard(&self, cookie: u64) -> MutexGuard<'_, Pending> {
        lock(&self.shards[cookie as usize % SHARDS])
    }

    fn why(&self) -> Option<ConnError> {
        lock(&self.why).clone()
    }

    /// Mark the connection dead (first reason wins); the reason, and that it is now dead.
    fn set_dead(&self, why: ConnError) -> ConnError {
        let e = lock(&self.why).get_or_insert(why).clone();
        self.dead.store(true, Ordering::SeqCst);
        e
    }

    /// Mark the connection dead and shut the socket down: the reader then fails every
    /// request in flight.
    fn die(&self, why: ConnError) {
        self.set_dead(why);
        self.socket.shutdown();
    }

    /// The reader thread: replies until the stream fails, then fail every request.
    fn read_replies(&self, stream: Stream) {
        let mut rd = BufReader::with_capacity(128 << 10, stream);
        let why = loop {
            if let Err(e) = self.one_reply(&mut rd) {
                break e;
            }
        };
        let e = self.set_dead(ConnError::Lost(why));
        for shard in &self.shards {
            let owners: Vec<Option<Thread>> = lock(shard)
                .values_mut()
                .filter(|s| s.outcome.is_none())
                .map(|slot| complete(slot, Err(e.clone())))
                .collect();
            owners.into_iter().for_each(wake);
        }
        self.socket.shutdown();
    }

    fn one_reply(&self, rd: &mut impl Read) -> Result<(), String> {
        let mut magic = [0u8; 4];
        read(rd, &mut magic)?;
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => self.simple(rd),
            STRUCTURED_REPLY_MAGIC => self.chunk(rd),
            m => Err(format!("bad reply magic {m:#x}")),
        }
    }

    fn simple(&self, rd: &mut impl Read) -> Result<(), String> {
        let mut h = [0u8; 12];
        read(rd, &mut h)?;
        let (errno, cookie) = (be32(&h), be64(&h[4..]));
        let mut st = self.shard(cookie);
        let slot = live(&mut st, cookie)?;
        if slot.buf.is_some() && self.structured {
            return Err("simple reply to a READ after structured replies were negotiated".into());
        }
        if errno != 0 {
            // A simple error reply carries no data, even for a READ.
            let owner = complete(slot, Err(server(errno, String::new())));
            drop(st);
            wake(owner);
            return shutting_down(errno);
        }
        let Some(buf) = slot.buf else {
            let owner = complete(slot, Ok(()));
            drop(st);
            wake(owner);
            return Ok(());
        };
        slot.claimed = true;
        drop(st);
        // SAFETY: `buf` is the READ owner's buffer; the owner is parked in `finish` or
        // `abandon` and does not return while the slot is claimed.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.ptr, buf.len) };
        let r = read(rd, dst);
        let mut st = self.shard(cookie);
        let slot = st.get_mut(&cookie).ok_or_else(|| unknown(cookie))?;
        slot.claimed = false;
        if r.is_ok() {
            let owner = complete(slot, Ok(()));
            drop(st);
            wake(owner);
        }
        r
    }

    /// One structured reply chunk.
    fn chunk(&self, rd: &mut impl Read) -> Result<(), String> {
        let mut h = [0u8; 16];
        read(rd, &mut h)?;
        let (flags, kind, cookie, len) = (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
        let mut st = self.shard(cookie);
        let slot = live(&mut st, cookie)?;
        let (req_off, req_len, buf) = (slot.offset, u64::from(slot.len), slot.buf);
        let content = match kind {
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let buf =
                    buf.ok_or_else(|| format!("content chunk for cookie {cookie}, not a READ"))?;
                slot.claimed = true;
                drop(st);
                Some(content_chunk(rd, kind, len, req_off, req_len, buf)?)
            }
            REPLY_TYPE_NONE if len == 0 && flags & REPLY_FLAG_DONE != 0 => {
                drop(st);
                None
            }
            REPLY_TYPE_NONE => {
                return Err("NBD_REPLY_TYPE_NONE with a payload or without DONE".into())
            }
            k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                drop(st);
                let e = error_chunk(rd, kind, len)?;
                let mut st = self.shard(cookie);
                let slot = live(&mut st, cookie)?;
                slot.error.get_or_insert(e);
                None
            }
            k => return Err(format!("unknown structured reply type {k}")),
        };
        let mut st = self.shard(cookie);
        let slot = st.get_mut(&cookie).ok_or_else(|| unknown(cookie))?;
        slot.claimed = false;
        if let Some((start, end)) = content {
            if slot.ranges.iter().any(|&(s, e)| start < e && s < end) {
                return Err(format!("overlapping content chunks for cookie {cookie}"));
            }
            slot.ranges.push((start, end));
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return Ok(());
        }
        if let Some(e) = slot.error.take() {
            let errno = match &e {
                ConnError::Server { errno, .. } => *errno,
                _ => 0,
            };
            let owner = complete(slot, Err(e));
            drop(st);
            wake(owner);
            return shutting_down(errno);
        }
        let got: u64 = slot.ranges.iter().map(|&(s, e)| e - s).sum();
        if buf.is_some() && got != req_len {
            return Err(format!(
                "the server ended a READ reply with {got} of {req_len} bytes"
            ));
        }
        let owner = complete(slot, Ok(()));
        drop(st);
        wake(owner);
        Ok(())
    }
}

/// Read an OFFSET_DATA or OFFSET_HOLE chunk's payload into the READ's buffer; the range
/// it filled, relative to the request. The slot is claimed by the caller.
fn content_chunk(
    rd: &mut impl Read,
    kind: u16,
    len: u32,
    req_off: u64,
    req_len: u64,
    buf: RawBuf,
) -> Result<(u64, u64), String> {
    let mut o = [0u8; 8];
    let (off, n) = if kind == REPLY_TYPE_OFFSET_DATA {
        if len < 9 {
            return Err(format!("OFFSET_DATA chunk of {len} bytes"));
        }
        read(rd, &mut o)?;
        (be64(&o), u64::from(len) - 8)
    } else {
        if len != 12 {
            return Err(format!("OFFSET_HOLE chunk of {len} bytes"));
        }
        let mut s = [0u8; 4];
        read(rd, &mut o)?;
        read(rd, &mut s)?;
        (be64(&o), u64::from(be32(&s)))
    };
    let start = off.checked_sub(req_off).filter(|s| s + n <= req_len);
    let Some(start) = start.filter(|_| n > 0) else {
        return Err(format!(
            "chunk of {n} bytes at {off} outside the READ of {req_len} bytes at {req_off}"
        ));
    };
    // SAFETY: as in `Shared::simple`: the slot is claimed, the owner waits; and
    // `start + n <= req_len == buf.len` was checked above.
    let dst = unsafe { std::slice::from_raw_parts_mut(buf.ptr.add(start as usize), n as usize) };
    if kind == REPLY_TYPE_OFFSET_DATA {
        read(rd, dst)?;
    } else {
        dst.fill(0);
    }
    Ok((start, start + n))
}

/// An error chunk: errno and message.
fn error_chunk(rd: &mut impl Read, kind: u16, len: u32) -> Result<ConnError, String> {
    if !(6..=MAX_SMALL_PAYLOAD).contains(&len) {
        return Err(format!("error chunk of {len} bytes"));
    }
    let mut p = vec![0u8; len as usize];
    read(rd, &mut p)?;
    let msg_len = usize::from(be16(&p[4..]));
    let extra = if kind == REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    if 6 + msg_len + extra > p.len() {
        return Err(format!("error chunk message of {msg_len} bytes in {len}"));
    }
    let message = String::from_utf8_lossy(&p[6..6 + msg_len]).into_owned();
    Ok(server(be32(&p), message))
}

fn server(errno: u32, message: String) -> ConnError {
    // An error chunk must carry a non-zero errno; treat a zero as EIO.
    let errno = if errno == 0 { EIO } else { errno };
    ConnError::Server { errno, message }
}

/// `ESHUTDOWN` asks the client to disconnect: the connection ends here.
fn shutting_down(errno: u32) -> Result<(), String> {
    if errno == ESHUTDOWN {
        Err("the server is shutting down (ESHUTDOWN)".into())
    } else {
        Ok(())
    }
}

/// The slot of a request in flight, or the protocol error of a stray reply.
fn live(st: &mut Pending, cookie: u64) -> Result<&mut Slot, String> {
    st.get_mut(&cookie)
        .filter(|s| s.outcome.is_none())
        .ok_or_else(|| unknown(cookie))
}

fn read(rd: &mut impl Read, buf: &mut [u8]) -> Result<(), String> {
    rd.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => format!("receive: {e}"),
    })
}
