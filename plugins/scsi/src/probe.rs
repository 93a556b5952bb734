//! What a driver of a richer array kind asks a target before it trusts it, and the one
//! line it refuses with when the target lacks the function.

use hvm_core::backend::{BackendError, BackendErrorKind};

use crate::cdb::Command;
use crate::driver::Array;

/// The sense of a refusal, from the message `ArrayClient` built ("...: ILLEGAL REQUEST
/// 26h/00h").
fn sense_text(e: &BackendError) -> String {
    e.message
        .rsplit(": ")
        .next()
        .unwrap_or(&e.message)
        .to_string()
}

/// Run `cmd` on `lun`; a refusal by the target (ILLEGAL REQUEST, unsupported) becomes
/// "`at`: `what` refused (SENSE): `consequence`; use the stateless driver".
pub fn require(
    array: &Array,
    lun: u8,
    cmd: Command,
    data_out: &[u8],
    at: &str,
    what: &str,
    consequence: &str,
) -> Result<Vec<u8>, String> {
    array.command(lun, cmd, data_out).map_err(|e| match e.kind {
        BackendErrorKind::InvalidRequest | BackendErrorKind::Unsupported => format!(
            "{at}: {what} refused ({}): {consequence}; use the stateless driver",
            sense_text(&e)
        ),
        _ => format!("{at}: {what}: {e}"),
    })
}
