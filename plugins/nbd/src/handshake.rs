//! Connecting and the fixed newstyle handshake: greeting, client flags,
//! `NBD_OPT_STRUCTURED_REPLY` (used when the server acknowledges it), then `NBD_OPT_GO`
//! with the export name asking for `NBD_INFO_BLOCK_SIZE` (falling back to
//! `NBD_OPT_EXPORT_NAME` on a server that does not know `NBD_OPT_GO`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::proto::*;
use crate::uri::{Address, Target};

/// A connected byte stream to a server.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Connect to `addr`, giving up after `timeout`.
    pub fn connect(addr: &Address, timeout: Duration) -> io::Result<Stream> {
        match addr {
            Address::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            Address::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Wakes every thread blocked on the socket; the connection is over.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    /// Bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_SEND_FUA`, ...).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Largest READ/WRITE payload the server takes.
    pub max_payload: u32,
}

impl Export {
    pub fn can(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Refused(String),
}

fn refused(msg: impl Into<String>) -> HandshakeError {
    HandshakeError::Refused(msg.into())
}

/// Open `target` on a connected stream. The stream's timeouts bound every step.
pub fn handshake(s: &mut Stream, target: &Target) -> Result<Export, HandshakeError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if be64(&hello) != NBDMAGIC || be64(&hello[8..]) != IHAVEOPT {
        return Err(refused(
            "not a newstyle NBD server (oldstyle servers are not supported)",
        ));
    }
    let server_flags = be16(&hello[16..]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(refused("the server is not fixed newstyle"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&client.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = loop {
        let r = option_reply(s, OPT_STRUCTURED_REPLY)?;
        match r.kind {
            REP_ACK => break true,
            k if k & REP_ERR != 0 => break false,
            // Any other reply to this option is informational; the spec defines none.
            _ => continue,
        }
    };
    let mut export = match go(s, target)? {
        Some(e) => e,
        None => export_name(s, target, no_zeroes)?,
    };
    export.structured = structured;
    if export.flags & FLAG_HAS_FLAGS == 0 {
        export.flags = FLAG_HAS_FLAGS;
    }
    if export.can(FLAG_READ_ONLY) {
        return Err(refused(format!(
            "export {:?} is read-only; a leg must be writable",
            target.export
        )));
    }
    Ok(export)
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

fn option_reply(s: &mut Stream, option: u32) -> Result<OptionReply, HandshakeError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if be64(&h) != REPLY_MAGIC {
        return Err(refused("bad option reply magic"));
    }
    if be32(&h[8..]) != option {
        return Err(refused(format!(
            "reply to option {} while option {option} was asked",
            be32(&h[8..])
        )));
    }
    let len = be32(&h[16..]);
    if len > MAX_SMALL_PAYLOAD {
        return Err(refused(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok(OptionReply {
        kind: be32(&h[12..]),
        data,
    })
}

/// What an option error reply means, with the server's message.
fn option_error(target: &Target, r: &OptionReply) -> HandshakeError {
    let msg = String::from_utf8_lossy(&r.data);
    let what = match r.kind {
        REP_ERR_UNKNOWN => format!("the server has no export named {:?}", target.export),
        REP_ERR_TLS_REQD => "the server requires TLS, which hvm's NBD client does not speak".into(),
        REP_ERR_POLICY => format!("the server refuses export {:?} (policy)", target.export),
        REP_ERR_SHUTDOWN => "the server is shutting down".into(),
        k => format!(
            "the server refused export {:?} (reply {k:#x})",
            target.export
        ),
    };
    if msg.is_empty() {
        refused(what)
    } else {
        refused(format!("{what}: {msg}"))
    }
}

/// `NBD_OPT_GO`; `None` when the server does not know the option.
fn go(s: &mut Stream, target: &Target) -> Result<Option<Export>, HandshakeError> {
    let name = target.export.as_bytes();
    let mut d = Vec::with_capacity(8 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &d)?;
    let mut info: Option<(u64, u16)> = None;
    let mut block: Option<(u32, u32)> = None;
    loop {
        let r = option_reply(s, OPT_GO)?;
        match r.kind {
            REP_INFO if r.data.len() >= 2 => match be16(&r.data) {
                INFO_EXPORT if r.data.len() == 12 => {
                    info = Some((be64(&r.data[2..]), be16(&r.data[10..])));
                }
                INFO_BLOCK_SIZE if r.data.len() == 14 => {
                    block = Some((be32(&r.data[2..]), be32(&r.data[10..])));
                }
                _ => {}
            },
            REP_INFO => return Err(refused("NBD_REP_INFO shorter than 2 bytes")),
            REP_ACK => break,
            REP_ERR_UNSUP => return Ok(None),
            k if k & REP_ERR != 0 => return Err(option_error(target, &r)),
            _ => {}
        }
    }
    let (size, flags) =
        info.ok_or_else(|| refused("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
    let max_payload = match block {
        Some((min, _)) if min > 512 => {
            return Err(refused(format!(
                "the export's minimum block size is {min} bytes; hvm writes 512-byte blocks"
            )))
        }
        Some((_, max)) if max >= 512 => max,
        _ => DEFAULT_MAX_PAYLOAD,
    };
    Ok(Some(Export {
        size,
        flags,
        structured: false,
        max_payload,
    }))
}

/// `NBD_OPT_EXPORT_NAME`, for servers older than `NBD_OPT_GO`: no error reply exists, a
/// server without the export closes the connection.
fn export_name(s: &mut Stream, target: &Target, no_zeroes: bool) -> Result<Export, HandshakeError> {
    send_option(s, OPT_EXPORT_NAME, target.export.as_bytes())?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).map_err(|e| {
        refused(format!(
            "the server closed the connection on export {:?} ({e}): no such export?",
            target.export
        ))
    })?;
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.read_exact(&mut pad)?;
    }
    Ok(Export {
        size: be64(&r),
        flags: be16(&r[8..]),
        structured: false,
        max_payload: DEFAULT_MAX_PAYLOAD,
    })
}
