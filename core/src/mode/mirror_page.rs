//! Fig. 11's page ([0054]): 4 bytes, page code 00h, classification (0: a mirroring LU,
//! 1: any other LU), mirroring origin LU, mirroring mate LU; and hvm's classification 2 for
//! the pre-update array's Fig. 14 pairs. It names LUs and mirroring definitions, so it sits
//! above the tables, while the mode itself sits below them.

use super::{check_header, PageError, PAGE_CODE};
use crate::tables::{LuId, MirrorDefinition};

/// What Fig. 11's page says about one LU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorPage {
    /// Classification 0: the LU is a mirroring LU made of `origin` and `mate` (Fig. 9).
    Mirror { origin: LuId, mate: LuId },
    /// Classification 1: an origin, a mate, or an LU that is not mirrored.
    Other,
    /// Classification 2 (hvm): a mirroring LU whose read-only `mate` is one leg (Fig. 14).
    PreUpdate { mate: LuId },
}

impl MirrorPage {
    /// The mirroring definition this page describes for `lu`, if any.
    pub fn definition(self, lu: LuId) -> Option<MirrorDefinition> {
        match self {
            MirrorPage::Mirror { origin, mate } => Some(MirrorDefinition::Triple {
                mirror: lu,
                origin,
                mate,
            }),
            MirrorPage::PreUpdate { mate } => Some(MirrorDefinition::Pair { mirror: lu, mate }),
            MirrorPage::Other => None,
        }
    }
}

fn lu_byte(lu: LuId) -> Result<u8, PageError> {
    u8::try_from(lu.0).map_err(|_| PageError::LuTooLarge(lu.0))
}

pub fn encode_mirror_page(page: MirrorPage) -> Result<[u8; 4], PageError> {
    Ok(match page {
        MirrorPage::Mirror { origin, mate } => [PAGE_CODE, 0, lu_byte(origin)?, lu_byte(mate)?],
        MirrorPage::Other => [PAGE_CODE, 1, 0, 0],
        MirrorPage::PreUpdate { mate } => [PAGE_CODE, 2, 0, lu_byte(mate)?],
    })
}

pub fn decode_mirror_page(page: &[u8]) -> Result<MirrorPage, PageError> {
    check_header(page, 4)?;
    let lu = |b: u8| LuId(u32::from(b));
    match page[1] {
        0 => Ok(MirrorPage::Mirror {
            origin: lu(page[2]),
            mate: lu(page[3]),
        }),
        1 => Ok(MirrorPage::Other),
        2 => Ok(MirrorPage::PreUpdate { mate: lu(page[3]) }),
        found => Err(PageError::Classification { found }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fig. 9's rows as Fig. 11 pages: LU 0 is the mirroring LU of origin 1 and mate 2.
    #[test]
    fn fig11_pages_of_fig9() {
        let page = [0x00, 0, 1, 2];
        let decoded = decode_mirror_page(&page).unwrap();
        assert_eq!(
            decoded.definition(LuId(0)),
            Some(MirrorDefinition::Triple {
                mirror: LuId(0),
                origin: LuId(1),
                mate: LuId(2)
            })
        );
        assert_eq!(encode_mirror_page(decoded).unwrap(), page);
        assert_eq!(decode_mirror_page(&[0, 1, 0, 0]), Ok(MirrorPage::Other));
        assert_eq!(
            decode_mirror_page(&[0, 9, 0, 0]),
            Err(PageError::Classification { found: 9 })
        );
        assert_eq!(
            encode_mirror_page(MirrorPage::PreUpdate { mate: LuId(300) }),
            Err(PageError::LuTooLarge(300))
        );
    }
}
