//! OVA input: a tar archive holding an OVF descriptor and its disks (DMTF DSP0243 "Open Virtualization Format
//! Specification" 2.1.1, <https://www.dmtf.org/dsp/DSP0243>; section 5.3 "Distribution as a single file").
//!
//! The tar is read in place: member headers are walked once (through `Storage`, never a filesystem path), and
//! each disk is opened as a `SliceStorage` window over the archive. The descriptor must be the first member
//! (DSP0243 5.3). From it: `References/File` (ovf:id, ovf:href, ovf:size, ovf:compression, ovf:chunkSize),
//! `DiskSection/Disk` (ovf:diskId, ovf:fileRef, ovf:capacity with ovf:capacityAllocationUnits, ovf:format) and
//! the first `VirtualSystem`'s hardware items of ResourceType 17 (disk drive) whose HostResource is
//! `ovf:/disk/ID`, in controller then address order: the first is the boot disk.
//!
//! Refused: a first member that is not `.ovf`, hrefs naming anything but a member (URLs, absolute paths, `..`),
//! missing or duplicate members, compressed (`ovf:compression`) or chunked (`ovf:chunkSize`) files, a member
//! whose size differs from `ovf:size`, a disk whose virtual size differs from its `ovf:capacity`, DTDs in the
//! descriptor (roxmltree refuses them), tar extension members (GNU long names, PAX records) larger than
//! `MAX_EXTENSION_BYTES`, and archives past the other bounds below.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::gate::OpenGate;
use crate::source::DiskSource;
use crate::storage::{SliceStorage, Storage};

const FMT: &str = "ova";

/// Largest OVF descriptor read (real ones are a few tens of KiB).
pub const MAX_DESCRIPTOR_BYTES: u64 = 16 << 20;
/// Most tar members walked.
pub const MAX_MEMBERS: usize = 4096;
/// Most tar headers walked: members, folders, and the extension headers before them (at most three each).
pub const MAX_TAR_HEADERS: usize = 4 * MAX_MEMBERS;
/// Largest GNU long-name/long-link ('L'/'K') or PAX extended header ('x'/'g') member: a path is at most
/// PATH_MAX (4096) bytes and PAX records are a few hundred (POSIX.1-2008 pax, "pax Extended Header"; GNU tar
/// manual, "GNU tar and POSIX tar"). Checked before any of it is read.
pub const MAX_EXTENSION_BYTES: u64 = 64 << 10;
/// Most disks in one descriptor (AWS VM Import refuses more than 22 volumes anyway).
pub const MAX_DISKS: usize = 256;
/// Most XML nodes parsed in the descriptor.
const MAX_XML_NODES: u32 = 1_000_000;
/// XML namespaces of OVF 1.x and 2.x envelopes (DSP8023 / DSP8027).
const OVF_NAMESPACES: [&str; 2] = [
    "http://schemas.dmtf.org/ovf/envelope/1",
    "http://schemas.dmtf.org/ovf/envelope/2",
];
/// CIM ResourceType of a disk drive (DSP1043 / CIM_ResourceAllocationSettingData).
const RESOURCE_TYPE_DISK: &str = "17";

/// One disk of the package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvaDisk {
    /// Position in `disks()`; the boot disk is index 0 when the descriptor's hardware names one.
    pub index: usize,
    /// `ovf:diskId`.
    pub id: String,
    /// The member holding it (`ovf:href`).
    pub file_name: String,
    /// `ovf:capacity` in bytes.
    pub capacity: u64,
    /// Format implied by `ovf:format`; `None` when absent or unknown (the member is probed).
    pub format: Option<Format>,
    /// Size of the member in the archive.
    pub size: u64,
}

/// A tar member's data window.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    offset: u64,
    size: u64,
}

/// An opened OVA.
pub struct OvaPackage {
    storage: Arc<dyn Storage>,
    descriptor_name: String,
    disks: Vec<(OvaDisk, Member)>,
}

/// The tar block: every header is one, every member's data is padded to a multiple (POSIX.1-2008 pax, "ustar
/// Interchange Format").
const TAR_BLOCK: u64 = 512;

/// Walks the tar headers: regular members in archive order.
///
/// Headers are read one 512-byte block at a time; the `tar` crate only decodes each block's fields. Its own
/// walker reads the whole of every extension member (GNU 'L'/'K', PAX 'x'/'g') into memory, whatever size the
/// header claims, so it is not used. Like it, a PAX `path` or GNU long name renames the next member, a PAX `size`
/// overrides the next header's size field, and an all-zero block ends the archive.
fn list_members(storage: &dyn Storage) -> Result<Vec<Member>> {
    let tar_err = |pos: u64, e: std::io::Error| {
        Error::invalid(FMT, format!("tar header at offset {pos}: {e}"))
    };
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut headers = 0usize;
    // Extension members describing the next member.
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link = false;
    let mut pax: Option<Vec<u8>> = None;
    loop {
        // The end of the file at a block boundary ends the archive (no end-of-archive blocks), as in the tar crate.
        if pos >= storage.len() {
            break;
        }
        if pos.saturating_add(TAR_BLOCK) > storage.len() {
            return Err(Error::invalid(
                FMT,
                format!("tar header at offset {pos}: cut short by the end of the file"),
            ));
        }
        let mut header = tar::Header::new_old();
        storage.read_exact_at(header.as_mut_bytes(), pos)?;
        let block = header.as_bytes();
        if block.iter().all(|b| *b == 0) {
            break;
        }
        headers += 1;
        if headers > MAX_TAR_HEADERS {
            return Err(Error::limit(
                FMT,
                format!("more than {MAX_TAR_HEADERS} tar headers"),
            ));
        }
        // Checksum (ustar "chksum"): the unsigned byte sum with the checksum field itself read as 8 spaces.
        let sum: u32 = block
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(*b)
                }
            })
            .sum();
        if header.cksum().map_err(|e| tar_err(pos, e))? != sum {
            return Err(Error::invalid(
                FMT,
                format!("tar header at offset {pos}: checksum mismatch"),
            ));
        }
        let kind = header.entry_type();
        let extension = if kind.is_gnu_longname() {
            Some("GNU long name ('L')")
        } else if kind.is_gnu_longlink() {
            Some("GNU long link ('K')")
        } else if kind.is_pax_local_extensions() {
            Some("PAX extended header ('x')")
        } else if kind.is_pax_global_extensions() {
            Some("PAX global header ('g')")
        } else {
            None
        };
        let data = pos + TAR_BLOCK;
        let mut size = header.entry_size().map_err(|e| tar_err(pos, e))?;
        match extension {
            Some(what) => {
                if size > MAX_EXTENSION_BYTES {
                    return Err(Error::limit(
                        FMT,
                        format!(
                            "the {what} member at offset {pos} is {size} bytes (at most {MAX_EXTENSION_BYTES})"
                        ),
                    ));
                }
                let twice = || {
                    Error::invalid(
                        FMT,
                        format!("tar header at offset {pos}: a second {what} for the same member"),
                    )
                };
                if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
                    let slot = if kind.is_gnu_longname() {
                        &mut long_name
                    } else {
                        &mut pax
                    };
                    if slot.is_some() {
                        return Err(twice());
                    }
                    if data.saturating_add(size) > storage.len() {
                        return Err(Error::invalid(
                            FMT,
                            format!(
                                "tar header at offset {pos}: the {what} runs past the end of the file"
                            ),
                        ));
                    }
                    // At most MAX_EXTENSION_BYTES, checked above.
                    let mut bytes = vec![0u8; size as usize];
                    storage.read_exact_at(&mut bytes, data)?;
                    *slot = Some(bytes);
                } else if kind.is_gnu_longlink() {
                    if long_link {
                        return Err(twice());
                    }
                    long_link = true;
                }
                // A global header applies to the rest of the archive; none of its keys matters here.
            }
            None => {
                let mut pax_path = None;
                if let Some(records) = pax.as_deref() {
                    for record in tar::PaxExtensions::new(records) {
                        let record = record.map_err(|e| tar_err(pos, e))?;
                        match record.key_bytes() {
                            b"path" => pax_path = Some(record.value_bytes()),
                            b"size" => {
                                size = record
                                    .value()
                                    .ok()
                                    .and_then(|v| v.parse::<u64>().ok())
                                    .ok_or_else(|| {
                                        Error::invalid(
                                            FMT,
                                            format!("tar header at offset {pos}: bad PAX size"),
                                        )
                                    })?;
                            }
                            _ => {}
                        }
                    }
                }
                let name_bytes = match (&long_name, pax_path) {
                    (Some(long), _) => long.strip_suffix(&[0]).unwrap_or(long),
                    (None, Some(path)) => path,
                    (None, None) => &header.path_bytes(),
                };
                let name = String::from_utf8_lossy(name_bytes).into_owned();
                long_name = None;
                long_link = false;
                pax = None;
                if kind.is_dir() {
                    // folders hold no data
                } else if !(kind.is_file() || kind.is_contiguous()) {
                    return Err(Error::unsupported(
                        FMT,
                        format!(
                            "member '{name}' is not a regular file (tar type {:?})",
                            kind.as_byte() as char
                        ),
                    ));
                } else {
                    if out.len() >= MAX_MEMBERS {
                        return Err(Error::limit(
                            FMT,
                            format!("more than {MAX_MEMBERS} members"),
                        ));
                    }
                    let name = name.strip_prefix("./").unwrap_or(&name).to_string();
                    out.push(Member {
                        name,
                        offset: data,
                        size,
                    });
                }
            }
        }
        let padded = size
            .checked_next_multiple_of(TAR_BLOCK)
            .and_then(|s| data.checked_add(s));
        pos = padded.ok_or_else(|| {
            Error::invalid(
                FMT,
                format!("tar header at offset {pos}: size {size} overflows"),
            )
        })?;
    }
    if long_name.is_some() || long_link || pax.is_some() {
        return Err(Error::invalid(
            FMT,
            "tar: the archive ends with an extension header that describes no member",
        ));
    }
    Ok(out)
}

/// Maps an `ovf:format` URL to a format (DSP0243 9.1: "a URI identifying the disk format").
fn format_from_url(url: &str) -> Option<Format> {
    let u = url.to_ascii_lowercase();
    if u.contains("vmdk") {
        Some(Format::Vmdk)
    } else if u.contains("qcow") {
        Some(Format::Qcow2)
    } else if u.contains("vhdx") {
        Some(Format::Vhdx)
    } else if u.contains("vhd") || u.contains("bb676673") {
        Some(Format::Vpc)
    } else if u.contains("vdi") {
        Some(Format::Vdi)
    } else if u.contains("raw") {
        Some(Format::Raw)
    } else {
        None
    }
}

/// Bytes per unit of `ovf:capacityAllocationUnits` (DSP0004 programmatic units: "byte", "byte * 2^30"; older
/// descriptors use "KiloBytes", "MegaBytes", "GigaBytes").
fn unit_bytes(units: &str) -> Result<u64> {
    let compact: String = units.chars().filter(|c| !c.is_whitespace()).collect();
    let lower = compact.to_ascii_lowercase();
    let bytes = match lower.as_str() {
        "" | "byte" | "bytes" => Some(1),
        "kilobytes" => Some(1 << 10),
        "megabytes" => Some(1 << 20),
        "gigabytes" => Some(1 << 30),
        _ => lower
            .strip_prefix("byte*2^")
            .and_then(|e| e.parse::<u32>().ok())
            .and_then(|e| 1u64.checked_shl(e).filter(|_| e < 64)),
    };
    bytes.ok_or_else(|| Error::unsupported(FMT, format!("capacity unit '{units}'")))
}

/// An attribute in an OVF namespace (or unqualified, as some exporters write).
fn ovf_attr<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == name && a.namespace().is_none_or(|ns| OVF_NAMESPACES.contains(&ns)))
        .map(|a| a.value())
}

/// Text of the child element with local name `name`.
fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
        .and_then(|c| c.text())
        .map(str::trim)
}

fn elements<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

/// True when `href` can only be a member name (DSP0243 7.1: hrefs may be URLs; in an OVA only relative names
/// of members are meaningful).
fn href_is_member_name(href: &str) -> bool {
    !href.is_empty()
        && !href.starts_with('/')
        && !href.contains(':')
        && !href.split(['/', '\\']).any(|c| c == "..")
}

impl OvaPackage {
    /// Reads the tar headers and the descriptor of the OVA in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self> {
        let members = list_members(storage.as_ref())?;
        let first = members
            .first()
            .ok_or_else(|| Error::invalid(FMT, "the archive is empty"))?;
        if !first.name.to_ascii_lowercase().ends_with(".ovf") {
            return Err(Error::invalid(
                FMT,
                format!(
                    "the first member is '{}', not the .ovf descriptor (DSP0243 5.3)",
                    first.name
                ),
            ));
        }
        if first.size > MAX_DESCRIPTOR_BYTES {
            return Err(Error::limit(
                FMT,
                format!(
                    "descriptor is {} bytes (at most {MAX_DESCRIPTOR_BYTES})",
                    first.size
                ),
            ));
        }
        let mut raw = vec![0u8; first.size as usize];
        storage.read_exact_at(&mut raw, first.offset)?;
        let text = std::str::from_utf8(&raw)
            .map_err(|_| Error::unsupported(FMT, "descriptor is not UTF-8"))?;
        let disks = parse_descriptor(text, &members)?;
        Ok(OvaPackage {
            storage,
            descriptor_name: first.name.clone(),
            disks,
        })
    }

    /// The descriptor's member name.
    pub fn descriptor_name(&self) -> &str {
        &self.descriptor_name
    }

    /// The disks, boot disk first.
    pub fn disks(&self) -> Vec<OvaDisk> {
        self.disks.iter().map(|d| d.0.clone()).collect()
    }

    /// Opens disk `index` from its member, in the format `ovf:format` implies (probed when absent).
    ///
    /// Members are opened with a deny-all gate whatever `gate` allows: an OVA is self-contained, and a file
    /// named inside a member must never resolve to a host file next to the archive.
    pub fn open_disk(&self, index: usize, gate: &OpenGate) -> Result<Box<dyn DiskSource>> {
        let _ = gate;
        let (disk, member) = self.disks.get(index).ok_or_else(|| {
            Error::input(format!(
                "the OVA has {} disks, no disk {index}",
                self.disks.len()
            ))
        })?;
        let window: Arc<dyn Storage> = Arc::new(SliceStorage::new(
            self.storage.clone(),
            member.offset,
            member.size,
            format!("{}:{}", self.storage.name(), member.name),
        )?);
        let format = match disk.format {
            Some(f) => f,
            // A member that probes as an OVA would nest archives as deep as the file allows: refused.
            None => match crate::formats::probe::probe(window.as_ref())? {
                Format::Ova => {
                    return Err(Error::unsupported(
                        FMT,
                        format!("disk '{}' is itself an OVA archive", disk.id),
                    ));
                }
                f => f,
            },
        };
        let src = crate::formats::open(window, Some(format), &OpenGate::deny_all())
            .map_err(|e| e.context(format!("OVA disk '{}' ({})", disk.id, member.name)))?;
        if src.virtual_size().div_ceil(512) != disk.capacity.div_ceil(512) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "disk '{}' declares a capacity of {} bytes but {} holds {} bytes",
                    disk.id,
                    disk.capacity,
                    member.name,
                    src.virtual_size()
                ),
            ));
        }
        Ok(src)
    }

    /// Opens the boot disk (the first disk).
    pub fn open_boot_disk(&self, gate: &OpenGate) -> Result<Box<dyn DiskSource>> {
        self.open_disk(0, gate)
    }
}

/// Parses the descriptor and matches its files to `members`; disks come back boot disk first.
fn parse_descriptor(text: &str, members: &[Member]) -> Result<Vec<(OvaDisk, Member)>> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, opts)
        .map_err(|e| Error::invalid(FMT, format!("descriptor XML: {e}")))?;
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" {
        return Err(Error::invalid(
            FMT,
            "descriptor root is not an OVF Envelope",
        ));
    }
    // References/File: id → (href, size).
    let mut files: Vec<(String, String, Option<u64>)> = Vec::new();
    for refs in elements(env, "References") {
        for f in elements(refs, "File") {
            let id =
                ovf_attr(f, "id").ok_or_else(|| Error::invalid(FMT, "a File has no ovf:id"))?;
            let href = ovf_attr(f, "href")
                .ok_or_else(|| Error::invalid(FMT, format!("File '{id}' has no ovf:href")))?;
            if ovf_attr(f, "compression").is_some_and(|c| !c.is_empty() && c != "identity") {
                return Err(Error::unsupported(
                    FMT,
                    format!("File '{id}' is compressed (ovf:compression); gunzip it first"),
                ));
            }
            if ovf_attr(f, "chunkSize").is_some() {
                return Err(Error::unsupported(
                    FMT,
                    format!("File '{id}' is split in chunks (ovf:chunkSize)"),
                ));
            }
            let size = match ovf_attr(f, "size") {
                Some(s) => Some(
                    s.trim()
                        .parse::<u64>()
                        .map_err(|_| Error::invalid(FMT, format!("File '{id}' size '{s}'")))?,
                ),
                None => None,
            };
            files.push((id.to_string(), href.to_string(), size));
        }
    }
    // DiskSection/Disk.
    let mut disks: Vec<(OvaDisk, Member)> = Vec::new();
    for section in elements(env, "DiskSection") {
        for d in elements(section, "Disk") {
            if disks.len() >= MAX_DISKS {
                return Err(Error::limit(FMT, format!("more than {MAX_DISKS} disks")));
            }
            let id = ovf_attr(d, "diskId")
                .ok_or_else(|| Error::invalid(FMT, "a Disk has no ovf:diskId"))?;
            let file_ref = ovf_attr(d, "fileRef").ok_or_else(|| {
                Error::unsupported(
                    FMT,
                    format!("disk '{id}' has no ovf:fileRef (an empty disk to create)"),
                )
            })?;
            let (_, href, size) = files.iter().find(|f| f.0 == file_ref).ok_or_else(|| {
                Error::invalid(
                    FMT,
                    format!("disk '{id}' refers to file '{file_ref}', not in References"),
                )
            })?;
            if !href_is_member_name(href) {
                return Err(Error::invalid(
                    FMT,
                    format!("disk '{id}' names '{href}', which is not a member of the OVA"),
                ));
            }
            let mut found = members.iter().filter(|m| &m.name == href);
            let member = found.next().ok_or_else(|| {
                Error::invalid(
                    FMT,
                    format!("disk '{id}': member '{href}' is missing from the archive"),
                )
            })?;
            if found.next().is_some() {
                return Err(Error::invalid(
                    FMT,
                    format!("member '{href}' appears twice in the archive"),
                ));
            }
            if let Some(s) = size
                && *s != member.size
            {
                return Err(Error::corrupt(
                    FMT,
                    format!(
                        "member '{href}' is {} bytes, ovf:size says {s}",
                        member.size
                    ),
                ));
            }
            let cap_text = ovf_attr(d, "capacity")
                .ok_or_else(|| Error::invalid(FMT, format!("disk '{id}' has no ovf:capacity")))?;
            let cap: u64 = cap_text.trim().parse().map_err(|_| {
                Error::unsupported(
                    FMT,
                    format!("disk '{id}' capacity '{cap_text}' is not a number"),
                )
            })?;
            let unit = unit_bytes(ovf_attr(d, "capacityAllocationUnits").unwrap_or("byte"))?;
            let capacity = cap
                .checked_mul(unit)
                .ok_or_else(|| Error::invalid(FMT, format!("disk '{id}' capacity overflows")))?;
            disks.push((
                OvaDisk {
                    index: 0,
                    id: id.to_string(),
                    file_name: href.clone(),
                    capacity,
                    format: ovf_attr(d, "format").and_then(format_from_url),
                    size: member.size,
                },
                member.clone(),
            ));
        }
    }
    if disks.is_empty() {
        return Err(Error::invalid(
            FMT,
            "the descriptor has no disk with a file",
        ));
    }
    // Boot order from the first VirtualSystem's hardware: disk drives sorted by (controller order, address).
    let order = disk_order(env);
    let rank = |id: &str| order.iter().position(|o| o == id).unwrap_or(usize::MAX);
    disks.sort_by_key(|d| rank(&d.0.id));
    for (i, d) in disks.iter_mut().enumerate() {
        d.0.index = i;
    }
    Ok(disks)
}

/// Disk ids referenced by disk-drive items of the first VirtualSystem, in controller then address order.
fn disk_order(env: roxmltree::Node<'_, '_>) -> Vec<String> {
    let system = env
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "VirtualSystem");
    let Some(system) = system else {
        return Vec::new();
    };
    let Some(hw) = system
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "VirtualHardwareSection")
    else {
        return Vec::new();
    };
    let items: Vec<_> = hw
        .children()
        .filter(|c| c.is_element() && matches!(c.tag_name().name(), "Item" | "StorageItem"))
        .collect();
    let number = |s: Option<&str>| s.and_then(|t| t.parse::<u64>().ok()).unwrap_or(u64::MAX);
    let mut drives: Vec<(u64, usize, u64, usize, String)> = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        if child_text(*item, "ResourceType") != Some(RESOURCE_TYPE_DISK) {
            continue;
        }
        let Some(host) = child_text(*item, "HostResource") else {
            continue;
        };
        let id = host
            .strip_prefix("ovf:/disk/")
            .or_else(|| host.strip_prefix("/disk/"))
            .unwrap_or(host)
            .to_string();
        // The controller this drive hangs off (rasd:Parent = its InstanceID), ranked by its own address.
        let parent = child_text(*item, "Parent");
        let (ctrl_addr, ctrl_pos) = items
            .iter()
            .enumerate()
            .find(|(_, c)| parent.is_some() && child_text(**c, "InstanceID") == parent)
            .map_or((u64::MAX, usize::MAX), |(p, c)| {
                (number(child_text(*c, "Address")), p)
            });
        drives.push((
            ctrl_addr,
            ctrl_pos,
            number(child_text(*item, "AddressOnParent")),
            pos,
            id,
        ));
    }
    drives.sort();
    drives.into_iter().map(|d| d.4).collect()
}

impl std::fmt::Debug for OvaPackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvaPackage")
            .field("storage", &self.storage.name())
            .field("descriptor", &self.descriptor_name)
            .field("disks", &self.disks())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_urls() {
        assert_eq!(unit_bytes("byte * 2^30").unwrap(), 1 << 30);
        assert_eq!(unit_bytes("byte").unwrap(), 1);
        assert_eq!(unit_bytes("GigaBytes").unwrap(), 1 << 30);
        assert!(unit_bytes("byte * 2^99").is_err());
        assert!(unit_bytes("furlongs").is_err());
        assert_eq!(
            format_from_url(
                "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
            ),
            Some(Format::Vmdk)
        );
        assert_eq!(
            format_from_url("http://www.gnome.org/~markmc/qcow-image-format.html"),
            Some(Format::Qcow2)
        );
        assert_eq!(format_from_url("http://example.com/whatever"), None);
    }

    #[test]
    fn rejects_hrefs_outside_the_archive() {
        for bad in [
            "../x.vmdk",
            "/etc/passwd",
            "a/../../b",
            "http://h/x.vmdk",
            "file:x",
            "",
        ] {
            assert!(!href_is_member_name(bad), "{bad}");
        }
        assert!(href_is_member_name("disk1.vmdk"));
        assert!(href_is_member_name("sub/disk1.vmdk"));
    }
}
