//! `DiskSource`: a readable virtual disk (one image, with its backing chain resolved through the same trait).

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;

/// Facts about an opened image, with qemu-img's field names where `info --output json` prints them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImageInfo {
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Cluster / grain / block size, when the format has one.
    pub cluster_size: Option<u64>,
    /// The backing (parent) file name exactly as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing file's format as stored in the image.
    pub backing_format: Option<String>,
    /// The image was not closed cleanly (qcow2 dirty bit, VHDX log, VDI/VMDK unclean flags).
    pub dirty: bool,
    /// Format-specific details (qemu-img's `format-specific.data`).
    pub format_specific: Option<serde_json::Value>,
}

/// Outcome of a structural check.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// False when the format has no structural check (qemu-img: "does not support checks").
    pub supported: bool,
    /// Metadata errors that can lose or corrupt data.
    pub corruptions: u64,
    /// Allocated space referenced by nothing (wasted, harmless).
    pub leaks: u64,
    /// One line per problem found (capped).
    pub messages: Vec<String>,
    /// Clusters/blocks checked, for the summary line.
    pub allocated_clusters: u64,
    /// Total clusters/blocks in the virtual disk.
    pub total_clusters: u64,
}

impl CheckReport {
    /// Most problems kept as messages; the counts stay exact.
    pub const MAX_MESSAGES: usize = 100;

    /// Records a corruption. The message is formatted only while under the cap (callers pass
    /// `format_args!`): a crafted image can hold millions of bad entries.
    pub fn corruption(&mut self, msg: impl std::fmt::Display) {
        self.corruptions += 1;
        if self.messages.len() < Self::MAX_MESSAGES {
            self.messages.push(format!("ERROR {msg}"));
        }
    }

    /// Records a leak (formatted only while under the cap, as [`Self::corruption`]).
    pub fn leak(&mut self, msg: impl std::fmt::Display) {
        self.leaks += 1;
        if self.messages.len() < Self::MAX_MESSAGES {
            self.messages.push(format!("Leaked {msg}"));
        }
    }
}

/// A guest range stored in an image file (see [`DiskSource::host_extents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostExtent {
    /// Guest offset of the first byte.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the image file of the first byte; `None` for compressed data (no byte-for-byte location).
    pub host: Option<u64>,
}

impl HostExtent {
    /// Appends `[guest, guest+len)` stored at `host` to `out`, merging with the last entry when both follow on in
    /// the guest and in the file (or are both compressed), as qemu-img map merges its rows. Callers keep pieces
    /// of different files in different lists.
    pub fn push_merged(out: &mut Vec<HostExtent>, guest: u64, len: u64, host: Option<u64>) {
        if len == 0 {
            return;
        }
        if let Some(last) = out.last_mut()
            && last.guest.checked_add(last.len) == Some(guest)
            && match (last.host, host) {
                (Some(a), Some(b)) => a.checked_add(last.len) == Some(b),
                (None, None) => true,
                _ => false,
            }
        {
            last.len += len;
        } else {
            out.push(HostExtent { guest, len, host });
        }
    }
}

/// A readable virtual disk.
///
/// Implementations are `Sync`: the engine calls `read_at` from several worker threads at once, so readers use
/// positional reads and keep any cache behind a lock.
pub trait DiskSource: Send + Sync {
    /// The image format.
    fn format(&self) -> Format;

    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Allocation of `[offset, offset+len)` in this layer only (`Unallocated` where the backing file shows
    /// through). The map covers the range exactly; the range must lie within the virtual size.
    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap>;

    /// Fills `buf` with guest bytes at `offset`, reading through to the backing chain where this layer is
    /// unallocated. The range must lie within the virtual size.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The backing (parent) image, when there is one and it was opened.
    fn backing(&self) -> Option<&dyn DiskSource> {
        None
    }

    /// Where this layer stores the guest range `[offset, offset+len)` in its own file, for `map --output json`'s
    /// `offset` (as qemu-img map): one entry per stored piece, in guest order. `None` when the format does not
    /// say (the default); ranges not stored in this layer are left out.
    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Header facts for `info`.
    fn info(&self) -> ImageInfo;

    /// Structural check of the image's metadata.
    fn check(&self) -> Result<CheckReport> {
        Ok(CheckReport::default())
    }
}

/// A shared disk is a disk: every call goes to the one shared (so an `Arc` can be handed on where a boxed source
/// is wanted).
impl<T: DiskSource + ?Sized> DiskSource for std::sync::Arc<T> {
    fn format(&self) -> Format {
        (**self).format()
    }
    fn virtual_size(&self) -> u64 {
        (**self).virtual_size()
    }
    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        (**self).extents(offset, len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn backing(&self) -> Option<&dyn DiskSource> {
        (**self).backing()
    }
    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        (**self).host_extents(offset, len)
    }
    fn info(&self) -> ImageInfo {
        (**self).info()
    }
    fn check(&self) -> Result<CheckReport> {
        (**self).check()
    }
}

/// Checks that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::input(format!(
            "range {offset}+{len} is outside the virtual disk ({size} bytes)"
        ))),
    }
}

/// The allocation of `[offset, offset+len)` with the backing chain resolved: only `Data` and `Zero` remain, each
/// tagged with the depth of the layer that provides it. Unallocated ranges with no backing file (or beyond a
/// shorter backing file's end) read as zeros.
pub fn resolved_extents(src: &dyn DiskSource, offset: u64, len: u64) -> Result<ExtentMap> {
    let mut out = ExtentMap::new();
    resolve_into(src, offset, len, 0, &mut out)?;
    Ok(out)
}

fn resolve_into(
    src: &dyn DiskSource,
    offset: u64,
    len: u64,
    depth: u32,
    out: &mut ExtentMap,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let top = src.extents(offset, len)?;
    if top.start() != offset || top.end() != offset + len {
        return Err(Error::new(
            crate::ErrorKind::Corrupt,
            format!(
                "{} reader returned extents {}..{} for the range {offset}..{}",
                src.format().name(),
                top.start(),
                top.end(),
                offset + len
            ),
        ));
    }
    for e in &top {
        match e.kind {
            ExtentKind::Data | ExtentKind::Zero => {
                out.push_at_depth(e.start, e.len, e.kind, depth)?
            }
            ExtentKind::Unallocated => match src.backing() {
                None => out.push_at_depth(e.start, e.len, ExtentKind::Zero, depth)?,
                Some(b) => {
                    let bsize = b.virtual_size();
                    let inside_end = e.end().min(bsize);
                    if inside_end > e.start {
                        resolve_into(b, e.start, inside_end - e.start, depth + 1, out)?;
                    }
                    let tail_start = e.start.max(inside_end);
                    if e.end() > tail_start {
                        out.push_at_depth(
                            tail_start,
                            e.end() - tail_start,
                            ExtentKind::Zero,
                            depth + 1,
                        )?;
                    }
                }
            },
        }
    }
    Ok(())
}

/// Reads `[offset, offset+buf.len())` from `backing`, zero-filling what lies beyond its end. A helper for
/// readers whose unallocated ranges show their parent through.
pub fn read_from_backing(
    backing: Option<&dyn DiskSource>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    match backing {
        None => {
            buf.fill(0);
            Ok(())
        }
        Some(b) => {
            let size = b.virtual_size();
            let avail = usize::try_from(size.saturating_sub(offset))
                .unwrap_or(usize::MAX)
                .min(buf.len());
            if avail > 0 {
                b.read_at(&mut buf[..avail], offset)?;
            }
            buf[avail..].fill(0);
            Ok(())
        }
    }
}
