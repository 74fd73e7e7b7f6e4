//! Writing guest data into an existing qcow2 image (`convert -n`), as qemu-img does through its qcow2 driver.
//!
//! Spec: qemu `docs/interop/qcow2.txt`, "Cluster mapping" (L1/L2 entries, the zero flag of version 3, COPIED)
//! and "Host cluster management" (refcount table and blocks).
//!
//! [`Qcow2InPlace`] is a [`Sink`] that takes the guest disk as raw bytes (offsets are guest offsets, in increasing
//! order; what lies between two writes is zeros) and stores it through the image's own tables: an allocated
//! cluster is overwritten in place, an unallocated one gets a new cluster at the end of the file (its refcount
//! set to 1 first, then the data, then the L2 entry, so a crash leaves at most leaked clusters), and a cluster
//! of zeros becomes a zero cluster on version 3 (the allocation kept) or written zeros on version 2 where the
//! image would otherwise not read as zeros (an allocated cluster, or a backing file showing through).
//!
//! Refused before anything is written: images qemu marks corrupt or dirty, any corruption `check` finds,
//! compressed clusters, internal snapshots (shared clusters would need copy-on-write), persistent bitmaps
//! (they would go stale), external data files, extended L2 entries, refcounts narrower than 8 bits, and a
//! virtual size smaller than the source. When new clusters lie past what the refcount table covers, the
//! table moves to a larger copy at the end of the file (up to qemu's 8 MiB).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{Header, INCOMPAT_DATA_FILE};
use super::{COMPRESSED, COPIED, FMT, MAX_REFTABLE_BYTES, OFFSET_MASK, ZERO_FLAG, bitmaps, check};
use crate::error::{Error, Result};
use crate::sink::Sink;
use crate::storage::{FileStorage, Storage};

/// Refcount table entries: "Bits 9-63 of the offset".
const REFT_OFFSET_MASK: u64 = !511;
/// Header bytes 48-59: refcount_table_offset (8) and refcount_table_clusters (4).
const REFCOUNT_TABLE_FIELDS: u64 = 48;

/// An existing qcow2 image opened for `convert -n`.
pub struct Qcow2InPlace {
    file: File,
    path: PathBuf,
    cs: u64,
    size: u64,
    v3: bool,
    has_backing: bool,
    l1: Vec<u64>,
    l1_offset: u64,
    reftable: Vec<u64>,
    reftable_offset: u64,
    /// Bytes per refcount entry (1, 2, 4 or 8).
    refcount_bytes: u64,
    /// Next cluster-aligned offset past the end of the file.
    next_free: u64,
    /// The L2 table in memory: (L1 index, entries, changed).
    l2: Option<(usize, Vec<u64>, bool)>,
    /// Guest bytes below this are written (or pending).
    pos: u64,
    zero_gaps: bool,
    /// The cluster being assembled from partial writes: (guest cluster index, bytes).
    pending: Option<(u64, Vec<u8>)>,
}

impl Qcow2InPlace {
    /// Opens the qcow2 image at `path` to receive `source_size` guest bytes. With `zero_gaps` false (the user's
    /// `--target-is-zero`) ranges between writes are left as they are.
    pub fn open(path: &Path, source_size: u64, zero_gaps: bool) -> Result<Self> {
        let storage = FileStorage::open(path)?;
        let h = bitmaps::read_header(&storage)?;
        refuse(&storage, &h, source_size)?;
        let cs = h.cluster_size();
        let needed = h.size.div_ceil(h.l2_span());
        let l1 = read_table(&storage, h.l1_table_offset, needed, "L1 table")?;
        let rt_entries = h.refcount_table_clusters.saturating_mul(cs) / 8;
        let reftable = read_table(
            &storage,
            h.refcount_table_offset,
            rt_entries,
            "refcount table",
        )?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("cannot open for writing", path, e))?;
        let next_free = storage
            .len()
            .checked_next_multiple_of(cs)
            .ok_or_else(|| Error::corrupt(FMT, "file length overflows"))?;
        let me = Qcow2InPlace {
            file,
            path: path.to_path_buf(),
            cs,
            size: h.size,
            v3: h.version >= 3,
            has_backing: h.backing_file.is_some(),
            l1,
            l1_offset: h.l1_table_offset,
            reftable,
            reftable_offset: h.refcount_table_offset,
            refcount_bytes: (1u64 << h.refcount_order) / 8,
            next_free,
            l2: None,
            pos: 0,
            zero_gaps,
            pending: None,
        };
        me.refuse_compressed()?;
        Ok(me)
    }

    /// The target's virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// Makes the written data durable (`-t writeback`).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("cannot sync", &self.path, e))
    }

    fn io(&self, op: &str, e: std::io::Error) -> Error {
        Error::io(op, &self.path, e)
    }

    fn write(&self, data: &[u8], at: u64) -> Result<()> {
        self.file
            .write_all_at(data, at)
            .map_err(|e| self.io("cannot write", e))
    }

    /// Every L2 table is read once: a compressed cluster cannot be overwritten in place.
    fn refuse_compressed(&self) -> Result<()> {
        let mut buf = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
        for (i, &e) in self.l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.file
                .read_exact_at(&mut buf, off)
                .map_err(|e| self.io("cannot read", e))?;
            for c in buf.chunks_exact(8) {
                let v = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
                if v & COMPRESSED != 0 {
                    return Err(Error::unsupported(
                        FMT,
                        format!(
                            "{} holds compressed clusters (L2 table {i}); -n cannot rewrite them in place (convert without -n)",
                            self.path.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Entries per L2 table.
    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    /// Loads the L2 table of L1 index `i` (allocating it when `create`); false when it does not exist.
    fn load_l2(&mut self, i: usize, create: bool) -> Result<bool> {
        if self.l2.as_ref().is_some_and(|t| t.0 == i) {
            return Ok(true);
        }
        self.flush_l2()?;
        let e = self
            .l1
            .get(i)
            .copied()
            .ok_or_else(|| Error::input("internal error: L1 index outside the table"))?;
        let off = e & OFFSET_MASK;
        let n = usize::try_from(self.l2_entries()).unwrap_or(0);
        if off == 0 {
            if !create {
                return Ok(false);
            }
            let t = self.alloc()?;
            self.write(&vec![0u8; n * 8], t)?;
            let entry = t | COPIED;
            self.write(&entry.to_be_bytes(), self.l1_offset + i as u64 * 8)?;
            if let Some(slot) = self.l1.get_mut(i) {
                *slot = entry;
            }
            self.l2 = Some((i, vec![0u64; n], false));
            return Ok(true);
        }
        let mut raw = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut raw, off)
            .map_err(|e| self.io("cannot read", e))?;
        let entries = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        self.l2 = Some((i, entries, false));
        Ok(true)
    }

    /// Writes the L2 table in memory back when it changed.
    fn flush_l2(&mut self) -> Result<()> {
        if let Some((i, entries, true)) = &self.l2 {
            let off = self.l1.get(*i).copied().unwrap_or(0) & OFFSET_MASK;
            let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write(&raw, off)?;
        }
        if let Some(t) = self.l2.as_mut() {
            t.2 = false;
        }
        Ok(())
    }

    /// Sets L2 entry `j` of the table in memory.
    fn set_l2(&mut self, j: usize, v: u64) {
        if let Some((_, entries, dirty)) = self.l2.as_mut()
            && let Some(slot) = entries.get_mut(j)
        {
            *slot = v;
            *dirty = true;
        }
    }

    fn l2_entry(&self, j: usize) -> u64 {
        self.l2
            .as_ref()
            .and_then(|t| t.1.get(j).copied())
            .unwrap_or(0)
    }

    /// A new cluster at the end of the file, its refcount set to 1.
    fn alloc(&mut self) -> Result<u64> {
        let x = self.take_cluster()?;
        self.set_refcount(x, 1, 0)?;
        Ok(x)
    }

    /// Stores refcount `value` for the cluster at `off`, adding a refcount block (itself counted) when its
    /// table entry is empty and growing the refcount table when it does not reach that far.
    fn set_refcount(&mut self, off: u64, value: u64, depth: u32) -> Result<()> {
        if depth > 8 {
            return Err(Error::input(
                "internal error: refcount block allocation loops",
            ));
        }
        let per_block = self.cs / self.refcount_bytes;
        let idx = off / self.cs;
        let rt = usize::try_from(idx / per_block).unwrap_or(usize::MAX);
        if rt >= self.reftable.len() {
            self.grow_reftable(rt, depth)?;
        }
        let entry = self
            .reftable
            .get(rt)
            .copied()
            .ok_or_else(|| Error::input("internal error: refcount table index"))?;
        let mut block = entry & REFT_OFFSET_MASK;
        if block == 0 {
            block = self.take_cluster()?;
            self.write(&vec![0u8; usize::try_from(self.cs).unwrap_or(0)], block)?;
            self.write(&block.to_be_bytes(), self.reftable_offset + rt as u64 * 8)?;
            if let Some(slot) = self.reftable.get_mut(rt) {
                *slot = block;
            }
            self.set_refcount(block, 1, depth + 1)?;
        }
        let w = self.refcount_bytes;
        let bytes = value.to_be_bytes();
        let field = bytes
            .get((8 - w) as usize..)
            .ok_or_else(|| Error::input("internal error: refcount width"))?;
        self.write(field, block + (idx % per_block) * w)
    }

    /// The next cluster at the end of the file (no refcount set).
    fn take_cluster(&mut self) -> Result<u64> {
        let x = self.next_free;
        self.next_free = x
            .checked_add(self.cs)
            .ok_or_else(|| Error::limit(FMT, "the file would grow past 2^64 bytes"))?;
        Ok(x)
    }

    /// Moves the refcount table to a larger copy at the end of the file (at least twice as large, covering index
    /// `rt`), as qemu does: the new table is written and counted, then the header points at it
    /// ("refcount_table_offset", "refcount_table_clusters"), then the old table's clusters are freed. A crash
    /// between the steps leaves leaked clusters only.
    fn grow_reftable(&mut self, rt: usize, depth: u32) -> Result<()> {
        let cs = self.cs;
        let old_len = self.reftable.len() as u64;
        let want = (rt as u64 + 1).max(old_len.saturating_mul(2));
        let clusters = want.saturating_mul(8).div_ceil(cs);
        if clusters.saturating_mul(cs) > MAX_REFTABLE_BYTES {
            return Err(Error::limit(
                FMT,
                format!(
                    "{}: the refcount table would grow past qemu's {} MiB",
                    self.path.display(),
                    MAX_REFTABLE_BYTES >> 20
                ),
            ));
        }
        let new_len = usize::try_from(clusters * cs / 8)
            .map_err(|_| Error::limit(FMT, "refcount table size"))?;
        let old_off = self.reftable_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        let table_off = self.next_free;
        self.next_free = clusters
            .checked_mul(cs)
            .and_then(|b| table_off.checked_add(b))
            .ok_or_else(|| Error::limit(FMT, "the file would grow past 2^64 bytes"))?;
        self.reftable.resize(new_len, 0);
        self.reftable_offset = table_off;
        // Written whole first, so that entries of blocks added while counting it land in it.
        self.write_reftable()?;
        for k in 0..clusters {
            self.set_refcount(table_off + k * cs, 1, depth + 1)?;
        }
        self.write_reftable()?;
        let clusters32 =
            u32::try_from(clusters).map_err(|_| Error::limit(FMT, "refcount table clusters"))?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_off.to_be_bytes());
        fields[8..].copy_from_slice(&clusters32.to_be_bytes());
        self.write(&fields, REFCOUNT_TABLE_FIELDS)?;
        for k in 0..old_clusters {
            self.set_refcount(old_off + k * cs, 0, depth + 1)?;
        }
        Ok(())
    }

    fn write_reftable(&self) -> Result<()> {
        let raw: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write(&raw, self.reftable_offset)
    }

    /// Guest bytes of cluster `c` inside the virtual disk.
    fn cluster_len(&self, c: u64) -> u64 {
        self.cs.min(self.size.saturating_sub(c * self.cs))
    }

    /// Makes guest cluster `c` read as zeros.
    fn zero_cluster(&mut self, c: u64) -> Result<()> {
        let (i, j) = self.split(c);
        let needs_table = self.has_backing;
        if !self.load_l2(i, needs_table)? {
            return Ok(()); // no table, no backing file: it reads as zeros already
        }
        let e = self.l2_entry(j);
        let host = e & OFFSET_MASK;
        if self.v3 {
            if host != 0 {
                self.set_l2(j, host | COPIED | ZERO_FLAG);
            } else if e & ZERO_FLAG == 0 && self.has_backing {
                self.set_l2(j, ZERO_FLAG);
            }
            return Ok(());
        }
        let zeros = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
        if host != 0 {
            self.write(&zeros, host)
        } else if self.has_backing {
            let h = self.alloc()?;
            self.write(&zeros, h)?;
            self.set_l2(j, h | COPIED);
            Ok(())
        } else {
            Ok(())
        }
    }

    /// Writes guest cluster `c` (its bytes inside the virtual disk).
    fn write_cluster(&mut self, c: u64, data: &[u8]) -> Result<()> {
        if data.iter().all(|&b| b == 0) {
            return self.zero_cluster(c);
        }
        let (i, j) = self.split(c);
        self.load_l2(i, true)?;
        let host = self.l2_entry(j) & OFFSET_MASK;
        if host != 0 {
            self.write(data, host)?;
            self.set_l2(j, host | COPIED);
            return Ok(());
        }
        let h = self.alloc()?;
        // Whole clusters at the end of the file, so the next allocation starts on a boundary.
        if (data.len() as u64) < self.cs {
            let mut full = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
            full.get_mut(..data.len())
                .ok_or_else(|| Error::input("internal error: cluster buffer"))?
                .copy_from_slice(data);
            self.write(&full, h)?;
        } else {
            self.write(data, h)?;
        }
        self.set_l2(j, h | COPIED);
        Ok(())
    }

    /// (L1 index, L2 index) of guest cluster `c`.
    fn split(&self, c: u64) -> (usize, usize) {
        let n = self.l2_entries();
        (
            usize::try_from(c / n).unwrap_or(usize::MAX),
            usize::try_from(c % n).unwrap_or(usize::MAX),
        )
    }

    fn flush_pending(&mut self) -> Result<()> {
        if let Some((c, buf)) = self.pending.take() {
            let n = usize::try_from(self.cluster_len(c)).unwrap_or(0);
            let data = buf
                .get(..n)
                .ok_or_else(|| Error::input("internal error: pending cluster"))?;
            self.write_cluster(c, data)?;
        }
        Ok(())
    }

    /// Makes every cluster wholly inside `[from, to)` read as zeros (the partial ones are assembled from writes).
    fn zero_range(&mut self, from: u64, to: u64) -> Result<()> {
        let first = from.div_ceil(self.cs);
        let end = if to >= self.size {
            to.div_ceil(self.cs)
        } else {
            to / self.cs
        };
        if first >= end {
            return Ok(());
        }
        self.flush_pending()?;
        let per = self.l2_entries();
        let mut c = first;
        while c < end {
            let (i, _) = self.split(c);
            let table_end = ((c / per) + 1) * per;
            let absent = self.l1.get(i).is_none_or(|e| e & OFFSET_MASK == 0);
            if absent && !self.has_backing {
                c = table_end.min(end);
                continue;
            }
            self.zero_cluster(c)?;
            c += 1;
        }
        Ok(())
    }
}

impl Sink for Qcow2InPlace {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::input("write past the target's virtual size"))?;
        if offset < self.pos {
            return Err(Error::input(
                "internal error: -n received an out-of-order write",
            ));
        }
        if self.zero_gaps {
            self.zero_range(self.pos, offset)?;
        }
        let cs = self.cs;
        let mut at = offset;
        while at < end {
            let c = at / cs;
            let cstart = c * cs;
            let cend = (cstart + cs).min(end);
            let from = usize::try_from(at - offset).unwrap_or(0);
            let piece = data
                .get(from..from + (cend - at) as usize)
                .ok_or_else(|| Error::input("internal error: write piece"))?;
            let whole = at == cstart && cend - cstart == self.cluster_len(c);
            if whole && self.pending.is_none() {
                self.write_cluster(c, piece)?;
            } else {
                if self.pending.as_ref().is_some_and(|p| p.0 != c) {
                    self.flush_pending()?;
                }
                let (_, buf) = self
                    .pending
                    .get_or_insert_with(|| (c, vec![0u8; usize::try_from(cs).unwrap_or(0)]));
                let s = usize::try_from(at - cstart).unwrap_or(0);
                buf.get_mut(s..s + piece.len())
                    .ok_or_else(|| Error::input("internal error: pending piece"))?
                    .copy_from_slice(piece);
                if cend == cstart + self.cluster_len(c) {
                    self.flush_pending()?;
                }
            }
            at = cend;
        }
        self.pos = end;
        Ok(())
    }

    fn can_seek_back(&self) -> bool {
        false
    }

    fn finish(&mut self, len: u64) -> Result<()> {
        if self.zero_gaps && len > self.pos {
            self.zero_range(self.pos, len.min(self.size))?;
            self.pos = len;
        }
        self.flush_pending()?;
        self.flush_l2()
    }
}

/// The refusals listed in the module documentation, each one line.
fn refuse(storage: &dyn Storage, h: &Header, source_size: u64) -> Result<()> {
    let name = storage.name();
    let no = |why: String| Err(Error::unsupported(FMT, format!("-n into {name}: {why}")));
    if h.corrupt() {
        return no("qemu marked the image corrupt (repair it with qemu-img check -r all)".into());
    }
    if h.dirty() {
        return no(
            "the image was not closed cleanly (dirty bit; run qemu-img check -r all first)".into(),
        );
    }
    if h.incompatible & INCOMPAT_DATA_FILE != 0 {
        return no("it keeps its data in an external data file".into());
    }
    if h.extended_l2() {
        return no("extended L2 entries (subclusters) are not written in place".into());
    }
    if h.nb_snapshots > 0 {
        return no(format!(
            "it has {} internal snapshot(s) whose clusters would need copy-on-write",
            h.nb_snapshots
        ));
    }
    if h.bitmaps.is_some() {
        return no("it has persistent bitmaps, which -n would leave stale".into());
    }
    if h.refcount_order < 3 {
        return no(format!(
            "refcounts of {} bits are not written in place (8 bits or more)",
            1u64 << h.refcount_order
        ));
    }
    if h.size < source_size {
        return Err(Error::input(format!(
            "-n: {name} is {} bytes, smaller than the source's {source_size} bytes",
            h.size
        )));
    }
    if source_size < h.size && !source_size.is_multiple_of(h.cluster_size()) {
        return no(format!(
            "the source ({source_size} bytes) ends inside a {}-byte cluster of the larger target",
            h.cluster_size()
        ));
    }
    let report = check::check(storage, h)?;
    if report.corruptions > 0 {
        return no(format!(
            "qemu-img check would find {} error(s), first: {}",
            report.corruptions,
            report.messages.first().map_or("", String::as_str)
        ));
    }
    Ok(())
}

/// `n` big-endian u64 entries at `off`, inside the file.
fn read_table(storage: &dyn Storage, off: u64, n: u64, what: &str) -> Result<Vec<u64>> {
    let len = n
        .checked_mul(8)
        .filter(|&l| off.checked_add(l).is_some_and(|e| e <= storage.len()))
        .ok_or_else(|| {
            Error::corrupt(
                FMT,
                format!("{what} at {off:#x} is past the end of the file"),
            )
        })?;
    let mut raw = vec![0u8; usize::try_from(len).unwrap_or(0)];
    storage.read_exact_at(&mut raw, off)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}
