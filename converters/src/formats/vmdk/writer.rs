//! VMDK writer: `-o subformat=monolithicSparse|monolithicFlat|twoGbMaxExtentSparse|twoGbMaxExtentFlat|
//! streamOptimized` (default monolithicSparse, as qemu-img), `adapter_type`, `hwversion`, `compat6`,
//! `toolsversion`, `zeroed_grain`, with qemu-img's meanings.
//!
//! - monolithicSparse: header, embedded descriptor (20 sectors), redundant GD + GTs, GD + GTs, then 64 KiB
//!   grains in guest order (qemu's layout). On a local file grains are allocated as data arrives and each GT is
//!   written once the data has passed it; on a stream the GTs are computed from the plan and written first.
//! - streamOptimized: VMware's stream layout (VMDK 5.0 "Stream-Optimized Compressed Sparse Extents", as
//!   VMware's own stream writer emits it, not qemu's): version 3 header with `gdOffset = GD_AT_END`, the
//!   descriptor, the first grain at `overHead` (64 KiB), one grain marker + zlib data per non-zero grain, a
//!   GT marker + GT after the grains of each GT, then GD marker + GD, footer marker + footer (the header with
//!   the real `gdOffset`), end-of-stream marker. Always written in file order, so it goes to a pipe too;
//!   grains are compressed on the engine's workers.
//! - monolithicFlat / twoGbMaxExtent*: the output file is the descriptor (written last); extents are
//!   `<name>-flat.vmdk`, `<name>-f001.vmdk`.. or `<name>-s001.vmdk`.. beside it (qemu's names), 2 GiB each for
//!   the split types. These need a local output.

use std::sync::Arc;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::descriptor::{self, ExtentType, NewDescriptor};
use super::sparse::{
    COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
    GD_AT_END, MAGIC, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, NEWLINE_CHARS, RawMarker,
    RawSparseHeader, SECTOR,
};
use crate::error::{Error, Result};
use crate::sink::Sink;
use crate::writer::{
    ChunkCompressor, FormatWriter, OptionKind, OptionSpec, Plan, Run, WriterOptions,
};

/// Grain size written: 128 sectors (64 KiB), as qemu and VMware write.
pub const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
/// Grain table entries per table written (VMDK 5.0: 512).
pub const GTES_PER_GT: u64 = 512;
/// Sectors of one grain table (512 × 4 bytes).
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
/// Sectors reserved for the embedded descriptor of monolithicSparse (qemu: `desc_size = 20`).
const DESC_SECTORS: u64 = 20;
/// Extent size of the twoGbMaxExtent types (qemu `split_size`).
pub const SPLIT_SIZE: u64 = 2 << 30;
/// Granularity of flat outputs: zero runs of 4 KiB or more stay holes (qemu-img's default `-S`).
const FLAT_GRANULARITY: u64 = 4096;
/// GTEs are 32-bit sector numbers: a sparse extent file ends before 2^32 sectors (2 TiB).
const MAX_SECTOR: u64 = u32::MAX as u64;

/// The VMDK subformats qemu-img writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor plus one flat file.
    MonolithicFlat,
    /// A descriptor plus 2 GiB sparse files.
    TwoGbMaxExtentSparse,
    /// A descriptor plus 2 GiB flat files.
    TwoGbMaxExtentFlat,
    /// One compressed, stream-ordered sparse file.
    StreamOptimized,
}

impl Subformat {
    fn parse(s: &str) -> Result<Subformat> {
        Ok(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            other => {
                return Err(Error::input(format!(
                    "option subformat: '{other}' is not one of monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized"
                )));
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    fn is_flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }
}

/// Writes VMDK images.
pub struct VmdkWriter {
    sub: Subformat,
    adapter: String,
    hw_version: String,
    tools_version: String,
    zeroed_grain: bool,
    cid: u32,
    virtual_size: u64,
    state: State,
}

enum State {
    Idle,
    Sparse(SparseOut),
    Stream(Box<StreamOut>),
    Split(SplitOut),
}

/// The vmdk `-o` options this writer takes (qemu-img's names; `-o help` prints them).
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "adapter_type",
        kind: OptionKind::Str,
        default: "ide",
        help: "Virtual adapter type: ide, lsilogic, buslogic or legacyESX",
    },
    OptionSpec {
        name: "compat6",
        kind: OptionKind::Bool,
        default: "off",
        help: "VMDK version 6 image (hardware version 6)",
    },
    OptionSpec {
        name: "hwversion",
        kind: OptionKind::Str,
        default: "4",
        help: "VMDK hardware version",
    },
    OptionSpec {
        name: "subformat",
        kind: OptionKind::Str,
        default: "monolithicSparse",
        help: "monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized (compressed)",
    },
    OptionSpec {
        name: "toolsversion",
        kind: OptionKind::Str,
        default: "2147483647",
        help: "VMware guest tools version",
    },
    OptionSpec {
        name: "zeroed_grain",
        kind: OptionKind::Bool,
        default: "off",
        help: "Enable efficient zero writes using the zeroed-grain GTE feature (sparse subformats)",
    },
];

impl VmdkWriter {
    /// Takes the vmdk `-o` options qemu-img knows.
    pub fn new(opts: &mut WriterOptions) -> Result<Self> {
        let sub = match opts.take("subformat") {
            Some(s) => Subformat::parse(&s)?,
            None => Subformat::MonolithicSparse,
        };
        let adapter = opts.take("adapter_type").unwrap_or_else(|| "ide".into());
        if !matches!(
            adapter.as_str(),
            "ide" | "lsilogic" | "buslogic" | "legacyESX"
        ) {
            return Err(Error::input(format!(
                "option adapter_type: '{adapter}' is not one of ide, lsilogic, buslogic, legacyESX"
            )));
        }
        let hw = opts.take("hwversion").filter(|v| v != "undefined");
        let compat6 = opts.take_bool("compat6")?.unwrap_or(false);
        let hw_version = match (compat6, hw) {
            (true, Some(_)) => {
                return Err(Error::input("compat6 cannot be enabled with hwversion set"));
            }
            (true, None) => "6".to_string(),
            (false, Some(v)) => v,
            (false, None) => "4".to_string(),
        };
        let tools_version = opts
            .take("toolsversion")
            .unwrap_or_else(|| "2147483647".into());
        for (k, v) in [("hwversion", &hw_version), ("toolsversion", &tools_version)] {
            if v.contains(['"', '\n', '\r']) {
                return Err(Error::input(format!(
                    "option {k}: quotes and newlines cannot go into a descriptor"
                )));
            }
        }
        let zeroed_grain = opts.take_bool("zeroed_grain")?.unwrap_or(false);
        if zeroed_grain && sub.is_flat() {
            return Err(Error::input("Flat image can't enable zeroed grain"));
        }
        let rnd = uuid::Uuid::new_v4();
        let b = rnd.as_bytes();
        let mut cid = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        // ffffffff means "no parent" and fffffffe is reserved by VMware tools: never use them.
        if cid >= 0xffff_fffe {
            cid = 0x1234_5678;
        }
        Ok(VmdkWriter {
            sub,
            adapter,
            hw_version,
            tools_version,
            zeroed_grain,
            cid,
            virtual_size: 0,
            state: State::Idle,
        })
    }

    /// The chosen subformat.
    pub fn subformat(&self) -> Subformat {
        self.sub
    }

    fn descriptor(&self, extents: Vec<(u64, ExtentType, String, Option<u64>)>) -> Result<String> {
        let (cyl, heads, secs) = descriptor::geometry(self.virtual_size, &self.adapter);
        let r = uuid::Uuid::new_v4();
        let b = r.as_bytes();
        let long_cid = format!(
            "{}{:08x}",
            b[..12]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
            self.cid
        );
        let mut u = String::new();
        for (i, x) in uuid::Uuid::new_v4().as_bytes().iter().enumerate() {
            if i > 0 {
                u.push(if i == 8 { '-' } else { ' ' });
            }
            u.push_str(&format!("{x:02x}"));
        }
        descriptor::render(&NewDescriptor {
            cid: self.cid,
            create_type: self.sub.name(),
            extents,
            ddb: vec![
                ("virtualHWVersion", self.hw_version.clone()),
                ("geometry.cylinders", cyl.to_string()),
                ("geometry.heads", heads.to_string()),
                ("geometry.sectors", secs.to_string()),
                ("adapterType", self.adapter.clone()),
                ("toolsVersion", self.tools_version.clone()),
                ("longContentID", long_cid),
                ("uuid", u),
            ],
        })
    }
}

/// qemu's `filename_decompose`: "disk.vmdk" -> ("disk", ".vmdk"). The reader's extent-name rule uses it too.
pub(super) fn split_name(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) => name.split_at(i),
        None => (name, ""),
    }
}

impl FormatWriter for VmdkWriter {
    fn granularity(&self) -> u64 {
        if self.sub.is_flat() {
            FLAT_GRANULARITY
        } else {
            GRAIN
        }
    }

    fn compressor(&self) -> Option<Arc<dyn ChunkCompressor>> {
        (self.sub == Subformat::StreamOptimized)
            .then(|| Arc::new(GrainCompressor) as Arc<dyn ChunkCompressor>)
    }

    fn output_virtual_size(&self, source_size: u64) -> Result<u64> {
        // Capacities are whole sectors (qemu rounds the size up to 512 bytes).
        source_size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| Error::input("virtual size too large"))
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        self.virtual_size = plan.virtual_size;
        if plan.virtual_size > super::sparse::MAX_CAPACITY_BYTES {
            return Err(Error::input("VMDK output is limited to 64 TiB"));
        }
        let capacity = plan.virtual_size / SECTOR;
        let own_name = sink.file_name();
        let name = own_name.clone().unwrap_or_else(|| "disk.vmdk".to_string());
        self.state = match self.sub {
            Subformat::MonolithicSparse => {
                let desc = self.descriptor(vec![(capacity, ExtentType::Sparse, name, None)])?;
                let layout = SparseLayout::new(capacity, true);
                let mut out = if sink.can_seek_back() {
                    SparseOut::lazy(layout)
                } else {
                    SparseOut::planned(layout, plan.runs)?
                };
                let (version, flags) = if self.zeroed_grain {
                    (2, FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN)
                } else {
                    (1, FLAG_NL_DETECT | FLAG_RGD)
                };
                out.begin(sink, Some(desc.as_bytes()), version, flags)?;
                State::Sparse(out)
            }
            Subformat::StreamOptimized => {
                let desc = self.descriptor(vec![(capacity, ExtentType::Sparse, name, None)])?;
                let mut out = StreamOut::new(capacity, desc.len() as u64, self.zeroed_grain);
                out.begin(sink, desc.as_bytes())?;
                State::Stream(Box::new(out))
            }
            Subformat::MonolithicFlat
            | Subformat::TwoGbMaxExtentFlat
            | Subformat::TwoGbMaxExtentSparse => {
                let Some(main) = own_name else {
                    return Err(Error::input(format!(
                        "VMDK subformat {} writes several files: write it to a local file, not a stream",
                        self.sub.name()
                    )));
                };
                let (prefix, postfix) = split_name(&main);
                let mut pieces = Vec::new();
                if self.sub == Subformat::MonolithicFlat {
                    if plan.virtual_size > 0 {
                        pieces.push((0, plan.virtual_size, format!("{prefix}-flat{postfix}")));
                    }
                } else {
                    let letter = if self.sub.is_flat() { 'f' } else { 's' };
                    let mut at = 0u64;
                    let mut idx = 1u32;
                    while at < plan.virtual_size {
                        let len = (plan.virtual_size - at).min(SPLIT_SIZE);
                        pieces.push((at, len, format!("{prefix}-{letter}{idx:03}{postfix}")));
                        at += len;
                        idx += 1;
                    }
                }
                State::Split(SplitOut {
                    sparse: !self.sub.is_flat(),
                    pieces,
                    cur: None,
                    created: 0,
                })
            }
        };
        Ok(())
    }

    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        match (&mut self.state, run) {
            (_, Run::Zero(_)) => Ok(()),
            (State::Sparse(s), Run::Data(d)) => s.write(sink, offset, d),
            (State::Split(s), Run::Data(d)) => s.write(sink, offset, d),
            (State::Stream(s), Run::Compressed { data, len }) => {
                if !offset.is_multiple_of(GRAIN) || len > GRAIN {
                    return Err(Error::input(
                        "internal error: compressed VMDK run is not one grain",
                    ));
                }
                s.grain(sink, offset / GRAIN, data)
            }
            (State::Stream(s), Run::Data(d)) => {
                // Stored chunks still go out compressed: VMware requires every grain deflated.
                if !offset.is_multiple_of(GRAIN) {
                    return Err(Error::input(
                        "internal error: VMDK stream data is not grain-aligned",
                    ));
                }
                for (i, chunk) in d.chunks(GRAIN as usize).enumerate() {
                    let c = deflate_grain(chunk)?;
                    s.grain(sink, offset / GRAIN + i as u64, &c)?;
                }
                Ok(())
            }
            (State::Idle, _) => Err(Error::input("internal error: VMDK writer not started")),
            (_, Run::Compressed { .. }) => Err(Error::input(
                "internal error: compressed data for an uncompressed VMDK subformat",
            )),
        }
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => Err(Error::input("internal error: VMDK writer not started")),
            State::Sparse(mut s) => s.finish(sink),
            State::Stream(mut s) => s.finish(sink),
            State::Split(mut s) => {
                s.finish(sink)?;
                let extents = s
                    .pieces
                    .iter()
                    .map(|(_, len, name)| {
                        let kind = if s.sparse {
                            ExtentType::Sparse
                        } else {
                            ExtentType::Flat
                        };
                        let offset = (!s.sparse).then_some(0);
                        (len.div_ceil(SECTOR), kind, name.clone(), offset)
                    })
                    .collect();
                let desc = self.descriptor(extents)?;
                sink.write_at(0, desc.as_bytes())?;
                sink.finish(desc.len() as u64)?;
                Ok(desc.len() as u64)
            }
        }
    }
}

/// Compresses grains on the engine's workers: zlib (RFC 1950) at the default level, as VMware's stream
/// writer does. The last grain of a disk that is not a whole number of grains is padded to a full grain.
struct GrainCompressor;

impl ChunkCompressor for GrainCompressor {
    fn compress(&self, chunk: &[u8]) -> Result<Option<Vec<u8>>> {
        deflate_grain(chunk).map(Some)
    }
}

thread_local! {
    /// One zlib state per worker thread, reset for every grain (setting one up costs about as much as
    /// compressing a grain of text).
    static ZLIB: std::cell::RefCell<Option<flate2::Compress>> = const { std::cell::RefCell::new(None) };
}

fn deflate_grain(chunk: &[u8]) -> Result<Vec<u8>> {
    static ZERO_GRAIN: [u8; GRAIN as usize] = [0; GRAIN as usize];
    let pad = ZERO_GRAIN
        .get(..(GRAIN as usize).saturating_sub(chunk.len()))
        .unwrap_or(&[]);
    ZLIB.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c =
            slot.get_or_insert_with(|| flate2::Compress::new(flate2::Compression::default(), true));
        c.reset();
        // zlib's deflateBound for a grain is under grain + grain/64 + 64 bytes: one pass almost always.
        let mut out = Vec::with_capacity(chunk.len() + pad.len() + GRAIN as usize / 64 + 64);
        let start = c.total_in();
        loop {
            let consumed = usize::try_from(c.total_in() - start).unwrap_or(usize::MAX);
            let (input, flush) = match consumed.checked_sub(chunk.len()) {
                None => (chunk.get(consumed..).unwrap_or(&[]), pad.is_empty()),
                Some(k) => (pad.get(k..).unwrap_or(&[]), true),
            };
            let flush = if flush {
                flate2::FlushCompress::Finish
            } else {
                flate2::FlushCompress::None
            };
            if out.capacity() - out.len() < 64 {
                out.reserve(GRAIN as usize / 4);
            }
            let status = c
                .compress_vec(input, &mut out, flush)
                .map_err(|e| Error::input(format!("cannot compress a VMDK grain: {e}")))?;
            if status == flate2::Status::StreamEnd {
                return Ok(out);
            }
        }
    })
}

fn header_bytes(h: &RawSparseHeader) -> [u8; 512] {
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    out
}

fn new_header(version: u32, flags: u32, capacity: u64) -> RawSparseHeader {
    let mut h = RawSparseHeader::new_zeroed();
    h.magic = MAGIC;
    h.version = U32::new(version);
    h.flags = U32::new(flags);
    h.capacity = U64::new(capacity);
    h.grain_size = U64::new(GRAIN_SECTORS);
    h.num_gtes_per_gt = U32::new(GTES_PER_GT as u32);
    h.newline_chars = NEWLINE_CHARS;
    h
}

fn marker(val: u64, kind: u32) -> [u8; 512] {
    let m = RawMarker {
        val: U64::new(val),
        size: U32::new(0),
        kind: U32::new(kind),
    };
    let mut out = [0u8; 512];
    out[..16].copy_from_slice(m.as_bytes());
    out
}

fn table_bytes(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn padded(mut v: Vec<u8>) -> Vec<u8> {
    let n = (v.len() as u64).next_multiple_of(SECTOR) as usize;
    v.resize(n, 0);
    v
}

/// Where qemu puts the metadata of a sparse extent (`vmdk_init_extent`): header, optional descriptor
/// (sectors 1-20), redundant GD and its GTs, GD and its GTs, grains from the next 64 KiB boundary.
#[derive(Debug, Clone, Copy)]
struct SparseLayout {
    capacity: u64,
    gt_count: u64,
    gd_sectors: u64,
    with_desc: bool,
    rgd_offset: u64,
    gd_offset: u64,
    grain_offset: u64,
}

impl SparseLayout {
    fn new(capacity: u64, with_desc: bool) -> Self {
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gt_count = grains.div_ceil(GTES_PER_GT);
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let rgd_offset = if with_desc { 1 + DESC_SECTORS } else { 1 };
        let gd_offset = rgd_offset + gd_sectors + gt_count * GT_SECTORS;
        let grain_offset =
            (gd_offset + gd_sectors + gt_count * GT_SECTORS).next_multiple_of(GRAIN_SECTORS);
        SparseLayout {
            capacity,
            gt_count,
            gd_sectors,
            with_desc,
            rgd_offset,
            gd_offset,
            grain_offset,
        }
    }

    fn gd_bytes(&self, redundant: bool) -> Vec<u8> {
        let base = if redundant {
            self.rgd_offset
        } else {
            self.gd_offset
        } + self.gd_sectors;
        let entries: Vec<u32> = (0..self.gt_count)
            .map(|i| (base + i * GT_SECTORS) as u32)
            .collect();
        padded(table_bytes(&entries))
    }

    fn gt_sector(&self, index: u64, redundant: bool) -> u64 {
        let base = if redundant {
            self.rgd_offset
        } else {
            self.gd_offset
        };
        base + self.gd_sectors + index * GT_SECTORS
    }
}

enum SparseMode {
    /// Local file: grains allocated as data arrives; the GT being filled is written when data moves past it.
    Lazy {
        next: u64,
        gt: Option<(u64, Vec<u32>)>,
        last: Option<(u64, u64)>,
    },
    /// Stream: every planned grain has a sector from the start; (first grain, end grain, first sector).
    Planned {
        runs: Vec<(u64, u64, u64)>,
        end: u64,
    },
}

/// One sparse extent being written into one sink.
struct SparseOut {
    layout: SparseLayout,
    mode: SparseMode,
}

impl SparseOut {
    fn lazy(layout: SparseLayout) -> Self {
        SparseOut {
            mode: SparseMode::Lazy {
                next: layout.grain_offset,
                gt: None,
                last: None,
            },
            layout,
        }
    }

    fn planned(layout: SparseLayout, runs: &[(u64, u64)]) -> Result<Self> {
        let mut out = Vec::with_capacity(runs.len());
        let mut sector = layout.grain_offset;
        for &(s, e) in runs {
            let (g0, g1) = (s / GRAIN, e.div_ceil(GRAIN));
            let g0 = match out.last() {
                Some(&(_, prev_end, _)) => g0.max(prev_end),
                None => g0,
            };
            if g1 <= g0 {
                continue;
            }
            out.push((g0, g1, sector));
            sector += (g1 - g0) * GRAIN_SECTORS;
        }
        if sector > MAX_SECTOR {
            return Err(too_big());
        }
        Ok(SparseOut {
            layout,
            mode: SparseMode::Planned {
                runs: out,
                end: sector,
            },
        })
    }

    fn begin(
        &mut self,
        sink: &mut dyn Sink,
        desc: Option<&[u8]>,
        version: u32,
        flags: u32,
    ) -> Result<()> {
        let l = self.layout;
        let mut h = new_header(version, flags, l.capacity);
        if l.with_desc {
            h.descriptor_offset = U64::new(1);
            h.descriptor_size = U64::new(DESC_SECTORS);
        }
        h.rgd_offset = U64::new(l.rgd_offset);
        h.gd_offset = U64::new(l.gd_offset);
        h.over_head = U64::new(l.grain_offset);
        if l.grain_offset > MAX_SECTOR {
            return Err(too_big());
        }
        sink.write_at(0, &header_bytes(&h))?;
        if let Some(d) = desc {
            if d.len() as u64 > DESC_SECTORS * SECTOR {
                return Err(Error::input(
                    "internal error: VMDK descriptor larger than 20 sectors",
                ));
            }
            sink.write_at(SECTOR, d)?;
        }
        sink.write_at(l.rgd_offset * SECTOR, &l.gd_bytes(true))?;
        if let SparseMode::Planned { runs, .. } = &self.mode {
            // Stream order: redundant GTs, GD, GTs. All-zero tables are gaps the sink fills.
            for_each_planned_table(runs, |i, t| sink.write_at(l.gt_sector(i, true) * SECTOR, t))?;
            sink.write_at(l.gd_offset * SECTOR, &l.gd_bytes(false))?;
            for_each_planned_table(runs, |i, t| {
                sink.write_at(l.gt_sector(i, false) * SECTOR, t)
            })?;
        } else {
            sink.write_at(l.gd_offset * SECTOR, &l.gd_bytes(false))?;
        }
        Ok(())
    }

    fn sector_for(&mut self, sink: &mut dyn Sink, grain: u64) -> Result<u64> {
        let layout = self.layout;
        match &mut self.mode {
            SparseMode::Planned { runs, .. } => {
                let i = runs.partition_point(|r| r.1 <= grain);
                match runs.get(i) {
                    Some(&(g0, _, s)) if g0 <= grain => Ok(s + (grain - g0) * GRAIN_SECTORS),
                    _ => Err(Error::input(format!(
                        "internal error: VMDK grain {grain} was not in the plan"
                    ))),
                }
            }
            SparseMode::Lazy { next, gt, last } => {
                if let Some((g, s)) = *last
                    && g == grain
                {
                    return Ok(s);
                }
                let ti = grain / GTES_PER_GT;
                if let Some((cur, _)) = gt
                    && *cur != ti
                    && let Some((cur, entries)) = gt.take()
                {
                    write_table(sink, &layout, cur, &entries)?;
                }
                let table = gt.get_or_insert_with(|| (ti, vec![0u32; GTES_PER_GT as usize]));
                let s = *next;
                if s + GRAIN_SECTORS > MAX_SECTOR {
                    return Err(too_big());
                }
                *next += GRAIN_SECTORS;
                if let Some(e) = table.1.get_mut((grain % GTES_PER_GT) as usize) {
                    *e = s as u32;
                }
                *last = Some((grain, s));
                Ok(s)
            }
        }
    }

    /// Writes `data` at extent-relative byte `offset`.
    fn write(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        // Grains allocated one after another are contiguous in the file: one write per contiguous piece.
        let mut pending: Option<(u64, usize, usize)> = None;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let grain = pos / GRAIN;
            let within = pos % GRAIN;
            let n = ((GRAIN - within) as usize).min(data.len() - done);
            let s = self.sector_for(sink, grain)?;
            let at = s * SECTOR + within;
            match &mut pending {
                Some((off, from, len)) if *off + (*len as u64) == at && *from + *len == done => {
                    *len += n
                }
                _ => {
                    if let Some((off, from, len)) = pending.take() {
                        sink.write_at(off, &data[from..from + len])?;
                    }
                    pending = Some((at, done, n));
                }
            }
            done += n;
        }
        if let Some((off, from, len)) = pending {
            sink.write_at(off, &data[from..from + len])?;
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        let layout = self.layout;
        let end = match &mut self.mode {
            SparseMode::Lazy { next, gt, .. } => {
                if let Some((i, entries)) = gt.take() {
                    write_table(sink, &layout, i, &entries)?;
                }
                *next
            }
            SparseMode::Planned { end, .. } => *end,
        };
        let len = end * SECTOR;
        sink.finish(len)?;
        Ok(len)
    }
}

fn too_big() -> Error {
    Error::limit(
        "vmdk",
        "a sparse extent file cannot grow past 2 TiB (grain table entries are 32-bit sectors)",
    )
}

/// Writes grain table `index` to both its places (primary and redundant).
fn write_table(sink: &mut dyn Sink, l: &SparseLayout, index: u64, entries: &[u32]) -> Result<()> {
    let bytes = table_bytes(entries);
    sink.write_at(l.gt_sector(index, true) * SECTOR, &bytes)?;
    sink.write_at(l.gt_sector(index, false) * SECTOR, &bytes)
}

/// Calls `f(table index, table bytes)` for every grain table that maps a planned grain, in order.
fn for_each_planned_table(
    runs: &[(u64, u64, u64)],
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut cur: Option<(u64, Vec<u32>)> = None;
    for &(g0, g1, first) in runs {
        for g in g0..g1 {
            let ti = g / GTES_PER_GT;
            if cur.as_ref().is_some_and(|c| c.0 != ti)
                && let Some((i, t)) = cur.take()
            {
                f(i, &table_bytes(&t))?;
            }
            let t = cur.get_or_insert_with(|| (ti, vec![0u32; GTES_PER_GT as usize]));
            if let Some(e) = t.1.get_mut((g % GTES_PER_GT) as usize) {
                *e = (first + (g - g0) * GRAIN_SECTORS) as u32;
            }
        }
    }
    if let Some((i, t)) = cur {
        f(i, &table_bytes(&t))?;
    }
    Ok(())
}

/// A stream-optimized extent written strictly in file order.
struct StreamOut {
    header: RawSparseHeader,
    pos: u64,
    gd: Vec<u32>,
    gt: Option<(u64, Vec<u32>)>,
}

impl StreamOut {
    fn new(capacity: u64, desc_len: u64, zeroed_grain: bool) -> Self {
        // VMware's stream writer: version 3, NL detection + compressed + markers, no redundant GD.
        let mut flags = FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS;
        if zeroed_grain {
            flags |= FLAG_ZERO_GRAIN;
        }
        let mut h = new_header(3, flags, capacity);
        let desc_sectors = desc_len.div_ceil(SECTOR);
        h.descriptor_offset = U64::new(1);
        h.descriptor_size = U64::new(desc_sectors);
        h.gd_offset = U64::new(GD_AT_END);
        // The first grain starts on a grain boundary after header and descriptor.
        h.over_head = U64::new((1 + desc_sectors).next_multiple_of(GRAIN_SECTORS));
        h.compress_algorithm = U16::new(COMPRESSION_DEFLATE);
        let gt_count = capacity.div_ceil(GRAIN_SECTORS).div_ceil(GTES_PER_GT);
        StreamOut {
            pos: h.over_head.get() * SECTOR,
            header: h,
            gd: vec![0; gt_count as usize],
            gt: None,
        }
    }

    fn begin(&mut self, sink: &mut dyn Sink, desc: &[u8]) -> Result<()> {
        sink.write_at(0, &header_bytes(&self.header))?;
        sink.write_at(SECTOR, desc)
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.pos / SECTOR).map_err(|_| too_big())
    }

    /// Grain marker (LBA, compressed size) + zlib data, padded to a sector.
    fn grain(&mut self, sink: &mut dyn Sink, grain: u64, data: &[u8]) -> Result<()> {
        let ti = grain / GTES_PER_GT;
        if self.gt.as_ref().is_some_and(|g| g.0 != ti) {
            self.flush_gt(sink)?;
        }
        let sector = self.sector()?;
        let t = self
            .gt
            .get_or_insert_with(|| (ti, vec![0u32; GTES_PER_GT as usize]));
        if let Some(e) = t.1.get_mut((grain % GTES_PER_GT) as usize) {
            *e = sector;
        }
        let size = u32::try_from(data.len())
            .map_err(|_| Error::input("internal error: compressed grain too large"))?;
        let mut buf = Vec::with_capacity(data.len() + 12 + 512);
        buf.extend_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        buf.extend_from_slice(data);
        let buf = padded(buf);
        sink.write_at(self.pos, &buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// GT marker (its size in sectors) + the GT; its sector goes into the GD.
    fn flush_gt(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let Some((ti, entries)) = self.gt.take() else {
            return Ok(());
        };
        sink.write_at(self.pos, &marker(GT_SECTORS, MARKER_GT))?;
        self.pos += SECTOR;
        let sector = self.sector()?;
        if let Some(e) = self.gd.get_mut(ti as usize) {
            *e = sector;
        }
        let bytes = padded(table_bytes(&entries));
        sink.write_at(self.pos, &bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        self.flush_gt(sink)?;
        let gd = padded(table_bytes(&self.gd));
        sink.write_at(self.pos, &marker(gd.len() as u64 / SECTOR, MARKER_GD))?;
        self.pos += SECTOR;
        let gd_sector = self.pos / SECTOR;
        sink.write_at(self.pos, &gd)?;
        self.pos += gd.len() as u64;
        sink.write_at(self.pos, &marker(1, MARKER_FOOTER))?;
        self.pos += SECTOR;
        let mut footer = self.header.clone();
        footer.gd_offset = U64::new(gd_sector);
        sink.write_at(self.pos, &header_bytes(&footer))?;
        self.pos += SECTOR;
        sink.write_at(self.pos, &marker(0, MARKER_EOS))?;
        self.pos += SECTOR;
        sink.finish(self.pos)?;
        Ok(self.pos)
    }
}

/// monolithicFlat and twoGbMaxExtent*: extent files beside the descriptor, created in order as data reaches
/// them (only one open at a time).
struct SplitOut {
    sparse: bool,
    /// (guest start, length, file name).
    pieces: Vec<(u64, u64, String)>,
    cur: Option<(usize, Box<dyn Sink>, Option<SparseOut>)>,
    created: usize,
}

impl SplitOut {
    fn close_current(&mut self) -> Result<()> {
        if let Some((i, mut sink, sparse)) = self.cur.take() {
            match sparse {
                Some(mut s) => {
                    s.finish(sink.as_mut())?;
                }
                None => {
                    let len = self.pieces.get(i).map_or(0, |p| p.1);
                    sink.finish(len)?;
                }
            }
        }
        Ok(())
    }

    /// Makes piece `k` the open one, creating (and closing) every piece before it.
    fn open(&mut self, main: &mut dyn Sink, k: usize) -> Result<()> {
        if self.cur.as_ref().is_some_and(|c| c.0 == k) {
            return Ok(());
        }
        while self.created <= k {
            self.close_current()?;
            let i = self.created;
            let (_, len, name) = self
                .pieces
                .get(i)
                .cloned()
                .ok_or_else(|| Error::input("internal error: VMDK extent index"))?;
            let mut sink = main.sibling(&name)?;
            let sparse = if self.sparse {
                let mut s = SparseOut::lazy(SparseLayout::new(len.div_ceil(SECTOR), false));
                s.begin(sink.as_mut(), None, 1, FLAG_NL_DETECT | FLAG_RGD)?;
                Some(s)
            } else {
                None
            };
            self.cur = Some((i, sink, sparse));
            self.created += 1;
        }
        Ok(())
    }

    fn write(&mut self, main: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let k = self.pieces.partition_point(|p| p.0 + p.1 <= pos);
            let (start, len, _) = self
                .pieces
                .get(k)
                .cloned()
                .ok_or_else(|| Error::input("internal error: VMDK write past the end"))?;
            let n = ((start + len - pos) as usize).min(data.len() - done);
            self.open(main, k)?;
            if let Some((_, sink, sparse)) = &mut self.cur {
                let piece = &data[done..done + n];
                match sparse {
                    Some(s) => s.write(sink.as_mut(), pos - start, piece)?,
                    None => sink.write_at(pos - start, piece)?,
                }
            }
            done += n;
        }
        Ok(())
    }

    fn finish(&mut self, main: &mut dyn Sink) -> Result<()> {
        if !self.pieces.is_empty() {
            self.open(main, self.pieces.len() - 1)?;
        }
        self.close_current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu() {
        // 1 GiB: 16384 grains, 32 GTs of 4 sectors, a 1-sector GD; rgd 21, gd 150, grains at 384.
        let l = SparseLayout::new(2 * 1024 * 1024, true);
        assert_eq!(l.gt_count, 32);
        assert_eq!(l.rgd_offset, 21);
        assert_eq!(l.gd_offset, 21 + 1 + 32 * 4);
        assert_eq!(l.grain_offset, 384);
    }

    #[test]
    fn options() {
        let mut o = WriterOptions::default();
        o.parse_into("subformat=streamOptimized,adapter_type=lsilogic,compat6=on")
            .unwrap();
        let w = VmdkWriter::new(&mut o).unwrap();
        assert_eq!(w.subformat(), Subformat::StreamOptimized);
        assert_eq!(w.hw_version, "6");
        o.finish("vmdk").unwrap();
        let mut o = WriterOptions::default();
        o.parse_into("compat6=on,hwversion=7").unwrap();
        assert!(VmdkWriter::new(&mut o).is_err());
        let mut o = WriterOptions::default();
        o.parse_into("subformat=monolithicFlat,zeroed_grain=on")
            .unwrap();
        assert!(VmdkWriter::new(&mut o).is_err());
        let mut o = WriterOptions::default();
        o.parse_into("subformat=seSparse").unwrap();
        assert!(VmdkWriter::new(&mut o).is_err());
    }
}
