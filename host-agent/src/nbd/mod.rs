//! The NBD server that exports virtual LUs, split by protocol phase as nbdkit is:
//! [`proto`], the wire protocol; [`export`], what is served (the export list and lookup);
//! `handshake`, the newstyle negotiation and its options (STARTTLS, INFO/GO, LIST,
//! metadata contexts); `transmission`, the request loop on worker threads; [`server`],
//! the accept loops, limits and wiring. [`client`], a small blocking client for hvmctl.
pub mod client;
pub mod export;
mod handshake;
pub mod proto;
pub mod server;
mod transmission;
