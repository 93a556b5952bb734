//! Companion threads: run the second leg's write beside the calling thread's first, so a
//! mirrored write costs one leg's latency, not two. Threads start when needed, up to a
//! bound, and end after a while idle.

use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle companion thread waits for work before it ends.
const IDLE: Duration = Duration::from_secs(30);

/// A bounded set of threads that run one closure each beside their caller.
#[derive(Clone)]
pub struct Companion {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    max_threads: usize,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

/// Where a companion leaves its result; shared, so nothing on the caller's stack is
/// touched after the caller may have returned.
struct Slot<T> {
    result: Mutex<Option<std::thread::Result<T>>>,
    done: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Companion {
    /// At most `max_threads` companion threads (at least one).
    pub fn new(max_threads: usize) -> Companion {
        Companion {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                max_threads: max_threads.max(1),
            }),
        }
    }

    /// Run `here` on this thread and `there` on a companion thread, and return both
    /// results once both are done. A panic in either is resumed here after both ended.
    pub fn join<A, B, RA, RB>(&self, here: A, there: B) -> (RA, RB)
    where
        A: FnOnce() -> RA,
        B: FnOnce() -> RB + Send,
        RB: Send + 'static,
    {
        let slot = Arc::new(Slot {
            result: Mutex::new(None),
            done: Condvar::new(),
        });
        let theirs = Arc::clone(&slot);
        let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
            let r = catch_unwind(AssertUnwindSafe(there));
            let mut g = lock(&theirs.result);
            *g = Some(r);
            theirs.done.notify_one();
        });
        // SAFETY: the job borrows from this call's caller (`there`'s captures). It is
        // erased to 'static only to cross the queue: this function neither returns nor
        // unwinds before the job has stored its result, which is the job's last use of
        // anything borrowed (below, `wait` runs even when `here` panicked).
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
        let queued = self.submit(job);
        let mine = catch_unwind(AssertUnwindSafe(here));
        if let Some(job) = queued {
            job();
        }
        let theirs = {
            let mut g = lock(&slot.result);
            loop {
                if let Some(r) = g.take() {
                    break r;
                }
                g = slot.done.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
        };
        match (mine, theirs) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(p), _) | (_, Err(p)) => resume_unwind(p),
        }
    }

    /// Queue `job` for a companion, starting one if none is idle. Gives the job back when
    /// no thread can take it (none may be started), for the caller to run itself.
    fn submit(&self, job: Job) -> Option<Job> {
        let mut s = lock(&self.inner.state);
        if s.idle == 0 && s.threads < self.inner.max_threads {
            let inner = Arc::clone(&self.inner);
            let started = std::thread::Builder::new()
                .name("hvm-companion".into())
                .spawn(move || inner.serve());
            if started.is_ok() {
                s.threads += 1;
            } else if s.threads == 0 {
                return Some(job);
            }
        }
        s.jobs.push_back(job);
        drop(s);
        self.inner.work.notify_one();
        None
    }

    /// Companion threads running now.
    pub fn threads(&self) -> usize {
        lock(&self.inner.state).threads
    }
}

impl Inner {
    fn serve(&self) {
        let mut s = lock(&self.state);
        loop {
            if let Some(job) = s.jobs.pop_front() {
                drop(s);
                job();
                s = lock(&self.state);
                continue;
            }
            s.idle += 1;
            let (g, timeout) = self
                .work
                .wait_timeout(s, IDLE)
                .unwrap_or_else(PoisonError::into_inner);
            s = g;
            s.idle -= 1;
            if timeout.timed_out() && s.jobs.is_empty() {
                s.threads -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn both_sides_run_at_once_and_borrow_from_the_caller() {
        let c = Companion::new(4);
        let data = vec![7u8; 1024];
        // Each side waits for the other: this only finishes if they run concurrently.
        let meet = Barrier::new(2);
        let (a, b) = c.join(
            || {
                meet.wait();
                data.len()
            },
            || {
                meet.wait();
                data.iter().map(|&x| usize::from(x)).sum::<usize>()
            },
        );
        assert_eq!((a, b), (1024, 7 * 1024));
    }

    #[test]
    fn many_callers_share_a_bounded_set_of_threads() {
        let c = Companion::new(3);
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let (_, _) = c.join(
                            || count.fetch_add(1, Ordering::Relaxed),
                            || count.fetch_add(1, Ordering::Relaxed),
                        );
                    }
                });
            }
        });
        assert_eq!(count.load(Ordering::Relaxed), 16 * 200 * 2);
        assert!(c.threads() <= 3, "{} threads", c.threads());
    }

    #[test]
    fn a_panic_on_the_companion_reaches_the_caller_after_both_ended() {
        let c = Companion::new(1);
        let here_done = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            c.join(
                || here_done.fetch_add(1, Ordering::SeqCst),
                || -> usize { panic!("leg b") },
            )
        }));
        assert!(r.is_err());
        assert_eq!(here_done.load(Ordering::SeqCst), 1);
        // The pool still works.
        assert_eq!(c.join(|| 1, || 2), (1, 2));
    }
}
