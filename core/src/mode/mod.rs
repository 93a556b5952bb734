//! LU modes and the Mode Select / Mode Sense parameter pages.
//!
//! Fig. 4 ([0025]): 2 bytes, page code 00h then the mode (0 Synchronized, 1 Snapshot,
//! 2 Re-synchronizing; Mode Sense may also answer 4, Undefined, for an LU that is not
//! duplicated or is a mate). Fig. 11 ([0054]): 4 bytes, page code 00h, classification
//! (0: a mirroring LU, 1: any other LU), mirroring origin LU, mirroring mate LU.
//!
//! hvm adds classification 2 for the pre-update array's Fig. 14 pairs (a mirroring LU and
//! its read-only mate; the origin byte is 0): the 4th embodiment says the host table is
//! built "with the Mode Sense" [0074] without fixing a page, so we reuse Fig. 11's.

use std::fmt;

mod mirror_page;

pub use mirror_page::{decode_mirror_page, encode_mirror_page, MirrorPage};

/// Page code of both parameter pages.
pub const PAGE_CODE: u8 = 0x00;

/// The mode of an LU (Fig. 2) or of a virtual LU (Fig. 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Both legs hold the same data; the array mirrors writes.
    Synchronized,
    /// The legs are independent; the host records updates in the update-location table.
    Snapshot,
    /// The legs are being made the same again (Fig. 7); writes are mirrored.
    Resynchronizing,
    /// Not accessible ([0025] code 4, [0052]).
    Undefined,
}

impl Mode {
    /// The code used in the Fig. 4 page.
    pub fn code(self) -> u8 {
        match self {
            Mode::Synchronized => 0,
            Mode::Snapshot => 1,
            Mode::Resynchronizing => 2,
            Mode::Undefined => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Mode> {
        match code {
            0 => Some(Mode::Synchronized),
            1 => Some(Mode::Snapshot),
            2 => Some(Mode::Resynchronizing),
            4 => Some(Mode::Undefined),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Synchronized => "Synchronized",
            Mode::Snapshot => "Snapshot",
            Mode::Resynchronizing => "Re-synchronizing",
            Mode::Undefined => "Undefined",
        })
    }
}

/// A parameter page that could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("mode page is {found} bytes, expected {expected}")]
    Length { expected: usize, found: usize },
    #[error("mode page code is {found:#04x}, expected 00h")]
    PageCode { found: u8 },
    #[error("mode byte is {found}, expected 0 (Synchronized), 1 (Snapshot), 2 (Re-synchronizing) or 4 (Undefined)")]
    ModeCode { found: u8 },
    #[error("Mode Select cannot set {0}: only Synchronized, Snapshot and Re-synchronizing")]
    NotSelectable(Mode),
    #[error("mirroring page classification is {found}, expected 0 (mirroring LU), 1 (other) or 2 (pre-update pair)")]
    Classification { found: u8 },
    #[error("LU {0} does not fit the one-byte LU field of the Fig. 11 page")]
    LuTooLarge(u32),
}

fn check_header(page: &[u8], expected: usize) -> Result<(), PageError> {
    if page.len() != expected {
        return Err(PageError::Length {
            expected,
            found: page.len(),
        });
    }
    if page[0] != PAGE_CODE {
        return Err(PageError::PageCode { found: page[0] });
    }
    Ok(())
}

/// Fig. 4: the 2-byte page for Mode Select (`mode` may not be Undefined).
pub fn encode_mode_select(mode: Mode) -> Result<[u8; 2], PageError> {
    if mode == Mode::Undefined {
        return Err(PageError::NotSelectable(mode));
    }
    Ok([PAGE_CODE, mode.code()])
}

/// Fig. 4 as sent by Mode Select: Undefined is refused.
pub fn decode_mode_select(page: &[u8]) -> Result<Mode, PageError> {
    let mode = decode_mode_sense(page)?;
    if mode == Mode::Undefined {
        return Err(PageError::NotSelectable(mode));
    }
    Ok(mode)
}

/// Fig. 4 as answered by Mode Sense (any of the four modes).
pub fn encode_mode_sense(mode: Mode) -> [u8; 2] {
    [PAGE_CODE, mode.code()]
}

pub fn decode_mode_sense(page: &[u8]) -> Result<Mode, PageError> {
    check_header(page, 2)?;
    Mode::from_code(page[1]).ok_or(PageError::ModeCode { found: page[1] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fig4_round_trip() {
        for mode in [Mode::Synchronized, Mode::Snapshot, Mode::Resynchronizing] {
            let page = encode_mode_select(mode).unwrap();
            assert_eq!(page[0], 0x00);
            assert_eq!(decode_mode_select(&page), Ok(mode));
        }
        assert_eq!(encode_mode_sense(Mode::Undefined), [0, 4]);
        assert_eq!(decode_mode_sense(&[0, 4]), Ok(Mode::Undefined));
        assert_eq!(
            decode_mode_select(&[0, 4]),
            Err(PageError::NotSelectable(Mode::Undefined))
        );
    }

    #[test]
    fn fig4_malformed() {
        assert_eq!(
            decode_mode_sense(&[0]),
            Err(PageError::Length {
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            decode_mode_sense(&[0x3f, 0]),
            Err(PageError::PageCode { found: 0x3f })
        );
        assert_eq!(
            decode_mode_sense(&[0, 3]),
            Err(PageError::ModeCode { found: 3 })
        );
    }

    proptest! {
        /// Any bytes decode to a value or an error; never a panic.
        #[test]
        fn arbitrary_pages_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..8)) {
            let _ = decode_mode_sense(&bytes);
            let _ = decode_mode_select(&bytes);
            if let Ok(p) = decode_mirror_page(&bytes) {
                prop_assert_eq!(decode_mirror_page(&encode_mirror_page(p).unwrap()), Ok(p));
            }
        }
    }
}
