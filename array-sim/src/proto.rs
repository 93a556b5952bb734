//! The daemon's wire format, shared with its client in hvm-scsi (`hvm_scsi::wire`).

pub use hvm_scsi::wire::*;
