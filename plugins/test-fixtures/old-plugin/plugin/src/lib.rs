//! An in-memory array of one LU, built against the frozen interface 0.1.0: today's host
//! must load it and use it.
// abi_stable's macros expand to impls inside a generated const.
#![allow(non_local_definitions)]

use std::sync::Mutex;

use abi_stable::export_root_module;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr, RVec};
use hvm_plugin_abi::{
    BackendBox, BackendObj, BackendObj_TO, Capabilities, Description, ErrorKind, LuInfo,
    PluginError, PluginMod, PluginModRef, ThreadModel,
};

const BLOCKS: u64 = 2048;

struct Old(Mutex<Vec<u8>>);

fn range(lba: u64, len: usize) -> Result<std::ops::Range<usize>, PluginError> {
    let start = lba as usize * 512;
    if lba + (len as u64).div_ceil(512) > BLOCKS {
        return Err(PluginError::new(ErrorKind::OutOfRange, "past the end"));
    }
    Ok(start..start + len)
}

impl BackendObj for Old {
    fn describe(&self) -> RResult<Description, PluginError> {
        RResult::ROk(Description {
            lus: RVec::from(vec![LuInfo {
                id: 0,
                capacity_lbas: BLOCKS,
            }]),
            mirroring: RVec::new(),
            capabilities: Capabilities::default(),
        })
    }

    fn read(&self, _lu: u32, lba: u64, mut buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        match range(lba, buf.len()) {
            Ok(r) => {
                let d = self.0.lock().unwrap_or_else(|p| p.into_inner());
                buf.copy_from_slice(&d[r]);
                RResult::ROk(())
            }
            Err(e) => RResult::RErr(e),
        }
    }

    fn write(
        &self,
        _lu: u32,
        lba: u64,
        data: RSlice<'_, u8>,
        _fua: bool,
    ) -> RResult<(), PluginError> {
        match range(lba, data.len()) {
            Ok(r) => {
                let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
                d[r].copy_from_slice(&data);
                RResult::ROk(())
            }
            Err(e) => RResult::RErr(e),
        }
    }

    fn flush(&self, _lu: u32) -> RResult<(), PluginError> {
        RResult::ROk(())
    }

    fn mode_sense(&self, _lu: u32) -> RResult<RVec<u8>, PluginError> {
        RResult::RErr(PluginError::new(ErrorKind::Unsupported, "no mode pages"))
    }

    fn mode_select(&self, _lu: u32, _page: RSlice<'_, u8>) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::new(ErrorKind::Unsupported, "no mode pages"))
    }

    fn copy(&self, _src: u32, _dst: u32, _first: u64, _last: u64) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::new(ErrorKind::Unsupported, "no array copy"))
    }
}

extern "C" fn name() -> RStr<'static> {
    RStr::from_str("old")
}

extern "C" fn version() -> RStr<'static> {
    RStr::from_str("0.1.0")
}

extern "C" fn capabilities() -> Capabilities {
    Capabilities::default()
}

extern "C" fn thread_model() -> ThreadModel {
    ThreadModel::Parallel
}

extern "C" fn open(_params: RStr<'_>) -> RResult<BackendBox, PluginError> {
    let old = Old(Mutex::new(vec![0u8; BLOCKS as usize * 512]));
    RResult::ROk(BackendObj_TO::from_value(old, TD_Opaque))
}

#[export_root_module]
pub fn get_library() -> PluginModRef {
    PluginMod {
        name,
        version,
        capabilities,
        thread_model,
        open,
    }
    .leak_into_prefix()
}
