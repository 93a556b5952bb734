//! A virtual LU's map at one point: sorted, disjoint [`Extent`]s; what no extent covers
//! is zero. An incremental backup's map is its parent's with the changed ranges
//! replaced.

use super::format::{Extent, EXTENT_MAX};

/// What the copy stored for one range it read: a chunk, or `None` for all zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub offset: u64,
    pub length: u64,
    pub chunk: Option<String>,
    /// Where in the chunk's data the range starts (a packed chunk holds many ranges).
    pub skip: u64,
}

/// Most bytes of short pieces packed into one chunk. An incremental's scattered
/// 4 KiB ranges become one chunk per 64 KiB, not a file (an S3 object) each; small
/// enough that a restore whose windows interleave the chunks of several backups
/// re-reads little when it reloads one.
pub const PACK_MAX: u64 = 64 << 10;

/// Split `ranges` (offset, length) into pieces of at most [`EXTENT_MAX`] bytes, clipped
/// to `size`; sorted and merged first, so overlapping or touching input is fine.
pub fn pieces(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(o, l)| *l > 0 && *o < size)
        .map(|&(o, l)| (o, o.saturating_add(l).min(size)))
        .collect();
    r.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut out = Vec::new();
    for (mut s, e) in merged {
        while s < e {
            let n = (e - s).min(EXTENT_MAX);
            out.push((s, n));
            s += n;
        }
    }
    out
}

/// Group `pieces` (sorted, as [`pieces`] makes them) into what the copy stores as one
/// chunk each: a piece of at least [`PACK_MAX`] bytes alone; shorter ones in order,
/// together while they add up to at most [`PACK_MAX`].
pub fn packs(pieces: &[(u64, u64)]) -> Vec<Vec<(u64, u64)>> {
    let mut out: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut open = 0u64; // bytes in the last pack, if it takes more
    for &(o, l) in pieces {
        if l >= PACK_MAX {
            out.push(vec![(o, l)]);
            open = PACK_MAX;
        } else if open + l <= PACK_MAX && !out.is_empty() {
            if let Some(last) = out.last_mut() {
                last.push((o, l));
            }
            open += l;
        } else {
            out.push(vec![(o, l)]);
            open = l;
        }
    }
    out
}

/// `base` with every range of `stored` replaced by what was stored there (nothing for
/// zeros). Both sorted; `stored` disjoint.
pub fn overlay(base: &[Extent], stored: &[Stored]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(base.len() + stored.len());
    let mut b = base.iter().cloned().peekable();
    let mut pending: Option<Extent> = None;
    for s in stored {
        let (start, end) = (s.offset, s.offset + s.length);
        // Base extents (or the rest of one) before and across this range.
        while let Some(cur) = pending.take().or_else(|| b.next()) {
            let (cs, ce) = (cur.offset, cur.offset + cur.length);
            if ce <= start {
                out.push(cur);
                continue;
            }
            if cs < start {
                out.push(Extent {
                    length: start - cs,
                    ..cur.clone()
                });
            }
            if ce > end {
                // Its tail lies past this range: keep it for the next one.
                let cut = end.max(cs) - cs;
                pending = Some(Extent {
                    offset: cs + cut,
                    length: ce - cs - cut,
                    skip: cur.skip + cut,
                    chunk: cur.chunk,
                });
                break;
            }
        }
        if let Some(c) = &s.chunk {
            out.push(Extent {
                offset: start,
                length: s.length,
                chunk: c.clone(),
                skip: s.skip,
            });
        }
    }
    out.extend(pending);
    out.extend(b);
    out
}

/// The ranges where two maps may differ: every range covered by an extent of only one
/// of them, or by extents naming different data. Sorted, merged.
pub fn differ(a: &[Extent], b: &[Extent]) -> Vec<(u64, u64)> {
    // Boundaries of both maps; between two boundaries each map is one thing.
    let mut cuts: Vec<u64> = a
        .iter()
        .chain(b)
        .flat_map(|e| [e.offset, e.offset + e.length])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let at = |m: &[Extent], pos: u64| -> Option<(String, u64)> {
        let i = m.partition_point(|e| e.offset + e.length <= pos);
        m.get(i)
            .filter(|e| e.offset <= pos)
            .map(|e| (e.chunk.clone(), e.skip + (pos - e.offset)))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if at(a, s) != at(b, s) {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => out.push((s, e - s)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(offset: u64, length: u64, chunk: &str, skip: u64) -> Extent {
        Extent {
            offset,
            length,
            chunk: chunk.into(),
            skip,
        }
    }

    fn s(offset: u64, length: u64, chunk: Option<&str>) -> Stored {
        Stored {
            offset,
            length,
            chunk: chunk.map(str::to_string),
            skip: 0,
        }
    }

    #[test]
    fn short_pieces_are_packed_in_order() {
        let k = 4096;
        let mut p: Vec<(u64, u64)> = (0..20).map(|i| (i * 3 * k, k)).collect();
        p.push((100 * k, EXTENT_MAX));
        p.push((100 * k + EXTENT_MAX, k));
        let g = packs(&p);
        let per = (PACK_MAX / k) as usize;
        assert_eq!(g[0], p[..per].to_vec());
        assert_eq!(g[1], p[per..20].to_vec());
        assert_eq!(g[2], vec![(100 * k, EXTENT_MAX)]);
        assert_eq!(g[3], vec![(100 * k + EXTENT_MAX, k)]);
        assert_eq!(g.len(), 4);
        assert_eq!(g.concat(), p);
        assert!(packs(&[]).is_empty());
    }

    #[test]
    fn overlay_keeps_a_packed_range_skip() {
        let mut n = s(4096, 4096, Some("p"));
        n.skip = 8192;
        let out = overlay(&[x(0, 16384, "a", 0)], &[n]);
        assert_eq!(
            out,
            vec![
                x(0, 4096, "a", 0),
                x(4096, 4096, "p", 8192),
                x(8192, 8192, "a", 8192)
            ]
        );
    }

    #[test]
    fn pieces_merge_and_split() {
        assert_eq!(
            pieces(
                &[(10, 5), (0, 10), (EXTENT_MAX * 2, 1 << 30)],
                EXTENT_MAX * 3 + 7
            ),
            vec![(0, 15), (EXTENT_MAX * 2, EXTENT_MAX), (EXTENT_MAX * 3, 7)]
        );
    }

    #[test]
    fn overlay_cuts_base_extents() {
        let base = vec![x(0, 100, "a", 0), x(100, 100, "b", 0), x(300, 50, "c", 10)];
        let out = overlay(
            &base,
            &[s(50, 70, Some("n")), s(150, 10, None), s(320, 5, None)],
        );
        assert_eq!(
            out,
            vec![
                x(0, 50, "a", 0),
                x(50, 70, "n", 0),
                x(120, 30, "b", 20),
                x(160, 40, "b", 60),
                x(300, 20, "c", 10),
                x(325, 25, "c", 35),
            ]
        );
        assert_eq!(overlay(&[], &[s(0, 10, Some("n"))]), vec![x(0, 10, "n", 0)]);
        assert_eq!(overlay(&base, &[]), base);
        assert_eq!(differ(&base, &out), vec![(50, 70), (150, 10), (320, 5)]);
        assert!(differ(&out, &out).is_empty());
    }
}
