//! The host side: find, check and load a plugin, and use its backend as an
//! `hvm_core::Backend`.

mod elf;

use std::collections::BTreeMap;
use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use abi_stable::library::{
    lib_header_from_raw_library, LibHeader, LibraryError, RawLibrary, RootModule,
};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RNone, RResult, RSlice, RSliceMut, RStr};
use hvm_core::array_backup::{BackupCapabilities, BackupOp, BackupReply};
use hvm_core::backend::{
    write_zeroes_by_writing, Backend, BackendDescription, BackendError, BackendErrorKind, LuInfo,
};
use hvm_core::{Extent, LuId, MirrorDefinition};
use nix::libc;

use crate::driver::bits_to_core;
use crate::{
    v1, v2, BackendBox, BackendObj, BackendObj_TO, BackupBox, Capabilities, ErrorKind, Opened,
    PluginError, PluginModRef, ThreadModel,
};

/// Why a plugin could not be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// `summary` says in one line what abi_stable found; `source` has the full report
    /// (for a layout mismatch, both layouts field by field).
    #[error("{}: {summary}", path.display())]
    Library {
        path: PathBuf,
        summary: String,
        #[source]
        source: LibraryError,
    },
    #[error("{}: open failed: {error}", path.display())]
    Open { path: PathBuf, error: PluginError },
}

/// A plugin's root module, as the interface version it was built against lays it out.
#[derive(Clone, Copy)]
enum Module {
    Current(PluginModRef),
    V2(v2::PluginModRef),
    V1(v1::PluginModRef),
}

/// A loaded plugin: its root module and what it declares.
#[derive(Clone)]
pub struct Plugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    /// The plugin interface it was built against (`0.1.0` has no backup functions).
    pub interface: String,
    pub capabilities: Capabilities,
    pub thread_model: ThreadModel,
    module: Module,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The file a plugin `name` has in `dir`: `libhvm_plugin_<name>.so`, with `-` as `_`.
pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("libhvm_plugin_{}.so", name.replace('-', "_")))
}

/// Open the plugin file once, without following a symbolic link, and refuse it unless
/// the open descriptor is a regular file, not writable by group or others, owned by root
/// or the user running the host (loading it runs its code), and a complete ELF shared
/// object for this host. What is checked is this descriptor, and [`Plugin::load`] maps
/// this same descriptor: renaming another file into place cannot slip past the checks.
pub fn open_checked(path: &Path) -> Result<(File, Metadata), LoadError> {
    let bad = |reason: String| LoadError::File {
        path: path.to_path_buf(),
        reason,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => bad("a symbolic link; give the path of the file itself".into()),
            _ => bad(format!("cannot open it: {e}")),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(bad(format!(
            "writable by group or others (mode {mode:04o}); make it go-w before loading"
        )));
    }
    let me = nix::unistd::getuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(bad(format!(
            "owned by uid {}, which is neither root nor the user running host-agent (uid {me})",
            meta.uid()
        )));
    }
    elf::check(&file, meta.len()).map_err(|e| bad(e.to_string()))?;
    Ok((file, meta))
}

/// Libraries mapped so far, by (device, inode). Their descriptors stay open for the life
/// of the process: the dynamic loader knows a library by the name it was opened under,
/// `/proc/self/fd/N`, and a reused N would otherwise return an earlier library.
static MAPPED: Mutex<BTreeMap<(u64, u64), &'static LibHeader>> = Mutex::new(BTreeMap::new());

/// Map the checked descriptor through `/proc/self/fd/N` (a path with a `/`: never looked
/// up on the library search path), or find the library mapped before from this file.
fn map(file: File, meta: &Metadata) -> Result<&'static LibHeader, LibraryError> {
    let mut mapped = MAPPED.lock().unwrap_or_else(|p| p.into_inner());
    let key = (meta.dev(), meta.ino());
    if let Some(header) = mapped.get(&key) {
        return Ok(header);
    }
    let fd = file.into_raw_fd(); // owned by MAPPED's library from here on
    let raw = RawLibrary::load_at(Path::new(&format!("/proc/self/fd/{fd}")));
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            // SAFETY: `fd` came from into_raw_fd above and nothing else holds it.
            drop(unsafe { File::from_raw_fd(fd) });
            return Err(e);
        }
    };
    // SAFETY: the library is leaked below, so the header's 'static references hold.
    let header = unsafe { lib_header_from_raw_library(&raw) }?;
    std::mem::forget(raw);
    mapped.insert(key, header);
    Ok(header)
}

/// `text` in one line, with the descriptor path the loader saw taken out (the error is
/// printed after the file's real name).
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("/proc/self/fd/") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + "/proc/self/fd/".len()..];
        let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        rest = tail[digits..].trim_start_matches(": ");
    }
    out.push_str(rest);
    out.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn summarize(e: &LibraryError) -> String {
    match e {
        LibraryError::OpenError { err, .. } => {
            format!("cannot load it as a shared library: {}", one_line(&err.to_string()))
        }
        LibraryError::GetSymbolError { .. } => {
            "not an hvm plugin: it exports no abi_stable root module".into()
        }
        LibraryError::InvalidAbiHeader(_) => {
            "built with an abi_stable version this host cannot load".into()
        }
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against plugin interface {actual_version}, this host needs {expected_version}"
        ),
        LibraryError::AbiInstability(_) => {
            "its plugin interface has another layout than this host's (built against an incompatible hvm-plugin-abi); use --verbose for the layouts".into()
        }
        other => format!("cannot be used: {}", one_line(&other.to_string())),
    }
}

impl Plugin {
    /// Check and load the plugin at `path`, verifying abi_stable's layout and version.
    pub fn load(path: &Path) -> Result<Plugin, LoadError> {
        let (file, meta) = open_checked(path)?;
        let lib = |source: LibraryError| LoadError::Library {
            path: path.to_path_buf(),
            summary: summarize(&source),
            source,
        };
        // Per file, not RootModule::load_from_file: that caches one library per root
        // module type, and a host loads several plugins of this one interface.
        let header = map(file, &meta).map_err(lib)?;
        let module = match header.init_root_module::<PluginModRef>() {
            Ok(m) => Module::Current(m),
            // Built against an older interface, whose root module has fewer fields: check
            // it against that layout instead.
            Err(e @ LibraryError::AbiInstability(_)) => {
                match header.version_strings().version.as_str() {
                    v if v == v2::VERSION => {
                        Module::V2(header.init_root_module::<v2::PluginModRef>().map_err(lib)?)
                    }
                    v if v == v1::VERSION => {
                        Module::V1(header.init_root_module::<v1::PluginModRef>().map_err(lib)?)
                    }
                    _ => return Err(lib(e)),
                }
            }
            Err(e) => return Err(lib(e)),
        };
        let (name, version, capabilities, thread_model, interface) = match module {
            Module::Current(m) => (
                m.name(),
                m.version(),
                m.capabilities(),
                m.thread_model(),
                PluginModRef::VERSION_STRINGS.version.as_str(),
            ),
            Module::V2(m) => (
                m.name(),
                m.version(),
                m.capabilities(),
                m.thread_model(),
                v2::VERSION,
            ),
            Module::V1(m) => (
                m.name(),
                m.version(),
                m.capabilities(),
                m.thread_model(),
                v1::VERSION,
            ),
        };
        Ok(Plugin {
            path: path.to_path_buf(),
            name: name().to_string(),
            version: version().to_string(),
            interface: interface.to_string(),
            capabilities: capabilities(),
            thread_model: thread_model(),
            module,
        })
    }

    /// The interface version this host expects of plugins.
    pub fn interface_version() -> String {
        PluginModRef::VERSION_STRINGS.to_string()
    }

    /// Open a backend with the plugin's YAML parameters.
    pub fn open(&self, params: &str) -> Result<PluginBackend, LoadError> {
        let params = RStr::from_str(params);
        let opened = match self.module {
            Module::Current(m) => match m.open_current() {
                Some(open) => open(params),
                None => upgrade_opened(m.open_with_backup(), m.open(), params),
            },
            Module::V2(m) => upgrade_opened(m.open_with_backup(), m.open(), params),
            Module::V1(m) => upgrade_opened(None, m.open(), params),
        };
        match opened {
            RResult::ROk(o) => Ok(PluginBackend {
                obj: o.backend,
                backup: o.backup.into_option(),
                serialize: (self.thread_model == ThreadModel::SerializeAll).then(|| Mutex::new(())),
                failed: AtomicBool::new(false),
                plugin: self.name.clone(),
            }),
            RResult::RErr(error) => Err(LoadError::Open {
                path: self.path.clone(),
                error,
            }),
        }
    }
}

type OpenV1 = extern "C" fn(RStr<'_>) -> RResult<v1::BackendBox, PluginError>;
type OpenWithBackupV1 = extern "C" fn(RStr<'_>) -> RResult<v1::Opened, PluginError>;

/// Open a plugin of interface 0.1.0 or 0.1.1 (with its backup functions when it has
/// them), its backend object wrapped as today's.
fn upgrade_opened(
    with_backup: Option<OpenWithBackupV1>,
    open: OpenV1,
    params: RStr<'_>,
) -> RResult<Opened, PluginError> {
    let opened = match with_backup {
        Some(f) => f(params),
        None => open(params).map(|backend| v1::Opened {
            backend,
            backup: RNone,
        }),
    };
    opened.map(|o| Opened {
        backend: BackendObj_TO::from_value(Legacy(o.backend), TD_Opaque),
        backup: o.backup,
    })
}

/// A backend object of interface 0.1.0 or 0.1.1 as today's: its seven methods forwarded,
/// `write_zeroes` and `identity` answering their defaults (the host then writes zero
/// buffers, and knows no identity).
struct Legacy(v1::BackendBox);

impl BackendObj for Legacy {
    fn describe(&self) -> RResult<crate::Description, PluginError> {
        self.0.describe()
    }
    fn read(&self, lu: u32, lba: u64, buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.0.read(lu, lba, buf)
    }
    fn write(
        &self,
        lu: u32,
        lba: u64,
        data: RSlice<'_, u8>,
        fua: bool,
    ) -> RResult<(), PluginError> {
        self.0.write(lu, lba, data, fua)
    }
    fn flush(&self, lu: u32) -> RResult<(), PluginError> {
        self.0.flush(lu)
    }
    fn mode_sense(&self, lu: u32) -> RResult<abi_stable::std_types::RVec<u8>, PluginError> {
        self.0.mode_sense(lu)
    }
    fn mode_select(&self, lu: u32, page: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.0.mode_select(lu, page)
    }
    fn copy(&self, src: u32, dst: u32, first: u64, last: u64) -> RResult<(), PluginError> {
        self.0.copy(src, dst, first, last)
    }
}

/// A plugin's backend as an `hvm_core::Backend`. After the plugin panics it is out of
/// service: every call answers `Failed` and the host keeps serving other backends.
pub struct PluginBackend {
    obj: BackendBox,
    /// The array-side backup functions; `None` for a plugin of interface 0.1.0.
    backup: Option<BackupBox>,
    serialize: Option<Mutex<()>>,
    failed: AtomicBool,
    plugin: String,
}

impl std::fmt::Debug for PluginBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginBackend")
            .field("plugin", &self.plugin)
            .field("failed", &self.is_failed())
            .finish_non_exhaustive()
    }
}

fn to_core(e: PluginError) -> BackendError {
    BackendError::new(e.kind.to_core(), e.message.to_string())
}

impl PluginBackend {
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn call<T>(&self, f: impl FnOnce() -> RResult<T, PluginError>) -> Result<T, BackendError> {
        if self.is_failed() {
            return Err(BackendError::new(
                BackendErrorKind::Failed,
                format!("plugin {} is out of service after a panic", self.plugin),
            ));
        }
        let _one = self
            .serialize
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        match f() {
            RResult::ROk(v) => Ok(v),
            RResult::RErr(e) => {
                if e.kind == ErrorKind::Panicked {
                    self.failed.store(true, Ordering::SeqCst);
                }
                Err(to_core(e))
            }
        }
    }
}

impl Backend for PluginBackend {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        let d = self.call(|| self.obj.describe())?;
        let id = LuId;
        let mut mirroring = Vec::new();
        for r in d.mirroring.iter() {
            let others: Vec<LuId> = r.others.iter().copied().map(id).collect();
            mirroring.push(match (r.kind, others.as_slice()) {
                (0, _) => MirrorDefinition::Managed {
                    lu: id(r.primary),
                    mates: others,
                },
                (1, [origin, mate]) => MirrorDefinition::Triple {
                    mirror: id(r.primary),
                    origin: *origin,
                    mate: *mate,
                },
                (2, [mate]) => MirrorDefinition::Pair {
                    mirror: id(r.primary),
                    mate: *mate,
                },
                _ => {
                    return Err(BackendError::new(
                        BackendErrorKind::Io,
                        format!("plugin {}: malformed mirroring row {r:?}", self.plugin),
                    ))
                }
            });
        }
        let c = d.capabilities;
        Ok(BackendDescription {
            lus: d
                .lus
                .iter()
                .map(|l| LuInfo {
                    id: LuId(l.id),
                    capacity_lbas: l.capacity_lbas,
                })
                .collect(),
            mirroring,
            capabilities: hvm_core::Capabilities {
                mode_select: c.mode_select,
                virtual_lu_forming: c.virtual_lu_forming,
                read_only_mate: c.read_only_mate,
                array_copy: c.array_copy,
                fua: c.fua,
            },
        })
    }

    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.call(|| self.obj.read(lu.0, lba, RSliceMut::from_mut_slice(buf)))
    }

    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.call(|| self.obj.write(lu.0, lba, RSlice::from_slice(data), fua))
    }

    fn flush(&self, lu: LuId) -> Result<(), BackendError> {
        self.call(|| self.obj.flush(lu.0))
    }

    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        self.call(|| self.obj.mode_sense(lu.0))
            .map(|v| v.into_vec())
    }

    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
        self.call(|| self.obj.mode_select(lu.0, RSlice::from_slice(page)))
    }

    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        self.call(|| self.obj.copy(src.0, dst.0, extent.first(), extent.last()))
    }

    fn write_zeroes(
        &self,
        lu: LuId,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        match self.call(|| self.obj.write_zeroes(lu.0, lba, blocks, unmap, fua)) {
            Err(e) if e.kind == BackendErrorKind::Unsupported => {
                write_zeroes_by_writing(self, lu, lba, blocks, fua)
            }
            other => other,
        }
    }

    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        let id = self.call(|| self.obj.identity(lu.0))?;
        Ok((!id.is_empty()).then(|| id.into_string()))
    }

    fn backup_capabilities(&self) -> BackupCapabilities {
        match &self.backup {
            Some(b) => self
                .call(|| b.capabilities())
                .map(bits_to_core)
                .unwrap_or_default(),
            None => BackupCapabilities::default(),
        }
    }

    fn backup(&self, op: &BackupOp) -> Result<BackupReply, BackendError> {
        let Some(b) = &self.backup else {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "plugin {} was built against plugin interface {}, which has no array-side backup functions",
                    self.plugin,
                    v1::VERSION
                ),
            ));
        };
        let op = serde_json::to_string(op).map_err(|e| {
            BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!("encode {op:?}: {e}"),
            )
        })?;
        let reply = self.call(|| b.backup(RStr::from_str(&op)))?;
        serde_json::from_str(&reply).map_err(|e| {
            BackendError::new(
                BackendErrorKind::Io,
                format!(
                    "plugin {}: malformed backup reply {reply}: {e}",
                    self.plugin
                ),
            )
        })
    }
}
