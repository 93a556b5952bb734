//! Driver plugin for pre-update arrays (Fig. 14, E4): a mirroring LU whose mate is
//! read-only and whose pre-update data the array saves, found through hvm's pairing page
//! (INQUIRY VPD C0h). Transports (see `hvm_scsi::driver`): array-sim embedded (feature
//! `embedded`), an array-sim daemon (`connect:`), or an iSCSI target (`iscsi:`, feature
//! `iscsi`). A target without the pairing page is refused at open in one line.

use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};
use hvm_scsi::cdb::Command;
use hvm_scsi::driver::{self, Array, ArrayKind, Params};
use hvm_scsi::format::VPD_PAIRING;

/// The `array.embedded` config, parsed with the rest of the parameters.
#[cfg(feature = "embedded")]
type Embedded = array_sim::config::ArrayConfig;
#[cfg(not(feature = "embedded"))]
type Embedded = driver::NotEmbedded;

/// The target must describe a mirroring LU and its read-only mate (VPD C0h).
fn probe_pairing(array: &Array, lun: u8, at: &str) -> Result<(), String> {
    let cmd = Command::Inquiry {
        evpd: true,
        page: VPD_PAIRING,
        alloc_len: 512,
    };
    let what = format!("INQUIRY of VPD page {VPD_PAIRING:#04x}");
    hvm_scsi::probe::require(
        array,
        lun,
        cmd,
        &[],
        at,
        &what,
        "this array cannot keep pre-update data for a read-only mate",
    )
    .map(drop)
}

fn open_array(params: &str) -> Result<Array, String> {
    let p = Params::<Embedded>::parse(params)?;
    if p.volumes.is_some() {
        return Err("the pre-update driver drives one array (`array:`); volumes of two LUNs are the stateless driver's".into());
    }
    let (array, lun) = driver::open_array(&p)?;
    let at = p.array.as_ref().map_or_else(String::new, driver::location);
    if let Some(lun) = lun {
        probe_pairing(&array, lun, &at)?;
    }
    driver::check_kind(&array, ArrayKind::PreUpdate, &at)?;
    Ok(array)
}

fn open(params: &str) -> Result<Array, PluginError> {
    open_array(params).map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "pre-update",
    capabilities: Capabilities { read_only_mate: true, fua: true, ..Capabilities::default() },
    // The transports keep many commands in flight from many threads.
    thread_model: ThreadModel::Parallel,
    open: open,
}
