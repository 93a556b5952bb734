//! The NBD server that exports virtual LUs. So far: [`proto`], the wire protocol.
pub mod proto;
