//! A transport that re-establishes its link when the array comes back.
//!
//! [`Reconnecting`] holds one link made by a [`Connector`]. A link that fails (closed,
//! timed out, unreadable) is dropped; the next command makes a new one, but not before
//! the backoff since the last failed attempt has passed (100 ms, doubling to 5 s), so a
//! dead array costs a caller an immediate error, not a connect attempt per command.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::transport::{Response, Transport, TransportError};

/// Makes links to one array.
pub trait Connector: Send + Sync {
    type Link: Transport;

    /// A new link, ready for commands.
    fn connect(&self) -> Result<Self::Link, TransportError>;

    /// Where the array is, for messages.
    fn name(&self) -> String;
}

/// First wait after a failed attempt to reconnect.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct State<L> {
    link: Option<Arc<L>>,
    failed_attempts: u32,
    next_attempt: Instant,
    last_error: Option<TransportError>,
}

/// A [`Transport`] over the link of a [`Connector`], reconnecting with backoff.
pub struct Reconnecting<C: Connector> {
    connector: C,
    state: Mutex<State<C::Link>>,
}

impl<C: Connector> std::fmt::Debug for Reconnecting<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting")
            .field("array", &self.connector.name())
            .finish_non_exhaustive()
    }
}

/// The wait after `n` failed attempts in a row.
pub(crate) fn backoff(n: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

impl<C: Connector> Reconnecting<C> {
    /// Connect now: an array that cannot be reached at open is an error.
    pub fn connect(connector: C) -> Result<Self, TransportError> {
        let link = connector.connect()?;
        Ok(Reconnecting {
            connector,
            state: Mutex::new(State {
                link: Some(Arc::new(link)),
                failed_attempts: 0,
                next_attempt: Instant::now(),
                last_error: None,
            }),
        })
    }

    pub fn connector(&self) -> &C {
        &self.connector
    }

    /// The present link, or a new one if the backoff allows an attempt.
    fn link(&self) -> Result<Arc<C::Link>, TransportError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = &s.link {
            return Ok(l.clone());
        }
        let now = Instant::now();
        if now < s.next_attempt {
            let why = s
                .last_error
                .as_ref()
                .map_or(String::new(), |e| format!("{e}; "));
            return Err(TransportError::Unreachable(format!(
                "{}: {why}next attempt to reconnect in {:?}",
                self.connector.name(),
                s.next_attempt - now
            )));
        }
        match self.connector.connect() {
            Ok(l) => {
                let l = Arc::new(l);
                s.link = Some(l.clone());
                s.failed_attempts = 0;
                s.last_error = None;
                Ok(l)
            }
            Err(e) => {
                s.failed_attempts += 1;
                s.next_attempt = now + backoff(s.failed_attempts);
                s.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Drop `link` after it failed with `e`, unless another thread already replaced it.
    fn failed(&self, link: &Arc<C::Link>, e: &TransportError) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            s.link = None;
            s.failed_attempts = 0;
            s.next_attempt = Instant::now();
            s.last_error = Some(e.clone());
        }
    }

    fn run(
        &self,
        f: impl FnOnce(&C::Link) -> Result<Response, TransportError>,
    ) -> Result<Response, TransportError> {
        let link = self.link()?;
        let r = f(&link);
        if let Err(e) = &r {
            self.failed(&link, e);
        }
        r
    }
}

impl<C: Connector> Transport for Reconnecting<C> {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError> {
        self.run(|l| l.execute(lun, cdb, data_out))
    }

    fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Response, TransportError> {
        self.run(|l| l.execute_into(lun, cdb, data_out, data_in))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// An array that can be switched off: links made while it is off fail to connect,
    /// and a link made before fails its commands.
    #[derive(Default)]
    struct Switch {
        off: Arc<AtomicBool>,
        connects: AtomicU32,
    }
    struct Link(Arc<AtomicBool>);
    impl Transport for Link {
        fn execute(&self, _: u8, _: &[u8], _: &[u8]) -> Result<Response, TransportError> {
            if self.0.load(Ordering::SeqCst) {
                Err(TransportError::Disconnected)
            } else {
                Ok(Response::good(vec![1]))
            }
        }
    }
    impl Connector for Switch {
        type Link = Link;
        fn connect(&self) -> Result<Link, TransportError> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            if self.off.load(Ordering::SeqCst) {
                return Err(TransportError::Send("refused".into()));
            }
            Ok(Link(self.off.clone()))
        }
        fn name(&self) -> String {
            "switch".into()
        }
    }

    #[test]
    fn a_failed_link_is_replaced_after_the_backoff() {
        let r = Reconnecting::connect(Switch::default()).unwrap();
        assert!(r.execute(0, &[0], &[]).is_ok());
        r.connector().off.store(true, Ordering::SeqCst);
        assert_eq!(r.execute(0, &[0], &[]), Err(TransportError::Disconnected));
        // The first attempt is immediate and fails; the next one waits for the backoff.
        assert_eq!(
            r.execute(0, &[0], &[]),
            Err(TransportError::Send("refused".into()))
        );
        let e = r.execute(0, &[0], &[]).unwrap_err();
        assert!(
            matches!(&e, TransportError::Unreachable(m) if m.contains("refused")),
            "{e}"
        );
        assert_eq!(r.connector().connects.load(Ordering::SeqCst), 2);
        r.connector().off.store(false, Ordering::SeqCst);
        std::thread::sleep(FIRST_BACKOFF);
        assert_eq!(r.execute(0, &[0], &[]), Ok(Response::good(vec![1])));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
