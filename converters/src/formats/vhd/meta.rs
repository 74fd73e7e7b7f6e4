//! VHD on-disk structures: the hard disk footer, the dynamic disk header and its parent locators, checksums and
//! the CHS geometry rules. Parsers take `&[u8]` only (no I/O): `Raw*` views → `validate()` → typed values.
//!
//! Section names refer to Microsoft's "Virtual Hard Disk Image Format Specification" (version 1.0, 2006).

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};

/// Format name used in messages.
pub(crate) const FMT: &str = "vpc";

/// Sector size of every VHD offset and bitmap bit (spec: "Hard Disk Footer Format", sizes are in bytes,
/// BAT entries in 512-byte sectors).
pub const SECTOR: u64 = 512;
/// Size of the hard disk footer (spec: "Hard Disk Footer Format": 512 bytes; pre-2004 images used 511).
pub const FOOTER_SIZE: u64 = 512;
/// Size of the dynamic disk header (spec: "Dynamic Disk Header Format": 1024 bytes).
pub const DYN_HEADER_SIZE: u64 = 1024;
/// Footer cookie (spec: "Cookie").
pub const COOKIE: &[u8; 8] = b"conectix";
/// Dynamic disk header cookie (spec: "Dynamic Disk Header Format", "Cookie").
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// File format version 1.0 (spec: "File Format Version": major in the high 16 bits).
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Dynamic header version 1.0 (spec: "Header Version").
pub const DYN_HEADER_VERSION: u32 = 0x0001_0000;
/// "Features": bit 1 is reserved and must always be set (spec: "Features").
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// "Data Offset" of a fixed disk: no further structure (qemu writes all 64 bits set, as MS tools expect).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// BAT entry of a block that is not allocated (spec: "Block Allocation Table").
pub const BAT_UNALLOCATED: u32 = 0xFFFF_FFFF;
/// VHD time stamps count seconds since 2000-01-01 00:00:00 UTC (spec: "Time Stamp").
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// Largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track (spec appendix "CHS Calculation").
pub const MAX_CHS: Chs = Chs {
    cylinders: 65535,
    heads: 16,
    sectors: 255,
};
/// `MAX_CHS` in sectors. qemu: an image with this geometry is sized by `current_size` whatever its creator.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// Largest dynamic/differencing disk, in sectors: qemu's `VHD_MAX_SECTORS` (0xff000000 = 2040 GiB). BAT entries
/// are 32-bit sector offsets, so block data cannot lie beyond 2 TiB in the file anyway.
pub const MAX_SPARSE_SECTORS: u64 = 0xff00_0000;
/// Smallest dynamic block size accepted (qemu only asks for >= 512; Hyper-V uses 512 KiB or 2 MiB).
pub const MIN_BLOCK_SIZE: u64 = 4096;
/// Largest dynamic block size accepted (not bounded by the spec; 256 MiB keeps a block's bitmap at 64 KiB).
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Default (and only qemu-written) block size: 2 MiB (spec: "Block Size").
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Most BAT entries read into memory: 4 Mi entries = 16 MiB (covers 2040 GiB with 512 KiB blocks).
pub const MAX_BAT_ENTRIES: u64 = 4 << 20;
/// Longest parent locator read (a UTF-16 Windows path of 32767 characters is 64 KiB).
pub const MAX_LOCATOR_BYTES: u64 = 64 << 10;

/// Disk type (spec: "Disk Type").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the data, then the footer.
    Fixed,
    /// 3: footer copy, dynamic header, BAT, blocks, footer.
    Dynamic,
    /// 4: a dynamic disk whose unallocated sectors come from a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// qemu-img's `subformat` name.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads, sectors per track (spec: "Disk Geometry").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Chs {
    /// Sectors the geometry addresses.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }
}

/// The hard disk footer as stored: 512 bytes, big-endian (spec: "Hard Disk Footer Format").
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone)]
#[repr(C)]
pub struct RawFooter {
    /// "conectix".
    pub cookie: [u8; 8],
    /// Bit 0 temporary disk, bit 1 reserved (always set).
    pub features: U32,
    /// 0x00010000.
    pub version: U32,
    /// Absolute offset of the dynamic header; all ones for fixed disks.
    pub data_offset: U64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: U32,
    /// Application that created the image ("vpc ", "win ", "qemu", "qem2", ...).
    pub creator_app: [u8; 4],
    /// Version of that application.
    pub creator_version: U32,
    /// "Wi2k" or "Mac ".
    pub creator_os: [u8; 4],
    /// Size at creation, bytes.
    pub original_size: U64,
    /// Current size, bytes.
    pub current_size: U64,
    /// Cylinders.
    pub cylinders: U16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: U32,
    /// Ones' complement of the byte sum of the footer with this field zeroed.
    pub checksum: U32,
    /// Identifies the disk; a child's parent UUID names it.
    pub unique_id: [u8; 16],
    /// 1 when the disk is in a saved state.
    pub saved_state: u8,
    /// Zeros.
    pub reserved: [u8; 427],
}

/// One parent locator entry (spec: "Dynamic Disk Header Format", "Parent Locator Entries").
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct RawLocator {
    /// Platform code: "W2ru", "W2ku", "MacX", "Mac ", or zero for an unused entry.
    pub platform_code: [u8; 4],
    /// Space reserved for the locator (sectors per spec; some writers store bytes).
    pub data_space: U32,
    /// Length of the locator in bytes.
    pub data_length: U32,
    /// Zero.
    pub reserved: U32,
    /// Absolute file offset of the locator.
    pub data_offset: U64,
}

/// The dynamic disk header as stored: 1024 bytes, big-endian (spec: "Dynamic Disk Header Format").
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone)]
#[repr(C)]
pub struct RawDynHeader {
    /// "cxsparse".
    pub cookie: [u8; 8],
    /// Unused; all ones.
    pub data_offset: U64,
    /// Absolute offset of the BAT.
    pub table_offset: U64,
    /// 0x00010000.
    pub header_version: U32,
    /// BAT entries.
    pub max_table_entries: U32,
    /// Bytes of data per block (power of two, 2 MiB by default).
    pub block_size: U32,
    /// Ones' complement of the byte sum of the header with this field zeroed.
    pub checksum: U32,
    /// Differencing disks: the parent's footer unique id.
    pub parent_unique_id: [u8; 16],
    /// Differencing disks: the parent's modification time.
    pub parent_timestamp: U32,
    /// Zero.
    pub reserved1: U32,
    /// Differencing disks: the parent's file name, UTF-16 big-endian.
    pub parent_name: [u8; 512],
    /// Where to find the parent.
    pub locators: [RawLocator; 8],
    /// Zeros.
    pub reserved2: [u8; 256],
}

/// Ones' complement of the byte sum (spec: "Checksum"); the caller zeroes the checksum field first.
pub fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

/// A validated footer.
#[derive(Debug, Clone)]
pub struct Footer {
    /// Disk type.
    pub disk_type: DiskType,
    /// Offset of the dynamic header (sparse disks).
    pub data_offset: u64,
    /// Creator application, 4 bytes.
    pub creator_app: [u8; 4],
    /// Current size field, bytes.
    pub current_size: u64,
    /// Geometry field.
    pub chs: Chs,
    /// Unique id.
    pub unique_id: [u8; 16],
    /// Saved-state flag.
    pub saved_state: bool,
    /// Time stamp (seconds since 2000-01-01).
    pub timestamp: u32,
}

impl RawFooter {
    /// Parses 512 bytes.
    pub fn parse(bytes: &[u8]) -> Result<RawFooter> {
        RawFooter::read_from_bytes(bytes)
            .map_err(|_| Error::invalid(FMT, "footer is shorter than 512 bytes"))
    }

    /// Checks cookie, checksum, version and disk type.
    pub fn validate(&self) -> Result<Footer> {
        if &self.cookie != COOKIE {
            return Err(Error::invalid(FMT, "footer cookie is not 'conectix'"));
        }
        let mut zeroed = self.clone();
        zeroed.checksum = U32::new(0);
        let want = checksum(zeroed.as_bytes());
        if want != self.checksum.get() {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "footer checksum is {:#010x}, the footer sums to {want:#010x}",
                    self.checksum.get()
                ),
            ));
        }
        let version = self.version.get();
        if version >> 16 != FILE_FORMAT_VERSION >> 16 {
            return Err(Error::unsupported(
                FMT,
                format!("file format version {:#010x} (only 1.x exists)", version),
            ));
        }
        let disk_type = match self.disk_type.get() {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            other => {
                return Err(Error::unsupported(
                    FMT,
                    format!("disk type {other} (2 fixed, 3 dynamic and 4 differencing exist)"),
                ));
            }
        };
        Ok(Footer {
            disk_type,
            data_offset: self.data_offset.get(),
            creator_app: self.creator_app,
            current_size: self.current_size.get(),
            chs: Chs {
                cylinders: self.cylinders.get(),
                heads: self.heads,
                sectors: self.sectors,
            },
            unique_id: self.unique_id,
            saved_state: self.saved_state != 0,
            timestamp: self.timestamp.get(),
        })
    }
}

impl Footer {
    /// True when qemu sizes this disk by its CHS geometry rather than `current_size`.
    ///
    /// qemu `vpc_ignore_current_size()` (block/vpc.c, since 10.0): Virtual PC ("vpc ") and old qemu ("qemu")
    /// size disks by geometry; every other creator ("win " Hyper-V, "qem2" qemu force_size, "d2v " Disk2vhd,
    /// "tap\0" XenServer, "CTXS" XenConverter, "wa\0\0" Azure, ...) by `current_size`. A disk with the maximum
    /// geometry 65535/16/255 is always sized by `current_size` (its CHS cannot describe it).
    pub fn sized_by_chs(&self) -> bool {
        let chs_creator = &self.creator_app == b"vpc " || &self.creator_app == b"qemu";
        chs_creator && self.chs.total_sectors() != MAX_GEOMETRY_SECTORS
    }

    /// Virtual size in bytes, by qemu's rules (whole sectors).
    pub fn virtual_size(&self) -> u64 {
        if self.sized_by_chs() {
            self.chs.total_sectors() * SECTOR
        } else {
            self.current_size / SECTOR * SECTOR
        }
    }

    /// The creator application as text (non-printable bytes escaped).
    pub fn creator_text(&self) -> String {
        self.creator_app
            .iter()
            .flat_map(|b| std::ascii::escape_default(*b))
            .map(char::from)
            .collect()
    }
}

/// Checks a footer read apart from its image (a cloud's copy of a fixed disk): `bytes` must be a valid footer
/// (cookie, checksum, version 1.x: [`RawFooter::validate`]) of a fixed disk (disk type 2, no data offset) whose
/// current size is `data_size`, the bytes before it. Returns the footer.
pub fn check_fixed_footer(bytes: &[u8], data_size: u64) -> Result<Footer> {
    if bytes.len() as u64 != FOOTER_SIZE {
        return Err(Error::invalid(
            FMT,
            format!("a footer is {FOOTER_SIZE} bytes, not {}", bytes.len()),
        ));
    }
    let footer = RawFooter::parse(bytes)?.validate()?;
    if footer.disk_type != DiskType::Fixed {
        return Err(Error::invalid(
            FMT,
            format!(
                "disk type {} ({}), not 2 (fixed)",
                footer.disk_type.code(),
                footer.disk_type.name()
            ),
        ));
    }
    if footer.data_offset != NO_DATA_OFFSET {
        return Err(Error::invalid(
            FMT,
            format!(
                "the footer has a data offset ({:#x}): not a fixed disk",
                footer.data_offset
            ),
        ));
    }
    if footer.current_size != data_size {
        return Err(Error::invalid(
            FMT,
            format!(
                "the footer's current size is {} bytes, the data before it {data_size}",
                footer.current_size
            ),
        ));
    }
    Ok(footer)
}

/// Parent locator platform codes (spec: "Parent Locator Entries", "Platform Code").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// "W2ru": relative Windows path, UTF-16LE.
    W2ru,
    /// "W2ku": absolute Windows path, UTF-16LE.
    W2ku,
    /// "MacX": file URL, UTF-8.
    MacX,
}

/// A validated parent locator entry.
#[derive(Debug, Clone, Copy)]
pub struct Locator {
    /// Platform.
    pub platform: Platform,
    /// File offset of the locator bytes.
    pub offset: u64,
    /// Length of the locator bytes.
    pub len: u64,
}

/// A validated dynamic disk header.
#[derive(Debug, Clone)]
pub struct DynHeader {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// BAT entries.
    pub max_table_entries: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Parent unique id.
    pub parent_unique_id: [u8; 16],
    /// Parent name (UTF-16BE decoded), when set.
    pub parent_name: Option<String>,
    /// Usable parent locators, in table order (unknown platform codes are skipped).
    pub locators: Vec<Locator>,
}

impl RawDynHeader {
    /// Parses 1024 bytes.
    pub fn parse(bytes: &[u8]) -> Result<RawDynHeader> {
        RawDynHeader::read_from_bytes(bytes)
            .map_err(|_| Error::invalid(FMT, "dynamic header is shorter than 1024 bytes"))
    }

    /// Checks cookie, checksum, version and block size; `file_len` bounds the locators.
    pub fn validate(&self, file_len: u64) -> Result<DynHeader> {
        if &self.cookie != DYN_COOKIE {
            return Err(Error::invalid(
                FMT,
                "dynamic disk header cookie is not 'cxsparse'",
            ));
        }
        let mut zeroed = self.clone();
        zeroed.checksum = U32::new(0);
        let want = checksum(zeroed.as_bytes());
        if want != self.checksum.get() {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "dynamic header checksum is {:#010x}, the header sums to {want:#010x}",
                    self.checksum.get()
                ),
            ));
        }
        let version = self.header_version.get();
        if version >> 16 != DYN_HEADER_VERSION >> 16 {
            return Err(Error::unsupported(
                FMT,
                format!("dynamic header version {version:#010x}"),
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
        let mut locators = Vec::new();
        for (i, l) in self.locators.iter().enumerate() {
            let platform = match &l.platform_code {
                b"W2ru" => Platform::W2ru,
                b"W2ku" => Platform::W2ku,
                b"MacX" => Platform::MacX,
                // Unused entries, "Mac " alias blobs and the deprecated "Wi2r"/"Wi2k" are not followed.
                _ => continue,
            };
            let len = u64::from(l.data_length.get());
            let offset = l.data_offset.get();
            if len == 0 {
                continue;
            }
            if len > MAX_LOCATOR_BYTES {
                return Err(Error::limit(
                    FMT,
                    format!("parent locator {i} is {len} bytes (at most {MAX_LOCATOR_BYTES})"),
                ));
            }
            if offset.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(
                    FMT,
                    format!("parent locator {i} at {offset}+{len} lies past the end of the file"),
                ));
            }
            locators.push(Locator {
                platform,
                offset,
                len,
            });
        }
        let name = decode_utf16(&self.parent_name, false);
        Ok(DynHeader {
            table_offset: self.table_offset.get(),
            max_table_entries: u64::from(self.max_table_entries.get()),
            block_size,
            parent_unique_id: self.parent_unique_id,
            parent_name: (!name.is_empty()).then_some(name),
            locators,
        })
    }
}

/// Decodes UTF-16 (little- or big-endian), stopping at the first NUL; invalid units become U+FFFD.
pub fn decode_utf16(bytes: &[u8], little_endian: bool) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|c| {
            if little_endian {
                u16::from_le_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Bytes of the sector bitmap in front of each block: one bit per sector, padded to a whole sector
/// (spec: "Block Allocation Table", "sector bitmap").
pub fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// The geometry the spec's CHS algorithm gives for `total_sectors` (spec appendix "CHS Calculation"; it may
/// round down).
pub fn chs_for(total_sectors: u64) -> Chs {
    let ts = total_sectors.min(MAX_GEOMETRY_SECTORS);
    let (sectors, heads, cyl_times_heads) = if ts >= 65535 * 16 * 63 {
        (255u64, 16u64, ts / 255)
    } else {
        let mut spt = 17u64;
        let mut cth = ts / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = ts / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = ts / spt;
        }
        (spt, heads, cth)
    };
    Chs {
        cylinders: u16::try_from(cyl_times_heads / heads).unwrap_or(u16::MAX),
        heads: u8::try_from(heads).unwrap_or(16),
        sectors: u8::try_from(sectors).unwrap_or(255),
    }
}

/// qemu-img's CHS rounding for a new image of `size` bytes (a multiple of 512): the smallest geometry from the
/// spec's algorithm whose sector count is at least the size (qemu `calculate_rounded_image_size`). Returns the
/// geometry and the virtual size in bytes; a size beyond the CHS range gets the maximum geometry and keeps its
/// exact size (then `current_size` is what counts).
pub fn round_to_chs(size: u64) -> (Chs, u64) {
    let want = (size / SECTOR).min(MAX_GEOMETRY_SECTORS);
    let mut chs = Chs {
        cylinders: 0,
        heads: 0,
        sectors: 0,
    };
    // The algorithm loses less than one cylinder (at most 16 × 255 sectors) per step, so this ends well
    // before the cap; the cap only guards the loop.
    let mut i = 0u64;
    while chs.total_sectors() < want && i < 1 << 20 {
        chs = chs_for(want + i);
        i += 1;
    }
    if chs.total_sectors() < want || chs.total_sectors() == MAX_GEOMETRY_SECTORS {
        (MAX_CHS, size)
    } else {
        (chs, chs.total_sectors() * SECTOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer_bytes(app: &[u8; 4], chs: Chs, size: u64, disk_type: u32) -> Vec<u8> {
        let mut f = RawFooter::new_zeroed();
        f.cookie = *COOKIE;
        f.features = U32::new(FEATURES_RESERVED);
        f.version = U32::new(FILE_FORMAT_VERSION);
        f.creator_app = *app;
        f.current_size = U64::new(size);
        f.original_size = U64::new(size);
        f.cylinders = U16::new(chs.cylinders);
        f.heads = chs.heads;
        f.sectors = chs.sectors;
        f.disk_type = U32::new(disk_type);
        let c = checksum(f.as_bytes());
        f.checksum = U32::new(c);
        f.as_bytes().to_vec()
    }

    use zerocopy::FromZeros;

    #[test]
    fn sizes_follow_the_creator() {
        let chs = chs_for(20480);
        let by_chs = chs.total_sectors() * 512;
        for (app, want) in [
            (b"vpc ", by_chs),
            (b"qemu", by_chs),
            (b"qem2", 20480 * 512),
            (b"win ", 20480 * 512),
            (b"wa\0\0", 20480 * 512),
        ] {
            let f = RawFooter::parse(&footer_bytes(app, chs, 20480 * 512, 2))
                .unwrap()
                .validate()
                .unwrap();
            assert_eq!(f.virtual_size(), want, "{app:?}");
        }
        // maximum geometry: current_size even for "qemu"
        let f = RawFooter::parse(&footer_bytes(b"qemu", MAX_CHS, 1 << 40, 3))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(f.virtual_size(), 1 << 40);
    }

    #[test]
    fn rejects_bad_checksum_cookie_and_type() {
        let mut b = footer_bytes(b"qemu", MAX_CHS, 1 << 20, 2);
        b[100] ^= 1;
        let e = RawFooter::parse(&b).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let mut b = footer_bytes(b"qemu", MAX_CHS, 1 << 20, 2);
        b[0] = b'C';
        assert!(RawFooter::parse(&b).unwrap().validate().is_err());
        let b = footer_bytes(b"qemu", MAX_CHS, 1 << 20, 5);
        assert!(RawFooter::parse(&b).unwrap().validate().is_err());
    }

    #[test]
    fn rejects_bad_block_size() {
        for bs in [0u32, 3 << 20, 512, 1 << 30] {
            let mut h = RawDynHeader::new_zeroed();
            h.cookie = *DYN_COOKIE;
            h.header_version = U32::new(DYN_HEADER_VERSION);
            h.block_size = U32::new(bs);
            let c = checksum(h.as_bytes());
            h.checksum = U32::new(c);
            assert!(h.validate(1 << 30).is_err(), "block size {bs}");
        }
    }

    #[test]
    fn geometry_matches_qemu_examples() {
        // `qemu-img create -f vpc` sizes observed with qemu 10.0.
        for (req, got) in [
            (1u64 << 20, 1_079_296u64),
            (10 << 20, 10_514_432),
            (100 << 20, 104_865_792),
            (1_000_000_000, 1_000_194_048),
            (5 << 30, 5_368_946_688),
            (200 << 30, 200 << 30),
        ] {
            assert_eq!(round_to_chs(req).1, got, "size {req}");
        }
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(256 << 20), 65536);
    }
}
