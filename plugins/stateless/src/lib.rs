//! Driver plugin for the stateless array (array-sim's `stateless` firmware), embedded in the
//! host or reached over a socket; see `array_sim::driver` for its parameters.

use array_sim::config::FirmwareKind;
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};

fn open(params: &str) -> Result<array_sim::driver::Array, PluginError> {
    array_sim::driver::open(params, FirmwareKind::Stateless)
        .map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "stateless",
    capabilities: Capabilities { virtual_lu_forming: true, array_copy: true, fua: true, ..Capabilities::default() },
    // The client library keeps many tagged commands in flight from many threads.
    thread_model: ThreadModel::Parallel,
    open: open,
}
