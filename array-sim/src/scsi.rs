//! The SCSI command set array-sim speaks, from hvm-scsi: the array parses the CDBs its
//! drivers build with the same code and answers the sense codes they read back. The
//! table of commands and sense codes is in `hvm_scsi::cdb`.

pub use hvm_scsi::cdb::*;
pub use hvm_scsi::format::*;
pub use hvm_scsi::sense::*;
