//! The NBD wire protocol (the NBD project's `doc/proto.md`): constants, the fixed newstyle
//! handshake, option and request parsing, and reply encoding. No I/O here: the server
//! feeds bytes in and writes bytes out, so every parser can be tested on raw bytes.
//!
//! Everything on the wire is big-endian.

// The protocol's numbers, shared with the nbd plugin's client.
pub use hvm_nbd_proto::*;

/// Largest option payload the server reads; longer options are answered with
/// `NBD_REP_ERR_TOO_BIG` after their payload is skipped, or the connection is closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE payload the server accepts (the advertised maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Bytes of a client option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// The server's first 18 bytes.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// What the client's 4-byte flags say, or why the server must close the connection (the
/// spec: a server that does not recognise the client's flags MUST close).
pub fn client_flags(bytes: [u8; 4]) -> Result<(bool, bool), ProtoError> {
    let f = u32::from_be_bytes(bytes);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::ClientFlags(f));
    }
    Ok((f & FLAG_C_FIXED_NEWSTYLE != 0, f & FLAG_C_NO_ZEROES != 0))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("option magic is {0:#x}, expected IHAVEOPT")]
    OptionMagic(u64),
    #[error("request magic is {0:#x}, expected {REQUEST_MAGIC:#x}")]
    RequestMagic(u32),
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong { option: u32, len: u32 },
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Parse; a bad magic is a protocol violation (close the connection). An oversized
    /// length is reported separately so the server can decide to skip or close.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
        let magic = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(ProtoError::OptionMagic(magic));
        }
        let option = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        let len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        if len > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLong { option, len });
        }
        Ok(OptionHeader { option, len })
    }
}

/// An option reply: header then `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&reply.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// The export info sent for `NBD_OPT_EXPORT_NAME` (size, flags, and 124 zero bytes
/// unless the client asked for no zeroes).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut r = Vec::with_capacity(134);
    r.extend_from_slice(&size.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        r.extend_from_slice(&[0u8; 124]);
    }
    r
}

/// `NBD_INFO_EXPORT` payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// `NBD_INFO_BLOCK_SIZE` payload: minimum, preferred, maximum.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: an export name and requested info types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// `None` means the data is malformed (`NBD_REP_ERR_INVALID`).
    pub fn parse(d: &[u8]) -> Option<InfoRequest> {
        let (name, rest) = string32(d)?;
        let n = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
        let list = rest.get(2..)?;
        if list.len() != 2 * n {
            return None;
        }
        let requests = list
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some(InfoRequest { name, requests })
    }
}

/// A 32-bit-length-prefixed UTF-8 string (no NUL, at most 4096 bytes), and the rest.
fn string32(d: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(d.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_STRING {
        return None;
    }
    let s = std::str::from_utf8(d.get(4..4 + len)?).ok()?;
    if s.contains('\0') {
        return None;
    }
    Some((s.to_string(), &d[4 + len..]))
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`: an export name
/// and the queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(d: &[u8]) -> Option<MetaContextRequest> {
        let (export, mut rest) = string32(d)?;
        let n = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        let mut queries = Vec::new();
        for _ in 0..n {
            let (q, r) = string32(rest)?;
            queries.push(q);
            rest = r;
        }
        rest.is_empty()
            .then_some(MetaContextRequest { export, queries })
    }
}

/// `NBD_REP_META_CONTEXT` data: context id then name.
pub fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// `NBD_REP_SERVER` data for `NBD_OPT_LIST`: name length, name.
pub fn server_reply(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::RequestMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// The flags a command may carry; anything else is EINVAL.
    pub fn allowed_flags(kind: u16) -> u16 {
        match kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
    }
}

/// A simple reply header (data, for a successful READ, follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..].copy_from_slice(&cookie.to_be_bytes());
    r
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn structured_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&flags.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..].copy_from_slice(&len.to_be_bytes());
    r
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk (final), with a message for a human.
pub fn structured_error(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut payload = errno.to_be_bytes().to_vec();
    payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    payload.extend_from_slice(msg);
    let mut r = structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        payload.len() as u32,
    )
    .to_vec();
    r.extend_from_slice(&payload);
    r
}

/// A `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id, then (length, flags) extents.
pub fn block_status_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + 8 * extents.len());
    p.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(client_flags([0, 0, 0, 3]), Ok((true, true)));
        assert_eq!(client_flags([0, 0, 0, 4]), Err(ProtoError::ClientFlags(4)));
    }

    #[test]
    fn options() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(b"IHAVEOPT");
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            OptionHeader::parse(&h),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 10
            })
        );
        h[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            OptionHeader::parse(&h),
            Err(ProtoError::OptionTooLong { .. })
        ));
        h[0] = b'X';
        assert!(matches!(
            OptionHeader::parse(&h),
            Err(ProtoError::OptionMagic(_))
        ));

        // NBD_OPT_GO data: name "db", two info requests.
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"db");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            InfoRequest::parse(&d),
            Some(InfoRequest {
                name: "db".into(),
                requests: vec![3, 1]
            })
        );
        assert_eq!(InfoRequest::parse(&d[..d.len() - 1]), None);
        let mut long = (5000u32).to_be_bytes().to_vec();
        long.resize(4 + 5000 + 2, b'a');
        assert_eq!(
            InfoRequest::parse(&long),
            None,
            "names over 4096 bytes are invalid"
        );

        let mut m = 2u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"db");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&9u32.to_be_bytes());
        m.extend_from_slice(b"hvm:dirty");
        assert_eq!(
            MetaContextRequest::parse(&m),
            Some(MetaContextRequest {
                export: "db".into(),
                queries: vec!["hvm:dirty".into()]
            })
        );
        assert_eq!(option_reply(OPT_GO, REP_ACK, &[]).len(), 20);
    }

    #[test]
    fn requests_and_replies() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            len: 512,
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] = 0;
        assert!(matches!(
            Request::parse(&bad),
            Err(ProtoError::RequestMagic(_))
        ));
        assert_eq!(Request::allowed_flags(CMD_READ) & CMD_FLAG_FUA, 0);
        let e = structured_error(9, 22, "past the end");
        assert_eq!(&e[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(
            u32::from_be_bytes([e[16], e[17], e[18], e[19]]) as usize,
            e.len() - 20
        );
        assert_eq!(
            block_status_payload(1, &[(4096, 0), (512, 1)]).len(),
            4 + 16
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::parse(&bytes);
            let _ = MetaContextRequest::parse(&bytes);
            if let Ok(a) = <[u8; 16]>::try_from(&bytes[..bytes.len().min(16)]) {
                let _ = OptionHeader::parse(&a);
            }
            if let Ok(a) = <[u8; 28]>::try_from(&bytes[..bytes.len().min(28)]) {
                let _ = Request::parse(&a);
            }
        }
    }
}
