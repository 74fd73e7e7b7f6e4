//! Upload targets. Each consumes the converter engine's output of the source's virtual disk contents.

pub mod aws;
pub mod azure;
pub mod file;
pub mod libvirt;
pub mod limiter;
pub mod retry;

use anyhow::{Context, Result, bail};
use imgshift_converters::{ExtentKind, ExtentMap};

/// The map of `[offset, offset+len)` of a target-side copy whose written data lies in `ranges` (sorted,
/// non-overlapping `[start, end)` byte ranges, starting with the first that ends after `offset`); the rest reads
/// as zeros. Used by the read-back sources (an EBS snapshot's blocks, a page blob's page ranges).
pub fn extents_from_ranges(
    ranges: impl IntoIterator<Item = (u64, u64)>,
    offset: u64,
    len: u64,
) -> imgshift_converters::Result<ExtentMap> {
    let end = offset.saturating_add(len);
    let mut map = ExtentMap::new();
    let mut at = offset;
    for (s, t) in ranges {
        let (s, t) = (s.max(at), t.min(end));
        if s >= end {
            break;
        }
        if t > s {
            map.push(at, s - at, ExtentKind::Zero)?;
            map.push(s, t - s, ExtentKind::Data)?;
            at = t;
        }
    }
    map.push(at, end - at, ExtentKind::Zero)?;
    Ok(map)
}

/// A read-back failure as the converters' error (what `DiskSource` returns).
pub fn read_back_error(e: anyhow::Error) -> imgshift_converters::Error {
    imgshift_converters::Error::new(imgshift_converters::ErrorKind::Io, format!("{e:#}"))
}

/// The async runtime the cloud targets' SDK calls run on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `--tag KEY=VALUE` arguments: the tags a target puts on what it creates.
pub fn parse_tags(tags: &[String]) -> Result<Vec<(String, String)>> {
    tags.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--tag wants KEY=VALUE, got '{t}'"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_data_between_zeros() {
        let m = extents_from_ranges([(0, 10), (20, 30), (50, 60)], 5, 50).unwrap();
        let got: Vec<(u64, u64, ExtentKind)> = m
            .iter()
            .filter(|e| e.len > 0)
            .map(|e| (e.start, e.len, e.kind))
            .collect();
        assert_eq!(
            got,
            [
                (5, 5, ExtentKind::Data),
                (10, 10, ExtentKind::Zero),
                (20, 10, ExtentKind::Data),
                (30, 20, ExtentKind::Zero),
                (50, 5, ExtentKind::Data),
            ]
        );
        let none = extents_from_ranges([], 0, 8).unwrap();
        assert_eq!(none.bytes(ExtentKind::Zero), 8);
    }
}
