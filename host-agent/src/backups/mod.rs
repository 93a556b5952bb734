//! Backups as a product (issue 19): where backups live ([`store`]), and — built on it —
//! the chunked, checksummed format, the catalog, retention and restore.

pub mod s3;
pub mod store;
