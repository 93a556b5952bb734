//! array-sim: the simulated disk array (Mode Select, stateless and pre-update firmware,
//! disk units with a load model, SCSI semantics over a socket, fault injection).
//!
//! - [`scsi`]: the command set both the array and its drivers speak.
//! - [`config`]: the array's YAML configuration.
//! - [`disk`]: disk units with counters and a service-time model.
//! - [`fault`]: fault injection.
//! - [`engine`]: the firmware of the three kinds over LU files.

pub mod config;
pub mod disk;
pub mod engine;
pub mod fault;
pub mod scsi;
