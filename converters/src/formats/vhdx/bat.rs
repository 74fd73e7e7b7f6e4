//! VHDX block allocation table (MS-VHDX 2.5): geometry, entry states and a bounded page cache.

use std::sync::{Arc, Mutex};

use super::header::Region;
use super::metadata::Metadata;
use super::{FMT, MIB};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// "The number of sectors that can be described in each sector bitmap block is 2^23" (MS-VHDX 2.4).
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// Sector bitmap blocks are 1 MiB (MS-VHDX 2.4).
pub const BITMAP_BLOCK_SIZE: u64 = MIB;
/// BAT entry: bits 0-2 are the state (MS-VHDX 2.5.1).
pub const STATE_MASK: u64 = 0x7;
/// BAT entry: bits 20-63 are FileOffsetMB (MS-VHDX 2.5.1).
pub const OFFSET_SHIFT: u32 = 20;

/// Payload block states (MS-VHDX 2.5.1.1).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
/// Contents undefined.
pub const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
/// Contents are zero.
pub const PAYLOAD_BLOCK_ZERO: u64 = 2;
/// Unmapped (trimmed); contents undefined.
pub const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
/// The value qemu used for UNMAPPED before spec 1.0 (qemu `PAYLOAD_BLOCK_UNMAPPED_v095`); read the same way.
pub const PAYLOAD_BLOCK_UNMAPPED_V095: u64 = 5;
/// The whole block is stored at FileOffsetMB.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
/// Differencing only: the sector bitmap decides per sector.
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap states (MS-VHDX 2.5.1.2).
pub const SB_BLOCK_NOT_PRESENT: u64 = 0;
/// The sector bitmap block is stored at FileOffsetMB.
pub const SB_BLOCK_PRESENT: u64 = 6;

/// Entries per cached BAT page (64 KiB of table).
const PAGE_ENTRIES: u64 = 8192;
/// Pages kept in memory (2 MiB of table): the BAT is read on demand, never whole, however large it claims to be.
const CACHED_PAGES: usize = 32;

/// Block geometry derived from the metadata (MS-VHDX 2.4, 2.5).
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub sector_size: u64,
    /// Payload blocks per chunk (per sector bitmap block).
    pub chunk_ratio: u64,
    /// Payload blocks covering the virtual disk.
    pub payload_blocks: u64,
    /// Entries in the BAT (payload and sector bitmap).
    pub bat_entries: u64,
    /// A differencing disk.
    pub has_parent: bool,
}

impl Geometry {
    /// Computes the geometry and checks that the BAT fits in its region.
    pub fn new(meta: &Metadata, bat: Region) -> Result<Geometry> {
        let g = Geometry::compute(
            meta.block_size,
            meta.logical_sector_size,
            meta.virtual_size,
            meta.has_parent,
        );
        let need = g.bat_entries.saturating_mul(8);
        if need > bat.length {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "the BAT needs {} entries ({need} bytes) but its region holds {} bytes",
                    g.bat_entries, bat.length
                ),
            ));
        }
        Ok(g)
    }

    /// Geometry for validated sizes (block size 1..256 MiB power of two, sector 512/4096, size <= 64 TiB).
    pub fn compute(block_size: u64, sector_size: u64, virtual_size: u64, has_parent: bool) -> Self {
        // "ChunkRatio = (2^23 * LogicalSectorSize) / BlockSize" (MS-VHDX 2.4).
        let chunk_ratio = (SECTORS_PER_BITMAP_BLOCK * sector_size / block_size).max(1);
        let payload_blocks = virtual_size.div_ceil(block_size);
        // MS-VHDX 2.5: dynamic/fixed "TotalBATEntries = PayloadBlocksCount + floor((PayloadBlocksCount - 1) /
        // ChunkRatio)"; differencing "SectorBitmapBlocksCount * (ChunkRatio + 1)".
        let bat_entries = if has_parent {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size,
            sector_size,
            chunk_ratio,
            payload_blocks,
            bat_entries,
            has_parent,
        }
    }

    /// BAT index of payload block `block`: payload entries are interleaved with one sector bitmap entry after
    /// every `chunk_ratio` of them (MS-VHDX 2.5).
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap entry of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }
}

/// What a payload BAT entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Not in this file: zeros, or the parent's data in a differencing disk.
    NotPresent,
    /// Zero, undefined or unmapped: read as zeros.
    Zero,
    /// Stored whole at this file offset.
    Full(u64),
    /// Stored at this file offset for the sectors the bitmap marks (differencing only).
    Partial(u64),
}

/// Decodes a payload entry of payload block `block`.
pub fn decode_payload(entry: u64, block: u64, has_parent: bool) -> Result<Payload> {
    let offset = (entry >> OFFSET_SHIFT) * MIB;
    Ok(match entry & STATE_MASK {
        PAYLOAD_BLOCK_NOT_PRESENT => Payload::NotPresent,
        PAYLOAD_BLOCK_UNDEFINED
        | PAYLOAD_BLOCK_ZERO
        | PAYLOAD_BLOCK_UNMAPPED
        | PAYLOAD_BLOCK_UNMAPPED_V095 => Payload::Zero,
        PAYLOAD_BLOCK_FULLY_PRESENT => Payload::Full(offset),
        PAYLOAD_BLOCK_PARTIALLY_PRESENT if has_parent => Payload::Partial(offset),
        PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "block {block} is PARTIALLY_PRESENT, which only differencing disks may use"
                ),
            ));
        }
        s => {
            return Err(Error::corrupt(
                FMT,
                format!("block {block} has the reserved BAT state {s}"),
            ));
        }
    })
}

/// The BAT, read in 64 KiB pages on demand with a small LRU cache.
pub struct Bat {
    storage: Arc<dyn Storage>,
    region: Region,
    entries: u64,
    pages: Mutex<Vec<(u64, Arc<Vec<u64>>)>>,
}

impl Bat {
    /// A BAT of `entries` entries at `region` (already checked to fit).
    pub fn new(storage: Arc<dyn Storage>, region: Region, entries: u64) -> Self {
        Bat {
            storage,
            region,
            entries,
            pages: Mutex::new(Vec::new()),
        }
    }

    /// Entry `index`.
    pub fn entry(&self, index: u64) -> Result<u64> {
        if index >= self.entries {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "BAT index {index} is past the table ({} entries)",
                    self.entries
                ),
            ));
        }
        let page_no = index / PAGE_ENTRIES;
        let page = self.page(page_no)?;
        page.get((index % PAGE_ENTRIES) as usize)
            .copied()
            .ok_or_else(|| Error::corrupt(FMT, format!("BAT index {index} is past its page")))
    }

    /// Calls `f(index, entry)` for every entry in order, reading the table page by page past the cache, until
    /// `f` returns false.
    pub fn scan(&self, mut f: impl FnMut(u64, u64) -> bool) -> Result<()> {
        let mut buf = Vec::new();
        let mut first = 0;
        while first < self.entries {
            let count = PAGE_ENTRIES.min(self.entries - first);
            // count <= PAGE_ENTRIES, so this is at most 64 KiB
            buf.resize((count * 8) as usize, 0);
            self.storage
                .read_exact_at(&mut buf, self.region.offset + first * 8)?;
            for (i, c) in (first..).zip(buf.chunks_exact(8)) {
                if !f(i, u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))) {
                    return Ok(());
                }
            }
            first += count;
        }
        Ok(())
    }

    fn page(&self, page_no: u64) -> Result<Arc<Vec<u64>>> {
        let mut pages = self
            .pages
            .lock()
            .map_err(|_| Error::input("VHDX BAT cache lock poisoned"))?;
        if let Some(i) = pages.iter().position(|(n, _)| *n == page_no) {
            let hit = pages.remove(i);
            let page = hit.1.clone();
            pages.insert(0, hit);
            return Ok(page);
        }
        let first = page_no * PAGE_ENTRIES;
        let count = PAGE_ENTRIES.min(self.entries - first);
        // count <= PAGE_ENTRIES, so this is at most 64 KiB
        let mut buf = vec![0u8; (count * 8) as usize];
        self.storage
            .read_exact_at(&mut buf, self.region.offset + first * 8)?;
        let page: Arc<Vec<u64>> = Arc::new(
            buf.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        );
        pages.insert(0, (page_no, page.clone()));
        pages.truncate(CACHED_PAGES);
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_spec_formulas() {
        // 512-byte sectors, 1 MiB blocks: chunk ratio 4096; 8 GiB = 8192 blocks + 1 bitmap entry between chunks.
        let g = Geometry::compute(MIB, 512, 8 << 30, false);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.bat_entries, 8192 + 1);
        assert_eq!(g.payload_index(4095), 4095);
        assert_eq!(g.payload_index(4096), 4097);
        assert_eq!(g.bitmap_index(0), 4096);
        // 4 KiB sectors, 256 MiB blocks: (2^23 * 4096) / 2^28 = 128.
        assert_eq!(
            Geometry::compute(256 * MIB, 4096, 1 << 30, false).chunk_ratio,
            128
        );
        // differencing: whole chunks, each with its bitmap entry
        let d = Geometry::compute(MIB, 512, 10 * MIB, true);
        assert_eq!(d.bat_entries, 4097);
        assert_eq!(Geometry::compute(MIB, 512, 0, false).bat_entries, 0);
    }

    #[test]
    fn rejects_reserved_and_misplaced_states() {
        assert_eq!(
            decode_payload(6 | 5 << 20, 0, false).ok(),
            Some(Payload::Full(5 * MIB))
        );
        assert_eq!(decode_payload(3, 0, false).ok(), Some(Payload::Zero));
        assert_eq!(decode_payload(5, 0, false).ok(), Some(Payload::Zero));
        assert!(decode_payload(4, 0, false).is_err());
        assert!(decode_payload(7, 0, false).is_err());
        assert_eq!(
            decode_payload(7 | 1 << 20, 0, true).ok(),
            Some(Payload::Partial(MIB))
        );
    }
}
