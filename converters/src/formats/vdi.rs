//! VDI: VirtualBox Virtual Disk Image, header version 1.1 (VirtualBox `src/VBox/Storage/VDICore.h`; qemu
//! block/vdi.c). No public specification exists; field names follow VDICore.h.
//!
//! Layout: a 512-byte header (pre-header text + signature + version, then `VDIHEADER1`), the block map (one
//! little-endian u32 per block: the index of its data block, `0xFFFFFFFF` never allocated, `0xFFFFFFFE`
//! discarded — both read as zeros), then data blocks at `offset_data + index × block_size`.
//!
//! Read: normal (dynamic, type 1) and fixed (static, type 2) images. Refused: versions other than 1.1,
//! undo/differencing images (types 3, 4, or a non-null parent/link UUID), `block_extra` data, a sector size
//! other than 512, block sizes that are not a power of two in 4 KiB..256 MiB, block map entries that are not
//! below `blocks_allocated` or whose block lies past the end of the file. Write: dynamic, and static with
//! `-o static=on` (qemu-img's option).

use std::sync::Arc;

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;
use crate::sink::Sink;
use crate::source::{CheckReport, DiskSource, HostExtent, ImageInfo, check_range};
use crate::storage::Storage;
use crate::writer::{FormatWriter, OptionKind, OptionSpec, Plan, Run, WriterOptions};

const FMT: &str = "vdi";

/// Image signature at offset 0x40 (VDICore.h `VDI_IMAGE_SIGNATURE`).
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1 (VDICore.h `VDI_IMAGE_VERSION`; major in the high 16 bits).
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Header text VirtualBox writes (any text is accepted on read; qemu writes its own).
pub const HEADER_TEXT: &[u8] = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
/// Size of `VDIHEADER1` as qemu writes it; VirtualBox writes 0x190 (`VDIHEADER1PLUS`, with LCHS geometry).
pub const HEADER1_SIZE: u32 = 0x180;
/// Offset of `VDIHEADER1` (after the 64-byte text, signature and version).
const PRE_HEADER_SIZE: u32 = 0x48;
/// The only sector size (qemu: "sector size is not 512").
pub const SECTOR: u64 = 512;
/// Block map entry of a block never allocated (`VDI_IMAGE_BLOCK_FREE`): reads as zeros.
pub const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Block map entry of a discarded block (`VDI_IMAGE_BLOCK_ZERO`): reads as zeros.
pub const BLOCK_ZERO: u32 = 0xFFFF_FFFE;
/// Image type "normal" (dynamically growing).
pub const TYPE_NORMAL: u32 = 1;
/// Image type "fixed" (static, preallocated).
pub const TYPE_FIXED: u32 = 2;
/// Default block size: 1 MiB (VDICore.h `VDI_IMAGE_DEFAULT_BLOCK_SIZE`; qemu accepts nothing else).
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u64 = 4096;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Most block map entries read into memory: 8 Mi (32 MiB of map, 8 TiB at 1 MiB blocks). qemu's own bound,
/// `VDI_BLOCKS_IN_IMAGE_MAX`, allows a 2 GiB map.
pub const MAX_BLOCKS: u64 = 8 << 20;
/// Data blocks start on this boundary in images we write (VirtualBox aligns data to 1 MiB; qemu does not).
const DATA_ALIGN: u64 = 1 << 20;

/// The 512-byte header as stored, little-endian (VDICore.h `VDIPREHEADER` + `VDIHEADER1`; qemu `VdiHeader`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone)]
#[repr(C)]
pub struct RawHeader {
    /// Free text, NUL-padded.
    pub text: [u8; 64],
    /// `SIGNATURE`.
    pub signature: U32,
    /// `VERSION_1_1`.
    pub version: U32,
    /// Size of the header that follows (0x180 or 0x190).
    pub header_size: U32,
    /// 1 normal, 2 fixed, 3 undo, 4 differencing.
    pub image_type: U32,
    /// Image flags.
    pub image_flags: U32,
    /// Comment.
    pub description: [u8; 256],
    /// Offset of the block map.
    pub offset_bmap: U32,
    /// Offset of the first data block.
    pub offset_data: U32,
    /// Legacy geometry: cylinders.
    pub cylinders: U32,
    /// Legacy geometry: heads.
    pub heads: U32,
    /// Legacy geometry: sectors.
    pub sectors: U32,
    /// Sector size (512).
    pub sector_size: U32,
    /// Unused.
    pub unused1: U32,
    /// Virtual size in bytes.
    pub disk_size: U64,
    /// Bytes of data per block.
    pub block_size: U32,
    /// Extra bytes in front of each block's data (0).
    pub block_extra: U32,
    /// Blocks in the virtual disk (block map entries).
    pub blocks_in_image: U32,
    /// Data blocks stored in the file.
    pub blocks_allocated: U32,
    /// Image UUID.
    pub uuid_image: [u8; 16],
    /// Last modification UUID.
    pub uuid_last_snap: [u8; 16],
    /// Link UUID (differencing images).
    pub uuid_link: [u8; 16],
    /// Parent UUID (differencing images).
    pub uuid_parent: [u8; 16],
    /// Padding to 512 bytes (LCHS geometry in `VDIHEADER1PLUS`).
    pub unused2: [u8; 56],
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Static (fixed) image.
    pub fixed: bool,
    /// Offset of the block map.
    pub offset_bmap: u64,
    /// Offset of data block 0.
    pub offset_data: u64,
    /// Virtual size (rounded up to 512 like qemu).
    pub disk_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Block map entries.
    pub blocks_in_image: u64,
    /// Data blocks in the file.
    pub blocks_allocated: u64,
    /// Image UUID (VirtualBox stores RTUUID in little-endian GUID layout).
    pub uuid_image: uuid::Uuid,
}

impl RawHeader {
    /// Parses 512 bytes.
    pub fn parse(bytes: &[u8]) -> Result<RawHeader> {
        RawHeader::read_from_bytes(bytes)
            .map_err(|_| Error::invalid(FMT, "header is shorter than 512 bytes"))
    }

    /// Checks every field used; `file_len` bounds the block map.
    pub fn validate(&self, file_len: u64) -> Result<Header> {
        if self.signature.get() != SIGNATURE {
            return Err(Error::invalid(
                FMT,
                format!("signature {:#010x} is not 0xbeda107f", self.signature.get()),
            ));
        }
        let version = self.version.get();
        if version != VERSION_1_1 {
            return Err(Error::unsupported(
                FMT,
                format!(
                    "version {}.{} (only 1.1 is read)",
                    version >> 16,
                    version & 0xffff
                ),
            ));
        }
        let hs = self.header_size.get();
        if !(HEADER1_SIZE..=512 - PRE_HEADER_SIZE).contains(&hs) {
            return Err(Error::invalid(
                FMT,
                format!("header size {hs:#x} (0x180 or 0x190 expected)"),
            ));
        }
        let fixed = match self.image_type.get() {
            TYPE_NORMAL => false,
            TYPE_FIXED => true,
            3 => return Err(Error::unsupported(FMT, "undo images (type 3) are not read")),
            4 => {
                return Err(Error::unsupported(
                    FMT,
                    "differencing images (type 4) are not read; convert the merged disk",
                ));
            }
            t => return Err(Error::invalid(FMT, format!("image type {t}"))),
        };
        if self.uuid_link != [0; 16] || self.uuid_parent != [0; 16] {
            return Err(Error::unsupported(
                FMT,
                "the image has a parent (non-null link or parent UUID)",
            ));
        }
        if self.sector_size.get() != SECTOR as u32 {
            return Err(Error::unsupported(
                FMT,
                format!("sector size {} is not 512", self.sector_size.get()),
            ));
        }
        if self.block_extra.get() != 0 {
            return Err(Error::unsupported(
                FMT,
                format!("{} extra bytes per block", self.block_extra.get()),
            ));
        }
        let block_size = u64::from(self.block_size.get());
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::unsupported(
                FMT,
                format!(
                    "block size {block_size} (a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} is accepted)"
                ),
            ));
        }
        let offset_bmap = u64::from(self.offset_bmap.get());
        let offset_data = u64::from(self.offset_data.get());
        if !offset_bmap.is_multiple_of(SECTOR) || !offset_data.is_multiple_of(SECTOR) {
            return Err(Error::unsupported(
                FMT,
                "block map or data offset is not sector aligned",
            ));
        }
        let blocks_in_image = u64::from(self.blocks_in_image.get());
        let blocks_allocated = u64::from(self.blocks_allocated.get());
        if blocks_in_image > MAX_BLOCKS {
            return Err(Error::limit(
                FMT,
                format!("{blocks_in_image} blocks (at most {MAX_BLOCKS} are read)"),
            ));
        }
        if blocks_allocated > blocks_in_image {
            return Err(Error::corrupt(
                FMT,
                format!("{blocks_allocated} blocks allocated out of {blocks_in_image}"),
            ));
        }
        // qemu: odd sizes (VBoxManage convertfromraw) are rounded up to whole sectors.
        let disk_size = self
            .disk_size
            .get()
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| Error::invalid(FMT, "disk size overflows"))?;
        if disk_size > blocks_in_image * block_size {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "disk size {disk_size} is more than {blocks_in_image} blocks of {block_size} bytes"
                ),
            ));
        }
        let bmap_end = offset_bmap + blocks_in_image * 4;
        if offset_bmap < u64::from(PRE_HEADER_SIZE + hs) || bmap_end > file_len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "block map at {offset_bmap}+{} is outside the file",
                    blocks_in_image * 4
                ),
            ));
        }
        if offset_data < bmap_end {
            return Err(Error::corrupt(
                FMT,
                format!("data offset {offset_data} is inside the block map"),
            ));
        }
        Ok(Header {
            fixed,
            offset_bmap,
            offset_data,
            disk_size,
            block_size,
            blocks_in_image,
            blocks_allocated,
            uuid_image: uuid::Uuid::from_bytes_le(self.uuid_image),
        })
    }
}

/// Reads a VDI image.
pub struct VdiReader {
    storage: Arc<dyn Storage>,
    header: Header,
    bmap: Vec<u32>,
}

impl VdiReader {
    /// Opens `storage` as a VDI.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self> {
        let len = storage.len();
        let mut buf = [0u8; 512];
        if len < 512 {
            return Err(Error::invalid(
                FMT,
                "file is shorter than the 512-byte header",
            ));
        }
        storage.read_exact_at(&mut buf, 0)?;
        let header = RawHeader::parse(&buf)?.validate(len)?;
        let mut raw = vec![0u8; (header.blocks_in_image * 4) as usize];
        storage.read_exact_at(&mut raw, header.offset_bmap)?;
        let mut bmap = Vec::with_capacity(raw.len() / 4);
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let e = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if e < BLOCK_ZERO {
                if u64::from(e) >= header.blocks_allocated {
                    return Err(Error::corrupt(
                        FMT,
                        format!(
                            "block map entry {i} is {e}, not below blocks_allocated {}",
                            header.blocks_allocated
                        ),
                    ));
                }
                // The block must hold the part of the disk it maps (a short last block may end the file).
                let needed = header
                    .block_size
                    .min(header.disk_size - (i as u64 * header.block_size).min(header.disk_size));
                let end = header.offset_data + u64::from(e) * header.block_size + needed;
                if end > len {
                    return Err(Error::corrupt(
                        FMT,
                        format!(
                            "block map entry {i} puts data block {e} past the end of the file ({len} bytes)"
                        ),
                    ));
                }
            }
            bmap.push(e);
        }
        Ok(VdiReader {
            storage,
            header,
            bmap,
        })
    }

    fn entry(&self, block: u64) -> Option<u32> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.bmap.get(i))
            .copied()
            .filter(|&e| e < BLOCK_ZERO)
    }
}

impl DiskSource for VdiReader {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.header.disk_size
    }

    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        check_range(self.header.disk_size, offset, len)?;
        let bs = self.header.block_size;
        let mut map = ExtentMap::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let idx = at / bs;
            let n = ((idx + 1) * bs).min(end) - at;
            let kind = if self.entry(idx).is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            map.push(at, n, kind)?;
            at += n;
        }
        Ok(map)
    }

    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        check_range(self.header.disk_size, offset, len)?;
        let bs = self.header.block_size;
        let mut out: Vec<HostExtent> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let idx = at / bs;
            let n = ((idx + 1) * bs).min(end) - at;
            if let Some(e) = self.entry(idx) {
                // The same position read_at reads from (entries are bounded by the file when opened).
                let host = u64::from(e)
                    .checked_mul(bs)
                    .and_then(|b| b.checked_add(self.header.offset_data))
                    .and_then(|b| b.checked_add(at - idx * bs))
                    .ok_or_else(|| {
                        Error::corrupt("vdi", format!("block {idx} offset overflows"))
                    })?;
                match out.last_mut() {
                    Some(last)
                        if last.guest + last.len == at
                            && last.host.and_then(|h| h.checked_add(last.len)) == Some(host) =>
                    {
                        last.len += n;
                    }
                    _ => out.push(HostExtent {
                        guest: at,
                        len: n,
                        host: Some(host),
                    }),
                }
            }
            at += n;
        }
        Ok(Some(out))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.header.disk_size, offset, buf.len() as u64)?;
        let bs = self.header.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let idx = at / bs;
            let n = (((idx + 1) * bs - at) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match self.entry(idx) {
                None => piece.fill(0),
                Some(e) => {
                    let pos = self.header.offset_data + u64::from(e) * bs + (at - idx * bs);
                    self.storage.read_exact_at(piece, pos)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.header.disk_size,
            cluster_size: Some(self.header.block_size),
            format_specific: Some(serde_json::json!({
                "type": if self.header.fixed { "static" } else { "dynamic" },
                "uuid": self.header.uuid_image.to_string(),
                "blocks-allocated": self.header.blocks_allocated,
                "blocks-in-image": self.header.blocks_in_image,
            })),
            ..ImageInfo::default()
        }
    }

    /// qemu `vdi_co_check`: every data block referenced once, the allocated count matching the header.
    fn check(&self) -> Result<CheckReport> {
        let mut r = CheckReport {
            supported: true,
            total_clusters: self.header.blocks_in_image,
            ..CheckReport::default()
        };
        let mut owner: Vec<u32> = vec![BLOCK_FREE; self.header.blocks_allocated as usize];
        let mut count = 0u64;
        for (i, &e) in self.bmap.iter().enumerate() {
            if e >= BLOCK_ZERO {
                continue;
            }
            count += 1;
            match owner.get_mut(e as usize) {
                Some(o) if *o == BLOCK_FREE => *o = i as u32,
                Some(o) => {
                    let first = *o;
                    r.corruption(format_args!(
                        "data block {e} is used by blocks {first} and {i}"
                    ));
                }
                None => r.corruption(format_args!(
                    "block {i} maps to data block {e}, beyond the allocated blocks"
                )),
            }
        }
        r.allocated_clusters = count;
        if count != self.header.blocks_allocated {
            r.corruption(format_args!(
                "allocated blocks mismatch: the map uses {count}, the header says {}",
                self.header.blocks_allocated
            ));
        }
        Ok(r)
    }
}

/// Writes a VDI: dynamic (blocks allocated as data arrives, in guest order) or static (`-o static=on`).
pub struct VdiWriter {
    fixed: bool,
    block_size: u64,
    disk_size: u64,
    offset_data: u64,
    bmap: Vec<u32>,
    allocated: u32,
    planned: bool,
    header_done: bool,
}

/// The vdi `-o` options this writer takes (qemu-img's names; `-o help` prints them).
pub const OPTIONS: &[OptionSpec] = &[OptionSpec {
    name: "static",
    kind: OptionKind::Bool,
    default: "off",
    help: "VDI static (pre-allocated) image",
}];

impl VdiWriter {
    /// Takes `static=on|off` (default off).
    pub fn new(opts: &mut WriterOptions) -> Result<Self> {
        let fixed = opts.take_bool("static")?.unwrap_or(false);
        Ok(VdiWriter {
            fixed,
            block_size: DEFAULT_BLOCK_SIZE,
            disk_size: 0,
            offset_data: 0,
            bmap: Vec::new(),
            allocated: 0,
            planned: false,
            header_done: false,
        })
    }

    fn header_bytes(&self) -> Vec<u8> {
        let mut h = RawHeader::new_zeroed();
        h.text[..HEADER_TEXT.len()].copy_from_slice(HEADER_TEXT);
        h.signature = U32::new(SIGNATURE);
        h.version = U32::new(VERSION_1_1);
        h.header_size = U32::new(HEADER1_SIZE);
        h.image_type = U32::new(if self.fixed { TYPE_FIXED } else { TYPE_NORMAL });
        h.offset_bmap = U32::new(512);
        h.offset_data = U32::new(self.offset_data as u32);
        h.sector_size = U32::new(SECTOR as u32);
        h.disk_size = U64::new(self.disk_size);
        h.block_size = U32::new(self.block_size as u32);
        h.blocks_in_image = U32::new(self.bmap.len() as u32);
        h.blocks_allocated = U32::new(self.allocated);
        h.uuid_image = uuid::Uuid::new_v4().to_bytes_le();
        h.uuid_last_snap = uuid::Uuid::new_v4().to_bytes_le();
        h.as_bytes().to_vec()
    }

    fn write_tables(&mut self, sink: &mut dyn Sink) -> Result<()> {
        sink.write_at(0, &self.header_bytes())?;
        let mut map = Vec::with_capacity(self.bmap.len() * 4);
        for e in &self.bmap {
            map.extend_from_slice(&e.to_le_bytes());
        }
        sink.write_at(512, &map)?;
        self.header_done = true;
        Ok(())
    }

    fn block_pos(&mut self, idx: u64) -> Result<u64> {
        let slot = self
            .bmap
            .get_mut(idx as usize)
            .ok_or_else(|| Error::input("internal error: VDI write past the virtual size"))?;
        if *slot == BLOCK_FREE {
            if self.planned || self.fixed {
                return Err(Error::input(
                    "internal error: data outside the planned VDI blocks",
                ));
            }
            *slot = self.allocated;
            self.allocated += 1;
        }
        Ok(self.offset_data + u64::from(*slot) * self.block_size)
    }
}

impl FormatWriter for VdiWriter {
    fn zero_granule(&self) -> u64 {
        // Zero runs inside an allocated block are left as holes in the file (qemu-img's -S 4k).
        crate::engine::BLOCK_ZERO_GRANULE.min(self.granularity())
    }

    fn granularity(&self) -> u64 {
        self.block_size
    }

    fn output_virtual_size(&self, source_size: u64) -> Result<u64> {
        let size = source_size
            .checked_next_multiple_of(SECTOR)
            .filter(|s| s.div_ceil(self.block_size) <= MAX_BLOCKS)
            .ok_or_else(|| {
                Error::limit(
                    FMT,
                    format!("{source_size} bytes needs more than {MAX_BLOCKS} blocks"),
                )
            })?;
        Ok(size)
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        self.disk_size = self.output_virtual_size(plan.virtual_size)?;
        let blocks = self.disk_size.div_ceil(self.block_size);
        self.offset_data =
            (512 + (blocks * 4).next_multiple_of(SECTOR)).next_multiple_of(DATA_ALIGN);
        self.planned = !sink.can_seek_back();
        if self.fixed {
            self.bmap = (0..blocks as u32).collect();
            self.allocated = blocks as u32;
        } else {
            self.bmap = vec![BLOCK_FREE; blocks as usize];
            if self.planned {
                for &(s, t) in plan.runs {
                    if t <= s {
                        continue;
                    }
                    for idx in s / self.block_size..=(t - 1) / self.block_size {
                        if let Some(slot) = self.bmap.get_mut(idx as usize)
                            && *slot == BLOCK_FREE
                        {
                            *slot = self.allocated;
                            self.allocated += 1;
                        }
                    }
                }
            }
        }
        if self.planned || self.fixed {
            self.write_tables(sink)?;
        }
        Ok(())
    }

    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        let data = match run {
            Run::Zero(_) => return Ok(()),
            Run::Data(d) => d,
            Run::Compressed { .. } => return Err(Error::input("VDI cannot hold compressed data")),
        };
        let bs = self.block_size;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let idx = at / bs;
            let n = (((idx + 1) * bs - at) as usize).min(data.len() - done);
            let pos = self.block_pos(idx)? + (at - idx * bs);
            sink.write_at(pos, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        if !self.header_done {
            self.write_tables(sink)?;
        }
        let len = self.offset_data + u64::from(self.allocated) * self.block_size;
        sink.finish(len)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> RawHeader {
        let mut h = RawHeader::new_zeroed();
        h.signature = U32::new(SIGNATURE);
        h.version = U32::new(VERSION_1_1);
        h.header_size = U32::new(HEADER1_SIZE);
        h.image_type = U32::new(TYPE_NORMAL);
        h.offset_bmap = U32::new(512);
        h.offset_data = U32::new(1024);
        h.sector_size = U32::new(512);
        h.disk_size = U64::new(1 << 20);
        h.block_size = U32::new(1 << 20);
        h.blocks_in_image = U32::new(1);
        h
    }

    #[test]
    fn accepts_a_good_header() {
        assert!(header().validate(4096).is_ok());
    }

    #[test]
    fn rejects_each_rule() {
        type Edit = Box<dyn Fn(&mut RawHeader)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("signature", Box::new(|h| h.signature = U32::new(1))),
            ("version", Box::new(|h| h.version = U32::new(0x0001_0000))),
            ("type", Box::new(|h| h.image_type = U32::new(4))),
            ("parent", Box::new(|h| h.uuid_parent = [1; 16])),
            ("sector", Box::new(|h| h.sector_size = U32::new(4096))),
            ("block size", Box::new(|h| h.block_size = U32::new(3 << 20))),
            (
                "block size small",
                Box::new(|h| h.block_size = U32::new(512)),
            ),
            (
                "blocks",
                Box::new(|h| h.blocks_in_image = U32::new(u32::MAX)),
            ),
            ("allocated", Box::new(|h| h.blocks_allocated = U32::new(2))),
            ("disk size", Box::new(|h| h.disk_size = U64::new(u64::MAX))),
            (
                "bmap past eof",
                Box::new(|h| h.offset_bmap = U32::new(1 << 30)),
            ),
            ("data in bmap", Box::new(|h| h.offset_data = U32::new(512))),
        ];
        for (what, f) in cases {
            let mut h = header();
            f(&mut h);
            assert!(h.validate(4096).is_err(), "{what} must be refused");
        }
    }
}
