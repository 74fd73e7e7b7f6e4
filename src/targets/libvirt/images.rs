//! After the domain exists, on libvirt: list the domains imgshift defined (marked by a `<metadata>` element in
//! [`super::xml::METADATA_NS`]), and delete one — undefine the domain (and its NVRAM), then delete each storage
//! volume it uses unless another domain uses it too.

use anyhow::{Result, bail};
use quick_xml::events::Event;
use quick_xml::{Reader, XmlVersion};
use serde::Serialize;

use super::conn as lv;
use super::inuse::{self, VolumeRef};
use super::{Error as LvError, is_not_found};

/// `VIR_CONNECT_LIST_DOMAINS` with no filter: every domain, running or not.
const LIST_ALL: u32 = 0;

/// A volume of the domain.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolVolume {
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub volume: String,
}

/// A volume kept, and the other domains using it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptVolume {
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub volume: String,
    /// The other domains with a disk on it.
    pub used_by: Vec<String>,
}

/// What `images delete --on libvirt` removes.
#[derive(Debug, Clone, Serialize)]
pub struct LibvirtDeletePlan {
    /// The domain to undefine.
    pub domain: String,
    /// Volumes deleted after it.
    pub delete_volumes: Vec<PoolVolume>,
    /// Volumes kept because another domain uses them.
    pub kept_volumes: Vec<KeptVolume>,
    /// Disks that are not pool volumes (plain files, devices): never deleted.
    pub other_disks: Vec<String>,
}

/// The `<disk device="disk">` sources of domain XML: pool volumes, and the paths of other disks.
fn disks(xml: &str) -> Result<(Vec<PoolVolume>, Vec<String>)> {
    let mut r = Reader::from_str(xml);
    let mut in_disk = false;
    let mut vols = Vec::new();
    let mut others = Vec::new();
    let attr = |e: &quick_xml::events::BytesStart<'_>, name: &[u8]| -> Option<String> {
        e.attributes()
            .flatten()
            .find(|a| a.key.as_ref() == name)
            .and_then(|a| a.normalized_value(XmlVersion::Implicit1_0).ok())
            .map(|v| v.into_owned())
    };
    loop {
        match r.read_event().map_err(|e| LvError::Xml(e.to_string()))? {
            Event::Start(e) if e.name().as_ref() == b"disk" => {
                in_disk = attr(&e, b"device").is_none_or(|d| d == "disk");
            }
            Event::End(e) if e.name().as_ref() == b"disk" => in_disk = false,
            Event::Start(e) | Event::Empty(e) if in_disk && e.name().as_ref() == b"source" => {
                match (attr(&e, b"pool"), attr(&e, b"volume")) {
                    (Some(pool), Some(volume)) => vols.push(PoolVolume { pool, volume }),
                    _ => others.extend(attr(&e, b"file").or_else(|| attr(&e, b"dev"))),
                }
            }
            Event::Eof => return Ok((vols, others)),
            _ => {}
        }
    }
}

/// One domain as `images list --on libvirt` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DomainInfo {
    /// Domain name.
    pub domain: String,
    /// Running.
    pub active: bool,
    /// UEFI (`<os firmware='efi'>` or a loader), else BIOS.
    pub firmware: String,
    /// Its pool volumes, boot disk first.
    pub volumes: Vec<PoolVolume>,
    /// Its disks that are not pool volumes.
    pub other_disks: Vec<String>,
    /// Defined by imgshift (its metadata mark).
    pub made_by_imgshift: bool,
}

/// Whether domain XML carries imgshift's metadata mark, and whether it boots UEFI.
fn mark_and_firmware(xml: &str) -> Result<(bool, bool)> {
    let mut r = Reader::from_str(xml);
    let mut depth_meta = false;
    let mut marked = false;
    let mut uefi = false;
    loop {
        match r.read_event().map_err(|e| LvError::Xml(e.to_string()))? {
            Event::Start(e) if e.name().as_ref() == b"metadata" => depth_meta = true,
            Event::End(e) if e.name().as_ref() == b"metadata" => depth_meta = false,
            Event::Start(e) | Event::Empty(e) => {
                if depth_meta
                    && e.attributes().flatten().any(|a| {
                        a.key.as_ref().starts_with(b"xmlns")
                            && a.value.as_ref() == super::xml::METADATA_NS.as_bytes()
                    })
                {
                    marked = true;
                }
                if e.name().as_ref() == b"os"
                    && e.attributes()
                        .flatten()
                        .any(|a| a.key.as_ref() == b"firmware" && a.value.as_ref() == b"efi")
                {
                    uefi = true;
                }
                if e.name().as_ref() == b"loader" {
                    uefi = true;
                }
            }
            Event::Eof => return Ok((marked, uefi)),
            _ => {}
        }
    }
}

/// The domains at `uri` imgshift defined (with `all`, every domain), by name.
pub fn list(uri: &str, all: bool) -> Result<Vec<DomainInfo>> {
    let conn = lv::connect(uri)?;
    let mut out = Vec::new();
    for d in conn
        .list_all_domains(LIST_ALL)
        .map_err(|e| LvError::call("cannot list domains", &e))?
    {
        let name = d.name().to_string();
        let xml = match d.xml_desc(0) {
            Ok(x) => x,
            // Undefined while being listed.
            Err(e) if is_not_found(&e) => continue,
            Err(e) => {
                return Err(LvError::call(format!("cannot read domain '{name}'"), &e).into());
            }
        };
        let (marked, uefi) = mark_and_firmware(&xml)?;
        if !marked && !all {
            continue;
        }
        let (volumes, other_disks) = disks(&xml)?;
        let active = match d.is_active() {
            Ok(a) => a,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(LvError::call(format!("cannot query domain '{name}'"), &e).into()),
        };
        out.push(DomainInfo {
            domain: name,
            active,
            firmware: if uefi { "uefi" } else { "bios" }.into(),
            volumes,
            other_disks,
            made_by_imgshift: marked,
        });
    }
    out.sort_by(|a, b| a.domain.cmp(&b.domain));
    Ok(out)
}

/// The path of a pool volume ("" when it cannot be found: then only `pool`/`volume` references match).
fn volume_path(conn: &super::rpc::Connect, v: &PoolVolume) -> String {
    conn.lookup_storage_pool_by_name(&v.pool)
        .ok()
        .and_then(|p| p.lookup_storage_vol_by_name(&v.volume).ok())
        .and_then(|vol| vol.path().ok())
        .unwrap_or_default()
}

/// What deleting domain `name` at `uri` removes.
pub fn delete_plan(uri: &str, name: &str) -> Result<LibvirtDeletePlan> {
    let conn = lv::connect(uri)?;
    let Some(dom) = lv::find_domain(&conn, name)? else {
        bail!("no domain '{name}' at {uri}");
    };
    let xml = dom
        .xml_desc(0)
        .map_err(|e| LvError::call(format!("cannot read domain '{name}'"), &e))?;
    let (vols, other_disks) = disks(&xml)?;
    let mut others = Vec::new();
    for d in conn
        .list_all_domains(LIST_ALL)
        .map_err(|e| LvError::call("cannot list domains", &e))?
    {
        let n = d.name().to_string();
        if n == name {
            continue;
        }
        let x = d
            .xml_desc(0)
            .map_err(|e| LvError::call(format!("cannot read domain '{n}'"), &e))?;
        others.push((n, x));
    }
    let mut delete_volumes = Vec::new();
    let mut kept_volumes = Vec::new();
    for v in vols {
        let path = volume_path(&conn, &v);
        let r = VolumeRef {
            pool: &v.pool,
            volume: &v.volume,
            path: if path.is_empty() { "\0" } else { &path },
        };
        let mut used_by = Vec::new();
        for (n, x) in &others {
            if inuse::uses(x, &r)? {
                used_by.push(n.clone());
            }
        }
        if used_by.is_empty() {
            if !delete_volumes.contains(&v) {
                delete_volumes.push(v);
            }
        } else {
            kept_volumes.push(KeptVolume {
                pool: v.pool,
                volume: v.volume,
                used_by,
            });
        }
    }
    Ok(LibvirtDeletePlan {
        domain: name.to_string(),
        delete_volumes,
        kept_volumes,
        other_disks,
    })
}

/// Undefines the domain (refused while it runs), then deletes the planned volumes; returns what was done.
pub fn delete(uri: &str, plan: &LibvirtDeletePlan) -> Result<Vec<String>> {
    let conn = lv::connect(uri)?;
    let mut done = Vec::new();
    match lv::find_domain(&conn, &plan.domain)? {
        Some(dom) => {
            let active = dom
                .is_active()
                .map_err(|e| LvError::call(format!("cannot query domain '{}'", plan.domain), &e))?;
            if active {
                bail!(
                    "domain '{}' is running: shut it down first (`virsh shutdown {}`), then delete it",
                    plan.domain,
                    plan.domain
                );
            }
            lv::undefine(&dom, &plan.domain)?;
            done.push(format!("undefined domain '{}'", plan.domain));
        }
        None => done.push(format!("domain '{}' was already gone", plan.domain)),
    }
    for v in &plan.delete_volumes {
        let pool = match conn.lookup_storage_pool_by_name(&v.pool) {
            Ok(p) => p,
            Err(e) if is_not_found(&e) => {
                done.push(format!(
                    "pool '{}' is gone, and volume '{}' with it",
                    v.pool, v.volume
                ));
                continue;
            }
            Err(e) => {
                return Err(
                    LvError::call(format!("cannot look up storage pool '{}'", v.pool), &e).into(),
                );
            }
        };
        match lv::find_volume(&pool, &v.pool, &v.volume)? {
            Some(vol) => {
                vol.delete(0).map_err(|e| {
                    LvError::call(
                        format!("cannot delete volume '{}' in pool '{}'", v.volume, v.pool),
                        &e,
                    )
                })?;
                done.push(format!(
                    "deleted volume '{}' from pool '{}'",
                    v.volume, v.pool
                ));
            }
            None => done.push(format!("volume '{}' was already gone", v.volume)),
        }
    }
    for k in &plan.kept_volumes {
        done.push(format!(
            "kept volume '{}' of pool '{}': still used by {}",
            k.volume,
            k.pool,
            k.used_by.join(", ")
        ));
    }
    for o in &plan.other_disks {
        done.push(format!("left disk {o} alone: not a storage volume"));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn disks_of_a_domain() {
        let xml = r#"<domain><devices>
            <disk type="volume" device="disk"><source pool="p" volume="vm.qcow2"/></disk>
            <disk type="file" device="disk"><source file="/srv/x.raw"/></disk>
            <disk type="volume" device="cdrom"><source pool="p" volume="iso"/></disk>
            <interface type="network"><source network="default"/></interface>
        </devices></domain>"#;
        let (v, o) = disks(xml).unwrap();
        assert_eq!(
            v,
            vec![PoolVolume {
                pool: "p".into(),
                volume: "vm.qcow2".into()
            }]
        );
        assert_eq!(o, vec!["/srv/x.raw".to_string()]);
    }

    #[test]
    fn the_metadata_mark_is_found_by_its_namespace() {
        let mine = format!(
            "<domain><metadata><x:domain xmlns:x=\"{}\" made-by=\"imgshift\"/></metadata>\
             <os firmware=\"efi\"><type>hvm</type></os></domain>",
            crate::targets::libvirt::xml::METADATA_NS
        );
        assert_eq!(mark_and_firmware(&mine).unwrap(), (true, true));
        let other = "<domain><metadata><y:app xmlns:y=\"http://example.org/\"/></metadata><os><type>hvm</type>\
                     </os></domain>";
        assert_eq!(mark_and_firmware(other).unwrap(), (false, false));
    }
}
