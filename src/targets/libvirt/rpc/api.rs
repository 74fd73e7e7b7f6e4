//! Connections, storage pools, volumes and domains: the calls imgshift makes, each one RPC (streams aside).

use std::sync::Arc;

use super::Result;
use super::client::Client;
use super::proto::{DOMAIN_LIST_MAX, DomainRef, PoolRef, VolInfo, VolRef, procs};
use super::stream::{Download, Upload};
use super::uri::{self, Env};
use super::xdr::{Decoder, Encoder};

/// `VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM` / `VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM`.
pub const SPARSE_STREAM: u32 = 1;

/// An open connection (cheap to clone; closed when the last clone goes).
#[derive(Clone)]
pub struct Connect {
    client: Arc<Client>,
}

fn decode<T>(
    ret: &[u8],
    f: impl FnOnce(&mut Decoder<'_>) -> std::result::Result<T, super::xdr::XdrError>,
) -> Result<T> {
    let mut d = Decoder::new(ret);
    let v = f(&mut d)?;
    d.finish()?;
    Ok(v)
}

impl Connect {
    /// Opens `uri` (see [`uri`] for what is understood).
    pub fn open(uri: &str) -> Result<Connect> {
        let target = uri::parse(uri, &Env::current(), &|p| p.exists())?;
        Ok(Connect {
            client: Client::open(&target)?,
        })
    }

    fn call(&self, proc_: i32, args: Encoder) -> Result<Vec<u8>> {
        self.client.call(proc_, &args.into_bytes())
    }

    /// The host's capabilities XML.
    pub fn capabilities(&self) -> Result<String> {
        let ret = self.call(procs::CONNECT_GET_CAPABILITIES, Encoder::new())?;
        decode(&ret, |d| d.string("capabilities"))
    }

    /// The storage pool `name`.
    pub fn lookup_storage_pool_by_name(&self, name: &str) -> Result<StoragePool> {
        let mut e = Encoder::new();
        e.string(name);
        let ret = self.call(procs::STORAGE_POOL_LOOKUP_BY_NAME, e)?;
        Ok(StoragePool {
            conn: self.clone(),
            r: decode(&ret, PoolRef::decode)?,
        })
    }

    /// The volume at `path` on the daemon's host, in whichever pool holds it
    /// (`remote_storage_vol_lookup_by_path_args`: the path; the reply: the volume).
    pub fn lookup_storage_vol_by_path(&self, path: &str) -> Result<StorageVol> {
        let mut e = Encoder::new();
        e.string(path);
        let ret = self.call(procs::STORAGE_VOL_LOOKUP_BY_PATH, e)?;
        Ok(StorageVol {
            conn: self.clone(),
            r: decode(&ret, VolRef::decode)?,
        })
    }

    /// The domain `name`.
    pub fn lookup_domain_by_name(&self, name: &str) -> Result<Domain> {
        let mut e = Encoder::new();
        e.string(name);
        let ret = self.call(procs::DOMAIN_LOOKUP_BY_NAME, e)?;
        Ok(self.domain(decode(&ret, DomainRef::decode)?))
    }

    /// Defines (or redefines) a domain from `xml`.
    pub fn define_domain_xml(&self, xml: &str) -> Result<Domain> {
        let mut e = Encoder::new();
        e.string(xml);
        let ret = self.call(procs::DOMAIN_DEFINE_XML, e)?;
        Ok(self.domain(decode(&ret, DomainRef::decode)?))
    }

    /// The domains `flags` selects (`VIR_CONNECT_LIST_DOMAINS_*`; 1: active).
    pub fn list_all_domains(&self, flags: u32) -> Result<Vec<Domain>> {
        let mut e = Encoder::new();
        e.i32(1).u32(flags);
        let ret = self.call(procs::CONNECT_LIST_ALL_DOMAINS, e)?;
        let refs = decode(&ret, |d| {
            let n = d.count(DOMAIN_LIST_MAX, DomainRef::MIN_LEN, "domain list")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(DomainRef::decode(d)?);
            }
            d.u32("domain count")?;
            Ok(v)
        })?;
        Ok(refs.into_iter().map(|r| self.domain(r)).collect())
    }

    fn domain(&self, r: DomainRef) -> Domain {
        Domain {
            conn: self.clone(),
            r,
        }
    }
}

/// A storage pool.
#[derive(Clone)]
pub struct StoragePool {
    conn: Connect,
    r: PoolRef,
}

impl StoragePool {
    fn args(&self) -> Encoder {
        let mut e = Encoder::new();
        self.r.encode(&mut e);
        e
    }

    /// Whether it is running.
    pub fn is_active(&self) -> Result<bool> {
        let ret = self.conn.call(procs::STORAGE_POOL_IS_ACTIVE, self.args())?;
        decode(&ret, |d| d.i32("active")).map(|a| a != 0)
    }

    /// Its volume `name`.
    pub fn lookup_storage_vol_by_name(&self, name: &str) -> Result<StorageVol> {
        let mut e = self.args();
        e.string(name);
        let ret = self.conn.call(procs::STORAGE_VOL_LOOKUP_BY_NAME, e)?;
        self.vol(&ret)
    }

    /// Creates a volume from `xml`.
    pub fn create_volume_xml(&self, xml: &str, flags: u32) -> Result<StorageVol> {
        let mut e = self.args();
        e.string(xml).u32(flags);
        let ret = self.conn.call(procs::STORAGE_VOL_CREATE_XML, e)?;
        self.vol(&ret)
    }

    fn vol(&self, ret: &[u8]) -> Result<StorageVol> {
        Ok(StorageVol {
            conn: self.conn.clone(),
            r: decode(ret, VolRef::decode)?,
        })
    }
}

/// A storage volume.
#[derive(Clone)]
pub struct StorageVol {
    conn: Connect,
    r: VolRef,
}

impl StorageVol {
    fn args(&self) -> Encoder {
        let mut e = Encoder::new();
        self.r.encode(&mut e);
        e
    }

    /// Its XML (`remote_storage_vol_get_xml_desc_args`: the volume and flags; the reply: the XML).
    pub fn xml_desc(&self) -> Result<String> {
        let mut e = self.args();
        e.u32(0);
        let ret = self.conn.call(procs::STORAGE_VOL_GET_XML_DESC, e)?;
        decode(&ret, |d| d.string("volume XML"))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.r.name
    }

    /// The name of its pool.
    pub fn pool_name(&self) -> &str {
        &self.r.pool
    }

    /// Its path on the daemon's host.
    pub fn path(&self) -> Result<String> {
        let ret = self.conn.call(procs::STORAGE_VOL_GET_PATH, self.args())?;
        decode(&ret, |d| d.string("volume path"))
    }

    /// Type, capacity and allocation.
    pub fn info(&self) -> Result<VolInfo> {
        let ret = self.conn.call(procs::STORAGE_VOL_GET_INFO, self.args())?;
        decode(&ret, VolInfo::decode)
    }

    /// Type, capacity and allocation, with `flags` (`VIR_STORAGE_VOL_GET_PHYSICAL`: the file's length).
    pub fn info_flags(&self, flags: u32) -> Result<VolInfo> {
        let mut e = self.args();
        e.u32(flags);
        let ret = self.conn.call(procs::STORAGE_VOL_GET_INFO_FLAGS, e)?;
        decode(&ret, VolInfo::decode)
    }

    /// Deletes it.
    pub fn delete(&self, flags: u32) -> Result<()> {
        let mut e = self.args();
        e.u32(flags);
        self.conn.call(procs::STORAGE_VOL_DELETE, e)?;
        Ok(())
    }

    fn range(&self, offset: u64, length: u64, flags: u32) -> Vec<u8> {
        let mut e = self.args();
        e.u64(offset).u64(length).u32(flags);
        e.into_bytes()
    }

    /// Starts writing `length` bytes (0: to the end) at `offset`; `flags` may ask for a sparse stream.
    pub fn upload(&self, offset: u64, length: u64, flags: u32) -> Result<Upload> {
        let args = self.range(offset, length, flags);
        Upload::start(
            &self.conn.client,
            procs::STORAGE_VOL_UPLOAD,
            &args,
            flags & SPARSE_STREAM != 0,
        )
    }

    /// Starts reading `length` bytes (0: to the end) at `offset`; `flags` may ask for a sparse stream.
    pub fn download(&self, offset: u64, length: u64, flags: u32) -> Result<Download> {
        let args = self.range(offset, length, flags);
        Download::start(
            &self.conn.client,
            procs::STORAGE_VOL_DOWNLOAD,
            &args,
            flags & SPARSE_STREAM != 0,
        )
    }
}

/// A domain.
#[derive(Clone)]
pub struct Domain {
    conn: Connect,
    r: DomainRef,
}

impl Domain {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.r.name
    }

    fn args(&self) -> Encoder {
        let mut e = Encoder::new();
        self.r.encode(&mut e);
        e
    }

    /// Its XML.
    pub fn xml_desc(&self, flags: u32) -> Result<String> {
        let mut e = self.args();
        e.u32(flags);
        let ret = self.conn.call(procs::DOMAIN_GET_XML_DESC, e)?;
        decode(&ret, |d| d.string("domain XML"))
    }

    /// Whether it runs.
    pub fn is_active(&self) -> Result<bool> {
        let ret = self.conn.call(procs::DOMAIN_IS_ACTIVE, self.args())?;
        decode(&ret, |d| d.i32("active")).map(|a| a != 0)
    }

    /// Starts it.
    pub fn create(&self) -> Result<()> {
        self.conn.call(procs::DOMAIN_CREATE, self.args())?;
        Ok(())
    }

    /// Stops it at once (power off).
    pub fn destroy(&self) -> Result<()> {
        self.conn.call(procs::DOMAIN_DESTROY, self.args())?;
        Ok(())
    }

    /// Removes its definition (`flags`: `VIR_DOMAIN_UNDEFINE_*`).
    pub fn undefine_flags(&self, flags: u32) -> Result<()> {
        let mut e = self.args();
        e.u32(flags);
        self.conn.call(procs::DOMAIN_UNDEFINE_FLAGS, e)?;
        Ok(())
    }
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connect({})", self.client.what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::libvirt::rpc::Error;

    #[test]
    fn handles_can_cross_threads() {
        fn is<T: Send + Sync>() {}
        is::<Connect>();
        is::<StoragePool>();
        is::<StorageVol>();
        is::<Domain>();
        is::<Error>();
    }
}
