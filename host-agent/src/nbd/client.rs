//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies; one
//! request at a time, except [`Client::read_many`], which keeps several reads in flight)
//! over a Unix socket, TCP, or TCP with TLS (`NBD_OPT_STARTTLS`): what `hvmctl demo` uses to write to a
//! virtual LU and to copy a snapshot export, and what a backup host uses to pull a
//! database host's snapshot export, without depending on an external tool.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD handshake: {0}")]
    Handshake(String),
    #[error("NBD {op} at offset {offset}, {len} bytes: the server replied errno {errno}")]
    Command {
        op: &'static str,
        offset: u64,
        len: usize,
        errno: u32,
    },
}

type Result<T> = std::result::Result<T, ClientError>;

/// A connected byte stream (Unix socket or TCP).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn malformed() -> ClientError {
    ClientError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "malformed reply from the NBD server",
    ))
}

/// Requests [`Client::read_many`] keeps on the wire at once.
pub const IN_FLIGHT: usize = 16;

/// One connection to one export.
pub struct Client {
    stream: Box<dyn Stream>,
    size: u64,
    flags: u16,
    cookie: u64,
}

fn handshake(msg: impl Into<String>) -> ClientError {
    ClientError::Handshake(msg.into())
}

/// Read the server's greeting and answer it with the client flags (fixed newstyle).
fn greet<S: Read + Write + ?Sized>(s: &mut S) -> Result<()> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if u64::from_be_bytes(hello[..8].try_into().unwrap_or_default()) != NBDMAGIC
        || u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default()) != IHAVEOPT
    {
        return Err(handshake("not a newstyle NBD server"));
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(handshake("the server is not fixed newstyle"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&client_flags.to_be_bytes())?;
    Ok(())
}

fn send_option<S: Write + ?Sized>(s: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let mut opt = Vec::with_capacity(16 + data.len());
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&option.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(data);
    s.write_all(&opt)?;
    Ok(())
}

/// One option reply: its type and body.
fn read_reply<S: Read + ?Sized>(s: &mut S) -> Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    let magic = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or_default()) as usize;
    if magic != REPLY_MAGIC || len > 64 << 10 {
        return Err(handshake("malformed option reply"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

/// An error reply's text, as ": TEXT", or nothing.
fn reply_text(body: &[u8]) -> String {
    match String::from_utf8_lossy(body) {
        t if t.is_empty() => String::new(),
        t => format!(": {t}"),
    }
}

impl Client {
    /// Connect to `socket` and open `export`.
    pub fn connect(socket: &Path, export: &str) -> Result<Client> {
        Client::open(Box::new(UnixStream::connect(socket)?), export)
    }

    /// Connect to `addr` (`HOST:PORT`) over TCP and open `export`.
    pub fn connect_tcp(addr: &str, export: &str) -> Result<Client> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Client::open(Box::new(s), export)
    }

    /// Connect to `addr` (`HOST:PORT`) over TCP, upgrade to TLS with NBD_OPT_STARTTLS
    /// (presenting the client certificate of `tls`, checking the server's against the
    /// name HOST), then open `export` inside TLS.
    pub fn connect_tls(
        addr: &str,
        export: &str,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Client> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        greet(&mut s)?;
        send_option(&mut s, OPT_STARTTLS, &[])?;
        match read_reply(&mut s)? {
            (REP_ACK, _) => {}
            (k, body) => {
                return Err(handshake(format!(
                    "the server refused STARTTLS (reply {k:#x}{}): does its listen.tcp have TLS?",
                    reply_text(&body)
                )))
            }
        }
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| handshake(format!("{host:?} is not a name TLS can check: {e}")))?;
        let conn =
            rustls::ClientConnection::new(tls, name).map_err(|e| handshake(format!("TLS: {e}")))?;
        Client::go(Box::new(rustls::StreamOwned::new(conn, s)), export)
    }

    /// Do the handshake on a connected stream and open `export`.
    pub fn open(mut s: Box<dyn Stream>, export: &str) -> Result<Client> {
        greet(&mut s)?;
        Client::go(s, export)
    }

    /// NBD_OPT_GO on a greeted stream.
    fn go(mut s: Box<dyn Stream>, export: &str) -> Result<Client> {
        // NBD_OPT_GO: the export name, no information requests.
        let mut data = Vec::with_capacity(6 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, OPT_GO, &data)?;

        let mut export_info = None;
        loop {
            let (kind, body) = read_reply(&mut s)?;
            match kind {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && body[..2] == INFO_EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(body[2..10].try_into().unwrap_or_default());
                    let flags = u16::from_be_bytes([body[10], body[11]]);
                    export_info = Some((size, flags));
                }
                REP_INFO => {}
                k if k & REP_ERR != 0 => {
                    return Err(handshake(format!(
                        "export {export:?} refused (reply {k:#x}{})",
                        reply_text(&body)
                    )));
                }
                k => return Err(handshake(format!("unexpected option reply {k:#x}"))),
            }
        }
        let (size, flags) =
            export_info.ok_or_else(|| handshake("the server sent no export information"))?;
        Ok(Client {
            stream: s,
            size,
            flags,
            cookie: 0,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// The next request's header.
    fn header(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
        self.cookie += 1;
        super::proto::request(flags, cmd, self.cookie, offset, len)
    }

    /// A simple reply's header: (errno, cookie).
    fn reply(&mut self) -> Result<(u32, u64)> {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().unwrap_or_default());
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(malformed());
        }
        let errno = u32::from_be_bytes(reply[4..8].try_into().unwrap_or_default());
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap_or_default());
        Ok((errno, cookie))
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<u32> {
        let req = self.header(cmd, flags, offset, len);
        if data.is_empty() {
            self.stream.write_all(&req)?;
        } else {
            let bufs = [std::io::IoSlice::new(&req), std::io::IoSlice::new(data)];
            let total = req.len() + data.len();
            let n = self.stream.write_vectored(&bufs)?;
            if n < total {
                // Short vectored write: send the rest plainly.
                let mut all = Vec::with_capacity(total);
                all.extend_from_slice(&req);
                all.extend_from_slice(data);
                self.stream.write_all(&all[n..])?;
            }
        }
        let (errno, cookie) = self.reply()?;
        if cookie != self.cookie {
            return Err(malformed());
        }
        Ok(errno)
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_many(&mut [(offset, buf)])
    }

    /// Read each `(offset, buf)` of `reads`, keeping up to [`IN_FLIGHT`] requests on the
    /// wire at once (the server answers them in any order: each reply is matched to its
    /// request by cookie), so a server that runs requests concurrently is never waiting
    /// for the next one, and many small reads cost no round trip each. After an error the
    /// connection is left with replies unread: drop it.
    pub fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        let first = self.cookie.wrapping_add(1);
        let mut done = vec![false; reads.len()];
        let (mut sent, mut answered) = (0usize, 0usize);
        let mut headers = Vec::with_capacity(REQUEST_LEN * IN_FLIGHT.min(reads.len()));
        while answered < reads.len() {
            headers.clear();
            while sent < reads.len() && sent - answered < IN_FLIGHT {
                let (offset, buf) = &reads[sent];
                let len = buf.len() as u32;
                headers.extend_from_slice(&self.header(CMD_READ, 0, *offset, len));
                sent += 1;
            }
            if !headers.is_empty() {
                self.stream.write_all(&headers)?;
                self.stream.flush()?;
            }
            let (errno, cookie) = self.reply()?;
            let i = cookie.wrapping_sub(first) as usize;
            if i >= sent || done[i] {
                return Err(malformed());
            }
            let (offset, buf) = &mut reads[i];
            if errno != 0 {
                return Err(ClientError::Command {
                    op: "read",
                    offset: *offset,
                    len: buf.len(),
                    errno,
                });
            }
            self.stream.read_exact(buf)?;
            done[i] = true;
            answered += 1;
        }
        Ok(())
    }

    /// Write `data` at `offset`; with `fua`, durable when it returns.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let errno = self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        if errno != 0 {
            return Err(ClientError::Command {
                op: "write",
                offset,
                len: data.len(),
                errno,
            });
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        let errno = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        if errno != 0 {
            return Err(ClientError::Command {
                op: "flush",
                offset: 0,
                len: 0,
                errno,
            });
        }
        Ok(())
    }

    /// Say goodbye (NBD_CMD_DISC has no reply).
    pub fn disconnect(mut self) {
        let req = self.header(CMD_DISC, 0, 0, 0);
        let _ = self.stream.write_all(&req);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `read_many` keeps its reads in flight and matches replies to requests by cookie,
    /// whatever order they come in; an error reply fails it with the read's offset.
    #[test]
    fn read_many_matches_replies_in_any_order() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = IN_FLIGHT + 5;
        let server = std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut answered = 0;
            while answered < n + 1 {
                let mut h = [0u8; 28];
                b.read_exact(&mut h).unwrap();
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
                let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
                pending.push((cookie, offset, len));
                // Answer a batch, newest first, once a few have come.
                if pending.len() == 3 || answered + pending.len() == n || offset == 999 {
                    while let Some((cookie, offset, len)) = pending.pop() {
                        let errno: u32 = if offset == 999 { 5 } else { 0 };
                        b.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes()).unwrap();
                        b.write_all(&errno.to_be_bytes()).unwrap();
                        b.write_all(&cookie.to_be_bytes()).unwrap();
                        if errno == 0 {
                            let data: Vec<u8> =
                                (0..len).map(|i| (offset as usize + i) as u8).collect();
                            b.write_all(&data).unwrap();
                        }
                        answered += 1;
                    }
                }
            }
        });
        let mut c = Client {
            stream: Box::new(a),
            size: 1 << 30,
            flags: 0,
            cookie: 41,
        };
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|i| vec![0u8; 100 + i]).collect();
        let mut reads: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| ((i * 1000) as u64, &mut b[..]))
            .collect();
        c.read_many(&mut reads).unwrap();
        for (i, b) in bufs.iter().enumerate() {
            let want: Vec<u8> = (0..b.len()).map(|j| (i * 1000 + j) as u8).collect();
            assert_eq!(b, &want, "read {i}");
        }
        let mut one = [0u8; 10];
        let e = c.read_many(&mut [(999, &mut one[..])]).unwrap_err();
        assert!(e.to_string().contains("offset 999"), "{e}");
        server.join().unwrap();
    }
}
