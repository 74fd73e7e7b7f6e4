//! VHDX, Microsoft's Virtual Hard Disk v2 format: [MS-VHDX] v20180912,
//! <https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-vhdx/>. Facts on what real images hold
//! come from qemu's `block/vhdx.c`, `vhdx-log.c` and `vhdx.h`.
//!
//! Read: fixed, dynamic and differencing files; logical sectors of 512 and 4096 bytes; every payload block state
//! (UNDEFINED and UNMAPPED read as zeros, as qemu does); a non-empty log is replayed in memory, never written
//! back. Parents are followed only by their `relative_path` locator, through the open gate, and must carry the
//! DataWriteGuid the child names. Refused: unknown required regions or metadata items, non-VHDX parent types,
//! BAT entries that share a payload or sector bitmap block.
//!
//! Write: dynamic (default) and fixed, block size 1..256 MiB, logical sector 512 or 4096, an empty log.
//!
//! Layout of a file: 1 MiB header section (file identifier, two headers, two region tables), then regions at
//! 1 MiB multiples (log, metadata, BAT), then payload blocks.

pub mod bat;
pub mod header;
pub mod log;
pub mod metadata;
pub mod writer;

use std::collections::HashSet;
use std::sync::Arc;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;
use crate::gate::OpenGate;
use crate::source::{self, CheckReport, DiskSource, HostExtent, ImageInfo, check_range};
use crate::storage::Storage;

use bat::{Bat, Geometry, Payload, SB_BLOCK_PRESENT};
use header::{HEADER_SECTION_SIZE, Header, Region, Regions};
use metadata::Metadata;

pub use writer::{OPTIONS as WRITER_OPTIONS, VhdxWriter};

/// Format name used in messages.
pub(crate) const FMT: &str = "vhdx";
/// 1 MiB: the unit of region offsets and BAT file offsets.
pub const MIB: u64 = 1 << 20;

/// A GUID as stored on disk: Data1 (LE u32), Data2 (LE u16), Data3 (LE u16), Data4 (8 bytes) (MS-VHDX 1.3).
#[derive(
    Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(transparent)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Builds a GUID from its four fields as written in text form.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A fresh random GUID.
    pub fn random() -> Guid {
        Guid(*uuid::Uuid::new_v4().as_bytes())
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Reads a GUID at `at` of `buf`.
    pub fn read(buf: &[u8], at: usize) -> Result<Guid> {
        at.checked_add(16)
            .and_then(|end| buf.get(at..end))
            .and_then(|b| b.try_into().ok())
            .map(Guid)
            .ok_or_else(|| {
                Error::corrupt(
                    FMT,
                    format!("GUID at {at} is past the end of its structure"),
                )
            })
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}}}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero (MS-VHDX 2.2.2, 2.2.3.1, 2.3.1.1).
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let (head, rest) = buf.split_at(at.min(buf.len()));
    let tail = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(head);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, tail)
}

/// True when the checksum stored at `at` matches.
pub fn checksum_ok(buf: &[u8], at: usize) -> bool {
    read_u32(buf, at).is_ok_and(|stored| stored == checksum(buf, at))
}

/// Little-endian u32 at `at`.
pub(crate) fn read_u32(buf: &[u8], at: usize) -> Result<u32> {
    at.checked_add(4)
        .and_then(|end| buf.get(at..end))
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| {
            Error::corrupt(
                FMT,
                format!("field at {at} is past the end of its structure"),
            )
        })
}

/// Little-endian u64 at `at`.
pub(crate) fn read_u64(buf: &[u8], at: usize) -> Result<u64> {
    at.checked_add(8)
        .and_then(|end| buf.get(at..end))
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| {
            Error::corrupt(
                FMT,
                format!("field at {at} is past the end of its structure"),
            )
        })
}

/// Where a piece of the guest disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    /// Zeros.
    Zero,
    /// The parent disk (differencing) at the same guest offset.
    Parent,
    /// This file, at the given file offset.
    File(u64),
}

/// Reads a VHDX image.
pub struct VhdxReader {
    storage: Arc<dyn Storage>,
    header: Header,
    regions: Regions,
    meta: Metadata,
    geo: Geometry,
    bat: Bat,
    parent: Option<Box<dyn DiskSource>>,
    parent_name: Option<String>,
    replayed_entries: u64,
}

impl VhdxReader {
    /// Opens `storage` as a VHDX image; a differencing disk's parent is opened through `gate`.
    pub fn open(storage: Arc<dyn Storage>, gate: &OpenGate) -> Result<Self> {
        let header = header::read_current_header(storage.as_ref())?;
        let real_len = storage.len();
        let replay = log::replay(storage, &header)?;
        let storage = replay.storage;
        let regions = header::read_regions(storage.as_ref(), &header)?;
        let meta = metadata::read_metadata(storage.as_ref(), regions.metadata)?;
        let geo = Geometry::new(&meta, regions.bat)?;
        let bat = Bat::new(storage.clone(), regions.bat, geo.bat_entries);
        refuse_shared_blocks(&bat, &geo, real_len, storage.len())?;
        let mut reader = VhdxReader {
            storage,
            header,
            regions,
            meta,
            geo,
            bat,
            parent: None,
            parent_name: None,
            replayed_entries: replay.entries,
        };
        if reader.meta.has_parent {
            reader.open_parent(gate)?;
        }
        Ok(reader)
    }

    /// The DataWriteGuid of the current header (what differencing children record as `parent_linkage`).
    pub fn data_write_guid(&self) -> Guid {
        self.header.data_write_guid
    }

    /// Follows the parent locator's `relative_path` (MS-VHDX 2.6.2.6.3). Absolute and volume paths are never
    /// followed: a name inside an image must not reach outside the image's folder.
    fn open_parent(&mut self, gate: &OpenGate) -> Result<()> {
        let entries = self.meta.parent_locator.clone().unwrap_or_default();
        let get = |k: &str| {
            entries
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let Some(rel) = get("relative_path") else {
            let other = get("absolute_win32_path")
                .or_else(|| get("volume_path"))
                .unwrap_or_else(|| "(none)".into());
            return Err(Error::denied(format!(
                "differencing VHDX names its parent only by the absolute path '{other}'; imgshift follows only relative_path (convert from the parent's folder, or merge the chain in Hyper-V)"
            )));
        };
        let name = rel.replace('\\', "/");
        self.parent_name = Some(rel.clone());
        let referrer = self.storage.path().ok_or_else(|| {
            Error::denied(format!(
                "VHDX parent '{rel}' refused: this image is not a local file, so its folder is unknown"
            ))
        })?;
        let (pstore, child_gate) = gate.open(referrer, &name, "VHDX parent")?;
        let parent = VhdxReader::open(pstore, &child_gate)
            .map_err(|e| e.context(format!("VHDX parent '{rel}'")))?;
        // "parent_linkage: ... the DataWriteGuid of the parent" (MS-VHDX 2.6.2.6.3); parent_linkage2 is an
        // alternative value a parent may also carry.
        let want = parent.data_write_guid().to_string();
        let matches = |k: &str| get(k).is_some_and(|v| v.trim().eq_ignore_ascii_case(&want));
        if get("parent_linkage").is_none() {
            return Err(Error::corrupt(FMT, "parent locator has no parent_linkage"));
        }
        if !matches("parent_linkage") && !matches("parent_linkage2") {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "parent '{rel}' has DataWriteGuid {want}, not the {} this differencing disk was made from (the parent changed)",
                    get("parent_linkage").unwrap_or_default()
                ),
            ));
        }
        self.parent = Some(Box::new(parent));
        Ok(())
    }

    /// The payload state of `block`, with its file offset checked against the file and the metadata regions.
    fn payload(&self, block: u64) -> Result<Payload> {
        self.stored_payload(block, self.bat.entry(self.geo.payload_index(block))?)
    }

    /// The payload state `entry` gives `block`, checked as [`Self::payload`] does.
    fn stored_payload(&self, block: u64, entry: u64) -> Result<Payload> {
        let p = bat::decode_payload(entry, block, self.geo.has_parent)?;
        if let Payload::Full(off) | Payload::Partial(off) = p {
            let start = block * self.geo.block_size;
            let need = self.geo.block_size.min(self.meta.virtual_size - start);
            self.check_stored(off, need, &format!("block {block}"))?;
        }
        Ok(p)
    }

    /// Checks that `[off, off+len)` lies inside the file, after the header section, outside the log, BAT and
    /// metadata regions.
    fn check_stored(&self, off: u64, len: u64, what: &str) -> Result<()> {
        let r = Region {
            offset: off,
            length: len,
        };
        let log = Region {
            offset: self.header.log_offset,
            length: self.header.log_length,
        };
        let file_len = self.storage.len();
        if off < HEADER_SECTION_SIZE || off.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(
                FMT,
                format!("{what} at file offset {off} is outside the file ({file_len} bytes)"),
            ));
        }
        if r.overlaps(&self.regions.bat) || r.overlaps(&self.regions.metadata) || r.overlaps(&log) {
            return Err(Error::corrupt(
                FMT,
                format!("{what} at file offset {off} overlaps the log, BAT or metadata region"),
            ));
        }
        Ok(())
    }

    /// Calls `f(guest_offset, len, seg)` for consecutive pieces covering `[offset, offset+len)`.
    fn segments(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64, Seg) -> Result<()>,
    ) -> Result<()> {
        check_range(self.meta.virtual_size, offset, len)?;
        let bs = self.geo.block_size;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let block_start = block * bs;
            let in_block = at - block_start;
            let n = (bs - in_block).min(end - at);
            match self.payload(block)? {
                Payload::NotPresent if self.geo.has_parent => f(at, n, Seg::Parent)?,
                Payload::NotPresent | Payload::Zero => f(at, n, Seg::Zero)?,
                Payload::Full(off) => f(at, n, Seg::File(off + in_block))?,
                Payload::Partial(off) => self.partial(block, off, in_block, n, f)?,
            }
            at += n;
        }
        Ok(())
    }

    /// Splits `[in_block, in_block+n)` of a PARTIALLY_PRESENT block by its sector bitmap (MS-VHDX 2.4: bit 0 of
    /// byte 0 is the first sector; 1 = this file, 0 = the parent).
    fn partial(
        &self,
        block: u64,
        off: u64,
        in_block: u64,
        n: u64,
        f: &mut dyn FnMut(u64, u64, Seg) -> Result<()>,
    ) -> Result<()> {
        let geo = &self.geo;
        let chunk = block / geo.chunk_ratio;
        let sb = self.bat.entry(geo.bitmap_index(chunk))?;
        if sb & bat::STATE_MASK != SB_BLOCK_PRESENT {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "block {block} is PARTIALLY_PRESENT but its sector bitmap block is not present"
                ),
            ));
        }
        let sb_off = (sb >> bat::OFFSET_SHIFT) * MIB;
        self.check_stored(
            sb_off,
            bat::BITMAP_BLOCK_SIZE,
            &format!("sector bitmap of chunk {chunk}"),
        )?;
        let ss = geo.sector_size;
        let first_sector = in_block / ss;
        let last_sector = (in_block + n).div_ceil(ss);
        // Bit of this block's first sector within its chunk's bitmap; sectors per block >= 256, so byte aligned.
        let base_bit = (block % geo.chunk_ratio) * (geo.block_size / ss);
        let byte0 = (base_bit + first_sector) / 8;
        let byte1 = (base_bit + last_sector).div_ceil(8);
        // at most block_size / 512 / 8 = 64 KiB
        let mut bits = vec![0u8; (byte1 - byte0) as usize];
        self.storage.read_exact_at(&mut bits, sb_off + byte0)?;
        let block_start = block * geo.block_size;
        let (lo, hi) = (block_start + in_block, block_start + in_block + n);
        let mut run: Option<(u64, bool)> = None;
        let mut flush = |from: u64, to: u64, present: bool| -> Result<()> {
            let (a, b) = (from.max(lo), to.min(hi));
            if b > a {
                let seg = if present {
                    Seg::File(off + (a - block_start))
                } else {
                    Seg::Parent
                };
                f(a, b - a, seg)?;
            }
            Ok(())
        };
        for s in first_sector..last_sector {
            let bit = base_bit + s - byte0 * 8;
            let present = bits
                .get((bit / 8) as usize)
                .is_some_and(|b| b >> (bit % 8) & 1 == 1);
            match run {
                Some((_, p)) if p == present => {}
                Some((start, p)) => {
                    flush(block_start + start * ss, block_start + s * ss, p)?;
                    run = Some((s, present));
                }
                None => run = Some((s, present)),
            }
        }
        if let Some((start, p)) = run {
            flush(block_start + start * ss, block_start + last_sector * ss, p)?;
        }
        Ok(())
    }
}

/// Present BAT entries tracked past the places the bitset covers (the real file's end, or
/// [`MAX_TRACKED_FILE_LEN`]): a block there reads only what the log wrote, and a log of at most
/// [`log::MAX_REPLAY_LOG`] writes at most this many 4 KiB data sectors (MS-VHDX 2.3.1.4). Hyper-V and qemu
/// write a block's data into the file before the BAT entry that names it, so real images have none or a few.
const MAX_PLACES_PAST_TRACKED: usize = (log::MAX_REPLAY_LOG / log::LOG_SECTOR) as usize;
/// Offsets below this are tracked in the bitset (at most 9 MiB of bits): the blocks of a VHDX of at most
/// 64 TiB (MS-VHDX 2.6.2.2), its sector bitmaps (16 GiB at most) and regions fit well below it, however long
/// a sparse file claims to be.
const MAX_TRACKED_FILE_LEN: u64 = metadata::MAX_VIRTUAL_SIZE + metadata::MAX_VIRTUAL_SIZE / 8;

/// One bit per MiB of a file, for the places BAT entries name (1 MiB multiples, MS-VHDX 2.5.1), below
/// `file_len` capped at [`MAX_TRACKED_FILE_LEN`]: at most 72 Mi bits, 9 MiB of words, and zeroed pages stay
/// unmapped until a block lands there. Memory follows the file, not the BAT.
struct MibBitset {
    words: Vec<u64>,
    places: u64,
}

impl MibBitset {
    fn new(file_len: u64) -> Self {
        let places = file_len.min(MAX_TRACKED_FILE_LEN).div_ceil(MIB);
        MibBitset {
            words: vec![0; places.div_ceil(64) as usize],
            places,
        }
    }

    /// Places tracked: `0..places()`.
    fn places(&self) -> u64 {
        self.places
    }

    /// Marks `place` and says whether it was marked already; `None` for a place not tracked.
    fn test_and_set(&mut self, place: u64) -> Option<bool> {
        if place >= self.places {
            return None;
        }
        let bit = 1u64 << (place % 64);
        let word = self.words.get_mut((place / 64) as usize)?;
        let taken = *word & bit != 0;
        *word |= bit;
        Some(taken)
    }
}

/// Rule: every present payload block and sector bitmap block has its own place in the file. Hyper-V and qemu
/// never give two BAT entries one offset, and a shared sector bitmap block would let 1 MiB of bitmap (of 0x55...)
/// describe the extents of every chunk pointing at it, so a small file could map to billions of extents; with
/// distinct places, the work follows the file size. (Payload entries past the virtual size, and sector bitmap
/// entries of a disk without a parent, are never read and not checked; nor are entries at or past
/// `replayed_len`, which are refused when read.)
///
/// Memory follows the real file, not the BAT: places are 1 MiB multiples (MS-VHDX 2.5.1), so one bit per MiB
/// below `real_len` (1.25 MiB of bits for a 10 TiB file), and a set of at most [`MAX_PLACES_PAST_TRACKED`]
/// places for entries past it, which only the log replay can make readable.
fn refuse_shared_blocks(bat: &Bat, geo: &Geometry, real_len: u64, replayed_len: u64) -> Result<()> {
    let group = geo.chunk_ratio + 1;
    // The place (in MiB) of entry `index` if it is a checked present entry.
    let place = |index: u64, entry: u64| {
        let state = entry & bat::STATE_MASK;
        let present = if index % group == geo.chunk_ratio {
            geo.has_parent && state == SB_BLOCK_PRESENT
        } else {
            index - index / group < geo.payload_blocks
                && matches!(
                    state,
                    bat::PAYLOAD_BLOCK_FULLY_PRESENT | bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT
                )
        };
        present.then_some(entry >> bat::OFFSET_SHIFT)
    };
    let mut bits = MibBitset::new(real_len);
    let tracked_places = bits.places();
    let replayed_places = replayed_len.div_ceil(MIB);
    let mut past: HashSet<u64> = HashSet::new();
    let mut shared: Option<(u64, u64)> = None;
    let mut too_many = false;
    bat.scan(|index, entry| {
        let Some(p) = place(index, entry) else {
            return true;
        };
        let fresh = if let Some(taken) = bits.test_and_set(p) {
            !taken
        } else if p < replayed_places {
            if past.len() >= MAX_PLACES_PAST_TRACKED && !past.contains(&p) {
                too_many = true;
                return false;
            }
            past.insert(p)
        } else {
            true
        };
        if !fresh {
            shared = Some((index, p));
        }
        fresh
    })?;
    if too_many {
        let end = tracked_places * MIB;
        let what = if real_len > MAX_TRACKED_FILE_LEN {
            "past the blocks of any VHDX of at most 64 TiB"
        } else {
            "the end of the file before the log replay"
        };
        return Err(Error::limit(
            FMT,
            format!(
                "more than {MAX_PLACES_PAST_TRACKED} BAT entries point at blocks at or past file offset {end} ({what})"
            ),
        ));
    }
    let Some((b, p)) = shared else {
        return Ok(());
    };
    // Only on error: find the earlier entry that took the place.
    let mut first = None;
    bat.scan(|index, entry| {
        if index >= b {
            return false;
        }
        if place(index, entry) == Some(p) {
            first = Some(index);
            return false;
        }
        true
    })?;
    let what = |index: u64| {
        if index % group == geo.chunk_ratio {
            format!("sector bitmap of chunk {}", index / group)
        } else {
            format!("payload block {}", index - index / group)
        }
    };
    let a = first.unwrap_or(b);
    Err(Error::corrupt(
        FMT,
        format!(
            "BAT entries {a} ({}) and {b} ({}) both point at file offset {}",
            what(a),
            what(b),
            p * MIB
        ),
    ))
}

impl DiskSource for VhdxReader {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }

    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        let mut map = ExtentMap::new();
        self.segments(offset, len, &mut |at, n, seg| {
            let kind = match seg {
                Seg::Zero => ExtentKind::Zero,
                Seg::Parent => ExtentKind::Unallocated,
                Seg::File(_) => ExtentKind::Data,
            };
            map.push(at, n, kind)
        })?;
        Ok(map)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let parent = self.backing();
        self.segments(offset, buf.len() as u64, &mut |at, n, seg| {
            let from = (at - offset) as usize;
            let dst = buf
                .get_mut(from..from + n as usize)
                .ok_or_else(|| Error::input("VHDX read piece outside the buffer"))?;
            match seg {
                Seg::Zero => {
                    dst.fill(0);
                    Ok(())
                }
                Seg::Parent => source::read_from_backing(parent, dst, at),
                Seg::File(off) => self.storage.read_exact_at(dst, off),
            }
        })
    }

    /// Payload blocks (fully present, or the present sectors of a partially present one) at their file offsets
    /// (MS-VHDX 2.5.1, "BAT"). qemu's vhdx driver reports no offsets (it has no block status); these are the
    /// offsets `read_at` reads from.
    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        let mut out = Vec::new();
        self.segments(offset, len, &mut |at, n, seg| {
            if let Seg::File(off) = seg {
                HostExtent::push_merged(&mut out, at, n, Some(off));
            }
            Ok(())
        })?;
        Ok(Some(out))
    }

    fn backing(&self) -> Option<&dyn DiskSource> {
        self.parent.as_deref()
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.meta.virtual_size,
            cluster_size: Some(self.geo.block_size),
            backing_filename: self.parent_name.clone(),
            backing_format: self.meta.has_parent.then(|| "vhdx".to_string()),
            dirty: self.replayed_entries > 0,
            // qemu-img prints no format-specific data for vhdx.
            format_specific: None,
        }
    }

    fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport {
            supported: true,
            total_clusters: self.geo.payload_blocks,
            ..CheckReport::default()
        };
        let stored = |block, entry| match self.stored_payload(block, entry)? {
            Payload::Full(off) | Payload::Partial(off) => Ok(Some(off)),
            _ => Ok(None),
        };
        check_blocks(
            &self.bat,
            &self.geo,
            self.storage.len(),
            stored,
            &mut report,
        )?;
        Ok(report)
    }
}

/// Where a payload block lies in the file, in MiB places.
#[derive(Debug, Clone, Copy)]
struct Span {
    block: u64,
    offset: u64,
    /// The first place it takes that the bitset does not track (its end if none).
    untracked: u64,
    end: u64,
}

/// Counts the present payload blocks into `report` and reports those that overlap in the file, one corruption
/// per block that overlaps an earlier one. `stored(block, entry)` gives a block's file offset if present and
/// within `file_len`, or the error that makes it corrupt.
///
/// Each block marks the MiB places it spans (payload blocks are a multiple of 1 MiB at 1 MiB multiples,
/// MS-VHDX 2.5) in a [`MibBitset`] of the file; the earlier block of a named overlap is found by a second scan,
/// only when there is one. A block may run past the places tracked only if its file is longer than
/// [`MAX_TRACKED_FILE_LEN`] or past the file's end (the last block's tail, which no other block can reach); the
/// open refused more than [`MAX_PLACES_PAST_TRACKED`] blocks there, so those spans are kept in a small list.
fn check_blocks(
    bat: &Bat,
    geo: &Geometry,
    file_len: u64,
    stored: impl Fn(u64, u64) -> Result<Option<u64>>,
    report: &mut CheckReport,
) -> Result<()> {
    let group = geo.chunk_ratio + 1;
    // The payload block of BAT entry `index`, if it is one inside the disk.
    let payload_block = |index: u64| {
        let block = index - index / group;
        (index % group != geo.chunk_ratio && block < geo.payload_blocks).then_some(block)
    };
    let span = |block: u64, offset: u64, tracked: u64| {
        let first = offset / MIB;
        let end = first.saturating_add(geo.block_size.div_ceil(MIB));
        Span {
            block,
            offset,
            untracked: end.min(tracked.max(first)),
            end,
        }
    };
    let mut places = MibBitset::new(file_len);
    let tracked = places.places();
    // overlapping blocks and the first place each shares, as many as can be named
    let mut named: Vec<(u64, Span)> = Vec::new();
    let mut unnamed = 0u64;
    let mut past: Vec<Span> = Vec::new();
    let mut past_full = false;
    bat.scan(|index, entry| {
        let Some(block) = payload_block(index) else {
            return true;
        };
        let offset = match stored(block, entry) {
            Ok(Some(offset)) => offset,
            Ok(None) => return true,
            Err(e) => {
                report.corruption(e);
                return true;
            }
        };
        report.allocated_clusters += 1;
        let s = span(block, offset, tracked);
        let mut shared = None;
        for place in offset / MIB..s.untracked {
            if places.test_and_set(place) == Some(true) && shared.is_none() {
                shared = Some(place);
            }
        }
        if let Some(place) = shared {
            if named.len() < CheckReport::MAX_MESSAGES {
                named.push((place, s));
            } else {
                unnamed += 1;
            }
        }
        if s.untracked < s.end {
            if past.len() > MAX_PLACES_PAST_TRACKED {
                past_full = true;
            } else {
                past.push(s);
            }
        }
        true
    })?;
    if !named.is_empty() {
        // The earlier block at each shared place: the first to span it.
        named.sort_unstable_by_key(|(place, s)| (*place, s.block));
        let mut earlier: Vec<Option<Span>> = vec![None; named.len()];
        bat.scan(|index, entry| {
            let Some(block) = payload_block(index) else {
                return true;
            };
            let Ok(Some(offset)) = stored(block, entry) else {
                return true;
            };
            let s = span(block, offset, tracked);
            let from = named.partition_point(|(place, _)| *place < offset / MIB);
            let to = named.partition_point(|(place, _)| *place < s.untracked);
            for (i, (_, b)) in named.iter().enumerate().take(to).skip(from) {
                if let Some(slot) = earlier.get_mut(i)
                    && slot.is_none()
                    && block < b.block
                {
                    *slot = Some(s);
                }
            }
            true
        })?;
        named.sort_unstable_by_key(|(_, s)| s.block);
        for (i, (_, b)) in named.iter().enumerate() {
            let a = earlier.get(i).copied().flatten().unwrap_or(*b);
            report_overlap(report, a, *b);
        }
    }
    report.corruptions += unnamed;
    past.sort_unstable_by_key(|s| (s.untracked, s.block));
    for w in past.windows(2) {
        if let [a, b] = w
            && a.end > b.untracked
        {
            report_overlap(report, *a, *b);
        }
    }
    if past_full {
        report.corruption(format_args!(
            "more than {MAX_PLACES_PAST_TRACKED} blocks lie at or past file offset {}; their overlaps were not all checked",
            tracked * MIB
        ));
    }
    Ok(())
}

fn report_overlap(report: &mut CheckReport, a: Span, b: Span) {
    let (a, b) = if (a.offset, a.block) <= (b.offset, b.block) {
        (a, b)
    } else {
        (b, a)
    };
    report.corruption(format_args!(
        "blocks {} and {} overlap in the file (offsets {} and {})",
        a.block, b.block, a.offset, b.offset
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_form() {
        assert_eq!(
            metadata::VHDX_PARENT_TYPE.to_string(),
            "{B04AEFB7-D19E-4A81-B789-25B8E9445913}"
        );
        assert!(Guid::default().is_zero());
        assert!(Guid::read(&[0u8; 10], 0).is_err());
    }

    #[test]
    fn checksum_skips_its_field() {
        let mut b = vec![7u8; 64];
        let c = checksum(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        assert!(checksum_ok(&b, 4));
        b[9] ^= 1;
        assert!(!checksum_ok(&b, 4));
        assert!(!checksum_ok(&b[..2], 4));
    }

    /// A BAT of `geo` held alone in memory, with `entries` (payload block, entry) set.
    fn bat_with(geo: &Geometry, entries: &[(u64, u64)]) -> Bat {
        let mut table = vec![0u8; (geo.bat_entries * 8) as usize];
        for &(block, entry) in entries {
            let at = (geo.payload_index(block) * 8) as usize;
            table[at..at + 8].copy_from_slice(&entry.to_le_bytes());
        }
        let region = Region {
            offset: 0,
            length: geo.bat_entries * 8,
        };
        let storage: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new(table, "bat"));
        Bat::new(storage, region, geo.bat_entries)
    }

    fn full(offset: u64) -> u64 {
        (offset / MIB) << bat::OFFSET_SHIFT | bat::PAYLOAD_BLOCK_FULLY_PRESENT
    }

    #[test]
    fn shared_block_check_follows_the_file_not_the_bat() {
        // 1 TiB of 1 MiB blocks (a million entries, nearly all unallocated) in a 10 TiB file that the log
        // replay extends by 8 MiB
        let tib = 1u64 << 40;
        let geo = Geometry::compute(MIB, 512, tib, false);
        let (real, replayed) = (10 * tib, 10 * tib + 8 * MIB);
        let sparse = [
            (0, full(9 * tib)),
            (5000, full(3 * MIB)),
            (700_000, full(4 * MIB)),
            (1_000_000, full(real + 2 * MIB)),
            // past the replayed end: refused when read, not here
            (999_998, full(real + 100 * MIB)),
            (999_999, full(real + 100 * MIB)),
        ];
        let bat = bat_with(&geo, &sparse);
        assert!(refuse_shared_blocks(&bat, &geo, real, replayed).is_ok());

        let mut shared = sparse.to_vec();
        shared[2].1 = full(3 * MIB);
        let bat = bat_with(&geo, &shared);
        let e = refuse_shared_blocks(&bat, &geo, real, replayed).expect_err("shared");
        assert!(
            e.to_string().contains(&format!(
                "BAT entries 5001 (payload block 5000) and {} (payload block 700000) both point at file offset {}",
                geo.payload_index(700_000),
                3 * MIB
            )),
            "{e}"
        );

        // past the real end too
        let mut shared = sparse.to_vec();
        shared.push((1_000_001, full(real + 2 * MIB)));
        let bat = bat_with(&geo, &shared);
        let e = refuse_shared_blocks(&bat, &geo, real, replayed).expect_err("shared past the end");
        assert!(
            e.to_string().contains(&format!(
                "BAT entries {} (payload block 1000000) and {} (payload block 1000001) both point at file offset {}",
                geo.payload_index(1_000_000),
                geo.payload_index(1_000_001),
                real + 2 * MIB
            )),
            "{e}"
        );
    }

    #[test]
    fn few_blocks_may_lie_past_the_real_end() {
        let n = MAX_PLACES_PAST_TRACKED as u64 + 1;
        let geo = Geometry::compute(MIB, 512, n * MIB, false);
        let real = 4 * MIB;
        let entries: Vec<(u64, u64)> = (0..n).map(|b| (b, full(real + b * MIB))).collect();
        let replayed = real + n * MIB;
        let bat = bat_with(&geo, &entries[..MAX_PLACES_PAST_TRACKED]);
        assert!(refuse_shared_blocks(&bat, &geo, real, replayed).is_ok());
        let bat = bat_with(&geo, &entries);
        let e =
            refuse_shared_blocks(&bat, &geo, real, replayed).expect_err("too many past the end");
        assert!(
            e.to_string().contains(&format!(
                "more than {MAX_PLACES_PAST_TRACKED} BAT entries point at blocks at or past file offset {real} (the end of the file before the log replay)"
            )),
            "{e}"
        );
    }

    /// `check_blocks` over `bat` in a file of `file_len` bytes, with every present entry taken as stored.
    fn check_bat(bat: &Bat, geo: &Geometry, file_len: u64) -> CheckReport {
        let stored = |block, entry| match bat::decode_payload(entry, block, geo.has_parent)? {
            Payload::Full(off) | Payload::Partial(off) => Ok(Some(off)),
            _ => Ok(None),
        };
        let mut report = CheckReport::default();
        assert!(check_blocks(bat, geo, file_len, stored, &mut report).is_ok());
        report
    }

    #[test]
    fn block_overlap_check_follows_the_file_not_the_bat() {
        // one bit per MiB of the file: 1.25 MiB of words for 10 TiB, however many entries the BAT has
        let tib = 1u64 << 40;
        assert_eq!(
            MibBitset::new(10 * tib).words.len(),
            (10 * tib / MIB / 64) as usize
        );
        assert_eq!(
            MibBitset::new(u64::MAX).places(),
            MAX_TRACKED_FILE_LEN / MIB
        );
        // 1 TiB of 2 MiB blocks (half a million entries, nearly all unallocated) in a 10 TiB file; block 400000
        // starts 1 MiB into block 1000; block 500000's tail runs past the file's end
        let geo = Geometry::compute(2 * MIB, 512, tib, false);
        let file_len = 10 * tib;
        let mut entries = vec![
            (0, full(9 * tib)),
            (1000, full(3 * MIB)),
            (400_000, full(4 * MIB)),
            (500_000, full(file_len - MIB)),
        ];
        let report = check_bat(&bat_with(&geo, &entries), &geo, file_len);
        assert_eq!((report.allocated_clusters, report.corruptions), (4, 1));
        assert_eq!(
            report.messages,
            [format!(
                "ERROR blocks 1000 and 400000 overlap in the file (offsets {} and {})",
                3 * MIB,
                4 * MIB
            )]
        );
        entries[2].1 = full(5 * MIB);
        let report = check_bat(&bat_with(&geo, &entries), &geo, file_len);
        assert_eq!((report.allocated_clusters, report.corruptions), (4, 0));
    }

    #[test]
    fn block_overlap_check_past_the_tracked_places() {
        // a file longer than any VHDX needs: blocks past MAX_TRACKED_FILE_LEN are kept in a list
        let geo = Geometry::compute(2 * MIB, 512, 64 * MIB, false);
        let end = MAX_TRACKED_FILE_LEN;
        let entries = [
            (0, full(end - MIB)),
            (1, full(end)),
            (2, full(end + 10 * MIB)),
            (3, full(end + 11 * MIB)),
            (4, full(end + 20 * MIB)),
        ];
        let report = check_bat(&bat_with(&geo, &entries), &geo, end + 100 * MIB);
        assert_eq!((report.allocated_clusters, report.corruptions), (5, 2));
        assert_eq!(
            report.messages,
            [
                format!(
                    "ERROR blocks 0 and 1 overlap in the file (offsets {} and {end})",
                    end - MIB
                ),
                format!(
                    "ERROR blocks 2 and 3 overlap in the file (offsets {} and {})",
                    end + 10 * MIB,
                    end + 11 * MIB
                ),
            ]
        );
    }
}
