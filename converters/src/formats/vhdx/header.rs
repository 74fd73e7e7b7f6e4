//! VHDX header section: file type identifier, the two headers and the region table (MS-VHDX 2.2).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{FMT, Guid, MIB, checksum_ok};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// File type identifier signature at offset 0 (MS-VHDX 2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Header signature "head" (MS-VHDX 2.2.2).
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Region table signature "regi" (MS-VHDX 2.2.3).
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// The two headers live at 64 KiB and 128 KiB (MS-VHDX 2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
/// The CRC-32C of a header covers its whole 4 KiB structure (MS-VHDX 2.2.2).
pub const HEADER_SIZE: usize = 4096;
/// The region table and its copy live at 192 KiB and 256 KiB (MS-VHDX 2.2.3).
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
/// A region table is 64 KiB, checksummed as a whole (MS-VHDX 2.2.3).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// "EntryCount: MUST be less than or equal to 2,047" (MS-VHDX 2.2.3.1).
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// The header section is the first 1 MiB of the file (MS-VHDX 2.1).
pub const HEADER_SECTION_SIZE: u64 = MIB;
/// Region entry flag: the parser must understand the region to open the file (MS-VHDX 2.2.3.2).
pub const REGION_REQUIRED: u32 = 1;

/// BAT region GUID {2DC27766-F623-4200-9D64-115E9BFD4A08} (MS-VHDX 2.2.3.2).
pub const BAT_GUID: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// Metadata region GUID {8B7CA206-4790-4B9A-B8FE-575F050F886E} (MS-VHDX 2.2.3.2).
pub const METADATA_GUID: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// On-disk header (MS-VHDX 2.2.2), the first 80 bytes of a 4 KiB structure.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// "head".
    pub signature: [u8; 4],
    /// CRC-32C over 4 KiB with this field zero.
    pub checksum: U32,
    /// The valid header with the larger sequence number is current.
    pub sequence_number: U64,
    /// Changed before the first write to the file.
    pub file_write_guid: Guid,
    /// Changed before the first write of guest-visible data; differencing children name it.
    pub data_write_guid: Guid,
    /// Non-zero when the log holds entries to replay.
    pub log_guid: Guid,
    /// "MUST be set to zero".
    pub log_version: U16,
    /// "MUST be set to 1".
    pub version: U16,
    /// Log size in bytes, a multiple of 1 MiB.
    pub log_length: U32,
    /// Log file offset, a multiple of 1 MiB, at least 1 MiB.
    pub log_offset: U64,
}

/// The current header, validated.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Sequence number.
    pub sequence_number: u64,
    /// DataWriteGuid (parent linkage of differencing children).
    pub data_write_guid: Guid,
    /// LogGuid; zero means the log is empty.
    pub log_guid: Guid,
    /// Log region offset.
    pub log_offset: u64,
    /// Log region length.
    pub log_length: u64,
}

/// Parses one 4 KiB header; `None` when its signature, checksum or version is wrong (the other copy may do).
pub fn parse_header(buf: &[u8]) -> Option<RawHeader> {
    let (raw, _) = RawHeader::read_from_prefix(buf).ok()?;
    if &raw.signature != HEADER_SIGNATURE || !checksum_ok(buf.get(..HEADER_SIZE)?, 4) {
        return None;
    }
    // "Version: MUST be set to 1" (MS-VHDX 2.2.2).
    (raw.version.get() == 1).then_some(raw)
}

/// Reads both headers and picks the current one (MS-VHDX 2.2.2: the only valid header, or the valid one with the
/// larger sequence number).
pub fn read_current_header(storage: &dyn Storage) -> Result<Header> {
    let mut id = [0u8; 8];
    storage.read_exact_at(&mut id, 0)?;
    if &id != FILE_SIGNATURE {
        return Err(Error::invalid(FMT, "no 'vhdxfile' file type identifier"));
    }
    let mut raws = [None, None];
    for (slot, off) in raws.iter_mut().zip(HEADER_OFFSETS) {
        let mut buf = vec![0u8; HEADER_SIZE];
        storage.read_exact_at(&mut buf, off)?;
        *slot = parse_header(&buf);
    }
    let raw = match raws {
        [None, None] => {
            return Err(Error::corrupt(
                FMT,
                "neither header is valid (bad 'head' signature, CRC-32C or version)",
            ));
        }
        [Some(a), None] => a,
        [None, Some(b)] => b,
        [Some(a), Some(b)] => {
            let (sa, sb) = (a.sequence_number.get(), b.sequence_number.get());
            if sa > sb {
                a
            } else if sb > sa {
                b
            } else if a.as_bytes()[8..] == b.as_bytes()[8..] {
                // Disk2VHD writes two identical headers with the same sequence number (qemu accepts them).
                a
            } else {
                return Err(Error::corrupt(
                    FMT,
                    "both headers have the same sequence number but differ",
                ));
            }
        }
    };
    validate_header(&raw, storage.len())
}

fn validate_header(raw: &RawHeader, file_len: u64) -> Result<Header> {
    let log_offset = raw.log_offset.get();
    let log_length = u64::from(raw.log_length.get());
    let log_guid = raw.log_guid;
    // "LogVersion: MUST be set to zero" (MS-VHDX 2.2.2).
    if raw.log_version.get() != 0 {
        return Err(Error::unsupported(
            FMT,
            format!("log version {} (only 0 is defined)", raw.log_version.get()),
        ));
    }
    if !log_length.is_multiple_of(MIB)
        || !log_offset.is_multiple_of(MIB)
        || log_offset < HEADER_SECTION_SIZE
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "log at {log_offset} of {log_length} bytes is not 1 MiB aligned after the header section"
            ),
        ));
    }
    if log_length > 0
        && log_offset
            .checked_add(log_length)
            .is_none_or(|e| e > file_len)
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "log at {log_offset} of {log_length} bytes is outside the file ({file_len} bytes)"
            ),
        ));
    }
    if !log_guid.is_zero() && log_length == 0 {
        return Err(Error::corrupt(FMT, "log GUID is set but the log is empty"));
    }
    Ok(Header {
        sequence_number: raw.sequence_number.get(),
        data_write_guid: raw.data_write_guid,
        log_guid,
        log_offset,
        log_length,
    })
}

/// Region table header (MS-VHDX 2.2.3.1).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegionTableHeader {
    /// "regi".
    pub signature: [u8; 4],
    /// CRC-32C over the 64 KiB table with this field zero.
    pub checksum: U32,
    /// Number of entries, at most 2047.
    pub entry_count: U32,
    /// Reserved.
    pub reserved: U32,
}

/// Region table entry (MS-VHDX 2.2.3.2).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegionEntry {
    /// Region type.
    pub guid: Guid,
    /// File offset, a multiple of 1 MiB, at least 1 MiB.
    pub file_offset: U64,
    /// Length, a multiple of 1 MiB.
    pub length: U32,
    /// Bit 0: Required.
    pub flags: U32,
}

/// A byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// File offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Region {
    /// One past the last byte (regions are validated not to overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
    /// True when the two ranges share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// The regions imgshift needs.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    /// Block allocation table.
    pub bat: Region,
    /// Metadata region.
    pub metadata: Region,
}

/// Parses and validates a 64 KiB region table. `log` is the log region (regions must not overlap it).
pub fn parse_region_table(buf: &[u8], file_len: u64, log: Option<Region>) -> Result<Regions> {
    let (hdr, mut rest) = RawRegionTableHeader::read_from_prefix(buf)
        .map_err(|_| Error::invalid(FMT, "region table is truncated"))?;
    if &hdr.signature != REGION_SIGNATURE {
        return Err(Error::invalid(FMT, "region table has no 'regi' signature"));
    }
    if !checksum_ok(buf, 4) {
        return Err(Error::corrupt(FMT, "region table CRC-32C mismatch"));
    }
    let count = hdr.entry_count.get();
    if count > MAX_REGION_ENTRIES {
        return Err(Error::corrupt(
            FMT,
            format!("region table has {count} entries (at most {MAX_REGION_ENTRIES})"),
        ));
    }
    let mut seen: Vec<Region> = log.into_iter().filter(|l| l.length > 0).collect();
    let (mut bat, mut metadata) = (None, None);
    for i in 0..count {
        let (e, tail) = RawRegionEntry::read_from_prefix(rest)
            .map_err(|_| Error::corrupt(FMT, "region table entries run past the table"))?;
        rest = tail;
        let r = Region {
            offset: e.file_offset.get(),
            length: u64::from(e.length.get()),
        };
        // Messages name the region ("BAT region {GUID}"), not only its GUID.
        let name = if e.guid == BAT_GUID {
            format!("BAT region {}", e.guid)
        } else if e.guid == METADATA_GUID {
            format!("metadata region {}", e.guid)
        } else {
            format!("region {}", e.guid)
        };
        // "FileOffset: MUST be a multiple of 1 MB and MUST be at least 1 MB"; "Length: MUST be a multiple of
        // 1 MB" (MS-VHDX 2.2.3.2).
        if !r.offset.is_multiple_of(MIB) || !r.length.is_multiple_of(MIB) || r.length == 0 {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name} at {} of {} bytes is not 1 MiB aligned",
                    r.offset, r.length
                ),
            ));
        }
        if r.offset < HEADER_SECTION_SIZE {
            return Err(Error::corrupt(
                FMT,
                format!("{name} at {} overlaps the header section", r.offset),
            ));
        }
        if r.offset
            .checked_add(r.length)
            .is_none_or(|end| end > file_len)
        {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name} at {} of {} bytes is outside the file ({file_len} bytes)",
                    r.offset, r.length
                ),
            ));
        }
        if let Some(o) = seen.iter().find(|s| s.overlaps(&r)) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "{name} at {} overlaps another region or the log at {}",
                    r.offset, o.offset
                ),
            ));
        }
        seen.push(r);
        let slot = if e.guid == BAT_GUID {
            &mut bat
        } else if e.guid == METADATA_GUID {
            &mut metadata
        } else if e.flags.get() & REGION_REQUIRED != 0 {
            return Err(Error::unsupported(
                FMT,
                format!("unknown required region {} (entry {i})", e.guid),
            ));
        } else {
            continue;
        };
        if slot.replace(r).is_some() {
            return Err(Error::corrupt(
                FMT,
                format!("region {} appears twice", e.guid),
            ));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        (None, _) => Err(Error::corrupt(FMT, "region table has no BAT region")),
        (_, None) => Err(Error::corrupt(FMT, "region table has no metadata region")),
    }
}

/// Reads the region table, falling back to its copy at 256 KiB only when the first has a bad signature or
/// checksum (a table that checks out but breaks a rule is an error, not a reason to look elsewhere).
pub fn read_regions(storage: &dyn Storage, header: &Header) -> Result<Regions> {
    let log = Region {
        offset: header.log_offset,
        length: header.log_length,
    };
    let mut buf = vec![0u8; REGION_TABLE_SIZE];
    for off in REGION_TABLE_OFFSETS {
        storage.read_exact_at(&mut buf, off)?;
        if buf.starts_with(REGION_SIGNATURE) && checksum_ok(&buf, 4) {
            return parse_region_table(&buf, storage.len(), Some(log));
        }
    }
    Err(Error::corrupt(
        FMT,
        "neither region table is valid (bad 'regi' signature or CRC-32C)",
    ))
}
