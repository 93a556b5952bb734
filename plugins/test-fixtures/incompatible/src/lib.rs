//! A plugin built against an incompatible interface: its root module has the hvm plugin
//! name but another layout (`open` takes a number, and a field is missing), as an old or
//! foreign build would. abi_stable's layout check must refuse it.
// abi_stable's macros expand to impls inside a generated const.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::RStr;
use abi_stable::{
    declare_root_module_statics, export_root_module, package_version_strings, StableAbi,
};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OldPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct OldPluginMod {
    pub name: extern "C" fn() -> RStr<'static>,
    #[sabi(last_prefix_field)]
    pub open: extern "C" fn(params: u64) -> u64,
}

impl RootModule for OldPluginModRef {
    declare_root_module_statics! {OldPluginModRef}
    const BASE_NAME: &'static str = "hvm_plugin";
    const NAME: &'static str = "hvm_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn name() -> RStr<'static> {
    RStr::from_str("incompatible")
}

extern "C" fn open(params: u64) -> u64 {
    params
}

#[export_root_module]
pub fn get_library() -> OldPluginModRef {
    OldPluginMod { name, open }.leak_into_prefix()
}
