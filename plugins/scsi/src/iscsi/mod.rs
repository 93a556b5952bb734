//! The iSCSI transport: a real SCSI target through libiscsi (`iscsi://HOST[:PORT]/IQN/LUN`).
//!
//! One [`IscsiTransport`] is one iSCSI session to one target (portal and IQN); the LUN is
//! given per command. libiscsi's asynchronous interface runs on the session's own event
//! thread: callers queue commands and wait for their answers, so as many commands are in
//! flight as there are callers. libiscsi's automatic reconnect is off; the event thread
//! does its own: a session that fails (a command unanswered within the timeout, the
//! connection lost) is torn down, every command on it fails, and the next command logs in
//! again, at once after a working session failed and with backoff (100 ms doubling to
//! 5 s) after failed logins, so a dead target costs a caller an immediate error.
//!
//! SIGPIPE: a write to a target that went away raises it; Rust programs (host-agent, the
//! tests) ignore it from start-up, so it becomes an error of the send.

mod ffi;

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_void};
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cdb::Command;
use crate::client::BLOCK_SIZE;
use crate::reconnect::backoff;
use crate::sense::{Sense, SenseKey, CHECK_CONDITION};
use crate::transport::{Response, Submission, Transport, TransportError, TwoResults};

/// The default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
/// The initiator name unless the parameters give one.
pub const DEFAULT_INITIATOR: &str = "iqn.2026-12.invalid.hvm:host-agent";

/// `iscsi://[USER%PASSWORD@]HOST[:PORT]/IQN/LUN`: a LUN of a target, with optional CHAP
/// credentials (libiscsi's URL form).
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub host: String,
    pub port: u16,
    pub iqn: String,
    pub lun: u8,
    pub chap: Option<(String, String)>,
}

impl std::fmt::Debug for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for IscsiUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<IscsiUrl, String> {
        let bad = |why: &str| format!("{s:?}: {why}; expected iscsi://HOST[:PORT]/IQN/LUN");
        let rest = s
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("not an iscsi:// URL"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no target"))?;
        let (chap, hostport) = match authority.rsplit_once('@') {
            Some((cred, hp)) => {
                let (u, p) = cred
                    .split_once('%')
                    .ok_or_else(|| bad("CHAP is USER%PASSWORD@"))?;
                (Some((u.to_string(), p.to_string())), hp)
            }
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
            None => (hostport, DEFAULT_PORT),
        };
        let (iqn, lun) = path.rsplit_once('/').ok_or_else(|| bad("no LUN"))?;
        if host.is_empty() || iqn.is_empty() {
            return Err(bad("empty host or IQN"));
        }
        Ok(IscsiUrl {
            host: host.to_string(),
            port,
            iqn: iqn.to_string(),
            lun: lun.parse().map_err(|_| bad("LUN must be 0-255"))?,
            chap,
        })
    }
}

impl std::fmt::Display for IscsiUrl {
    /// The URL without the CHAP password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = self
            .chap
            .as_ref()
            .map_or(String::new(), |(u, _)| format!("{u}@"));
        write!(
            f,
            "iscsi://{user}{}:{}/{}/{}",
            self.host, self.port, self.iqn, self.lun
        )
    }
}

impl IscsiUrl {
    /// `HOST:PORT`, as libiscsi takes a portal.
    pub fn portal(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The session this URL's LUN is reached through: the same for every LUN of a target.
    pub fn session_key(&self) -> (String, String) {
        (self.portal(), self.iqn.clone())
    }
}

/// How a session logs in and how long a command may take.
#[derive(Clone, Debug)]
pub struct IscsiOptions {
    pub timeout: Duration,
    pub initiator: String,
}

impl Default for IscsiOptions {
    fn default() -> Self {
        IscsiOptions {
            timeout: crate::socket::DEFAULT_TIMEOUT,
            initiator: DEFAULT_INITIATOR.to_string(),
        }
    }
}

/// The answer to a job: the response (without data) and the bytes of data-in received.
type Answer = Result<(Response, usize), TransportError>;
type Reply = mpsc::Sender<Answer>;

/// The caller's buffers of a command. libiscsi reads and fills them in place, so a
/// command costs no copy. They stay valid while the job is out: the caller waits for its
/// reply without a timeout of its own, and the event thread replies only once libiscsi is
/// done with the buffers (the command's callback ran, or its context was destroyed).
struct Buffers {
    data_out: *const u8,
    data_out_len: usize,
    data_in: *mut u8,
    data_in_len: usize,
}

// The pointers are only dereferenced by libiscsi on the event thread, while the caller
// that owns the buffers waits for the reply.
unsafe impl Send for Buffers {}

/// A command queued for the event thread.
struct Job {
    lun: u8,
    cdb: Vec<u8>,
    buffers: Buffers,
    deadline: Instant,
    reply: Reply,
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    stop: AtomicBool,
}

/// One iSCSI session to a target; see the module documentation.
pub struct IscsiTransport {
    shared: Arc<Shared>,
    wake: UnixStream,
    timeout: Duration,
    name: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for IscsiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiTransport")
            .field("target", &self.name)
            .finish_non_exhaustive()
    }
}

impl IscsiTransport {
    /// Start the session's event thread and log in (with TEST UNIT READY to `url`'s LUN):
    /// a target that cannot be reached at open is an error.
    pub fn connect(url: &IscsiUrl, opts: &IscsiOptions) -> Result<IscsiTransport, TransportError> {
        let (wake, wake_rx) =
            UnixStream::pair().map_err(|e| TransportError::Send(e.to_string()))?;
        for s in [&wake, &wake_rx] {
            s.set_nonblocking(true)
                .map_err(|e| TransportError::Send(e.to_string()))?;
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
        });
        let mut ev = EventLoop::new(url.clone(), opts.clone(), shared.clone(), wake_rx)?;
        let thread = std::thread::Builder::new()
            .name("iscsi-event".into())
            .spawn(move || ev.run())
            .map_err(|e| TransportError::Send(e.to_string()))?;
        let t = IscsiTransport {
            shared,
            wake,
            timeout: opts.timeout,
            name: format!("iscsi://{}/{}", url.portal(), url.iqn),
            thread: Some(thread),
        };
        t.execute(url.lun, &Command::TestUnitReady.encode(), &[])?;
        Ok(t)
    }

    /// A job for one command with `data_out` and up to `data_in.len()` bytes of data-in,
    /// and where its answer comes. The buffers must stay until the answer is received.
    fn job(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> (Job, mpsc::Receiver<Answer>) {
        let (tx, rx) = mpsc::channel();
        let job = Job {
            lun,
            cdb: cdb.to_vec(),
            buffers: Buffers {
                data_out: data_out.as_ptr(),
                data_out_len: data_out.len(),
                data_in: data_in.as_mut_ptr(),
                data_in_len: data_in.len(),
            },
            deadline: Instant::now() + self.timeout,
            reply: tx,
        };
        (job, rx)
    }

    /// Queue `jobs` for the event thread.
    fn queue(&self, jobs: impl IntoIterator<Item = Job>) {
        let was_empty = {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            let before = q.len();
            q.extend(jobs);
            before == 0
        };
        // The event thread takes the whole queue once woken: only the first job of a
        // batch needs to wake it.
        if was_empty {
            let _ = (&self.wake).write(&[1]);
        }
    }

    /// The answer to a queued job. The event thread answers every job by its deadline (it
    /// checks them every 50 ms), and only once libiscsi no longer uses the buffers: so no
    /// timeout here.
    fn answer(rx: &mpsc::Receiver<Answer>) -> Answer {
        rx.recv().unwrap_or(Err(TransportError::Disconnected))
    }

    /// Run one command; the bytes of data-in received come back beside the response.
    fn submit(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<(Response, usize), TransportError> {
        let (job, rx) = self.job(lun, cdb, data_out, data_in);
        self.queue([job]);
        Self::answer(&rx)
    }
}

impl Drop for IscsiTransport {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes of data-in a CDB asks for, for the commands the client sends.
fn data_in_len(cdb: &[u8]) -> usize {
    Command::parse(cdb).map_or(0, |c| c.data_in_len(BLOCK_SIZE) as usize)
}

impl Transport for IscsiTransport {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError> {
        let mut data = vec![0u8; data_in_len(cdb)];
        let (mut r, n) = self.submit(lun, cdb, data_out, &mut data)?;
        data.truncate(n);
        r.data = data;
        Ok(r)
    }

    fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Response, TransportError> {
        let (r, n) = self.submit(lun, cdb, data_out, data_in)?;
        if r.status == 0 && n != data_in.len() {
            return Err(TransportError::Protocol(format!(
                "{n} bytes of data-in, expected {}",
                data_in.len()
            )));
        }
        Ok(r)
    }

    /// Both commands go to the event thread together and are in flight at once.
    fn execute_two(&self, a: Submission<'_>, b: Submission<'_>) -> Option<TwoResults> {
        let (ja, ra) = self.job(a.lun, a.cdb, a.data_out, &mut []);
        let (jb, rb) = self.job(b.lun, b.cdb, b.data_out, &mut []);
        self.queue([ja, jb]);
        Some([&ra, &rb].map(|rx| Self::answer(rx).map(|(r, _)| r)))
    }
}

/// A command libiscsi holds, until its callback has run.
struct InFlight {
    task: *mut ffi::ScsiTask,
    _iscsi_data: Box<ffi::IscsiData>,
    reply: Option<Reply>,
    deadline: Instant,
    /// Its deadline passed: the reply is a timeout, sent once libiscsi let go of it.
    timed_out: bool,
}

/// What libiscsi's callbacks report; they run inside `iscsi_service` and
/// `iscsi_destroy_context` on the event thread and only record.
#[derive(Default)]
struct Events {
    connected: Option<c_int>,
    done: Vec<(u64, c_int)>,
}

/// Where the session is.
enum State {
    Down {
        failed_logins: u32,
        next_attempt: Instant,
        why: Option<String>,
    },
    LoggingIn {
        deadline: Instant,
        waiting: Vec<Job>,
    },
    Up,
}

struct EventLoop {
    url: IscsiUrl,
    opts: IscsiOptions,
    shared: Arc<Shared>,
    wake: UnixStream,
    ctx: *mut ffi::IscsiContext,
    state: State,
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    events: Box<Events>,
}

// The raw pointers are only used on the event thread, which owns the loop.
unsafe impl Send for EventLoop {}

unsafe extern "C" fn connect_cb(
    _iscsi: *mut ffi::IscsiContext,
    status: c_int,
    _data: *mut c_void,
    private: *mut c_void,
) {
    // SAFETY: `private` is the loop's boxed `Events`, alive while its context is.
    let ev = unsafe { &mut *private.cast::<Events>() };
    ev.connected = Some(status);
}

/// The id of a command rides in the task's private pointer; the events in `EVENTS`.
unsafe extern "C" fn command_cb(
    _iscsi: *mut ffi::IscsiContext,
    status: c_int,
    _data: *mut c_void,
    private: *mut c_void,
) {
    EVENTS.with(|e| {
        let ev = e.get();
        if !ev.is_null() {
            // SAFETY: set by the event loop around every libiscsi call on this thread.
            unsafe { (*ev).done.push((private as u64, status)) };
        }
    });
}

thread_local! {
    static EVENTS: std::cell::Cell<*mut Events> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

fn cstring(s: &str) -> Result<CString, TransportError> {
    CString::new(s).map_err(|_| TransportError::Send(format!("{s:?} holds a NUL byte")))
}

impl EventLoop {
    fn new(
        url: IscsiUrl,
        opts: IscsiOptions,
        shared: Arc<Shared>,
        wake: UnixStream,
    ) -> Result<EventLoop, TransportError> {
        Ok(EventLoop {
            url,
            opts,
            shared,
            wake,
            ctx: std::ptr::null_mut(),
            state: State::Down {
                failed_logins: 0,
                next_attempt: Instant::now(),
                why: None,
            },
            in_flight: HashMap::new(),
            next_id: 1,
            events: Box::default(),
        })
    }

    fn run(&mut self) {
        EVENTS.with(|e| e.set(&mut *self.events));
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.take_jobs();
            self.wait_and_service();
            self.handle_events();
            self.check_deadlines();
        }
        self.teardown("the session is closed".into());
        self.fail_waiting(&TransportError::Disconnected);
        EVENTS.with(|e| e.set(std::ptr::null_mut()));
    }

    fn error_text(&self) -> String {
        if self.ctx.is_null() {
            return "no context".into();
        }
        // SAFETY: ctx is a live context; libiscsi returns a NUL-terminated string.
        let p = unsafe { ffi::iscsi_get_error(self.ctx) };
        if p.is_null() {
            return "unknown libiscsi error".into();
        }
        // SAFETY: as above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn take_jobs(&mut self) {
        let jobs: Vec<Job> = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for job in jobs {
            self.accept(job);
        }
    }

    fn accept(&mut self, job: Job) {
        match &mut self.state {
            State::Up => self.send(job),
            State::LoggingIn { waiting, .. } => waiting.push(job),
            State::Down {
                next_attempt, why, ..
            } => {
                let now = Instant::now();
                if now < *next_attempt {
                    let why = why.clone().unwrap_or_default();
                    let msg = format!(
                        "{}: {why}; next login attempt in {:?}",
                        self.url.portal(),
                        *next_attempt - now
                    );
                    let _ = job.reply.send(Err(TransportError::Unreachable(msg)));
                    return;
                }
                match self.login() {
                    Ok(()) => {
                        self.state = State::LoggingIn {
                            deadline: now + self.opts.timeout,
                            waiting: vec![job],
                        };
                    }
                    Err(e) => {
                        let _ = job.reply.send(Err(e.clone()));
                        self.login_failed(e.to_string());
                    }
                }
            }
        }
    }

    /// Make a context and start its login.
    fn login(&mut self) -> Result<(), TransportError> {
        let initiator = cstring(&self.opts.initiator)?;
        let target = cstring(&self.url.iqn)?;
        let portal = cstring(&self.url.portal())?;
        // SAFETY: plain libiscsi calls on a context this thread creates and owns.
        unsafe {
            let ctx = ffi::iscsi_create_context(initiator.as_ptr());
            if ctx.is_null() {
                return Err(TransportError::Send("iscsi_create_context failed".into()));
            }
            self.ctx = ctx;
            ffi::iscsi_set_targetname(ctx, target.as_ptr());
            ffi::iscsi_set_session_type(ctx, ffi::ISCSI_SESSION_NORMAL);
            ffi::iscsi_set_header_digest(ctx, ffi::ISCSI_HEADER_DIGEST_NONE);
            ffi::iscsi_set_noautoreconnect(ctx, 1);
            // libiscsi's own timeout is a backstop a second after ours.
            let secs = self.opts.timeout.as_secs().saturating_add(1).min(3600) as c_int;
            ffi::iscsi_set_timeout(ctx, secs);
            if let Some((u, p)) = &self.url.chap {
                let (u, p) = (cstring(u)?, cstring(p)?);
                ffi::iscsi_set_initiator_username_pwd(ctx, u.as_ptr(), p.as_ptr());
            }
            self.events.connected = None;
            let events: *mut Events = &mut *self.events;
            let rc = ffi::iscsi_full_connect_async(
                ctx,
                portal.as_ptr(),
                c_int::from(self.url.lun),
                connect_cb,
                events.cast(),
            );
            if rc != 0 {
                let e = TransportError::Send(format!(
                    "cannot connect to {}: {}",
                    self.url.portal(),
                    self.error_text()
                ));
                self.destroy_context();
                return Err(e);
            }
        }
        Ok(())
    }

    fn login_failed(&mut self, why: String) {
        let failed_logins = match &self.state {
            State::Down { failed_logins, .. } => failed_logins + 1,
            _ => 1,
        };
        self.state = State::Down {
            failed_logins,
            next_attempt: Instant::now() + backoff(failed_logins),
            why: Some(why),
        };
    }

    /// Queue one command on the logged-in session.
    fn send(&mut self, job: Job) {
        let b = &job.buffers;
        let (dir, len) = if b.data_out_len > 0 {
            (ffi::SCSI_XFER_WRITE, b.data_out_len)
        } else if b.data_in_len > 0 {
            (ffi::SCSI_XFER_READ, b.data_in_len)
        } else {
            (ffi::SCSI_XFER_NONE, 0)
        };
        let mut cdb = job.cdb.clone();
        let id = self.next_id;
        self.next_id += 1;
        let mut f = InFlight {
            task: std::ptr::null_mut(),
            // libiscsi only reads data-out, through this non-const pointer.
            _iscsi_data: Box::new(ffi::IscsiData {
                size: b.data_out_len,
                data: b.data_out.cast_mut(),
            }),
            reply: Some(job.reply),
            deadline: job.deadline,
            timed_out: false,
        };
        let data_in = b.data_in;
        // SAFETY: the task and every buffer it points to live in `f` until its callback.
        let rc = unsafe {
            let task =
                ffi::scsi_create_task(cdb.len() as c_int, cdb.as_mut_ptr(), dir, len as c_int);
            if task.is_null() {
                -1
            } else {
                f.task = task;
                if dir == ffi::SCSI_XFER_READ {
                    ffi::scsi_task_add_data_in_buffer(task, len as c_int, data_in);
                }
                let data: *mut ffi::IscsiData = if dir == ffi::SCSI_XFER_WRITE {
                    &mut *f._iscsi_data
                } else {
                    std::ptr::null_mut()
                };
                ffi::iscsi_scsi_command_async(
                    self.ctx,
                    c_int::from(job.lun),
                    task,
                    command_cb,
                    data,
                    id as *mut c_void,
                )
            }
        };
        if rc != 0 {
            let e = TransportError::Send(format!("cannot queue a command: {}", self.error_text()));
            if !f.task.is_null() {
                // SAFETY: libiscsi did not take the task.
                unsafe { ffi::scsi_free_scsi_task(f.task) };
            }
            if let Some(r) = f.reply.take() {
                let _ = r.send(Err(e));
            }
            return;
        }
        self.in_flight.insert(id, f);
    }

    fn wait_and_service(&mut self) {
        let mut fds = vec![ffi::PollFd {
            fd: self.wake.as_raw_fd(),
            events: ffi::POLLIN,
            revents: 0,
        }];
        if !self.ctx.is_null() {
            // SAFETY: live context.
            let (fd, ev) = unsafe {
                (
                    ffi::iscsi_get_fd(self.ctx),
                    ffi::iscsi_which_events(self.ctx),
                )
            };
            if fd >= 0 {
                fds.push(ffi::PollFd {
                    fd,
                    events: ev as i16,
                    revents: 0,
                });
            }
        }
        // SAFETY: `fds` is a valid array of pollfd for the call.
        unsafe { ffi::poll(fds.as_mut_ptr(), fds.len() as u64, 50) };
        if fds[0].revents != 0 {
            let mut buf = [0u8; 64];
            while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        }
        if self.ctx.is_null() {
            return;
        }
        let revents = fds.get(1).map_or(0, |f| c_int::from(f.revents));
        // SAFETY: live context; callbacks only record into `self.events`.
        if unsafe { ffi::iscsi_service(self.ctx, revents) } < 0 {
            let why = self.error_text();
            self.session_failed(format!("the session failed: {why}"));
        }
    }

    fn handle_events(&mut self) {
        if let Some(status) = self.events.connected.take() {
            match (&mut self.state, status) {
                (State::LoggingIn { waiting, .. }, ffi::SCSI_STATUS_GOOD) => {
                    let waiting = std::mem::take(waiting);
                    self.state = State::Up;
                    for job in waiting {
                        self.send(job);
                    }
                }
                (State::LoggingIn { .. }, _) => {
                    let why = format!("login to {} failed: {}", self.url, self.error_text());
                    self.destroy_context();
                    self.fail_waiting(&TransportError::Send(why.clone()));
                    self.login_failed(why);
                }
                (_, _) => {
                    let why = self.error_text();
                    self.session_failed(format!("the connection failed: {why}"));
                }
            }
        }
        for (id, status) in std::mem::take(&mut self.events.done) {
            self.complete(id, status);
        }
    }

    fn complete(&mut self, id: u64, status: c_int) {
        let Some(mut f) = self.in_flight.remove(&id) else {
            return;
        };
        // SAFETY: libiscsi hands the task back in this callback; read, then free it.
        let result = unsafe {
            let t = &*f.task;
            let r = match status {
                ffi::SCSI_STATUS_CANCELLED => Err(TransportError::Disconnected),
                ffi::SCSI_STATUS_TIMEOUT => Err(TransportError::Timeout(self.opts.timeout)),
                s if !(0..=0xff).contains(&s) => {
                    Err(TransportError::Protocol(format!("libiscsi status {s:#x}")))
                }
                s => {
                    let expected = usize::try_from(t.expxferlen).unwrap_or(0);
                    let received = if t.residual_status == ffi::SCSI_RESIDUAL_UNDERFLOW {
                        expected.saturating_sub(t.residual)
                    } else {
                        expected
                    };
                    let sense = (s == c_int::from(CHECK_CONDITION)).then(|| {
                        let key = SenseKey::from_u8((t.sense.key & 0x0f) as u8)
                            .unwrap_or(SenseKey::VendorSpecific);
                        Sense::new(key, (t.sense.ascq >> 8) as u8, t.sense.ascq as u8)
                    });
                    let received = if t.xfer_dir == ffi::SCSI_XFER_READ {
                        received
                    } else {
                        0
                    };
                    Ok((
                        Response {
                            status: s as u8,
                            sense,
                            data: Vec::new(),
                        },
                        received,
                    ))
                }
            };
            ffi::scsi_free_scsi_task(f.task);
            r
        };
        let broken = result.as_ref().err().map(ToString::to_string);
        if let Some(reply) = f.reply.take() {
            let _ = reply.send(result);
        }
        if let Some(why) = broken {
            self.session_failed(why);
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        if let State::LoggingIn { deadline, .. } = &self.state {
            if now >= *deadline {
                let why = format!(
                    "no login answer from {} within {:?}",
                    self.url.portal(),
                    self.opts.timeout
                );
                self.destroy_context();
                self.fail_waiting(&TransportError::Timeout(self.opts.timeout));
                self.login_failed(why);
            }
            return;
        }
        let mut late = false;
        for f in self.in_flight.values_mut() {
            if now >= f.deadline {
                f.timed_out = true;
                late = true;
            }
        }
        if !late {
            return;
        }
        self.session_failed(format!(
            "a command had no answer within {:?}",
            self.opts.timeout
        ));
    }

    /// A logged-in session failed: end it; the next command logs in again.
    fn session_failed(&mut self, why: String) {
        self.teardown(why.clone());
        self.state = State::Down {
            failed_logins: 0,
            next_attempt: Instant::now(),
            why: Some(why),
        };
    }

    /// Destroy the context; libiscsi cancels every command on it, and each still waiting
    /// gets an error.
    fn teardown(&mut self, why: String) {
        self.destroy_context();
        for (_, mut f) in self.in_flight.drain() {
            // Never called back: libiscsi freed nothing of ours; free the task.
            if !f.task.is_null() {
                // SAFETY: the context is gone, nothing refers to the task any more.
                unsafe { ffi::scsi_free_scsi_task(f.task) };
            }
            if let Some(r) = f.reply.take() {
                let e = if f.timed_out {
                    TransportError::Timeout(self.opts.timeout)
                } else {
                    TransportError::Unreachable(why.clone())
                };
                let _ = r.send(Err(e));
            }
        }
    }

    fn destroy_context(&mut self) {
        if self.ctx.is_null() {
            return;
        }
        // SAFETY: live context; its callbacks run now and record into `self.events`.
        unsafe { ffi::iscsi_destroy_context(self.ctx) };
        self.ctx = std::ptr::null_mut();
        self.events.connected = None;
        for (id, status) in std::mem::take(&mut self.events.done) {
            self.complete_cancelled(id, status);
        }
    }

    /// A command cancelled with its context: free the task, fail the caller.
    fn complete_cancelled(&mut self, id: u64, _status: c_int) {
        if let Some(mut f) = self.in_flight.remove(&id) {
            // SAFETY: libiscsi called back for this task; it is ours to free.
            unsafe { ffi::scsi_free_scsi_task(f.task) };
            if let Some(r) = f.reply.take() {
                let e = if f.timed_out {
                    TransportError::Timeout(self.opts.timeout)
                } else {
                    TransportError::Disconnected
                };
                let _ = r.send(Err(e));
            }
        }
    }

    fn fail_waiting(&mut self, e: &TransportError) {
        if let State::LoggingIn { waiting, .. } = &mut self.state {
            for job in waiting.drain(..) {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: IscsiUrl = "iscsi://127.0.0.1:3261/iqn.2024-01.local.test:tgt-1/2"
            .parse()
            .unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.iqn.as_str(), u.lun),
            ("127.0.0.1", 3261, "iqn.2024-01.local.test:tgt-1", 2)
        );
        assert_eq!(
            u.to_string(),
            "iscsi://127.0.0.1:3261/iqn.2024-01.local.test:tgt-1/2"
        );
        let c: IscsiUrl = "iscsi://me%secret@host/iqn.x:y/0".parse().unwrap();
        assert_eq!(c.port, DEFAULT_PORT);
        assert_eq!(c.chap, Some(("me".into(), "secret".into())));
        assert!(!c.to_string().contains("secret"));
        for bad in [
            "iscsi://host/iqn",
            "nbd://h/x/1",
            "iscsi://host/iqn/300",
            "iscsi:///iqn/1",
        ] {
            assert!(bad.parse::<IscsiUrl>().is_err(), "{bad}");
        }
    }
}
