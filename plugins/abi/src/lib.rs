//! hvm-plugin-abi: the stable ABI between host-agent and array driver plugins.
//!
//! Three parts, as abi_stable's examples lay them out:
//!
//! - The interface ([`PluginMod`], [`BackendObj`], [`BackupObj`], and the StableAbi
//!   types): the root module is a prefix type, so fields are added after
//!   [`PluginMod::open`] (the last prefix field). Interface 0.1.1 added
//!   `open_with_backup`, which also hands over the array-side backup functions;
//!   0.1.2 added [`BackendObj`]'s `write_zeroes` and `identity` after its last prefix
//!   method `copy`, with defaults that an older plugin's calls fall back to.
//!   abi_stable's own check refuses a library whose root module has fewer fields than
//!   the host's, so the host checks a 0.1.0 plugin against the frozen [`v1`] layout and
//!   opens it with `open`: plugins built before still load, without backup functions.
//! - The driver side ([`driver`]): wraps any `hvm_core::Backend` as a [`BackendBox`],
//!   catching panics at the boundary so a panicking driver returns an error instead of
//!   unwinding into the host.
//! - Parameters: a backend's `params` from the host's config cross the boundary once, as
//!   one YAML text (the host adds only `state_dir`), and the plugin parses that text
//!   once into its own typed parameters (the array drivers' embedded array-sim config
//!   with them); neither side passes a parsed value across.
//! - The host side ([`host`]): checks the file (regular, not group/other-writable, owned
//!   by root or by us), loads it, checks abi_stable's layout and version, and wraps the
//!   backend object as an `hvm_core::Backend` that goes out of service after a panic.

// abi_stable's #[sabi_trait] expands to impls inside a generated const.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

pub mod driver;
pub mod host;

/// The kind of a plugin error; fixes the errno a client sees.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Io,
    OutOfRange,
    DataProtect,
    NotReady,
    InvalidRequest,
    Unsupported,
    /// The backend is out of service.
    Failed,
    /// The plugin method panicked; the host takes the backend out of service.
    Panicked,
    /// `open` refused the configuration.
    Config,
}

impl ErrorKind {
    /// The hvm-core error kind this is on the host side.
    pub fn to_core(self) -> hvm_core::BackendErrorKind {
        use hvm_core::BackendErrorKind as K;
        match self {
            ErrorKind::OutOfRange => K::OutOfRange,
            ErrorKind::DataProtect => K::DataProtect,
            ErrorKind::NotReady => K::NotReady,
            ErrorKind::InvalidRequest | ErrorKind::Config => K::InvalidRequest,
            ErrorKind::Unsupported => K::Unsupported,
            ErrorKind::Failed | ErrorKind::Panicked => K::Failed,
            ErrorKind::Io => K::Io,
        }
    }

    /// The errno a block client should see: hvm-core's mapping of the same kind.
    pub fn errno(self) -> i32 {
        hvm_core::BackendError::new(self.to_core(), "").errno()
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError {
            kind,
            message: RString::from(message.into()),
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// What the array can do (hvm-core's `Capabilities`).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub mode_select: bool,
    pub virtual_lu_forming: bool,
    pub read_only_mate: bool,
    pub array_copy: bool,
    pub fua: bool,
}

/// How much concurrency the plugin allows, as nbdkit's thread models; the host honours
/// the most restrictive.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadModel {
    /// Any number of calls at once, on any threads.
    Parallel,
    /// One call at a time.
    SerializeAll,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuInfo {
    pub id: u32,
    pub capacity_lbas: u64,
}

/// One mirroring definition row: `kind` 0 = Mode Select (`primary` and its mates),
/// 1 = stateless (`primary` is the mirroring LU; `others` = origin, mate),
/// 2 = pre-update (`primary` is the mirroring LU; `others` = mate).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct MirrorRow {
    pub kind: u8,
    pub primary: u32,
    pub others: RVec<u32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct Description {
    pub lus: RVec<LuInfo>,
    pub mirroring: RVec<MirrorRow>,
    pub capabilities: Capabilities,
}

/// A backend as the plugin exports it: hvm-core's `Backend`, method for method.
#[sabi_trait]
pub trait BackendObj: Send + Sync {
    fn describe(&self) -> RResult<Description, PluginError>;
    fn read(&self, lu: u32, lba: u64, buf: RSliceMut<'_, u8>) -> RResult<(), PluginError>;
    fn write(&self, lu: u32, lba: u64, data: RSlice<'_, u8>, fua: bool)
        -> RResult<(), PluginError>;
    fn flush(&self, lu: u32) -> RResult<(), PluginError>;
    fn mode_sense(&self, lu: u32) -> RResult<RVec<u8>, PluginError>;
    fn mode_select(&self, lu: u32, page: RSlice<'_, u8>) -> RResult<(), PluginError>;
    /// Copy LBAs `first..=last` from `src` to `dst` inside the array.
    #[sabi(last_prefix_field)]
    fn copy(&self, src: u32, dst: u32, first: u64, last: u64) -> RResult<(), PluginError>;
    /// Interface 0.1.2: write zeroes to `blocks` blocks, deallocating them when `unmap`
    /// allows (hvm-core's `Backend::write_zeroes`). A plugin built before has no such
    /// method and answers `Unsupported` here; the host then writes zero buffers.
    fn write_zeroes(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> RResult<(), PluginError> {
        let _ = (lu, lba, blocks, unmap, fua);
        RResult::RErr(PluginError::new(
            ErrorKind::Unsupported,
            "this plugin predates write_zeroes",
        ))
    }
    /// Interface 0.1.2: who the storage behind `lu` is (hvm-core's `Backend::identity`);
    /// empty when the plugin cannot tell, as every plugin built before answers.
    fn identity(&self, lu: u32) -> RResult<RString, PluginError> {
        let _ = lu;
        RResult::ROk(RString::new())
    }
}

/// An opened backend, owned by the host.
pub type BackendBox = BackendObj_TO<'static, RBox<()>>;

/// Bits of [`BackupObj::capabilities`]: the array-side backup functions of EP 1 058 190
/// (hvm-core's `BackupCapabilities`). Unknown bits are ignored, so later interfaces can
/// add functions.
pub mod backup_bits {
    pub const PAIRS: u64 = 1;
    pub const CCOPY: u64 = 1 << 1;
    pub const AUTO: u64 = 1 << 2;
    pub const AREA_SPLIT: u64 = 1 << 3;
    pub const COW: u64 = 1 << 4;
    pub const POOL: u64 = 1 << 5;
}

/// The array-side backup functions of a backend (interface 0.1.1 and later). Operations
/// and replies cross the boundary as JSON of hvm-core's `BackupOp` and `BackupReply`:
/// those enums grow new operations and fields, and serde's tagged form lets an older
/// plugin answer "unknown operation" instead of the host and plugin disagreeing on a
/// layout.
#[sabi_trait]
pub trait BackupObj: Send + Sync {
    /// The functions offered, as [`backup_bits`].
    fn capabilities(&self) -> RResult<u64, PluginError>;
    /// Run one operation (`BackupOp` as JSON), answering `BackupReply` as JSON.
    #[sabi(last_prefix_field)]
    fn backup(&self, op: RStr<'_>) -> RResult<RString, PluginError>;
}

/// A backend's backup functions, owned by the host.
pub type BackupBox = BackupObj_TO<'static, RBox<()>>;

/// What [`PluginMod::open_with_backup`] opens: the backend, and its backup functions
/// when the plugin has any.
#[repr(C)]
#[derive(StableAbi)]
pub struct Opened {
    pub backend: BackendBox,
    pub backup: ROption<BackupBox>,
}

/// The root module every plugin exports with `#[export_root_module]`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    pub name: extern "C" fn() -> RStr<'static>,
    pub version: extern "C" fn() -> RStr<'static>,
    pub capabilities: extern "C" fn() -> Capabilities,
    pub thread_model: extern "C" fn() -> ThreadModel,
    /// Open a backend from the plugin's YAML parameters (the `params` of the host config),
    /// as interface 0.1.0's seven-method backend object.
    #[sabi(last_prefix_field)]
    pub open: extern "C" fn(params: RStr<'_>) -> RResult<v1::BackendBox, PluginError>,
    /// Interface 0.1.1: open a backend with its array-side backup functions (the backend
    /// still as 0.1.0's object). Plugins of 0.1.0 do not have it; the host loads them
    /// through [`v1`] and opens them with `open`.
    #[sabi(missing_field(option))]
    pub open_with_backup: extern "C" fn(params: RStr<'_>) -> RResult<v1::Opened, PluginError>,
    /// Interface 0.1.2: open a backend as today's [`BackendObj`] (with `write_zeroes` and
    /// `identity`) and its backup functions. Plugins of 0.1.1 are loaded through [`v2`].
    #[sabi(missing_field(option))]
    pub open_current: extern "C" fn(params: RStr<'_>) -> RResult<Opened, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "hvm_plugin";
    const NAME: &'static str = "hvm_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The root module as interface 0.1.0 laid it out, kept so this host still loads plugins
/// built against it.
///
/// abi_stable checks a library against the host's root module and refuses one with
/// fewer fields than the host's type (a newer library with more fields is fine, an
/// older one is not). So the host first checks a plugin against today's
/// [`PluginMod`](crate::PluginMod); when that fails for a plugin that declares 0.1.0,
/// it is checked against this frozen prefix (same type name, same fields) instead.
/// Never change it.
pub mod v1 {
    use super::{
        declare_root_module_statics, sabi_trait, BackupBox, Capabilities, Description, PluginError,
        RBox, ROption, RResult, RSlice, RSliceMut, RStr, RVec, RootModule, StableAbi, ThreadModel,
        VersionStrings,
    };

    /// The backend object as interfaces 0.1.0 and 0.1.1 laid it out: seven methods. A
    /// host with more methods in its type refuses a library with fewer, so today's
    /// [`BackendObj`](crate::BackendObj) is a separate type and a plugin exports both.
    /// Never change it.
    #[sabi_trait]
    pub trait BackendObj: Send + Sync {
        fn describe(&self) -> RResult<Description, PluginError>;
        fn read(&self, lu: u32, lba: u64, buf: RSliceMut<'_, u8>) -> RResult<(), PluginError>;
        fn write(
            &self,
            lu: u32,
            lba: u64,
            data: RSlice<'_, u8>,
            fua: bool,
        ) -> RResult<(), PluginError>;
        fn flush(&self, lu: u32) -> RResult<(), PluginError>;
        fn mode_sense(&self, lu: u32) -> RResult<RVec<u8>, PluginError>;
        fn mode_select(&self, lu: u32, page: RSlice<'_, u8>) -> RResult<(), PluginError>;
        #[sabi(last_prefix_field)]
        fn copy(&self, src: u32, dst: u32, first: u64, last: u64) -> RResult<(), PluginError>;
    }

    /// A 0.1.0/0.1.1 backend object, owned by the host.
    pub type BackendBox = BackendObj_TO<'static, RBox<()>>;

    /// What interface 0.1.1's `open_with_backup` opens.
    #[repr(C)]
    #[derive(StableAbi)]
    pub struct Opened {
        pub backend: BackendBox,
        pub backup: ROption<BackupBox>,
    }

    #[repr(C)]
    #[derive(StableAbi)]
    #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
    #[sabi(missing_field(panic))]
    pub struct PluginMod {
        pub name: extern "C" fn() -> RStr<'static>,
        pub version: extern "C" fn() -> RStr<'static>,
        pub capabilities: extern "C" fn() -> Capabilities,
        pub thread_model: extern "C" fn() -> ThreadModel,
        #[sabi(last_prefix_field)]
        pub open: extern "C" fn(params: RStr<'_>) -> RResult<BackendBox, PluginError>,
    }

    /// The interface version of [`PluginMod`] as it was frozen.
    pub const VERSION: &str = "0.1.0";

    impl RootModule for PluginModRef {
        declare_root_module_statics! {PluginModRef}
        const BASE_NAME: &'static str = "hvm_plugin";
        const NAME: &'static str = "hvm_plugin";
        const VERSION_STRINGS: VersionStrings = VersionStrings::new(VERSION);
    }
}

/// The root module as interface 0.1.1 laid it out (`open` and `open_with_backup`, with
/// the seven-method backend object), kept so this host still loads plugins built against
/// it, as [`v1`] does for 0.1.0. Never change it.
pub mod v2 {
    use super::{
        declare_root_module_statics, v1, Capabilities, PluginError, RResult, RStr, RootModule,
        StableAbi, ThreadModel, VersionStrings,
    };

    #[repr(C)]
    #[derive(StableAbi)]
    #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
    #[sabi(missing_field(panic))]
    pub struct PluginMod {
        pub name: extern "C" fn() -> RStr<'static>,
        pub version: extern "C" fn() -> RStr<'static>,
        pub capabilities: extern "C" fn() -> Capabilities,
        pub thread_model: extern "C" fn() -> ThreadModel,
        #[sabi(last_prefix_field)]
        pub open: extern "C" fn(params: RStr<'_>) -> RResult<v1::BackendBox, PluginError>,
        #[sabi(missing_field(option))]
        pub open_with_backup: extern "C" fn(params: RStr<'_>) -> RResult<v1::Opened, PluginError>,
    }

    /// The interface version of [`PluginMod`] as it was frozen.
    pub const VERSION: &str = "0.1.1";

    impl RootModule for PluginModRef {
        declare_root_module_statics! {PluginModRef}
        const BASE_NAME: &'static str = "hvm_plugin";
        const NAME: &'static str = "hvm_plugin";
        const VERSION_STRINGS: VersionStrings = VersionStrings::new(VERSION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvm_core::backend::errno;

    #[test]
    fn errno_follows_hvm_core() {
        assert_eq!(ErrorKind::DataProtect.errno(), errno::EPERM);
        assert_eq!(ErrorKind::Panicked.errno(), errno::EIO);
        assert_eq!(ErrorKind::Config.errno(), errno::EINVAL);
        assert_eq!(ErrorKind::Unsupported.errno(), errno::ENOTSUP);
    }
}
