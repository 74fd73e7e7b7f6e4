//! The `verify` stage's content check: sampled ranges of the source read back from the target's copy.

use anyhow::{Result, bail};
use imgshift_converters::{DiskSource, ExtentKind, ExtentMap};

/// Data ranges compared per disk.
const DATA_SAMPLES: usize = 16;
/// Hole ranges compared per disk (they must read back as zeros).
const HOLE_SAMPLES: usize = 4;
/// Largest sampled range.
const SAMPLE_LEN: u64 = 1 << 20;

/// Picks up to `n` of `items`, spread evenly, always the first and the last.
fn spread<T: Copy>(items: &[T], n: usize) -> Vec<T> {
    if items.len() <= n {
        return items.to_vec();
    }
    let last = items.len() - 1;
    (0..n)
        .filter_map(|k| items.get(k * last / (n - 1).max(1)).copied())
        .collect()
}

/// The ranges to compare: data extents (first, last and spread between) and a few holes.
pub fn sample_ranges(map: &ExtentMap) -> Vec<(u64, u64)> {
    let pieces = |want: &dyn Fn(ExtentKind) -> bool| -> Vec<(u64, u64)> {
        map.iter()
            .filter(|e| want(e.kind) && e.len > 0)
            .map(|e| (e.start, e.len.min(SAMPLE_LEN)))
            .collect()
    };
    let mut out = spread(&pieces(&|k| k == ExtentKind::Data), DATA_SAMPLES);
    out.extend(spread(&pieces(&|k| k != ExtentKind::Data), HOLE_SAMPLES));
    out.sort_unstable();
    out
}

/// Compares the sampled ranges of `src` with `copy`. Returns the bytes compared.
pub fn sample_compare(src: &dyn DiskSource, map: &ExtentMap, copy: &dyn DiskSource) -> Result<u64> {
    if copy.virtual_size() < src.virtual_size() {
        bail!(
            "the target's copy holds {} bytes, less than the source's {}",
            copy.virtual_size(),
            src.virtual_size()
        );
    }
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut compared = 0u64;
    for (offset, len) in sample_ranges(map) {
        let n = usize::try_from(len)?;
        a.resize(n, 0);
        b.resize(n, 0);
        src.read_at(&mut a, offset)?;
        copy.read_at(&mut b, offset)?;
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            bail!(
                "content differs at byte {} (sampled range {offset}+{len})",
                offset + i as u64
            );
        }
        compared += len;
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_keeps_first_and_last() {
        let v: Vec<u32> = (0..100).collect();
        let s = spread(&v, 4);
        assert_eq!(s.first(), Some(&0));
        assert_eq!(s.last(), Some(&99));
        assert_eq!(s.len(), 4);
        assert_eq!(spread(&v[..3], 4), vec![0, 1, 2]);
    }
}
