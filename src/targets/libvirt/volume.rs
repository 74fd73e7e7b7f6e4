//! Creating the volume an upload fills, and deleting it again after a failure.

use super::rpc::{StoragePool, StorageVol};

use super::xml::volume_xml;
use super::{Error, Result, VolFormat, msg};

/// `VIR_STORAGE_VOL_GET_PHYSICAL`: `info_flags` reports the file's length in `allocation`.
const VOL_GET_PHYSICAL: u32 = 1;

/// A volume this run created, with what the uploader needs to know about it.
pub struct Created {
    /// The volume.
    pub vol: StorageVol,
    /// Its path on the daemon's host.
    pub path: String,
    /// The file's length right after creation (for qcow2: the header libvirt wrote), in bytes.
    pub initial_len: u64,
}

/// Creates volume `name` of `capacity` bytes in `format` in `pool` (allocated lazily where the pool can).
pub fn create(
    pool: &StoragePool,
    pool_name: &str,
    name: &str,
    capacity: u64,
    format: VolFormat,
) -> Result<Created> {
    let xml = volume_xml(name, capacity, format)?;
    let vol = pool.create_volume_xml(&xml, 0).map_err(|e| {
        Error::call(
            format!(
                "cannot create volume '{name}' ({capacity} bytes, {}) in pool '{pool_name}'",
                format.name()
            ),
            &e,
        )
    })?;
    match describe(&vol, name) {
        Ok((path, initial_len)) => Ok(Created {
            vol,
            path,
            initial_len,
        }),
        Err(e) => {
            delete(&vol, pool_name, name)?;
            Err(e)
        }
    }
}

fn describe(vol: &StorageVol, name: &str) -> Result<(String, u64)> {
    let path = vol
        .path()
        .map_err(|e| Error::call(format!("cannot read the path of volume '{name}'"), &e))?;
    let info = vol
        .info_flags(VOL_GET_PHYSICAL)
        .map_err(|e| Error::call(format!("cannot read the size of volume '{name}'"), &e))?;
    Ok((path, info.allocation))
}

/// Deletes a volume this run created; when that fails the error names it and says how to remove it.
pub fn delete(vol: &StorageVol, pool_name: &str, name: &str) -> Result<()> {
    vol.delete(0).map_err(|e| Error::LeftOver {
        pool: pool_name.to_string(),
        volume: name.to_string(),
        message: msg(&e),
    })
}

/// Deletes an existing volume that `--overwrite` replaces.
pub fn replace(vol: &StorageVol, pool_name: &str, name: &str) -> Result<()> {
    vol.delete(0).map_err(|e| {
        Error::call(
            format!("cannot delete the existing volume '{name}' in pool '{pool_name}'"),
            &e,
        )
    })
}
