//! VHD ("vpc" in qemu): Microsoft "Virtual Hard Disk Image Format Specification" 1.0 (2006),
//! <https://www.microsoft.com/en-us/download/details.aspx?id=23850>.
//!
//! Read: fixed, dynamic and differencing disks (the parent opened through the `OpenGate` from the parent
//! locators, its unique id checked against the child's). Write: fixed and dynamic (`-o subformat=`,
//! `force_size=`, and imgshift's `round_to_mib=` for Azure).
//!
//! Sizing follows qemu's `vpc_open`: the creator application decides whether the CHS geometry or `current_size`
//! gives the virtual size (see [`meta::Footer::sized_by_chs`]). Like qemu, a non-differencing dynamic disk's
//! allocated blocks are data whatever their sector bitmaps say; for differencing disks the bitmap decides,
//! sector by sector, between this disk and its parent. Refused: bad footer or dynamic header checksums, block
//! sizes outside 4 KiB..256 MiB, sparse disks above qemu's 2040 GiB, BAT entries whose block (bitmap + data)
//! ends past the end of the file or overlaps another entry's block, and "Mac " alias / deprecated "Wi2r"/"Wi2k"
//! parent locators (ignored).

pub mod meta;
mod writer;

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;
use crate::gate::OpenGate;
use crate::source::{
    CheckReport, DiskSource, HostExtent, ImageInfo, check_range, read_from_backing,
};
use crate::storage::Storage;

use meta::{
    BAT_UNALLOCATED, DYN_HEADER_SIZE, DiskType, DynHeader, FMT, FOOTER_SIZE, Footer,
    MAX_BAT_ENTRIES, MAX_SPARSE_SECTORS, Platform, RawDynHeader, RawFooter, SECTOR,
};
pub use writer::{OPTIONS as WRITER_OPTIONS, VhdWriter};

/// The block allocation of a dynamic or differencing disk.
struct Sparse {
    header: DynHeader,
    /// Offset of the dynamic header.
    header_offset: u64,
    block_size: u64,
    bitmap_size: u64,
    /// BAT entries (sector offsets of each block's bitmap), host order.
    bat: Vec<u32>,
    /// Differencing disks: the opened parent and the name it was found under.
    parent: Option<(Box<dyn DiskSource>, String)>,
}

/// Reads a VHD image.
pub struct VhdReader {
    storage: Arc<dyn Storage>,
    footer: Footer,
    virtual_size: u64,
    sparse: Option<Sparse>,
}

impl VhdReader {
    /// Opens `storage` as a VHD. A differencing disk's parent is opened through `gate`.
    pub fn open(storage: Arc<dyn Storage>, gate: &OpenGate) -> Result<Self> {
        let len = storage.len();
        let footer = read_footer(storage.as_ref())?;
        let virtual_size = footer.virtual_size();
        let sparse = match footer.disk_type {
            DiskType::Fixed => {
                let data = len.saturating_sub(FOOTER_SIZE);
                if virtual_size > data {
                    return Err(Error::corrupt(
                        FMT,
                        format!(
                            "fixed disk declares {virtual_size} bytes but the file holds {data} bytes of data"
                        ),
                    ));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => {
                Some(open_sparse(storage.as_ref(), &footer, virtual_size)?)
            }
        };
        let mut reader = VhdReader {
            storage,
            footer,
            virtual_size,
            sparse,
        };
        if reader.footer.disk_type == DiskType::Differencing {
            let parent = reader.open_parent(gate)?;
            if let Some(s) = reader.sparse.as_mut() {
                s.parent = Some(parent);
            }
        }
        Ok(reader)
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// The footer's unique id (a differencing child names its parent by it).
    pub fn unique_id(&self) -> [u8; 16] {
        self.footer.unique_id
    }

    /// Tries each parent locator (relative ones first), then the parent's Unicode name: the first file the gate
    /// lets through whose footer carries the expected unique id is opened as the parent, with its own parents.
    fn open_parent(&self, gate: &OpenGate) -> Result<(Box<dyn DiskSource>, String)> {
        let Some(sparse) = &self.sparse else {
            return Err(Error::invalid(
                FMT,
                "differencing disk without a dynamic header",
            ));
        };
        let referrer = self.storage.path().ok_or_else(|| {
            Error::unsupported(
                FMT,
                "a differencing disk inside a container cannot name its parent file",
            )
        })?;
        let referrer = referrer.to_path_buf();
        let mut candidates: Vec<String> = Vec::new();
        let mut order: Vec<_> = sparse.header.locators.clone();
        order.sort_by_key(|l| match l.platform {
            Platform::W2ru => 0,
            Platform::W2ku => 1,
            Platform::MacX => 2,
        });
        for l in &order {
            let mut raw = vec![0u8; usize::try_from(l.len).unwrap_or(0)];
            self.storage.read_exact_at(&mut raw, l.offset)?;
            let name = match l.platform {
                Platform::W2ru | Platform::W2ku => {
                    meta::decode_utf16(&raw, true).replace('\\', "/")
                }
                Platform::MacX => {
                    let text = String::from_utf8_lossy(&raw);
                    let text = text.trim_end_matches('\0');
                    let path = text.strip_prefix("file://").unwrap_or(text);
                    path.strip_prefix("localhost").unwrap_or(path).to_string()
                }
            };
            if !name.is_empty() && !candidates.contains(&name) {
                candidates.push(name);
            }
        }
        if let Some(n) = &sparse.header.parent_name {
            let n = n.replace('\\', "/");
            let base = n.rsplit('/').next().unwrap_or(&n).to_string();
            if !base.is_empty() && !candidates.contains(&base) {
                candidates.push(base);
            }
        }
        if candidates.is_empty() {
            return Err(Error::invalid(
                FMT,
                "differencing disk names no parent (no usable parent locator or parent name)",
            ));
        }
        let want = sparse.header.parent_unique_id;
        let mut failures = Failures::default();
        let mut kind = ErrorKind::Io;
        // Some candidate lay outside the trusted folders: trusting its folder may find the parent.
        let mut untrusted = false;
        // Rule: a candidate is chosen by its footer alone (it exists, the gate lets it through, its unique id is
        // the one the child names); only the chosen one is opened with its own parents, and a failure there is
        // the error. Trying the next candidate after a deeper failure would walk every path through a set of
        // differencing disks whose locators name each other: exponential in their number.
        for name in &candidates {
            let shown = clip(name, MAX_QUOTED_NAME);
            let (st, child_gate) = match gate.open(&referrer, name, "VHD parent") {
                Ok(opened) => opened,
                Err(e) => {
                    if e.kind() == ErrorKind::Denied || kind == ErrorKind::Io {
                        kind = e.kind();
                    }
                    untrusted |= e.is_untrusted();
                    failures.push(&e.to_string());
                    continue;
                }
            };
            let footer = match read_footer(st.as_ref()) {
                Ok(f) => f,
                Err(e) => {
                    if kind == ErrorKind::Io {
                        kind = e.kind();
                    }
                    failures.push(&format!("'{shown}': {e}"));
                    continue;
                }
            };
            if footer.unique_id != want {
                kind = ErrorKind::Corrupt;
                failures.push(&format!(
                    "'{shown}' has unique id {}, the child expects {}",
                    uuid::Uuid::from_bytes(footer.unique_id),
                    uuid::Uuid::from_bytes(want)
                ));
                continue;
            }
            let parent = VhdReader::open(st, &child_gate)
                .map_err(|e| e.context(format!("VHD parent '{shown}'")))?;
            return Ok((Box::new(parent), name.clone()));
        }
        Err(Error::new(
            kind,
            format!(
                "cannot open the parent of differencing VHD {}: {}",
                self.storage.name(),
                failures
            ),
        )
        .marked_untrusted(untrusted))
    }

    /// Reads the sector bitmap of the block whose BAT entry is `entry`.
    fn bitmap(&self, s: &Sparse, entry: u32) -> Result<Vec<u8>> {
        let mut bm = vec![0u8; usize::try_from(s.bitmap_size).unwrap_or(0)];
        self.storage
            .read_exact_at(&mut bm, u64::from(entry) * SECTOR)?;
        Ok(bm)
    }

    /// Calls `f(start, len, present)` for the runs of `[from, to)` (offsets inside one block) whose sectors are
    /// present in this layer (bit set, spec: most significant bit first) or not.
    fn bitmap_runs(
        bm: &[u8],
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let bit = |sector: u64| -> bool {
            let byte = usize::try_from(sector / 8).ok().and_then(|i| bm.get(i));
            byte.is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
        };
        let mut at = from;
        while at < to {
            let present = bit(at / SECTOR);
            let mut end = (at / SECTOR + 1) * SECTOR;
            while end < to {
                let sector = end / SECTOR;
                // whole bytes of the same value at once
                if sector.is_multiple_of(8) && end + 8 * SECTOR <= to {
                    let b = usize::try_from(sector / 8)
                        .ok()
                        .and_then(|i| bm.get(i))
                        .copied()
                        .unwrap_or(0);
                    if b == if present { 0xFF } else { 0 } {
                        end += 8 * SECTOR;
                        continue;
                    }
                }
                if bit(sector) != present {
                    break;
                }
                end += SECTOR;
            }
            let end = end.min(to);
            f(at, end - at, present)?;
            at = end;
        }
        Ok(())
    }

    /// Walks `[offset, offset+len)` block by block: `f(guest_offset, len, entry)` where `entry` is the BAT entry.
    fn for_blocks(
        s: &Sparse,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Option<u32>) -> Result<()>,
    ) -> Result<()> {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let idx = at / s.block_size;
            let block_end = (idx + 1) * s.block_size;
            let n = block_end.min(end) - at;
            let entry = usize::try_from(idx)
                .ok()
                .and_then(|i| s.bat.get(i))
                .copied()
                .filter(|&e| e != BAT_UNALLOCATED);
            f(at, n, entry)?;
            at += n;
        }
        Ok(())
    }
}

/// Reads and validates the footer: the copy at offset 0 when it has the cookie, else the last sector.
fn read_footer(storage: &dyn Storage) -> Result<Footer> {
    let len = storage.len();
    if len < FOOTER_SIZE {
        return Err(Error::invalid(
            FMT,
            "file is shorter than a 512-byte footer",
        ));
    }
    // Spec "Hard Disk Footer Format": dynamic disks keep a copy of the footer at offset 0; fixed disks only
    // have the one in the last sector. qemu reads the copy at 0 first, then the end.
    let mut buf = [0u8; FOOTER_SIZE as usize];
    storage.read_exact_at(&mut buf, 0)?;
    if &buf[..8] != meta::COOKIE {
        storage.read_exact_at(&mut buf, len - FOOTER_SIZE)?;
    }
    RawFooter::parse(&buf)?.validate()
}

/// Longest parent-candidate name quoted in a message, in characters (a locator may hold 32767).
const MAX_QUOTED_NAME: usize = 200;
/// Longest reason quoted for one failed parent candidate, in characters.
const MAX_FAILURE_TEXT: usize = 600;
/// Longest list of failed parent candidates in a message, in bytes.
const MAX_FAILURES_TEXT: usize = 2000;

/// `text`, cut to `max` characters.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// Why each parent candidate was passed over, as one `; `-separated text of bounded length.
#[derive(Default)]
struct Failures {
    text: String,
    left_out: usize,
}

impl Failures {
    fn push(&mut self, why: &str) {
        let why = clip(why, MAX_FAILURE_TEXT);
        if self.text.len() + why.len() > MAX_FAILURES_TEXT {
            self.left_out += 1;
            return;
        }
        if !self.text.is_empty() {
            self.text.push_str("; ");
        }
        self.text.push_str(&why);
    }
}

impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)?;
        if self.left_out > 0 {
            write!(f, "; and {} more", self.left_out)?;
        }
        Ok(())
    }
}

/// Reads and validates the dynamic header and BAT.
fn open_sparse(storage: &dyn Storage, footer: &Footer, virtual_size: u64) -> Result<Sparse> {
    let len = storage.len();
    if virtual_size / SECTOR > MAX_SPARSE_SECTORS {
        return Err(Error::limit(
            FMT,
            format!("virtual size {virtual_size} is above qemu's 2040 GiB for dynamic disks"),
        ));
    }
    let header_offset = footer.data_offset;
    if header_offset
        .checked_add(DYN_HEADER_SIZE)
        .is_none_or(|e| e > len)
    {
        return Err(Error::corrupt(
            FMT,
            format!("dynamic header offset {header_offset} lies past the end of the file"),
        ));
    }
    let mut buf = vec![0u8; DYN_HEADER_SIZE as usize];
    storage.read_exact_at(&mut buf, header_offset)?;
    let header = RawDynHeader::parse(&buf)?.validate(len)?;
    let block_size = header.block_size;
    let bitmap_size = meta::bitmap_size(block_size);
    let entries = header.max_table_entries;
    // qemu vpc_open "Page table too small": the BAT must cover the virtual size.
    if entries.saturating_mul(block_size) < virtual_size {
        return Err(Error::corrupt(
            FMT,
            format!(
                "BAT has {entries} entries of {block_size} bytes, less than the virtual size {virtual_size}"
            ),
        ));
    }
    if entries > MAX_BAT_ENTRIES {
        return Err(Error::limit(
            FMT,
            format!("BAT has {entries} entries (at most {MAX_BAT_ENTRIES} are read)"),
        ));
    }
    let bat_bytes = entries * 4;
    if header
        .table_offset
        .checked_add(bat_bytes)
        .is_none_or(|e| e > len)
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "BAT at {}+{bat_bytes} lies past the end of the file ({len} bytes)",
                header.table_offset
            ),
        ));
    }
    let mut raw = vec![0u8; bat_bytes as usize];
    storage.read_exact_at(&mut raw, header.table_offset)?;
    let mut bat = Vec::with_capacity(raw.len() / 4);
    for (i, c) in raw.chunks_exact(4).enumerate() {
        let e = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        if e != BAT_UNALLOCATED {
            // qemu: "free_data_block_offset points after the end of file": every block must fit.
            let end = u64::from(e) * SECTOR + bitmap_size + block_size;
            if end > len {
                return Err(Error::corrupt(
                    FMT,
                    format!(
                        "BAT entry {i} (sector {e}) puts its block past the end of the file ({len} bytes)"
                    ),
                ));
            }
        }
        bat.push(e);
    }
    refuse_overlapping_blocks(&bat, bitmap_size + block_size)?;
    Ok(Sparse {
        header,
        header_offset,
        block_size,
        bitmap_size,
        bat,
        parent: None,
    })
}

/// Rule: each allocated BAT entry has its own block (bitmap + data, `span` bytes) that no other block overlaps. qemu
/// and Windows append blocks one after another; blocks that share bytes would let one sector bitmap (of 0x55...)
/// describe the extents of every block pointing at it, so a few MiB of file could map to billions of extents.
/// With disjoint blocks, the extents follow the file size.
fn refuse_overlapping_blocks(bat: &[u32], span: u64) -> Result<()> {
    let mut blocks: Vec<(u64, usize)> = bat
        .iter()
        .enumerate()
        .filter(|(_, e)| **e != BAT_UNALLOCATED)
        .map(|(i, e)| (u64::from(*e) * SECTOR, i))
        .collect();
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        let [(a, ia), (b, ib)] = w else { continue };
        if a == b {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "BAT entries {ia} and {ib} share the block at sector {}",
                    a / SECTOR
                ),
            ));
        }
        if a.saturating_add(span) > *b {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "BAT entries {ia} and {ib} overlap: their blocks at sectors {} and {} are less than a block ({span} bytes) apart",
                    a / SECTOR,
                    b / SECTOR
                ),
            ));
        }
    }
    Ok(())
}

impl DiskSource for VhdReader {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        check_range(self.virtual_size, offset, len)?;
        let mut map = ExtentMap::new();
        let Some(s) = &self.sparse else {
            // Fixed: the data region is a raw image; holes in the file are zeros.
            let end = offset + len;
            match self.storage.data_ranges(offset, len)? {
                None => map.push(offset, len, ExtentKind::Data)?,
                Some(ranges) => {
                    let mut at = offset;
                    for (a, l) in ranges {
                        let a = a.max(at);
                        let b = a.saturating_add(l).min(end);
                        if b <= a {
                            continue;
                        }
                        map.push(at, a - at, ExtentKind::Zero)?;
                        map.push(a, b - a, ExtentKind::Data)?;
                        at = b;
                    }
                    map.push(at, end - at, ExtentKind::Zero)?;
                }
            }
            return Ok(map);
        };
        let differencing = s.parent.is_some();
        Self::for_blocks(s, offset, len, |at, n, entry| match entry {
            None if differencing => map.push(at, n, ExtentKind::Unallocated),
            None => map.push(at, n, ExtentKind::Zero),
            Some(_) if !differencing => map.push(at, n, ExtentKind::Data),
            Some(e) => {
                let bm = self.bitmap(s, e)?;
                let base = at / s.block_size * s.block_size;
                Self::bitmap_runs(&bm, at - base, at - base + n, |a, l, present| {
                    let kind = if present {
                        ExtentKind::Data
                    } else {
                        ExtentKind::Unallocated
                    };
                    map.push(base + a, l, kind)
                })
            }
        })?;
        Ok(map)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size, offset, buf.len() as u64)?;
        let Some(s) = &self.sparse else {
            return self.storage.read_exact_at(buf, offset);
        };
        let parent = s.parent.as_ref().map(|p| p.0.as_ref());
        Self::for_blocks(s, offset, buf.len() as u64, |at, n, entry| {
            let from = (at - offset) as usize;
            let piece = &mut buf[from..from + n as usize];
            let base = at / s.block_size * s.block_size;
            match entry {
                None => read_from_backing(parent, piece, at),
                Some(e) => {
                    let data = u64::from(e) * SECTOR + s.bitmap_size;
                    if parent.is_none() {
                        return self.storage.read_exact_at(piece, data + (at - base));
                    }
                    let bm = self.bitmap(s, e)?;
                    Self::bitmap_runs(&bm, at - base, at - base + n, |a, l, present| {
                        let p0 = (base + a - at) as usize;
                        let p = &mut piece[p0..p0 + l as usize];
                        if present {
                            self.storage.read_exact_at(p, data + a)
                        } else {
                            read_from_backing(parent, p, base + a)
                        }
                    })
                }
            }
        })
    }

    /// Fixed: guest byte N is file byte N (holes included, as qemu-img map reports them). Dynamic: an allocated
    /// block's data follows its sector bitmap (spec "Block Allocation Table"); differencing: only the sectors
    /// its bitmap marks present.
    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        check_range(self.virtual_size, offset, len)?;
        let mut out = Vec::new();
        let Some(s) = &self.sparse else {
            HostExtent::push_merged(&mut out, offset, len, Some(offset));
            return Ok(Some(out));
        };
        let differencing = s.parent.is_some();
        Self::for_blocks(s, offset, len, |at, n, entry| {
            let Some(e) = entry else { return Ok(()) };
            let base = at / s.block_size * s.block_size;
            // Entries were checked at open to lie inside the file with their whole block.
            let data = u64::from(e)
                .checked_mul(SECTOR)
                .and_then(|d| d.checked_add(s.bitmap_size))
                .ok_or_else(|| Error::corrupt(FMT, format!("BAT entry {e} overflows")))?;
            if !differencing {
                HostExtent::push_merged(&mut out, at, n, Some(data + (at - base)));
                return Ok(());
            }
            let bm = self.bitmap(s, e)?;
            Self::bitmap_runs(&bm, at - base, at - base + n, |a, l, present| {
                if present {
                    HostExtent::push_merged(&mut out, base + a, l, Some(data + a));
                }
                Ok(())
            })
        })?;
        Ok(Some(out))
    }

    fn backing(&self) -> Option<&dyn DiskSource> {
        self.sparse
            .as_ref()
            .and_then(|s| s.parent.as_ref())
            .map(|p| p.0.as_ref())
    }

    fn info(&self) -> ImageInfo {
        let mut specific = serde_json::json!({
            "subformat": self.footer.disk_type.name(),
            "creator-app": self.footer.creator_text(),
            "size-from": if self.footer.sized_by_chs() { "chs" } else { "current-size" },
            "current-size": self.footer.current_size,
            "geometry": format!("{}/{}/{}", self.footer.chs.cylinders, self.footer.chs.heads, self.footer.chs.sectors),
            "unique-id": uuid::Uuid::from_bytes(self.footer.unique_id).to_string(),
            "saved-state": self.footer.saved_state,
            "timestamp-unix": u64::from(self.footer.timestamp) + meta::VHD_EPOCH_UNIX,
        });
        if let Some(s) = &self.sparse
            && self.footer.disk_type == DiskType::Differencing
        {
            specific["parent-unique-id"] = uuid::Uuid::from_bytes(s.header.parent_unique_id)
                .to_string()
                .into();
        }
        ImageInfo {
            virtual_size: self.virtual_size,
            cluster_size: self.sparse.as_ref().map(|s| s.block_size),
            backing_filename: self
                .sparse
                .as_ref()
                .and_then(|s| s.parent.as_ref().map(|p| p.1.clone())),
            backing_format: self
                .sparse
                .as_ref()
                .and_then(|s| s.parent.as_ref())
                .map(|_| "vpc".to_string()),
            dirty: false,
            format_specific: Some(specific),
        }
    }

    fn check(&self) -> Result<CheckReport> {
        let mut r = CheckReport {
            supported: true,
            ..CheckReport::default()
        };
        let Some(s) = &self.sparse else {
            return Ok(r);
        };
        r.total_clusters = self.virtual_size.div_ceil(s.block_size);
        // Metadata regions that blocks must not overlap: footer copy, dynamic header, BAT, trailing footer.
        let bat_end = s.header.table_offset + s.bat.len() as u64 * 4;
        let regions: Vec<(u64, u64, String)> = vec![
            (0, FOOTER_SIZE, "the footer copy".into()),
            (
                s.header_offset,
                s.header_offset + DYN_HEADER_SIZE,
                "the dynamic header".into(),
            ),
            (s.header.table_offset, bat_end, "the BAT".into()),
        ];
        let span = s.bitmap_size + s.block_size;
        let mut blocks: Vec<(u64, usize)> = s
            .bat
            .iter()
            .enumerate()
            .filter(|(_, e)| **e != BAT_UNALLOCATED)
            .map(|(i, e)| (u64::from(*e) * SECTOR, i))
            .collect();
        r.allocated_clusters = blocks.len() as u64;
        blocks.sort_unstable();
        for (start, i) in &blocks {
            if (*i as u64) >= r.total_clusters {
                r.corruption(format_args!(
                    "BAT entry {i} is allocated beyond the virtual size"
                ));
            }
            for (a, b, what) in &regions {
                if *start < *b && *a < start + span {
                    r.corruption(format_args!("block {i} at offset {start} overlaps {what}"));
                }
            }
        }
        // Blocks overlapping each other are refused when the disk is opened (`refuse_overlapping_blocks`).
        Ok(r)
    }
}
