//! What is served: the [`Export`] trait a served thing implements, the [`Exports`] a
//! server offers one peer (listing and lookup by name), the errors and metadata contexts
//! they speak in, and the [`Session`] a connection's handshake ends with: the export it
//! chose and the reply shape it negotiated.

use std::collections::BTreeMap;
use std::sync::Arc;

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

/// A connection's chosen export, as negotiated in the handshake.
pub(super) struct Session {
    pub(super) name: String,
    pub(super) export: Arc<dyn Export>,
    pub(super) structured: bool,
    /// Selected metadata contexts: (id, name).
    pub(super) contexts: Vec<(u32, &'static str)>,
}
