//! array-sim: the simulated disk array (Mode Select, stateless and pre-update firmware,
//! disk units with a load model, SCSI semantics over a socket, fault injection).
//!
//! - [`scsi`]: the command set both the array and its drivers speak (hvm-scsi's).
//! - [`config`]: the array's YAML configuration.
//! - [`disk`]: disk units with counters and a service-time model.
//! - [`geometry`] and [`outcome`]: the leaves: the block size and other units, a
//!   command's outcome and the array's work counters. `store` (crate-private): the LU
//!   files and the range locks over them, shared by the firmware and the background copies.
//! - [`fault`]: fault injection.
//! - [`engine`]: the firmware of the three kinds over LU files.
//! - [`backup`] and [`tape`]: the array-side backup functions of EP 1 058 190 and the
//!   backup device's medium.
//! - [`bitmaps`]: the difference bitmaps and the file that keeps them across a restart.
//! - [`channel`] and its part [`remote`]: channel paths between arrays, the channel port,
//!   and remote pairs (Fig. 8, [0053]-[0058]).
//! - [`mirror`]: what keeps a mirror's legs identical (range locks, write intents).
//! - [`proto`] and [`server`]: the daemon's wire format and server.
//! - [`client`]: the engine in this process as a transport of hvm-scsi's `ArrayClient`
//!   (re-exported with the socket client), and the SET FAULT command.
//! - [`switch`]: the copy agents of [0059] (the switch) and [0060] (the backup device).
//! - [`driver`]: the embedded transport of the driver plugins (the array in their process).

pub mod backup;
pub mod bitmaps;
pub mod channel;
pub mod client;
pub mod config;
pub mod disk;
pub mod driver;
pub mod engine;
pub mod fault;
pub mod geometry;
pub mod mirror;
pub mod outcome;
pub mod proto;
pub mod scsi;
pub mod server;
pub(crate) mod store;
pub mod switch;
pub mod tape;

/// Remote pairs live in the channel component; the old path is kept for outside users.
pub use channel::remote;
