//! qcow2: QEMU copy-on-write, versions 2 (compat 0.10) and 3 (compat 1.1).
//!
//! Spec: qemu `docs/interop/qcow2.txt` (<https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt>);
//! limits from qemu `block/qcow2.h`.
//!
//! Read: clusters of 512 B to 2 MiB, standard / zero / compressed (deflate and zstd) clusters, extended L2
//! entries (32 subclusters), backing files whose format the header records (opened through the `OpenGate`,
//! never probed), dirty and corrupt images (read-only, reported). Refused: encryption, external data files
//! (CVE-2024-32498), unknown incompatible features (named from the image's feature table).
//! Write: version 3, 16-bit refcounts, optional zlib/zstd compression, a backing file reference; seekable
//! outputs get metadata after the data, streams get metadata first (see `writer`).

pub mod bitmaps;
mod check;
pub mod header;
mod inplace;
mod mapping;
mod repair;
mod writer;

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;
use crate::gate::OpenGate;
use crate::source::{
    CheckReport, DiskSource, HostExtent, ImageInfo, check_range, read_from_backing,
};
use crate::storage::Storage;

pub use inplace::Qcow2InPlace;
pub use repair::{RepairOutcome, read_header_fields, repair_leaks};
pub use writer::{OPTIONS as WRITER_OPTIONS, Qcow2Compressor, Qcow2Writer};

use header::Header;
use mapping::{L2Cache, Piece};

/// Format name used in messages.
pub(crate) const FMT: &str = "qcow2";
/// Smallest cluster_bits ("Must not be less than 9").
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits qemu opens (2 MiB, "implementation limit of 2 MB").
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's `QCOW_MAX_L1_SIZE`: the L1 table is at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's `QCOW_MAX_REFTABLE_SIZE`: the refcount table is at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Backing file names "Must not be longer than 1023 bytes".
pub const MAX_BACKING_NAME: u64 = 1023;
/// qemu's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets must lie below 2^56 ("64 PB (56 bits)").
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Bits 9-55 of L1 and standard L2 entries hold a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 bit 63: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor bit 0: reads as zeros (v3 without extended L2).
pub const ZERO_FLAG: u64 = 1;
/// Bytes of L2 tables kept in the reader's cache.
const L2_CACHE_BYTES: u64 = 4 << 20;

/// Reads a qcow2 image.
pub struct Qcow2Reader {
    storage: Arc<dyn Storage>,
    header: Header,
    /// The active L1 entries that cover the virtual disk (at most 32 MiB by the header checks).
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    /// The last decompressed cluster: (L2 entry, bytes).
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    backing: Option<Box<dyn DiskSource>>,
}

impl Qcow2Reader {
    /// Opens a qcow2 image. A backing file is opened through `gate` with the format the header records.
    pub fn open(storage: Arc<dyn Storage>, gate: &OpenGate) -> Result<Self> {
        let header = bitmaps::read_header(storage.as_ref())?;

        let needed = header.size.div_ceil(header.l2_span());
        let mut raw_l1 = vec![0u8; (needed * 8) as usize];
        storage.read_exact_at(&mut raw_l1, header.l1_table_offset)?;
        let l1: Vec<u64> = raw_l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        refuse_shared_l2(&l1)?;

        let backing = match &header.backing_file {
            None => None,
            Some(name) => Some(open_backing(&storage, &header, name, gate)?),
        };
        let cache_tables = (L2_CACHE_BYTES >> header.cluster_bits).max(4) as usize;
        Ok(Qcow2Reader {
            storage,
            header,
            l1,
            l2_cache: Mutex::new(L2Cache::new(cache_tables)),
            last_compressed: Mutex::new(None),
            backing,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The persistent bitmaps of this image (qemu-img info's `bitmaps`), each directory entry checked.
    pub fn bitmaps(&self) -> Result<Vec<bitmaps::BitmapInfo>> {
        bitmaps::list(self.storage.as_ref(), &self.header)
    }

    /// The guest ranges the dirty bitmap `name` marks (see [`bitmaps::dirty_ranges`]).
    pub fn dirty_bitmap(
        &self,
        name: &str,
    ) -> std::result::Result<bitmaps::DirtyBitmap, bitmaps::BitmapError> {
        bitmaps::dirty_ranges(self.storage.as_ref(), &self.header, name)
    }
}

/// Rule: each active L1 entry has its own L2 table. qemu never writes two active L1 entries that share one (only
/// snapshots share tables with the active L1), and a shared table lets a few MiB of file describe 2^61 bytes of
/// mapped clusters, so mapping the disk would take hours; with distinct tables the work follows the file size.
fn refuse_shared_l2(l1: &[u64]) -> Result<()> {
    let mut used: Vec<u64> = l1
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    used.sort_unstable();
    match used.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(Error::corrupt(
            FMT,
            format!(
                "two L1 entries share the L2 table at {:#x} (qemu-img check would report its refcount)",
                w[0]
            ),
        )),
        None => Ok(()),
    }
}

fn open_backing(
    storage: &Arc<dyn Storage>,
    header: &Header,
    name: &str,
    gate: &OpenGate,
) -> Result<Box<dyn DiskSource>> {
    let Some(fmt) = header.backing_format.as_deref() else {
        return Err(Error::unsupported(
            FMT,
            format!(
                "backing file '{name}' has no recorded format and imgshift does not probe backing files; \
                 record it with `qemu-img rebase -u -b '{name}' -F FMT IMAGE`"
            ),
        ));
    };
    let format = Format::from_name(fmt).map_err(|e| {
        Error::unsupported(
            FMT,
            format!("backing file '{name}' has format '{fmt}': {e}"),
        )
    })?;
    let referrer = storage.path().ok_or_else(|| {
        Error::denied(format!(
            "backing file '{name}' refused: {} is not a local file, so it has no folder to look in",
            storage.name()
        ))
    })?;
    let (child, child_gate) = gate.open(referrer, name, "backing file")?;
    crate::formats::open(child, Some(format), &child_gate)
        .map_err(|e| e.context(format!("backing file '{name}'")))
}

impl DiskSource for Qcow2Reader {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        check_range(self.virtual_size(), offset, len)?;
        let mut map = ExtentMap::new();
        self.walk(offset, len, &mut |p: Piece| {
            let kind = match p {
                Piece::Unallocated { .. } => ExtentKind::Unallocated,
                Piece::Zero { .. } => ExtentKind::Zero,
                Piece::Data { .. } | Piece::Compressed { .. } => ExtentKind::Data,
            };
            map.push(p.guest(), p.len(), kind)
        })?;
        Ok(map)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len() as u64)?;
        // Adjacent pieces of the same kind (and, for data, contiguous host offsets) become one read.
        let mut pending: Option<Piece> = None;
        self.walk(offset, buf.len() as u64, &mut |p: Piece| {
            if let Some(prev) = pending.take() {
                match prev.merge(p) {
                    Ok(merged) => {
                        pending = Some(merged);
                        return Ok(());
                    }
                    Err(prev) => self.fill(buf, offset, prev)?,
                }
            }
            pending = Some(p);
            Ok(())
        })?;
        if let Some(p) = pending {
            self.fill(buf, offset, p)?;
        }
        Ok(())
    }

    fn backing(&self) -> Option<&dyn DiskSource> {
        self.backing.as_deref()
    }

    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        check_range(self.virtual_size(), offset, len)?;
        let mut out: Vec<HostExtent> = Vec::new();
        self.walk(offset, len, &mut |p: Piece| {
            let (guest, len, host) = match p {
                Piece::Unallocated { .. } | Piece::Zero { .. } => return Ok(()),
                Piece::Data { guest, len, host } => (guest, len, Some(host)),
                Piece::Compressed { guest, len, .. } => (guest, len, None),
            };
            // Adjacent pieces contiguous in the file become one, as qemu-img map merges them.
            if let Some(last) = out.last_mut()
                && last.guest + last.len == guest
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
            Ok(())
        })?;
        Ok(Some(out))
    }

    fn info(&self) -> ImageInfo {
        let h = &self.header;
        let mut spec = serde_json::Map::new();
        let v3 = h.version >= 3;
        spec.insert("compat".into(), (if v3 { "1.1" } else { "0.10" }).into());
        spec.insert("compression-type".into(), h.compression.name().into());
        if v3 {
            spec.insert(
                "lazy-refcounts".into(),
                (h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0).into(),
            );
        }
        spec.insert("refcount-bits".into(), (1u64 << h.refcount_order).into());
        // As qemu-img info: listed when the extension is consistent (autoclear bit set); a directory that does
        // not parse is left out here (the `bitmaps` accessor and `check` report it).
        if h.autoclear & header::AUTOCLEAR_BITMAPS != 0
            && let Ok(list) = self.bitmaps()
            && !list.is_empty()
        {
            let v: Vec<serde_json::Value> = list
                .iter()
                .map(|b| {
                    serde_json::json!({"flags": b.flag_names(), "name": b.name,
                                       "granularity": b.granularity()})
                })
                .collect();
            spec.insert("bitmaps".into(), v.into());
        }
        if v3 {
            spec.insert("corrupt".into(), h.corrupt().into());
            spec.insert("extended-l2".into(), h.extended_l2().into());
        }
        ImageInfo {
            virtual_size: h.size,
            cluster_size: Some(h.cluster_size()),
            backing_filename: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            dirty: h.dirty(),
            format_specific: Some(serde_json::Value::Object(spec)),
        }
    }

    fn check(&self) -> Result<CheckReport> {
        check::check(self.storage.as_ref(), &self.header)
    }
}

impl Qcow2Reader {
    /// Fills the part of `buf` (which starts at guest `base`) that piece `p` covers.
    fn fill(&self, buf: &mut [u8], base: u64, p: Piece) -> Result<()> {
        let from = usize::try_from(p.guest() - base).map_err(|_| Error::input("read too large"))?;
        let to = from + p.len() as usize;
        let out = buf
            .get_mut(from..to)
            .ok_or_else(|| Error::input("internal error: piece outside the read"))?;
        match p {
            Piece::Unallocated { guest, .. } => read_from_backing(self.backing(), out, guest),
            Piece::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            Piece::Data { host, .. } => {
                self.storage.read_at_zero_fill(out, host)?;
                Ok(())
            }
            Piece::Compressed {
                entry, in_cluster, ..
            } => {
                let cluster = self.decompressed(entry)?;
                let src = cluster
                    .get(in_cluster as usize..in_cluster as usize + out.len())
                    .ok_or_else(|| Error::input("internal error: compressed piece"))?;
                out.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
