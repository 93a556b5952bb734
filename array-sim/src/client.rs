//! The array in this process as a transport of hvm-scsi's generic client, and the
//! simulator's own vendor command (SET FAULT). The client itself ([`ArrayClient`]) and
//! the socket transport ([`SocketClient`]) are hvm-scsi's, re-exported here.

use hvm_core::backend::BackendError;
pub use hvm_scsi::client::ArrayClient;
pub use hvm_scsi::socket::SocketClient;
pub use hvm_scsi::transport::{Transport, TransportError};
use hvm_scsi::Response;

use crate::engine::{Engine, Outcome};
use crate::fault::FaultRule;
use crate::scsi::Command;

/// The array in this process (the embedded default): a command is a function call.
impl Transport for Engine {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError> {
        match Engine::execute(self, lun, cdb, data_out) {
            Outcome::Reply(r) => Ok(r),
            Outcome::Drop => Err(TransportError::Disconnected),
        }
    }
    fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Response, TransportError> {
        match Engine::execute_into(self, lun, cdb, data_out, data_in) {
            Outcome::Reply(r) => Ok(r),
            Outcome::Drop => Err(TransportError::Disconnected),
        }
    }
}

/// array-sim's fault injection through the vendor SET FAULT command (C2h).
pub trait SetFault {
    /// Install `rule` on the array (`None` clears it), addressed to `lun`.
    fn set_fault(&self, lun: u8, rule: Option<&FaultRule>) -> Result<(), BackendError>;
}

impl<T: Transport> SetFault for ArrayClient<T> {
    fn set_fault(&self, lun: u8, rule: Option<&FaultRule>) -> Result<(), BackendError> {
        let data = FaultRule::encode(rule);
        let cmd = Command::SetFault {
            param_len: data.len() as u32,
        };
        self.command(lun, cmd, &data).map(drop)
    }
}
