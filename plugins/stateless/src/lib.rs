//! Driver plugin for stateless arrays (Fig. 9, E2): the array keeps no snapshot state, so
//! it works on any SCSI target. Two shapes of parameters (see `hvm_scsi::driver`):
//!
//! - `array:` an array-sim of the stateless kind, embedded (feature `embedded`) or a
//!   daemon (`connect:`); the array forms the virtual LUs and copies on resync;
//! - `volumes:` two-leg volumes whose legs are LUNs of real targets
//!   (`iscsi://HOST[:PORT]/IQN/LUN`, feature `iscsi`); hvm-legs mirrors on the host.

use hvm_core::backend::Backend;
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};
use hvm_scsi::driver::{self, ArrayKind, Params};

/// The `array.embedded` config, parsed with the rest of the parameters.
#[cfg(feature = "embedded")]
type Embedded = array_sim::config::ArrayConfig;
#[cfg(not(feature = "embedded"))]
type Embedded = driver::NotEmbedded;

/// The backend `params` describe: an array, or volumes of LUNs.
pub fn open_backend(params: &str) -> Result<Box<dyn Backend>, String> {
    let p = Params::<Embedded>::parse(params)?;
    match (&p.array, &p.volumes) {
        (Some(spec), None) => {
            let at = driver::location(spec);
            let (array, lun) = driver::open_array(&p)?;
            if lun.is_some() {
                return Err(format!(
                    "{at}: one LUN is not a stateless array; give `volumes:` with two LUNs a volume"
                ));
            }
            driver::check_kind(&array, ArrayKind::Stateless, &at)?;
            Ok(Box::new(array))
        }
        (None, Some(_)) => Ok(Box::new(driver::open_volumes(&p)?)),
        _ => Err("driver parameters: give exactly one of `array` and `volumes`".into()),
    }
}

fn open(params: &str) -> Result<Box<dyn Backend>, PluginError> {
    open_backend(params).map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "stateless",
    capabilities: Capabilities { virtual_lu_forming: true, array_copy: true, fua: true, ..Capabilities::default() },
    // The transports keep many commands in flight from many threads.
    thread_model: ThreadModel::Parallel,
    open: open,
}
