//! Driver plugin for Mode Select arrays (Fig. 2, E1): the array keeps each LU's mode, set
//! by MODE SELECT of hvm's page 00h. Transports (see `hvm_scsi::driver`): array-sim
//! embedded (feature `embedded`), an array-sim daemon (`connect:`), or an iSCSI target
//! (`iscsi:`, feature `iscsi`). A target that refuses the mode page is refused at open
//! in one line: it cannot keep the LU mode, and the stateless driver is what works on it.

use hvm_core::mode::{self, Mode};
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};
use hvm_scsi::cdb::Command;
use hvm_scsi::driver::{self, Array, ArrayKind, Params};
use hvm_scsi::format::{encode_mode_select_6, mode_page_6};

/// The `array.embedded` config, parsed with the rest of the parameters.
#[cfg(feature = "embedded")]
type Embedded = array_sim::config::ArrayConfig;
#[cfg(not(feature = "embedded"))]
type Embedded = driver::NotEmbedded;

/// A LU's mode must survive on the target: MODE SENSE of page 00h, then MODE SELECT of
/// the page it answered (which changes nothing), or of Synchronized when it answered
/// nothing.
fn probe_mode_page(array: &Array, lun: u8, at: &str) -> Result<(), String> {
    let sense = Command::ModeSense6 {
        page: mode::PAGE_CODE,
        alloc_len: 255,
    };
    let current = array
        .command(lun, sense, &[])
        .ok()
        .and_then(|d| mode_page_6(&d).ok().map(<[u8]>::to_vec));
    let page = match current {
        Some(p) => p,
        None => mode::encode_mode_select(Mode::Synchronized)
            .map_err(|e| e.to_string())?
            .to_vec(),
    };
    let data = encode_mode_select_6(&page);
    let select = Command::ModeSelect6 {
        param_len: data.len() as u8,
    };
    let what = format!("MODE SELECT of page {:#04x}", mode::PAGE_CODE);
    hvm_scsi::probe::require(
        array,
        lun,
        select,
        &data,
        at,
        &what,
        "this array cannot keep the LU mode",
    )
    .map(drop)
}

fn open_array(params: &str) -> Result<Array, String> {
    let p = Params::<Embedded>::parse(params)?;
    if p.volumes.is_some() {
        return Err("the mode-select driver drives one array (`array:`); volumes of two LUNs are the stateless driver's".into());
    }
    let (array, lun) = driver::open_array(&p)?;
    let at = p.array.as_ref().map_or_else(String::new, driver::location);
    if let Some(lun) = lun {
        probe_mode_page(&array, lun, &at)?;
    }
    driver::check_kind(&array, ArrayKind::ModeSelect, &at)?;
    Ok(array)
}

fn open(params: &str) -> Result<Array, PluginError> {
    open_array(params).map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "mode-select",
    capabilities: Capabilities { mode_select: true, array_copy: true, fua: true, ..Capabilities::default() },
    // The transports keep many commands in flight from many threads.
    thread_model: ThreadModel::Parallel,
    open: open,
}
