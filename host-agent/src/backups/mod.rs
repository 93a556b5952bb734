//! Backups as a product (issue 19): where backups live ([`store`]), and — built on it —
//! the chunked, checksummed format, the catalog, retention and restore.

pub mod s3;
pub mod catalog;
pub mod chunks;
pub mod extents;
pub mod format;
pub mod legacy;
pub mod restore;
pub mod retention;
pub mod store;
