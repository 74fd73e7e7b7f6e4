//! What changed since the last recovery point: sorted, disjoint, block-aligned byte ranges.

use anyhow::{Result, bail};
use imgshift_converters::{ExtentKind, ExtentMap};

use super::BLOCK;

/// Byte ranges `[start, end)` of the disk to write into the next point, sorted and disjoint; each starts on a
/// [`BLOCK`] boundary and ends on one or at the end of the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    ranges: Vec<(u64, u64)>,
    size: u64,
}

impl ChangeSet {
    /// Nothing changed on a disk of `size` bytes.
    pub fn none(size: u64) -> ChangeSet {
        ChangeSet {
            ranges: Vec::new(),
            size,
        }
    }

    /// The blocks holding data in `map` (a resolved source map), for a first, full copy.
    pub fn data_of(map: &ExtentMap, size: u64) -> ChangeSet {
        let mut c = ChangeSet::none(size);
        for e in map.iter().filter(|e| e.kind == ExtentKind::Data) {
            c.add(e.start, e.end());
        }
        c
    }

    /// The blocks with the given indices (any order, duplicates allowed).
    pub fn from_blocks(blocks: impl IntoIterator<Item = u64>, size: u64) -> ChangeSet {
        let mut idx: Vec<u64> = blocks.into_iter().collect();
        idx.sort_unstable();
        idx.dedup();
        let mut c = ChangeSet::none(size);
        for i in idx {
            let s = i.saturating_mul(BLOCK);
            c.add(s, s.saturating_add(BLOCK));
        }
        c
    }

    /// Byte ranges reported by a source (an EBS diff, a page-range diff, a dirty bitmap): widened to whole blocks
    /// and clipped to the disk. Ranges must come sorted by start; overlapping ones are merged.
    pub fn from_ranges(ranges: &[(u64, u64)], size: u64) -> Result<ChangeSet> {
        let mut c = ChangeSet::none(size);
        let mut last = 0;
        for &(s, e) in ranges {
            if e < s {
                bail!("a change range ends before it starts ({s}..{e})");
            }
            if s < last {
                bail!("change ranges are not sorted ({s} after {last})");
            }
            last = s;
            c.add(s, e);
        }
        Ok(c)
    }

    /// Adds `[s, e)` widened to blocks; ranges are added in increasing order of start.
    fn add(&mut self, s: u64, e: u64) {
        let s = (s / BLOCK * BLOCK).min(self.size);
        let e = e.div_ceil(BLOCK).saturating_mul(BLOCK).min(self.size);
        if s >= e {
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => self.ranges.push((s, e)),
        }
    }

    /// The ranges.
    #[allow(dead_code)] // the stores of the next commits write range by range
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Total bytes in the ranges.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1 - r.0).sum()
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A map of the disk that calls the changed ranges data and leaves everything else unallocated (the
    /// parent's), for the converter engine.
    pub fn as_map(&self) -> Result<ExtentMap> {
        let mut m = ExtentMap::new();
        let mut at = 0;
        for &(s, e) in &self.ranges {
            if s > at {
                m.push(at, s - at, ExtentKind::Unallocated)?;
            }
            m.push(s, e - s, ExtentKind::Data)?;
            at = e;
        }
        if at < self.size {
            m.push(at, self.size - at, ExtentKind::Unallocated)?;
        }
        Ok(m)
    }

    /// Block indices covered.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(s, e)| (s / BLOCK)..e.div_ceil(BLOCK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widened_merged_clipped() {
        let size = 10 * BLOCK + 100;
        let c = ChangeSet::from_ranges(
            &[(1, 2), (BLOCK - 1, BLOCK + 1), (9 * BLOCK + 5, size + 9)],
            size,
        )
        .unwrap();
        assert_eq!(c.ranges(), &[(0, 2 * BLOCK), (9 * BLOCK, size)]);
        assert_eq!(c.blocks().collect::<Vec<_>>(), vec![0, 1, 9, 10]);
        let b = ChangeSet::from_blocks([3, 1, 2, 7, 3], size);
        assert_eq!(b.ranges(), &[(BLOCK, 4 * BLOCK), (7 * BLOCK, 8 * BLOCK)]);
        assert!(ChangeSet::from_ranges(&[(5, 4)], size).is_err());
        assert!(ChangeSet::from_ranges(&[(BLOCK * 3, BLOCK * 4), (0, 1)], size).is_err());
        let m = b.as_map().unwrap();
        assert_eq!(m.bytes(ExtentKind::Data), 4 * BLOCK);
        assert_eq!(m.end(), size);
    }
}
