//! A scripted NBD server for the unit tests: the server side of the handshake and raw
//! reply bytes, so a test can send what a real server would not (an error chunk, a
//! short reply, a stray cookie).
#![allow(clippy::unwrap_used)] // test support

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::conn::Conn;
use crate::handshake::{handshake, Export, Stream};
use crate::proto::*;
use crate::uri::{Address, Target};

/// What the fake server offers.
#[derive(Clone, Copy)]
pub struct Offer {
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
    /// `NBD_INFO_BLOCK_SIZE` (min, preferred, max), if sent.
    pub block: Option<(u32, u32, u32)>,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            structured: true,
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES,
            block: Some((1, 4096, 64 * 1024)),
        }
    }
}

/// The server end of a connection.
pub struct Fake {
    pub s: UnixStream,
}

/// A request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
    pub data: Vec<u8>,
}

pub fn target() -> Target {
    Target {
        address: Address::Unix("/fake.sock".into()),
        export: "e".into(),
    }
}

/// A client connection to a fake server that offered `offer`.
pub fn pair(offer: Offer, timeout: Duration) -> (Conn, Fake) {
    let (c, s) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut f = Fake { s };
        f.serve_handshake(offer);
        f
    });
    let mut cs = Stream::Unix(c);
    let export: Export = handshake(&mut cs, &target()).unwrap();
    let fake = server.join().unwrap();
    (Conn::start(cs, export, timeout).unwrap(), fake)
}

impl Fake {
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }

    /// Greeting, client flags, then options until `NBD_OPT_GO` is answered.
    pub fn serve_handshake(&mut self, offer: Offer) {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.s.write_all(&g).unwrap();
        assert_eq!(self.u32(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        loop {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be64(&h), IHAVEOPT);
            let (opt, len) = (be32(&h[8..]), be32(&h[12..]));
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).unwrap();
            match opt {
                OPT_STRUCTURED_REPLY if offer.structured => self.option_reply(opt, REP_ACK, &[]),
                OPT_STRUCTURED_REPLY => self.option_reply(opt, REP_ERR_UNSUP, &[]),
                OPT_GO => {
                    let n = be32(&data) as usize;
                    assert_eq!(&data[4..4 + n], b"e", "export name");
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&offer.size.to_be_bytes());
                    info.extend_from_slice(&offer.flags.to_be_bytes());
                    self.option_reply(opt, REP_INFO, &info);
                    if let Some((a, b, c)) = offer.block {
                        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [a, b, c] {
                            bs.extend_from_slice(&v.to_be_bytes());
                        }
                        self.option_reply(opt, REP_INFO, &bs);
                    }
                    self.option_reply(opt, REP_ACK, &[]);
                    return;
                }
                other => panic!("unexpected option {other}"),
            }
        }
    }

    pub fn option_reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        let mut r = REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&opt.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r).unwrap();
    }

    /// The next request, with its payload for a WRITE.
    pub fn request(&mut self) -> Req {
        let mut h = [0u8; REQUEST_LEN];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), REQUEST_MAGIC);
        let mut r = Req {
            flags: be16(&h[4..]),
            kind: be16(&h[6..]),
            cookie: be64(&h[8..]),
            offset: be64(&h[16..]),
            len: be32(&h[24..]),
            data: Vec::new(),
        };
        if r.kind == CMD_WRITE {
            r.data = vec![0u8; r.len as usize];
            self.s.read_exact(&mut r.data).unwrap();
        }
        r
    }

    pub fn simple(&mut self, cookie: u64, errno: u32, data: &[u8]) {
        let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&errno.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r).unwrap();
    }

    pub fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, payload: &[u8]) {
        let mut r = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).unwrap();
    }

    pub fn data_chunk(&mut self, cookie: u64, done: bool, offset: u64, data: &[u8]) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.chunk(cookie, flags, REPLY_TYPE_OFFSET_DATA, &p);
    }

    pub fn error_chunk(&mut self, cookie: u64, errno: u32, message: &str) {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(message.len() as u16).to_be_bytes());
        p.extend_from_slice(message.as_bytes());
        self.chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT | 1, &p);
    }
}
