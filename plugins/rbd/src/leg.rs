//! [`RbdLeg`]: one RBD image as a leg of an hvm volume.

use std::collections::BTreeMap;
use std::sync::Arc;

use hvm_core::backend::{BackendError, BackendErrorKind};
use hvm_legs::Leg;

use crate::ceph::{CephError, Cluster, Image, Pool};

fn io(e: CephError) -> BackendError {
    BackendError::new(BackendErrorKind::Io, e.to_string())
}

/// The connected cluster and the pools opened on it, shared by the legs.
pub struct Pools {
    cluster: Arc<Cluster>,
    fsid: String,
    open: BTreeMap<String, Arc<Pool>>,
}

impl Pools {
    pub fn new(cluster: Arc<Cluster>) -> Result<Pools, CephError> {
        let fsid = cluster.fsid()?;
        Ok(Pools {
            cluster,
            fsid,
            open: BTreeMap::new(),
        })
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn pool(&mut self, name: &str) -> Result<Arc<Pool>, CephError> {
        if let Some(p) = self.open.get(name) {
            return Ok(Arc::clone(p));
        }
        let p = self.cluster.pool(name)?;
        self.open.insert(name.to_string(), Arc::clone(&p));
        Ok(p)
    }
}

/// An RBD image used as a leg.
pub struct RbdLeg {
    image: Image,
    name: String,
    identity: String,
    size: u64,
}

impl RbdLeg {
    /// Open `pool/image`; when it does not exist and `create` is `Some(size)`, create it
    /// with that size first.
    pub fn open(pools: &mut Pools, spec: &str, create: Option<u64>) -> Result<RbdLeg, String> {
        let (pool_name, image_name) = match spec.split_once('/') {
            Some((p, i)) if !p.is_empty() && !i.is_empty() && !i.contains('/') => (p, i),
            _ => return Err(format!("leg {spec:?}: expected pool/image")),
        };
        let pool = pools
            .pool(pool_name)
            .map_err(|e| format!("leg {spec}: {e}"))?;
        let image = match (pool.open_image(image_name), create) {
            (Ok(image), _) => image,
            (Err(e), Some(size)) if e.is_not_found() => {
                pool.create_image(image_name, size)
                    .map_err(|e| format!("leg {spec}: {e}"))?;
                pool.open_image(image_name)
                    .map_err(|e| format!("leg {spec}: {e}"))?
            }
            (Err(e), _) => return Err(format!("leg {spec}: {e}")),
        };
        let size = image.size().map_err(|e| e.to_string())?;
        let id = image.id().map_err(|e| e.to_string())?;
        Ok(RbdLeg {
            identity: format!("rbd:{}/{}/{id}", pools.fsid, pool.id()),
            image,
            name: spec.to_string(),
            size,
        })
    }

    /// The opened image, for what the leg interface does not cover (change tracking).
    pub fn image(&self) -> &Image {
        &self.image
    }
}

impl Leg for RbdLeg {
    fn size(&self) -> u64 {
        self.size
    }

    /// `rbd:<cluster fsid>/<pool id>/<image id>`: unchanged by renaming the pool or image.
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.image.read(offset, buf).map_err(io)
    }

    /// FUA is the write, then a flush of the image.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.image.write(offset, data).map_err(io)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.image.flush().map_err(io)
    }

    /// `rbd_aio_write_zeroes`, whether or not `unmap` allows deallocation: librbd
    /// deallocates the whole objects it covers by itself, and zeroes the rest. (A discard
    /// would not do: librbd skips partial-object discards by default, so they would not
    /// read back as zeroes.)
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        self.image.write_zeroes(offset, len).map_err(io)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Both images' writes in flight at once from this thread (two AIO completions).
    fn write_both(
        &self,
        other: &Self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Option<Result<(), BackendError>> {
        let (a, b) = Image::write_pair(&self.image, &other.image, offset, data);
        let mut r = a.map_err(io).and(b.map_err(io));
        if r.is_ok() && fua {
            let (a, b) = Image::flush_pair(&self.image, &other.image);
            r = a.map_err(io).and(b.map_err(io));
        }
        Some(r)
    }
}
