//! Backups as a product (issue 19): where backups live ([`store`]), and — built on it —
//! the chunked, checksummed format, the catalog, retention and restore.

pub mod catalog;
pub mod chunks;
pub mod extents;
pub mod format;
pub mod legacy;
pub mod restore;
pub mod retention;
pub mod s3;
pub mod store;

/// The store a user names: `s3://BUCKET/PREFIX` (an [`s3::S3Store`], settings from the
/// AWS environment variables) or a directory path ([`store::open`]). Here, above both,
/// so that `store` and `s3` do not import each other.
pub fn open(url_or_path: &str) -> Result<Box<dyn store::Store>, store::StoreError> {
    if url_or_path.starts_with("s3://") {
        return Ok(Box::new(s3::S3Store::open(url_or_path)?));
    }
    store::open(url_or_path)
}
