//! Which running domains use a volume: `--overwrite` must not delete a disk from under a running guest (libvirt
//! itself would unlink a file volume that QEMU still has open).

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use super::rpc::Connect;
use super::{Error, Result};

/// `VIR_CONNECT_LIST_DOMAINS_ACTIVE`.
const LIST_ACTIVE: u32 = 1;

/// The volume being looked for: its pool and name (`<source pool= volume=>`) and its path (`file=`, `dev=`).
pub struct VolumeRef<'a> {
    /// Pool name.
    pub pool: &'a str,
    /// Volume name.
    pub volume: &'a str,
    /// Path on the daemon's host.
    pub path: &'a str,
}

/// Names of the running domains with a disk on `vol`.
pub fn running_users(conn: &Connect, vol: &VolumeRef<'_>) -> Result<Vec<String>> {
    let doms = conn
        .list_all_domains(LIST_ACTIVE)
        .map_err(|e| Error::call("cannot list running domains", &e))?;
    let mut users = Vec::new();
    for d in doms {
        let name = d.name().to_string();
        let xml = d
            .xml_desc(0)
            .map_err(|e| Error::call(format!("cannot read domain '{name}'"), &e))?;
        if uses(&xml, vol)? {
            users.push(name);
        }
    }
    Ok(users)
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.normalized_value(XmlVersion::Implicit1_0).ok())
        .map(|v| v.into_owned())
}

/// True when a `<disk>` of domain XML `xml` has `vol` as its source.
pub fn uses(xml: &str, vol: &VolumeRef<'_>) -> Result<bool> {
    let mut r = Reader::from_str(xml);
    let mut in_disk = false;
    loop {
        match r.read_event().map_err(|e| Error::Xml(e.to_string()))? {
            Event::Start(e) if e.name().as_ref() == b"disk" => in_disk = true,
            Event::End(e) if e.name().as_ref() == b"disk" => in_disk = false,
            Event::Start(e) | Event::Empty(e) if in_disk && e.name().as_ref() == b"source" => {
                let by_name = attr(&e, b"pool").as_deref() == Some(vol.pool)
                    && attr(&e, b"volume").as_deref() == Some(vol.volume);
                let by_path = [b"file".as_slice(), b"dev"]
                    .iter()
                    .any(|k| attr(&e, k).as_deref() == Some(vol.path));
                if by_name || by_path {
                    return Ok(true);
                }
            }
            Event::Eof => return Ok(false),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const V: VolumeRef<'static> = VolumeRef {
        pool: "p",
        volume: "v.qcow2",
        path: "/pool/v.qcow2",
    };

    #[test]
    fn finds_disks_by_pool_and_volume_or_path() {
        let by_vol = "<domain><devices><disk type='volume'><source pool='p' volume='v.qcow2'/></disk>\
                      </devices></domain>";
        let by_file = "<domain><devices><disk type='file'><source file='/pool/v.qcow2'>\
                       <seclabel/></source></disk></devices></domain>";
        let other = "<domain><devices><disk type='volume'><source pool='q' volume='v.qcow2'/></disk>\
                     <interface><source file='/pool/v.qcow2'/></interface></devices></domain>";
        assert!(uses(by_vol, &V).unwrap());
        assert!(uses(by_file, &V).unwrap());
        assert!(!uses(other, &V).unwrap(), "other pool; a non-disk source");
    }
}
