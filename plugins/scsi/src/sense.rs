//! Status bytes and sense data: fixed format (70h/71h), which array-sim sends, and
//! descriptor format (72h/73h), which real targets may send.

use std::fmt;

use hvm_core::BackendErrorKind;

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION: sense data follows.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status BUSY: the target cannot take the command now.
pub const BUSY: u8 = 0x08;
/// SCSI status TASK SET FULL: too many commands queued at the target.
pub const TASK_SET_FULL: u8 = 0x28;

/// The sixteen sense keys of SPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xa,
    AbortedCommand = 0xb,
    Reserved = 0xc,
    VolumeOverflow = 0xd,
    Miscompare = 0xe,
    Completed = 0xf,
}

impl SenseKey {
    /// The key of a 4-bit value; `None` above 0Fh.
    pub fn from_u8(v: u8) -> Option<SenseKey> {
        use SenseKey::*;
        const ALL: [SenseKey; 16] = [
            NoSense,
            RecoveredError,
            NotReady,
            MediumError,
            HardwareError,
            IllegalRequest,
            UnitAttention,
            DataProtect,
            BlankCheck,
            VendorSpecific,
            CopyAborted,
            AbortedCommand,
            Reserved,
            VolumeOverflow,
            Miscompare,
            Completed,
        ];
        ALL.get(usize::from(v)).copied()
    }

    fn name(self) -> &'static str {
        use SenseKey::*;
        match self {
            NoSense => "NO SENSE",
            RecoveredError => "RECOVERED ERROR",
            NotReady => "NOT READY",
            MediumError => "MEDIUM ERROR",
            HardwareError => "HARDWARE ERROR",
            IllegalRequest => "ILLEGAL REQUEST",
            UnitAttention => "UNIT ATTENTION",
            DataProtect => "DATA PROTECT",
            BlankCheck => "BLANK CHECK",
            VendorSpecific => "VENDOR SPECIFIC",
            CopyAborted => "COPY ABORTED",
            AbortedCommand => "ABORTED COMMAND",
            Reserved => "RESERVED",
            VolumeOverflow => "VOLUME OVERFLOW",
            Miscompare => "MISCOMPARE",
            Completed => "COMPLETED",
        }
    }
}

/// Sense key, additional sense code and qualifier of a CHECK CONDITION.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    pub const INVALID_OPCODE: Sense = Sense::new(SenseKey::IllegalRequest, 0x20, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(SenseKey::IllegalRequest, 0x24, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(SenseKey::IllegalRequest, 0x21, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(SenseKey::IllegalRequest, 0x25, 0x00);
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(SenseKey::IllegalRequest, 0x26, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(SenseKey::DataProtect, 0x27, 0x00);
    pub const NOT_ACCESSIBLE: Sense = Sense::new(SenseKey::NotReady, 0x04, 0x0c);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x0c, 0x00);
    pub const INTERNAL_FAILURE: Sense = Sense::new(SenseKey::HardwareError, 0x44, 0x00);
    /// A backup function refused: the volume is not in a state for it.
    pub const BACKUP_STATE: Sense = Sense::new(SenseKey::IllegalRequest, 0x80, 0x01);
    /// A backup function refused: its parameters are wrong.
    pub const BACKUP_PARAMETERS: Sense = Sense::new(SenseKey::IllegalRequest, 0x80, 0x02);
    /// A backup function refused: a resource (device, working volume) is busy or missing.
    pub const BACKUP_RESOURCE: Sense = Sense::new(SenseKey::IllegalRequest, 0x80, 0x03);
    /// Host access to a working volume ([0123]).
    pub const WORKING_VOLUME: Sense = Sense::new(SenseKey::NotReady, 0x80, 0x04);

    /// Fixed-format sense data, 18 bytes.
    pub fn encode(self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key as u8;
        s[7] = 10; // additional sense length: bytes 8..18
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// Read sense data in fixed (70h/71h) or descriptor (72h/73h) format.
    pub fn parse(data: &[u8]) -> Result<Sense, SenseError> {
        let code = data.first().ok_or(SenseError::Short(0))? & 0x7f;
        let (key, asc, ascq, min) = match code {
            0x70 | 0x71 => (2, 12, 13, 14),
            0x72 | 0x73 => (1, 2, 3, 4),
            _ => return Err(SenseError::ResponseCode(data[0])),
        };
        if data.len() < min {
            return Err(SenseError::Short(data.len()));
        }
        let k = data[key] & 0x0f;
        let key = SenseKey::from_u8(k).ok_or(SenseError::Key(k))?;
        Ok(Sense::new(key, data[asc], data[ascq]))
    }

    /// What a driver reports for this sense to hvm-core.
    pub fn backend_error_kind(self) -> BackendErrorKind {
        match (self.key, self.asc) {
            (SenseKey::IllegalRequest, 0x21) => BackendErrorKind::OutOfRange,
            (SenseKey::IllegalRequest, 0x20) => BackendErrorKind::Unsupported,
            (SenseKey::IllegalRequest, _) => BackendErrorKind::InvalidRequest,
            (SenseKey::DataProtect, _) => BackendErrorKind::DataProtect,
            (SenseKey::NotReady, _) => BackendErrorKind::NotReady,
            _ => BackendErrorKind::Io,
        }
    }

    /// A condition an initiator retries: UNIT ATTENTION (a reset, a mode or capacity
    /// change was reported once), or NOT READY "becoming ready" (04h/01h).
    pub fn retryable(self) -> bool {
        matches!(
            (self.key, self.asc, self.ascq),
            (SenseKey::UnitAttention, _, _) | (SenseKey::NotReady, 0x04, 0x01)
        )
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:02X}h/{:02X}h",
            self.key.name(),
            self.asc,
            self.ascq
        )
    }
}

/// Sense data that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenseError {
    #[error("sense data is {0} bytes, too short for its format")]
    Short(usize),
    #[error("sense response code is {0:#04x}, expected 70h-73h")]
    ResponseCode(u8),
    #[error("sense key {0:#x} is not a sense key")]
    Key(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_round_trip_and_layout() {
        let s = Sense::WRITE_PROTECTED.encode();
        assert_eq!(
            (s[0], s[2], s[7], s[12], s[13]),
            (0x70, 0x07, 10, 0x27, 0x00)
        );
        assert_eq!(Sense::parse(&s), Ok(Sense::WRITE_PROTECTED));
        assert_eq!(Sense::parse(&s[..10]), Err(SenseError::Short(10)));
        assert_eq!(Sense::parse(&[]), Err(SenseError::Short(0)));
        assert_eq!(
            Sense::LBA_OUT_OF_RANGE.to_string(),
            "ILLEGAL REQUEST 21h/00h"
        );
        assert_eq!(
            Sense::WRITE_PROTECTED.backend_error_kind(),
            BackendErrorKind::DataProtect
        );
        assert_eq!(
            Sense::LBA_OUT_OF_RANGE.backend_error_kind(),
            BackendErrorKind::OutOfRange
        );
        assert_eq!(
            Sense::NOT_ACCESSIBLE.backend_error_kind(),
            BackendErrorKind::NotReady
        );
    }

    /// Descriptor format as tgt and Linux LIO may send it: key in byte 1, ASC/ASCQ in 2-3.
    #[test]
    fn descriptor_format() {
        let d = [0x72, 0x06, 0x2a, 0x01, 0, 0, 0, 0];
        let s = Sense::parse(&d).unwrap();
        assert_eq!(s, Sense::new(SenseKey::UnitAttention, 0x2a, 0x01));
        assert!(s.retryable());
        assert_eq!(s.to_string(), "UNIT ATTENTION 2Ah/01h");
        assert_eq!(Sense::parse(&d[..3]), Err(SenseError::Short(3)));
        assert_eq!(
            Sense::parse(&[0x75, 0, 0, 0]),
            Err(SenseError::ResponseCode(0x75))
        );
        assert!(!Sense::INVALID_FIELD_IN_PARAMETERS.retryable());
    }

    #[test]
    fn every_key_has_a_name() {
        for v in 0..16u8 {
            let k = SenseKey::from_u8(v).unwrap();
            assert_eq!(k as u8, v);
            assert!(!k.name().is_empty());
        }
        assert_eq!(SenseKey::from_u8(16), None);
    }
}
