//! The transmission phase, on blocking threads as nbdkit runs it: each of a connection's
//! workers takes the next request off the socket (holding the read lock), runs it through
//! the export, and writes its reply (holding the write lock). One thread reads, runs and
//! answers a request, with no hand-off between threads and no allocation on the way, and
//! replies leave in completion order. Export calls block (a plugin, an array), which is
//! why they run here and not on the async reactor; a slow export only holds its own
//! connection's workers.
//!
//! Workers are started as they are needed, up to `in_flight` per connection:
//! when a worker takes a request and no other worker is left waiting for the next one, it
//! starts another. Closing is orderly: after `NBD_CMD_DISC`, end of stream or a bad
//! request header, every request already read is still run and answered, then the socket
//! is closed.

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::export::{errno, ExportError, Session};
use super::proto::{self as p};

/// A connection's socket once it is in the transmission phase, in blocking mode.
pub enum Socket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Socket {
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        };
    }
}

/// The connections in transmission, so a service that stops can drain them: each stops
/// taking requests, answers those it took, and closes.
#[derive(Default)]
pub struct Connections {
    live: Mutex<Vec<std::sync::Weak<Conn>>>,
    draining: AtomicBool,
}

impl Connections {
    /// False once draining: the connection is closed instead.
    fn add(&self, c: &Arc<Conn>) -> bool {
        let mut live = lock(&self.live);
        if self.draining.load(Ordering::SeqCst) {
            return false;
        }
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(c));
        true
    }

    /// Stop taking requests on every connection (requests already read still run), and
    /// refuse connections that finish their handshake from now on.
    pub fn drain(&self) {
        let live = lock(&self.live);
        self.draining.store(true, Ordering::SeqCst);
        for c in live.iter().filter_map(std::sync::Weak::upgrade) {
            c.closing.store(true, Ordering::SeqCst);
            // Wakes the worker waiting for the next request; replies can still be sent.
            c.socket.shutdown(Shutdown::Read);
        }
    }

    /// Connections still open.
    pub fn count(&self) -> usize {
        lock(&self.live)
            .iter()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// A stream the handshake runs on (async) that can then be handed to the workers.
pub trait IntoSocket:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
    fn into_socket(self) -> io::Result<Socket>;
}

impl IntoSocket for tokio::net::UnixStream {
    fn into_socket(self) -> io::Result<Socket> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        enlarge_send_buffer(&s);
        Ok(Socket::Unix(s))
    }
}

/// The send buffer a Unix connection asks for (the kernel doubles it for its own
/// bookkeeping): a 1 MiB READ reply and its header go out in one `writev`. With the
/// default (`net.core.wmem_default`, 208 KiB) the worker sleeps several times per 1 MiB reply
/// until the client has read what is queued, and each wake-up is a context switch on
/// both sides: on the 2-core VM a 1 MiB `pread` + `write` loop over a Unix socket pair
/// took 0.32 ms of CPU per MiB (4370 MB/s) with the default, 0.30 ms (5025 MB/s) with
/// this; larger buffers gained nothing more. TCP keeps the kernel's autotuning, which a
/// fixed `SO_SNDBUF` would switch off.
const SEND_BUFFER: libc::c_int = 1 << 20;

/// Ask for [`SEND_BUFFER`]: `SO_SNDBUFFORCE` when the service may exceed
/// `net.core.wmem_max` (CAP_NET_ADMIN, as root), else `SO_SNDBUF`, which the kernel caps
/// at it. A refusal leaves the default: the replies are the same, only slower.
fn enlarge_send_buffer(s: &std::os::unix::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let set = |option| {
        // SAFETY: a valid descriptor and a pointer to an int of the length given.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&SEND_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    };
    if !set(libc::SO_SNDBUFFORCE) {
        set(libc::SO_SNDBUF);
    }
}

impl IntoSocket for tokio::net::TcpStream {
    fn into_socket(self) -> io::Result<Socket> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(Socket::Tcp(s))
    }
}

/// Reads from the shared socket (the read lock makes one reader at a time).
struct SocketReader(Arc<Socket>);

impl Read for SocketReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &*self.0 {
            Socket::Unix(s) => (&*s).read(buf),
            Socket::Tcp(s) => (&*s).read(buf),
        }
    }
}

fn write_vectored(s: &Socket, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    match s {
        Socket::Unix(s) => (&*s).write_vectored(bufs),
        Socket::Tcp(s) => (&*s).write_vectored(bufs),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Neither lock guards an invariant a panic could break half-way.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes of request payloads and reply data one connection may hold at once. A client
/// that sends requests and never reads the replies would otherwise make every worker
/// hold a full buffer (16 × 32 MiB); past the budget no request is taken off the socket
/// until replies have been sent. One request larger than the budget still runs alone.
pub const BUFFER_BUDGET: u64 = 64 << 20;

/// The read buffer of a connection: 15 small WRITEs (4 KiB and their headers) or 2000
/// other requests per system call; the part of a large payload that arrives with its header
/// is copied out of it once more, so it is kept small.
const READ_BUFFER: usize = 64 << 10;

/// The bytes a connection's requests hold, against [`BUFFER_BUDGET`].
#[derive(Default)]
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    /// Wait until `cost` more bytes fit (or nothing else is held), then hold them.
    fn reserve(&self, cost: u64) {
        let mut used = lock(&self.used);
        while *used > 0 && *used + cost > BUFFER_BUDGET {
            used = self
                .freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += cost;
    }

    fn release(&self, cost: u64) {
        let mut used = lock(&self.used);
        *used -= cost.min(*used);
        self.freed.notify_all();
    }
}

/// The bytes a request holds until its reply is sent: its payload or its read data.
fn cost(req: &p::Request) -> u64 {
    match req.kind {
        p::CMD_WRITE | p::CMD_READ => u64::from(req.len),
        _ => 0,
    }
}

/// One connection in transmission; dropped (and the socket closed) when its last worker
/// ends.
pub struct Conn {
    session: Session,
    socket: Arc<Socket>,
    /// Requests arrive back to back; they are read in bulk, not one system call each
    /// ([`READ_BUFFER`]).
    reader: Mutex<BufReader<SocketReader>>,
    writer: Mutex<()>,
    budget: Budget,
    /// No more requests are taken off the socket.
    closing: AtomicBool,
    /// Workers running, and those of them waiting for a request.
    workers: AtomicUsize,
    idle: AtomicUsize,
    limit: usize,
    ended: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.socket.shutdown(Shutdown::Both);
        if let Some(tx) = lock(&self.ended).take() {
            let _ = tx.send(());
        }
    }
}

/// Serve requests on `socket` until the client leaves; returns when every request read
/// has been answered and the socket is closed.
pub(super) async fn transmission(
    socket: Socket,
    session: Session,
    in_flight: usize,
    registry: &Connections,
) {
    let socket = Arc::new(socket);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let conn = Arc::new(Conn {
        session,
        reader: Mutex::new(BufReader::with_capacity(
            READ_BUFFER,
            SocketReader(socket.clone()),
        )),
        socket,
        writer: Mutex::new(()),
        budget: Budget::default(),
        closing: AtomicBool::new(false),
        workers: AtomicUsize::new(0),
        idle: AtomicUsize::new(0),
        limit: in_flight.max(1),
        ended: Mutex::new(Some(tx)),
    });
    if !registry.add(&conn) || !start_worker(&conn) {
        return;
    }
    drop(conn);
    let _ = rx.await;
}

/// Start one more worker if the limit allows; false if none could be started.
fn start_worker(conn: &Arc<Conn>) -> bool {
    if conn.workers.fetch_add(1, Ordering::SeqCst) >= conn.limit {
        conn.workers.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    conn.idle.fetch_add(1, Ordering::SeqCst);
    let c = conn.clone();
    let started = std::thread::Builder::new()
        .name("nbd-worker".into())
        .spawn(move || worker(&c));
    if started.is_err() {
        // Out of threads: the workers already running go on serving.
        conn.workers.fetch_sub(1, Ordering::SeqCst);
        conn.idle.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    true
}

/// A worker's buffers, kept from one request to the next.
#[derive(Default)]
struct Scratch {
    payload: Vec<u8>,
    head: Vec<u8>,
    data: Vec<u8>,
}

/// Buffers above this size are given back after the request that needed them: with
/// [`BUFFER_BUDGET`] this bounds what a connection holds (16 workers × 2 × 1 MiB kept).
const KEEP: usize = 1 << 20;

/// `v[..len]`, growing `v` when it is shorter (without clearing what it holds).
fn sized(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}

/// What the read side gave a worker.
enum Taken {
    Request(p::Request),
    /// A request answered without running it.
    Reply,
    Close,
}

fn take(conn: &Conn, s: &mut Scratch) -> Taken {
    let mut rd = lock(&conn.reader);
    if conn.closing.load(Ordering::SeqCst) {
        return Taken::Close;
    }
    let taken = take_locked(conn, &mut rd, s);
    if matches!(taken, Taken::Close) {
        // Set before the read lock is released, so no other worker goes on to wait for
        // a request that will never come.
        conn.closing.store(true, Ordering::SeqCst);
    }
    taken
}

fn take_locked(conn: &Conn, rd: &mut BufReader<SocketReader>, s: &mut Scratch) -> Taken {
    let mut h = [0u8; p::REQUEST_LEN];
    if rd.read_exact(&mut h).is_err() {
        return Taken::Close;
    }
    // A bad magic means the stream cannot be trusted: hard disconnect.
    let Ok(req) = p::Request::parse(&h) else {
        return Taken::Close;
    };
    match req.kind {
        p::CMD_DISC => Taken::Close,
        p::CMD_WRITE if req.len > p::MAX_PAYLOAD => {
            // Reading it would let a client make us buffer without bound.
            Taken::Close
        }
        p::CMD_WRITE => {
            // Held from before the payload is read until the reply is sent.
            conn.budget.reserve(cost(&req));
            if read_payload(rd, sized(&mut s.payload, req.len as usize)).is_err() {
                conn.budget.release(cost(&req));
                return Taken::Close;
            }
            Taken::Request(req)
        }
        p::CMD_READ if req.len > p::MAX_PAYLOAD => {
            let e = ExportError::new(errno::EINVAL, "read larger than the maximum block size");
            error_reply(&conn.session, req.cookie, &e, &mut s.head);
            Taken::Reply
        }
        _ => {
            conn.budget.reserve(cost(&req));
            Taken::Request(req)
        }
    }
}

/// Read a WRITE's payload: what the buffer holds already, then the rest straight from the
/// socket into `buf`. `read_exact` through the `BufReader` would land the payload's tail in
/// the buffer first and copy it again (up to the buffer's size per request), a copy too
/// many of each large write's bytes.
fn read_payload(rd: &mut BufReader<SocketReader>, buf: &mut [u8]) -> io::Result<()> {
    let held = rd.buffer();
    let n = held.len().min(buf.len());
    buf[..n].copy_from_slice(&held[..n]);
    rd.consume(n);
    rd.get_mut().read_exact(&mut buf[n..])
}

fn worker(conn: &Arc<Conn>) {
    let mut s = Scratch::default();
    loop {
        let taken = take(conn, &mut s);
        conn.idle.fetch_sub(1, Ordering::SeqCst);
        let mut held = 0;
        let data = match taken {
            Taken::Close => break,
            Taken::Reply => 0,
            Taken::Request(req) => {
                held = cost(&req);
                // Nobody is left to take the next request: start a worker that will.
                if conn.idle.load(Ordering::SeqCst) == 0 {
                    start_worker(conn);
                }
                let payload = if req.kind == p::CMD_WRITE {
                    &s.payload[..req.len as usize]
                } else {
                    &[][..]
                };
                run(&conn.session, &req, payload, &mut s.head, &mut s.data)
            }
        };
        let sent = send(conn, &s.head, &s.data[..data]);
        for v in [&mut s.payload, &mut s.data] {
            if v.capacity() > KEEP {
                *v = Vec::new();
            }
        }
        conn.budget.release(held);
        if sent.is_err() {
            // The client is gone: wake the worker blocked reading, take nothing more.
            conn.closing.store(true, Ordering::SeqCst);
            conn.socket.shutdown(Shutdown::Both);
            break;
        }
        conn.idle.fetch_add(1, Ordering::SeqCst);
    }
    conn.workers.fetch_sub(1, Ordering::SeqCst);
}

/// Write one whole reply.
fn send(conn: &Conn, head: &[u8], data: &[u8]) -> io::Result<()> {
    let _w = lock(&conn.writer);
    let mut bufs = [IoSlice::new(head), IoSlice::new(data)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match write_vectored(&conn.socket, bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The reply to a failed request, into `head`.
fn error_reply(s: &Session, cookie: u64, e: &ExportError, head: &mut Vec<u8>) {
    // A client's own mistakes are its business; a failing array is the operator's.
    if matches!(e.errno, errno::EINVAL | errno::EPERM | errno::ENOSPC) {
        tracing::debug!(export = %s.name, errno = e.errno, "request refused: {}", e.message);
    } else {
        tracing::warn!(export = %s.name, errno = e.errno, "request failed: {}", e.message);
    }
    head.clear();
    if s.structured {
        head.extend_from_slice(&p::structured_error(cookie, e.errno as u32, &e.message));
    } else {
        head.extend_from_slice(&p::simple_reply(cookie, e.errno as u32));
    }
}

fn ok_reply(s: &Session, cookie: u64, head: &mut Vec<u8>) {
    head.clear();
    if s.structured {
        head.extend_from_slice(&p::structured_header(
            cookie,
            p::REPLY_FLAG_DONE,
            p::REPLY_TYPE_NONE,
            0,
        ));
    } else {
        head.extend_from_slice(&p::simple_reply(cookie, 0));
    }
}

/// Run one request: its reply's header goes to `head`; returns how many bytes of `data`
/// follow it (a READ's data).
fn run(
    s: &Session,
    req: &p::Request,
    payload: &[u8],
    head: &mut Vec<u8>,
    data: &mut Vec<u8>,
) -> usize {
    let e = &s.export;
    let inval = |m: &str| ExportError::new(errno::EINVAL, m);
    if req.flags & !p::Request::allowed_flags(req.kind) != 0 {
        error_reply(
            s,
            req.cookie,
            &inval("unsupported flags for this command"),
            head,
        );
        return 0;
    }
    let end = req.offset.checked_add(u64::from(req.len));
    let in_range = end.is_some_and(|end| end <= e.size());
    let fua = req.flags & p::CMD_FLAG_FUA != 0;
    let writes = matches!(req.kind, p::CMD_WRITE | p::CMD_TRIM | p::CMD_WRITE_ZEROES);
    if writes && e.read_only() {
        let err = ExportError::new(errno::EPERM, "read-only export");
        error_reply(s, req.cookie, &err, head);
        return 0;
    }
    let result = match req.kind {
        p::CMD_READ => return read(s, req, in_range, head, data),
        _ if !in_range && req.kind != p::CMD_FLUSH => {
            let code = if writes { errno::ENOSPC } else { errno::EINVAL };
            Err(ExportError::new(code, "request past the end of the export"))
        }
        p::CMD_WRITE => e.write(req.offset, payload, fua),
        p::CMD_FLUSH => e.flush(),
        // TRIM leaves the data unspecified, so a deallocation is always allowed; WRITE
        // ZEROES allows one unless the client sent NO_HOLE.
        p::CMD_TRIM => e.write_zeroes(req.offset, u64::from(req.len), true, fua),
        p::CMD_WRITE_ZEROES => {
            let unmap = req.flags & p::CMD_FLAG_NO_HOLE == 0;
            e.write_zeroes(req.offset, u64::from(req.len), unmap, fua)
        }
        p::CMD_BLOCK_STATUS => {
            block_status(s, req, head);
            return 0;
        }
        _ => Err(inval("unknown command")),
    };
    match result {
        Ok(()) => ok_reply(s, req.cookie, head),
        Err(err) => error_reply(s, req.cookie, &err, head),
    }
    0
}

/// A READ: its reply's header to `head` and its data to `data`; returns the data's length.
fn read(
    s: &Session,
    req: &p::Request,
    in_range: bool,
    head: &mut Vec<u8>,
    data: &mut Vec<u8>,
) -> usize {
    if !in_range {
        let err = ExportError::new(errno::EINVAL, "read past the end of the export");
        error_reply(s, req.cookie, &err, head);
        return 0;
    }
    let len = req.len as usize;
    match s.export.read(req.offset, sized(data, len)) {
        Ok(()) => {
            head.clear();
            if s.structured {
                head.extend_from_slice(&p::structured_header(
                    req.cookie,
                    p::REPLY_FLAG_DONE,
                    p::REPLY_TYPE_OFFSET_DATA,
                    8 + req.len,
                ));
                head.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                head.extend_from_slice(&p::simple_reply(req.cookie, 0));
            }
            len
        }
        Err(err) => {
            error_reply(s, req.cookie, &err, head);
            0
        }
    }
}

/// One block-status chunk per negotiated metadata context, the last one final.
fn block_status(s: &Session, req: &p::Request, head: &mut Vec<u8>) {
    if !s.structured || s.contexts.is_empty() {
        let err = ExportError::new(errno::EINVAL, "no metadata context was negotiated");
        error_reply(s, req.cookie, &err, head);
        return;
    }
    head.clear();
    for (i, (id, name)) in s.contexts.iter().enumerate() {
        let mut extents = match s.export.block_status(name, req.offset, req.len) {
            Ok(x) => x,
            Err(err) => return error_reply(s, req.cookie, &err, head),
        };
        if req.flags & p::CMD_FLAG_REQ_ONE != 0 {
            extents.truncate(1);
        }
        let payload = p::block_status_payload(*id, &extents);
        let last = i + 1 == s.contexts.len();
        let flags = if last { p::REPLY_FLAG_DONE } else { 0 };
        head.extend_from_slice(&p::structured_header(
            req.cookie,
            flags,
            p::REPLY_TYPE_BLOCK_STATUS,
            payload.len() as u32,
        ));
        head.extend_from_slice(&payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(s: &std::os::unix::net::UnixStream) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor, an int and its length.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        v
    }

    /// A Unix connection in transmission holds a whole 1 MiB reply in its send buffer:
    /// all of it as root (SO_SNDBUFFORCE), else as much as `net.core.wmem_max` allows.
    #[test]
    fn a_unix_connection_gets_the_larger_send_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        a.set_nonblocking(true).expect("nonblocking");
        let a = rt
            .block_on(async { tokio::net::UnixStream::from_std(a) })
            .expect("tokio stream");
        let Socket::Unix(a) = a.into_socket().expect("into_socket") else {
            panic!("not a Unix socket");
        };
        let max: libc::c_int = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("wmem_max")
            .trim()
            .parse()
            .expect("a number");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let want = 2 * if root {
            SEND_BUFFER
        } else {
            SEND_BUFFER.min(max)
        };
        assert_eq!(send_buffer(&a), want);
    }

    /// A payload longer than the read buffer, sent behind a header and followed by the
    /// next request, lands whole, and the next request is read after it.
    #[test]
    fn a_payload_is_read_whole_past_the_buffer_and_what_follows_stays() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let payload: Vec<u8> = (0..(3 * READ_BUFFER + 1234) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let sent = payload.clone();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            a.write_all(&[7u8; 28]).expect("header");
            a.write_all(&sent).expect("payload");
            a.write_all(&[9u8; 28]).expect("next header");
        });
        let mut rd = BufReader::with_capacity(READ_BUFFER, SocketReader(Arc::new(Socket::Unix(b))));
        let mut h = [0u8; 28];
        rd.read_exact(&mut h).expect("header");
        assert_eq!(h, [7u8; 28]);
        let mut got = vec![0u8; payload.len()];
        read_payload(&mut rd, &mut got).expect("payload");
        assert!(got == payload, "payload differs");
        rd.read_exact(&mut h).expect("next header");
        assert_eq!(h, [9u8; 28]);
        writer.join().expect("writer");
    }
}
