//! The driver side: any `hvm_core::Backend` exported as a [`BackendBox`], with every call
//! guarded so a panic becomes an [`ErrorKind::Panicked`] error at the boundary.

use std::panic::{catch_unwind, AssertUnwindSafe};

use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RErr, ROk, RResult, RSlice, RSliceMut, RSome, RStr, RString, RVec};
use hvm_core::array_backup::{BackupCapabilities, BackupOp};
use hvm_core::backend::{Backend, BackendError, BackendErrorKind};
use hvm_core::{Extent, LuId, MirrorDefinition};

use crate::{
    backup_bits, v1, BackendBox, BackendObj, BackendObj_TO, BackupBox, BackupObj, BackupObj_TO,
    Capabilities, Description, ErrorKind, LuInfo, MirrorRow, Opened, PluginError,
};

/// Run `f`, turning a panic into an error. Unwinding must not cross the plugin boundary.
pub fn guard<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RErr(e),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".into());
            RErr(PluginError::new(
                ErrorKind::Panicked,
                format!("plugin panicked: {what}"),
            ))
        }
    }
}

pub fn error_from_core(e: BackendError) -> PluginError {
    let kind = match e.kind {
        BackendErrorKind::OutOfRange => ErrorKind::OutOfRange,
        BackendErrorKind::DataProtect => ErrorKind::DataProtect,
        BackendErrorKind::NotReady => ErrorKind::NotReady,
        BackendErrorKind::InvalidRequest => ErrorKind::InvalidRequest,
        BackendErrorKind::Unsupported => ErrorKind::Unsupported,
        BackendErrorKind::Failed => ErrorKind::Failed,
        _ => ErrorKind::Io,
    };
    PluginError::new(kind, e.message)
}

fn caps_from_core(c: hvm_core::Capabilities) -> Capabilities {
    Capabilities {
        mode_select: c.mode_select,
        virtual_lu_forming: c.virtual_lu_forming,
        read_only_mate: c.read_only_mate,
        array_copy: c.array_copy,
        fua: c.fua,
    }
}

fn row_from_core(d: &MirrorDefinition) -> MirrorRow {
    match d {
        MirrorDefinition::Managed { lu, mates } => MirrorRow {
            kind: 0,
            primary: lu.0,
            others: mates.iter().map(|m| m.0).collect(),
        },
        MirrorDefinition::Triple {
            mirror,
            origin,
            mate,
        } => MirrorRow {
            kind: 1,
            primary: mirror.0,
            others: RVec::from(vec![origin.0, mate.0]),
        },
        MirrorDefinition::Pair { mirror, mate } => MirrorRow {
            kind: 2,
            primary: mirror.0,
            others: RVec::from(vec![mate.0]),
        },
    }
}

/// A `Backend` as a plugin backend object.
pub struct Adapter<B>(pub B);

impl<B: Backend> BackendObj for Adapter<B> {
    fn describe(&self) -> RResult<Description, PluginError> {
        guard(|| {
            let d = self.0.describe().map_err(error_from_core)?;
            Ok(Description {
                lus: d
                    .lus
                    .iter()
                    .map(|l| LuInfo {
                        id: l.id.0,
                        capacity_lbas: l.capacity_lbas,
                    })
                    .collect(),
                mirroring: d.mirroring.iter().map(row_from_core).collect(),
                capabilities: caps_from_core(d.capabilities),
            })
        })
    }

    fn read(&self, lu: u32, lba: u64, buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        guard(|| {
            self.0
                .read(LuId(lu), lba, buf.into_mut_slice())
                .map_err(error_from_core)
        })
    }

    fn write(
        &self,
        lu: u32,
        lba: u64,
        data: RSlice<'_, u8>,
        fua: bool,
    ) -> RResult<(), PluginError> {
        guard(|| {
            self.0
                .write(LuId(lu), lba, data.as_slice(), fua)
                .map_err(error_from_core)
        })
    }

    fn flush(&self, lu: u32) -> RResult<(), PluginError> {
        guard(|| self.0.flush(LuId(lu)).map_err(error_from_core))
    }

    fn mode_sense(&self, lu: u32) -> RResult<RVec<u8>, PluginError> {
        guard(|| {
            self.0
                .mode_sense(LuId(lu))
                .map(RVec::from)
                .map_err(error_from_core)
        })
    }

    fn mode_select(&self, lu: u32, page: RSlice<'_, u8>) -> RResult<(), PluginError> {
        guard(|| {
            self.0
                .mode_select(LuId(lu), page.as_slice())
                .map_err(error_from_core)
        })
    }

    fn copy(&self, src: u32, dst: u32, first: u64, last: u64) -> RResult<(), PluginError> {
        guard(|| {
            let ext = Extent::new(first, last).ok_or_else(|| {
                PluginError::new(
                    ErrorKind::InvalidRequest,
                    format!("empty extent {first}-{last}"),
                )
            })?;
            self.0
                .copy(LuId(src), LuId(dst), ext)
                .map_err(error_from_core)
        })
    }

    fn write_zeroes(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> RResult<(), PluginError> {
        guard(|| {
            self.0
                .write_zeroes(LuId(lu), lba, blocks, unmap, fua)
                .map_err(error_from_core)
        })
    }

    fn identity(&self, lu: u32) -> RResult<RString, PluginError> {
        guard(|| match self.0.identity(LuId(lu)) {
            Ok(id) => Ok(RString::from(id.unwrap_or_default())),
            Err(e) => Err(error_from_core(e)),
        })
    }
}

/// The same backend as interface 0.1.0's seven-method object, for hosts of 0.1.0 and
/// 0.1.1: each method is today's.
impl<B: Backend> v1::BackendObj for Adapter<B> {
    fn describe(&self) -> RResult<Description, PluginError> {
        BackendObj::describe(self)
    }
    fn read(&self, lu: u32, lba: u64, buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        BackendObj::read(self, lu, lba, buf)
    }
    fn write(
        &self,
        lu: u32,
        lba: u64,
        data: RSlice<'_, u8>,
        fua: bool,
    ) -> RResult<(), PluginError> {
        BackendObj::write(self, lu, lba, data, fua)
    }
    fn flush(&self, lu: u32) -> RResult<(), PluginError> {
        BackendObj::flush(self, lu)
    }
    fn mode_sense(&self, lu: u32) -> RResult<RVec<u8>, PluginError> {
        BackendObj::mode_sense(self, lu)
    }
    fn mode_select(&self, lu: u32, page: RSlice<'_, u8>) -> RResult<(), PluginError> {
        BackendObj::mode_select(self, lu, page)
    }
    fn copy(&self, src: u32, dst: u32, first: u64, last: u64) -> RResult<(), PluginError> {
        BackendObj::copy(self, src, dst, first, last)
    }
}

/// Box a backend for the host.
pub fn boxed<B: Backend + 'static>(backend: B) -> BackendBox {
    BackendObj_TO::from_value(Adapter(backend), TD_Opaque)
}

/// Box a backend for a host of interface 0.1.0.
pub fn boxed_v1<B: Backend + 'static>(backend: B) -> v1::BackendBox {
    v1::BackendObj_TO::from_value(Adapter(backend), TD_Opaque)
}

/// A `Backend`'s array-side backup functions as a plugin object.
pub struct BackupAdapter<B>(pub B);

impl<B: Backend> BackupObj for BackupAdapter<B> {
    fn capabilities(&self) -> RResult<u64, PluginError> {
        guard(|| Ok(bits_from_core(self.0.backup_capabilities())))
    }

    fn backup(&self, op: RStr<'_>) -> RResult<RString, PluginError> {
        guard(|| {
            let op: BackupOp = serde_json::from_str(op.as_str()).map_err(|e| {
                PluginError::new(
                    ErrorKind::InvalidRequest,
                    format!("this plugin does not know the backup operation {op}: {e}"),
                )
            })?;
            let reply = self.0.backup(&op).map_err(error_from_core)?;
            serde_json::to_string(&reply)
                .map(RString::from)
                .map_err(|e| PluginError::new(ErrorKind::Io, format!("encode the reply: {e}")))
        })
    }
}

/// hvm-core's backup capabilities as [`backup_bits`].
pub fn bits_from_core(c: BackupCapabilities) -> u64 {
    use backup_bits::*;
    [
        (c.pairs, PAIRS),
        (c.ccopy, CCOPY),
        (c.auto, AUTO),
        (c.area_split, AREA_SPLIT),
        (c.cow, COW),
        (c.pool, POOL),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |bits, (_, bit)| bits | bit)
}

/// [`backup_bits`] as hvm-core's backup capabilities; unknown bits are ignored.
pub fn bits_to_core(bits: u64) -> BackupCapabilities {
    use backup_bits::*;
    BackupCapabilities {
        pairs: bits & PAIRS != 0,
        ccopy: bits & CCOPY != 0,
        auto: bits & AUTO != 0,
        area_split: bits & AREA_SPLIT != 0,
        cow: bits & COW != 0,
        pool: bits & POOL != 0,
    }
}

/// A backend and its backup functions, sharing the one backend, for
/// [`PluginMod::open_current`](crate::PluginMod).
pub fn opened<B: Backend + 'static>(backend: B) -> Opened {
    let backend = Arc::new(backend);
    Opened {
        backup: RSome(backup_box(&backend)),
        backend: boxed(backend),
    }
}

/// The same for a host of interface 0.1.1 ([`PluginMod::open_with_backup`](crate::PluginMod)).
pub fn opened_v1<B: Backend + 'static>(backend: B) -> v1::Opened {
    let backend = Arc::new(backend);
    v1::Opened {
        backup: RSome(backup_box(&backend)),
        backend: boxed_v1(backend),
    }
}

fn backup_box<B: Backend + 'static>(backend: &Arc<B>) -> BackupBox {
    BackupObj_TO::from_value(BackupAdapter(Arc::clone(backend)), TD_Opaque)
}

/// Define a plugin's root module. `open` is a `fn(&str) -> Result<B, PluginError>`, `B`
/// an `hvm_core::Backend`, taking the plugin's YAML parameters; it runs under [`guard`].
/// The module exports it three times: as `open` for hosts of interface 0.1.0, as
/// `open_with_backup` (with the array-side backup functions) for 0.1.1, both with the
/// seven-method backend object, and as `open_current` with today's backend object.
///
/// ```ignore
/// hvm_plugin_abi::export_plugin! {
///     name: "stateless",
///     capabilities: hvm_plugin_abi::Capabilities { virtual_lu_forming: true, ..Default::default() },
///     thread_model: hvm_plugin_abi::ThreadModel::Parallel,
///     open: my_open,
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name: $name:literal, capabilities: $caps:expr, thread_model: $tm:expr, open: $open:path $(,)?) => {
        extern "C" fn __hvm_plugin_name() -> ::abi_stable::std_types::RStr<'static> {
            ::abi_stable::std_types::RStr::from_str($name)
        }
        extern "C" fn __hvm_plugin_version() -> ::abi_stable::std_types::RStr<'static> {
            ::abi_stable::std_types::RStr::from_str(env!("CARGO_PKG_VERSION"))
        }
        extern "C" fn __hvm_plugin_capabilities() -> $crate::Capabilities {
            $caps
        }
        extern "C" fn __hvm_plugin_thread_model() -> $crate::ThreadModel {
            $tm
        }
        extern "C" fn __hvm_plugin_open(
            params: ::abi_stable::std_types::RStr<'_>,
        ) -> ::abi_stable::std_types::RResult<$crate::v1::BackendBox, $crate::PluginError> {
            $crate::driver::guard(|| $open(params.as_str()).map($crate::driver::boxed_v1))
        }
        extern "C" fn __hvm_plugin_open_with_backup(
            params: ::abi_stable::std_types::RStr<'_>,
        ) -> ::abi_stable::std_types::RResult<$crate::v1::Opened, $crate::PluginError> {
            $crate::driver::guard(|| $open(params.as_str()).map($crate::driver::opened_v1))
        }
        extern "C" fn __hvm_plugin_open_current(
            params: ::abi_stable::std_types::RStr<'_>,
        ) -> ::abi_stable::std_types::RResult<$crate::Opened, $crate::PluginError> {
            $crate::driver::guard(|| $open(params.as_str()).map($crate::driver::opened))
        }
        #[::abi_stable::export_root_module]
        pub fn get_library() -> $crate::PluginModRef {
            use ::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginMod {
                name: __hvm_plugin_name,
                version: __hvm_plugin_version,
                capabilities: __hvm_plugin_capabilities,
                thread_model: __hvm_plugin_thread_model,
                open: __hvm_plugin_open,
                open_with_backup: __hvm_plugin_open_with_backup,
                open_current: __hvm_plugin_open_current,
            }
            .leak_into_prefix()
        }
    };
}
