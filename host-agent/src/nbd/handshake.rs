//! The handshake: fixed newstyle greeting and option haggling (`NBD_OPT_LIST`, `INFO`,
//! `GO`, `EXPORT_NAME`, `STRUCTURED_REPLY`, the metadata contexts), with the TLS upgrade
//! by `NBD_OPT_STARTTLS` when the listener requires it. It ends with a [`Session`] and
//! the stream transmission goes on with.
//!
//! A bad magic or client flags that must not be trusted are a hard disconnect; any
//! other mistake is an option error reply and haggling goes on.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::export::{split_ticket, Attachment, Export, Exports, Fenced, Peer, Session};
use super::proto::{self as p, ProtoError};

/// The stream a negotiated connection goes on with.
pub(super) enum Transport<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

/// Greeting and option haggling, with the TLS upgrade when `tls` is given.
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
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
    let mut haggling = Haggling {
        exports,
        peer,
        no_zeroes,
        tls,
        structured: false,
        contexts: Vec::new(),
    };
    loop {
        let Some((opt, data)) = read_option(rd, wr).await? else {
            return Ok(Haggled::Close);
        };
        let ended = if tls == TlsPhase::Required {
            before_tls(wr, opt.option, &data).await?
        } else {
            haggling.option(wr, opt.option, data).await?
        };
        if let Some(haggled) = ended {
            return Ok(haggled);
        }
    }
}

/// The next option header and its data; `None` when the client must be disconnected.
/// A moderately large option is skipped and answered here, and the next one read.
async fn read_option<R, W>(
    rd: &mut R,
    wr: &mut W,
) -> std::io::Result<Option<(p::OptionHeader, Vec<u8>)>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut h = [0u8; p::OPTION_HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let opt = match p::OptionHeader::parse(&h) {
            Ok(o) => o,
            Err(ProtoError::OptionTooLong { option, len }) => {
                // Skip a moderately large payload and say so; a huge one is treated as
                // a denial of service.
                if len > 16 * p::MAX_OPTION_LEN {
                    return Ok(None);
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
            Err(_) => return Ok(None),
        };
        let mut data = vec![0u8; opt.len as usize];
        rd.read_exact(&mut data).await?;
        return Ok(Some((opt, data)));
    }
}

/// Send one option reply.
async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    wr.write_all(&p::option_reply(option, kind, data)).await
}

/// An option while TLS is required and not started: only STARTTLS and ABORT are served.
/// `Some` ends haggling.
async fn before_tls<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    data: &[u8],
) -> std::io::Result<Option<Haggled>> {
    match option {
        p::OPT_STARTTLS if data.is_empty() => {
            reply(wr, option, p::REP_ACK, &[]).await?;
            return Ok(Some(Haggled::StartTls));
        }
        p::OPT_ABORT => {
            reply(wr, option, p::REP_ACK, &[]).await?;
            return Ok(Some(Haggled::Close));
        }
        // This option cannot fail with a reply: the spec says disconnect.
        p::OPT_EXPORT_NAME => return Ok(Some(Haggled::Close)),
        p::OPT_STARTTLS => {
            reply(wr, option, p::REP_ERR_INVALID, b"STARTTLS takes no data").await?;
        }
        _ => {
            reply(
                wr,
                option,
                p::REP_ERR_TLS_REQD,
                b"TLS is required on this listener: send NBD_OPT_STARTTLS",
            )
            .await?;
        }
    }
    Ok(None)
}

/// What option haggling has settled so far, and what it is settled against.
struct Haggling<'a> {
    exports: &'a dyn Exports,
    peer: Option<&'a Peer>,
    no_zeroes: bool,
    tls: TlsPhase,
    structured: bool,
    /// Selected metadata contexts: (id, name).
    contexts: Vec<(u32, &'static str)>,
}

impl Haggling<'_> {
    /// Serve one option; `Some` ends haggling.
    async fn option<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: Vec<u8>,
    ) -> std::io::Result<Option<Haggled>> {
        match option {
            p::OPT_EXPORT_NAME => return self.export_name(wr, data).await,
            p::OPT_ABORT => {
                reply(wr, option, p::REP_ACK, &[]).await?;
                return Ok(Some(Haggled::Close));
            }
            p::OPT_LIST => self.list(wr, &data).await?,
            p::OPT_INFO | p::OPT_GO => return self.info(wr, option, &data).await,
            p::OPT_STRUCTURED_REPLY => self.structured_reply(wr, &data).await?,
            p::OPT_LIST_META_CONTEXT | p::OPT_SET_META_CONTEXT => {
                self.meta_context(wr, option, &data).await?
            }
            p::OPT_STARTTLS if self.tls == TlsPhase::On => {
                reply(wr, option, p::REP_ERR_INVALID, b"TLS is already on").await?;
            }
            p::OPT_STARTTLS => {
                reply(
                    wr,
                    option,
                    p::REP_ERR_POLICY,
                    b"this server does not offer TLS",
                )
                .await?;
            }
            _ => {
                reply(wr, option, p::REP_ERR_UNSUP, b"unknown option").await?;
            }
        }
        Ok(None)
    }

    /// The session on `export`, with what haggling settled; `attached` counts it.
    fn session(
        &mut self,
        name: String,
        export: std::sync::Arc<dyn Export>,
        attached: Option<Attachment>,
    ) -> Haggled {
        Haggled::Session(Session {
            name,
            export,
            structured: self.structured,
            contexts: std::mem::take(&mut self.contexts),
            _attached: attached,
        })
    }

    /// The export a client's `name` opens (a fence's ticket stripped off), and the ticket.
    fn lookup<'n>(&self, name: &'n str) -> Option<(std::sync::Arc<dyn Export>, Option<&'n str>)> {
        let (export, ticket) = split_ticket(name);
        self.exports.get(export, self.peer).map(|e| (e, ticket))
    }

    /// `NBD_OPT_EXPORT_NAME`: the old way into transmission.
    async fn export_name<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        data: Vec<u8>,
    ) -> std::io::Result<Option<Haggled>> {
        let asked = String::from_utf8_lossy(&data).into_owned();
        let Some((export, ticket)) = self.lookup(&asked) else {
            // This option cannot fail with a reply: the spec says disconnect.
            return Ok(Some(Haggled::Close));
        };
        // Fenced: the same.
        let Ok(attached) = attach(&*export, ticket) else {
            return Ok(Some(Haggled::Close));
        };
        let flags = transmission_flags(&*export);
        wr.write_all(&p::export_name_reply(export.size(), flags, self.no_zeroes))
            .await?;
        let name = split_ticket(&asked).0.to_string();
        Ok(Some(self.session(name, export, attached)))
    }

    /// `NBD_OPT_LIST`: the names of the exports this peer may open.
    async fn list<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        data: &[u8],
    ) -> std::io::Result<()> {
        let option = p::OPT_LIST;
        if !data.is_empty() {
            return reply(wr, option, p::REP_ERR_INVALID, b"LIST takes no data").await;
        }
        for name in self.exports.names(self.peer) {
            reply(wr, option, p::REP_SERVER, &p::server_reply(&name)).await?;
        }
        reply(wr, option, p::REP_ACK, &[]).await
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: an export's size, flags and block sizes; GO then
    /// enters transmission.
    async fn info<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> std::io::Result<Option<Haggled>> {
        let Some(req) = p::InfoRequest::parse(data) else {
            reply(wr, option, p::REP_ERR_INVALID, b"malformed INFO/GO request").await?;
            return Ok(None);
        };
        let Some((export, ticket)) = self.lookup(&req.name) else {
            let msg = format!("no export named {:?}", split_ticket(&req.name).0);
            reply(wr, option, p::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
            return Ok(None);
        };
        // GO attaches before any reply, so a fence put up later counts this connection.
        let attached = match option {
            p::OPT_GO => match attach(&*export, ticket) {
                Ok(a) => a,
                Err(f) => {
                    let msg = format!("{}: {f}", split_ticket(&req.name).0);
                    reply(wr, option, p::REP_ERR_POLICY, msg.as_bytes()).await?;
                    return Ok(None);
                }
            },
            _ => None,
        };
        let flags = transmission_flags(&*export);
        let info = p::info_export(export.size(), flags);
        reply(wr, option, p::REP_INFO, &info).await?;
        // Any alignment works (partial blocks are merged); 4 KiB is best.
        let bs = p::info_block_size(1, 4096, p::MAX_PAYLOAD);
        reply(wr, option, p::REP_INFO, &bs).await?;
        if req.requests.contains(&p::INFO_NAME) {
            let mut d = p::INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(req.name.as_bytes());
            reply(wr, option, p::REP_INFO, &d).await?;
        }
        reply(wr, option, p::REP_ACK, &[]).await?;
        if option == p::OPT_GO {
            let name = split_ticket(&req.name).0.to_string();
            return Ok(Some(self.session(name, export, attached)));
        }
        Ok(None)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    async fn structured_reply<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        data: &[u8],
    ) -> std::io::Result<()> {
        let option = p::OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            let msg = b"STRUCTURED_REPLY takes no data";
            return reply(wr, option, p::REP_ERR_INVALID, msg).await;
        }
        self.structured = true;
        reply(wr, option, p::REP_ACK, &[]).await
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the contexts that
    /// match the queries; SET selects them for transmission.
    async fn meta_context<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let set = option == p::OPT_SET_META_CONTEXT;
        if set && !self.structured {
            let msg = b"SET_META_CONTEXT needs STRUCTURED_REPLY first";
            return reply(wr, option, p::REP_ERR_INVALID, msg).await;
        }
        let Some(req) = p::MetaContextRequest::parse(data) else {
            let msg = b"malformed meta context request";
            return reply(wr, option, p::REP_ERR_INVALID, msg).await;
        };
        let Some((export, _)) = self.lookup(&req.export) else {
            let msg = format!("no export named {:?}", split_ticket(&req.export).0);
            return reply(wr, option, p::REP_ERR_UNKNOWN, msg.as_bytes()).await;
        };
        let chosen = chosen_contexts(&export.meta_contexts(), &req.queries, set);
        for (id, name) in &chosen {
            let id = if set { *id } else { 0 };
            let d = p::meta_context_reply(id, name);
            reply(wr, option, p::REP_META_CONTEXT, &d).await?;
        }
        if set {
            self.contexts = chosen;
        }
        reply(wr, option, p::REP_ACK, &[]).await
    }
}

/// Count a connection among `export`'s clients (if it counts them), through its fence
/// with `ticket`.
fn attach(export: &dyn Export, ticket: Option<&str>) -> Result<Option<Attachment>, Fenced> {
    export.clients().map(|c| c.attach(ticket)).transpose()
}

/// The `offered` contexts that `queries` ask for, with their ids (1-based positions). No
/// query lists every context and selects none; in a LIST, `ns:` or an empty query matches
/// the whole namespace.
fn chosen_contexts(
    offered: &[&'static str],
    queries: &[String],
    set: bool,
) -> Vec<(u32, &'static str)> {
    let mut chosen: Vec<(u32, &'static str)> = Vec::new();
    for (i, name) in offered.iter().enumerate() {
        let ns = name.split(':').next().unwrap_or("");
        let wanted = if queries.is_empty() {
            !set
        } else {
            queries
                .iter()
                .any(|q| q == name || (!set && (q == &format!("{ns}:") || q.is_empty())))
        };
        if wanted {
            chosen.push((i as u32 + 1, name));
        }
    }
    chosen
}
