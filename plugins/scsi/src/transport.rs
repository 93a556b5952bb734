//! How a command reaches an array: the [`Transport`] trait, what comes back
//! ([`Response`]) and how the link can fail ([`TransportError`]).
//!
//! A transport runs one command per call and is called from many threads at once, so
//! many commands are in flight (array-sim's socket tags them, iSCSI gives each an ITT).
//! A transport bounds each command by its timeout: a command without an answer in time
//! fails with [`TransportError::Timeout`], and the transport re-establishes the link.

use std::sync::Arc;
use std::time::Duration;

use crate::sense::{Sense, CHECK_CONDITION, GOOD};

/// The answer to one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: Vec<u8>,
}

impl Response {
    pub fn good(data: Vec<u8>) -> Response {
        Response {
            status: GOOD,
            sense: None,
            data,
        }
    }

    pub fn check(sense: Sense) -> Response {
        Response {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Vec::new(),
        }
    }
}

/// The link to an array failed (not a SCSI error: those are in the response).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("the connection to the array was closed")]
    Disconnected,
    #[error("the array sent a malformed reply: {0}")]
    Protocol(String),
    #[error("cannot send to the array: {0}")]
    Send(String),
    #[error("no answer from the array within {0:?}")]
    Timeout(Duration),
    /// Not connected, and the next attempt to reconnect is not due yet.
    #[error("the array is unreachable: {0}")]
    Unreachable(String),
}

/// One command of [`Transport::execute_two`]: LUN, CDB and data-out (no data-in).
#[derive(Clone, Copy, Debug)]
pub struct Submission<'a> {
    pub lun: u8,
    pub cdb: &'a [u8],
    pub data_out: &'a [u8],
}

/// The results of two commands run at once.
pub type TwoResults = [Result<Response, TransportError>; 2];

/// Runs one SCSI command on an array.
pub trait Transport: Send + Sync {
    fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError>;

    /// Run a command whose data-in is exactly `data_in.len()` bytes, into `data_in`; the
    /// returned response carries no data. The default copies; a transport that can place
    /// the data directly overrides it.
    fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Response, TransportError> {
        let mut r = self.execute(lun, cdb, data_out)?;
        copy_data_in(self, &mut r, data_in)?;
        Ok(r)
    }

    /// Takes back a reply's data buffer once `execute_into` has copied it out: a
    /// transport that keeps buffers for later replies keeps it; the default drops it.
    fn reuse(&self, spent: Vec<u8>) {
        drop(spent);
    }

    /// Run two commands without data-in at once (the two writes of a mirrored pair) when
    /// the transport can have both in flight from one thread; `None` when it cannot, and
    /// the caller runs them some other way.
    fn execute_two(&self, a: Submission<'_>, b: Submission<'_>) -> Option<TwoResults> {
        let _ = (a, b);
        None
    }
}

/// A GOOD reply's data copied into `data_in`, which must be exactly as long, and its
/// buffer handed to `t`'s [`Transport::reuse`]; other replies are left as they are.
pub fn copy_data_in<T: Transport + ?Sized>(
    t: &T,
    r: &mut Response,
    data_in: &mut [u8],
) -> Result<(), TransportError> {
    if r.status != GOOD {
        return Ok(());
    }
    if r.data.len() != data_in.len() {
        return Err(TransportError::Protocol(format!(
            "{} bytes of data-in, expected {}",
            r.data.len(),
            data_in.len()
        )));
    }
    data_in.copy_from_slice(&r.data);
    t.reuse(std::mem::take(&mut r.data));
    Ok(())
}

/// A boxed or shared transport is a transport.
macro_rules! forward_transport {
    ($($ty:ty),*) => {$(
        impl<T: Transport + ?Sized> Transport for $ty {
            fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Result<Response, TransportError> {
                (**self).execute(lun, cdb, data_out)
            }
            fn execute_into(
                &self,
                lun: u8,
                cdb: &[u8],
                data_out: &[u8],
                data_in: &mut [u8],
            ) -> Result<Response, TransportError> {
                (**self).execute_into(lun, cdb, data_out, data_in)
            }
            fn execute_two(&self, a: Submission<'_>, b: Submission<'_>) -> Option<TwoResults> {
                (**self).execute_two(a, b)
            }
            fn reuse(&self, spent: Vec<u8>) {
                (**self).reuse(spent)
            }
        }
    )*};
}

forward_transport!(Box<T>, Arc<T>);
