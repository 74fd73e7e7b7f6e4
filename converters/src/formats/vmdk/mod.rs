//! VMDK: VMware virtual disks, per VMware's technical note "Virtual Disk Format 5.0"
//! (<https://www.vmware.com/support/developer/vddk/vmdk_50_technote.pdf>), checked against what qemu
//! (`block/vmdk.c`) and VMware's own open-vmdk and stream writers really produce.
//!
//! Read: `monolithicSparse`, `streamOptimized` (header or footer GD, deflate grains behind markers),
//! `monolithicFlat`, `twoGbMaxExtentSparse`, `twoGbMaxExtentFlat`, `vmfs` and `custom` descriptors with
//! `SPARSE`, `FLAT`, `VMFS` and `ZERO` extents, zeroed-grain GTEs (version 2), and snapshot deltas
//! (`parentCID` / `parentFileNameHint`, the parent's CID must match).
//! Refused: `vmfsSparse` ("COWD"), `seSparse`, raw device mappings, `NOACCESS` extents, compressed grains
//! without markers.
//!
//! Extent files and parents are named inside the image: they open only through the [`OpenGate`] (the
//! image's own folder, relative names, no `..`), and extents only when named as the image's own files (see
//! [`extent_files`]; `OpenGate::allow_dir` trusts other folders). A monolithic or stream-optimized file never opens
//! another file for its data: its embedded descriptor's extent line is informational, as in qemu.
//!
//! Write: see [`writer`].

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;
use crate::gate::OpenGate;
use crate::source::{CheckReport, DiskSource, HostExtent, ImageInfo, check_range};
use crate::storage::Storage;

pub mod descriptor;
mod extent_files;
pub mod sparse;
pub mod writer;

pub use writer::{OPTIONS as WRITER_OPTIONS, VmdkWriter};

use descriptor::{Access, Descriptor, ExtentType, MAX_DESCRIPTOR_BYTES};
use extent_files::ExtentFiles;
use sparse::{COWD_MAGIC, MetadataBudget, SECTOR, SESPARSE_MAGIC, SparseExtent};

const FMT: &str = "vmdk";

enum PartData {
    /// A flat file from a byte offset.
    Flat {
        storage: Arc<dyn Storage>,
        offset: u64,
    },
    /// Zeros.
    Zero,
    /// A hosted sparse extent.
    Sparse(Box<SparseExtent>),
}

/// One extent of the virtual disk.
struct Part {
    /// Guest byte offset of the first byte.
    start: u64,
    /// Length in bytes.
    len: u64,
    data: PartData,
    /// File name for `info` (empty for ZERO).
    file: String,
    /// Extent type for `info`.
    kind: &'static str,
}

/// Reads a VMDK image (any supported subformat) and its parent chain.
pub struct VmdkReader {
    parts: Vec<Part>,
    virtual_size: u64,
    backing: Option<Box<dyn DiskSource>>,
    desc: Descriptor,
    create_type: String,
    dirty: bool,
}

impl VmdkReader {
    /// Opens the VMDK in `storage`: a sparse extent with an embedded descriptor, or a descriptor file whose
    /// extents are opened through `gate`.
    pub fn open(storage: Arc<dyn Storage>, gate: &OpenGate) -> Result<Self> {
        let len = storage.len();
        let mut head = [0u8; 8];
        storage.read_at_zero_fill(&mut head, 0)?;
        if len < 4 {
            return Err(Error::invalid(FMT, "file too small"));
        }
        if sparse::SparseHeader::has_magic(&head) {
            return Self::open_sparse(storage, gate);
        }
        if head[..4] == COWD_MAGIC {
            return Err(Error::unsupported(
                FMT,
                "vmfsSparse (COWD, ESX 2) sparse extents",
            ));
        }
        if u64::from_le_bytes(head) == SESPARSE_MAGIC {
            return Err(Error::unsupported(FMT, "seSparse extents"));
        }
        if len > MAX_DESCRIPTOR_BYTES {
            return Err(Error::limit(
                FMT,
                format!(
                    "a descriptor file of {len} bytes is larger than 1 MiB (not a VMDK descriptor?)"
                ),
            ));
        }
        let mut text = vec![0u8; len as usize];
        storage.read_exact_at(&mut text, 0)?;
        let desc = descriptor::parse(&text)?;
        Self::open_descriptor(storage, desc, gate)
    }

    fn open_sparse(storage: Arc<dyn Storage>, gate: &OpenGate) -> Result<Self> {
        let extent = SparseExtent::open(storage.clone())?;
        let desc = match extent.descriptor_bytes()? {
            Some(b) => descriptor::parse(&b).map_err(|e| e.context("embedded descriptor"))?,
            None => Descriptor::default(),
        };
        // qemu: a sparse file with capacity 0 and an embedded descriptor is a descriptor file in disguise.
        if extent.header.capacity == 0 && !desc.extents.is_empty() {
            return Self::open_descriptor(storage, desc, gate);
        }
        // qemu names the type from the header: compressed grains are streamOptimized.
        let create_type = if extent.header.compressed {
            "streamOptimized".to_string()
        } else {
            desc.create_type
                .clone()
                .unwrap_or_else(|| "monolithicSparse".to_string())
        };
        let len = extent.capacity_bytes();
        let dirty = extent.header.unclean;
        let parts = vec![Part {
            start: 0,
            len,
            file: storage.name(),
            kind: "SPARSE",
            data: PartData::Sparse(Box::new(extent)),
        }];
        let backing = open_parent(storage.as_ref(), &desc, gate)?;
        Ok(VmdkReader {
            parts,
            virtual_size: len,
            backing,
            desc,
            create_type,
            dirty,
        })
    }

    fn open_descriptor(
        storage: Arc<dyn Storage>,
        desc: Descriptor,
        gate: &OpenGate,
    ) -> Result<Self> {
        let create_type = desc
            .create_type
            .clone()
            .ok_or_else(|| Error::invalid(FMT, "descriptor has no createType"))?;
        match create_type.as_str() {
            "monolithicFlat"
            | "twoGbMaxExtentSparse"
            | "twoGbMaxExtentFlat"
            | "vmfs"
            | "vmfsThin"
            | "custom" => {}
            "monolithicSparse" | "streamOptimized" => {
                return Err(Error::invalid(
                    FMT,
                    format!(
                        "a separate descriptor file of createType {create_type}: that type keeps its descriptor inside the sparse file"
                    ),
                ));
            }
            "vmfsSparse" => {
                return Err(Error::unsupported(FMT, "vmfsSparse (COWD) images"));
            }
            "seSparse" => return Err(Error::unsupported(FMT, "seSparse images")),
            "fullDevice"
            | "partitionedDevice"
            | "vmfsRaw"
            | "vmfsRDM"
            | "vmfsRawDeviceMap"
            | "vmfsPassthroughRawDeviceMap" => {
                return Err(Error::unsupported(
                    FMT,
                    format!("createType {create_type} (raw device access)"),
                ));
            }
            other => {
                return Err(Error::unsupported(FMT, format!("createType '{other}'")));
            }
        }
        if desc.extents.is_empty() {
            return Err(Error::invalid(FMT, "descriptor lists no extents"));
        }
        let mut parts = Vec::with_capacity(desc.extents.len());
        let mut start = 0u64;
        let mut dirty = false;
        let mut files: Option<ExtentFiles> = None;
        let sparse_extents = desc
            .extents
            .iter()
            .filter(|l| l.kind == ExtentType::Sparse)
            .count();
        let mut budget = MetadataBudget::for_extents(sparse_extents);
        for (i, line) in desc.extents.iter().enumerate() {
            let what = || format!("extent {} ({})", i + 1, line.kind.keyword());
            if line.access == Access::NoAccess {
                return Err(Error::unsupported(FMT, format!("{}: NOACCESS", what())));
            }
            if line.sectors == 0 {
                return Err(Error::invalid(FMT, format!("{}: size 0", what())));
            }
            let len = line
                .sectors
                .checked_mul(SECTOR)
                .filter(|&b| b <= sparse::MAX_CAPACITY_BYTES)
                .ok_or_else(|| Error::limit(FMT, format!("{}: larger than 64 TiB", what())))?;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= sparse::MAX_CAPACITY_BYTES)
                .ok_or_else(|| Error::limit(FMT, "extents add up to more than 64 TiB"))?;
            let (data, file, kind) = match line.kind {
                ExtentType::Zero => (PartData::Zero, String::new(), "ZERO"),
                ExtentType::Flat | ExtentType::Vmfs => {
                    let (ext, name) =
                        open_extent(storage.as_ref(), &mut files, line.file.as_deref(), gate)?;
                    let offset = line.offset.checked_mul(SECTOR).ok_or_else(|| {
                        Error::invalid(FMT, format!("{}: offset overflows", what()))
                    })?;
                    if offset.checked_add(len).is_none_or(|e| e > ext.len()) {
                        return Err(Error::corrupt(
                            FMT,
                            format!(
                                "{}: file {name} holds {} bytes, the descriptor needs {len} from offset {offset}",
                                what(),
                                ext.len()
                            ),
                        ));
                    }
                    let kind = if line.kind == ExtentType::Flat {
                        "FLAT"
                    } else {
                        "VMFS"
                    };
                    (
                        PartData::Flat {
                            storage: ext,
                            offset,
                        },
                        name,
                        kind,
                    )
                }
                ExtentType::Sparse => {
                    let (ext, name) =
                        open_extent(storage.as_ref(), &mut files, line.file.as_deref(), gate)?;
                    let sp = SparseExtent::open_in(ext, &mut budget)
                        .map_err(|e| e.context(format!("extent {name}")))?;
                    if sp.capacity_bytes() < len {
                        return Err(Error::corrupt(
                            FMT,
                            format!(
                                "extent {name} holds {} sectors, the descriptor says {}",
                                sp.header.capacity, line.sectors
                            ),
                        ));
                    }
                    dirty |= sp.header.unclean;
                    (PartData::Sparse(Box::new(sp)), name, "SPARSE")
                }
                ExtentType::VmfsSparse => {
                    return Err(Error::unsupported(
                        FMT,
                        format!("{}: COWD sparse extents", what()),
                    ));
                }
                ExtentType::SeSparse => {
                    return Err(Error::unsupported(
                        FMT,
                        format!("{}: seSparse extents", what()),
                    ));
                }
                ExtentType::VmfsRaw => {
                    return Err(Error::unsupported(
                        FMT,
                        format!("{}: raw device mappings", what()),
                    ));
                }
            };
            parts.push(Part {
                start,
                len,
                data,
                file,
                kind,
            });
            start = end;
        }
        let backing = open_parent(storage.as_ref(), &desc, gate)?;
        Ok(VmdkReader {
            parts,
            virtual_size: start,
            backing,
            desc,
            create_type,
            dirty,
        })
    }

    /// The descriptor's CID (content id), when it has one.
    pub fn cid(&self) -> Option<u32> {
        self.desc.cid
    }

    fn part_index(&self, offset: u64) -> usize {
        self.parts.partition_point(|p| p.start + p.len <= offset)
    }
}

/// Opens an extent file named in a descriptor: relative names in the descriptor's folder, through the gate and
/// the own-extent rule of [`extent_files`]. `files` holds the descriptor's extents opened so far.
fn open_extent(
    desc_storage: &dyn Storage,
    files: &mut Option<ExtentFiles>,
    name: Option<&str>,
    gate: &OpenGate,
) -> Result<(Arc<dyn Storage>, String)> {
    let name = name.ok_or_else(|| Error::invalid(FMT, "extent line without a file name"))?;
    let files = match files {
        Some(f) => f,
        None => {
            let path = desc_storage.path().ok_or_else(|| {
                Error::unsupported(
                    FMT,
                    format!(
                        "extent '{name}': extent files are opened only next to a descriptor file on disk"
                    ),
                )
            })?;
            files.insert(ExtentFiles::new(path)?)
        }
    };
    let st = files.open(gate, name)?;
    Ok((st, name.to_string()))
}

/// Opens the parent of a delta link (VMDK 5.0, "Header": parentCID, parentFileNameHint) and checks that the
/// parent's CID is the one this link recorded: a mismatch means the parent changed after the snapshot and
/// the delta's data would be wrong, so it is refused (qemu refuses reads through it too).
fn open_parent(
    storage: &dyn Storage,
    desc: &Descriptor,
    gate: &OpenGate,
) -> Result<Option<Box<dyn DiskSource>>> {
    let Some(parent_cid) = desc.parent() else {
        return Ok(None);
    };
    let hint = desc.parent_hint.as_deref().ok_or_else(|| {
        Error::unsupported(
            FMT,
            format!("snapshot delta (parentCID {parent_cid:08x}) without parentFileNameHint"),
        )
    })?;
    let path = storage.path().ok_or_else(|| {
        Error::unsupported(
            FMT,
            format!("parent '{hint}': parents are opened only next to an image on disk"),
        )
    })?;
    let (pst, child) = gate.open(path, hint, "VMDK parent")?;
    let parent = crate::formats::open(pst, Some(Format::Vmdk), &child)
        .map_err(|e| e.context(format!("parent '{hint}'")))?;
    let cid = parent
        .info()
        .format_specific
        .as_ref()
        .and_then(|v| v.get("cid"))
        .and_then(serde_json::Value::as_u64);
    if cid != Some(u64::from(parent_cid)) {
        return Err(Error::corrupt(
            FMT,
            format!(
                "parent '{hint}' has CID {}, this delta was made from CID {parent_cid:08x} (the parent changed)",
                cid.map_or("none".to_string(), |c| format!("{c:08x}"))
            ),
        ));
    }
    Ok(Some(parent))
}

impl DiskSource for VmdkReader {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        check_range(self.virtual_size, offset, len)?;
        let end = offset + len;
        let mut map = ExtentMap::new();
        let mut pos = offset;
        let mut i = self.part_index(offset);
        while pos < end {
            let p = self
                .parts
                .get(i)
                .ok_or_else(|| Error::input("internal error: VMDK extent lookup"))?;
            let stop = end.min(p.start + p.len);
            let rel = pos - p.start;
            let n = stop - pos;
            match &p.data {
                PartData::Zero => map.push(pos, n, ExtentKind::Zero)?,
                PartData::Sparse(s) => s.extents_into(p.start, rel, n, &mut map)?,
                PartData::Flat { storage, offset } => {
                    let foff = offset + rel;
                    match storage.data_ranges(foff, n)? {
                        None => map.push(pos, n, ExtentKind::Data)?,
                        Some(ranges) => {
                            let mut at = pos;
                            for (s, l) in ranges {
                                let gs = pos + s.saturating_sub(foff);
                                let t = gs.saturating_add(l).min(stop);
                                let s = gs.max(at);
                                if t <= s {
                                    continue;
                                }
                                map.push(at, s - at, ExtentKind::Zero)?;
                                map.push(s, t - s, ExtentKind::Data)?;
                                at = t;
                            }
                            map.push(at, stop - at, ExtentKind::Zero)?;
                        }
                    }
                }
            }
            pos = stop;
            i += 1;
        }
        Ok(map)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        let mut i = self.part_index(offset);
        while done < buf.len() {
            let pos = offset + done as u64;
            let p = self
                .parts
                .get(i)
                .ok_or_else(|| Error::input("internal error: VMDK extent lookup"))?;
            let rel = pos - p.start;
            let n = ((p.len - rel) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match &p.data {
                PartData::Zero => out.fill(0),
                PartData::Flat { storage, offset } => storage.read_exact_at(out, offset + rel)?,
                PartData::Sparse(s) => s.read(out, rel, p.start, self.backing.as_deref())?,
            }
            done += n;
            i += 1;
        }
        Ok(())
    }

    /// Offsets within each extent's own file, as qemu-img map reports them (its JSON names no file): flat
    /// extents from their descriptor offset (holes included), sparse extents per grain, compressed grains with
    /// none, ZERO extents not at all. Pieces of different extents are never merged.
    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        check_range(self.virtual_size, offset, len)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        let mut i = self.part_index(offset);
        while pos < end {
            let p = self
                .parts
                .get(i)
                .ok_or_else(|| Error::input("internal error: VMDK extent lookup"))?;
            let stop = end.min(p.start + p.len);
            let rel = pos - p.start;
            let mut part = Vec::new();
            match &p.data {
                PartData::Zero => {}
                PartData::Sparse(s) => s.host_extents_into(p.start, rel, stop - pos, &mut part)?,
                PartData::Flat { offset, .. } => {
                    let host = offset.checked_add(rel).ok_or_else(|| {
                        Error::corrupt(FMT, format!("flat extent offset {offset} overflows"))
                    })?;
                    HostExtent::push_merged(&mut part, pos, stop - pos, Some(host));
                }
            }
            out.append(&mut part);
            pos = stop;
            i += 1;
        }
        Ok(Some(out))
    }

    fn backing(&self) -> Option<&dyn DiskSource> {
        self.backing.as_deref()
    }

    fn info(&self) -> ImageInfo {
        let cluster_size = self.parts.iter().find_map(|p| match &p.data {
            PartData::Sparse(s) => Some(s.header.grain_bytes()),
            _ => None,
        });
        let extents: Vec<serde_json::Value> = self
            .parts
            .iter()
            .map(|p| {
                let mut e = serde_json::json!({
                    "filename": p.file,
                    "format": p.kind,
                    "virtual-size": p.len,
                });
                if let PartData::Sparse(s) = &p.data {
                    e["cluster-size"] = s.header.grain_bytes().into();
                    if s.header.compressed {
                        e["compressed"] = true.into();
                    }
                }
                e
            })
            .collect();
        let mut spec = serde_json::json!({
            "create-type": self.create_type,
            "extents": extents,
        });
        if let Some(c) = self.desc.cid {
            spec["cid"] = c.into();
        }
        if let Some(c) = self.desc.parent_cid {
            spec["parent-cid"] = c.into();
        }
        for (k, v) in &self.desc.ddb {
            match k.as_str() {
                "adapterType" => spec["adapter-type"] = v.clone().into(),
                "virtualHWVersion" => spec["hw-version"] = v.clone().into(),
                "geometry.cylinders" | "geometry.heads" | "geometry.sectors" => {
                    spec[k.replace('.', "-")] = v.clone().into();
                }
                _ => {}
            }
        }
        let has_parent = self.desc.parent().is_some();
        ImageInfo {
            virtual_size: self.virtual_size,
            cluster_size,
            backing_filename: if has_parent {
                self.desc.parent_hint.clone()
            } else {
                None
            },
            backing_format: has_parent.then(|| "vmdk".to_string()),
            dirty: self.dirty,
            format_specific: Some(spec),
        }
    }

    fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport {
            supported: true,
            ..CheckReport::default()
        };
        for p in &self.parts {
            if let PartData::Sparse(s) = &p.data {
                s.check(&mut report)?;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::MemSink;
    use crate::storage::MemStorage;
    use crate::writer::{FormatWriter, Plan, Run, WriterOptions};

    /// Writes `disk` (zeros are holes) with `opts` into memory, seekable or planned.
    fn write(disk: &[u8], opts: &str) -> Vec<u8> {
        let mut o = WriterOptions::default();
        o.parse_into(opts).unwrap();
        let mut w = VmdkWriter::new(&mut o).unwrap();
        let g = w.granularity() as usize;
        let runs: Vec<(u64, u64)> = (0..disk.len())
            .step_by(g)
            .filter(|&s| disk[s..(s + g).min(disk.len())].iter().any(|&b| b != 0))
            .map(|s| (s as u64, (s + g).min(disk.len()) as u64))
            .collect();
        let mut sink = MemSink::default();
        let plan = Plan {
            virtual_size: disk.len() as u64,
            runs: &runs,
        };
        w.begin(&mut sink, &plan).unwrap();
        let c = w.compressor();
        for &(s, e) in &runs {
            let chunk = &disk[s as usize..e as usize];
            let run = match &c {
                Some(c) => {
                    let data = c.compress(chunk).unwrap().unwrap();
                    w.write_run(
                        &mut sink,
                        s,
                        Run::Compressed {
                            data: &data,
                            len: e - s,
                        },
                    )
                    .unwrap();
                    continue;
                }
                None => Run::Data(chunk),
            };
            w.write_run(&mut sink, s, run).unwrap();
        }
        let len = w.finish(&mut sink).unwrap();
        assert_eq!(len as usize, sink.data.len());
        sink.data
    }

    #[test]
    fn roundtrip_in_memory_with_deny_all_gate() {
        let mut disk = vec![0u8; 3 * 1024 * 1024 + 1536];
        for (i, b) in disk.iter_mut().enumerate().skip(70_000).take(200_000) {
            *b = (i % 251) as u8 + 1;
        }
        let n = disk.len();
        disk[n - 10..].fill(7);
        for opts in ["", "subformat=streamOptimized", "zeroed_grain=on"] {
            let img = write(&disk, opts);
            let st: Arc<dyn Storage> = Arc::new(MemStorage::new(img, "mem.vmdk"));
            let r = VmdkReader::open(st, &OpenGate::deny_all()).unwrap();
            assert_eq!(r.virtual_size(), n as u64);
            let mut back = vec![0u8; n];
            r.read_at(&mut back, 0).unwrap();
            assert!(back == disk, "{opts}");
            let map = r.extents(0, n as u64).unwrap();
            assert!(map.bytes(ExtentKind::Data) <= 5 * 65536, "{opts}: {map:?}");
            let report = r.check().unwrap();
            assert_eq!(report.corruptions, 0);
        }
    }

    #[test]
    fn descriptor_files_need_a_path_and_the_gate() {
        let text = b"# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"x-flat.vmdk\" 0\n";
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new(text.to_vec(), "mem.vmdk"));
        let e = VmdkReader::open(st, &OpenGate::deny_all()).err().unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{e}");
    }
}
