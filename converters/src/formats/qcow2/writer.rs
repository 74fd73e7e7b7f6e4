//! qcow2 output: version 3 (compat 1.1), 16-bit refcounts (refcount_order 4), every refcount exactly one
//! except host clusters shared by packed compressed clusters.
//!
//! Seekable outputs: cluster 0 is the header; data clusters are appended as runs arrive (zero granules are
//! skipped and stay unallocated, or become zero clusters when a backing file would show through); compressed
//! clusters are packed back to back at byte granularity; `finish` appends the L2 tables, the L1 table, the
//! refcount table and the refcount blocks (sized to cover themselves), then writes the header.
//! Streams: the layout comes from the plan: header, refcount table, refcount blocks, L1, L2 tables, then every
//! planned cluster in guest order (planned clusters that turn out zero are gaps the sink fills with zeros).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use zerocopy::IntoBytes;
use zerocopy::byteorder::big_endian::{U32, U64};

use super::header::{
    COMPAT_LAZY_REFCOUNTS, Compression, EXT_BACKING_FORMAT, INCOMPAT_COMPRESSION, RawHeader,
    V3_HEADER_LEN, V3_HEADER_LEN_WITH_COMPRESSION,
};
use super::mapping::compressed_layout;
use super::{
    COMPRESSED, COPIED, FMT, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS, ZERO_FLAG,
};
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::formats::probe::QCOW2_MAGIC;
use crate::sink::Sink;
use crate::writer::{
    ChunkCompressor, FormatWriter, OptionKind, OptionSpec, Plan, Run, WriterOptions,
};

/// qemu-img's default cluster size.
const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
/// Refcount width written: `refcount_order` 4 = 16 bits, qemu's default.
const REFCOUNT_ORDER: u32 = 4;
/// zstd level qemu uses (a default `ZSTD_CCtx`, `ZSTD_CLEVEL_DEFAULT`).
const ZSTD_LEVEL: i32 = 3;
/// Deflate window qemu uses for qcow2 (`deflateInit2(..., -12, ...)`); qemu inflates with the same window,
/// so larger windows would produce clusters qemu cannot read.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// Writes qcow2 images.
pub struct Qcow2Writer {
    cluster_bits: u32,
    compression: Compression,
    compress: bool,
    lazy_refcounts: bool,
    /// (name, format) of the backing file to record.
    backing: Option<(String, String)>,
    virtual_size: u64,
    mode: Mode,
}

enum Mode {
    Idle,
    Seek(SeekState),
    Stream(StreamState),
}

/// The guest cluster currently receiving runs (seekable layout).
struct Current {
    cluster: u64,
    host: Option<u64>,
    zero_seen: bool,
}

struct SeekState {
    /// Next free byte of the file.
    end: u64,
    /// L1 index → L2 entries.
    l2: BTreeMap<u64, Vec<u64>>,
    /// References per host cluster written so far.
    refcounts: Vec<u16>,
    cur: Option<Current>,
}

struct StreamState {
    /// Planned (first cluster, end cluster, rank of the first cluster among planned clusters).
    runs: Vec<(u64, u64, u64)>,
    /// Run the last write fell in.
    cursor: usize,
    data_base: u64,
    total_len: u64,
}

/// The qcow2 `-o` options this writer takes (qemu-img's names; `-o help` prints them). `compress` is not listed:
/// it is the CLI's `-c`.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "backing_file",
        kind: OptionKind::Str,
        default: "none",
        help: "File name of a base image (recorded, with backing_fmt; the data is not copied)",
    },
    OptionSpec {
        name: "backing_fmt",
        kind: OptionKind::Str,
        default: "none",
        help: "Image format of the base image (required with backing_file; never probed)",
    },
    OptionSpec {
        name: "cluster_size",
        kind: OptionKind::Size,
        default: "64k",
        help: "qcow2 cluster size, a power of two from 512 to 2M",
    },
    OptionSpec {
        name: "compat",
        kind: OptionKind::Str,
        default: "1.1",
        help: "Compatibility level: only v3 [1.1] is written",
    },
    OptionSpec {
        name: "compression_type",
        kind: OptionKind::Str,
        default: "zlib",
        help: "Compression method for compressed clusters (-c): zlib or zstd",
    },
    OptionSpec {
        name: "extended_l2",
        kind: OptionKind::Bool,
        default: "off",
        help: "Extended L2 tables: only off is written",
    },
    OptionSpec {
        name: "lazy_refcounts",
        kind: OptionKind::Bool,
        default: "off",
        help: "Postpone refcount updates (accepted; the header bit is set, refcounts are always exact)",
    },
    OptionSpec {
        name: "preallocation",
        kind: OptionKind::Str,
        default: "off",
        help: "Preallocation mode: only off",
    },
    OptionSpec {
        name: "refcount_bits",
        kind: OptionKind::Num,
        default: "16",
        help: "Width of a reference count entry in bits: only 16",
    },
];

impl Qcow2Writer {
    /// Takes qemu-img's qcow2 `-o` keys: cluster_size, compression_type, compress (the CLI's `-c`),
    /// backing_file, backing_fmt, lazy_refcounts, compat (1.1 only), preallocation (off only),
    /// extended_l2 (off only), refcount_bits (16 only).
    pub fn new(opts: &mut WriterOptions) -> Result<Self> {
        let cs = opts
            .take_size("cluster_size")?
            .unwrap_or(DEFAULT_CLUSTER_SIZE);
        if !cs.is_power_of_two()
            || !((1u64 << MIN_CLUSTER_BITS)..=(1u64 << MAX_CLUSTER_BITS)).contains(&cs)
        {
            return Err(Error::input(format!(
                "option cluster_size: {cs} is not a power of two between 512 and 2M"
            )));
        }
        let compression = match opts.take("compression_type").as_deref() {
            None | Some("zlib") => Compression::Zlib,
            Some("zstd") => Compression::Zstd,
            Some(o) => {
                return Err(Error::input(format!(
                    "option compression_type: '{o}' is not zlib or zstd"
                )));
            }
        };
        let compress = opts.take_bool("compress")?.unwrap_or(false);
        let lazy_refcounts = opts.take_bool("lazy_refcounts")?.unwrap_or(false);
        match opts.take("compat").as_deref() {
            None | Some("1.1") | Some("v3") => {}
            Some("0.10") | Some("v2") => {
                return Err(Error::input(
                    "option compat: writing compat=0.10 (qcow2 version 2) is not supported; use compat=1.1",
                ));
            }
            Some(o) => return Err(Error::input(format!("option compat: unknown value '{o}'"))),
        }
        match opts.take("preallocation").as_deref() {
            None | Some("off") => {}
            Some(o) => {
                return Err(Error::input(format!(
                    "option preallocation: only 'off' is supported, not '{o}'"
                )));
            }
        }
        if opts.take_bool("extended_l2")? == Some(true) {
            return Err(Error::input(
                "option extended_l2: writing extended L2 entries is not supported",
            ));
        }
        if let Some(bits) = opts.take("refcount_bits")
            && bits != "16"
        {
            return Err(Error::input(format!(
                "option refcount_bits: only 16 is supported, not '{bits}'"
            )));
        }
        let backing_file = opts.take("backing_file");
        let backing_fmt = opts.take("backing_fmt");
        let backing = match (backing_file, backing_fmt) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::input("option backing_fmt needs backing_file"));
            }
            (Some(_), None) => {
                return Err(Error::input(
                    "option backing_file needs backing_fmt (the format is recorded, never probed)",
                ));
            }
            (Some(name), Some(fmt)) => {
                let fmt = Format::from_name(&fmt)?.name().to_string();
                if name.is_empty() || name.len() as u64 > MAX_BACKING_NAME {
                    return Err(Error::input(format!(
                        "option backing_file: the name must be 1 to {MAX_BACKING_NAME} bytes"
                    )));
                }
                Some((name, fmt))
            }
        };
        Ok(Qcow2Writer {
            cluster_bits: cs.trailing_zeros(),
            compression,
            compress,
            lazy_refcounts,
            backing,
            virtual_size: 0,
            mode: Mode::Idle,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }

    fn l1_entries(&self) -> u64 {
        self.virtual_size
            .div_ceil(self.l2_entries() << self.cluster_bits)
            .max(1)
    }

    /// Cluster 0: header, extensions, backing file name.
    fn header_cluster(&self, l1_offset: u64, rt_offset: u64, rt_clusters: u64) -> Result<Vec<u8>> {
        let cs = self.cs();
        let mut incompatible = 0;
        if self.compression == Compression::Zstd {
            incompatible |= INCOMPAT_COMPRESSION;
        }
        let raw = RawHeader {
            magic: *QCOW2_MAGIC,
            version: U32::new(3),
            cluster_bits: U32::new(self.cluster_bits),
            size: U64::new(self.virtual_size),
            l1_size: U32::new(
                u32::try_from(self.l1_entries()).map_err(|_| Error::input("L1 too large"))?,
            ),
            l1_table_offset: U64::new(l1_offset),
            refcount_table_offset: U64::new(rt_offset),
            refcount_table_clusters: U32::new(
                u32::try_from(rt_clusters).map_err(|_| Error::input("refcount table too large"))?,
            ),
            incompatible_features: U64::new(incompatible),
            compatible_features: U64::new(if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            }),
            refcount_order: U32::new(REFCOUNT_ORDER),
            header_length: U32::new(V3_HEADER_LEN_WITH_COMPRESSION as u32),
            ..RawHeader::default()
        };
        let mut out = raw.as_bytes().to_vec();
        // Byte 104: compression_type; then padding to 112.
        out.push(match self.compression {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        });
        out.resize(V3_HEADER_LEN_WITH_COMPRESSION, 0);
        debug_assert_eq!(raw.as_bytes().len(), V3_HEADER_LEN);
        if let Some((_, fmt)) = &self.backing {
            out.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            out.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            out.extend_from_slice(fmt.as_bytes());
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out.extend_from_slice(&[0u8; 8]); // end of the extension area
        if let Some((name, _)) = &self.backing {
            let off = out.len() as u64;
            out.get_mut(8..16)
                .ok_or_else(|| Error::input("header"))?
                .copy_from_slice(&off.to_be_bytes());
            out.get_mut(16..20)
                .ok_or_else(|| Error::input("header"))?
                .copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > cs {
            return Err(Error::input(format!(
                "the qcow2 header with this backing file name does not fit in a {cs}-byte cluster; use a larger cluster_size"
            )));
        }
        Ok(out)
    }

    /// Refcount structures for `base` clusters of everything else: (table clusters, block clusters).
    /// Blocks must cover themselves and the table, so iterate to a fixed point.
    fn refcount_layout(&self, base: u64) -> Result<(u64, u64)> {
        let cs = self.cs();
        let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
        let (mut rt, mut rb) = (1u64, 0u64);
        // Each pass can only grow rt/rb; they settle within a few passes.
        for _ in 0..64 {
            let total = base + rt + rb;
            let nrb = total.div_ceil(per_block);
            let nrt = (nrb * 8).div_ceil(cs).max(1);
            if (nrt, nrb) == (rt, rb) {
                if rt * cs > MAX_REFTABLE_BYTES {
                    return Err(Error::limit(
                        FMT,
                        format!(
                            "the refcount table would exceed qemu's {} MiB limit; use a larger cluster_size",
                            MAX_REFTABLE_BYTES >> 20
                        ),
                    ));
                }
                return Ok((rt, rb));
            }
            (rt, rb) = (nrt, nrb);
        }
        Err(Error::input(
            "internal error: refcount layout did not settle",
        ))
    }

    /// Writes the refcount table at cluster `rt_at` and the blocks after it; `refcount(c)` for each cluster
    /// below `total`.
    fn write_refcounts(
        &self,
        sink: &mut dyn Sink,
        rt_at: u64,
        rt: u64,
        rb: u64,
        total: u64,
        refcount: &dyn Fn(u64) -> u16,
    ) -> Result<()> {
        let cs = self.cs();
        let per_block = cs / 2;
        let mut table = vec![0u8; (rt * cs) as usize];
        for (i, slot) in table.chunks_exact_mut(8).take(rb as usize).enumerate() {
            slot.copy_from_slice(&((rt_at + rt + i as u64) * cs).to_be_bytes());
        }
        sink.write_at(rt_at * cs, &table)?;
        let mut block = vec![0u8; cs as usize];
        for i in 0..rb {
            block.fill(0);
            let first = i * per_block;
            for (k, slot) in block.chunks_exact_mut(2).enumerate() {
                let c = first + k as u64;
                if c >= total {
                    break;
                }
                slot.copy_from_slice(&refcount(c).to_be_bytes());
            }
            sink.write_at((rt_at + rt + i) * cs, &block)?;
        }
        Ok(())
    }

    /// Writes the L1 table at `at` (only the clusters holding non-zero entries; the rest stays zero).
    fn write_l1(&self, sink: &mut dyn Sink, at: u64, entries: &[(u64, u64)]) -> Result<()> {
        let per_cluster = self.cs() / 8;
        let mut i = 0;
        while let Some(&(first_idx, _)) = entries.get(i) {
            let cl = first_idx / per_cluster;
            let mut buf = vec![0u8; self.cs() as usize];
            while let Some(&(idx, e)) = entries.get(i) {
                if idx / per_cluster != cl {
                    break;
                }
                let o = ((idx % per_cluster) * 8) as usize;
                buf.get_mut(o..o + 8)
                    .ok_or_else(|| Error::input("internal error: L1 slot"))?
                    .copy_from_slice(&e.to_be_bytes());
                i += 1;
            }
            sink.write_at(at + cl * self.cs(), &buf)?;
        }
        Ok(())
    }

    // ----- seekable layout -----

    fn seek_state(&mut self) -> Result<&mut SeekState> {
        match &mut self.mode {
            Mode::Seek(s) => Ok(s),
            _ => Err(Error::input(
                "internal error: qcow2 writer not in seek mode",
            )),
        }
    }

    /// Ends the current cluster: records its L2 entry.
    fn finish_current(&mut self) -> Result<()> {
        let backing = self.backing.is_some();
        let entries = self.l2_entries();
        let s = self.seek_state()?;
        if let Some(c) = s.cur.take() {
            let entry = match c.host {
                Some(h) => h | COPIED,
                // A zero cluster keeps a backing file from showing through; without one, unallocated reads zero.
                None if c.zero_seen && backing => ZERO_FLAG,
                None => 0,
            };
            if entry != 0 {
                set_l2(&mut s.l2, entries, c.cluster, entry)?;
            }
        }
        Ok(())
    }

    /// Makes `cluster` current (ending the previous one).
    fn enter(&mut self, cluster: u64) -> Result<()> {
        if self
            .seek_state()?
            .cur
            .as_ref()
            .is_some_and(|c| c.cluster == cluster)
        {
            return Ok(());
        }
        self.finish_current()?;
        self.seek_state()?.cur = Some(Current {
            cluster,
            host: None,
            zero_seen: false,
        });
        Ok(())
    }

    fn seek_write(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        let cs = self.cs();
        match run {
            Run::Zero(n) => {
                let mut pos = offset;
                let end = offset + n;
                while pos < end {
                    let cluster = pos / cs;
                    self.enter(cluster)?;
                    if let Some(c) = self.seek_state()?.cur.as_mut() {
                        c.zero_seen = true;
                    }
                    pos = ((cluster + 1) * cs).min(end);
                }
                Ok(())
            }
            Run::Data(d) => {
                // Clusters allocated one after another are contiguous in the file: one write per contiguous
                // piece (host offset, start in `d`, length).
                let mut pending: Option<(u64, usize, usize)> = None;
                let mut pos = offset;
                let mut done = 0usize;
                while done < d.len() {
                    let cluster = pos / cs;
                    let in_cl = pos % cs;
                    let n = ((cs - in_cl) as usize).min(d.len() - done);
                    self.enter(cluster)?;
                    let s = self.seek_state()?;
                    let host = match s.cur.as_ref().and_then(|c| c.host) {
                        Some(h) => h,
                        None => {
                            let h = s.end.div_ceil(cs) * cs;
                            s.end = h + cs;
                            bump(&mut s.refcounts, h / cs, 1)?;
                            if let Some(c) = s.cur.as_mut() {
                                c.host = Some(h);
                            }
                            h
                        }
                    };
                    let at = host + in_cl;
                    match &mut pending {
                        Some((off, from, len))
                            if *off + *len as u64 == at && *from + *len == done =>
                        {
                            *len += n
                        }
                        _ => {
                            if let Some((off, from, len)) = pending.take() {
                                sink.write_at(off, &d[from..from + len])?;
                            }
                            pending = Some((at, done, n));
                        }
                    }
                    pos += n as u64;
                    done += n;
                }
                if let Some((off, from, len)) = pending {
                    sink.write_at(off, &d[from..from + len])?;
                }
                Ok(())
            }
            Run::Compressed { data, len } => {
                if !offset.is_multiple_of(cs) || len > cs || data.is_empty() {
                    return Err(Error::input(
                        "internal error: a compressed run must be one cluster",
                    ));
                }
                self.finish_current()?;
                let cb = self.cluster_bits;
                let entries = self.l2_entries();
                let s = self.seek_state()?;
                // Byte-granular packing, but a host cluster's refcount must stay within 16 bits.
                let mut start = s.end;
                if s.refcounts.get((start / cs) as usize) == Some(&u16::MAX) {
                    start = start.div_ceil(cs) * cs;
                }
                let (offset_mask, shift, sectors_mask) = compressed_layout(cb);
                let clen = data.len() as u64;
                let extra_sectors = (start + clen - 1) / 512 - start / 512;
                if start > offset_mask || extra_sectors > sectors_mask {
                    return Err(Error::limit(
                        FMT,
                        format!("compressed cluster at host offset {start:#x} cannot be described"),
                    ));
                }
                sink.write_at(start, data)?;
                s.end = start + clen;
                for c in start / cs..=(start + clen - 1) / cs {
                    bump(&mut s.refcounts, c, 1)?;
                }
                let entry = COMPRESSED | (extra_sectors << shift) | start;
                set_l2(&mut s.l2, entries, offset / cs, entry)
            }
        }
    }

    fn seek_finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        self.finish_current()?;
        let cs = self.cs();
        let l1_entries = self.l1_entries();
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let Mode::Seek(s) = std::mem::replace(&mut self.mode, Mode::Idle) else {
            return Err(Error::input(
                "internal error: qcow2 writer not in seek mode",
            ));
        };
        let data_end = s.end.div_ceil(cs);
        let n_l2 = s.l2.len() as u64;
        let l1_at = data_end + n_l2;
        let base = l1_at + l1_clusters;
        let (rt, rb) = self.refcount_layout(base)?;
        let total = base + rt + rb;

        let mut l1 = Vec::with_capacity(s.l2.len());
        let mut buf = vec![0u8; cs as usize];
        for (k, (l1_idx, table)) in s.l2.iter().enumerate() {
            let at = (data_end + k as u64) * cs;
            for (slot, e) in buf.chunks_exact_mut(8).zip(table) {
                slot.copy_from_slice(&e.to_be_bytes());
            }
            sink.write_at(at, &buf)?;
            l1.push((*l1_idx, at | COPIED));
        }
        self.write_l1(sink, l1_at * cs, &l1)?;
        let refcounts = s.refcounts;
        self.write_refcounts(sink, base, rt, rb, total, &|c| {
            if c < data_end {
                refcounts.get(c as usize).copied().unwrap_or(0)
            } else {
                1
            }
        })?;
        let head = self.header_cluster(l1_at * cs, base * cs, rt)?;
        sink.write_at(0, &head)?;
        sink.finish(total * cs)?;
        Ok(total * cs)
    }

    // ----- streaming layout -----

    fn stream_begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        if self.compress {
            return Err(Error::input(
                "compressed qcow2 output needs a seekable destination (a local file)",
            ));
        }
        let cs = self.cs();
        let entries = self.l2_entries();
        let mut runs = Vec::with_capacity(plan.runs.len());
        let mut rank = 0u64;
        let mut l1_used: Vec<u64> = Vec::new();
        for &(s, t) in plan.runs {
            let (c0, c1) = (s / cs, t.div_ceil(cs));
            if c1 <= c0 {
                continue;
            }
            runs.push((c0, c1, rank));
            rank += c1 - c0;
            for l in c0 / entries..=(c1 - 1) / entries {
                if l1_used.last() != Some(&l) {
                    l1_used.push(l);
                }
            }
        }
        let n_data = rank;
        let n_l2 = l1_used.len() as u64;
        let l1_clusters = (self.l1_entries() * 8).div_ceil(cs);
        // 1 header cluster, then the refcount structures, L1, L2 tables, data.
        let (rt, rb) = self.refcount_layout(1 + l1_clusters + n_l2 + n_data)?;
        let l1_at = 1 + rt + rb;
        let l2_at = l1_at + l1_clusters;
        let data_at = l2_at + n_l2;
        let total = data_at + n_data;

        let head = self.header_cluster(l1_at * cs, cs, rt)?;
        sink.write_at(0, &head)?;
        self.write_refcounts(sink, 1, rt, rb, total, &|_| 1)?;
        let l1: Vec<(u64, u64)> = l1_used
            .iter()
            .enumerate()
            .map(|(k, &l)| (l, ((l2_at + k as u64) * cs) | COPIED))
            .collect();
        self.write_l1(sink, l1_at * cs, &l1)?;
        let mut table = vec![0u64; entries as usize];
        let mut current: Option<u64> = None;
        let mut written = 0u64;
        let mut buf = vec![0u8; cs as usize];
        let mut flush = |l: Option<u64>, table: &mut Vec<u64>, sink: &mut dyn Sink| -> Result<()> {
            if l.is_some() {
                for (slot, e) in buf.chunks_exact_mut(8).zip(table.iter()) {
                    slot.copy_from_slice(&e.to_be_bytes());
                }
                sink.write_at((l2_at + written) * cs, &buf)?;
                written += 1;
                table.fill(0);
            }
            Ok(())
        };
        for &(c0, c1, r) in &runs {
            for c in c0..c1 {
                let l = c / entries;
                if current != Some(l) {
                    flush(current, &mut table, sink)?;
                    current = Some(l);
                }
                if let Some(slot) = table.get_mut((c % entries) as usize) {
                    *slot = ((data_at + r + (c - c0)) * cs) | COPIED;
                }
            }
        }
        flush(current, &mut table, sink)?;
        self.mode = Mode::Stream(StreamState {
            runs,
            cursor: 0,
            data_base: data_at * cs,
            total_len: total * cs,
        });
        Ok(())
    }

    fn stream_write(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        let cs = self.cs();
        let Mode::Stream(s) = &mut self.mode else {
            return Err(Error::input(
                "internal error: qcow2 writer not in stream mode",
            ));
        };
        let d = match run {
            // Planned clusters are allocated; their zero parts are gaps the sink fills.
            Run::Zero(_) => return Ok(()),
            Run::Data(d) => d,
            Run::Compressed { .. } => {
                return Err(Error::input(
                    "compressed qcow2 output needs a seekable destination (a local file)",
                ));
            }
        };
        let mut pos = offset;
        let mut rest = d;
        while !rest.is_empty() {
            let cluster = pos / cs;
            while s.runs.get(s.cursor).is_some_and(|r| r.1 <= cluster) {
                s.cursor += 1;
            }
            let Some(&(c0, c1, rank)) = s.runs.get(s.cursor).filter(|r| r.0 <= cluster) else {
                return Err(Error::input(format!(
                    "internal error: data at guest offset {pos} is outside the plan"
                )));
            };
            let run_end = c1 * cs;
            let n = ((run_end - pos) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            let host = s.data_base + (rank + cluster - c0) * cs + pos % cs;
            sink.write_at(host, piece)?;
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }
}

/// Sets the L2 entry of guest `cluster`.
fn set_l2(l2: &mut BTreeMap<u64, Vec<u64>>, entries: u64, cluster: u64, entry: u64) -> Result<()> {
    let table = l2
        .entry(cluster / entries)
        .or_insert_with(|| vec![0u64; entries as usize]);
    let slot = table
        .get_mut((cluster % entries) as usize)
        .ok_or_else(|| Error::input("internal error: L2 slot"))?;
    *slot = entry;
    Ok(())
}

/// Adds `n` references to host cluster `c`.
fn bump(refcounts: &mut Vec<u16>, c: u64, n: u16) -> Result<()> {
    let i = c as usize;
    if refcounts.len() <= i {
        refcounts.resize(i + 1, 0);
    }
    let slot = refcounts
        .get_mut(i)
        .ok_or_else(|| Error::input("internal error: refcount slot"))?;
    *slot = slot
        .checked_add(n)
        .ok_or_else(|| Error::input("internal error: refcount overflow"))?;
    Ok(())
}

impl FormatWriter for Qcow2Writer {
    fn granularity(&self) -> u64 {
        self.cs()
    }

    fn compressor(&self) -> Option<Arc<dyn ChunkCompressor>> {
        self.compress.then(|| {
            Arc::new(Qcow2Compressor::new(self.cs() as usize, self.compression))
                as Arc<dyn ChunkCompressor>
        })
    }

    fn output_virtual_size(&self, source_size: u64) -> Result<u64> {
        // qemu sees the disk in 512-byte sectors (total_sectors = size / 512): round up, never down.
        source_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::input("virtual size too large"))
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        self.virtual_size = plan.virtual_size;
        if self.l1_entries() * 8 > MAX_L1_BYTES {
            return Err(Error::input(format!(
                "virtual size {} needs an L1 table above qemu's 32 MiB limit with {}-byte clusters; use a larger cluster_size",
                self.virtual_size,
                self.cs()
            )));
        }
        if sink.can_seek_back() {
            self.mode = Mode::Seek(SeekState {
                end: self.cs(),
                l2: BTreeMap::new(),
                refcounts: vec![1],
                cur: None,
            });
            Ok(())
        } else {
            self.stream_begin(sink, plan)
        }
    }

    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        match self.mode {
            Mode::Seek(_) => self.seek_write(sink, offset, run),
            Mode::Stream(_) => self.stream_write(sink, offset, run),
            Mode::Idle => Err(Error::input("internal error: write before begin")),
        }
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        match &self.mode {
            Mode::Seek(_) => self.seek_finish(sink),
            Mode::Stream(s) => {
                let len = s.total_len;
                sink.finish(len)?;
                self.mode = Mode::Idle;
                Ok(len)
            }
            Mode::Idle => Err(Error::input("internal error: finish before begin")),
        }
    }
}

/// Compresses one cluster as qemu does: raw deflate with a 4 KiB window, or one zstd frame at level 3. A short
/// last cluster is zero-padded to a whole cluster (qemu pads it too: readers inflate a full cluster).
pub struct Qcow2Compressor {
    cluster_size: usize,
    kind: Compression,
}

impl Qcow2Compressor {
    /// A compressor for clusters of `cluster_size` bytes.
    pub fn new(cluster_size: usize, kind: Compression) -> Self {
        Qcow2Compressor { cluster_size, kind }
    }
}

thread_local! {
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    /// One deflate state per worker thread, reset for every cluster (setting one up costs about as much as
    /// compressing a small cluster).
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
}

impl ChunkCompressor for Qcow2Compressor {
    fn compress(&self, chunk: &[u8]) -> Result<Option<Vec<u8>>> {
        let cs = self.cluster_size;
        if chunk.len() > cs {
            return Err(Error::input("internal error: chunk larger than a cluster"));
        }
        let padded;
        let input = if chunk.len() < cs {
            let mut v = vec![0u8; cs];
            v.get_mut(..chunk.len())
                .ok_or_else(|| Error::input("internal error: pad"))?
                .copy_from_slice(chunk);
            padded = v;
            &padded[..]
        } else {
            chunk
        };
        // Worth it only when at least one 512-byte sector is saved.
        let limit = cs.saturating_sub(512);
        if limit == 0 {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(limit);
        match self.kind {
            Compression::Zlib => DEFLATE.with(|cell| {
                let mut slot = cell.borrow_mut();
                let c = slot.get_or_insert_with(|| {
                    flate2::Compress::new_with_window_bits(
                        flate2::Compression::default(),
                        false,
                        DEFLATE_WINDOW_BITS,
                    )
                });
                c.reset();
                match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                    Ok(flate2::Status::StreamEnd) if out.len() <= limit => Ok(Some(out)),
                    _ => Ok(None),
                }
            }),
            Compression::Zstd => ZSTD.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(
                        zstd::bulk::Compressor::new(ZSTD_LEVEL)
                            .map_err(|e| Error::io_plain("cannot start zstd", e))?,
                    );
                }
                let Some(c) = slot.as_mut() else {
                    return Ok(None);
                };
                // An error here means the frame did not fit in `limit`: store the cluster as it is.
                match c.compress_to_buffer(input, &mut out) {
                    Ok(n) if n <= limit => Ok(Some(out)),
                    _ => Ok(None),
                }
            }),
        }
    }
}
