//! Hosted sparse extents (VMware Virtual Disk Format 5.0, "Hosted Sparse Extents" and "Stream-Optimized
//! Compressed Sparse Extents"): the 512-byte `SparseExtentHeader`, the grain directory (GD) and grain tables
//! (GT), zeroed-grain GTEs (version 2), and deflate-compressed grains behind grain markers (version 3).
//!
//! Everything read from the file is bounded before use: the GD by the file size and [`MAX_GD_ENTRIES`], a
//! compressed grain by the file size and twice the grain size, its inflated size by one grain. The extents of
//! one descriptor share a [`MetadataBudget`], so thousands of extent lines cannot multiply those bounds.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{CheckedExt, Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::source::{DiskSource, HostExtent, read_from_backing};
use crate::storage::Storage;

const FMT: &str = "vmdk";

/// Bytes per sector: every VMDK offset and size is in 512-byte sectors.
pub const SECTOR: u64 = 512;
/// `magicNumber` 0x564d444b, stored little-endian: the bytes "KDMV" (VMDK 5.0, "Header").
pub const MAGIC: [u8; 4] = *b"KDMV";
/// "COWD": the ESX 2 `vmfsSparse` header, which we do not read.
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// seSparse constant header magic (qemu `SESPARSE_CONST_HEADER_MAGIC`), little-endian u64.
pub const SESPARSE_MAGIC: u64 = 0xcafe_babe;

/// Flag bit 0: the newline-detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag bit 1: a redundant grain directory exists (`rgdOffset`).
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag bit 2: GTE 1 means "zeroed grain" (version 2, VMDK 5.0 "Zeroed-Grain GTE").
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag bit 17: grains and metadata are preceded by markers (stream-optimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Bits 16-31 are incompatible: a reader must understand every one set (open-vmdk `SPARSEFLAG_INCOMPAT_FLAGS`).
const INCOMPAT_FLAGS: u32 = 0xffff_0000;
const KNOWN_INCOMPAT: u32 = FLAG_COMPRESSED | FLAG_MARKERS;

/// `gdOffset` of a stream-optimized header whose GD is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm` 1: deflate, in zlib framing (RFC 1950), as VMware and qemu write it.
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Marker types of stream-optimized extents (VMDK 5.0, "Stream-Optimized Compressed Sparse Extents").
pub const MARKER_EOS: u32 = 0;
/// Grain table marker.
pub const MARKER_GT: u32 = 1;
/// Grain directory marker.
pub const MARKER_GD: u32 = 2;
/// Footer marker.
pub const MARKER_FOOTER: u32 = 3;

/// Smallest grain: 8 sectors (4 KiB). VMDK 5.0 "Header": "grainSize ... must be a power of 2 and must be
/// greater than 8".
pub const MIN_GRAIN_SECTORS: u64 = 8;
/// Largest grain read: 1 MiB. VMware writes 128 sectors (64 KiB) and open-vmdk reads at most that; qemu's
/// 1 GiB ceiling would let one compressed grain cost 1 GiB of memory.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest `numGTEsPerGT`: qemu refuses more than 512 ("L2 table size too big"); VMware writes 512.
pub const MAX_GTES_PER_GT: u64 = 512;
/// Largest grain directory: qemu's "L1 size too big" limit, 32 Mi entries.
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Largest virtual size: 64 TiB, above any VMware product (VMFS caps disks at 62 TiB).
pub const MAX_CAPACITY_BYTES: u64 = 64 << 40;

/// Grain tables kept in memory per extent (512 × 2 KiB = 1 MiB for standard tables).
const MAX_CACHED_TABLES: usize = 512;
/// Fewest grain tables an extent caches, however many extents share the image's budget.
const MIN_CACHED_TABLES: usize = 4;
/// Grain-directory bytes one image loads over all its sparse extents: 128 MiB, the largest single grain
/// directory ([`MAX_GD_ENTRIES`] × 4). Real split images need far less: an 8 TiB `twoGbMaxExtentSparse` disk
/// with the smallest (4 KiB) grains has 4096 directories of 4 KiB, 16 MiB in all.
pub const MAX_IMAGE_GD_BYTES: u64 = MAX_GD_ENTRIES * 4;
/// Grain tables one image caches over all its sparse extents: 16384 (32 MiB of standard 2 KiB tables), shared
/// out evenly, each extent keeping [`MIN_CACHED_TABLES`] to [`MAX_CACHED_TABLES`].
pub const MAX_IMAGE_CACHED_TABLES: usize = 16384;
// Even a descriptor with the most extents stays inside the table budget.
const _: () =
    assert!(super::descriptor::MAX_EXTENTS * MIN_CACHED_TABLES <= MAX_IMAGE_CACHED_TABLES);

/// Metadata memory the sparse extents of one image share: without it, a descriptor naming 4096 sparse
/// extents could load 4096 full grain directories (512 GiB) and cache 4096 × 1 MiB of grain tables.
#[derive(Debug, Clone)]
pub struct MetadataBudget {
    /// Grain-directory bytes still allowed.
    gd_bytes_left: u64,
    /// Grain tables each extent may cache.
    tables_per_extent: usize,
}

impl MetadataBudget {
    /// The budget of an image with `sparse_extents` sparse extents.
    pub fn for_extents(sparse_extents: usize) -> Self {
        MetadataBudget {
            gd_bytes_left: MAX_IMAGE_GD_BYTES,
            tables_per_extent: (MAX_IMAGE_CACHED_TABLES / sparse_extents.max(1))
                .clamp(MIN_CACHED_TABLES, MAX_CACHED_TABLES),
        }
    }
}
/// Inflated grains kept per extent (at most 4 MiB with the largest grain).
const MAX_CACHED_GRAINS: usize = 4;

/// `SparseExtentHeader`, 512 bytes, little-endian (VMDK 5.0, "Header").
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSparseHeader {
    /// "KDMV".
    pub magic: [u8; 4],
    /// 1, 2 (zeroed-grain GTEs) or 3 (stream-optimized / changed-block tracking).
    pub version: U32,
    /// `FLAG_*` bits.
    pub flags: U32,
    /// Extent size in sectors.
    pub capacity: U64,
    /// Grain size in sectors.
    pub grain_size: U64,
    /// Embedded descriptor start, sectors (0 = none).
    pub descriptor_offset: U64,
    /// Embedded descriptor size, sectors.
    pub descriptor_size: U64,
    /// Entries per grain table (512).
    pub num_gtes_per_gt: U32,
    /// Redundant grain directory, sectors.
    pub rgd_offset: U64,
    /// Grain directory, sectors (`GD_AT_END` for streams).
    pub gd_offset: U64,
    /// Sectors of metadata before the first grain.
    pub over_head: U64,
    /// Non-zero when the image was not closed cleanly.
    pub unclean_shutdown: u8,
    /// '\n', ' ', '\r', '\n': detects files mangled by text-mode transfers.
    pub newline_chars: [u8; 4],
    /// 0 none, 1 deflate.
    pub compress_algorithm: U16,
    /// Zero.
    pub pad: [u8; 433],
}

/// The newline-detection bytes (VMDK 5.0, "Header": singleEndLineChar .. doubleEndLineChar2).
pub const NEWLINE_CHARS: [u8; 4] = *b"\n \r\n";

/// A validated sparse extent header.
#[derive(Debug, Clone, Copy)]
pub struct SparseHeader {
    /// Header version.
    pub version: u32,
    /// Flag bits.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Embedded descriptor (offset, size) in sectors, when present.
    pub descriptor: Option<(u64, u64)>,
    /// GTEs per GT.
    pub gtes_per_gt: u64,
    /// Grain directory offset in sectors.
    pub gd_offset: u64,
    /// Metadata sectors before the first grain.
    pub over_head: u64,
    /// Unclean-shutdown byte set.
    pub unclean: bool,
    /// Deflate-compressed grains behind markers.
    pub compressed: bool,
}

impl SparseHeader {
    /// Checks the magic only (for callers that branch on it).
    pub fn has_magic(bytes: &[u8]) -> bool {
        bytes.get(..4) == Some(&MAGIC[..])
    }

    /// Parses and validates a header (the 512 bytes at offset 0, or the footer of a stream).
    pub fn parse(bytes: &[u8]) -> Result<SparseHeader> {
        let raw = RawSparseHeader::read_from_prefix(bytes)
            .map_err(|_| Error::invalid(FMT, "sparse extent header is shorter than 512 bytes"))?
            .0;
        raw.validate()
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Number of grain directory entries: ceil(capacity / (grainSize × numGTEsPerGT)).
    pub fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(self.grain_sectors * self.gtes_per_gt)
    }
}

impl RawSparseHeader {
    /// Checks every field (VMDK 5.0, "Header"), one error per rule.
    pub fn validate(&self) -> Result<SparseHeader> {
        if self.magic != MAGIC {
            return Err(Error::invalid(FMT, "sparse extent magic is not KDMV"));
        }
        let version = self.version.get();
        if !(1..=3).contains(&version) {
            return Err(Error::unsupported(
                FMT,
                format!("sparse extent version {version} (known: 1, 2, 3)"),
            ));
        }
        let flags = self.flags.get();
        let unknown = flags & INCOMPAT_FLAGS & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(Error::unsupported(
                FMT,
                format!("unknown incompatible header flags {unknown:#x}"),
            ));
        }
        if flags & FLAG_NL_DETECT != 0 && self.newline_chars != NEWLINE_CHARS {
            return Err(Error::corrupt(
                FMT,
                "the header's newline-detection bytes are wrong (the file went through a text-mode transfer)",
            ));
        }
        let algorithm = self.compress_algorithm.get();
        let compressed = match algorithm {
            0 => false,
            COMPRESSION_DEFLATE => true,
            other => {
                return Err(Error::unsupported(
                    FMT,
                    format!("compression algorithm {other} (known: 0 none, 1 deflate)"),
                ));
            }
        };
        if compressed && flags & FLAG_MARKERS == 0 {
            return Err(Error::unsupported(
                FMT,
                "compressed grains without grain markers (flag bit 17)",
            ));
        }
        let capacity = self.capacity.get();
        if capacity
            .checked_mul(SECTOR)
            .is_none_or(|b| b > MAX_CAPACITY_BYTES)
        {
            return Err(Error::limit(
                FMT,
                format!("capacity of {capacity} sectors is larger than 64 TiB"),
            ));
        }
        let grain_sectors = self.grain_size.get();
        if !grain_sectors.is_power_of_two()
            || !(MIN_GRAIN_SECTORS..=MAX_GRAIN_SECTORS).contains(&grain_sectors)
        {
            return Err(Error::invalid(
                FMT,
                format!(
                    "grain size of {grain_sectors} sectors (must be a power of two from {MIN_GRAIN_SECTORS} to {MAX_GRAIN_SECTORS})"
                ),
            ));
        }
        let gtes = u64::from(self.num_gtes_per_gt.get());
        if gtes == 0 || gtes > MAX_GTES_PER_GT {
            return Err(Error::invalid(
                FMT,
                format!("{gtes} grain table entries per table (must be 1 to {MAX_GTES_PER_GT})"),
            ));
        }
        let (doff, dsize) = (self.descriptor_offset.get(), self.descriptor_size.get());
        let descriptor = if doff != 0 && dsize != 0 {
            if dsize.saturating_mul(SECTOR) > super::descriptor::MAX_DESCRIPTOR_BYTES {
                return Err(Error::limit(
                    FMT,
                    format!("embedded descriptor of {dsize} sectors is larger than 1 MiB"),
                ));
            }
            Some((doff, dsize))
        } else {
            None
        };
        Ok(SparseHeader {
            version,
            flags,
            capacity,
            grain_sectors,
            descriptor,
            gtes_per_gt: gtes,
            gd_offset: self.gd_offset.get(),
            over_head: self.over_head.get(),
            unclean: self.unclean_shutdown != 0,
            compressed,
        })
    }
}

/// A stream-optimized marker: `val` (sectors of metadata, or the grain's LBA), `size` (0 for metadata
/// markers, else the compressed length), `type` (metadata markers only). VMDK 5.0, "Marker".
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawMarker {
    /// Sector count of the following metadata, or the grain's LBA.
    pub val: U64,
    /// 0 for metadata markers; compressed bytes for a grain marker.
    pub size: U32,
    /// `MARKER_*` for metadata markers (the first data bytes for a grain).
    pub kind: U32,
}

/// What one grain table entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// GTE 0: not in this link (the parent shows through).
    Unallocated,
    /// GTE 1 with the zeroed-grain flag: zeros.
    Zero,
    /// The grain (or its marker) starts at this byte offset of the file.
    At(u64),
}

struct TableCache {
    tables: HashMap<u64, Arc<Vec<u32>>>,
    order: VecDeque<u64>,
}

/// An open hosted sparse extent.
pub struct SparseExtent {
    storage: Arc<dyn Storage>,
    /// The header in force (the footer's, for streams).
    pub header: SparseHeader,
    gd: Vec<u32>,
    tables: Mutex<TableCache>,
    /// Most grain tables kept in `tables` (this extent's share of the image's budget).
    max_cached_tables: usize,
    grains: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

impl SparseExtent {
    /// Opens the sparse extent in `storage` (header, footer for streams, grain directory), the only sparse
    /// extent of its image.
    pub fn open(storage: Arc<dyn Storage>) -> Result<SparseExtent> {
        Self::open_in(storage, &mut MetadataBudget::for_extents(1))
    }

    /// Opens the sparse extent in `storage`, one of several of an image: its grain directory is taken from
    /// `budget`, and it caches at most its share of grain tables.
    pub fn open_in(storage: Arc<dyn Storage>, budget: &mut MetadataBudget) -> Result<SparseExtent> {
        let len = storage.len();
        let mut head = [0u8; 512];
        if len < SECTOR {
            return Err(Error::invalid(
                FMT,
                format!(
                    "{}: file too small for a sparse extent header",
                    storage.name()
                ),
            ));
        }
        storage.read_exact_at(&mut head, 0)?;
        let mut header = SparseHeader::parse(&head)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(storage.as_ref())?;
        }
        if header.over_head.saturating_mul(SECTOR) > len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{}: file truncated: {} bytes, the header counts {} sectors of metadata",
                    storage.name(),
                    len,
                    header.over_head
                ),
            ));
        }
        let gd = if header.capacity == 0 {
            Vec::new()
        } else {
            load_gd(storage.as_ref(), &header, budget)?
        };
        Ok(SparseExtent {
            storage,
            header,
            gd,
            tables: Mutex::new(TableCache {
                tables: HashMap::new(),
                order: VecDeque::new(),
            }),
            grains: Mutex::new(VecDeque::new()),
            max_cached_tables: budget.tables_per_extent,
        })
    }

    /// The embedded descriptor bytes, when the header has one.
    pub fn descriptor_bytes(&self) -> Result<Option<Vec<u8>>> {
        let Some((off, size)) = self.header.descriptor else {
            return Ok(None);
        };
        let start = off.mul_or(SECTOR, FMT, "descriptor offset")?;
        // A descriptor area may run past the end of a short file: read what exists.
        let bytes = size.mul_or(SECTOR, FMT, "descriptor size")?;
        let avail = self.storage.len().saturating_sub(start).min(bytes);
        let mut buf = vec![0u8; usize::try_from(avail).unwrap_or(0)];
        self.storage.read_exact_at(&mut buf, start)?;
        Ok(Some(buf))
    }

    /// Size of the extent in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    /// The storage holding this extent.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn table(&self, gd_index: u64) -> Result<Option<Arc<Vec<u32>>>> {
        let entry = usize::try_from(gd_index)
            .ok()
            .and_then(|i| self.gd.get(i).copied())
            .ok_or_else(|| {
                Error::input(format!("grain directory index {gd_index} out of range"))
            })?;
        if entry == 0 {
            return Ok(None);
        }
        {
            let cache = self
                .tables
                .lock()
                .map_err(|_| Error::input("VMDK table cache lock poisoned"))?;
            if let Some(t) = cache.tables.get(&gd_index) {
                return Ok(Some(t.clone()));
            }
        }
        // ok: load_gd checked every entry's table lies inside the file
        let n = self.header.gtes_per_gt as usize;
        let mut bytes = vec![0u8; n * 4];
        self.storage
            .read_exact_at(&mut bytes, u64::from(entry) * SECTOR)?;
        let table: Arc<Vec<u32>> = Arc::new(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
        let mut cache = self
            .tables
            .lock()
            .map_err(|_| Error::input("VMDK table cache lock poisoned"))?;
        if cache.order.len() >= self.max_cached_tables
            && let Some(old) = cache.order.pop_front()
        {
            cache.tables.remove(&old);
        }
        if cache.tables.insert(gd_index, table.clone()).is_none() {
            cache.order.push_back(gd_index);
        }
        Ok(Some(table))
    }

    /// What the GTE of grain `index` (extent-relative) says, checked against the file.
    pub fn grain(&self, index: u64) -> Result<Grain> {
        let per = self.header.gtes_per_gt;
        let Some(t) = self.table(index / per)? else {
            return Ok(Grain::Unallocated);
        };
        let gte = t.get((index % per) as usize).copied().unwrap_or(0);
        self.classify(index, gte)
    }

    fn classify(&self, index: u64, gte: u32) -> Result<Grain> {
        match gte {
            0 => Ok(Grain::Unallocated),
            1 if self.header.flags & FLAG_ZERO_GRAIN != 0 => Ok(Grain::Zero),
            s => {
                let off = u64::from(s) * SECTOR;
                if off >= self.storage.len() {
                    return Err(Error::corrupt(
                        FMT,
                        format!(
                            "{}: grain table entry of grain {index} points past the end of the file (sector {s})",
                            self.storage.name()
                        ),
                    ));
                }
                Ok(Grain::At(off))
            }
        }
    }

    /// Appends the allocation of `[offset, offset+len)` (extent-relative) to `map` at guest offset
    /// `base + offset`.
    pub fn extents_into(
        &self,
        base: u64,
        offset: u64,
        len: u64,
        map: &mut ExtentMap,
    ) -> Result<()> {
        let g = self.header.grain_bytes();
        let per = self.header.gtes_per_gt;
        let span = g * per;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gd_index = pos / span;
            let table_end = ((gd_index + 1) * span).min(end);
            match self.table(gd_index)? {
                None => map.push(base + pos, table_end - pos, ExtentKind::Unallocated)?,
                Some(t) => {
                    while pos < table_end {
                        let gi = pos / g;
                        let gend = ((gi + 1) * g).min(table_end);
                        let gte = t.get((gi % per) as usize).copied().unwrap_or(0);
                        let kind = match self.classify(gi, gte)? {
                            Grain::Unallocated => ExtentKind::Unallocated,
                            Grain::Zero => ExtentKind::Zero,
                            Grain::At(_) => ExtentKind::Data,
                        };
                        map.push(base + pos, gend - pos, kind)?;
                        pos = gend;
                    }
                }
            }
            pos = table_end;
        }
        Ok(())
    }

    /// Appends where `[offset, offset+len)` (extent-relative) is stored in this extent's file to `out`, at guest
    /// offset `base + offset`: allocated grains at their offset, compressed grains (stream-optimized) with none.
    pub fn host_extents_into(
        &self,
        base: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<HostExtent>,
    ) -> Result<()> {
        let g = self.header.grain_bytes();
        let per = self.header.gtes_per_gt;
        let span = g * per;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gd_index = pos / span;
            let table_end = ((gd_index + 1) * span).min(end);
            if let Some(t) = self.table(gd_index)? {
                while pos < table_end {
                    let gi = pos / g;
                    let gend = ((gi + 1) * g).min(table_end);
                    let gte = t.get((gi % per) as usize).copied().unwrap_or(0);
                    if let Grain::At(off) = self.classify(gi, gte)? {
                        let host = if self.header.compressed {
                            None
                        } else {
                            // classify checked `off` against the file; `pos % g` is below a grain
                            off.checked_add(pos % g)
                        };
                        HostExtent::push_merged(out, base + pos, gend - pos, host);
                    }
                    pos = gend;
                }
            }
            pos = table_end;
        }
        Ok(())
    }

    /// Reads `buf` at extent-relative `offset`; unallocated grains come from `backing` at guest offset
    /// `base + offset`.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        base: u64,
        backing: Option<&dyn DiskSource>,
    ) -> Result<()> {
        let g = self.header.grain_bytes();
        let per = self.header.gtes_per_gt;
        // Uncompressed grains that follow each other in the file are read with one call: (buffer start, file
        // offset, length).
        let mut pending: Option<(usize, u64, usize)> = None;
        let mut table: Option<(u64, Option<Arc<Vec<u32>>>)> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gi = pos / g;
            let within = pos % g;
            let n = ((g - within) as usize).min(buf.len() - done);
            let gd_index = gi / per;
            if table.as_ref().is_none_or(|t| t.0 != gd_index) {
                table = Some((gd_index, self.table(gd_index)?));
            }
            let grain = match table.as_ref().and_then(|t| t.1.as_ref()) {
                None => Grain::Unallocated,
                Some(t) => self.classify(gi, t.get((gi % per) as usize).copied().unwrap_or(0))?,
            };
            if let Grain::At(file_off) = grain
                && !self.header.compressed
            {
                let at = file_off + within;
                match &mut pending {
                    Some((from, foff, len))
                        if *foff + *len as u64 == at && *from + *len == done =>
                    {
                        *len += n;
                    }
                    _ => {
                        if let Some(p) = pending.take() {
                            self.read_pending(buf, p)?;
                        }
                        pending = Some((done, at, n));
                    }
                }
                done += n;
                continue;
            }
            let out = &mut buf[done..done + n];
            match grain {
                Grain::Unallocated => read_from_backing(backing, out, base + pos)?,
                Grain::Zero => out.fill(0),
                Grain::At(file_off) => {
                    let data = self.inflate(gi, file_off)?;
                    let w = within as usize;
                    let src = data.get(w..w + n).ok_or_else(|| {
                        Error::input("internal error: inflated grain shorter than a grain")
                    })?;
                    out.copy_from_slice(src);
                }
            }
            done += n;
        }
        if let Some(p) = pending {
            self.read_pending(buf, p)?;
        }
        Ok(())
    }

    /// Reads a run of uncompressed grains gathered by `read`. Data past the end of the file reads as zeros (a
    /// last grain may be cut short).
    fn read_pending(
        &self,
        buf: &mut [u8],
        (from, file_off, len): (usize, u64, usize),
    ) -> Result<()> {
        let out = from
            .checked_add(len)
            .and_then(|to| buf.get_mut(from..to))
            .ok_or_else(|| Error::input("internal error: VMDK read outside the buffer"))?;
        self.storage.read_at_zero_fill(out, file_off)?;
        Ok(())
    }

    /// Reads and inflates the compressed grain `gi` whose marker starts at `file_off`.
    fn inflate(&self, gi: u64, file_off: u64) -> Result<Arc<Vec<u8>>> {
        {
            let cache = self
                .grains
                .lock()
                .map_err(|_| Error::input("VMDK grain cache lock poisoned"))?;
            if let Some((_, d)) = cache.iter().find(|(o, _)| *o == file_off) {
                return Ok(d.clone());
            }
        }
        let name = self.storage.name();
        let g = self.header.grain_bytes();
        let flen = self.storage.len();
        let mut m = [0u8; 12];
        if file_off.checked_add(12).is_none_or(|e| e > flen) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name}: grain marker of grain {gi} at {file_off} is past the end of the file"
                ),
            ));
        }
        self.storage.read_exact_at(&mut m, file_off)?;
        let lba = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]);
        let size = u64::from(u32::from_le_bytes([m[8], m[9], m[10], m[11]]));
        let want_lba = gi * self.header.grain_sectors;
        if lba != want_lba {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name}: grain marker at {file_off} is for sector {lba}, the grain table says {want_lba}"
                ),
            ));
        }
        // Deflate never grows data by more than a few bytes per 16 KiB; twice the grain is generous.
        if size == 0 || size > 2 * g + 1024 {
            return Err(Error::corrupt(
                FMT,
                format!("{name}: compressed grain {gi} claims {size} bytes (grain is {g} bytes)"),
            ));
        }
        let data_off = file_off + 12;
        if data_off.checked_add(size).is_none_or(|e| e > flen) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name}: compressed grain {gi} ({size} bytes at {data_off}) runs past the end of the file"
                ),
            ));
        }
        let mut comp = vec![0u8; size as usize];
        self.storage.read_exact_at(&mut comp, data_off)?;
        let mut out = Vec::with_capacity(g as usize);
        flate2::read::ZlibDecoder::new(comp.as_slice())
            .take(g + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                Error::corrupt(
                    FMT,
                    format!("{name}: compressed grain {gi} does not inflate: {e}"),
                )
            })?;
        if out.len() as u64 > g {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name}: compressed grain {gi} inflates to more than one grain ({g} bytes)"
                ),
            ));
        }
        // The last grain may hold only the sectors up to the capacity (qemu writes it short).
        let needed = g.min(self.capacity_bytes().saturating_sub(gi * g));
        if (out.len() as u64) < needed {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name}: compressed grain {gi} inflates to {} bytes, expected {needed}",
                    out.len()
                ),
            ));
        }
        out.resize(g as usize, 0);
        let out = Arc::new(out);
        let mut cache = self
            .grains
            .lock()
            .map_err(|_| Error::input("VMDK grain cache lock poisoned"))?;
        if cache.len() >= MAX_CACHED_GRAINS {
            cache.pop_front();
        }
        cache.push_back((file_off, out.clone()));
        Ok(out)
    }

    /// Structural check: every allocated grain inside the file. Returns (allocated, total) grains.
    pub fn check(&self, report: &mut crate::source::CheckReport) -> Result<()> {
        let per = self.header.gtes_per_gt;
        let grains = self.header.capacity.div_ceil(self.header.grain_sectors);
        report.total_clusters += grains;
        for gd_index in 0..self.gd.len() as u64 {
            let t = match self.table(gd_index) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    report.corruption(e);
                    continue;
                }
            };
            for (i, &gte) in t.iter().enumerate() {
                let gi = gd_index * per + i as u64;
                if gi >= grains {
                    break;
                }
                match self.classify(gi, gte) {
                    Ok(Grain::At(_)) => report.allocated_clusters += 1,
                    Ok(_) => {}
                    Err(e) => report.corruption(e),
                }
            }
        }
        Ok(())
    }
}

/// Reads the footer of a stream-optimized extent: footer marker, header copy, end-of-stream marker in the
/// last three sectors (VMDK 5.0, "The Footer"; qemu reads it at EOF - 1536).
fn read_footer(storage: &dyn Storage) -> Result<SparseHeader> {
    let len = storage.len();
    let name = storage.name();
    if len < 3 * SECTOR {
        return Err(Error::corrupt(
            FMT,
            format!("{name}: gdOffset is GD_AT_END but the file is too small for a footer"),
        ));
    }
    let mut buf = vec![0u8; 3 * SECTOR as usize];
    storage.read_exact_at(&mut buf, len - 3 * SECTOR)?;
    let (footer_marker, rest) = buf.split_at(SECTOR as usize);
    let (footer, eos) = rest.split_at(SECTOR as usize);
    let fm = RawMarker::read_from_prefix(footer_marker)
        .map_err(|_| Error::input("internal error: short marker"))?
        .0;
    let em = RawMarker::read_from_prefix(eos)
        .map_err(|_| Error::input("internal error: short marker"))?
        .0;
    if fm.size.get() != 0 || fm.kind.get() != MARKER_FOOTER {
        return Err(Error::corrupt(
            FMT,
            format!("{name}: no footer marker before the footer (stream truncated?)"),
        ));
    }
    if em.val.get() != 0 || em.size.get() != 0 || em.kind.get() != MARKER_EOS {
        return Err(Error::corrupt(
            FMT,
            format!("{name}: no end-of-stream marker in the last sector (stream truncated?)"),
        ));
    }
    let h = SparseHeader::parse(footer).map_err(|e| e.context(format!("{name}: footer")))?;
    if h.gd_offset == GD_AT_END {
        return Err(Error::corrupt(
            FMT,
            format!("{name}: the footer's gdOffset is GD_AT_END too"),
        ));
    }
    Ok(h)
}

/// Loads the primary grain directory, taking its size from `budget`, and checks every entry's table lies
/// inside the file.
fn load_gd(
    storage: &dyn Storage,
    h: &SparseHeader,
    budget: &mut MetadataBudget,
) -> Result<Vec<u32>> {
    let name = storage.name();
    let entries = h.gd_entries();
    if entries > MAX_GD_ENTRIES {
        return Err(Error::limit(
            FMT,
            format!("{name}: grain directory of {entries} entries (more than {MAX_GD_ENTRIES})"),
        ));
    }
    let bytes = entries * 4;
    budget.gd_bytes_left = budget.gd_bytes_left.checked_sub(bytes).ok_or_else(|| {
        Error::limit(
            FMT,
            format!(
                "{name}: the grain directories of this image's extents add up to more than {MAX_IMAGE_GD_BYTES} bytes"
            ),
        )
    })?;
    let start = h.gd_offset.mul_or(SECTOR, FMT, "gdOffset")?;
    if start.checked_add(bytes).is_none_or(|e| e > storage.len()) {
        return Err(Error::corrupt(
            FMT,
            format!(
                "{name}: grain directory ({entries} entries at sector {}) is past the end of the file",
                h.gd_offset
            ),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    storage.read_exact_at(&mut raw, start)?;
    let gd: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let gt_bytes = h.gtes_per_gt * 4;
    for (i, &e) in gd.iter().enumerate() {
        if e != 0 && u64::from(e) * SECTOR + gt_bytes > storage.len() {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name}: grain directory entry {i} points past the end of the file (sector {e})"
                ),
            ));
        }
    }
    // Each grain table has its own place: a GD whose entries share one table would make a small file
    // describe an arbitrarily large allocation map. With distinct tables, work follows the file size.
    let mut used: Vec<u32> = gd.iter().copied().filter(|&e| e != 0).collect();
    used.sort_unstable();
    if let Some(w) = used.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::corrupt(
            FMT,
            format!(
                "{name}: two grain directory entries share the grain table at sector {}",
                w[0]
            ),
        ));
    }
    Ok(gd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> RawSparseHeader {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&MAGIC);
        let mut h = RawSparseHeader::read_from_bytes(&b[..]).unwrap();
        h.version = U32::new(1);
        h.flags = U32::new(FLAG_NL_DETECT);
        h.capacity = U64::new(2048);
        h.grain_size = U64::new(128);
        h.num_gtes_per_gt = U32::new(512);
        h.gd_offset = U64::new(1);
        h.newline_chars = NEWLINE_CHARS;
        h
    }

    #[test]
    fn extents_share_the_metadata_budget() {
        assert_eq!(
            MetadataBudget::for_extents(1).tables_per_extent,
            MAX_CACHED_TABLES
        );
        assert_eq!(
            MetadataBudget::for_extents(super::super::descriptor::MAX_EXTENTS).tables_per_extent,
            MIN_CACHED_TABLES
        );
        // 1024 grain tables' worth of capacity: a 4 KiB grain directory (all zero: no table allocated).
        let mut h = header();
        h.capacity = U64::new(128 * 512 * 1024);
        let mut file = h.as_bytes().to_vec();
        file.resize(512 + 4096, 0);
        let st: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new(file, "big-s001.vmdk"));
        let mut budget = MetadataBudget {
            gd_bytes_left: 6000,
            tables_per_extent: MIN_CACHED_TABLES,
        };
        let first = SparseExtent::open_in(st.clone(), &mut budget).unwrap();
        assert_eq!(first.gd.len(), 1024);
        assert_eq!(first.max_cached_tables, MIN_CACHED_TABLES);
        let e = SparseExtent::open_in(st, &mut budget).err().unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Limit, "{e}");
        assert!(
            e.to_string()
                .contains("grain directories of this image's extents add up"),
            "{e}"
        );
    }

    #[test]
    fn accepts_valid() {
        let h = header().validate().unwrap();
        assert_eq!(h.gd_entries(), 1);
        assert_eq!(h.grain_bytes(), 65536);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut h = header();
        h.magic = *b"KDMW";
        assert!(h.validate().is_err());
    }

    #[test]
    fn rejects_grain_sizes() {
        for g in [0u64, 1, 4, 100, 1 << 20, u64::MAX] {
            let mut h = header();
            h.grain_size = U64::new(g);
            assert!(h.validate().is_err(), "grain {g}");
        }
    }

    #[test]
    fn rejects_capacity_and_tables() {
        let mut h = header();
        h.capacity = U64::new(1 << 63);
        assert_eq!(h.validate().unwrap_err().kind(), crate::ErrorKind::Limit);
        let mut h = header();
        h.num_gtes_per_gt = U32::new(0);
        assert!(h.validate().is_err());
        let mut h = header();
        h.num_gtes_per_gt = U32::new(4096);
        assert!(h.validate().is_err());
    }

    #[test]
    fn rejects_flags_version_newlines() {
        let mut h = header();
        h.flags = U32::new(1 << 20);
        assert_eq!(
            h.validate().unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
        let mut h = header();
        h.version = U32::new(4);
        assert!(h.validate().is_err());
        let mut h = header();
        h.newline_chars = *b"\n \n\n";
        assert_eq!(h.validate().unwrap_err().kind(), crate::ErrorKind::Corrupt);
        let mut h = header();
        h.compress_algorithm = U16::new(1);
        assert!(h.validate().is_err(), "compressed without markers");
    }
}
