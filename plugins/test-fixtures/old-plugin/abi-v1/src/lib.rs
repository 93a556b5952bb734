//! The plugin interface frozen as hvm-plugin-abi 0.1.0 shipped it: the types of
//! `plugins/abi/src/lib.rs` at that time, without the host-side helpers. Do not change
//! it: it stands for plugins already built.
// abi_stable's #[sabi_trait] expands to impls inside a generated const.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

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
}

/// An opened backend, owned by the host.
pub type BackendBox = BackendObj_TO<'static, RBox<()>>;

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
    /// Open a backend from the plugin's YAML parameters (the `params` of the host config).
    #[sabi(last_prefix_field)]
    pub open: extern "C" fn(params: RStr<'_>) -> RResult<BackendBox, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "hvm_plugin";
    const NAME: &'static str = "hvm_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
