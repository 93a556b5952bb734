//! [`NbdLeg`]: one NBD export as a leg, over one multiplexed connection that is opened
//! again, with backoff, after it failed.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use hvm_core::backend::{BackendError, BackendErrorKind};
use hvm_core::SECTOR_SIZE;
use hvm_legs::Leg;

use crate::conn::{Conn, ConnError, Group, Ticket};
use crate::handshake::Export;
use crate::proto::*;
use crate::uri::Target;

/// The first wait before another reconnect attempt after a failed one; it doubles up to
/// [`BACKOFF_MAX`] and starts over once a connection is made.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The largest WRITE_ZEROES sent at once (a multiple of 512; NBD lengths are 32 bits).
const ZEROES_CHUNK: u64 = 1 << 30;
/// Zero buffers written at once when the server has no WRITE_ZEROES.
const ZERO_BUF: usize = 1 << 20;
static ZEROES: [u8; ZERO_BUF] = [0; ZERO_BUF];
/// Requests a caller keeps in flight when it splits a long one.
const WINDOW: usize = 16;

/// One NBD export used as a leg.
pub struct NbdLeg {
    /// The URI as the operator wrote it.
    name: String,
    target: Target,
    timeout: Duration,
    /// The export's size when the leg was opened; a reconnect must find the same.
    export_size: u64,
    identity: String,
    /// The connection requests use; read-locked on every request, so taking it costs no
    /// wait while it is alive.
    current: RwLock<Option<Arc<Conn>>>,
    /// Held while replacing a dead connection.
    link: Mutex<Link>,
}

/// When to try again after a failed reconnect.
struct Link {
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Requests started on one leg; [`NbdLeg::finish`] waits for them.
struct Started {
    conn: Option<Arc<Conn>>,
    tickets: Vec<Ticket>,
    error: Option<BackendError>,
    /// FUA asked and the server has no FUA flag: flush once the writes are done.
    flush_after: bool,
}

impl NbdLeg {
    /// Connect to the export at `uri`; every request gets `timeout`.
    pub fn open(uri: &str, timeout: Duration) -> Result<NbdLeg, String> {
        let target = Target::parse(uri).map_err(|e| e.to_string())?;
        let conn = Conn::open(&target, timeout).map_err(|e| format!("{uri}: {e}"))?;
        Ok(NbdLeg::with_conn(uri, target, timeout, conn))
    }

    /// A leg on a connection already open (tests use a scripted server).
    pub fn with_conn(uri: &str, target: Target, timeout: Duration, conn: Conn) -> NbdLeg {
        let export_size = conn.export().size;
        NbdLeg {
            name: uri.to_string(),
            identity: format!(
                "nbd {} export {} size {export_size}",
                target.address, target.export
            ),
            target,
            timeout,
            export_size,
            current: RwLock::new(Some(Arc::new(conn))),
            link: Mutex::new(Link {
                backoff: BACKOFF_MIN,
                retry_at: None,
                last_error: String::new(),
            }),
        }
    }

    fn error(&self, kind: BackendErrorKind, msg: impl std::fmt::Display) -> BackendError {
        BackendError::new(kind, format!("NBD leg {}: {msg}", self.name))
    }

    fn failed(&self, e: ConnError) -> BackendError {
        let kind = match &e {
            ConnError::Server { errno, .. } => match *errno {
                EPERM => BackendErrorKind::DataProtect,
                EINVAL | EOVERFLOW => BackendErrorKind::InvalidRequest,
                ENOTSUP => BackendErrorKind::Unsupported,
                _ => BackendErrorKind::Io,
            },
            ConnError::Lost(_) | ConnError::Timeout(_) => BackendErrorKind::Io,
        };
        self.error(kind, e)
    }

    /// The live connection: the current one, or a new one when it died. While the server
    /// stays unreachable, attempts are spaced by a growing backoff and requests in
    /// between fail at once.
    fn conn(&self) -> Result<Arc<Conn>, BackendError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let mut l = lock(&self.link);
        // Another request may have reconnected while this one waited.
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let old = self
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let now = Instant::now();
        if let Some(c) = old {
            let why = c.why_dead();
            l.last_error = why.as_ref().map(|e| e.to_string()).unwrap_or_default();
            // The first request after a failure reconnects at once, unless the server
            // stopped answering: a handshake with it would hang as the request did, so
            // requests fail at once until the backoff has passed.
            l.retry_at = match why {
                Some(ConnError::Timeout(_)) => {
                    let at = now + l.backoff;
                    l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
                    Some(at)
                }
                _ => None,
            };
        }
        if let Some(at) = l.retry_at.filter(|&at| now < at) {
            return Err(self.error(
                BackendErrorKind::Io,
                format!(
                    "server unreachable ({}); next attempt in {} ms",
                    l.last_error,
                    (at - now).as_millis()
                ),
            ));
        }
        match Conn::open(&self.target, self.timeout).and_then(|c| self.same_export(c)) {
            Ok(c) => {
                let c = Arc::new(c);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    Some(Arc::clone(&c));
                l.backoff = BACKOFF_MIN;
                l.retry_at = None;
                Ok(c)
            }
            Err(e) => {
                l.retry_at = Some(now + l.backoff);
                l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
                l.last_error = e.clone();
                Err(self.error(BackendErrorKind::Io, format!("reconnect: {e}")))
            }
        }
    }

    /// The current connection, unless it died.
    fn live(&self) -> Option<Arc<Conn>> {
        let cur = self.current.read().unwrap_or_else(PoisonError::into_inner);
        cur.as_ref().filter(|c| !c.is_dead()).cloned()
    }

    /// A reconnect must find the export the leg was opened on, at the same size.
    fn same_export(&self, c: Conn) -> Result<Conn, String> {
        let size = c.export().size;
        if size != self.export_size {
            return Err(format!(
                "the export is now {size} bytes, it was {} bytes: not the same storage",
                self.export_size
            ));
        }
        Ok(c)
    }

    /// Send `data` at `offset` in pieces the server takes, all in flight at once.
    fn start_write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        group: Option<&Arc<Group>>,
    ) -> Started {
        let mut s = self.start();
        let Some(c) = s.conn.clone() else { return s };
        let e = c.export();
        let (flags, flush_after) = fua_flag(e, fua);
        s.flush_after = flush_after;
        let max = e.max_payload as usize;
        let mut off = offset;
        for piece in data.chunks(max) {
            // `max` fits in u32, and so does every piece.
            match c.send(CMD_WRITE, flags, off, piece.len() as u32, piece, group) {
                Ok(t) => s.tickets.push(t),
                Err(e) => {
                    s.error = Some(self.failed(e));
                    break;
                }
            }
            off += piece.len() as u64;
        }
        s
    }

    fn start(&self) -> Started {
        let (conn, error) = match self.conn() {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e)),
        };
        Started {
            conn,
            tickets: Vec::new(),
            error,
            flush_after: false,
        }
    }

    /// Wait for every request of `s`; the first error wins.
    fn finish(&self, s: Started) -> Result<(), BackendError> {
        let mut first = s.error;
        if let Some(c) = &s.conn {
            for t in s.tickets {
                if let Err(e) = c.wait(t) {
                    first.get_or_insert_with(|| self.failed(e));
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        if s.flush_after {
            return self.flush();
        }
        Ok(())
    }

    /// Zeroes by WRITE_ZEROES: `NO_HOLE` unless the caller allows deallocation.
    fn zero_by_command(
        &self,
        c: &Conn,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let (mut flags, flush_after) = fua_flag(c.export(), fua);
        if !unmap {
            flags |= CMD_FLAG_NO_HOLE;
        }
        let mut done = 0;
        while done < len {
            let mut batch = Vec::with_capacity(WINDOW);
            while done < len && batch.len() < WINDOW {
                let n = (len - done).min(ZEROES_CHUNK);
                batch.push(c.send(CMD_WRITE_ZEROES, flags, offset + done, n as u32, &[], None));
                done += n;
            }
            self.wait_all(c, batch)?;
        }
        if flush_after {
            return self.flush();
        }
        Ok(())
    }

    /// Zeroes by writing zero buffers, for servers without WRITE_ZEROES.
    fn zero_by_writing(
        &self,
        c: &Conn,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), BackendError> {
        let piece = (c.export().max_payload as usize).min(ZERO_BUF) as u64;
        let mut done = 0;
        while done < len {
            let mut batch = Vec::with_capacity(WINDOW);
            while done < len && batch.len() < WINDOW {
                let n = (len - done).min(piece);
                batch.push(c.send(
                    CMD_WRITE,
                    0,
                    offset + done,
                    n as u32,
                    &ZEROES[..n as usize],
                    None,
                ));
                done += n;
            }
            self.wait_all(c, batch)?;
        }
        if fua {
            return self.flush();
        }
        Ok(())
    }

    fn wait_all(
        &self,
        c: &Conn,
        batch: Vec<Result<Ticket, ConnError>>,
    ) -> Result<(), BackendError> {
        let mut first = None;
        for t in batch {
            if let Err(e) = t.and_then(|t| c.wait(t)) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |e| Err(self.failed(e)))
    }
}

/// The FUA command flag, and whether to flush after the writes instead (the server has
/// no FUA flag but has FLUSH; with neither, its writes are stable when answered).
fn fua_flag(e: &Export, fua: bool) -> (u16, bool) {
    if !fua {
        (0, false)
    } else if e.can(FLAG_SEND_FUA) {
        (CMD_FLAG_FUA, false)
    } else {
        (0, e.can(FLAG_SEND_FLUSH))
    }
}

impl Leg for NbdLeg {
    fn size(&self) -> u64 {
        self.export_size / SECTOR_SIZE * SECTOR_SIZE
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let c = self.conn()?;
        let max = c.export().max_payload as usize;
        let mut off = offset;
        for piece in buf.chunks_mut(max) {
            c.read(off, piece).map_err(|e| self.failed(e))?;
            off += piece.len() as u64;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.finish(self.start_write(offset, data, fua, None))
    }

    fn flush(&self) -> Result<(), BackendError> {
        let c = self.conn()?;
        if !c.export().can(FLAG_SEND_FLUSH) {
            // A server without FLUSH has no cache to flush.
            return Ok(());
        }
        let t = c.send(CMD_FLUSH, 0, 0, 0, &[], None);
        t.and_then(|t| c.wait(t)).map_err(|e| self.failed(e))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let c = self.conn()?;
        if c.export().can(FLAG_SEND_WRITE_ZEROES) {
            self.zero_by_command(&c, offset, len, unmap, fua)
        } else {
            // NBD_CMD_TRIM would not do: after a trim the data is undefined, and legs
            // must read back the same zeroes.
            self.zero_by_writing(&c, offset, len, fua)
        }
    }

    /// Both legs' writes in flight before waiting for either.
    fn write_both(
        &self,
        other: &Self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Option<Result<(), BackendError>> {
        // One wake-up for both legs' replies, not one each.
        let group = Group::new();
        let deadline = Instant::now() + self.timeout.max(other.timeout);
        let mine = self.start_write(offset, data, fua, Some(&group));
        let theirs = other.start_write(offset, data, fua, Some(&group));
        group.wait(deadline);
        let a = self.finish(mine);
        let b = other.finish(theirs);
        Some(a.and(b))
    }
}
