//! hvm host-agent: the service that loads backend plugins, serves virtual LUs over NBD,
//! persists hvm-core's tables and coordinates online backups.
//!
//! The data-path and control issues fill this crate; for now only the crate exists.
