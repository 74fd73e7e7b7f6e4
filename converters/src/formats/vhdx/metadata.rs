//! VHDX metadata region: the metadata table and the known items (MS-VHDX 2.6).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::header::Region;
use super::{FMT, Guid, MIB, read_u32, read_u64};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Metadata table signature "metadata" (MS-VHDX 2.6.1.1).
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// The metadata table occupies the first 64 KiB of the region (MS-VHDX 2.6.1).
pub const TABLE_SIZE: usize = 64 * 1024;
/// "EntryCount: MUST be less than or equal to 2,047" (MS-VHDX 2.6.1.1).
pub const MAX_ENTRIES: u16 = 2047;
/// "Length: MUST be less than or equal to 1 MB" (MS-VHDX 2.6.1.2).
pub const MAX_ITEM_LENGTH: u32 = 1 << 20;
/// Entry flag bits (MS-VHDX 2.6.1.2).
pub const FLAG_IS_USER: u32 = 1;
/// The item describes the virtual disk (not the file).
pub const FLAG_IS_VIRTUAL_DISK: u32 = 2;
/// The parser must understand the item to open the file.
pub const FLAG_IS_REQUIRED: u32 = 4;

/// File Parameters item {CAA16737-FA36-4D43-B3B6-33F0AA44E76B} (MS-VHDX 2.6.2.1).
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Virtual Disk Size item {2FA54224-CD1B-4876-B211-5DBED83BF4B8} (MS-VHDX 2.6.2.2).
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Page 83 Data item {BECA12AB-B2E6-4523-93EF-C309E000C746} (MS-VHDX 2.6.2.3).
pub const PAGE_83_DATA: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Logical Sector Size item {8141BF1D-A96F-4709-BA47-F233A8FAAB5F} (MS-VHDX 2.6.2.4).
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Physical Sector Size item {CDA348C7-445D-4471-9CC9-E9885251C556} (MS-VHDX 2.6.2.5).
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Parent Locator item {A8D35F2D-B30B-454D-ABF7-D3D84834AB0C} (MS-VHDX 2.6.2.6).
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// VHDX parent locator type {B04AEFB7-D19E-4A81-B789-25B8E9445913} (MS-VHDX 2.6.2.6.3).
pub const VHDX_PARENT_TYPE: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// File Parameters: LeaveBlocksAllocated (fixed VHDX) (MS-VHDX 2.6.2.1).
pub const PARAM_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File Parameters: HasParent (differencing VHDX).
pub const PARAM_HAS_PARENT: u32 = 2;
/// "BlockSize: MUST be at least 1 MB and not greater than 256 MB, and MUST be a power of 2" (MS-VHDX 2.6.2.1).
pub const MIN_BLOCK_SIZE: u64 = MIB;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u64 = 256 * MIB;
/// "VirtualDiskSize ... MUST be ... less than or equal to 64 TB" (MS-VHDX 2.6.2.2; qemu VHDX_MAX_IMAGE_SIZE).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Most key/value pairs read from a parent locator (the item is at most 1 MiB; each pair takes 12 bytes).
pub const MAX_LOCATOR_ENTRIES: u16 = 1024;

/// Metadata table header (MS-VHDX 2.6.1.1).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawTableHeader {
    /// "metadata".
    pub signature: [u8; 8],
    /// Reserved.
    pub reserved: U16,
    /// Number of entries, at most 2047.
    pub entry_count: U16,
    /// Reserved.
    pub reserved2: [u8; 20],
}

/// Metadata table entry (MS-VHDX 2.6.1.2).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawEntry {
    /// Item GUID.
    pub item_id: Guid,
    /// Offset from the start of the region, at least 64 KiB (0 when length is 0).
    pub offset: U32,
    /// Length, at most 1 MiB.
    pub length: U32,
    /// IsUser, IsVirtualDisk, IsRequired.
    pub flags: U32,
    /// Reserved.
    pub reserved: U32,
}

/// The parsed metadata items.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Payload block size in bytes.
    pub block_size: u64,
    /// LeaveBlocksAllocated (a fixed VHDX).
    pub leave_blocks_allocated: bool,
    /// HasParent (a differencing VHDX).
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u64,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u64,
    /// SCSI page 83 identifier.
    pub page83: Guid,
    /// Parent locator key/value pairs (differencing disks).
    pub parent_locator: Option<Vec<(String, String)>>,
}

/// A located item: region-relative offset and length.
#[derive(Debug, Clone, Copy)]
struct Item {
    offset: u64,
    length: u64,
}

/// Reads the metadata table and items of `region`.
pub fn read_metadata(storage: &dyn Storage, region: Region) -> Result<Metadata> {
    let mut table = vec![0u8; TABLE_SIZE.min(usize::try_from(region.length).unwrap_or(TABLE_SIZE))];
    storage.read_exact_at(&mut table, region.offset)?;
    let items = parse_table(&table, region.length)?;
    let read_item = |item: Option<Item>, name: &str, min: u64| -> Result<Vec<u8>> {
        let item = item.ok_or_else(|| {
            Error::corrupt(FMT, format!("required metadata item {name} is missing"))
        })?;
        if item.length < min {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "metadata item {name} is {} bytes (at least {min})",
                    item.length
                ),
            ));
        }
        // bounded by MAX_ITEM_LENGTH in parse_table
        let mut buf = vec![0u8; item.length as usize];
        storage.read_exact_at(&mut buf, region.offset + item.offset)?;
        Ok(buf)
    };
    let params = read_item(items.file_parameters, "File Parameters", 8)?;
    let block_size = u64::from(read_u32(&params, 0)?);
    let bits = read_u32(&params, 4)?;
    let vsize = read_item(items.virtual_disk_size, "Virtual Disk Size", 8)?;
    let virtual_size = read_u64(&vsize, 0)?;
    let page83 = read_item(items.page83, "Page 83 Data", 16)?;
    let page83 = Guid::read(&page83, 0)?;
    let lss = read_item(items.logical_sector_size, "Logical Sector Size", 4)?;
    let logical_sector_size = u64::from(read_u32(&lss, 0)?);
    let pss = read_item(items.physical_sector_size, "Physical Sector Size", 4)?;
    let physical_sector_size = u64::from(read_u32(&pss, 0)?);

    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(Error::corrupt(
            FMT,
            format!("block size {block_size} is not a power of two between 1 MiB and 256 MiB"),
        ));
    }
    // "LogicalSectorSize: MUST be set to 512 or 4096" (MS-VHDX 2.6.2.4); same for the physical size (2.6.2.5).
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(Error::corrupt(
            FMT,
            format!("logical sector size {logical_sector_size} (must be 512 or 4096)"),
        ));
    }
    if physical_sector_size != 512 && physical_sector_size != 4096 {
        return Err(Error::corrupt(
            FMT,
            format!("physical sector size {physical_sector_size} (must be 512 or 4096)"),
        ));
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::limit(
            FMT,
            format!("virtual size {virtual_size} is larger than 64 TiB"),
        ));
    }
    // "VirtualDiskSize: MUST be a multiple of the LogicalSectorSize" (MS-VHDX 2.6.2.2).
    if !virtual_size.is_multiple_of(logical_sector_size) {
        return Err(Error::corrupt(
            FMT,
            format!(
                "virtual size {virtual_size} is not a multiple of the {logical_sector_size}-byte sector"
            ),
        ));
    }
    let has_parent = bits & PARAM_HAS_PARENT != 0;
    let parent_locator = if has_parent {
        let raw = read_item(items.parent_locator, "Parent Locator", 20)?;
        Some(parse_parent_locator(&raw)?)
    } else {
        None
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: bits & PARAM_LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        page83,
        parent_locator,
    })
}

#[derive(Default)]
struct Items {
    file_parameters: Option<Item>,
    virtual_disk_size: Option<Item>,
    page83: Option<Item>,
    logical_sector_size: Option<Item>,
    physical_sector_size: Option<Item>,
    parent_locator: Option<Item>,
}

fn parse_table(table: &[u8], region_len: u64) -> Result<Items> {
    let (hdr, mut rest) = RawTableHeader::read_from_prefix(table)
        .map_err(|_| Error::corrupt(FMT, "metadata region is too small"))?;
    if &hdr.signature != METADATA_SIGNATURE {
        return Err(Error::invalid(
            FMT,
            "metadata table has no 'metadata' signature",
        ));
    }
    let count = hdr.entry_count.get();
    if count > MAX_ENTRIES {
        return Err(Error::corrupt(
            FMT,
            format!("metadata table has {count} entries (at most {MAX_ENTRIES})"),
        ));
    }
    let mut items = Items::default();
    for _ in 0..count {
        let (e, tail) = RawEntry::read_from_prefix(rest)
            .map_err(|_| Error::corrupt(FMT, "metadata entries run past the table"))?;
        rest = tail;
        let (offset, length) = (u64::from(e.offset.get()), u64::from(e.length.get()));
        let flags = e.flags.get();
        let slot = if e.item_id == FILE_PARAMETERS {
            &mut items.file_parameters
        } else if e.item_id == VIRTUAL_DISK_SIZE {
            &mut items.virtual_disk_size
        } else if e.item_id == PAGE_83_DATA {
            &mut items.page83
        } else if e.item_id == LOGICAL_SECTOR_SIZE {
            &mut items.logical_sector_size
        } else if e.item_id == PHYSICAL_SECTOR_SIZE {
            &mut items.physical_sector_size
        } else if e.item_id == PARENT_LOCATOR {
            &mut items.parent_locator
        } else if flags & FLAG_IS_REQUIRED != 0 {
            return Err(Error::unsupported(
                FMT,
                format!("unknown required metadata item {}", e.item_id),
            ));
        } else {
            continue;
        };
        if flags & FLAG_IS_USER != 0 {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "system metadata item {} is flagged as user metadata",
                    e.item_id
                ),
            ));
        }
        // "Offset: MUST be at least 64 KB"; "Length: MUST be less than or equal to 1 MB"; the item lies inside
        // the region (MS-VHDX 2.6.1.2).
        if length > u64::from(MAX_ITEM_LENGTH)
            || (length > 0 && offset < TABLE_SIZE as u64)
            || offset + length > region_len
        {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "metadata item {} at {offset} of {length} bytes is outside the metadata region",
                    e.item_id
                ),
            ));
        }
        if slot.replace(Item { offset, length }).is_some() {
            return Err(Error::corrupt(
                FMT,
                format!("metadata item {} appears twice", e.item_id),
            ));
        }
    }
    Ok(items)
}

/// Parses a parent locator item (MS-VHDX 2.6.2.6): a header, key/value entries, UTF-16LE strings.
pub fn parse_parent_locator(raw: &[u8]) -> Result<Vec<(String, String)>> {
    let locator_type = Guid::read(raw, 0)?;
    if locator_type != VHDX_PARENT_TYPE {
        return Err(Error::unsupported(
            FMT,
            format!("parent locator type {locator_type} (only VHDX parents are known)"),
        ));
    }
    let count = u16::from_le_bytes([*raw.get(18).unwrap_or(&0), *raw.get(19).unwrap_or(&0)]);
    if count > MAX_LOCATOR_ENTRIES {
        return Err(Error::limit(
            FMT,
            format!("parent locator has {count} entries (at most {MAX_LOCATOR_ENTRIES})"),
        ));
    }
    let mut out = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let at = 20 + 12 * i;
        let key_offset = read_u32(raw, at)? as usize;
        let value_offset = read_u32(raw, at + 4)? as usize;
        let key_len = usize::from(u16::from_le_bytes([
            *raw.get(at + 8).unwrap_or(&0),
            *raw.get(at + 9).unwrap_or(&0),
        ]));
        let value_len = usize::from(u16::from_le_bytes([
            *raw.get(at + 10).unwrap_or(&0),
            *raw.get(at + 11).unwrap_or(&0),
        ]));
        if raw.len() < at + 12 {
            return Err(Error::corrupt(
                FMT,
                "parent locator entries run past the item",
            ));
        }
        let key = utf16_at(raw, key_offset, key_len, "key")?;
        let value = utf16_at(raw, value_offset, value_len, "value")?;
        if out.iter().any(|(k, _): &(String, String)| k == &key) {
            return Err(Error::corrupt(
                FMT,
                format!("parent locator key '{key}' appears twice"),
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// A UTF-16LE string of `len` bytes at `off` (MS-VHDX 2.6.2.6.2: "KeyLength ... MUST be greater than zero").
fn utf16_at(raw: &[u8], off: usize, len: usize, what: &str) -> Result<String> {
    let bytes = off
        .checked_add(len)
        .and_then(|end| raw.get(off..end))
        .filter(|b| !b.is_empty() && b.len() % 2 == 0)
        .ok_or_else(|| {
            Error::corrupt(
                FMT,
                format!("parent locator {what} at {off} of {len} bytes is outside the item"),
            )
        })?;
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units)
        .map_err(|_| Error::corrupt(FMT, format!("parent locator {what} is not valid UTF-16")))
}
