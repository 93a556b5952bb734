//! hvm-scsi: what hvm's array drivers need to speak SCSI to an array, real or simulated.
//!
//! - [`sense`]: status bytes and sense data (fixed and descriptor format).
//! - [`cdb`]: the commands and their CDB layouts.
//! - [`format`]: the commands' data: capacity, LUN lists, mode pages, VPD pages (serial,
//!   identification, hvm's pairing and pair pages), Fig. 5's areas.
//! - [`transport`]: the [`Transport`] trait a command goes through, with many in flight
//!   and a timeout each.
//! - [`reconnect`]: a transport that re-establishes a lost link with backoff.
//! - [`wire`] and [`socket`]: array-sim's daemon protocol and its client transport;
//!   [`buffers`]: READ buffers kept for reuse at both ends of it.
//! - [`iscsi`] (feature `iscsi`): a real target through libiscsi.
//! - [`client`]: [`ArrayClient`], hvm-core's `Backend` over any transport.
//! - [`leg`]: a LUN as a leg of hvm-legs' stateless volumes.
//! - [`driver`]: the drivers' parameters and how they open an array or volumes; [`probe`]:
//!   how a driver refuses a target that lacks its kind's functions.
//!
//! array-sim depends on this crate for the target side (it parses the same CDBs and
//! answers the same sense codes); this crate does not depend on array-sim.

pub mod buffers;
pub mod cdb;
pub mod client;
pub mod driver;
pub mod format;
#[cfg(feature = "iscsi")]
pub mod iscsi;
pub mod leg;
pub mod probe;
pub mod reconnect;
pub mod sense;
pub mod socket;
pub mod transport;
pub mod wire;

pub use buffers::ReadBuffers;
pub use client::ArrayClient;
pub use sense::{Sense, SenseKey};
pub use socket::{Address, SocketClient};
pub use transport::{Response, Transport, TransportError};
