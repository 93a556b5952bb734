//! What is served: the [`Export`] trait a served thing implements, the [`Exports`] a
//! server offers one peer (listing and lookup by name), the errors and metadata contexts
//! they speak in, and the [`Session`] a connection's handshake ends with: the export it
//! chose and the reply shape it negotiated. An export may count its [`Clients`]: each
//! connection in transmission holds an [`Attachment`] for as long as it lives, and a
//! fence keeps new connections out while a restore writes the export in place.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Errno values of NBD replies.
pub mod errno {
    pub use hvm_core::backend::errno::*;
}

/// A failed export operation: the errno the client sees and a message for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub errno: i32,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        ExportError {
            errno,
            message: message.into(),
        }
    }
}

/// Metadata context `base:allocation`.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Metadata context `hvm:dirty`: the update-location table as block status.
pub const HVM_DIRTY: &str = "hvm:dirty";

/// What the server needs of one export. Methods are blocking; the server runs them off
/// the reactor.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// True when a flush on one connection covers writes completed on every connection.
    fn multi_conn(&self) -> bool;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;
    fn flush(&self) -> Result<(), ExportError>;
    /// Write zeroes (also used for TRIM, whose data is then unspecified by the protocol).
    /// With `unmap` the export may deallocate the range instead, as long as it reads back
    /// as zeroes. The default writes zero buffers.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        let _ = unmap;
        let zero = vec![0u8; (len.min(1 << 20)) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zero.len() as u64) as usize;
            self.write(at, &zero[..n], fua)?;
            at += n as u64;
        }
        Ok(())
    }
    /// The metadata contexts this export offers.
    fn meta_contexts(&self) -> Vec<&'static str> {
        vec![BASE_ALLOCATION]
    }
    /// The count of its connections and its fence; `None`: not counted, never fenced.
    fn clients(&self) -> Option<&Arc<Clients>> {
        None
    }
    /// Extents `(length, flags)` covering `offset..offset+len` in `context`.
    fn block_status(
        &self,
        _context: &str,
        _offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, ExportError> {
        // Everything allocated, nothing known to be zero.
        Ok(vec![(len, 0)])
    }
}

/// The credentials of a peer on a Unix socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
}

/// The exports a server offers, as seen by one peer; an export may come and go (a virtual
/// LU in Undefined mode is neither listed nor opened). `peer` is `None` on TCP.
pub trait Exports: Send + Sync + 'static {
    fn names(&self, peer: Option<&Peer>) -> Vec<String>;
    fn get(&self, name: &str, peer: Option<&Peer>) -> Option<Arc<dyn Export>>;
}

impl Exports for BTreeMap<String, Arc<dyn Export>> {
    fn names(&self, _peer: Option<&Peer>) -> Vec<String> {
        self.keys().cloned().collect()
    }
    fn get(&self, name: &str, _peer: Option<&Peer>) -> Option<Arc<dyn Export>> {
        BTreeMap::get(self, name).cloned()
    }
}

/// A connection's chosen export, as negotiated in the handshake.
pub(super) struct Session {
    pub(super) name: String,
    pub(super) export: Arc<dyn Export>,
    pub(super) structured: bool,
    /// Selected metadata contexts: (id, name).
    pub(super) contexts: Vec<(u32, &'static str)>,
    /// Counts this connection among the export's clients until the session is dropped
    /// (the connection's last worker ended, or it failed on the way into transmission).
    pub(super) _attached: Option<Attachment>,
}

/// What separates an export's name from a fence's ticket in the name a client asks
/// for: `NAME#fence=TICKET` opens `NAME` while the fence with `TICKET` is up.
pub const TICKET_MARK: &str = "#fence=";

/// `(export name, ticket)` of a name a client asked for.
pub fn split_ticket(name: &str) -> (&str, Option<&str>) {
    match name.split_once(TICKET_MARK) {
        Some((n, t)) => (n, Some(t)),
        None => (name, None),
    }
}

/// The name to ask for to open `export` through the fence with `ticket`.
pub fn with_ticket(export: &str, ticket: &str) -> String {
    format!("{export}{TICKET_MARK}{ticket}")
}

/// The connections in transmission on one export (across every listener), and the
/// fence that, while up, refuses new connections that do not carry its ticket.
#[derive(Debug, Default)]
pub struct Clients {
    state: Mutex<ClientsState>,
}

#[derive(Debug, Default)]
struct ClientsState {
    open: usize,
    fence: Option<String>,
}

/// One connection counted among an export's [`Clients`]; dropping it (however the
/// connection ends: a disconnect, an error, a panic unwinding its worker) uncounts it.
#[derive(Debug)]
pub struct Attachment(Arc<Clients>);

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.open = s.open.saturating_sub(1);
    }
}

/// Why a connection was not attached: the export is fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced;

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the export is being restored in place; new connections are refused until the restore ends")
    }
}

/// Equal strings, compared without an early exit (a ticket is a secret).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClientsState> {
        // Two counters: no invariant a panic could leave half-made.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    /// True while a fence is up.
    pub fn fenced(&self) -> bool {
        self.lock().fence.is_some()
    }

    /// Count one more connection, unless a fence is up and `ticket` is not its ticket.
    pub fn attach(self: &Arc<Self>, ticket: Option<&str>) -> Result<Attachment, Fenced> {
        let mut s = self.lock();
        if let Some(f) = &s.fence {
            if !ticket.is_some_and(|t| same(t, f)) {
                return Err(Fenced);
            }
        }
        s.open += 1;
        Ok(Attachment(self.clone()))
    }

    /// Put up a fence with `ticket`: from now on only connections that carry it attach.
    /// Returns the connections open at that instant and the ticket of the fence it
    /// replaced. A fence already up with another ticket is replaced only with
    /// `take_over` (its restore is gone, or forced).
    pub fn fence(&self, ticket: &str, take_over: bool) -> Result<(usize, Option<String>), String> {
        let mut s = self.lock();
        if s.fence.as_deref().is_some_and(|f| !same(f, ticket)) && !take_over {
            return Err("another restore in place holds this export's fence".into());
        }
        let replaced = s.fence.replace(ticket.to_string());
        Ok((s.open, replaced))
    }

    /// Take down the fence `ticket` put up; false (and nothing changes) if the fence up
    /// is another one or none.
    pub fn lift(&self, ticket: &str) -> bool {
        self.lift_to(ticket, None)
    }

    /// Take down the fence `ticket` put up and, in the same instant, put `previous` (the
    /// fence it replaced) back up; false (and nothing changes) if `ticket`'s is not up.
    pub fn lift_to(&self, ticket: &str, previous: Option<String>) -> bool {
        let mut s = self.lock();
        if s.fence.as_deref().is_some_and(|f| same(f, ticket)) {
            s.fence = previous;
            return true;
        }
        false
    }
}

/// Background reads yield to foreground I/O, as DRBD's resync yields to application
/// I/O down to its `c-min-rate`: an export's reads for a backup (its snapshot export)
/// share one `Yield` with the export of the database's own I/O (the virtual LU), which
/// calls [`Yield::foreground`] on each request. While the foreground had a request
/// within `busy`, background reads are paced to `floor` bytes per second across all
/// their connections; when it is quiet they run at full speed. The floor is never
/// crossed downwards, so a database that never rests still lets the backup through at
/// `floor` (a read waits at most for the bytes booked before it, at `floor`); `floor`
/// 0 never yields.
#[derive(Debug)]
pub struct Yield {
    /// Bytes per second while the foreground is busy; 0: never yield.
    floor: u64,
    busy: Duration,
    epoch: Instant,
    /// Nanoseconds from `epoch` to the foreground's last request, plus one (0: none yet).
    last_foreground: AtomicU64,
    /// When the next background byte may go, while pacing.
    next: Mutex<Instant>,
}

impl Yield {
    pub fn new(floor_bytes_per_sec: u64, busy: Duration) -> Yield {
        let epoch = Instant::now();
        Yield {
            floor: floor_bytes_per_sec,
            busy,
            epoch,
            last_foreground: AtomicU64::new(0),
            next: Mutex::new(epoch),
        }
    }

    /// The foreground made a request now.
    pub fn foreground(&self) {
        if self.floor == 0 {
            return;
        }
        let ns = self.epoch.elapsed().as_nanos() as u64 + 1;
        self.last_foreground.store(ns, Ordering::Relaxed);
    }

    /// Run a background request of `bytes`: wait as pacing requires first.
    pub fn background(&self, bytes: u64) {
        let wait = self.wait_at(Instant::now(), bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// How long a background request of `bytes` made at `now` waits (and book it).
    fn wait_at(&self, now: Instant, bytes: u64) -> Duration {
        if self.floor == 0 {
            return Duration::ZERO;
        }
        let last = self.last_foreground.load(Ordering::Relaxed);
        let since_epoch = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let busy = last != 0 && since_epoch.saturating_sub(last - 1) < self.busy.as_nanos() as u64;
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy {
            // Quiet: full speed, and no debt carried into the next busy spell.
            *next = now;
            return Duration::ZERO;
        }
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / self.floor as f64);
        start - now
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn background_reads_yield_to_a_busy_foreground_down_to_the_floor_never_below() {
        const MIB: u64 = 1 << 20;
        let y = Yield::new(64 * MIB, Duration::from_millis(50));
        let t0 = Instant::now();
        // No foreground request yet: full speed.
        assert_eq!(y.wait_at(t0, 64 * MIB), Duration::ZERO);
        // A busy foreground: reads made at one instant each wait for those booked
        // before them at the floor, so 64 reads of 1 MiB end within a second, the k-th
        // after k/64 s: paced, never starved.
        y.foreground();
        let t1 = Instant::now();
        for k in 0..64u32 {
            let w = y.wait_at(t1, MIB);
            let due = Duration::from_secs_f64(f64::from(k) / 64.0);
            assert!(
                w.abs_diff(due) < Duration::from_micros(1),
                "read {k} waits {w:?}, not {due:?}"
            );
        }
        // The foreground quiet for longer than `busy`: full speed again at once, and the
        // debt of the busy spell is forgotten.
        let later = Instant::now() + Duration::from_millis(51);
        assert_eq!(y.wait_at(later, 64 * MIB), Duration::ZERO);
        // Floor 0 never yields.
        let never = Yield::new(0, Duration::from_millis(50));
        never.foreground();
        assert_eq!(never.wait_at(Instant::now(), 64 * MIB), Duration::ZERO);
    }

    #[test]
    fn a_background_reader_under_constant_foreground_load_finishes() {
        // Threads: a foreground that never rests, and a background reader of 8 MiB at
        // a floor of 64 MiB/s; it ends (its waits add up to 1/8 s).
        let y = Arc::new(Yield::new(64 << 20, Duration::from_millis(50)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (fy, fs) = (y.clone(), stop.clone());
        let fg = std::thread::spawn(move || {
            while !fs.load(Ordering::Relaxed) {
                fy.foreground();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        for _ in 0..128 {
            y.background(64 << 10);
        }
        stop.store(true, Ordering::Relaxed);
        fg.join().unwrap();
    }

    #[test]
    fn attachments_count_until_dropped_and_a_fence_admits_its_ticket_only() {
        let c = Arc::new(Clients::default());
        let a = c.attach(None).unwrap();
        let b = c.attach(Some("x")).unwrap();
        assert_eq!(c.open(), 2);
        drop(a);
        assert_eq!(c.open(), 1);
        assert_eq!(c.fence("t1", false), Ok((1, None)));
        assert!(c.fenced());
        assert_eq!(c.attach(None).unwrap_err(), Fenced);
        assert_eq!(c.attach(Some("t2")).unwrap_err(), Fenced);
        let r = c.attach(Some("t1")).unwrap();
        assert_eq!(c.open(), 2);
        assert!(c.fence("t2", false).is_err());
        assert!(!c.lift("t2"));
        drop((b, r));
        assert_eq!(c.open(), 0);
        // A panic unwinding through a connection's owner still uncounts it.
        let c2 = c.clone();
        let _ = std::thread::spawn(move || {
            let _a = c2.attach(Some("t1")).unwrap();
            panic!("worker panics");
        })
        .join();
        assert_eq!(c.open(), 0);
        assert_eq!(c.fence("t2", true), Ok((0, Some("t1".into()))));
        assert!(c.lift_to("t2", Some("t1".into())) && c.fenced() && !c.lift("t2"));
        assert!(c.lift("t1") && !c.fenced());
        assert!(c.attach(None).is_ok());
        assert_eq!(split_ticket(&with_ticket("pg", "abc")), ("pg", Some("abc")));
        assert_eq!(split_ticket("pg"), ("pg", None));
    }
}
