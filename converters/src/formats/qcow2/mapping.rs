//! Guest → host mapping: L1/L2 walks, L2 entry decoding, the bounded L2 cache, compressed clusters.
//! Spec: qcow2.txt "Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor".

use std::sync::Arc;

use super::header::Compression;
use super::{COMPRESSED, FMT, MAX_HOST_OFFSET, OFFSET_MASK, Qcow2Reader, ZERO_FLAG};
use crate::error::{Error, Result};

/// A piece of a guest range and where its bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum Piece {
    /// Not allocated here: the backing file (or zeros).
    Unallocated {
        /// Guest offset.
        guest: u64,
        /// Length.
        len: u64,
    },
    /// Reads as zeros.
    Zero {
        /// Guest offset.
        guest: u64,
        /// Length.
        len: u64,
    },
    /// Stored uncompressed at `host`.
    Data {
        /// Guest offset.
        guest: u64,
        /// Length.
        len: u64,
        /// Host offset of the first byte.
        host: u64,
    },
    /// Part of a compressed cluster.
    Compressed {
        /// Guest offset.
        guest: u64,
        /// Length.
        len: u64,
        /// The L2 entry (compressed descriptor).
        entry: u64,
        /// Offset of the piece inside the decompressed cluster.
        in_cluster: u64,
    },
}

impl Piece {
    /// Guest offset.
    pub fn guest(&self) -> u64 {
        match *self {
            Piece::Unallocated { guest, .. }
            | Piece::Zero { guest, .. }
            | Piece::Data { guest, .. }
            | Piece::Compressed { guest, .. } => guest,
        }
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Unallocated { len, .. }
            | Piece::Zero { len, .. }
            | Piece::Data { len, .. }
            | Piece::Compressed { len, .. } => len,
        }
    }
    /// Joins `next` onto `self` when one read can serve both; otherwise gives `self` back.
    pub fn merge(self, next: Piece) -> std::result::Result<Piece, Piece> {
        let contiguous = self.guest() + self.len() == next.guest();
        match (self, next) {
            (Piece::Unallocated { guest, len }, Piece::Unallocated { len: l2, .. })
                if contiguous =>
            {
                Ok(Piece::Unallocated {
                    guest,
                    len: len + l2,
                })
            }
            (Piece::Zero { guest, len }, Piece::Zero { len: l2, .. }) if contiguous => {
                Ok(Piece::Zero {
                    guest,
                    len: len + l2,
                })
            }
            (
                Piece::Data { guest, len, host },
                Piece::Data {
                    len: l2, host: h2, ..
                },
            ) if contiguous && host + len == h2 => Ok(Piece::Data {
                guest,
                len: len + l2,
                host,
            }),
            _ => Err(self),
        }
    }
}

/// What one L2 entry says about its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desc {
    /// Unallocated (backing shows through).
    Unallocated,
    /// Zero cluster.
    Zero,
    /// Standard cluster at `host`.
    Data {
        /// Host offset.
        host: u64,
    },
    /// Compressed cluster.
    Compressed {
        /// The raw L2 entry.
        entry: u64,
    },
    /// Extended L2 with mixed subclusters.
    Sub {
        /// Host offset (0 when no subcluster is allocated).
        host: u64,
        /// Allocation bitmap.
        alloc: u32,
        /// Zero bitmap.
        zero: u32,
    },
}

/// Compressed descriptor fields for `cluster_bits`: (offset mask, sectors shift, sectors mask).
/// "Compressed Clusters Descriptor (x = 62 - (cluster_bits - 8))".
pub fn compressed_layout(cluster_bits: u32) -> (u64, u32, u64) {
    let shift = 62 - (cluster_bits - 8);
    ((1u64 << shift) - 1, shift, (1u64 << (cluster_bits - 8)) - 1)
}

/// Host offset and byte count of a compressed cluster's data: the data runs from the offset to the end of the
/// last of `1 + additional` 512-byte sectors.
pub fn compressed_extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let (mask, shift, smask) = compressed_layout(cluster_bits);
    let off = entry & mask;
    let sectors = ((entry >> shift) & smask) + 1;
    (off, sectors * 512 - (off & 511))
}

/// Decodes entry `idx` of an L2 table (`table` holds the raw u64 words; two per entry with extended L2).
/// `l2_off` names the table in errors; `file_len` bounds data offsets.
pub fn decode(
    table: &[u64],
    idx: usize,
    l2_off: u64,
    cluster_bits: u32,
    version: u32,
    extended: bool,
    file_len: u64,
) -> Result<Desc> {
    let stride = if extended { 2 } else { 1 };
    let word = |i: usize| {
        table
            .get(i)
            .copied()
            .ok_or_else(|| Error::input("internal error: L2 index out of range"))
    };
    let e = word(idx * stride)?;
    let bitmap = if extended { word(idx * stride + 1)? } else { 0 };
    let where_ = || format!("(L2 table at {l2_off:#x}, index {idx})");
    if e & COMPRESSED != 0 {
        if bitmap != 0 {
            return Err(Error::corrupt(
                FMT,
                format!("compressed cluster with a subcluster bitmap {}", where_()),
            ));
        }
        let (off, _) = compressed_extent(e, cluster_bits);
        if off >= MAX_HOST_OFFSET || off >= file_len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "compressed cluster at {off:#x} is past the end of the file ({file_len} bytes) {}",
                    where_()
                ),
            ));
        }
        return Ok(Desc::Compressed { entry: e });
    }
    let host = e & OFFSET_MASK;
    let cs = 1u64 << cluster_bits;
    let check_host = || -> Result<()> {
        if !host.is_multiple_of(cs) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "data cluster offset {host:#x} is not cluster aligned {}",
                    where_()
                ),
            ));
        }
        if host >= file_len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "data cluster at {host:#x} is past the end of the file ({file_len} bytes) {}",
                    where_()
                ),
            ));
        }
        Ok(())
    };
    if !extended {
        if e & ZERO_FLAG != 0 {
            if version < 3 {
                return Err(Error::corrupt(
                    FMT,
                    format!("zero cluster flag in a version 2 image {}", where_()),
                ));
            }
            return Ok(Desc::Zero);
        }
        if host == 0 {
            return Ok(Desc::Unallocated);
        }
        check_host()?;
        return Ok(Desc::Data { host });
    }
    // "Subcluster Allocation Bitmap": bits 0-31 allocated, 32-63 reads as zeros.
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return Err(Error::corrupt(
            FMT,
            format!("subclusters both allocated and zero {}", where_()),
        ));
    }
    if alloc != 0 {
        if host == 0 {
            return Err(Error::corrupt(
                FMT,
                format!("allocated subclusters without a host offset {}", where_()),
            ));
        }
        check_host()?;
    }
    Ok(match (alloc, zero) {
        (0, 0) => Desc::Unallocated,
        (0, u32::MAX) => Desc::Zero,
        (u32::MAX, _) => Desc::Data { host },
        _ => Desc::Sub { host, alloc, zero },
    })
}

/// A small LRU of decoded L2 tables, keyed by host offset.
pub struct L2Cache {
    cap: usize,
    tick: u64,
    slots: Vec<(u64, Arc<Vec<u64>>, u64)>,
}

impl L2Cache {
    /// A cache of at most `cap` tables.
    pub fn new(cap: usize) -> Self {
        L2Cache {
            cap: cap.max(1),
            tick: 0,
            slots: Vec::new(),
        }
    }
    fn get(&mut self, off: u64) -> Option<Arc<Vec<u64>>> {
        self.tick += 1;
        let t = self.tick;
        self.slots.iter_mut().find(|s| s.0 == off).map(|s| {
            s.2 = t;
            s.1.clone()
        })
    }
    fn insert(&mut self, off: u64, table: Arc<Vec<u64>>) {
        self.tick += 1;
        if self.slots.iter().any(|s| s.0 == off) {
            return;
        }
        if self.slots.len() >= self.cap
            && let Some(i) = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.2)
                .map(|(i, _)| i)
        {
            self.slots.swap_remove(i);
        }
        self.slots.push((off, table, self.tick));
    }
}

/// Big-endian u64 words of a table.
pub fn words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Checks that an L2 table offset (from L1 index `l1_idx`) is aligned and inside the file.
pub fn check_l2_offset(l2_off: u64, l1_idx: u64, cluster_size: u64, file_len: u64) -> Result<()> {
    if !l2_off.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(
            FMT,
            format!("L2 table offset {l2_off:#x} is not cluster aligned (L1 index {l1_idx})"),
        ));
    }
    if l2_off
        .checked_add(cluster_size)
        .is_none_or(|e| e > file_len)
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "L2 table at {l2_off:#x} (L1 index {l1_idx}) is past the end of the file ({file_len} bytes)"
            ),
        ));
    }
    Ok(())
}

/// Decompresses one cluster: raw deflate (any window) or zstd frames, producing exactly `out.len()` bytes.
/// Input may carry trailing bytes of the next compressed cluster ("decompression stops when it has produced a
/// cluster of data").
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = |what: String| Error::corrupt(FMT, format!("compressed cluster: {what}"));
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let mut written = 0usize;
            // Each pass makes progress or stops: bounded by input + output size.
            while written < out.len() {
                let (in0, out0) = (d.total_in(), d.total_out());
                let rest_in = input.get(in0 as usize..).unwrap_or(&[]);
                let rest_out = out.get_mut(written..).unwrap_or(&mut []);
                let status = d
                    .decompress(rest_in, rest_out, flate2::FlushDecompress::Finish)
                    .map_err(|e| bad(format!("deflate error: {e}")))?;
                written = d.total_out() as usize;
                let progressed = d.total_in() != in0 || d.total_out() != out0;
                if written < out.len() && (status == flate2::Status::StreamEnd || !progressed) {
                    return Err(bad(format!(
                        "deflate data ends after {written} of {} bytes",
                        out.len()
                    )));
                }
            }
            Ok(())
        }
        Compression::Zstd => {
            use zstd::stream::raw::{DParameter, Decoder, Operation};
            let mut d = Decoder::new().map_err(|e| bad(format!("zstd: {e}")))?;
            // A frame for one cluster (at most 2 MiB) needs no window above 8 MiB.
            d.set_parameter(DParameter::WindowLogMax(23))
                .map_err(|e| bad(format!("zstd: {e}")))?;
            let (mut ip, mut op) = (0usize, 0usize);
            while op < out.len() {
                let rest_in = input.get(ip..).unwrap_or(&[]);
                let rest_out = out.get_mut(op..).unwrap_or(&mut []);
                let st = d
                    .run_on_buffers(rest_in, rest_out)
                    .map_err(|e| bad(format!("zstd error: {e}")))?;
                ip += st.bytes_read;
                op += st.bytes_written;
                if st.bytes_read == 0 && st.bytes_written == 0 {
                    return Err(bad(format!(
                        "zstd data ends after {op} of {} bytes",
                        out.len()
                    )));
                }
            }
            Ok(())
        }
    }
}

impl Qcow2Reader {
    /// The decoded L2 table at `l2_off`, from the cache or the file.
    fn l2_table(&self, l2_off: u64, l1_idx: u64) -> Result<Arc<Vec<u64>>> {
        let cs = self.header.cluster_size();
        check_l2_offset(l2_off, l1_idx, cs, self.storage.len())?;
        if let Ok(mut c) = self.l2_cache.lock()
            && let Some(t) = c.get(l2_off)
        {
            return Ok(t);
        }
        // Read outside the lock so parallel readers do not wait on each other's I/O.
        let mut raw = vec![0u8; cs as usize];
        self.storage.read_exact_at(&mut raw, l2_off)?;
        let table = Arc::new(words(&raw));
        if let Ok(mut c) = self.l2_cache.lock() {
            c.insert(l2_off, table.clone());
        }
        Ok(table)
    }

    /// Calls `f` with consecutive pieces covering `[offset, offset+len)` (already range-checked).
    pub(super) fn walk(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(Piece) -> Result<()>,
    ) -> Result<()> {
        let h = &self.header;
        let cb = h.cluster_bits;
        let cs = h.cluster_size();
        let span = h.l2_span();
        let entries = h.l2_entries();
        let end = offset + len;
        let file_len = self.storage.len();
        let mut pos = offset;
        while pos < end {
            let l1_idx = pos / span;
            let span_end = end.min((l1_idx + 1).saturating_mul(span));
            let l1e = self.l1.get(l1_idx as usize).copied().ok_or_else(|| {
                Error::corrupt(FMT, format!("guest offset {pos} is beyond the L1 table"))
            })?;
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                f(Piece::Unallocated {
                    guest: pos,
                    len: span_end - pos,
                })?;
                pos = span_end;
                continue;
            }
            let table = self.l2_table(l2_off, l1_idx)?;
            while pos < span_end {
                let cluster = pos >> cb;
                let idx = (cluster % entries) as usize;
                let cl_start = cluster << cb;
                let cl_end = span_end.min(cl_start + cs);
                let n = cl_end - pos;
                let desc = decode(
                    &table,
                    idx,
                    l2_off,
                    cb,
                    h.version,
                    h.extended_l2(),
                    file_len,
                )?;
                match desc {
                    Desc::Unallocated => f(Piece::Unallocated { guest: pos, len: n })?,
                    Desc::Zero => f(Piece::Zero { guest: pos, len: n })?,
                    Desc::Data { host } => f(Piece::Data {
                        guest: pos,
                        len: n,
                        host: host + (pos - cl_start),
                    })?,
                    Desc::Compressed { entry } => f(Piece::Compressed {
                        guest: pos,
                        len: n,
                        entry,
                        in_cluster: pos - cl_start,
                    })?,
                    Desc::Sub { host, alloc, zero } => {
                        // "standard data clusters are divided into 32 subclusters of the same size"
                        let sub = cs / 32;
                        let mut p = pos;
                        while p < cl_end {
                            let i = (p - cl_start) / sub;
                            let s_end = cl_end.min(cl_start + (i + 1) * sub);
                            let m = s_end - p;
                            let piece = if alloc & (1 << i) != 0 {
                                Piece::Data {
                                    guest: p,
                                    len: m,
                                    host: host + (p - cl_start),
                                }
                            } else if zero & (1 << i) != 0 {
                                Piece::Zero { guest: p, len: m }
                            } else {
                                Piece::Unallocated { guest: p, len: m }
                            };
                            f(piece)?;
                            p = s_end;
                        }
                    }
                }
                pos = cl_end;
            }
        }
        Ok(())
    }

    /// The decompressed cluster of a compressed L2 entry (one-entry cache).
    pub(super) fn decompressed(&self, entry: u64) -> Result<Arc<Vec<u8>>> {
        if let Ok(c) = self.last_compressed.lock()
            && let Some((e, data)) = c.as_ref()
            && *e == entry
        {
            return Ok(data.clone());
        }
        let cb = self.header.cluster_bits;
        let (off, csize) = compressed_extent(entry, cb);
        let file_len = self.storage.len();
        // qemu reads past the end of the file as zeros; the data itself must start inside it (checked in decode).
        let avail = csize.min(file_len.saturating_sub(off));
        let mut input = vec![0u8; avail as usize];
        self.storage.read_exact_at(&mut input, off)?;
        let mut out = vec![0u8; self.header.cluster_size() as usize];
        decompress(self.header.compression, &input, &mut out)
            .map_err(|e| e.context(format!("host offset {off:#x}")))?;
        let data = Arc::new(out);
        if let Ok(mut c) = self.last_compressed.lock() {
            *c = Some((entry, data.clone()));
        }
        Ok(data)
    }
}
