//! `ExtentMap`: what each byte range of a virtual disk holds, as sorted, contiguous, non-overlapping extents.
//!
//! Every reader answers "which ranges hold data" with an `ExtentMap`; the engine copies, and uploaders send,
//! only what the map calls `Data`. Adjacent extents of the same kind and depth are always merged, so the
//! map's size follows the image's fragmentation, never its virtual size.

use crate::error::{Error, Result};

/// What a range of the virtual disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ExtentKind {
    /// Bytes stored in this layer (they may still turn out to be zeros).
    Data,
    /// Known zeros (a hole, a zero cluster, an unallocated block with no backing file).
    Zero,
    /// Not allocated in this layer: reads come from the backing file.
    Unallocated,
}

/// One range of an `ExtentMap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// What the range holds.
    pub kind: ExtentKind,
    /// Layer that provides the bytes: 0 is the image itself, 1 its backing file, and so on.
    pub depth: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Sorted, contiguous, non-overlapping extents covering `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    extents: Vec<Extent>,
}

impl ExtentMap {
    /// An empty map.
    pub fn new() -> Self {
        ExtentMap {
            extents: Vec::new(),
        }
    }

    /// A map of one extent (nothing if `len` is 0).
    pub fn single(start: u64, len: u64, kind: ExtentKind) -> Self {
        let mut m = ExtentMap::new();
        // ok: an empty map accepts any start
        let _ = m.push(start, len, kind);
        m
    }

    /// Appends `[start, start+len)` at depth 0. It must start where the map ends.
    pub fn push(&mut self, start: u64, len: u64, kind: ExtentKind) -> Result<()> {
        self.push_at_depth(start, len, kind, 0)
    }

    /// Appends an extent with an explicit depth; merges with the last extent when kind and depth match.
    pub fn push_at_depth(
        &mut self,
        start: u64,
        len: u64,
        kind: ExtentKind,
        depth: u32,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::input(format!("extent {start}+{len} overflows")))?;
        if let Some(last) = self.extents.last_mut() {
            if last.end() != start {
                return Err(Error::input(format!(
                    "extent at {start} does not follow the previous extent ending at {}",
                    last.end()
                )));
            }
            if last.kind == kind && last.depth == depth {
                last.len = end - last.start;
                return Ok(());
            }
        }
        self.extents.push(Extent {
            start,
            len,
            kind,
            depth,
        });
        Ok(())
    }

    /// Appends every extent of `other`, which must start where this map ends.
    pub fn append(&mut self, other: &ExtentMap) -> Result<()> {
        for e in &other.extents {
            self.push_at_depth(e.start, e.len, e.kind, e.depth)?;
        }
        Ok(())
    }

    /// The extents, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Extent> {
        self.extents.iter()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// True when the map covers nothing.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// First covered offset (0 when empty).
    pub fn start(&self) -> u64 {
        self.extents.first().map_or(0, |e| e.start)
    }

    /// One past the last covered offset (0 when empty).
    pub fn end(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.end())
    }

    /// Total bytes of extents of `kind`.
    pub fn bytes(&self, kind: ExtentKind) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.len)
            .sum()
    }

    /// The part of the map inside `[start, end)`.
    pub fn clip(&self, start: u64, end: u64) -> ExtentMap {
        let mut out = ExtentMap::new();
        let first = self.extents.partition_point(|e| e.end() <= start);
        for e in &self.extents[first..] {
            if e.start >= end {
                break;
            }
            let s = e.start.max(start);
            let t = e.end().min(end);
            if t > s {
                // ok: clipped pieces of a contiguous map stay contiguous
                let _ = out.push_at_depth(s, t - s, e.kind, e.depth);
            }
        }
        out
    }

    /// The extent containing `offset`, if any.
    pub fn lookup(&self, offset: u64) -> Option<&Extent> {
        let i = self.extents.partition_point(|e| e.end() <= offset);
        self.extents.get(i).filter(|e| e.start <= offset)
    }

    /// Ranges to copy for an output that allocates in units of `granularity` bytes: every `Data` extent widened
    /// to granularity boundaries (clamped to the map's end), overlapping or touching runs merged.
    pub fn data_runs(&self, granularity: u64) -> Vec<(u64, u64)> {
        let g = granularity.max(1);
        let limit = self.end();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for e in self.extents.iter().filter(|e| e.kind == ExtentKind::Data) {
            let s = e.start / g * g;
            let t = e.end().div_ceil(g).saturating_mul(g).min(limit);
            match runs.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(t),
                _ => runs.push((s, t)),
            }
        }
        runs
    }
}

impl<'a> IntoIterator for &'a ExtentMap {
    type Item = &'a Extent;
    type IntoIter = std::slice::Iter<'a, Extent>;
    fn into_iter(self) -> Self::IntoIter {
        self.extents.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = ExtentKind> {
        prop_oneof![
            Just(ExtentKind::Data),
            Just(ExtentKind::Zero),
            Just(ExtentKind::Unallocated)
        ]
    }

    fn build(pieces: &[(u64, ExtentKind)]) -> ExtentMap {
        let mut m = ExtentMap::new();
        let mut at = 0;
        for &(len, kind) in pieces {
            m.push(at, len, kind).unwrap();
            at += len;
        }
        m
    }

    #[test]
    fn rejects_gaps_and_overflow() {
        let mut m = ExtentMap::single(0, 10, ExtentKind::Data);
        assert!(m.push(11, 1, ExtentKind::Zero).is_err());
        assert!(m.push(10, u64::MAX, ExtentKind::Zero).is_err());
    }

    proptest! {
        #[test]
        fn invariants_hold(pieces in proptest::collection::vec((0u64..5000, kind_strategy()), 0..60)) {
            let m = build(&pieces);
            let total: u64 = pieces.iter().map(|p| p.0).sum();
            prop_assert_eq!(m.end() - m.start(), total);
            for w in m.extents.windows(2) {
                prop_assert_eq!(w[0].end(), w[1].start);
                prop_assert!(w[0].kind != w[1].kind || w[0].depth != w[1].depth);
                prop_assert!(w[0].len > 0);
            }
            let sum: u64 = [ExtentKind::Data, ExtentKind::Zero, ExtentKind::Unallocated]
                .iter().map(|k| m.bytes(*k)).sum();
            prop_assert_eq!(sum, total);
        }

        #[test]
        fn clip_matches_lookup(pieces in proptest::collection::vec((1u64..5000, kind_strategy()), 1..40),
                               a in 0u64..100_000, b in 0u64..100_000) {
            let m = build(&pieces);
            let (s, t) = (a.min(b), a.max(b));
            let c = m.clip(s, t);
            let (cs, ct) = (s.max(m.start()), t.min(m.end()));
            if ct > cs {
                prop_assert_eq!(c.start(), cs);
                prop_assert_eq!(c.end(), ct);
            } else {
                prop_assert!(c.is_empty());
            }
            for off in [s, (s + t) / 2, t.saturating_sub(1)] {
                if let Some(e) = c.lookup(off) {
                    prop_assert_eq!(Some(e.kind), m.lookup(off).map(|x| x.kind));
                }
            }
        }

        #[test]
        fn data_runs_cover_data(pieces in proptest::collection::vec((1u64..5000, kind_strategy()), 1..40),
                                gbits in 0u32..13) {
            let g = 1u64 << gbits;
            let m = build(&pieces);
            let runs = m.data_runs(g);
            for w in runs.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "runs must be sorted and disjoint");
            }
            for r in &runs {
                prop_assert_eq!(r.0 % g, 0);
                prop_assert!(r.1 % g == 0 || r.1 == m.end());
            }
            for e in m.iter().filter(|e| e.kind == ExtentKind::Data) {
                for off in [e.start, e.end() - 1] {
                    prop_assert!(runs.iter().any(|r| r.0 <= off && off < r.1));
                }
            }
        }
    }
}
