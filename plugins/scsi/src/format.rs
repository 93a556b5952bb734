//! The data formats of the commands: READ CAPACITY, REPORT LUNS, mode pages, the VPD
//! pages (80h serial, 83h identification, hvm's pairing page C0h and the pair page C1h of
//! EP 1 058 190) and Fig. 5's areas.

use hvm_core::array_backup::{Area, PairState, PairStatus};

use crate::sense::Sense;

/// Bytes of a READ CAPACITY(16) answer.
pub const READ_CAPACITY_16_LEN: usize = 32;
/// Bytes of the mode parameter header before a MODE SENSE(6)/SELECT(6) page.
pub const MODE_HEADER_6_LEN: usize = 4;
/// Vendor VPD page of INQUIRY that describes the array's mirroring (pairing).
pub const VPD_PAIRING: u8 = 0xc0;
/// Vendor VPD page of INQUIRY that describes the pair of a volume (EP 1 058 190).
pub const VPD_PAIR: u8 = 0xc1;
/// Bytes of one Fig. 5 parameter.
pub const PAIR_SPLIT_PARAM_LEN: usize = 16;

/// The READ CAPACITY(16) answer: last LBA and block length.
pub fn encode_read_capacity_16(blocks: u64, block_size: u32) -> [u8; READ_CAPACITY_16_LEN] {
    let mut d = [0u8; READ_CAPACITY_16_LEN];
    d[..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&block_size.to_be_bytes());
    d
}

/// (number of blocks, block length) from a READ CAPACITY(16) answer.
pub fn decode_read_capacity_16(d: &[u8]) -> Option<(u64, u32)> {
    if d.len() < 12 {
        return None;
    }
    Some((be64(d).checked_add(1)?, be32(&d[8..])))
}

/// REPORT LUNS data: list length, 4 reserved bytes, then each LUN in single-level
/// peripheral addressing (8 bytes, the LUN in byte 1).
pub fn encode_report_luns(luns: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 8 + 8 * luns.len()];
    d[..4].copy_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
    for (i, lun) in luns.iter().enumerate() {
        d[8 + 8 * i + 1] = *lun;
    }
    d
}

pub fn decode_report_luns(d: &[u8]) -> Option<Vec<u8>> {
    let len = be32(d.get(..4)?) as usize;
    let body = d.get(8..8 + len)?;
    Some(body.chunks_exact(8).map(|e| e[1]).collect())
}

/// MODE SENSE(6) data: the 4-byte mode parameter header, then `page`.
pub fn encode_mode_sense_6(page: &[u8], write_protected: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(MODE_HEADER_6_LEN + page.len());
    // Mode data length counts the bytes after itself.
    d.push((MODE_HEADER_6_LEN - 1 + page.len()) as u8);
    d.push(0); // medium type
    d.push(if write_protected { 0x80 } else { 0 });
    d.push(0); // no block descriptors
    d.extend_from_slice(page);
    d
}

/// The page of MODE SENSE(6) or MODE SELECT(6) data, after its header and any block
/// descriptors.
pub fn mode_page_6(data: &[u8]) -> Result<&[u8], Sense> {
    if data.len() < MODE_HEADER_6_LEN {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let start = MODE_HEADER_6_LEN + usize::from(data[3]);
    data.get(start..).ok_or(Sense::INVALID_FIELD_IN_PARAMETERS)
}

/// MODE SELECT(6) data-out: a zeroed header, then `page`.
pub fn encode_mode_select_6(page: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; MODE_HEADER_6_LEN];
    d.extend_from_slice(page);
    d
}

/// Fig. 5's parameters, and the split areas of the pair page: per area the start block
/// and the number of blocks, 8 bytes each, big-endian.
pub fn encode_areas(d: &mut Vec<u8>, areas: &[Area]) {
    for a in areas {
        d.extend_from_slice(&a.start.to_be_bytes());
        d.extend_from_slice(&a.blocks.to_be_bytes());
    }
}

/// The whole areas in `d` (a trailing partial one is ignored).
pub fn decode_areas(d: &[u8]) -> Vec<Area> {
    d.chunks_exact(PAIR_SPLIT_PARAM_LEN)
        .map(|p| Area {
            start: be64(p),
            blocks: be64(&p[8..]),
        })
        .collect()
}

/// Split areas listed at most by the pair page.
const PAIR_PAGE_AREAS: usize = 1000;
/// Bytes of the pair page before its areas.
const PAIR_PAGE_HEADER: usize = 42;

/// The body of VPD page C1h for `lun` (step 43): role (0 unpaired, 1 user volume, 2
/// secondary), the other volume, state (0 forming, 1 duplex, 2 split, 3 resyncing), a
/// reserved byte, blocks per bit (4 bytes), then units, split units, different units and
/// copied bytes (8 each), the number of split areas (2) and the areas.
pub fn encode_pair_page(lun: u8, pair: Option<&PairStatus>) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    let Some(s) = pair else {
        d.resize(PAIR_PAGE_HEADER + 2, 0);
        return d;
    };
    let primary = s.primary == u32::from(lun);
    d[0] = if primary { 1 } else { 2 };
    d[1] = if primary { s.secondary } else { s.primary } as u8;
    d[2] = match s.state {
        PairState::Forming => 0,
        PairState::Duplex => 1,
        PairState::Split => 2,
        PairState::Resyncing => 3,
    };
    d.extend_from_slice(&s.blocks_per_bit.to_be_bytes());
    for v in [s.units, s.split_units, s.diff_units, s.copied_bytes] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    let areas = &s.split_areas[..s.split_areas.len().min(PAIR_PAGE_AREAS)];
    d.extend_from_slice(&(areas.len() as u16).to_be_bytes());
    encode_areas(&mut d, areas);
    d
}

/// A pair page body of `lun`: `None` if malformed, `Some(None)` for an unpaired LU.
pub fn decode_pair_page(lun: u8, d: &[u8]) -> Option<Option<PairStatus>> {
    if d.len() < PAIR_PAGE_HEADER {
        return None;
    }
    if d[0] == 0 {
        return Some(None);
    }
    let (primary, secondary) = if d[0] == 1 { (lun, d[1]) } else { (d[1], lun) };
    let state = match d[2] {
        0 => PairState::Forming,
        1 => PairState::Duplex,
        2 => PairState::Split,
        3 => PairState::Resyncing,
        _ => return None,
    };
    let n = usize::from(u16::from_be_bytes([d[40], d[41]]));
    let areas = d.get(PAIR_PAGE_HEADER..PAIR_PAGE_HEADER + n * PAIR_SPLIT_PARAM_LEN)?;
    Some(Some(PairStatus {
        primary: u32::from(primary),
        secondary: u32::from(secondary),
        state,
        blocks_per_bit: be32(&d[4..]),
        units: be64(&d[8..]),
        split_units: be64(&d[16..]),
        diff_units: be64(&d[24..]),
        copied_bytes: be64(&d[32..]),
        split_areas: decode_areas(areas),
    }))
}

/// Standard INQUIRY data page list VPD page (00h).
pub const VPD_SUPPORTED_PAGES: u8 = 0x00;
/// Unit serial number VPD page.
pub const VPD_SERIAL: u8 = 0x80;
/// Device identification VPD page.
pub const VPD_DEVICE_ID: u8 = 0x83;

/// What a standard INQUIRY answer says about the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandardInquiry {
    /// Peripheral device type (0: direct-access block device).
    pub device_type: u8,
    /// 3PC: the device supports third-party copy (EXTENDED COPY).
    pub third_party_copy: bool,
    pub vendor: String,
    pub product: String,
}

fn ascii(d: &[u8]) -> String {
    String::from_utf8_lossy(d).trim().to_string()
}

/// A standard INQUIRY answer (at least 36 bytes), or `None` when shorter.
pub fn decode_standard_inquiry(d: &[u8]) -> Option<StandardInquiry> {
    if d.len() < 36 {
        return None;
    }
    Some(StandardInquiry {
        device_type: d[0] & 0x1f,
        third_party_copy: d[5] & 0x08 != 0,
        vendor: ascii(&d[8..16]),
        product: ascii(&d[16..32]),
    })
}

/// The body of a VPD page (after its 4-byte header, as long as the header says), or
/// `None` when the page is not `page` or is cut short.
pub fn vpd_body(d: &[u8], page: u8) -> Option<&[u8]> {
    if d.len() < 4 || d[1] != page {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    d.get(4..4 + len)
}

/// The unit serial number of VPD page 80h.
pub fn decode_serial(d: &[u8]) -> Option<String> {
    vpd_body(d, VPD_SERIAL).map(ascii).filter(|s| !s.is_empty())
}

/// The LU's name from VPD page 83h, as Linux names it under /dev/disk/by-id: the best
/// designator of the LU itself (association 0), preferring NAA (`naa.` + hex), then
/// EUI-64 (`eui.` + hex), then an SCSI name string, then the T10 vendor id (`t10.` +
/// text). `None` when the page has no LU designator.
pub fn decode_identity(d: &[u8]) -> Option<String> {
    let mut body = vpd_body(d, VPD_DEVICE_ID)?;
    let mut best: Option<(u8, String)> = None;
    while body.len() >= 4 {
        let (code_set, assoc, kind, len) = (
            body[0] & 0x0f,
            (body[1] >> 4) & 0x03,
            body[1] & 0x0f,
            usize::from(body[3]),
        );
        let Some(id) = body.get(4..4 + len) else {
            break;
        };
        body = &body[4 + len..];
        if assoc != 0 {
            continue;
        }
        let hex = || hex::encode(id);
        let text = || ascii(id).trim_matches('\0').to_string();
        let (rank, name) = match kind {
            3 => (0, format!("naa.{}", hex())),
            2 => (1, format!("eui.{}", hex())),
            8 if code_set == 3 => (2, text()),
            1 => (
                3,
                format!(
                    "t10.{}",
                    text().split_whitespace().collect::<Vec<_>>().join("_")
                ),
            ),
            _ => continue,
        };
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, name));
        }
    }
    best.map(|(_, n)| n)
}

/// A big-endian u64 field of a CDB or a data format (the first 8 bytes of `b`).
pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A big-endian u32 field (the first 4 bytes of `b`).
pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_pages_round_trip() {
        let s = PairStatus {
            primary: 10,
            secondary: 11,
            state: PairState::Split,
            blocks_per_bit: 8,
            units: 4096,
            split_units: 2048,
            diff_units: 3,
            split_areas: vec![
                Area {
                    start: 0,
                    blocks: 16384,
                },
                Area {
                    start: 20000,
                    blocks: 8,
                },
            ],
            copied_bytes: 1 << 24,
        };
        for lun in [10, 11] {
            let d = encode_pair_page(lun, Some(&s));
            assert_eq!(decode_pair_page(lun, &d), Some(Some(s.clone())));
            assert_eq!(decode_pair_page(lun, &d[..d.len() - 1]), None, "cut area");
        }
        assert_eq!(decode_pair_page(3, &encode_pair_page(3, None)), Some(None));
        let mut bad = encode_pair_page(10, Some(&s));
        bad[2] = 9;
        assert_eq!(decode_pair_page(10, &bad), None, "unknown state");
    }

    #[test]
    fn capacity_and_mode_data() {
        let d = encode_read_capacity_16(2048, 512);
        assert_eq!(decode_read_capacity_16(&d), Some((2048, 512)));
        let sense = encode_mode_sense_6(&[0x00, 0x01], false);
        assert_eq!(sense, [5, 0, 0, 0, 0x00, 0x01]);
        assert_eq!(mode_page_6(&sense), Ok(&[0x00u8, 0x01][..]));
        assert_eq!(mode_page_6(&[0, 0]), Err(Sense::PARAMETER_LIST_LENGTH));
        assert_eq!(
            mode_page_6(&[0, 0, 0, 9, 1]),
            Err(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
    }

    /// tgt's page 83h: a T10 vendor id and an NAA designator of the LU; NAA wins.
    #[test]
    fn identity_prefers_naa() {
        let mut d = vec![0x00, 0x83, 0, 0];
        d.extend_from_slice(&[0x02, 0x01, 0, 8]);
        d.extend_from_slice(b"IET     ");
        d.extend_from_slice(&[0x01, 0x03, 0, 8, 0x60, 0x00, 0x0e, 0xd1, 0, 0, 0, 1]);
        // A target port designator (association 1) is not the LU's name.
        d.extend_from_slice(&[0x01, 0x14, 0, 4, 0, 0, 0, 1]);
        let len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode_identity(&d).as_deref(), Some("naa.60000ed100000001"));
        let t10_only = [
            0x00, 0x83, 0, 12, 0x02, 0x01, 0, 8, b'I', b'E', b'T', b' ', b'x', b' ', b' ', b' ',
        ];
        assert_eq!(decode_identity(&t10_only).as_deref(), Some("t10.IET_x"));
        assert_eq!(decode_identity(&d[..3]), None);
        assert_eq!(decode_identity(&[0x00, 0x80, 0, 0]), None, "not page 83h");
        assert_eq!(
            decode_serial(&[0, 0x80, 0, 4, b'b', b'e', b'e', b'f']).as_deref(),
            Some("beef")
        );
    }

    #[test]
    fn standard_inquiry() {
        let mut d = vec![0u8; 36];
        d[5] = 0x08;
        d[8..16].copy_from_slice(b"IET     ");
        d[16..32].copy_from_slice(b"VIRTUAL-DISK    ");
        let s = decode_standard_inquiry(&d).unwrap();
        assert!(s.third_party_copy);
        assert_eq!(
            (s.device_type, s.vendor.as_str(), s.product.as_str()),
            (0, "IET", "VIRTUAL-DISK")
        );
        assert_eq!(decode_standard_inquiry(&d[..35]), None);
    }
}
