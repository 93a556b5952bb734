//! An S3 bucket as a backup [`Store`] (`s3://BUCKET/PREFIX`): AWS S3, Ceph radosgw, MinIO,
//! through the `object_store` crate.
//!
//! Settings come from the standard AWS environment variables, read when the store is
//! opened (on the backup host that is the agent's environment, e.g. systemd's
//! `EnvironmentFile=`):
//!
//! - `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`): the endpoint, for anything but AWS; requests
//!   are path-style (`ENDPOINT/BUCKET/KEY`), which every S3 server takes;
//! - `AWS_REGION` (or `AWS_DEFAULT_REGION`), default `us-east-1`;
//! - `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else the
//!   profile `AWS_PROFILE` (default `default`) of the credentials file
//!   `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`), the file the AWS CLI
//!   writes. No instance-metadata lookup: a host without keys gets a one-line error;
//! - `AWS_ALLOW_HTTP=true`: allow a plain `http://` endpoint. Without it such an
//!   endpoint is refused (keys would be signed over, and data sent in, clear text).
//!
//! Every write is one request (PUT, or a multipart upload completed in one request), so an
//! object is whole or absent, as [`Store`] asks. Objects from [`MULTIPART_FROM`] bytes go
//! up in [`PART`]-byte parts, [`PARTS_IN_FLIGHT`] at once.
//!
//! `put_if_absent` is a conditional PUT (`If-None-Match: *`; 412 means the object is
//! there): one request instead of HEAD+PUT, and exact even when two writers race. Ceph
//! 16.2 honours it on PUT but ignores it on CompleteMultipartUpload, so an object large
//! enough for multipart is HEAD+PUT; that path is only safe because the format's keys that
//! use it are content-addressed (two racing writers write the same bytes).
//!
//! Calls are synchronous. The store owns a small multi-thread tokio runtime; each call is
//! spawned on it and the calling thread waits for the result, so the store can be called
//! from several threads at once (the format's writer chooses the parallelism), from plain
//! threads and from `spawn_blocking` threads (the coordination server runs the backup
//! role's copy there), and even from another runtime's worker, where `block_on` would
//! panic (it only blocks that worker).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::store::{check_key, Store, StoreError};

/// Objects of this size and larger go up as multipart uploads.
pub const MULTIPART_FROM: usize = 32 << 20;
/// The part size of a multipart upload.
pub const PART: usize = 8 << 20;
/// Parts of one upload sent at once.
pub const PARTS_IN_FLIGHT: usize = 4;
/// Worker threads of the store's runtime (they only drive I/O).
const WORKERS: usize = 2;

/// Where and how to reach the S3 server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    pub allow_http: bool,
    /// How long a request is retried on transport errors and 5xx before it fails.
    pub retry_secs: u64,
}

impl S3Options {
    /// From the standard AWS environment variables (see the module's doc).
    pub fn from_env() -> Result<S3Options, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut o = S3Options {
            endpoint: var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT")),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            allow_http: var("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            retry_secs: 60,
            ..S3Options::default()
        };
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(a), Some(s)) => {
                (o.access_key, o.secret_key) = (a, s);
                o.session_token = var("AWS_SESSION_TOKEN");
            }
            _ => {
                let file = var("AWS_SHARED_CREDENTIALS_FILE")
                    .map(PathBuf::from)
                    .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))
                    .ok_or("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE")?;
                let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
                (o.access_key, o.secret_key, o.session_token) = credentials_file(&file, &profile)?;
            }
        }
        Ok(o)
    }
}

/// The keys of `profile` in an AWS credentials file (INI: `[profile]`, `key = value`).
fn credentials_file(
    file: &std::path::Path,
    profile: &str,
) -> Result<(String, String, Option<String>), String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "no S3 credentials: AWS_ACCESS_KEY_ID is not set and {} cannot be read: {e}",
            file.display()
        )
    })?;
    let (mut section, mut keys) = (String::new(), std::collections::BTreeMap::new());
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            if section == profile {
                keys.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    match (
        keys.remove("aws_access_key_id"),
        keys.remove("aws_secret_access_key"),
    ) {
        (Some(a), Some(s)) => Ok((a, s, keys.remove("aws_session_token"))),
        _ => Err(format!(
            "{}: profile [{profile}] has no aws_access_key_id and aws_secret_access_key",
            file.display()
        )),
    }
}

/// `s3://BUCKET/PREFIX` split into a bucket and a (possibly empty) key prefix.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?} is not an s3://BUCKET/PREFIX URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/');
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'));
    if !bucket_ok {
        return Err(format!(
            "{url}: bucket {bucket:?} must be 3-63 characters of a-z, 0-9, '.' and '-'"
        ));
    }
    if !prefix.is_empty() && check_key(url, prefix).is_err() {
        return Err(format!(
            "{url}: prefix {prefix:?} must be '/'-separated parts of A-Z a-z 0-9 . _ - (none starting with '.')"
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// A bucket (and key prefix) on an S3 server.
pub struct S3Store {
    s3: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
}

impl S3Store {
    /// `s3://BUCKET/PREFIX` with settings from the environment.
    pub fn open(url: &str) -> Result<S3Store, StoreError> {
        let remote = |message: String| StoreError::Remote {
            location: url.to_string(),
            message,
        };
        let o = S3Options::from_env().map_err(remote)?;
        S3Store::open_with(url, &o)
    }

    /// `s3://BUCKET/PREFIX` with explicit settings. Nothing is sent yet.
    pub fn open_with(url: &str, o: &S3Options) -> Result<S3Store, StoreError> {
        let remote = |message: String| StoreError::Remote {
            location: url.to_string(),
            message,
        };
        let (bucket, prefix) = parse_url(url).map_err(remote)?;
        if let Some(e) = &o.endpoint {
            if e.starts_with("http://") && !o.allow_http {
                return Err(remote(format!(
                    "endpoint {e} is plain HTTP; set AWS_ALLOW_HTTP=true to allow it"
                )));
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("hvm-s3")
            .enable_all()
            .build()
            .map_err(|e| remote(format!("cannot start the S3 client's runtime: {e}")))?;
        let s3 = builder(&bucket, o)
            .build()
            .map_err(|e| remote(one_line(&e)))?;
        Ok(S3Store {
            s3: Arc::new(s3),
            bucket,
            prefix,
            rt: Some(rt),
        })
    }

    /// Run `f` on the store's runtime and wait for it (see the module's doc).
    fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, object_store::Error>> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| self.remote("closed".into()))?;
        let joined = futures::executor::block_on(rt.spawn(f));
        match joined {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(e) => Err(self.remote(format!("S3 request task failed: {e}"))),
        }
    }

    fn path(&self, key: &str) -> Result<Path, StoreError> {
        check_key(&self.location(), key)?;
        Ok(if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        })
    }

    fn remote(&self, message: String) -> StoreError {
        StoreError::Remote {
            location: self.location(),
            message,
        }
    }

    fn error(&self, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { path, .. } => StoreError::NotFound {
                location: self.location(),
                key: self.key_of(&path).unwrap_or(path),
            },
            e => self.remote(one_line(&e)),
        }
    }

    /// The store's key of an object path, if it is under the prefix.
    fn key_of(&self, path: &str) -> Option<String> {
        if self.prefix.is_empty() {
            return Some(path.to_string());
        }
        path.strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')
            .map(str::to_string)
    }

    /// A multipart upload of `data` in [`PART`]-byte parts, [`PARTS_IN_FLIGHT`] at once.
    fn put_multipart(&self, path: Path, data: Vec<u8>) -> Result<(), StoreError> {
        let s3 = self.s3.clone();
        self.call(async move {
            let upload = s3.put_multipart(&path).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            for part in data.chunks(PART) {
                if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    let _ = w.abort().await;
                    return Err(e);
                }
                w.write(part);
            }
            w.finish().await.map(|_| ())
        })
    }
}

fn builder(bucket: &str, o: &S3Options) -> AmazonS3Builder {
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 10,
        retry_timeout: Duration::from_secs(o.retry_secs.max(1)),
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&o.region)
        .with_access_key_id(&o.access_key)
        .with_secret_access_key(&o.secret_key)
        .with_virtual_hosted_style_request(false)
        .with_allow_http(o.allow_http)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_retry(retry)
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(o.allow_http)
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(120)),
        );
    if let Some(e) = &o.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(t) = &o.session_token {
        b = b.with_token(t);
    }
    b
}

/// An error and its causes on one line (a cause already in the text is not repeated).
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = c.source();
    }
    s.replace(['\n', '\r'], " ")
}

impl Store for S3Store {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        if data.len() >= MULTIPART_FROM {
            return self.put_multipart(path, data.to_vec());
        }
        let s3 = self.s3.clone();
        let payload = PutPayload::from(data.to_vec());
        self.call(async move { s3.put(&path, payload).await.map(|_| ()) })
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        if data.len() >= MULTIPART_FROM {
            // Multipart completion ignores If-None-Match on Ceph 16.2: HEAD first.
            if self.exists(key)? {
                return Ok(false);
            }
            return self.put_multipart(path, data.to_vec()).map(|()| true);
        }
        let s3 = self.s3.clone();
        let payload = PutPayload::from(data.to_vec());
        self.call(async move {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match s3.put_opts(&path, payload, opts).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        self.call(async move {
            let r = s3.get(&path).await?;
            Ok(r.bytes().await?.to_vec())
        })
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        self.call(async move {
            match s3.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn size(&self, key: &str) -> Result<u64, StoreError> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        self.call(async move { s3.head(&path).await.map(|m| m.size) })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        // object_store lists by whole path parts: ask for the parent "directory" of the
        // prefix and keep the keys that start with it.
        let dir = match prefix.rsplit_once('/') {
            Some((d, _)) => format!("{}/{d}", self.prefix),
            None => self.prefix.clone(),
        };
        let dir = dir.trim_matches('/').to_string();
        let s3 = self.s3.clone();
        let paths: Vec<String> = self.call(async move {
            let p = (!dir.is_empty()).then(|| Path::from(dir));
            let metas: Vec<_> = s3.list(p.as_ref()).try_collect().await?;
            Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
        })?;
        let mut keys: Vec<String> = paths
            .iter()
            .filter_map(|p| self.key_of(p))
            .filter(|k| k.starts_with(prefix))
            .collect();
        keys.sort();
        Ok(keys)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        self.call(async move {
            match s3.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // Never blocks, so dropping the store inside an async context cannot panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://backups/db1/pg").unwrap(),
            ("backups".into(), "db1/pg".into())
        );
        assert_eq!(
            parse_url("s3://backups").unwrap(),
            ("backups".into(), "".into())
        );
        assert_eq!(
            parse_url("s3://backups/").unwrap(),
            ("backups".into(), "".into())
        );
        for bad in [
            "s3://b1/x",
            "s3://Upper/x",
            "http://x/y",
            "s3://bkt/../x",
            "s3://bkt/a//b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_needs_allow_http() {
        let o = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: "us-east-1".into(),
            access_key: "a".into(),
            secret_key: "s".into(),
            ..S3Options::default()
        };
        let Err(e) = S3Store::open_with("s3://bucket/p", &o) else {
            panic!("plain HTTP allowed");
        };
        assert!(e.to_string().contains("AWS_ALLOW_HTTP"), "{e}");
        let o = S3Options {
            allow_http: true,
            ..o
        };
        let s = S3Store::open_with("s3://bucket/p", &o).unwrap();
        assert_eq!(s.location(), "s3://bucket/p");
        assert_eq!(s.key_of("p/chunks/ab").as_deref(), Some("chunks/ab"));
        assert_eq!(s.key_of("pq/chunks/ab"), None);
    }

    #[test]
    fn credentials_from_a_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("credentials");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id = A1\naws_secret_access_key = S1\n\n[bk]\naws_access_key_id=A2\naws_secret_access_key=S2\naws_session_token = T2\n",
        )
        .unwrap();
        assert_eq!(
            credentials_file(&f, "default").unwrap(),
            ("A1".into(), "S1".into(), None)
        );
        assert_eq!(
            credentials_file(&f, "bk").unwrap(),
            ("A2".into(), "S2".into(), Some("T2".into()))
        );
        assert!(credentials_file(&f, "nope").unwrap_err().contains("[nope]"));
    }
}
