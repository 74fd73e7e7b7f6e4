//! Connecting to libvirt and looking up the objects an upload works with.

use super::rpc::{Connect, Domain, StoragePool, StorageVol};

use super::{Error, Result, is_not_found, msg};

/// Opens a connection to `uri` (`qemu:///system`, `qemu:///session`, `qemu:///system?socket=PATH`,
/// `qemu+ssh://[USER@]HOST/system`).
pub fn connect(uri: &str) -> Result<Connect> {
    Connect::open(uri).map_err(|e| Error::Connect {
        uri: uri.to_string(),
        message: msg(&e),
    })
}

/// Looks up a pool that must exist and be running.
pub fn running_pool(conn: &Connect, name: &str, uri: &str) -> Result<StoragePool> {
    let pool = conn.lookup_storage_pool_by_name(name).map_err(|e| {
        if is_not_found(&e) {
            Error::NoPool {
                pool: name.to_string(),
                uri: uri.to_string(),
            }
        } else {
            Error::call(format!("cannot look up storage pool '{name}'"), &e)
        }
    })?;
    let active = pool
        .is_active()
        .map_err(|e| Error::call(format!("cannot query storage pool '{name}'"), &e))?;
    if !active {
        return Err(Error::PoolInactive {
            pool: name.to_string(),
            uri: uri.to_string(),
        });
    }
    Ok(pool)
}

/// The volume `name` of `pool`, if there is one.
pub fn find_volume(pool: &StoragePool, pool_name: &str, name: &str) -> Result<Option<StorageVol>> {
    match pool.lookup_storage_vol_by_name(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(Error::call(
            format!("cannot look up volume '{name}' in pool '{pool_name}'"),
            &e,
        )),
    }
}

/// The domain `name`, if there is one.
pub fn find_domain(conn: &Connect, name: &str) -> Result<Option<Domain>> {
    match conn.lookup_domain_by_name(name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(Error::call(format!("cannot look up domain '{name}'"), &e)),
    }
}

/// Checks that an existing domain may be replaced: only with `overwrite`, and never while it runs.
pub fn check_replaceable(dom: &Domain, name: &str, overwrite: bool) -> Result<()> {
    if !overwrite {
        return Err(Error::DomainExists {
            name: name.to_string(),
        });
    }
    let active = dom
        .is_active()
        .map_err(|e| Error::call(format!("cannot query domain '{name}'"), &e))?;
    if active {
        return Err(Error::DomainRunning {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// `VIR_DOMAIN_UNDEFINE_NVRAM`: also remove the domain's UEFI variable store.
const UNDEFINE_NVRAM: u32 = 4;

/// Removes a (stopped) domain definition and its NVRAM file.
pub fn undefine(dom: &Domain, name: &str) -> Result<()> {
    dom.undefine_flags(UNDEFINE_NVRAM)
        .map_err(|e| Error::call(format!("cannot undefine domain '{name}'"), &e))
}

/// Defines a domain from `xml`.
pub fn define(conn: &Connect, xml: &str, name: &str) -> Result<Domain> {
    conn.define_domain_xml(xml)
        .map_err(|e| Error::call(format!("cannot define domain '{name}'"), &e))
}

/// Starts a defined domain.
pub fn start(dom: &Domain, name: &str) -> Result<()> {
    dom.create()
        .map_err(|e| Error::call(format!("cannot start domain '{name}'"), &e))
}
