//! A plugin whose backend panics on every read, and whose `open` fails when its
//! parameters say `fail`. The host must get errors, take the backend out of service
//! after the panic, and keep serving its other backends.

use hvm_core::backend::{Backend, BackendDescription, BackendError, BackendErrorKind, LuInfo};
use hvm_core::{Extent, LuId};
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};

struct Panicky;

fn unsupported() -> BackendError {
    BackendError::new(BackendErrorKind::Unsupported, "fixture")
}

impl Backend for Panicky {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        Ok(BackendDescription {
            lus: vec![LuInfo {
                id: LuId(0),
                capacity_lbas: 8,
            }],
            ..BackendDescription::default()
        })
    }
    fn read(&self, _lu: LuId, _lba: u64, _buf: &mut [u8]) -> Result<(), BackendError> {
        panic!("fixture: read always panics")
    }
    fn write(&self, _lu: LuId, _lba: u64, _data: &[u8], _fua: bool) -> Result<(), BackendError> {
        Ok(())
    }
    fn flush(&self, _lu: LuId) -> Result<(), BackendError> {
        Ok(())
    }
    fn mode_sense(&self, _lu: LuId) -> Result<Vec<u8>, BackendError> {
        Err(unsupported())
    }
    fn mode_select(&self, _lu: LuId, _page: &[u8]) -> Result<(), BackendError> {
        Err(unsupported())
    }
    fn copy(&self, _src: LuId, _dst: LuId, _extent: Extent) -> Result<(), BackendError> {
        Err(unsupported())
    }
}

fn open(params: &str) -> Result<Panicky, PluginError> {
    if params.trim() == "fail" {
        return Err(PluginError::new(ErrorKind::Config, "asked to fail"));
    }
    Ok(Panicky)
}

hvm_plugin_abi::export_plugin! {
    name: "test-panicking",
    capabilities: Capabilities::default(),
    thread_model: ThreadModel::SerializeAll,
    open: open,
}
