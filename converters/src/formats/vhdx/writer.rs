//! `VhdxWriter`: dynamic or fixed VHDX output (MS-VHDX; layout choices follow qemu's `vhdx_co_create`).
//!
//! File layout: header section (file identifier, two headers, two identical region tables) in the first MiB, an
//! empty log at 1 MiB, the metadata region, the BAT region, then payload blocks in guest order.

use super::bat::{
    Geometry, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_ZERO,
};
use super::header::{
    BAT_GUID, FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SECTION_SIZE, HEADER_SIGNATURE, HEADER_SIZE,
    METADATA_GUID, REGION_REQUIRED, REGION_SIGNATURE, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE,
    RawHeader, RawRegionEntry, RawRegionTableHeader,
};
use super::metadata::{
    FILE_PARAMETERS, FLAG_IS_REQUIRED, FLAG_IS_VIRTUAL_DISK, LOGICAL_SECTOR_SIZE, MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE, METADATA_SIGNATURE, MIN_BLOCK_SIZE, PAGE_83_DATA,
    PARAM_LEAVE_BLOCKS_ALLOCATED, PHYSICAL_SECTOR_SIZE, RawEntry, RawTableHeader, TABLE_SIZE,
    VIRTUAL_DISK_SIZE,
};
use super::{Guid, MIB, checksum};
use crate::error::{Error, Result};
use crate::sink::Sink;
use crate::writer::{FormatWriter, OptionKind, OptionSpec, Plan, Run, WriterOptions};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32, U64};

/// The log starts right after the header section (qemu `VHDX_HEADER_SECTION_END`).
const LOG_OFFSET: u64 = HEADER_SECTION_SIZE;
/// Metadata region size (qemu: "min size, and more than enough").
const METADATA_REGION_SIZE: u64 = MIB;
/// Bytes of BAT serialised at a time.
const BAT_WRITE_CHUNK: u64 = MIB;

/// Block size qemu picks when none is given (`vhdx_co_create`): larger disks get larger blocks.
fn default_block_size(virtual_size: u64) -> u64 {
    if virtual_size > 32 << 40 {
        64 * MIB
    } else if virtual_size > 100 << 30 {
        32 * MIB
    } else if virtual_size > 1 << 30 {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// Writes a VHDX image.
pub struct VhdxWriter {
    fixed: bool,
    block_size: Option<u64>,
    log_size: u64,
    block_state_zero: bool,
    sector_size: u64,
    virtual_size: u64,
    geo: Option<Geometry>,
    /// File offset of each payload block, 0 when not allocated.
    blocks: Vec<u64>,
    next_free: u64,
    data_start: u64,
    metadata_offset: u64,
    bat_offset: u64,
    bat_length: u64,
    streaming: bool,
}

/// The vhdx `-o` options this writer takes (qemu-img's names plus `logical_sector_size`; `-o help` prints them).
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "block_size",
        kind: OptionKind::Size,
        default: "0",
        help: "Block size, a power of two from 1M to 256M; 0 picks it from the image size as qemu does",
    },
    OptionSpec {
        name: "block_state_zero",
        kind: OptionKind::Bool,
        default: "on",
        help: "Mark unwritten payload blocks ZERO rather than NOT_PRESENT (qemu's non-standard default)",
    },
    OptionSpec {
        name: "log_size",
        kind: OptionKind::Size,
        default: "1M",
        help: "Log size, a multiple of 1M, at least 1M",
    },
    OptionSpec {
        name: "logical_sector_size",
        kind: OptionKind::Size,
        default: "512",
        help: "Logical sector size, 512 or 4096 (imgshift's own; qemu always writes 512)",
    },
    OptionSpec {
        name: "subformat",
        kind: OptionKind::Str,
        default: "dynamic",
        help: "VHDX format type: dynamic or fixed",
    },
];

impl VhdxWriter {
    /// Takes qemu's vhdx options: `subformat=dynamic|fixed`, `block_size`, `log_size`, `block_state_zero`; and
    /// `logical_sector_size=512|4096` (imgshift's own; qemu always writes 512).
    pub fn new(opts: &mut WriterOptions) -> Result<Self> {
        let fixed = match opts.take("subformat").as_deref() {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(other) => {
                return Err(Error::input(format!(
                    "vhdx subformat '{other}' (use dynamic or fixed; differencing is not written)"
                )));
            }
        };
        let block_size = match opts.take_size("block_size")? {
            None | Some(0) => None,
            Some(bs) if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) && bs.is_power_of_two() => {
                Some(bs)
            }
            Some(bs) => {
                return Err(Error::input(format!(
                    "vhdx block_size {bs}: must be a power of two from 1M to 256M"
                )));
            }
        };
        let log_size = match opts.take_size("log_size")? {
            None => MIB,
            // qemu: "Log size must be a multiple of 1 MB" and at least 1 MB.
            Some(n)
                if n >= MIB && n.is_multiple_of(MIB) && n <= u64::from(u32::MAX) / MIB * MIB =>
            {
                n
            }
            Some(n) => {
                return Err(Error::input(format!(
                    "vhdx log_size {n}: must be a multiple of 1M, at least 1M"
                )));
            }
        };
        let block_state_zero = opts.take_bool("block_state_zero")?.unwrap_or(true);
        let sector_size = match opts.take_size("logical_sector_size")? {
            None | Some(512) => 512,
            Some(4096) => 4096,
            Some(n) => {
                return Err(Error::input(format!(
                    "vhdx logical_sector_size {n}: must be 512 or 4096"
                )));
            }
        };
        Ok(VhdxWriter {
            fixed,
            block_size,
            log_size,
            block_state_zero,
            sector_size,
            virtual_size: 0,
            geo: None,
            blocks: Vec::new(),
            next_free: 0,
            data_start: 0,
            metadata_offset: 0,
            bat_offset: 0,
            bat_length: 0,
            streaming: false,
        })
    }

    fn geo(&self) -> Result<Geometry> {
        self.geo
            .ok_or_else(|| Error::input("internal error: vhdx writer used before begin"))
    }

    /// Header section, metadata region and BAT.
    fn write_metadata(&self, sink: &mut dyn Sink) -> Result<()> {
        let geo = self.geo()?;
        // File type identifier: signature and an optional UTF-16 creator string (MS-VHDX 2.2.1).
        let mut id = FILE_SIGNATURE.to_vec();
        for u in concat!("imgshift ", env!("CARGO_PKG_VERSION")).encode_utf16() {
            id.extend_from_slice(&u.to_le_bytes());
        }
        sink.write_at(0, &id)?;

        let file_write_guid = Guid::random();
        let data_write_guid = Guid::random();
        for (i, off) in HEADER_OFFSETS.into_iter().enumerate() {
            let raw = RawHeader {
                signature: *HEADER_SIGNATURE,
                checksum: U32::new(0),
                sequence_number: U64::new(i as u64 + 1),
                file_write_guid,
                data_write_guid,
                log_guid: Guid::default(),
                log_version: U16::new(0),
                version: U16::new(1),
                log_length: U32::new(u32::try_from(self.log_size).unwrap_or(u32::MAX)),
                log_offset: U64::new(LOG_OFFSET),
            };
            let mut buf = vec![0u8; HEADER_SIZE];
            buf[..size_of::<RawHeader>()].copy_from_slice(raw.as_bytes());
            let crc = checksum(&buf, 4);
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
            sink.write_at(off, &buf)?;
        }

        let mut rt = vec![0u8; REGION_TABLE_SIZE];
        let hdr = RawRegionTableHeader {
            signature: *REGION_SIGNATURE,
            checksum: U32::new(0),
            entry_count: U32::new(2),
            reserved: U32::new(0),
        };
        let entries = [
            RawRegionEntry {
                guid: BAT_GUID,
                file_offset: U64::new(self.bat_offset),
                length: U32::new(u32::try_from(self.bat_length).unwrap_or(u32::MAX)),
                flags: U32::new(REGION_REQUIRED),
            },
            RawRegionEntry {
                guid: METADATA_GUID,
                file_offset: U64::new(self.metadata_offset),
                length: U32::new(METADATA_REGION_SIZE as u32),
                flags: U32::new(REGION_REQUIRED),
            },
        ];
        let mut at = 0;
        for piece in std::iter::once(hdr.as_bytes()).chain(entries.iter().map(|e| e.as_bytes())) {
            rt[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        let crc = checksum(&rt, 4);
        rt[4..8].copy_from_slice(&crc.to_le_bytes());
        let used = at;
        for off in REGION_TABLE_OFFSETS {
            sink.write_at(off, &rt[..used])?;
        }

        // Metadata table and items (MS-VHDX 2.6); items start right after the 64 KiB table, as qemu writes them.
        let page83 = Guid::random();
        let params_bits = if self.fixed {
            PARAM_LEAVE_BLOCKS_ALLOCATED
        } else {
            0
        };
        let mut items: Vec<u8> = Vec::new();
        items.extend_from_slice(&(self.block_size_or_default() as u32).to_le_bytes());
        items.extend_from_slice(&params_bits.to_le_bytes());
        items.extend_from_slice(&self.virtual_size.to_le_bytes());
        items.extend_from_slice(&page83.0);
        items.extend_from_slice(&(self.sector_size as u32).to_le_bytes());
        items.extend_from_slice(&(self.sector_size as u32).to_le_bytes());
        let vd = FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK;
        let list = [
            (FILE_PARAMETERS, 8u32, FLAG_IS_REQUIRED),
            (VIRTUAL_DISK_SIZE, 8, vd),
            (PAGE_83_DATA, 16, vd),
            (LOGICAL_SECTOR_SIZE, 4, vd),
            (PHYSICAL_SECTOR_SIZE, 4, vd),
        ];
        let mut table = RawTableHeader {
            signature: *METADATA_SIGNATURE,
            reserved: U16::new(0),
            entry_count: U16::new(list.len() as u16),
            reserved2: [0; 20],
        }
        .as_bytes()
        .to_vec();
        let mut item_off = TABLE_SIZE as u32;
        for (guid, len, flags) in list {
            let e = RawEntry {
                item_id: guid,
                offset: U32::new(item_off),
                length: U32::new(len),
                flags: U32::new(flags),
                reserved: U32::new(0),
            };
            table.extend_from_slice(e.as_bytes());
            item_off += len;
        }
        sink.write_at(self.metadata_offset, &table)?;
        sink.write_at(self.metadata_offset + TABLE_SIZE as u64, &items)?;

        // BAT (MS-VHDX 2.5): payload entries with a (never present) sector bitmap entry after every chunk.
        let unallocated = if self.block_state_zero {
            PAYLOAD_BLOCK_ZERO
        } else {
            PAYLOAD_BLOCK_NOT_PRESENT
        };
        let per_chunk = BAT_WRITE_CHUNK / 8;
        let mut index = 0u64;
        let mut block = 0u64;
        while index < geo.bat_entries {
            let n = per_chunk.min(geo.bat_entries - index);
            let mut buf = Vec::with_capacity((n * 8) as usize);
            for i in index..index + n {
                let entry = if i % (geo.chunk_ratio + 1) == geo.chunk_ratio {
                    0
                } else {
                    let off = self.blocks.get(block as usize).copied().unwrap_or(0);
                    block += 1;
                    if off == 0 {
                        unallocated
                    } else {
                        (off / MIB) << 20 | PAYLOAD_BLOCK_FULLY_PRESENT
                    }
                };
                buf.extend_from_slice(&entry.to_le_bytes());
            }
            sink.write_at(self.bat_offset + index * 8, &buf)?;
            index += n;
        }
        Ok(())
    }

    fn block_size_or_default(&self) -> u64 {
        self.block_size
            .unwrap_or_else(|| default_block_size(self.virtual_size))
    }

    fn file_len(&self) -> u64 {
        self.next_free.max(self.data_start)
    }
}

impl FormatWriter for VhdxWriter {
    fn zero_granule(&self) -> u64 {
        // Zero runs inside an allocated block are left as holes in the file (qemu-img's -S 4k).
        crate::engine::BLOCK_ZERO_GRANULE.min(self.granularity())
    }

    fn granularity(&self) -> u64 {
        // Blocks are 1 MiB or larger and are allocated on their first non-zero MiB.
        MIB
    }

    fn output_virtual_size(&self, source_size: u64) -> Result<u64> {
        // "VirtualDiskSize: MUST be a multiple of the LogicalSectorSize" (MS-VHDX 2.6.2.2).
        let size = source_size
            .checked_next_multiple_of(self.sector_size)
            .ok_or_else(|| Error::input("virtual size overflows"))?;
        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::input(format!(
                "vhdx holds at most 64 TiB; the source is {source_size} bytes"
            )));
        }
        Ok(size)
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        self.virtual_size = self.output_virtual_size(plan.virtual_size)?;
        let bs = self.block_size_or_default();
        self.block_size = Some(bs);
        let geo = Geometry::compute(bs, self.sector_size, self.virtual_size, false);
        self.geo = Some(geo);
        self.metadata_offset = LOG_OFFSET + self.log_size;
        self.bat_offset = self.metadata_offset + METADATA_REGION_SIZE;
        self.bat_length = (geo.bat_entries * 8).div_ceil(MIB).max(1) * MIB;
        if self.bat_length > u64::from(u32::MAX) / MIB * MIB {
            return Err(Error::input(format!(
                "vhdx BAT of {} entries does not fit a region; use a larger block_size",
                geo.bat_entries
            )));
        }
        self.data_start = self.bat_offset + self.bat_length;
        self.next_free = self.data_start;
        let count = usize::try_from(geo.payload_blocks)
            .map_err(|_| Error::input("too many vhdx blocks for memory"))?;
        self.blocks = vec![0; count];
        self.streaming = !sink.can_seek_back();
        if self.fixed {
            // Fixed: every block FULLY_PRESENT at its guest-order position.
            for (i, b) in self.blocks.iter_mut().enumerate() {
                *b = self.data_start + i as u64 * bs;
            }
            self.next_free = self.data_start + geo.payload_blocks * bs;
        } else if self.streaming {
            // Streaming: every block a planned run touches is allocated, in guest order, before any data.
            for &(s, e) in plan.runs {
                if e <= s {
                    continue;
                }
                for block in s / bs..=(e - 1) / bs {
                    if let Some(slot) = self.blocks.get_mut(block as usize)
                        && *slot == 0
                    {
                        *slot = self.next_free;
                        self.next_free += bs;
                    }
                }
            }
        }
        if self.streaming {
            self.write_metadata(sink)?;
        }
        Ok(())
    }

    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        let data = match run {
            Run::Zero(_) => return Ok(()),
            Run::Data(d) => d,
            Run::Compressed { .. } => {
                return Err(Error::input("vhdx output cannot hold compressed data"));
            }
        };
        let bs = self.block_size_or_default();
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let block = at / bs;
            let in_block = at % bs;
            let n = ((bs - in_block) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            let slot = self.blocks.get_mut(block as usize).ok_or_else(|| {
                Error::input(format!(
                    "internal error: data at {at} is past the vhdx virtual size"
                ))
            })?;
            if *slot == 0 {
                if self.streaming {
                    return Err(Error::input(format!(
                        "internal error: data at {at} outside the planned vhdx blocks"
                    )));
                }
                *slot = self.next_free;
                self.next_free += bs;
            }
            sink.write_at(*slot + in_block, piece)?;
            at += n as u64;
            rest = tail;
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        if !self.streaming {
            self.write_metadata(sink)?;
        }
        let len = self.file_len();
        sink.finish(len)?;
        Ok(len)
    }
}
