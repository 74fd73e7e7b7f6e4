//! `check -r leaks`: rewrites the refcount entries of leaked clusters (stored refcount above the references the
//! metadata holds) to the computed value, as `qemu-img check -r leaks` does. The one place imgshift writes into
//! an existing image; the CLI runs it on a copy unless asked to modify the image in place. Images with errors
//! other than leaks, a dirty bit (lazy refcounts not yet written) or the corrupt bit are refused: only leaks,
//! which waste space but lose no data, are repaired.
//! Spec: qcow2.txt "Host cluster management"; qemu `block/qcow2-refcount.c` (`qcow2_check_refcounts` with
//! `BDRV_FIX_LEAKS`).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::check::{Fix, check_with_fixes, set_refcount_entry};
use super::header::{self, Header};
use super::mapping::words;
use super::{FMT, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::error::{Error, ErrorKind, Result};
use crate::source::CheckReport;
use crate::storage::{FileStorage, Storage};

/// What a repair did.
#[derive(Debug, Clone)]
pub struct RepairOutcome {
    /// The check before the repair.
    pub before: CheckReport,
    /// Refcount entries rewritten.
    pub repaired: u64,
    /// The check of the repaired image.
    pub after: CheckReport,
}

/// Repairs the leaked clusters of the qcow2 image at `path`, in place.
pub fn repair_leaks(path: &Path) -> Result<RepairOutcome> {
    let storage = FileStorage::open(path)?;
    let h = read_header(&storage)?;
    if h.dirty() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "the image is dirty (lazy refcounts not written back): its refcounts must be rebuilt, which \
             `qemu-img check -r all` does; imgshift repairs only leaks",
        ));
    }
    if h.corrupt() {
        return Err(Error::corrupt(
            FMT,
            "the corrupt bit is set: only leaks are repaired here (qemu-img check -r all)",
        ));
    }
    let (before, fixes) = check_with_fixes(&storage, &h)?;
    if before.corruptions > 0 {
        return Err(Error::corrupt(
            FMT,
            format!(
                "{} errors besides the leaks: only leaks are repaired (qemu-img check -r all repairs errors)",
                before.corruptions
            ),
        ));
    }
    let repaired = apply(path, &storage, &h, &fixes)?;
    drop(storage);
    let storage = FileStorage::open(path)?;
    let h = read_header(&storage)?;
    let (after, _) = check_with_fixes(&storage, &h)?;
    Ok(RepairOutcome {
        before,
        repaired,
        after,
    })
}

/// The validated header, read as the reader reads it.
fn read_header(storage: &dyn Storage) -> Result<Header> {
    read_header_with(storage, storage.len())
}

/// The header's own fields, validated except that the tables it names are not bounded by the file (so a
/// truncated image still gives its virtual size, cluster size and backing file): what `info` shows for an
/// image whose tables the reader refuses. Nothing it names is read.
pub fn read_header_fields(storage: &dyn Storage) -> Result<Header> {
    read_header_with(storage, u64::MAX)
}

fn read_header_with(storage: &dyn Storage, tables_bound: u64) -> Result<Header> {
    let file_len = storage.len();
    let mut head = [0u8; header::V3_HEADER_LEN];
    let n = storage.read_at_zero_fill(&mut head, 0)?;
    let cb = header::be32(&head, 20, "cluster_bits").unwrap_or(0);
    let head_len = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
        (1u64 << cb).min(file_len)
    } else {
        n as u64
    };
    let mut cluster0 = vec![0u8; head_len as usize];
    storage.read_exact_at(&mut cluster0, 0)?;
    header::parse(&cluster0, tables_bound)
}

/// Writes the fixes into the refcount blocks, one read-modify-write per block; returns the entries changed.
fn apply(path: &Path, storage: &dyn Storage, h: &Header, fixes: &[Fix]) -> Result<u64> {
    if fixes.is_empty() {
        return Ok(0);
    }
    let cs = h.cluster_size();
    let bits = 1u64 << h.refcount_order;
    let per_block = cs * 8 / bits;
    let table_len = h
        .refcount_table_clusters
        .checked_mul(cs)
        .ok_or_else(|| Error::corrupt(FMT, "refcount table size overflows"))?;
    let mut raw = vec![0u8; table_len as usize];
    storage.read_exact_at(&mut raw, h.refcount_table_offset)?;
    let table = words(&raw);
    // Block offset → (entry index in the block, value).
    let mut by_block: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for f in fixes {
        let i = f.cluster / per_block;
        let block = table
            .get(i as usize)
            .map(|e| e & !511)
            .filter(|&o| o != 0)
            .ok_or_else(|| {
                Error::corrupt(FMT, format!("no refcount block for cluster {}", f.cluster))
            })?;
        by_block
            .entry(block)
            .or_default()
            .push((f.cluster % per_block, f.value));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot open for writing", path, e))?;
    let mut changed = 0u64;
    for (off, entries) in by_block {
        let mut block = vec![0u8; cs as usize];
        storage.read_exact_at(&mut block, off)?;
        for (k, v) in entries {
            set_refcount_entry(&mut block, k, bits, v)?;
            changed += 1;
        }
        file.write_all_at(&block, off)
            .map_err(|e| Error::io("cannot write a refcount block of", path, e))?;
    }
    file.sync_all()
        .map_err(|e| Error::io("cannot sync", path, e))?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::check::refcount_entry;
    use super::*;

    /// Every refcount width: setting an entry changes it and only it.
    #[test]
    fn set_refcount_entry_round_trips_every_width() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let mut block = vec![0xa5u8; 512];
            let before = block.clone();
            let per_block = 512 * 8 / bits;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for k in [0, 1, per_block / 2, per_block - 1] {
                set_refcount_entry(&mut block, k, bits, max & 0x3).unwrap();
                assert_eq!(
                    refcount_entry(&block, k, bits),
                    max & 0x3,
                    "bits {bits} k {k}"
                );
                for j in
                    (0..per_block).filter(|&j| ![0, 1, per_block / 2, per_block - 1].contains(&j))
                {
                    assert_eq!(
                        refcount_entry(&block, j, bits),
                        refcount_entry(&before, j, bits),
                        "bits {bits}: entry {j} changed"
                    );
                }
            }
            assert!(set_refcount_entry(&mut block, per_block, bits, 1).is_err());
        }
    }
}
