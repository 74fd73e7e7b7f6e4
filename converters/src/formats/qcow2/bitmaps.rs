//! Persistent dirty bitmaps: the bitmaps header extension, the bitmap directory, bitmap tables and bitmap data.
//!
//! Spec: qemu `docs/interop/qcow2.txt`, "Bitmaps extension" (header extension 0x23852875 and autoclear bit 0)
//! and "Bitmaps" ("Bitmap directory", "Bitmap table", "Bitmap data", "Dirty tracking bitmaps"); limits from qemu
//! `block/qcow2.h` and `block/qcow2-bitmap.c`. Read-only: nothing here writes or clears a flag.
//!
//! Bounds: the directory is at most 64 MiB and inside the file; each entry is checked to fit the directory before
//! it is read; a bitmap's data is at most qemu's 512 MiB and is read one cluster at a time, each data cluster
//! inside the file and named by one table entry only, so the work follows the file size whatever the header
//! claims.

use std::path::Path;
use std::sync::Arc;

use super::header::{self, AUTOCLEAR_BITMAPS, Header};
use super::{FMT, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

/// Most bitmaps in an image: qemu's `QCOW2_MAX_BITMAPS` ("nb_bitmaps ... at most 65535").
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory, 1 KiB per bitmap (just under 64 MiB): qemu's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub const MAX_DIRECTORY: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries of one bitmap table: qemu's `BME_MAX_TABLE_SIZE`.
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Most bytes of bitmap data in one bitmap: qemu's `BME_MAX_PHYS_SIZE` (512 MiB).
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;
/// Longest bitmap name: qemu's `BME_MAX_NAME_SIZE` ("Qemu currently doesn't support values greater than 1023").
pub const MAX_NAME: usize = 1023;
/// Granularity bits qemu supports ("Qemu currently supports only values 9 - 31").
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Most ranges [`dirty_ranges`] collects (16 bytes each, 64 MiB): a bitmap of alternating bits over a large
/// disk would otherwise need gigabytes. [`for_each_dirty`] has no such bound.
pub const MAX_COLLECTED_RANGES: usize = 1 << 22;

/// Directory entry flag bit 0, `in_use`: "The bitmap was not saved correctly and may be inconsistent".
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1, `auto`: the bitmap is enabled (tracks every write).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2, `extra_data_compatible`: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// "Bits 3 - 31 are reserved and must be 0."
const FLAGS_RESERVED: u32 = !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE);
/// Type 1: "Dirty tracking bitmap" (0 and 2-255 reserved).
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Fixed part of a directory entry (bytes 0-23).
const ENTRY_FIXED: usize = 24;
/// Bitmap table entry bits 9-55: the host cluster offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bit 0, when the offset is 0: the cluster reads as all ones.
const TABLE_ALL_ONES: u64 = 1;
/// Bits 1-8 and 56-63 are reserved and must be zero.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bytes of the bitmaps extension (nb_bitmaps, reserved, directory size, directory offset).
pub const EXT_LEN: u64 = 24;

/// One bitmap directory entry, as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name (not NUL-terminated in the file; shown lossily if not UTF-8).
    pub name: String,
    /// log2 of the guest bytes per bit (0 to 63).
    pub granularity_bits: u8,
    /// The entry's flags (`FLAG_*`).
    pub flags: u32,
    /// The bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// Bytes of type-specific extra data (none is defined yet).
    pub extra_data_size: u32,
    /// Cluster-aligned offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
}

impl BitmapInfo {
    /// Guest bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }
    /// The `in_use` flag: the image was not closed cleanly, the bitmap cannot be trusted.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// The `auto` flag: the bitmap is enabled.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// The flags by qemu's names (`qemu-img info`: "in-use", "auto").
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.in_use() {
            v.push("in-use");
        }
        if self.auto() {
            v.push("auto");
        }
        v
    }
}

/// The guest ranges a dirty bitmap marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The bitmap's directory entry.
    pub info: BitmapInfo,
    /// Guest bytes per bit; ranges start on multiples of it.
    pub granularity: u64,
    /// The image's virtual size (the last range ends at most here).
    pub virtual_size: u64,
    /// Dirty `(start, len)` ranges: sorted, non-overlapping, non-adjacent, clamped to the virtual size.
    pub ranges: Vec<(u64, u64)>,
}

impl DirtyBitmap {
    /// Total dirty bytes.
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

/// Why a named bitmap cannot be read. Callers branch on the variant (e.g. `replicate` falls back to hashing on
/// `InUse`); each displays as one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// No bitmap of that name; `available` lists the image's bitmaps.
    #[error("{image} has no bitmap named '{name}' ({})", names(available))]
    NotFound {
        /// The image.
        image: String,
        /// The name asked for.
        name: String,
        /// The names the image has.
        available: Vec<String>,
    },
    /// The `in_use` flag is set: the image was not closed cleanly (or is open in a VM now), so the bitmap may
    /// miss writes.
    #[error(
        "bitmap '{name}' of {image} is in use: the image was not closed cleanly (or a VM has it open), so the bitmap may miss writes and cannot be trusted"
    )]
    InUse {
        /// The image.
        image: String,
        /// The bitmap.
        name: String,
    },
    /// The bitmap is not a dirty tracking bitmap.
    #[error(
        "bitmap '{name}' of {image} has type {kind}; only dirty tracking bitmaps (type 1) are read"
    )]
    UnsupportedType {
        /// The image.
        image: String,
        /// The bitmap.
        name: String,
        /// The type byte.
        kind: u8,
    },
    /// The bitmap uses something else imgshift does not read (unknown extra data, a granularity qemu does not
    /// support).
    #[error("bitmap '{name}' of {image}: {what}")]
    Unsupported {
        /// The image.
        image: String,
        /// The bitmap.
        name: String,
        /// What is unsupported.
        what: String,
    },
    /// The bitmaps autoclear bit is clear: a program that does not know bitmaps wrote the image after they were
    /// saved ("the bitmaps extension data must be considered inconsistent").
    #[error(
        "the bitmaps of {image} are inconsistent: the image was written by a program that does not keep bitmaps (autoclear bit 0 is clear)"
    )]
    Inconsistent {
        /// The image.
        image: String,
    },
    /// The image or its bitmap metadata could not be read (I/O, corrupt or out-of-bounds metadata).
    #[error(transparent)]
    Image(#[from] Error),
}

fn names(v: &[String]) -> String {
    if v.is_empty() {
        "it has no bitmaps".to_string()
    } else {
        format!("its bitmaps: {}", v.join(", "))
    }
}

/// Reads the header of the qcow2 image in `storage` (no backing file is opened).
pub fn read_header(storage: &dyn Storage) -> Result<Header> {
    let file_len = storage.len();
    let mut head = [0u8; header::V3_HEADER_LEN];
    let n = storage.read_at_zero_fill(&mut head, 0)?;
    let cb = header::be32(&head, 20, "cluster_bits").unwrap_or(0);
    let head_len = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
        (1u64 << cb).min(file_len)
    } else {
        n as u64
    };
    let mut cluster0 = vec![0u8; usize::try_from(head_len).unwrap_or(0)];
    storage.read_exact_at(&mut cluster0, 0)?;
    header::parse(&cluster0, file_len)
}

/// The bitmap directory of the image (empty when it has no bitmaps extension), every entry checked against the
/// spec's rules and the file. Entries are listed whatever their flags.
pub fn list(storage: &dyn Storage, h: &Header) -> Result<Vec<BitmapInfo>> {
    let Some(b) = h.bitmaps else {
        return Ok(Vec::new());
    };
    if b.ext_len != EXT_LEN {
        return Err(Error::invalid(
            FMT,
            format!(
                "the bitmaps extension is {} bytes, not {EXT_LEN}",
                b.ext_len
            ),
        ));
    }
    if b.reserved != 0 {
        return Err(Error::invalid(
            FMT,
            "the bitmaps extension's reserved field is not zero",
        ));
    }
    if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
        return Err(Error::invalid(
            FMT,
            format!(
                "the bitmaps extension names {} bitmaps (1 to {MAX_BITMAPS} allowed)",
                b.nb_bitmaps
            ),
        ));
    }
    if b.directory_size > MAX_DIRECTORY {
        return Err(Error::limit(
            FMT,
            format!(
                "bitmap directory of {} bytes, above qemu's {MAX_DIRECTORY}",
                b.directory_size
            ),
        ));
    }
    if !b.directory_offset.is_multiple_of(h.cluster_size())
        || b.directory_offset
            .checked_add(b.directory_size)
            .is_none_or(|e| e > storage.len())
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "bitmap directory at {:#x} ({} bytes) is unaligned or past the end of the file",
                b.directory_offset, b.directory_size
            ),
        ));
    }
    let mut dir = vec![0u8; usize::try_from(b.directory_size).unwrap_or(0)];
    storage.read_exact_at(&mut dir, b.directory_offset)?;
    let mut out: Vec<BitmapInfo> = Vec::new();
    let mut raw_names: Vec<Vec<u8>> = Vec::new();
    let mut pos = 0usize;
    for n in 0..b.nb_bitmaps {
        let (info, raw_name, next) = parse_entry(&dir, pos, n)?;
        if raw_names.contains(&raw_name) {
            return Err(Error::corrupt(
                FMT,
                format!("two bitmaps are named '{}'", info.name),
            ));
        }
        raw_names.push(raw_name);
        out.push(info);
        pos = next;
    }
    if pos != dir.len() {
        return Err(Error::corrupt(
            FMT,
            format!(
                "the bitmap directory is {} bytes but its {} entries take {pos}",
                dir.len(),
                b.nb_bitmaps
            ),
        ));
    }
    Ok(out)
}

/// Parses directory entry `n` at `pos`: (entry, raw name, offset of the next entry).
fn parse_entry(dir: &[u8], pos: usize, n: u32) -> Result<(BitmapInfo, Vec<u8>, usize)> {
    let what = format!("bitmap directory entry {n}");
    let fixed = header::bytes(dir, pos, ENTRY_FIXED, &what)?;
    let table_offset = header::be64(fixed, 0, &what)?;
    let table_size = header::be32(fixed, 8, &what)?;
    let flags = header::be32(fixed, 12, &what)?;
    let kind = fixed.get(16).copied().unwrap_or(0);
    let granularity_bits = fixed.get(17).copied().unwrap_or(0);
    let name_size = usize::from(u16::from_be_bytes([
        fixed.get(18).copied().unwrap_or(0),
        fixed.get(19).copied().unwrap_or(0),
    ]));
    let extra_data_size = header::be32(fixed, 20, &what)?;
    if name_size == 0 || name_size > MAX_NAME {
        return Err(Error::invalid(
            FMT,
            format!("{what}: a name of {name_size} bytes (1 to {MAX_NAME} allowed)"),
        ));
    }
    if flags & FLAGS_RESERVED != 0 {
        return Err(Error::unsupported(
            FMT,
            format!(
                "{what}: reserved flags {:#x} are set",
                flags & FLAGS_RESERVED
            ),
        ));
    }
    if granularity_bits > 63 {
        return Err(Error::invalid(
            FMT,
            format!("{what}: granularity_bits {granularity_bits} (0 to 63 allowed)"),
        ));
    }
    // Extra data is bounded by the directory (itself at most 64 MiB) before anything is sliced.
    let extra = usize::try_from(extra_data_size).unwrap_or(usize::MAX);
    let body = ENTRY_FIXED
        .checked_add(extra)
        .and_then(|x| x.checked_add(name_size))
        .ok_or_else(|| Error::invalid(FMT, format!("{what}: its size overflows")))?;
    let padded = body
        .checked_next_multiple_of(8)
        .ok_or_else(|| Error::invalid(FMT, format!("{what}: its size overflows")))?;
    let entry = header::bytes(dir, pos, padded, &what)?;
    let name_at = ENTRY_FIXED + extra;
    let raw_name = header::bytes(entry, name_at, name_size, &what)?.to_vec();
    if entry
        .get(body..)
        .is_some_and(|pad| pad.iter().any(|&b| b != 0))
    {
        return Err(Error::invalid(
            FMT,
            format!("{what}: padding bytes are not zero"),
        ));
    }
    let info = BitmapInfo {
        name: String::from_utf8_lossy(&raw_name).into_owned(),
        granularity_bits,
        flags,
        kind,
        extra_data_size,
        table_offset,
        table_size,
    };
    Ok((info, raw_name, pos + padded))
}

/// Calls `f(start, len)` for each dirty guest range of the bitmap named `name`, in order (adjacent dirty bits
/// form one range; the last range is clamped to the virtual size). Returns the bitmap's entry.
///
/// Refused with a typed error: no such bitmap, `in_use`, another type, unknown extra data without
/// `extra_data_compatible`, a granularity qemu does not support, an inconsistent extension.
pub fn for_each_dirty(
    storage: &dyn Storage,
    h: &Header,
    name: &str,
    f: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<BitmapInfo, BitmapError> {
    let image = storage.name();
    let entries = list(storage, h)?;
    if h.bitmaps.is_some() && h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Err(BitmapError::Inconsistent { image });
    }
    let Some(info) = entries.iter().find(|e| e.name == name).cloned() else {
        return Err(BitmapError::NotFound {
            image,
            name: name.to_string(),
            available: entries.into_iter().map(|e| e.name).collect(),
        });
    };
    let named = |what: String| BitmapError::Unsupported {
        image: image.clone(),
        name: info.name.clone(),
        what,
    };
    if info.in_use() {
        return Err(BitmapError::InUse {
            image,
            name: info.name,
        });
    }
    if info.kind != TYPE_DIRTY_TRACKING {
        return Err(BitmapError::UnsupportedType {
            image,
            name: info.name,
            kind: info.kind,
        });
    }
    if info.extra_data_size != 0 && info.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
        return Err(named(format!(
            "{} bytes of extra data imgshift does not know, without the extra_data_compatible flag",
            info.extra_data_size
        )));
    }
    if !GRANULARITY_BITS.contains(&info.granularity_bits) {
        return Err(named(format!(
            "granularity of 2^{} bytes (qemu supports 2^9 to 2^31)",
            info.granularity_bits
        )));
    }
    walk_bits(storage, h, &info, f)?;
    Ok(info)
}

/// Reads the bitmap table and data of `info` and reports its dirty ranges.
fn walk_bits(
    storage: &dyn Storage,
    h: &Header,
    info: &BitmapInfo,
    f: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let what = format!("bitmap '{}'", info.name);
    let gran = info.granularity();
    let cs = h.cluster_size();
    let bits = h.size.div_ceil(gran);
    let data_bytes = bits.div_ceil(8);
    if data_bytes > MAX_BITMAP_BYTES {
        return Err(Error::limit(
            FMT,
            format!("{what} holds {data_bytes} bytes of data, above qemu's {MAX_BITMAP_BYTES}"),
        ));
    }
    let needed = data_bytes.div_ceil(cs);
    let table_size = u64::from(info.table_size);
    if table_size > MAX_TABLE_ENTRIES || table_size < needed {
        return Err(Error::corrupt(
            FMT,
            format!(
                "{what} has a table of {table_size} entries; the virtual size needs {needed} (at most {MAX_TABLE_ENTRIES})"
            ),
        ));
    }
    let table_bytes = needed * 8;
    if info.table_offset == 0
        || !info.table_offset.is_multiple_of(cs)
        || info
            .table_offset
            .checked_add(table_bytes)
            .is_none_or(|e| e > storage.len())
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "{what}: table at {:#x} is zero, unaligned or past the end of the file",
                info.table_offset
            ),
        ));
    }
    let mut raw = vec![0u8; usize::try_from(table_bytes).unwrap_or(0)];
    storage.read_exact_at(&mut raw, info.table_offset)?;
    let table: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    // Each data cluster is named once, so the data read adds up to at most the file size.
    let mut used: Vec<u64> = table
        .iter()
        .map(|e| e & TABLE_OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    used.sort_unstable();
    if let Some(w) = used.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::corrupt(
            FMT,
            format!(
                "{what}: two table entries name the data cluster at {:#x}",
                w[0]
            ),
        ));
    }
    let mut runs = Runs {
        gran,
        size: h.size,
        start: None,
        f,
    };
    let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    for (i, &e) in (0u64..).zip(table.iter()) {
        let first_byte = i * cs;
        let len = (data_bytes - first_byte).min(cs);
        let chunk = buf
            .get_mut(..usize::try_from(len).unwrap_or(0))
            .ok_or_else(|| Error::input("internal error: bitmap cluster buffer"))?;
        let off = e & TABLE_OFFSET_MASK;
        if e & TABLE_RESERVED != 0 || (off != 0 && e & TABLE_ALL_ONES != 0) {
            return Err(Error::corrupt(
                FMT,
                format!("{what}: table entry {i} ({e:#x}) has reserved bits set"),
            ));
        }
        if off == 0 {
            chunk.fill(if e & TABLE_ALL_ONES != 0 { 0xff } else { 0 });
        } else {
            if off.checked_add(len).is_none_or(|end| end > storage.len()) {
                return Err(Error::corrupt(
                    FMT,
                    format!(
                        "{what}: data cluster at {off:#x} (entry {i}) is past the end of the file"
                    ),
                ));
            }
            storage.read_exact_at(chunk, off)?;
        }
        runs.bytes(first_byte * 8, chunk)?;
    }
    runs.finish()
}

/// Turns bits (bit 0 of byte 0 first, "bit_offset % 8") into dirty guest ranges.
struct Runs<'a> {
    gran: u64,
    size: u64,
    /// First bit of the open run of set bits.
    start: Option<u64>,
    f: &'a mut dyn FnMut(u64, u64) -> Result<()>,
}

impl Runs<'_> {
    /// Feeds `data`, whose first bit is bitmap bit `bit0`.
    fn bytes(&mut self, bit0: u64, data: &[u8]) -> Result<()> {
        for (i, &b) in (0u64..).zip(data.iter()) {
            let at = bit0 + i * 8;
            match (b, self.start) {
                (0xff, Some(_)) | (0, None) => {}
                _ => {
                    for k in 0..8 {
                        self.bit(at + k, (b >> k) & 1 == 1)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn bit(&mut self, nr: u64, set: bool) -> Result<()> {
        match (set, self.start) {
            (true, None) => self.start = Some(nr),
            (false, Some(s)) => {
                self.start = None;
                self.emit(s, nr)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Reports bits `[from, to)` as a guest range, clamped to the virtual size (tail bits past it are unused).
    fn emit(&mut self, from: u64, to: u64) -> Result<()> {
        let start = from.saturating_mul(self.gran);
        let end = to.saturating_mul(self.gran).min(self.size);
        if end > start {
            (self.f)(start, end - start)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        if let Some(s) = self.start.take() {
            let to = self.size.div_ceil(self.gran);
            self.emit(s, to.max(s))?;
        }
        Ok(())
    }
}

/// The dirty ranges of the bitmap named `name` (see [`for_each_dirty`]), collected; more than
/// [`MAX_COLLECTED_RANGES`] ranges is a `Limit` error.
pub fn dirty_ranges(
    storage: &dyn Storage,
    h: &Header,
    name: &str,
) -> Result<DirtyBitmap, BitmapError> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let info = for_each_dirty(storage, h, name, &mut |s, l| {
        if ranges.len() >= MAX_COLLECTED_RANGES {
            return Err(Error::limit(
                FMT,
                format!("bitmap '{name}' marks more than {MAX_COLLECTED_RANGES} separate ranges"),
            ));
        }
        ranges.push((s, l));
        Ok(())
    })?;
    Ok(DirtyBitmap {
        granularity: info.granularity(),
        info,
        virtual_size: h.size,
        ranges,
    })
}

/// Opens the qcow2 image at `path` (its header only: no backing file is opened) and returns the dirty ranges of
/// its bitmap `name`. The entry point for change detection (`imgshift replicate --bitmap NAME`).
pub fn read_dirty_bitmap(path: &Path, name: &str) -> Result<DirtyBitmap, BitmapError> {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path)?);
    let h = read_header(storage.as_ref())?;
    dirty_ranges(storage.as_ref(), &h, name)
}

/// Lists the bitmaps of the qcow2 image at `path` (header and directory only).
pub fn list_bitmaps(path: &Path) -> Result<Vec<BitmapInfo>> {
    let storage = FileStorage::open(path)?;
    let h = read_header(&storage)?;
    list(&storage, &h)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A directory entry: table at 0x10000 (1 entry), flags auto, type 1, granularity 2^16, name "b0".
    fn entry() -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&0x10000u64.to_be_bytes());
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&FLAG_AUTO.to_be_bytes());
        e.extend_from_slice(&[TYPE_DIRTY_TRACKING, 16]);
        e.extend_from_slice(&2u16.to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(b"b0");
        e.resize(32, 0);
        e
    }

    #[test]
    fn accepts_valid_entry() {
        let (info, name, next) = parse_entry(&entry(), 0, 0).unwrap();
        assert_eq!(
            (info.name.as_str(), name.as_slice(), next),
            ("b0", &b"b0"[..], 32)
        );
        assert_eq!(info.granularity(), 65536);
        assert_eq!(info.flag_names(), ["auto"]);
    }

    #[test]
    fn rejects_empty_and_long_names() {
        let mut e = entry();
        e[18..20].copy_from_slice(&0u16.to_be_bytes());
        assert!(parse_entry(&e, 0, 0).is_err());
        e[18..20].copy_from_slice(&1024u16.to_be_bytes());
        assert!(parse_entry(&e, 0, 0).is_err());
    }

    #[test]
    fn rejects_reserved_flags_and_granularity() {
        let mut e = entry();
        e[12..16].copy_from_slice(&8u32.to_be_bytes());
        assert!(parse_entry(&e, 0, 0).is_err());
        let mut e = entry();
        e[17] = 64;
        assert!(parse_entry(&e, 0, 0).is_err());
    }

    #[test]
    fn rejects_truncated_entry_extra_data_and_padding() {
        assert!(parse_entry(&entry()[..24], 0, 0).is_err());
        let mut e = entry();
        e[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_entry(&e, 0, 0).is_err());
        let mut e = entry();
        e[31] = 1;
        assert!(parse_entry(&e, 0, 0).is_err());
    }

    fn ranges(size: u64, gran: u64, data: &[u8]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut f = |s, l| {
            out.push((s, l));
            Ok(())
        };
        let mut r = Runs {
            gran,
            size,
            start: None,
            f: &mut f,
        };
        r.bytes(0, data).unwrap();
        r.finish().unwrap();
        out
    }

    #[test]
    fn bits_become_ranges_lsb_first_and_clamped() {
        // bit 0, bits 2-3, bits 8-15 (a whole byte), the last bit clamped to the size.
        assert_eq!(
            ranges(1000, 64, &[0b0000_1101, 0xff]),
            vec![(0, 64), (128, 128), (512, 488)]
        );
        assert_eq!(ranges(1 << 20, 512, &[0, 0]), vec![]);
        assert_eq!(ranges(16 * 512, 512, &[0xff, 0xff]), vec![(0, 16 * 512)]);
    }
}
