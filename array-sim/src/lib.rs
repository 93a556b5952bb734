//! array-sim: the simulated disk array (Mode Select, stateless and pre-update firmware,
//! disk units with a load model, SCSI semantics over a socket, fault injection).
//!
//! Built so far: [`scsi`], the command set both the array and its drivers speak. The
//! firmware, the disk units, the daemon and the client library follow in the array-sim
//! issue.

pub mod scsi;
