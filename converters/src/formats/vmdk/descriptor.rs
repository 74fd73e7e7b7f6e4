//! The VMDK text descriptor (VMware Virtual Disk Format 5.0, "The Descriptor File"): a header section
//! (`version`, `CID`, `parentCID`, `createType`, `parentFileNameHint`), extent lines
//! (`RW <sectors> SPARSE "file.vmdk"`) and the disk database (`ddb.key = "value"`).
//!
//! Parsing is line based and bounded: the text is at most [`MAX_DESCRIPTOR_BYTES`] and lists at most
//! [`MAX_EXTENTS`] extents. Nothing here opens files; names are returned as written.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

const FMT: &str = "vmdk";

/// Largest descriptor read, embedded or separate. qemu reads at most 1 MiB - 1 bytes (`vmdk_read_desc`).
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Most extent lines followed: 8 TiB (VMware's largest hosted disk) in 2 GiB `twoGbMaxExtent*` pieces.
pub const MAX_EXTENTS: usize = 4096;

/// `parentCID` value meaning "no parent" (VMDK 5.0, "Header": `parentCID=ffffffff`).
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Access of an extent line (VMDK 5.0, "Extent Descriptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`
    ReadWrite,
    /// `RDONLY`
    ReadOnly,
    /// `NOACCESS`
    NoAccess,
}

/// Type of an extent line (VMDK 5.0, "Extent Descriptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `SPARSE`: a hosted sparse extent file ("KDMV" header).
    Sparse,
    /// `FLAT`: a plain file, from a sector offset.
    Flat,
    /// `ZERO`: reads as zeros, no file.
    Zero,
    /// `VMFS`: an ESX flat file (like `FLAT` at offset 0).
    Vmfs,
    /// `VMFSSPARSE`: an ESX "COWD" sparse file.
    VmfsSparse,
    /// `VMFSRDM` / `VMFSRAW`: a raw device mapping.
    VmfsRaw,
    /// `SESPARSE`: an ESXi space-efficient sparse file.
    SeSparse,
}

impl ExtentType {
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s {
            "SPARSE" => ExtentType::Sparse,
            "FLAT" => ExtentType::Flat,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "VMFSRDM" | "VMFSRAW" => ExtentType::VmfsRaw,
            "SESPARSE" => ExtentType::SeSparse,
            _ => return None,
        })
    }

    /// The keyword as written in descriptors.
    pub fn keyword(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::VmfsRaw => "VMFSRDM",
            ExtentType::SeSparse => "SESPARSE",
        }
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (untrusted), absent for `ZERO`.
    pub file: Option<String>,
    /// Start inside the file in sectors (`FLAT` only; 0 otherwise).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    /// `CID`: content id of this link.
    pub cid: Option<u32>,
    /// `parentCID`: the parent's CID when this link was created (`ffffffff` = none).
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: Option<String>,
    /// `parentFileNameHint` (untrusted).
    pub parent_hint: Option<String>,
    /// Extent lines, in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` entries (key without the `ddb.` prefix).
    pub ddb: BTreeMap<String, String>,
}

impl Descriptor {
    /// The parent CID when this image is a delta (parentCID present and not `ffffffff`).
    pub fn parent(&self) -> Option<u32> {
        self.parent_cid.filter(|&c| c != NO_PARENT_CID)
    }
}

/// Parses descriptor text. Embedded descriptors are NUL-padded: the text ends at the first NUL.
pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
    if bytes.len() as u64 > MAX_DESCRIPTOR_BYTES {
        return Err(Error::limit(
            FMT,
            format!("descriptor of {} bytes is larger than 1 MiB", bytes.len()),
        ));
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(bytes.get(..end).unwrap_or_default())
        .map_err(|e| Error::invalid(FMT, format!("descriptor is not UTF-8 text ({e})")))?;
    let mut d = Descriptor::default();
    for (no, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            if d.extents.len() >= MAX_EXTENTS {
                return Err(Error::limit(
                    FMT,
                    format!("descriptor lists more than {MAX_EXTENTS} extents"),
                ));
            }
            d.extents.push(
                parse_extent_line(line)
                    .map_err(|e| e.context(format!("descriptor line {}", no + 1)))?,
            );
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            // qemu ignores lines it does not understand; so do we.
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        match key {
            "CID" => d.cid = Some(parse_cid(key, value)?),
            "parentCID" => d.parent_cid = Some(parse_cid(key, value)?),
            "createType" => d.create_type = Some(value.to_string()),
            "parentFileNameHint" => d.parent_hint = Some(value.to_string()),
            _ => {
                if let Some(k) = key.strip_prefix("ddb.") {
                    d.ddb.insert(k.to_string(), value.to_string());
                }
            }
        }
    }
    Ok(d)
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_cid(key: &str, value: &str) -> Result<u32> {
    u32::from_str_radix(value, 16)
        .map_err(|_| Error::invalid(FMT, format!("{key} '{value}' is not a 32-bit hex number")))
}

/// `ACCESS SECTORS TYPE ["file" [OFFSET]]` (VMDK 5.0, "Extent Descriptions").
fn parse_extent_line(line: &str) -> Result<ExtentLine> {
    let bad = |why: &str| Error::invalid(FMT, format!("extent line '{line}': {why}"));
    let (access, rest) = split_token(line);
    let access = match access {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        _ => Access::NoAccess,
    };
    let (sectors, rest) = split_token(rest);
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| bad("the size is not a sector count"))?;
    let (kind, rest) = split_token(rest);
    let kind = ExtentType::parse(kind).ok_or_else(|| bad("unknown extent type"))?;
    let rest = rest.trim_start();
    let (file, rest) = if let Some(r) = rest.strip_prefix('"') {
        let (name, after) = r
            .split_once('"')
            .ok_or_else(|| bad("unterminated file name"))?;
        (Some(name.to_string()), after)
    } else if rest.is_empty() {
        (None, rest)
    } else {
        return Err(bad("the file name must be quoted"));
    };
    let rest = rest.trim();
    let offset = if rest.is_empty() {
        0
    } else {
        rest.parse::<u64>()
            .map_err(|_| bad("the offset is not a sector count"))?
    };
    if kind == ExtentType::Flat && file.is_none() {
        return Err(bad("a FLAT extent needs a file name"));
    }
    if kind != ExtentType::Flat && offset != 0 {
        return Err(bad("only FLAT extents take an offset"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    }
}

/// CHS geometry as qemu writes it for a new image (`vmdk_co_do_create`): 63 sectors per track, 16 heads for
/// IDE and 255 otherwise, cylinders = size / (63 × heads × 512).
pub fn geometry(size: u64, adapter: &str) -> (u64, u32, u32) {
    let heads: u32 = if adapter == "ide" { 16 } else { 255 };
    let cyl = size / (63 * u64::from(heads) * 512);
    (cyl, heads, 63)
}

/// What a writer puts in a new descriptor.
#[derive(Debug, Clone)]
pub struct NewDescriptor<'a> {
    /// Content id.
    pub cid: u32,
    /// `createType`.
    pub create_type: &'a str,
    /// Extent lines: (sectors, type, file, offset for FLAT).
    pub extents: Vec<(u64, ExtentType, String, Option<u64>)>,
    /// `ddb.*` entries in order.
    pub ddb: Vec<(&'static str, String)>,
}

/// Renders a descriptor in VMware's layout (`# Disk DescriptorFile`, header, extents, `#DDB`).
pub fn render(d: &NewDescriptor<'_>) -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = write!(
        s,
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={:08x}\nparentCID=ffffffff\ncreateType=\"{}\"\n\n# Extent description\n",
        d.cid, d.create_type
    );
    for (sectors, kind, file, offset) in &d.extents {
        if file.contains(['"', '\n', '\r']) {
            return Err(Error::input(format!(
                "VMDK extent file name '{file}' cannot be written in a descriptor (quote or newline)"
            )));
        }
        let _ = write!(s, "RW {sectors} {} \"{file}\"", kind.keyword());
        if let Some(o) = offset {
            let _ = write!(s, " {o}");
        }
        s.push('\n');
    }
    s.push_str("\n# The Disk Data Base\n#DDB\n\n");
    for (k, v) in &d.ddb {
        let _ = writeln!(s, "ddb.{k} = \"{v}\"");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=52b5a1f2\nparentCID=ffffffff\n\
createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 4194304 FLAT \"d-f001.vmdk\" 0\n\
RDONLY 100 SPARSE \"my disk-s002.vmdk\"\nRW 8 ZERO\n\n#DDB\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_qemu_descriptor() {
        let d = parse(QEMU.as_bytes()).unwrap();
        assert_eq!(d.cid, Some(0x52b5_a1f2));
        assert_eq!(d.parent(), None);
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].kind, ExtentType::Flat);
        assert_eq!(d.extents[1].file.as_deref(), Some("my disk-s002.vmdk"));
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.ddb.get("adapterType").map(String::as_str), Some("ide"));
    }

    #[test]
    fn rejects_bad_lines() {
        for bad in [
            "RW x SPARSE \"a\"",
            "RW 1 BOGUS \"a\"",
            "RW 1 SPARSE a",
            "RW 1 SPARSE \"a",
            "RW 1 FLAT",
            "RW 1 SPARSE \"a\" 7",
            "CID=zz",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_too_many_extents() {
        let mut t = String::new();
        for _ in 0..=MAX_EXTENTS {
            t.push_str("RW 1 ZERO\n");
        }
        let e = parse(t.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Limit);
    }

    #[test]
    fn render_roundtrip() {
        let text = render(&NewDescriptor {
            cid: 0x1234,
            create_type: "monolithicFlat",
            extents: vec![(2048, ExtentType::Flat, "x-flat.vmdk".into(), Some(0))],
            ddb: vec![("adapterType", "ide".into())],
        })
        .unwrap();
        let d = parse(text.as_bytes()).unwrap();
        assert_eq!(d.cid, Some(0x1234));
        assert_eq!(d.extents[0].sectors, 2048);
        assert_eq!(d.extents[0].file.as_deref(), Some("x-flat.vmdk"));
    }
}
