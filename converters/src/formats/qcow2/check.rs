//! Structural check: recompute every host cluster's reference count from the metadata and compare it with the
//! stored refcounts, as `qemu-img check` does. Read-only; nothing is repaired.
//! Spec: qcow2.txt "Host cluster management", "Snapshots", "Bitmaps"; qemu `block/qcow2-refcount.c`
//! (`qcow2_check_refcounts`: stored < computed is an error, stored > computed a leak; OFLAG_COPIED must match
//! refcount == 1 in the active tables).

use std::collections::{BTreeMap, HashMap};

use super::header::{AUTOCLEAR_BITMAPS, Header};
use super::mapping::{compressed_extent, words};
use super::{COMPRESSED, COPIED, FMT, MAX_L1_BYTES, OFFSET_MASK};
use crate::error::{Error, Result};
use crate::source::CheckReport;
use crate::storage::Storage;

/// Largest file (in clusters) checked: two u16 counters per cluster, so 512 MiB of memory at most.
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;
/// Bound on L1 entries walked over all snapshots, so a crafted snapshot table cannot make the walk unbounded.
const MAX_CHECK_L1_ENTRIES: u64 = 1 << 28;
/// qemu's `QCOW_MAX_SNAPSHOTS_SIZE` (64 MiB) bounds the snapshot table.
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// qemu's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
const MAX_SNAPSHOT_EXTRA: u64 = 1024;
use super::bitmaps::{
    MAX_BITMAPS, MAX_DIRECTORY as MAX_BITMAP_DIRECTORY, MAX_NAME,
    MAX_TABLE_ENTRIES as MAX_BITMAP_TABLE_ENTRIES,
};
/// Longest bitmap name (see [`super::bitmaps::MAX_NAME`]).
const MAX_BITMAP_NAME: u64 = MAX_NAME as u64;
/// Refcount table entries: "Bits 9-63 of the offset".
const REFT_OFFSET_MASK: u64 = !511;

struct Counter<'a> {
    cs: u64,
    cb: u32,
    computed: Vec<u16>,
    report: &'a mut CheckReport,
}

impl Counter<'_> {
    /// Adds `n` references to every cluster touched by `[off, off+len)`.
    fn add(&mut self, off: u64, len: u64, n: u32, what: &str) {
        if len == 0 {
            return;
        }
        let first = off >> self.cb;
        let last = (off.saturating_add(len) - 1) >> self.cb;
        for c in first..=last {
            match self.computed.get_mut(c as usize) {
                Some(v) => *v = v.saturating_add(u16::try_from(n).unwrap_or(u16::MAX)),
                None => {
                    self.report.corruption(format_args!(
                        "{what} at {:#x} is past the end of the file",
                        c << self.cb
                    ));
                    return;
                }
            }
        }
    }

    fn aligned(&self, off: u64) -> bool {
        off.is_multiple_of(self.cs)
    }
}

/// Reads `len` bytes at `off` when they lie inside the file.
fn read(storage: &dyn Storage, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    if off.checked_add(len).is_none_or(|e| e > storage.len()) {
        return Err(Error::corrupt(
            FMT,
            format!("{what} at {off:#x} ({len} bytes) is past the end of the file"),
        ));
    }
    let mut v = vec![0u8; len as usize];
    storage.read_exact_at(&mut v, off)?;
    Ok(v)
}

/// A refcount entry `check -r leaks` rewrites: cluster `cluster`'s stored refcount becomes `value` (the number
/// of references the metadata holds; 0 for clusters past the end of the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fix {
    /// Host cluster index.
    pub cluster: u64,
    /// Its correct refcount.
    pub value: u64,
}

/// Runs the check.
pub fn check(storage: &dyn Storage, h: &Header) -> Result<CheckReport> {
    check_with_fixes(storage, h).map(|(r, _)| r)
}

/// Runs the check; also returns the refcount entries that would repair the leaks found (leaks in refcount blocks
/// that lie wholly past the end of the file are reported, not fixed).
pub fn check_with_fixes(storage: &dyn Storage, h: &Header) -> Result<(CheckReport, Vec<Fix>)> {
    let mut fixes = Vec::new();
    let file_len = storage.len();
    let cs = h.cluster_size();
    let nb_clusters = file_len.div_ceil(cs);
    if nb_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::limit(
            FMT,
            format!(
                "checking {nb_clusters} clusters needs too much memory (limit {MAX_CHECK_CLUSTERS})"
            ),
        ));
    }
    let mut report = CheckReport {
        supported: true,
        total_clusters: h.size.div_ceil(cs),
        ..CheckReport::default()
    };
    let stored = stored_refcounts(storage, h, nb_clusters, &mut report, &mut fixes)?;
    let stored_of = |off: u64| stored.get((off / cs) as usize).copied().unwrap_or(0);

    let mut ctr = Counter {
        cs,
        cb: h.cluster_bits,
        computed: vec![0u16; nb_clusters as usize],
        report: &mut report,
    };
    // The header cluster and the refcount structures.
    ctr.add(0, cs, 1, "header");
    ctr.add(
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        1,
        "refcount table",
    );
    let rt = read(
        storage,
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        "refcount table",
    )?;
    for (i, e) in words(&rt).into_iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 && ctr.aligned(off) && off < file_len {
            ctr.add(off, cs, 1, "refcount block");
        } else if off != 0 {
            ctr.report.corruption(format_args!(
                "refcount block {i} at {off:#x} is unaligned or past the end of the file"
            ));
        }
    }

    // (total references, references from the active L1) per L2 table.
    let mut l2_refs: HashMap<u64, (u32, u32)> = HashMap::new();
    let mut l1_budget = MAX_CHECK_L1_ENTRIES;
    let active_l1 = walk_l1(
        storage,
        &mut ctr,
        h.l1_table_offset,
        h.l1_size,
        "L1 table",
        true,
        &mut l2_refs,
        &mut l1_budget,
    )?;
    for (i, e) in active_l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off != 0
            && ctr.aligned(off)
            && off < file_len
            && (e & COPIED != 0) != (stored_of(off) == 1)
        {
            ctr.report.corruption(format_args!(
                "OFLAG_COPIED L2 cluster: L1 index {i} entry {e:#x} refcount {}",
                stored_of(off)
            ));
        }
    }
    snapshots(storage, h, &mut ctr, &mut l2_refs, &mut l1_budget)?;
    if h.autoclear & AUTOCLEAR_BITMAPS != 0 {
        bitmaps(storage, h, &mut ctr)?;
    }

    // Each L2 table is read once; its clusters get as many references as L1 entries point at it.
    let mut tables: Vec<(u64, (u32, u32))> = l2_refs.into_iter().collect();
    tables.sort_unstable();
    let stride = if h.extended_l2() { 2 } else { 1 };
    let mut allocated = 0u64;
    for (l2_off, (refs, active)) in tables {
        ctr.add(l2_off, cs, refs, "L2 table");
        let table = words(&read(storage, l2_off, cs, "L2 table")?);
        for (idx, chunk) in table.chunks(stride).enumerate() {
            let Some(&e) = chunk.first() else { continue };
            if e & COMPRESSED != 0 {
                let (off, len) = compressed_extent(e, h.cluster_bits);
                ctr.add(off, len, refs, "compressed cluster");
                if active > 0 {
                    allocated += 1;
                    if e & COPIED != 0 {
                        ctr.report.corruption(format_args!(
                            "compressed cluster with OFLAG_COPIED (L2 table at {l2_off:#x}, index {idx})"
                        ));
                    }
                }
                continue;
            }
            let host = e & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if !ctr.aligned(host) {
                ctr.report.corruption(format_args!(
                    "data cluster offset {host:#x} is not cluster aligned (L2 table at {l2_off:#x}, index {idx})"
                ));
                continue;
            }
            if host >= file_len {
                ctr.report.corruption(format_args!(
                    "data cluster at {host:#x} is past the end of the file (L2 table at {l2_off:#x}, index {idx})"
                ));
                continue;
            }
            ctr.add(host, cs, refs, "data cluster");
            if active > 0 {
                allocated += 1;
                if (e & COPIED != 0) != (stored_of(host) == 1) {
                    ctr.report.corruption(format_args!(
                        "OFLAG_COPIED data cluster: entry {e:#x} refcount {} (L2 table at {l2_off:#x}, index {idx})",
                        stored_of(host)
                    ));
                }
            }
        }
    }

    let computed = std::mem::take(&mut ctr.computed);
    for (i, (&s, &c)) in stored.iter().zip(computed.iter()).enumerate() {
        let off = (i as u64) << h.cluster_bits;
        if s < c {
            report.corruption(format_args!(
                "cluster {i} (offset {off:#x}) refcount={s} reference={c}"
            ));
        } else if s > c {
            report.leak(format_args!(
                "cluster {i} (offset {off:#x}) refcount={s} reference={c}"
            ));
            // A stored value saturated to u16::MAX is not known exactly: never rewritten.
            if s < u16::MAX {
                fixes.push(Fix {
                    cluster: i as u64,
                    value: u64::from(c),
                });
            }
        }
    }
    report.allocated_clusters = allocated;
    Ok((report, fixes))
}

/// Stored refcounts of the clusters inside the file (saturated to u16); non-zero refcounts of clusters past
/// the end are reported as leaks.
fn stored_refcounts(
    storage: &dyn Storage,
    h: &Header,
    nb_clusters: u64,
    report: &mut CheckReport,
    fixes: &mut Vec<Fix>,
) -> Result<Vec<u16>> {
    let cs = h.cluster_size();
    let bits = 1u64 << h.refcount_order;
    let per_block = cs * 8 / bits;
    let mut stored = vec![0u16; nb_clusters as usize];
    let rt = words(&read(
        storage,
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        "refcount table",
    )?);
    // Non-zero refcounts per refcount block that lies wholly past the end of the file.
    let mut past_end: HashMap<u64, u64> = HashMap::new();
    for (i, e) in rt.into_iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 || !off.is_multiple_of(cs) || off >= storage.len() {
            continue;
        }
        let base = (i as u64).saturating_mul(per_block);
        if base >= nb_clusters {
            // Rule: a block describing only clusters past the end is read and counted once, not walked entry by
            // entry per reference: 2^20 refcount table entries naming one 2 MiB block must not mean 2^44 steps.
            let n = match past_end.get(&off) {
                Some(&n) => n,
                None => {
                    let block = read(storage, off, cs, "refcount block")?;
                    let n = count_nonzero_refcounts(&block, bits);
                    past_end.insert(off, n);
                    n
                }
            };
            if n > 0 {
                report.leaks += n;
                if report.messages.len() < CheckReport::MAX_MESSAGES {
                    report.messages.push(format!(
                        "Leaked {n} clusters past the end of the file (refcount block {i} at {off:#x})"
                    ));
                }
            }
            continue;
        }
        let block = read(storage, off, cs, "refcount block")?;
        for k in 0..per_block {
            let v = refcount_entry(&block, k, bits);
            if v == 0 {
                continue;
            }
            let idx = base + k;
            match stored.get_mut(idx as usize) {
                Some(s) => *s = u16::try_from(v).unwrap_or(u16::MAX),
                None => {
                    report.leak(format_args!(
                        "cluster {idx} past the end of the file has refcount {v}"
                    ));
                    fixes.push(Fix {
                        cluster: idx,
                        value: 0,
                    });
                }
            }
        }
    }
    Ok(stored)
}

/// How many entries of a refcount block of `bits`-wide entries are non-zero (one pass over the bytes).
fn count_nonzero_refcounts(block: &[u8], bits: u64) -> u64 {
    if bits < 8 {
        let mask = (1u32 << bits) - 1;
        block
            .iter()
            .map(|&b| {
                (0..8 / bits)
                    .filter(|j| (u32::from(b) >> (j * bits)) & mask != 0)
                    .count() as u64
            })
            .sum()
    } else {
        block
            .chunks((bits / 8) as usize)
            .filter(|w| w.iter().any(|&x| x != 0))
            .count() as u64
    }
}

/// Entry `k` of a refcount block of `bits`-wide entries ("Refcount block entry"; sub-byte widths start at the
/// least significant bit).
pub fn refcount_entry(block: &[u8], k: u64, bits: u64) -> u64 {
    if bits < 8 {
        let bit = k * bits;
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let w = (bits / 8) as usize;
        let start = k as usize * w;
        block.get(start..start + w).map_or(0, |b| {
            b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
    }
}

/// Sets entry `k` of a refcount block of `bits`-wide entries to `v` (the inverse of [`refcount_entry`]).
pub fn set_refcount_entry(block: &mut [u8], k: u64, bits: u64, v: u64) -> Result<()> {
    let outside = || Error::input(format!("refcount entry {k} is outside its block"));
    if bits < 8 {
        let bit = k.checked_mul(bits).ok_or_else(outside)?;
        let mask = (1u64 << bits) - 1;
        let byte = block.get_mut((bit / 8) as usize).ok_or_else(outside)?;
        let shift = bit % 8;
        let cleared = u64::from(*byte) & !(mask << shift);
        *byte = u8::try_from(cleared | ((v & mask) << shift)).map_err(|_| outside())?;
    } else {
        let w = (bits / 8) as usize;
        let start = usize::try_from(k)
            .map_err(|_| outside())?
            .checked_mul(w)
            .ok_or_else(outside)?;
        let end = start.checked_add(w).ok_or_else(outside)?;
        let dst = block.get_mut(start..end).ok_or_else(outside)?;
        let be = v.to_be_bytes();
        // The low `w` bytes of v, big-endian (w is 1, 2, 4 or 8).
        let src = be.get(8 - w..).ok_or_else(outside)?;
        dst.copy_from_slice(src);
    }
    Ok(())
}

/// Counts an L1 table's clusters and the L2 tables it points at; returns its entries.
#[allow(clippy::too_many_arguments)]
fn walk_l1(
    storage: &dyn Storage,
    ctr: &mut Counter<'_>,
    off: u64,
    entries: u64,
    what: &str,
    active: bool,
    l2_refs: &mut HashMap<u64, (u32, u32)>,
    budget: &mut u64,
) -> Result<Vec<u64>> {
    if entries == 0 {
        return Ok(Vec::new());
    }
    let bytes = entries * 8;
    if bytes > MAX_L1_BYTES
        || !ctr.aligned(off)
        || off.checked_add(bytes).is_none_or(|e| e > storage.len())
    {
        ctr.report.corruption(format_args!(
            "{what} at {off:#x} ({entries} entries) is unaligned, too large or past the end of the file"
        ));
        return Ok(Vec::new());
    }
    *budget = budget.checked_sub(entries).ok_or_else(|| {
        Error::limit(
            FMT,
            format!("the L1 tables hold more than {MAX_CHECK_L1_ENTRIES} entries in all"),
        )
    })?;
    ctr.add(off, bytes, 1, what);
    let l1 = words(&read(storage, off, bytes, what)?);
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !ctr.aligned(l2) || l2 >= storage.len() {
            ctr.report.corruption(format_args!(
                "{what} entry {i}: L2 table offset {l2:#x} is unaligned or past the end of the file"
            ));
            continue;
        }
        let r = l2_refs.entry(l2).or_insert((0, 0));
        r.0 = r.0.saturating_add(1);
        if active {
            r.1 = r.1.saturating_add(1);
        }
    }
    Ok(l1)
}

/// The snapshot table ("Snapshot table entry") and every snapshot's L1 table.
fn snapshots(
    storage: &dyn Storage,
    h: &Header,
    ctr: &mut Counter<'_>,
    l2_refs: &mut HashMap<u64, (u32, u32)>,
    budget: &mut u64,
) -> Result<()> {
    let mut pos = h.snapshots_offset;
    for n in 0..h.nb_snapshots {
        if pos - h.snapshots_offset > MAX_SNAPSHOT_TABLE {
            return Err(Error::limit(
                FMT,
                "snapshot table above qemu's 64 MiB limit",
            ));
        }
        let fixed = read(storage, pos, 40, "snapshot table entry")?;
        let w = words(fixed.get(..16).unwrap_or(&[]));
        let l1_off = w.first().copied().unwrap_or(0);
        let word1 = w.get(1).copied().unwrap_or(0);
        let l1_size = word1 >> 32;
        let id_len = (word1 >> 16) & 0xffff;
        let name_len = word1 & 0xffff;
        let extra = fixed.get(36..40).map_or(0, |b| {
            u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        });
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(Error::limit(
                FMT,
                format!(
                    "snapshot {n} has {extra} bytes of extra data, above qemu's {MAX_SNAPSHOT_EXTRA}"
                ),
            ));
        }
        walk_l1(
            storage,
            ctr,
            l1_off,
            l1_size,
            &format!("snapshot {n} L1 table"),
            false,
            l2_refs,
            budget,
        )?;
        pos += (40 + extra + id_len + name_len).div_ceil(8) * 8;
    }
    if h.nb_snapshots > 0 {
        ctr.add(
            h.snapshots_offset,
            pos - h.snapshots_offset,
            1,
            "snapshot table",
        );
    }
    Ok(())
}

/// The bitmap directory, bitmap tables and bitmap data clusters ("Bitmaps"), within qemu's bounds
/// (block/qcow2-bitmap.c `bitmap_list_load`, `check_dir_entry`). As for L2 tables, each bitmap table is read
/// once and its clusters get as many references as directory entries name it; the tables read add up to at
/// most the file size (real tables never overlap), so the walk stays linear in the file whatever the directory
/// claims.
fn bitmaps(storage: &dyn Storage, h: &Header, ctr: &mut Counter<'_>) -> Result<()> {
    let Some(b) = h.bitmaps else { return Ok(()) };
    if b.directory_size > MAX_BITMAP_DIRECTORY {
        return Err(Error::limit(
            FMT,
            "bitmap directory above qemu's 64 MiB limit",
        ));
    }
    if b.nb_bitmaps > MAX_BITMAPS {
        ctr.report.corruption(format_args!(
            "the bitmaps extension claims {} bitmaps, above qemu's limit of {MAX_BITMAPS}",
            b.nb_bitmaps
        ));
    }
    let dir = read(
        storage,
        b.directory_offset,
        b.directory_size,
        "bitmap directory",
    )?;
    ctr.add(b.directory_offset, b.directory_size, 1, "bitmap directory");
    // (table offset, entries) -> directory entries naming that table.
    let mut tables: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    let mut pos = 0u64;
    for n in 0..b.nb_bitmaps.min(MAX_BITMAPS) {
        let e = usize::try_from(pos)
            .ok()
            .and_then(|at| dir.get(at..at.checked_add(24)?));
        let Some(e) = e else {
            ctr.report
                .corruption(format_args!("bitmap directory entry {n} is truncated"));
            break;
        };
        let w = words(e);
        let table_off = w.first().copied().unwrap_or(0);
        let table_size = w.get(1).copied().unwrap_or(0) >> 32;
        let name_size = (w.get(2).copied().unwrap_or(0) >> 32) & 0xffff;
        let extra = w.get(2).copied().unwrap_or(0) & 0xffff_ffff;
        pos = pos.saturating_add((24 + extra + name_size).div_ceil(8) * 8);
        if name_size > MAX_BITMAP_NAME {
            ctr.report.corruption(format_args!(
                "bitmap {n}: a name of {name_size} bytes, above qemu's limit of {MAX_BITMAP_NAME}"
            ));
        }
        if table_size == 0 || table_size > MAX_BITMAP_TABLE_ENTRIES {
            ctr.report.corruption(format_args!(
                "bitmap {n}: a table of {table_size} entries (qemu allows 1 to {MAX_BITMAP_TABLE_ENTRIES})"
            ));
            continue;
        }
        if table_off == 0 || !ctr.aligned(table_off) {
            ctr.report.corruption(format_args!(
                "bitmap {n}: table offset {table_off:#x} is zero or not cluster aligned"
            ));
            continue;
        }
        let refs = tables.entry((table_off, table_size)).or_insert(0);
        *refs = refs.saturating_add(1);
    }
    let mut unread = storage.len();
    for ((table_off, table_size), refs) in tables {
        let bytes = table_size * 8;
        if table_off
            .checked_add(bytes)
            .is_none_or(|e| e > storage.len())
        {
            ctr.report.corruption(format_args!(
                "bitmap table at {table_off:#x} ({table_size} entries) is past the end of the file"
            ));
            continue;
        }
        let Some(left) = unread.checked_sub(bytes) else {
            ctr.report.corruption(format_args!(
                "the bitmap tables overlap: together they are larger than the file (at {table_off:#x})"
            ));
            break;
        };
        unread = left;
        ctr.add(table_off, bytes, refs, "bitmap table");
        let t = read(storage, table_off, bytes, "bitmap table")?;
        for e in words(&t) {
            let off = e & OFFSET_MASK;
            if off != 0 {
                ctr.add(off, h.cluster_size(), refs, "bitmap data cluster");
            }
        }
    }
    Ok(())
}
