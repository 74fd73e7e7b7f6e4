//! Storage volumes as sources (`libvirt:POOL/VOLUME`): the volume's format from its XML (`<target><format>`), its
//! bytes read over download streams (holes come as holes) under imgshift's own reader of that format. Nothing is
//! copied locally.
//!
//! A domain (`libvirt:domain/NAME`) is every `<disk device='disk'>` of its XML (domain XML format:
//! <https://libvirt.org/formatdomain.html#hard-drives-floppy-disks-cdroms>), boot disk first: the disks with a
//! `<boot order='N'/>` by N, then the others in the XML's order (without per-device boot orders the first disk is
//! the one `<os><boot dev='hd'/>` boots). Each disk is read as the storage volume it is: `type='volume'` by its
//! `<source pool= volume=>`, `type='file'`/`'block'` by the volume at its path (`virStorageVolLookupByPath`), as
//! only pool volumes can be read over libvirt's protocol. A running domain is refused unless the caller allows
//! it: its disks change while they are read.

use quick_xml::Reader;
use quick_xml::events::Event;

use imgshift_converters::DiskSource;

use super::rpc::{Connect, StorageVol};
use super::{Error, VolFormat, conn as lv, download, is_not_found};

/// Most disks read from one domain (a domain's XML is the daemon's word; a real guest has a handful).
pub const MAX_DOMAIN_DISKS: usize = 64;

/// The format a volume's XML names in `<target><format type='…'/>` (`None` without one).
pub fn volume_format(xml: &str) -> super::Result<Option<String>> {
    let mut r = Reader::from_str(xml);
    let mut depth_target = false;
    loop {
        match r.read_event().map_err(|e| Error::Xml(e.to_string()))? {
            Event::Start(e) if e.name().as_ref() == b"target" => depth_target = true,
            Event::End(e) if e.name().as_ref() == b"target" => depth_target = false,
            Event::Start(e) | Event::Empty(e) if depth_target && e.name().as_ref() == b"format" => {
                return Ok(e
                    .attributes()
                    .flatten()
                    .find(|a| a.key.as_ref() == b"type")
                    .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok())
                    .map(|v| v.into_owned()));
            }
            Event::Eof => return Ok(None),
            _ => {}
        }
    }
}

/// Opens volume `volume` of running pool `pool` on the daemon at `uri` as a disk source.
pub fn open_volume(uri: &str, pool: &str, volume: &str) -> anyhow::Result<Box<dyn DiskSource>> {
    let conn = lv::connect(uri)?;
    let p = lv::running_pool(&conn, pool, uri)?;
    let Some(vol) = lv::find_volume(&p, pool, volume)? else {
        anyhow::bail!("no volume '{volume}' in pool '{pool}'");
    };
    open_vol(&vol, volume)
}

/// `vol` as a disk source, in the format its XML names (raw without one).
fn open_vol(vol: &StorageVol, label: &str) -> anyhow::Result<Box<dyn DiskSource>> {
    let xml = vol
        .xml_desc()
        .map_err(|e| Error::call(format!("cannot read volume '{label}'"), &e))?;
    let format = match volume_format(&xml)?.as_deref() {
        Some("qcow2") => VolFormat::Qcow2,
        Some("raw") | None => VolFormat::Raw,
        Some(other) => anyhow::bail!(
            "volume '{label}' is in {other} format; imgshift reads libvirt volumes in raw or qcow2"
        ),
    };
    download::open(vol, label, format)
}

/// Where a domain's disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAt {
    /// `<disk type='volume'><source pool= volume=>`.
    Volume {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// `<source file=>` or `<source dev=>`: a path on the daemon's host.
    Path(String),
    /// Anything else (a network disk, a disk without a source): not readable here.
    Other(String),
}

/// One `<disk device='disk'>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `<target dev=>` (vda, sdb), or the disk's position when absent.
    pub target: String,
    /// Where it is.
    pub at: DiskAt,
    /// `<boot order=>`.
    pub boot_order: Option<u32>,
}

fn attr(e: &quick_xml::events::BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok())
        .map(|v| v.into_owned())
}

/// The disks (`device='disk'`, or no device) of domain XML `xml`, boot disk first (see the module's doc).
pub fn domain_disks(xml: &str) -> super::Result<Vec<DomainDisk>> {
    let mut r = Reader::from_str(xml);
    let mut disks: Vec<DomainDisk> = Vec::new();
    // The disk being read (None outside a disk, or inside a cdrom/floppy/lun), and the element depth below it.
    let mut cur: Option<(String, DomainDisk)> = None;
    let mut depth = 0usize;
    loop {
        let ev = r.read_event().map_err(|e| Error::Xml(e.to_string()))?;
        let (e, empty) = match &ev {
            Event::Start(e) => (Some(e), false),
            Event::Empty(e) => (Some(e), true),
            _ => (None, false),
        };
        if let Some(e) = e {
            let name = e.name();
            if name.as_ref() == b"disk" && cur.is_none() && depth == 0 {
                let device = attr(e, b"device").unwrap_or_else(|| "disk".into());
                let kind = attr(e, b"type").unwrap_or_else(|| "file".into());
                let disk = DomainDisk {
                    target: String::new(),
                    at: DiskAt::Other(format!("a disk of type '{kind}' without a source")),
                    boot_order: None,
                };
                if !empty {
                    depth = 1;
                    if device == "disk" {
                        cur = Some((kind, disk));
                    }
                } else if device == "disk" {
                    disks.push(disk);
                }
            } else if depth > 0 {
                // Only the disk's own children count (a backing store has a <source> too).
                if depth == 1
                    && let Some((kind, d)) = cur.as_mut()
                {
                    match name.as_ref() {
                        b"source" => {
                            d.at = match kind.as_str() {
                                "volume" => match (attr(e, b"pool"), attr(e, b"volume")) {
                                    (Some(pool), Some(volume)) => DiskAt::Volume { pool, volume },
                                    _ => DiskAt::Other(
                                        "a volume disk without pool and volume".into(),
                                    ),
                                },
                                "file" | "block" => match attr(e, b"file")
                                    .or_else(|| attr(e, b"dev"))
                                {
                                    Some(p) => DiskAt::Path(p),
                                    None => DiskAt::Other(format!("a {kind} disk without a path")),
                                },
                                other => DiskAt::Other(format!("a disk of type '{other}'")),
                            };
                        }
                        b"target" => d.target = attr(e, b"dev").unwrap_or_default(),
                        b"boot" => d.boot_order = attr(e, b"order").and_then(|o| o.parse().ok()),
                        _ => {}
                    }
                }
                if !empty {
                    depth = depth.saturating_add(1);
                }
            }
        }
        match ev {
            Event::End(_) if depth > 0 => {
                depth -= 1;
                if depth == 0
                    && let Some((_, d)) = cur.take()
                {
                    disks.push(d);
                }
            }
            Event::Eof => break,
            _ => {}
        }
        if disks.len() > MAX_DOMAIN_DISKS {
            return Err(Error::Xml(format!(
                "the domain has more than {MAX_DOMAIN_DISKS} disks"
            )));
        }
    }
    for (i, d) in disks.iter_mut().enumerate() {
        if d.target.is_empty() {
            d.target = format!("disk {i}");
        }
    }
    // Stable: disks with a boot order by it, then the others as listed.
    disks.sort_by_key(|d| d.boot_order.map_or((1, 0), |o| (0, o)));
    Ok(disks)
}

/// The disks of a domain, opened for reading.
pub struct DomainSource {
    /// Each disk's name (`DOMAIN/TARGET (POOL/VOLUME)`) and source, boot disk first.
    pub disks: Vec<(String, Box<dyn DiskSource>)>,
    /// Whether the domain was running when it was opened (only when allowed).
    pub running: bool,
}

/// Opens every disk of domain `name` on the daemon at `uri`. A running domain is refused unless
/// `allow_running`.
pub fn open_domain(uri: &str, name: &str, allow_running: bool) -> anyhow::Result<DomainSource> {
    let conn = lv::connect(uri)?;
    let Some(dom) = lv::find_domain(&conn, name)? else {
        return Err(Error::NoDomain {
            name: name.to_string(),
            uri: uri.to_string(),
        }
        .into());
    };
    let running = dom
        .is_active()
        .map_err(|e| Error::call(format!("cannot query domain '{name}'"), &e))?;
    if running && !allow_running {
        return Err(Error::SourceDomainRunning {
            name: name.to_string(),
        }
        .into());
    }
    // The inactive definition: what the domain boots from next (a running domain's live XML names the same
    // disks unless one was hot-plugged).
    let xml = dom
        .xml_desc(VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| Error::call(format!("cannot read domain '{name}'"), &e))?;
    let list = domain_disks(&xml)?;
    if list.is_empty() {
        anyhow::bail!("domain '{name}' has no disk to read");
    }
    let mut disks = Vec::new();
    for d in list {
        let vol = disk_volume(&conn, uri, name, &d)?;
        let label = format!("{name}/{} ({}/{})", d.target, vol.pool_name(), vol.name());
        let src = open_vol(&vol, vol.name())?;
        disks.push((label, src));
    }
    Ok(DomainSource { disks, running })
}

/// `VIR_DOMAIN_XML_INACTIVE`.
const VIR_DOMAIN_XML_INACTIVE: u32 = 2;

/// The storage volume behind disk `d` of domain `dom`.
fn disk_volume(conn: &Connect, uri: &str, dom: &str, d: &DomainDisk) -> anyhow::Result<StorageVol> {
    match &d.at {
        DiskAt::Volume { pool, volume } => {
            let p = lv::running_pool(conn, pool, uri)?;
            lv::find_volume(&p, pool, volume)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "disk {} of domain '{dom}' is volume '{volume}' of pool '{pool}', which does not exist",
                    d.target
                )
            })
        }
        DiskAt::Path(path) => match conn.lookup_storage_vol_by_path(path) {
            Ok(v) => Ok(v),
            Err(e) if is_not_found(&e) => anyhow::bail!(
                "disk {} of domain '{dom}' ({path}) is in no storage pool, and libvirt serves only pool volumes \
                 for reading: define a pool over its folder (`virsh pool-create-as NAME dir --target DIR`)",
                d.target
            ),
            Err(e) => Err(Error::call(
                format!(
                    "cannot look up the volume of disk {} of domain '{dom}' ({path})",
                    d.target
                ),
                &e,
            )
            .into()),
        },
        DiskAt::Other(what) => anyhow::bail!(
            "disk {} of domain '{dom}' is {what}: imgshift reads disks that are storage volumes",
            d.target
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn format_from_the_target_not_a_backing_store() {
        let xml = "<volume type='file'><name>v</name><capacity>1</capacity><backingStore><format type='raw'/>\
                   </backingStore><target><path>/p/v</path><format type='qcow2'/></target></volume>";
        assert_eq!(volume_format(xml).unwrap().as_deref(), Some("qcow2"));
        assert_eq!(
            volume_format("<volume><target><path>/p</path></target></volume>").unwrap(),
            None
        );
    }

    #[test]
    fn domain_disks_boot_disk_first_cdroms_and_backing_stores_ignored() {
        let xml = "<domain><devices>\
            <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sdc'/></disk>\
            <disk type='volume' device='disk'><source pool='p' volume='data.qcow2'/><target dev='vdb'/></disk>\
            <disk type='file'><driver type='qcow2'/><source file='/p/boot.qcow2'/>\
              <backingStore type='file'><source file='/p/base.raw'/></backingStore>\
              <target dev='vda'/><boot order='1'/></disk>\
            <disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdc'/></disk>\
            </devices></domain>";
        let d = domain_disks(xml).unwrap();
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].at, DiskAt::Path("/p/boot.qcow2".into()));
        assert_eq!(
            d[1].at,
            DiskAt::Volume {
                pool: "p".into(),
                volume: "data.qcow2".into()
            }
        );
        assert!(matches!(d[2].at, DiskAt::Other(_)));
        assert!(
            domain_disks("<domain><devices/></domain>")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn domain_disks_are_bounded() {
        let one = "<disk type='file'><source file='/x'/></disk>";
        let xml = format!(
            "<domain><devices>{}</devices></domain>",
            one.repeat(MAX_DOMAIN_DISKS + 1)
        );
        assert!(domain_disks(&xml).is_err());
        let xml = format!(
            "<domain><devices>{}</devices></domain>",
            one.repeat(MAX_DOMAIN_DISKS)
        );
        assert_eq!(domain_disks(&xml).unwrap().len(), MAX_DOMAIN_DISKS);
    }
}
