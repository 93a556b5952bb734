//! array-sim: the simulated disk array (Mode Select, stateless and pre-update firmware,
//! disk units with a load model, SCSI semantics over a socket, fault injection).
//!
//! Filled in by the array-sim issue; for now only the crate exists.
