//! What one command produced, and the counters of the array's work. A leaf.

use std::sync::atomic::AtomicU64;

/// The answer to one command (hvm-scsi's, which both sides share).
pub use hvm_scsi::Response;

/// What the transport must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Reply(Response),
    /// An injected fault: close the connection without answering.
    Drop,
}

/// Counters of array-side work, for showing what did not pass through a host.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub commands: AtomicU64,
    pub copied_bytes: AtomicU64,
    /// Bytes hosts read and wrote.
    pub host_read_bytes: AtomicU64,
    pub host_write_bytes: AtomicU64,
}
