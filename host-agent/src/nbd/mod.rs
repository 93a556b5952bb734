//! The NBD server that exports virtual LUs: [`proto`], the wire protocol, and
//! [`server`], the handshake and transmission over any [`server::Export`], with the
//! transmission phase on worker threads (`transmission`); [`client`], a small blocking
//! client for hvmctl.
pub mod client;
pub mod proto;
pub mod server;
mod transmission;
