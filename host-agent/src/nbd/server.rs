//! The NBD server: the accept loops (Unix socket with peer credentials, TCP with optional
//! TLS), the per-connection limits, the drain on shutdown, and the wiring of one
//! connection through its phases: the handshake, then transmission with many requests
//! in flight and replies in completion order. It serves anything that implements
//! [`Export`](super::export::Export); host-agent's exports are virtual LUs.
//!
//! Errors follow the protocol: a bad magic or a client that must not be trusted is a
//! hard disconnect; everything else is an option error reply (negotiation continues) or
//! an errno in the command's reply (transmission continues).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::export::{Exports, Peer};
use super::handshake::{handshake, Transport};
use super::transmission::transmission;
pub use super::transmission::{Connections, IntoSocket, Socket};

/// Server limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has from connecting to entering transmission.
    pub handshake: Duration,
    /// Requests run at once per connection: each has its worker thread, started when
    /// needed (nbdkit's default is 16 threads). More requests wait in the socket.
    pub in_flight: usize,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake: Duration::from_secs(10),
            in_flight: 16,
            connections: 256,
        }
    }
}

/// Serve one connection to its end; `peer` are its credentials on a Unix socket. With
/// `tls`, the client must upgrade with `NBD_OPT_STARTTLS` (and present a certificate
/// the acceptor trusts) before any export is named.
pub async fn serve<S: IntoSocket>(
    stream: S,
    peer: Option<Peer>,
    exports: Arc<dyn Exports>,
    limits: Limits,
    registry: &Connections,
    tls: Option<TlsAcceptor>,
) {
    let negotiated = tokio::time::timeout(
        limits.handshake,
        handshake(stream, &*exports, peer.as_ref(), tls),
    )
    .await;
    let (session, transport) = match negotiated {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => {
            tracing::debug!(?peer, "client left or was refused during the handshake");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(?peer, deadline = ?limits.handshake, "handshake deadline passed, closing");
            return;
        }
    };
    tracing::debug!(?peer, export = %session.name, structured = session.structured, "transmission");
    match transport {
        // A client that disconnected at this point only costs a failed conversion.
        Transport::Plain(stream) => {
            if let Ok(socket) = stream.into_socket() {
                transmission(socket, session, limits.in_flight, registry).await;
            }
        }
        Transport::Tls(stream) => {
            if let Ok((socket, pump)) = bridge(stream) {
                transmission(socket, session, limits.in_flight, registry).await;
                let _ = pump.await;
            }
        }
    }
}

/// The transmission phase runs on blocking threads over a plain socket: a TLS
/// connection gets one end of a socket pair, and a task pumps bytes between the other
/// end and the TLS stream until either side closes.
fn bridge<S: IntoSocket>(
    mut tls: Box<tokio_rustls::server::TlsStream<S>>,
) -> std::io::Result<(Socket, tokio::task::JoinHandle<()>)> {
    let (inner, outer) = std::os::unix::net::UnixStream::pair()?;
    outer.set_nonblocking(true)?;
    let mut outer = tokio::net::UnixStream::from_std(outer)?;
    let pump = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut *tls, &mut outer).await;
        let _ = tls.shutdown().await;
    });
    Ok((Socket::Unix(inner), pump))
}

/// What an accept loop does after a failed accept: a connection that failed on its own
/// way in (reset, aborted) costs nothing, but with the process or the system out of
/// descriptors or memory the listener stays readable and every accept fails at once,
/// so the loop pauses (10 ms doubling to 1 s) until an accept succeeds, and logs once
/// per [`AcceptBackoff::LOG_EVERY`] with the count of failures since the last line.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    pause: Duration,
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    pub const LOG_EVERY: Duration = Duration::from_secs(10);
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// For the accept loop of `what` ("NBD", "control API", ...).
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            pause: Self::FIRST_PAUSE,
            logged: None,
            unlogged: 0,
        }
    }

    /// True for the errors that come back at once on every accept until resources free.
    pub fn is_exhaustion(e: &std::io::Error) -> bool {
        use nix::libc;
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    /// An accept succeeded: the next exhaustion starts with a short pause again.
    pub fn succeeded(&mut self) {
        self.pause = Self::FIRST_PAUSE;
    }

    /// An accept failed with `e`: log (rate-limited) and pause if resources ran out.
    pub async fn failed(&mut self, e: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .logged
            .is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY)
        {
            tracing::warn!(
                error = %e,
                failures_since_last_report = self.unlogged,
                "{}: accept failed{}",
                self.what,
                if Self::is_exhaustion(e) { "; pausing accepts until descriptors free up" } else { "" }
            );
            self.logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        if Self::is_exhaustion(e) {
            tokio::time::sleep(self.pause).await;
            self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        }
    }
}

/// Accept connections from `accept` until `shutdown`, each served by [`serve`]; past
/// `limits.connections` a new connection is closed at once.
async fn accept_loop<S, F, Fut>(
    mut accept: F,
    exports: Arc<dyn Exports>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) where
    S: IntoSocket,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, Option<Peer>)>>,
{
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(limits.connections));
    let registry = Arc::new(Connections::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::new("NBD");
    loop {
        // Reap finished connections as we go.
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept() => {
                let (s, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                };
                backoff.succeeded();
                // Over the cap: dropping the stream closes it.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(cap = limits.connections, "connection refused: too many connections");
                    continue;
                };
                let (exports, registry, tls) = (exports.clone(), registry.clone(), tls.clone());
                tasks.spawn(async move {
                    serve(s, peer, exports, limits, &registry, tls).await;
                    drop(slot);
                });
            }
        }
    }
    // Drain: no new requests; those taken are answered, then each connection closes.
    let open = registry.count();
    registry.drain();
    if open > 0 {
        tracing::info!(connections = open, "draining NBD connections");
    }
    let drained = tokio::time::timeout(limits.handshake.max(Duration::from_secs(30)), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("NBD connections still open after the drain deadline; leaving them");
        tasks.abort_all();
    }
}

/// Accept connections on a Unix socket, each with its peer's credentials (SO_PEERCRED).
pub async fn run_unix(
    listener: tokio::net::UnixListener,
    exports: Arc<dyn Exports>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let l = &listener;
    let accept = move || async move {
        let (s, _) = l.accept().await?;
        let peer = s.peer_cred().ok().map(|c| Peer {
            uid: c.uid(),
            gid: c.gid(),
        });
        Ok((s, peer))
    };
    accept_loop(accept, exports, limits, None, shutdown).await;
}

/// Accept TCP connections (no credentials: only unrestricted exports are offered).
pub async fn run_tcp(
    listener: tokio::net::TcpListener,
    exports: Arc<dyn Exports>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    run_tcp_tls(listener, exports, limits, None, shutdown).await;
}

/// Accept TCP connections; with `tls` each must upgrade with STARTTLS first (the
/// acceptor decides which client certificates it takes).
pub async fn run_tcp_tls(
    listener: tokio::net::TcpListener,
    exports: Arc<dyn Exports>,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let l = &listener;
    let accept = move || async move {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, None))
    };
    let tls = tls.map(TlsAcceptor::from);
    accept_loop(accept, exports, limits, tls, shutdown).await;
}
