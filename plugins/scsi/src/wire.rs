//! The wire format between a host and an array-sim daemon (`connect: unix:|tcp:`):
//! length-prefixed frames, many tagged commands in flight per connection, replies in any
//! order.
//!
//! Every frame is `len: u32 LE` followed by `len` bytes of body.
//!
//! - Request body: `tag: u64 LE`, `lun: u8`, `cdb_len: u8`, `cdb`, then data-out (the
//!   rest of the frame).
//! - Response body: `tag: u64 LE`, `status: u8`, `sense_len: u8`, `sense`, then data-in.
//!
//! A frame longer than [`MAX_FRAME`], or too short for its header, is a protocol error
//! and the connection is closed; the daemon never reads past a frame it cannot trust.

/// Largest frame body: a 32 MiB transfer plus headers.
pub const MAX_FRAME: u32 = 32 * 1024 * 1024 + 4096;
const REQUEST_HEADER: usize = 10;
/// A response body's fixed part: tag, status, sense length (the last byte).
pub const RESPONSE_HEADER: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not enough bytes yet for a whole frame.
    #[error("incomplete frame")]
    Incomplete,
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLong(u32),
    #[error("frame of {found} bytes is shorter than its {needed}-byte header")]
    TooShort { found: usize, needed: usize },
}

/// The body length a frame's 4-byte prefix announces, if it is within the limit.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    Ok(len as usize)
}

/// The body length of the frame at the start of `buf`, once all of it is there.
pub fn check(buf: &[u8]) -> Result<usize, FrameError> {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Err(FrameError::Incomplete);
    };
    let len = body_len([a, b, c, d])?;
    if buf.len() < 4 + len {
        return Err(FrameError::Incomplete);
    }
    Ok(len)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub tag: u64,
    pub lun: u8,
    pub cdb: &'a [u8],
    pub data: &'a [u8],
}

impl<'a> Request<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Request<'a>, FrameError> {
        let short = FrameError::TooShort {
            found: body.len(),
            needed: REQUEST_HEADER,
        };
        if body.len() < REQUEST_HEADER {
            return Err(short);
        }
        let tag = u64::from_le_bytes(body[..8].try_into().map_err(|_| short.clone())?);
        let cdb_len = usize::from(body[9]);
        let cdb =
            body.get(REQUEST_HEADER..REQUEST_HEADER + cdb_len)
                .ok_or(FrameError::TooShort {
                    found: body.len(),
                    needed: REQUEST_HEADER + cdb_len,
                })?;
        Ok(Request {
            tag,
            lun: body[8],
            cdb,
            data: &body[REQUEST_HEADER + cdb_len..],
        })
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let body = REQUEST_HEADER + self.cdb.len() + self.data.len();
        let mut f = Vec::with_capacity(4 + body);
        f.extend_from_slice(&(body as u32).to_le_bytes());
        f.extend_from_slice(&self.tag.to_le_bytes());
        f.push(self.lun);
        f.push(self.cdb.len() as u8);
        f.extend_from_slice(self.cdb);
        f.extend_from_slice(self.data);
        f
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<'a> {
    pub tag: u64,
    pub status: u8,
    pub sense: &'a [u8],
    pub data: &'a [u8],
}

impl<'a> Response<'a> {
    /// A response body's length up to its data-in: the fixed part, whose last byte is
    /// the sense length, and the sense.
    pub fn head_len(fixed: &[u8; RESPONSE_HEADER]) -> usize {
        RESPONSE_HEADER + usize::from(fixed[RESPONSE_HEADER - 1])
    }

    pub fn parse(body: &'a [u8]) -> Result<Response<'a>, FrameError> {
        let short = FrameError::TooShort {
            found: body.len(),
            needed: RESPONSE_HEADER,
        };
        if body.len() < RESPONSE_HEADER {
            return Err(short);
        }
        let tag = u64::from_le_bytes(body[..8].try_into().map_err(|_| short.clone())?);
        let sense_len = usize::from(body[9]);
        let sense = body
            .get(RESPONSE_HEADER..RESPONSE_HEADER + sense_len)
            .ok_or(FrameError::TooShort {
                found: body.len(),
                needed: RESPONSE_HEADER + sense_len,
            })?;
        Ok(Response {
            tag,
            status: body[8],
            sense,
            data: &body[RESPONSE_HEADER + sense_len..],
        })
    }

    /// The frame header (length prefix, tag, status, sense); the data follows it.
    pub fn header(tag: u64, status: u8, sense: &[u8], data_len: usize) -> Vec<u8> {
        let body = RESPONSE_HEADER + sense.len() + data_len;
        let mut f = Vec::with_capacity(4 + RESPONSE_HEADER + sense.len());
        f.extend_from_slice(&(body as u32).to_le_bytes());
        f.extend_from_slice(&tag.to_le_bytes());
        f.push(status);
        f.push(sense.len() as u8);
        f.extend_from_slice(sense);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            tag: 7,
            lun: 3,
            cdb: &[0x88, 0, 1],
            data: &[9, 9],
        };
        let f = r.encode();
        let len = check(&f).unwrap();
        assert_eq!(len, f.len() - 4);
        assert_eq!(Request::parse(&f[4..]).unwrap(), r);
        assert_eq!(check(&f[..f.len() - 1]), Err(FrameError::Incomplete));
    }

    #[test]
    fn response_round_trip() {
        let mut f = Response::header(9, 2, &[0x70, 0, 5], 4);
        f.extend_from_slice(&[1, 2, 3, 4]);
        let len = check(&f).unwrap();
        let r = Response::parse(&f[4..4 + len]).unwrap();
        assert_eq!(
            (r.tag, r.status, r.sense, r.data),
            (9, 2, &[0x70, 0, 5][..], &[1, 2, 3, 4][..])
        );
    }

    #[test]
    fn bad_frames() {
        assert_eq!(
            check(&u32::MAX.to_le_bytes()),
            Err(FrameError::TooLong(u32::MAX))
        );
        assert!(matches!(
            Request::parse(&[0; 5]),
            Err(FrameError::TooShort { .. })
        ));
        // A CDB length past the end of the frame.
        let mut body = vec![0u8; 10];
        body[9] = 16;
        assert!(matches!(
            Request::parse(&body),
            Err(FrameError::TooShort { needed: 26, .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = check(&bytes);
            let _ = Request::parse(&bytes);
            let _ = Response::parse(&bytes);
        }
    }
}
