//! librados and librbd through their stable C API (`rados/librados.h`, `rbd/librbd.h`,
//! Ceph 16.2), linked dynamically. This module holds every `unsafe` of the crate: the
//! declarations, and safe owners of each C handle ([`Cluster`], [`Pool`], [`Image`], and a
//! private completion) that free it in `Drop`, in the order librados needs (an image before
//! its pool's I/O context, that before the cluster handle: each holds an `Arc` of the
//! next).
//!
//! Asynchronous I/O borrows the caller's buffer until librbd completes it. So a pending
//! operation never leaves this module: every public function issues its requests and waits
//! for all of them before it returns, and a pending operation that is dropped early (an
//! error while issuing the second of two) waits for its completion before it is released.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type DiffCallback = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
type CompleteCallback = extern "C" fn(CompletionT, *mut c_void);

// The errno values this module produces or tests for itself (Linux).
const ENOENT: i32 = 2;
const EINVAL: i32 = 22;
const ERANGE: i32 = 34;
const ECANCELED: i32 = 125;

extern "C" {
    fn rados_create2(
        cluster: *mut RadosT,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(
        cluster: RadosT,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_cluster_fsid(cluster: RadosT, buf: *mut c_char, len: usize) -> c_int;
    fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, io: *mut IoCtxT) -> c_int;
    fn rados_ioctx_destroy(io: IoCtxT);
    fn rados_ioctx_get_id(io: IoCtxT) -> i64;

    fn rbd_create(io: IoCtxT, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    fn rbd_open(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    fn rbd_close(image: ImageT) -> c_int;
    fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    fn rbd_get_id(image: ImageT, id: *mut c_char, len: usize) -> c_int;
    fn rbd_snap_create(image: ImageT, name: *const c_char) -> c_int;
    fn rbd_snap_remove(image: ImageT, name: *const c_char) -> c_int;
    fn rbd_diff_iterate2(
        image: ImageT,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: Option<DiffCallback>,
        arg: *mut c_void,
    ) -> c_int;

    fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: Option<CompleteCallback>,
        c: *mut CompletionT,
    ) -> c_int;
    fn rbd_aio_wait_for_complete(c: CompletionT) -> c_int;
    fn rbd_aio_get_return_value(c: CompletionT) -> isize;
    fn rbd_aio_release(c: CompletionT);
    fn rbd_aio_write2(
        image: ImageT,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: CompletionT,
        op_flags: c_int,
    ) -> c_int;
    fn rbd_aio_read(image: ImageT, off: u64, len: usize, buf: *mut c_char, c: CompletionT)
        -> c_int;
    fn rbd_aio_discard(image: ImageT, off: u64, len: u64, c: CompletionT) -> c_int;
    fn rbd_aio_write_zeroes(
        image: ImageT,
        off: u64,
        len: usize,
        c: CompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    fn rbd_aio_flush(image: ImageT, c: CompletionT) -> c_int;
}

/// A failed librados or librbd call: what was asked, of what, and the errno it gave.
#[derive(Debug, thiserror::Error)]
#[error("{op} {what}: {}", std::io::Error::from_raw_os_error(*.errno))]
pub struct CephError {
    pub op: &'static str,
    pub what: String,
    /// A positive errno (librados returns them negated).
    pub errno: i32,
}

impl CephError {
    pub fn is_not_found(&self) -> bool {
        self.errno == ENOENT
    }
}

/// `Ok(r)` for `r >= 0`, else the error of `-r`.
fn check(r: isize, op: &'static str, what: &str) -> Result<isize, CephError> {
    if r >= 0 {
        Ok(r)
    } else {
        Err(CephError {
            op,
            what: what.to_string(),
            errno: i32::try_from(-r).unwrap_or(EINVAL),
        })
    }
}

fn cstring(text: &str, op: &'static str) -> Result<CString, CephError> {
    CString::new(text).map_err(|_| CephError {
        op,
        what: format!("{text:?} (contains a NUL byte)"),
        errno: EINVAL,
    })
}

/// A connected cluster handle (`rados_t`).
pub struct Cluster {
    handle: RadosT,
}

// SAFETY: librados handles are thread-safe: every call may come from any thread, which is
// how QEMU and the rbd tool use them.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connect as cephx user `client` (`admin` for `client.admin`) with the settings of
    /// `conf`, then `options` (name, value) on top, each as in ceph.conf.
    pub fn connect(
        conf: &Path,
        client: &str,
        options: &[(&str, String)],
    ) -> Result<Arc<Cluster>, CephError> {
        let name = cstring(&format!("client.{client}"), "rados_create2")?;
        let cluster_name = cstring("ceph", "rados_create2")?;
        let mut handle: RadosT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; both strings outlive the call.
        let r = unsafe { rados_create2(&mut handle, cluster_name.as_ptr(), name.as_ptr(), 0) };
        check(r as isize, "rados_create2", client)?;
        // From here `cluster` owns the handle and shuts it down on every error path.
        let cluster = Cluster { handle };
        let path = cstring(&conf.to_string_lossy(), "rados_conf_read_file")?;
        // SAFETY: a live handle, not yet connected; the path outlives the call.
        let r = unsafe { rados_conf_read_file(cluster.handle, path.as_ptr()) };
        check(r as isize, "read ceph.conf", &conf.display().to_string())?;
        for (option, value) in options {
            cluster.set(option, value)?;
        }
        // SAFETY: a live, configured handle.
        let r = unsafe { rados_connect(cluster.handle) };
        check(
            r as isize,
            "connect to the cluster of",
            &conf.display().to_string(),
        )?;
        Ok(Arc::new(cluster))
    }

    /// Set a configuration option (before the connection only; used by `connect`).
    fn set(&self, option: &str, value: &str) -> Result<(), CephError> {
        let o = cstring(option, "rados_conf_set")?;
        let v = cstring(value, "rados_conf_set")?;
        // SAFETY: a live handle; both strings outlive the call.
        let r = unsafe { rados_conf_set(self.handle, o.as_ptr(), v.as_ptr()) };
        check(r as isize, "set option", &format!("{option}={value}")).map(|_| ())
    }

    /// The value of a configuration option, as the cluster handle sees it.
    pub fn get(&self, option: &str) -> Result<String, CephError> {
        let o = cstring(option, "rados_conf_get")?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: a live handle; `buf` is writable for its length.
        let r =
            unsafe { rados_conf_get(self.handle, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        check(r as isize, "get option", option)?;
        Ok(c_text(&buf))
    }

    /// The cluster's fsid (a UUID).
    pub fn fsid(&self) -> Result<String, CephError> {
        let mut buf = [0u8; 64];
        // SAFETY: a live, connected handle; `buf` is writable for its length.
        let r = unsafe { rados_cluster_fsid(self.handle, buf.as_mut_ptr().cast(), buf.len()) };
        check(r as isize, "rados_cluster_fsid", "")?;
        Ok(c_text(&buf))
    }

    /// An I/O context on pool `name`.
    pub fn pool(self: &Arc<Self>, name: &str) -> Result<Arc<Pool>, CephError> {
        let n = cstring(name, "rados_ioctx_create")?;
        let mut io: IoCtxT = std::ptr::null_mut();
        // SAFETY: a live, connected handle; out-pointer to a local.
        let r = unsafe { rados_ioctx_create(self.handle, n.as_ptr(), &mut io) };
        check(r as isize, "open pool", name)?;
        Ok(Arc::new(Pool {
            io,
            name: name.to_string(),
            _cluster: Arc::clone(self),
        }))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is live and nothing uses it any more: every pool holds an Arc
        // of this cluster, so all I/O contexts are destroyed already.
        unsafe { rados_shutdown(self.handle) }
    }
}

/// The text of a NUL-terminated C string in `buf`.
fn c_text(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(buf).into_owned())
}

/// An I/O context on one pool (`rados_ioctx_t`).
pub struct Pool {
    io: IoCtxT,
    name: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: an I/O context may be used from many threads at once as long as its settings
// (snapshot context, namespace) are not changed, and this type never changes them.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    pub fn id(&self) -> i64 {
        // SAFETY: a live I/O context.
        unsafe { rados_ioctx_get_id(self.io) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Create image `name` of `size` bytes with the cluster's default format, features and
    /// object size.
    pub fn create_image(&self, name: &str, size: u64) -> Result<(), CephError> {
        let n = cstring(name, "rbd_create")?;
        let mut order: c_int = 0;
        // SAFETY: a live I/O context; out-pointer to a local; the name outlives the call.
        let r = unsafe { rbd_create(self.io, n.as_ptr(), size, &mut order) };
        check(r as isize, "create image", &format!("{}/{name}", self.name)).map(|_| ())
    }

    /// Open image `name` (its head, writable).
    pub fn open_image(self: &Arc<Self>, name: &str) -> Result<Image, CephError> {
        let n = cstring(name, "rbd_open")?;
        let mut image: ImageT = std::ptr::null_mut();
        // SAFETY: a live I/O context; out-pointer to a local; null snapshot = the head.
        let r = unsafe { rbd_open(self.io, n.as_ptr(), &mut image, std::ptr::null()) };
        check(r as isize, "open image", &format!("{}/{name}", self.name))?;
        Ok(Image {
            image,
            spec: format!("{}/{name}", self.name),
            _pool: Arc::clone(self),
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: live, and every image opened in it holds an Arc of this pool, so all are
        // closed already.
        unsafe { rados_ioctx_destroy(self.io) }
    }
}

/// One region reported by [`Image::diff_iterate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    /// `false`: the region was discarded or zeroed since the snapshot (it reads as zeroes).
    pub exists: bool,
}

/// An open RBD image (`rbd_image_t`).
pub struct Image {
    image: ImageT,
    spec: String,
    _pool: Arc<Pool>,
}

// SAFETY: librbd serialises what it must inside the image context; concurrent
// asynchronous I/O from many threads on one handle is supported (QEMU, rbd-nbd).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// An issued asynchronous request that borrows a buffer for `'a`. Dropping it waits for
/// the request to complete, so the buffer is never released while librbd uses it.
struct Pending<'a> {
    c: CompletionT,
    op: &'static str,
    _buf: PhantomData<&'a mut [u8]>,
}

impl Pending<'_> {
    /// librbd's return value: bytes for a read, 0 for the others.
    fn wait(self, spec: &str) -> Result<isize, CephError> {
        // SAFETY: `c` is a live completion of an issued request (Drop releases it later).
        let r = unsafe {
            rbd_aio_wait_for_complete(self.c);
            rbd_aio_get_return_value(self.c)
        };
        check(r, self.op, spec)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        // SAFETY: `c` is live; waiting on a completed request returns at once, and only a
        // completed request's completion is released.
        unsafe {
            rbd_aio_wait_for_complete(self.c);
            rbd_aio_release(self.c);
        }
    }
}

/// A fresh completion without a callback; the caller waits on it.
fn completion(op: &'static str, spec: &str) -> Result<CompletionT, CephError> {
    let mut c: CompletionT = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; no callback, no argument.
    let r = unsafe { rbd_aio_create_completion(std::ptr::null_mut(), None, &mut c) };
    check(r as isize, op, spec)?;
    Ok(c)
}

/// Issue one request with `issue(c)`; on refusal the completion is released here.
fn issue<'a>(
    op: &'static str,
    spec: &str,
    issue: impl FnOnce(CompletionT) -> c_int,
) -> Result<Pending<'a>, CephError> {
    let c = completion(op, spec)?;
    let r = issue(c);
    if r < 0 {
        // SAFETY: librbd refused the request, so it never took the completion.
        unsafe { rbd_aio_release(c) };
        return Err(CephError {
            op,
            what: spec.to_string(),
            errno: -r,
        });
    }
    Ok(Pending {
        c,
        op,
        _buf: PhantomData,
    })
}

impl Image {
    /// `pool/image`, for messages.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn size(&self) -> Result<u64, CephError> {
        let mut size = 0u64;
        // SAFETY: a live image; out-pointer to a local.
        let r = unsafe { rbd_get_size(self.image, &mut size) };
        check(r as isize, "rbd_get_size", &self.spec)?;
        Ok(size)
    }

    /// The image id, which stays when the image is renamed.
    pub fn id(&self) -> Result<String, CephError> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: a live image; `buf` is writable for its length.
            let r = unsafe { rbd_get_id(self.image, buf.as_mut_ptr().cast(), buf.len()) };
            if r == -ERANGE && buf.len() < 4096 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            check(r as isize, "rbd_get_id", &self.spec)?;
            return Ok(c_text(&buf));
        }
    }

    fn read_start<'a>(&self, offset: u64, buf: &'a mut [u8]) -> Result<Pending<'a>, CephError> {
        issue("read", &self.spec, |c| {
            // SAFETY: live image and completion; `buf` stays borrowed (by the returned
            // Pending) until the request completes.
            unsafe { rbd_aio_read(self.image, offset, buf.len(), buf.as_mut_ptr().cast(), c) }
        })
    }

    fn write_start<'a>(&self, offset: u64, data: &'a [u8]) -> Result<Pending<'a>, CephError> {
        issue("write", &self.spec, |c| {
            // SAFETY: live image and completion; `data` stays borrowed (by the returned
            // Pending) until the request completes.
            unsafe { rbd_aio_write2(self.image, offset, data.len(), data.as_ptr().cast(), c, 0) }
        })
    }

    fn flush_start(&self) -> Result<Pending<'static>, CephError> {
        // SAFETY: live image and completion; a flush borrows no buffer.
        issue("flush", &self.spec, |c| unsafe {
            rbd_aio_flush(self.image, c)
        })
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CephError> {
        let want = buf.len();
        let got = self.read_start(offset, buf)?.wait(&self.spec)?;
        if got as usize != want {
            return Err(CephError {
                op: "read",
                what: format!("{}: {got} of {want} bytes at {offset}", self.spec),
                errno: EINVAL,
            });
        }
        Ok(())
    }

    /// Write `data` at `offset`; complete once the OSDs have it (or the cache, if on).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), CephError> {
        self.write_start(offset, data)?.wait(&self.spec).map(|_| ())
    }

    /// Write `data` at `offset` of both images with both requests in flight at once.
    pub fn write_pair(
        a: &Image,
        b: &Image,
        offset: u64,
        data: &[u8],
    ) -> (Result<(), CephError>, Result<(), CephError>) {
        let pa = a.write_start(offset, data);
        let pb = b.write_start(offset, data);
        let ra = pa.and_then(|p| p.wait(&a.spec)).map(|_| ());
        let rb = pb.and_then(|p| p.wait(&b.spec)).map(|_| ());
        (ra, rb)
    }

    /// Make every completed write stable.
    pub fn flush(&self) -> Result<(), CephError> {
        self.flush_start()?.wait(&self.spec).map(|_| ())
    }

    /// Flush both images with both flushes in flight.
    pub fn flush_pair(a: &Image, b: &Image) -> (Result<(), CephError>, Result<(), CephError>) {
        let pa = a.flush_start();
        let pb = b.flush_start();
        (
            pa.and_then(|p| p.wait(&a.spec)).map(|_| ()),
            pb.and_then(|p| p.wait(&b.spec)).map(|_| ()),
        )
    }

    /// Deallocate `len` bytes at `offset`; they read back as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), CephError> {
        issue("discard", &self.spec, |c| {
            // SAFETY: live image and completion; no buffer.
            unsafe { rbd_aio_discard(self.image, offset, len, c) }
        })?
        .wait(&self.spec)
        .map(|_| ())
    }

    /// Zero `len` bytes at `offset` (librbd may deallocate whole objects).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CephError> {
        let len = usize::try_from(len).map_err(|_| CephError {
            op: "write_zeroes",
            what: format!("{}: {len} bytes", self.spec),
            errno: EINVAL,
        })?;
        issue("write_zeroes", &self.spec, |c| {
            // SAFETY: live image and completion; no buffer.
            unsafe { rbd_aio_write_zeroes(self.image, offset, len, c, 0, 0) }
        })?
        .wait(&self.spec)
        .map(|_| ())
    }

    /// Create snapshot `name` of the image (for change tracking with `diff_iterate`).
    pub fn snap_create(&self, name: &str) -> Result<(), CephError> {
        let n = cstring(name, "rbd_snap_create")?;
        // SAFETY: a live image; the name outlives the call.
        let r = unsafe { rbd_snap_create(self.image, n.as_ptr()) };
        check(
            r as isize,
            "create snapshot",
            &format!("{}@{name}", self.spec),
        )
        .map(|_| ())
    }

    pub fn snap_remove(&self, name: &str) -> Result<(), CephError> {
        let n = cstring(name, "rbd_snap_remove")?;
        // SAFETY: a live image; the name outlives the call.
        let r = unsafe { rbd_snap_remove(self.image, n.as_ptr()) };
        check(
            r as isize,
            "remove snapshot",
            &format!("{}@{name}", self.spec),
        )
        .map(|_| ())
    }

    /// The regions of `offset..offset + len` that changed since snapshot `from_snap` (or
    /// that hold data at all, with `None`), in order, to `f`, until it breaks. With
    /// `whole_object`, regions are whole objects (cheaper with fast-diff). This is the
    /// array's own change tracking (`rbd_diff_iterate2`, parents included).
    pub fn diff_iterate(
        &self,
        from_snap: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
        f: &mut dyn FnMut(DiffExtent) -> ControlFlow<()>,
    ) -> Result<(), CephError> {
        let snap = from_snap
            .map(|s| cstring(s, "rbd_diff_iterate2"))
            .transpose()?;
        let mut ctx = DiffCtx {
            f,
            stopped: false,
            panic: None,
        };
        // SAFETY: a live image; `snap` outlives the call; `ctx` is the argument the
        // trampoline casts back, alive and not otherwise touched until the call returns
        // (librbd calls back on this thread, synchronously, before returning).
        let r = unsafe {
            rbd_diff_iterate2(
                self.image,
                snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                offset,
                len,
                1,
                u8::from(whole_object),
                Some(diff_trampoline),
                (&mut ctx as *mut DiffCtx<'_>).cast(),
            )
        };
        if let Some(p) = ctx.panic {
            resume_unwind(p);
        }
        if ctx.stopped && r == -ECANCELED {
            return Ok(());
        }
        check(r as isize, "rbd_diff_iterate2", &self.spec).map(|_| ())
    }
}

struct DiffCtx<'f> {
    f: &'f mut dyn FnMut(DiffExtent) -> ControlFlow<()>,
    stopped: bool,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

extern "C" fn diff_trampoline(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `DiffCtx` that `diff_iterate` passed, alive and exclusively ours
    // for the duration of rbd_diff_iterate2, which is when librbd calls this.
    let ctx = unsafe { &mut *arg.cast::<DiffCtx<'_>>() };
    let extent = DiffExtent {
        offset,
        len: len as u64,
        exists: exists != 0,
    };
    // Unwinding must not cross librbd's C++ frames: catch, stop, resume after the call.
    match catch_unwind(AssertUnwindSafe(|| (ctx.f)(extent))) {
        Ok(ControlFlow::Continue(())) => 0,
        Ok(ControlFlow::Break(())) => {
            ctx.stopped = true;
            -ECANCELED
        }
        Err(p) => {
            ctx.panic = Some(p);
            -ECANCELED
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: live, and no request is pending: every Pending borrows the image and
        // waits for completion before it is dropped.
        unsafe {
            rbd_close(self.image);
        }
    }
}
