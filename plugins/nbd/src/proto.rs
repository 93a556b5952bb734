//! The NBD wire protocol as a client sees it (the NBD project's `doc/proto.md`): the
//! protocol's numbers and the request header (`hvm-nbd-proto`, shared with host-agent's
//! server), and what only this client needs.
//!
//! Everything on the wire is big-endian.

// The protocol's numbers, shared with host-agent's server.
pub use hvm_nbd_proto::*;

/// The largest READ/WRITE payload a client may assume without `NBD_INFO_BLOCK_SIZE`.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest option reply or error chunk payload the client reads; longer is a protocol
/// error (the spec caps strings at 4096 bytes).
pub const MAX_SMALL_PAYLOAD: u32 = 64 * 1024;

/// Big-endian readers over a byte slice already known to be long enough.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
