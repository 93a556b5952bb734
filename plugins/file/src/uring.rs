//! Mirrored writes through io_uring: one ring per calling thread, so a mirrored write
//! submits both legs' writes with one system call and waits for both, without a second
//! thread.
//!
//! Safety rule of this module: once an SQE is in the ring, the function that pushed it
//! does not return until its completion has been reaped, so the kernel never touches a
//! buffer after its borrow ended.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

/// Completion queue entries per ring; two are used at a time.
const ENTRIES: u32 = 8;

/// `pwritev2`'s per-write O_DSYNC: the data and what is needed to read it back are on
/// stable storage when the write completes (how a FUA write is done on a file).
pub const RWF_DSYNC: i32 = 0x2;

/// One write.
pub enum Io {
    Write {
        fd: RawFd,
        buf: *const u8,
        len: usize,
        offset: u64,
        flags: i32,
    },
}

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Whether this kernel lets us set up a ring (a seccomp filter may forbid it).
pub fn available() -> io::Result<()> {
    IoUring::new(ENTRIES).map(|_| ())
}

/// Run every I/O of `ios` at once and wait for all. Each result is the byte count the
/// kernel reported (it may be short; the caller finishes a short one).
///
/// # Safety
/// Every pointer and length must describe memory that stays valid (and, for reads,
/// writable and not otherwise accessed) until this returns; `fd`s must be open.
pub unsafe fn run<const N: usize>(ios: [Io; N]) -> [io::Result<usize>; N] {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match IoUring::new(ENTRIES) {
                Ok(r) => *slot = Some(r),
                Err(e) => {
                    return std::array::from_fn(|_| Err(io::Error::new(e.kind(), e.to_string())))
                }
            }
        }
        let ring = slot.as_mut().expect("ring was just set");
        // SAFETY: forwarded from the caller's contract.
        match unsafe { push_all(ring, &ios) } {
            Ok(()) => wait_all(ring),
            Err(e) => {
                // Nothing was submitted (io_uring_enter fails only when it consumed no
                // entry): drop the ring and its unsubmitted entries.
                *slot = None;
                std::array::from_fn(|_| Err(io::Error::new(e.kind(), e.to_string())))
            }
        }
    })
}

/// Push the SQEs and submit them, retrying interrupted submissions.
///
/// # Safety
/// As [`run`].
unsafe fn push_all<const N: usize>(ring: &mut IoUring, ios: &[Io; N]) -> io::Result<()> {
    for (i, io) in ios.iter().enumerate() {
        let sqe = match *io {
            Io::Write {
                fd,
                buf,
                len,
                offset,
                flags,
            } => opcode::Write::new(types::Fd(fd), buf, len as u32)
                .offset(offset)
                .rw_flags(flags)
                .build(),
        };
        // SAFETY: the buffers outlive the I/O (the caller's contract; `run` waits).
        unsafe { ring.submission().push(&sqe.user_data(i as u64)) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    loop {
        match ring.submit() {
            Ok(_) => return Ok(()),
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Reap exactly N completions. Never returns before every submitted I/O completed: on an
/// unexpected error it waits and tries again rather than free a buffer in flight.
fn wait_all<const N: usize>(ring: &mut IoUring) -> [io::Result<usize>; N] {
    let mut out: [Option<io::Result<usize>>; N] = std::array::from_fn(|_| None);
    let mut left = N;
    while left > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            if !retry(&e) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            let r = cqe.result();
            if i < N && out[i].is_none() {
                out[i] = Some(if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                });
                left -= 1;
            }
        }
    }
    out.map(|r| r.unwrap_or_else(|| Err(io::Error::other("no completion"))))
}
