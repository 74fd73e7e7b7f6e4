//! VHD writer: fixed (data at the guest offset, footer last) and dynamic (footer copy, dynamic header, BAT,
//! blocks in guest order, footer), laid out lazily on a local file or from the plan on a stream.

use std::cell::Cell;

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::meta::{
    self, BAT_UNALLOCATED, Chs, DEFAULT_BLOCK_SIZE, DYN_HEADER_SIZE, DiskType, FMT, FOOTER_SIZE,
    MAX_CHS, MAX_SPARSE_SECTORS, RawDynHeader, RawFooter, SECTOR,
};
use crate::error::{Error, Result};
use crate::sink::Sink;
use crate::writer::{FormatWriter, OptionKind, OptionSpec, Plan, Run, WriterOptions};

/// Largest fixed VHD written: 64 TiB. The format has no limit of its own beyond qemu's 2040 GiB (which qemu
/// also applies to fixed disks); Azure accepts fixed VHDs up to 32 TiB + 512, so imgshift goes beyond qemu.
pub const MAX_FIXED_SIZE: u64 = 64 << 40;

/// Offset of the dynamic header in images we write (right after the footer copy).
const HEADER_OFFSET: u64 = FOOTER_SIZE;
/// Offset of the BAT in images we write (after the 1024-byte header), as qemu.
const BAT_OFFSET: u64 = HEADER_OFFSET + DYN_HEADER_SIZE;

/// How the virtual size is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeMode {
    /// Round up to a CHS geometry; creator "qemu" (qemu-img's default).
    Chs,
    /// Exact `current_size`, maximum geometry, creator "qem2" (qemu-img `force_size=on`).
    Exact,
    /// Round up to a whole MiB, then as `Exact` (Azure: fixed disks of N MiB + 512 bytes).
    Mib,
}

/// The layout chosen for one source size.
#[derive(Debug, Clone, Copy)]
struct Sizing {
    virtual_size: u64,
    chs: Chs,
}

/// State of a dynamic image being written.
struct Dynamic {
    bat: Vec<u32>,
    /// File offset where the next block goes.
    next_free: u64,
    /// Blocks were placed from the plan (streaming) rather than as data arrived.
    planned: bool,
    /// Last block whose bitmap was written (streaming).
    started: Option<u64>,
}

/// Writes a VHD.
pub struct VhdWriter {
    disk_type: DiskType,
    mode: SizeMode,
    block_size: u64,
    /// The sizing computed by `output_virtual_size`, reused by `begin`.
    sized: Cell<Option<Sizing>>,
    sizing: Option<Sizing>,
    footer: Vec<u8>,
    dynamic: Option<Dynamic>,
}

/// The vpc (VHD) `-o` options this writer takes (qemu-img's names; `-o help` prints them).
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "force_size",
        kind: OptionKind::Bool,
        default: "off",
        help: "Use the exact virtual size rather than the nearest CHS-based size (as qemu's force_size)",
    },
    OptionSpec {
        name: "round_to_mib",
        kind: OptionKind::Bool,
        default: "off",
        help: "Round the virtual size up to a whole MiB and store it exactly (what Azure requires)",
    },
    OptionSpec {
        name: "subformat",
        kind: OptionKind::Str,
        default: "dynamic",
        help: "Type of virtual hard disk: dynamic or fixed",
    },
];

impl VhdWriter {
    /// Takes `subformat=dynamic|fixed` (default dynamic), `force_size=on|off` (default off) and
    /// `round_to_mib=on|off` (default off; implies exact sizing).
    pub fn new(opts: &mut WriterOptions) -> Result<Self> {
        let disk_type = match opts.take("subformat").as_deref() {
            None | Some("dynamic") => DiskType::Dynamic,
            Some("fixed") => DiskType::Fixed,
            Some(other) => {
                return Err(Error::input(format!(
                    "option subformat: '{other}' is not dynamic or fixed"
                )));
            }
        };
        let force = opts.take_bool("force_size")?.unwrap_or(false);
        let mib = opts.take_bool("round_to_mib")?.unwrap_or(false);
        let mode = if mib {
            SizeMode::Mib
        } else if force {
            SizeMode::Exact
        } else {
            SizeMode::Chs
        };
        Ok(VhdWriter {
            disk_type,
            mode,
            block_size: DEFAULT_BLOCK_SIZE,
            sized: Cell::new(None),
            sizing: None,
            footer: Vec::new(),
            dynamic: None,
        })
    }

    fn compute_sizing(&self, source_size: u64) -> Result<Sizing> {
        let too_big = || {
            Error::limit(
                FMT,
                format!(
                    "a {} VHD of {source_size} bytes is too large",
                    self.disk_type.name()
                ),
            )
        };
        let sectors = source_size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(too_big)?;
        let sizing = match self.mode {
            SizeMode::Chs => {
                let (chs, virtual_size) = meta::round_to_chs(sectors);
                Sizing { virtual_size, chs }
            }
            SizeMode::Exact => Sizing {
                virtual_size: sectors,
                chs: MAX_CHS,
            },
            SizeMode::Mib => Sizing {
                virtual_size: source_size
                    .checked_next_multiple_of(1 << 20)
                    .ok_or_else(too_big)?,
                chs: MAX_CHS,
            },
        };
        let limit = match self.disk_type {
            DiskType::Fixed => MAX_FIXED_SIZE,
            _ => MAX_SPARSE_SECTORS * SECTOR,
        };
        if sizing.virtual_size > limit {
            return Err(Error::limit(
                FMT,
                format!(
                    "{} bytes is above the {limit}-byte maximum of a {} VHD",
                    sizing.virtual_size,
                    self.disk_type.name()
                ),
            ));
        }
        Ok(sizing)
    }

    fn build_footer(&self, s: Sizing) -> Vec<u8> {
        let mut f = RawFooter::new_zeroed();
        f.cookie = *meta::COOKIE;
        f.features = U32::new(meta::FEATURES_RESERVED);
        f.version = U32::new(meta::FILE_FORMAT_VERSION);
        f.data_offset = U64::new(match self.disk_type {
            DiskType::Fixed => meta::NO_DATA_OFFSET,
            _ => HEADER_OFFSET,
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        f.timestamp =
            U32::new(u32::try_from(now.saturating_sub(meta::VHD_EPOCH_UNIX)).unwrap_or(0));
        // qemu's creator codes, so that qemu (and we) size the disk the way it was meant: "qemu" = by CHS,
        // "qem2" = by current_size.
        f.creator_app = if self.mode == SizeMode::Chs {
            *b"qemu"
        } else {
            *b"qem2"
        };
        // Virtual PC 2007 (5.3), as qemu writes.
        f.creator_version = U32::new(0x0005_0003);
        f.creator_os = *b"Wi2k";
        f.original_size = U64::new(s.virtual_size);
        f.current_size = U64::new(s.virtual_size);
        f.cylinders = U16::new(s.chs.cylinders);
        f.heads = s.chs.heads;
        f.sectors = s.chs.sectors;
        f.disk_type = U32::new(self.disk_type.code());
        f.unique_id = *uuid::Uuid::new_v4().as_bytes();
        let c = meta::checksum(f.as_bytes());
        f.checksum = U32::new(c);
        f.as_bytes().to_vec()
    }

    fn bat_bytes(entries: u64) -> u64 {
        (entries * 4).next_multiple_of(SECTOR)
    }

    fn dyn_header(&self, entries: u64) -> Vec<u8> {
        let mut h = RawDynHeader::new_zeroed();
        h.cookie = *meta::DYN_COOKIE;
        // The spec says 0xFFFFFFFF; MS tools expect all 64 bits set (qemu block/vpc.c).
        h.data_offset = U64::new(u64::MAX);
        h.table_offset = U64::new(BAT_OFFSET);
        h.header_version = U32::new(meta::DYN_HEADER_VERSION);
        h.max_table_entries = U32::new(u32::try_from(entries).unwrap_or(u32::MAX));
        h.block_size = U32::new(u32::try_from(self.block_size).unwrap_or(u32::MAX));
        let c = meta::checksum(h.as_bytes());
        h.checksum = U32::new(c);
        h.as_bytes().to_vec()
    }

    /// Writes the footer copy, dynamic header and BAT.
    fn write_dynamic_metadata(&self, sink: &mut dyn Sink, d: &Dynamic) -> Result<()> {
        sink.write_at(0, &self.footer)?;
        sink.write_at(HEADER_OFFSET, &self.dyn_header(d.bat.len() as u64))?;
        let mut bat = vec![0xFFu8; Self::bat_bytes(d.bat.len() as u64) as usize];
        for (i, e) in d.bat.iter().enumerate() {
            bat[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
        }
        sink.write_at(BAT_OFFSET, &bat)
    }

    fn bitmap_size(&self) -> u64 {
        meta::bitmap_size(self.block_size)
    }

    /// Stores `data` at guest `offset` of a dynamic image (allocating blocks on a local file).
    fn write_dynamic(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        let bs = self.block_size;
        let bitmap_size = self.bitmap_size();
        let bitmap = vec![0xFFu8; bitmap_size as usize];
        let span = bitmap_size + bs;
        let d = self
            .dynamic
            .as_mut()
            .ok_or_else(|| Error::input("internal error: VHD writer not begun"))?;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let idx = at / bs;
            let n = ((idx + 1) * bs - at).min((data.len() - done) as u64) as usize;
            let slot = d
                .bat
                .get_mut(idx as usize)
                .ok_or_else(|| Error::input("internal error: VHD write past the virtual size"))?;
            if *slot == BAT_UNALLOCATED {
                if d.planned {
                    return Err(Error::input(
                        "internal error: data outside the planned VHD blocks",
                    ));
                }
                *slot = u32::try_from(d.next_free / SECTOR)
                    .map_err(|_| Error::limit(FMT, "file offset beyond 2 TiB"))?;
                sink.write_at(d.next_free, &bitmap)?;
                d.next_free += span;
            }
            let block = u64::from(*slot) * SECTOR;
            sink.write_at(block + bitmap_size + (at - idx * bs), &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Streaming: writes the bitmap of every planned block from the last started one up to `idx`.
    fn start_planned_blocks(&mut self, sink: &mut dyn Sink, upto: u64) -> Result<()> {
        let bitmap = vec![0xFFu8; self.bitmap_size() as usize];
        let Some(d) = self.dynamic.as_mut() else {
            return Ok(());
        };
        if !d.planned {
            return Ok(());
        }
        let first = d.started.map_or(0, |s| s + 1);
        for idx in first..=upto.min(d.bat.len() as u64 - 1) {
            let e = d.bat[idx as usize];
            if e != BAT_UNALLOCATED {
                sink.write_at(u64::from(e) * SECTOR, &bitmap)?;
            }
            d.started = Some(idx);
        }
        Ok(())
    }
}

impl FormatWriter for VhdWriter {
    fn zero_granule(&self) -> u64 {
        // Zero runs inside an allocated block are left as holes in the file (qemu-img's -S 4k).
        crate::engine::BLOCK_ZERO_GRANULE.min(self.granularity())
    }

    fn granularity(&self) -> u64 {
        match self.disk_type {
            // A fixed VHD is raw data: holes for zero runs of 4 KiB, as qemu-img's default -S.
            DiskType::Fixed => 4096,
            _ => self.block_size,
        }
    }

    fn output_virtual_size(&self, source_size: u64) -> Result<u64> {
        let s = self.compute_sizing(source_size)?;
        self.sized.set(Some(s));
        Ok(s.virtual_size)
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        let sizing = match self.sized.get() {
            Some(s) if s.virtual_size == plan.virtual_size => s,
            _ => {
                let s = self.compute_sizing(plan.virtual_size)?;
                if s.virtual_size != plan.virtual_size {
                    return Err(Error::input(format!(
                        "internal error: {} bytes is not a VHD size (call output_virtual_size first)",
                        plan.virtual_size
                    )));
                }
                s
            }
        };
        self.sizing = Some(sizing);
        self.footer = self.build_footer(sizing);
        if self.disk_type == DiskType::Fixed {
            return Ok(());
        }
        let entries = sizing.virtual_size.div_ceil(self.block_size);
        let first_block = BAT_OFFSET + Self::bat_bytes(entries);
        let mut d = Dynamic {
            bat: vec![BAT_UNALLOCATED; entries as usize],
            next_free: first_block,
            planned: !sink.can_seek_back(),
            started: None,
        };
        if d.planned {
            let span = self.bitmap_size() + self.block_size;
            for &(s, t) in plan.runs {
                if t <= s {
                    continue;
                }
                for idx in s / self.block_size..=(t - 1) / self.block_size {
                    let slot = d.bat.get_mut(idx as usize).ok_or_else(|| {
                        Error::input("internal error: planned run past the virtual size")
                    })?;
                    if *slot == BAT_UNALLOCATED {
                        *slot = u32::try_from(d.next_free / SECTOR)
                            .map_err(|_| Error::limit(FMT, "file offset beyond 2 TiB"))?;
                        d.next_free += span;
                    }
                }
            }
            self.write_dynamic_metadata(sink, &d)?;
        }
        self.dynamic = Some(d);
        Ok(())
    }

    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        if self.disk_type == DiskType::Fixed {
            return match run {
                Run::Zero(_) => Ok(()),
                Run::Data(d) => sink.write_at(offset, d),
                Run::Compressed { .. } => Err(Error::input("VHD cannot hold compressed data")),
            };
        }
        let len = run.guest_len();
        if len > 0 {
            self.start_planned_blocks(sink, (offset + len - 1) / self.block_size)?;
        }
        match run {
            Run::Zero(_) => Ok(()),
            Run::Data(d) => self.write_dynamic(sink, offset, d),
            Run::Compressed { .. } => Err(Error::input("VHD cannot hold compressed data")),
        }
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        let sizing = self
            .sizing
            .ok_or_else(|| Error::input("internal error: VHD writer not begun"))?;
        let end = match self.disk_type {
            DiskType::Fixed => sizing.virtual_size,
            _ => {
                let last = self.dynamic.as_ref().map_or(0, |d| d.bat.len() as u64);
                if last > 0 {
                    self.start_planned_blocks(sink, last - 1)?;
                }
                let d = self
                    .dynamic
                    .take()
                    .ok_or_else(|| Error::input("internal error: VHD writer not begun"))?;
                if !d.planned {
                    self.write_dynamic_metadata(sink, &d)?;
                }
                d.next_free
            }
        };
        sink.write_at(end, &self.footer)?;
        let total = end + FOOTER_SIZE;
        sink.finish(total)?;
        Ok(total)
    }
}
