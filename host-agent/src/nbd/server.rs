//! The NBD server: fixed newstyle handshake, option haggling, and the transmission phase
//! with many requests in flight and replies in completion order. It serves anything that
//! implements [`Export`]; host-agent's exports are virtual LUs.
//!
//! Errors follow the protocol: a bad magic or a client that must not be trusted is a
//! hard disconnect; everything else is an option error reply (negotiation continues) or
//! an errno in the command's reply (transmission continues).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::proto::{self as p, ProtoError};
use super::transmission::transmission;
pub use super::transmission::{Connections, IntoSocket, Socket};

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
                transmission(socket, session, limits, registry).await;
            }
        }
        Transport::Tls(stream) => {
            if let Ok((socket, pump)) = bridge(stream) {
                transmission(socket, session, limits, registry).await;
                let _ = pump.await;
            }
        }
    }
}

/// The stream a negotiated connection goes on with.
enum Transport<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

/// Greeting and option haggling, with the TLS upgrade when `tls` is given.
async fn handshake<S: IntoSocket>(
    mut stream: S,
    exports: &dyn Exports,
    peer: Option<&Peer>,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<Option<(Session, Transport<S>)>> {
    let (haggled, no_zeroes) = {
        let (mut rd, mut wr) = tokio::io::split(&mut stream);
        let Some(no_zeroes) = greet(&mut rd, &mut wr).await? else {
            return Ok(None);
        };
        let phase = if tls.is_some() {
            TlsPhase::Required
        } else {
            TlsPhase::Off
        };
        let h = negotiate(&mut rd, &mut wr, exports, peer, no_zeroes, phase).await?;
        (h, no_zeroes)
    };
    match (haggled, tls) {
        (Haggled::Session(s), None) => Ok(Some((s, Transport::Plain(stream)))),
        (Haggled::StartTls, Some(acceptor)) => {
            let mut stream = Box::new(acceptor.accept(stream).await?);
            let (mut rd, mut wr) = tokio::io::split(&mut *stream);
            match negotiate(&mut rd, &mut wr, exports, peer, no_zeroes, TlsPhase::On).await? {
                Haggled::Session(s) => Ok(Some((s, Transport::Tls(stream)))),
                _ => Ok(None),
            }
        }
        _ => Ok(None),
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

pub(super) struct Session {
    pub(super) name: String,
    pub(super) export: Arc<dyn Export>,
    pub(super) structured: bool,
    /// Selected metadata contexts: (id, name).
    pub(super) contexts: Vec<(u32, &'static str)>,
}

fn transmission_flags(e: &dyn Export) -> u16 {
    let mut f = p::FLAG_HAS_FLAGS | p::FLAG_SEND_FLUSH | p::FLAG_SEND_FUA | p::FLAG_SEND_DF;
    if e.read_only() {
        f |= p::FLAG_READ_ONLY;
    } else {
        f |= p::FLAG_SEND_TRIM | p::FLAG_SEND_WRITE_ZEROES;
    }
    if e.multi_conn() {
        f |= p::FLAG_CAN_MULTI_CONN;
    }
    f
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        rd.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// The greeting and the client's flags: `Some(no_zeroes)`, or `None` for flags that
/// must not be trusted.
async fn greet<R, W>(rd: &mut R, wr: &mut W) -> std::io::Result<Option<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&p::greeting()).await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    Ok(p::client_flags(flags)
        .ok()
        .map(|(_fixed, no_zeroes)| no_zeroes))
}

/// Where a connection is with TLS during option haggling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsPhase {
    /// This listener does not offer TLS.
    Off,
    /// TLS is required and not started: only STARTTLS and ABORT are served.
    Required,
    /// The options now come over TLS.
    On,
}

/// How option haggling ended.
enum Haggled {
    Session(Session),
    /// The client sent `NBD_OPT_STARTTLS` and it was acknowledged: the TLS handshake is
    /// next, then haggling goes on over TLS.
    StartTls,
    /// The client aborted or must be disconnected.
    Close,
}

/// Option haggling.
async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &dyn Exports,
    peer: Option<&Peer>,
    no_zeroes: bool,
    tls: TlsPhase,
) -> std::io::Result<Haggled>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut structured = false;
    let mut contexts: Vec<(u32, &'static str)> = Vec::new();
    loop {
        let mut h = [0u8; p::OPTION_HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let opt = match p::OptionHeader::parse(&h) {
            Ok(o) => o,
            Err(ProtoError::OptionTooLong { option, len }) => {
                // Skip a moderately large payload and say so; a huge one is treated as
                // a denial of service.
                if len > 16 * p::MAX_OPTION_LEN {
                    return Ok(Haggled::Close);
                }
                discard(rd, u64::from(len)).await?;
                wr.write_all(&p::option_reply(
                    option,
                    p::REP_ERR_TOO_BIG,
                    b"option too large",
                ))
                .await?;
                continue;
            }
            Err(_) => return Ok(Haggled::Close),
        };
        let mut data = vec![0u8; opt.len as usize];
        rd.read_exact(&mut data).await?;
        let reply = |kind: u32, d: &[u8]| p::option_reply(opt.option, kind, d);
        if tls == TlsPhase::Required {
            match opt.option {
                p::OPT_STARTTLS if data.is_empty() => {
                    wr.write_all(&reply(p::REP_ACK, &[])).await?;
                    return Ok(Haggled::StartTls);
                }
                p::OPT_ABORT => {
                    wr.write_all(&reply(p::REP_ACK, &[])).await?;
                    return Ok(Haggled::Close);
                }
                // This option cannot fail with a reply: the spec says disconnect.
                p::OPT_EXPORT_NAME => return Ok(Haggled::Close),
                p::OPT_STARTTLS => {
                    wr.write_all(&reply(p::REP_ERR_INVALID, b"STARTTLS takes no data"))
                        .await?;
                }
                _ => {
                    wr.write_all(&reply(
                        p::REP_ERR_TLS_REQD,
                        b"TLS is required on this listener: send NBD_OPT_STARTTLS",
                    ))
                    .await?;
                }
            }
            continue;
        }
        match opt.option {
            p::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = exports.get(&name, peer) else {
                    // This option cannot fail with a reply: the spec says disconnect.
                    return Ok(Haggled::Close);
                };
                let flags = transmission_flags(&*export);
                wr.write_all(&p::export_name_reply(export.size(), flags, no_zeroes))
                    .await?;
                return Ok(Haggled::Session(Session {
                    name,
                    export,
                    structured,
                    contexts,
                }));
            }
            p::OPT_ABORT => {
                wr.write_all(&reply(p::REP_ACK, &[])).await?;
                return Ok(Haggled::Close);
            }
            p::OPT_LIST => {
                if !data.is_empty() {
                    wr.write_all(&reply(p::REP_ERR_INVALID, b"LIST takes no data"))
                        .await?;
                    continue;
                }
                for name in exports.names(peer) {
                    wr.write_all(&reply(p::REP_SERVER, &p::server_reply(&name)))
                        .await?;
                }
                wr.write_all(&reply(p::REP_ACK, &[])).await?;
            }
            p::OPT_INFO | p::OPT_GO => {
                let Some(req) = p::InfoRequest::parse(&data) else {
                    wr.write_all(&reply(p::REP_ERR_INVALID, b"malformed INFO/GO request"))
                        .await?;
                    continue;
                };
                let Some(export) = exports.get(&req.name, peer) else {
                    let msg = format!("no export named {:?}", req.name);
                    wr.write_all(&reply(p::REP_ERR_UNKNOWN, msg.as_bytes()))
                        .await?;
                    continue;
                };
                let flags = transmission_flags(&*export);
                wr.write_all(&reply(p::REP_INFO, &p::info_export(export.size(), flags)))
                    .await?;
                // Any alignment works (partial blocks are merged); 4 KiB is best.
                let bs = p::info_block_size(1, 4096, p::MAX_PAYLOAD);
                wr.write_all(&reply(p::REP_INFO, &bs)).await?;
                if req.requests.contains(&p::INFO_NAME) {
                    let mut d = p::INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(req.name.as_bytes());
                    wr.write_all(&reply(p::REP_INFO, &d)).await?;
                }
                wr.write_all(&reply(p::REP_ACK, &[])).await?;
                if opt.option == p::OPT_GO {
                    return Ok(Haggled::Session(Session {
                        name: req.name,
                        export,
                        structured,
                        contexts,
                    }));
                }
            }
            p::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    wr.write_all(&reply(
                        p::REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    ))
                    .await?;
                    continue;
                }
                structured = true;
                wr.write_all(&reply(p::REP_ACK, &[])).await?;
            }
            p::OPT_LIST_META_CONTEXT | p::OPT_SET_META_CONTEXT => {
                let set = opt.option == p::OPT_SET_META_CONTEXT;
                if set && !structured {
                    wr.write_all(&reply(
                        p::REP_ERR_INVALID,
                        b"SET_META_CONTEXT needs STRUCTURED_REPLY first",
                    ))
                    .await?;
                    continue;
                }
                let Some(req) = p::MetaContextRequest::parse(&data) else {
                    wr.write_all(&reply(
                        p::REP_ERR_INVALID,
                        b"malformed meta context request",
                    ))
                    .await?;
                    continue;
                };
                let Some(export) = exports.get(&req.export, peer) else {
                    let msg = format!("no export named {:?}", req.export);
                    wr.write_all(&reply(p::REP_ERR_UNKNOWN, msg.as_bytes()))
                        .await?;
                    continue;
                };
                let offered = export.meta_contexts();
                let mut chosen: Vec<(u32, &'static str)> = Vec::new();
                for (i, name) in offered.iter().enumerate() {
                    let ns = name.split(':').next().unwrap_or("");
                    let wanted = if req.queries.is_empty() {
                        !set
                    } else {
                        req.queries.iter().any(|q| {
                            q == name || (!set && (q == &format!("{ns}:") || q.is_empty()))
                        })
                    };
                    if wanted {
                        chosen.push((i as u32 + 1, name));
                    }
                }
                for (id, name) in &chosen {
                    let id = if set { *id } else { 0 };
                    wr.write_all(&reply(
                        p::REP_META_CONTEXT,
                        &p::meta_context_reply(id, name),
                    ))
                    .await?;
                }
                if set {
                    contexts = chosen;
                }
                wr.write_all(&reply(p::REP_ACK, &[])).await?;
            }
            p::OPT_STARTTLS if tls == TlsPhase::On => {
                wr.write_all(&reply(p::REP_ERR_INVALID, b"TLS is already on"))
                    .await?;
            }
            p::OPT_STARTTLS => {
                wr.write_all(&reply(p::REP_ERR_POLICY, b"this server does not offer TLS"))
                    .await?;
            }
            _ => {
                wr.write_all(&reply(p::REP_ERR_UNSUP, b"unknown option"))
                    .await?;
            }
        }
    }
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
