//! The parts of libvirt's remote protocol (`src/remote/remote_protocol.x`) imgshift uses: the program and
//! procedure numbers, the object references calls pass around, and the error a failed call returns.

use super::xdr::{Decoder, Encoder, XdrError};

/// `REMOTE_PROGRAM`.
pub const PROGRAM: u32 = 0x2000_8086;
/// `REMOTE_PROTOCOL_VERSION`.
pub const VERSION: u32 = 1;

/// Procedure numbers (`remote_procedure`).
pub mod procs {
    /// `REMOTE_PROC_CONNECT_OPEN`.
    pub const CONNECT_OPEN: i32 = 1;
    /// `REMOTE_PROC_CONNECT_CLOSE`.
    pub const CONNECT_CLOSE: i32 = 2;
    /// `REMOTE_PROC_CONNECT_GET_CAPABILITIES`.
    pub const CONNECT_GET_CAPABILITIES: i32 = 7;
    /// `REMOTE_PROC_DOMAIN_CREATE` (start a defined domain).
    pub const DOMAIN_CREATE: i32 = 9;
    /// `REMOTE_PROC_DOMAIN_DEFINE_XML`.
    pub const DOMAIN_DEFINE_XML: i32 = 11;
    /// `REMOTE_PROC_DOMAIN_DESTROY`.
    pub const DOMAIN_DESTROY: i32 = 12;
    /// `REMOTE_PROC_DOMAIN_GET_XML_DESC`.
    pub const DOMAIN_GET_XML_DESC: i32 = 14;
    /// `REMOTE_PROC_DOMAIN_LOOKUP_BY_NAME`.
    pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
    /// `REMOTE_PROC_AUTH_LIST`.
    pub const AUTH_LIST: i32 = 66;
    /// `REMOTE_PROC_AUTH_POLKIT`.
    pub const AUTH_POLKIT: i32 = 70;
    /// `REMOTE_PROC_STORAGE_POOL_LOOKUP_BY_NAME`.
    pub const STORAGE_POOL_LOOKUP_BY_NAME: i32 = 84;
    /// `REMOTE_PROC_STORAGE_VOL_CREATE_XML`.
    pub const STORAGE_VOL_CREATE_XML: i32 = 93;
    /// `REMOTE_PROC_STORAGE_VOL_DELETE`.
    pub const STORAGE_VOL_DELETE: i32 = 94;
    /// `REMOTE_PROC_STORAGE_VOL_LOOKUP_BY_NAME`.
    pub const STORAGE_VOL_LOOKUP_BY_NAME: i32 = 95;
    /// `REMOTE_PROC_STORAGE_VOL_LOOKUP_BY_PATH`.
    pub const STORAGE_VOL_LOOKUP_BY_PATH: i32 = 97;
    /// `REMOTE_PROC_STORAGE_VOL_GET_INFO`.
    pub const STORAGE_VOL_GET_INFO: i32 = 98;
    /// `REMOTE_PROC_STORAGE_VOL_GET_XML_DESC`.
    pub const STORAGE_VOL_GET_XML_DESC: i32 = 99;
    /// `REMOTE_PROC_STORAGE_VOL_GET_PATH`.
    pub const STORAGE_VOL_GET_PATH: i32 = 100;
    /// `REMOTE_PROC_DOMAIN_IS_ACTIVE`.
    pub const DOMAIN_IS_ACTIVE: i32 = 150;
    /// `REMOTE_PROC_STORAGE_POOL_IS_ACTIVE`.
    pub const STORAGE_POOL_IS_ACTIVE: i32 = 154;
    /// `REMOTE_PROC_STORAGE_VOL_UPLOAD`.
    pub const STORAGE_VOL_UPLOAD: i32 = 208;
    /// `REMOTE_PROC_STORAGE_VOL_DOWNLOAD`.
    pub const STORAGE_VOL_DOWNLOAD: i32 = 209;
    /// `REMOTE_PROC_DOMAIN_UNDEFINE_FLAGS`.
    pub const DOMAIN_UNDEFINE_FLAGS: i32 = 231;
    /// `REMOTE_PROC_CONNECT_LIST_ALL_DOMAINS`.
    pub const CONNECT_LIST_ALL_DOMAINS: i32 = 273;
    /// `REMOTE_PROC_STORAGE_VOL_GET_INFO_FLAGS`.
    pub const STORAGE_VOL_GET_INFO_FLAGS: i32 = 378;
}

/// `remote_auth_type`.
pub mod auth {
    /// No authentication.
    pub const NONE: i32 = 0;
    /// SASL (not implemented by imgshift).
    pub const SASL: i32 = 1;
    /// polkit.
    pub const POLKIT: i32 = 2;
    /// `REMOTE_AUTH_TYPE_LIST_MAX`.
    pub const LIST_MAX: usize = 20;
}

/// libvirt error codes (`virErrorNumber`) imgshift decides on.
pub mod codes {
    /// `VIR_ERR_NO_SUPPORT`.
    pub const NO_SUPPORT: i32 = 3;
    /// `VIR_ERR_NO_DOMAIN`.
    pub const NO_DOMAIN: i32 = 42;
    /// `VIR_ERR_NO_STORAGE_POOL`.
    pub const NO_STORAGE_POOL: i32 = 49;
    /// `VIR_ERR_NO_STORAGE_VOL`.
    pub const NO_STORAGE_VOL: i32 = 50;
}

/// `REMOTE_DOMAIN_LIST_MAX`: most domains one list call returns.
pub const DOMAIN_LIST_MAX: usize = 16_384;
/// `VIR_UUID_BUFLEN`.
pub const UUID_LEN: usize = 16;

/// `remote_nonnull_domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: [u8; UUID_LEN],
    /// Id (-1 when not running).
    pub id: i32,
}

/// `remote_nonnull_storage_pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: [u8; UUID_LEN],
}

/// `remote_nonnull_storage_vol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolRef {
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub name: String,
    /// Key (the path, for file volumes).
    pub key: String,
}

fn uuid(d: &mut Decoder<'_>) -> Result<[u8; UUID_LEN], XdrError> {
    let b = d.fixed(UUID_LEN, "uuid")?;
    let mut u = [0u8; UUID_LEN];
    u.copy_from_slice(b);
    Ok(u)
}

impl DomainRef {
    /// Encodes it.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.name).fixed(&self.uuid).i32(self.id);
    }

    /// Decodes one.
    pub fn decode(d: &mut Decoder<'_>) -> Result<DomainRef, XdrError> {
        Ok(DomainRef {
            name: d.string("domain name")?,
            uuid: uuid(d)?,
            id: d.i32("domain id")?,
        })
    }

    /// Smallest encoding (empty name): length word, UUID, id.
    pub const MIN_LEN: usize = 4 + UUID_LEN + 4;
}

impl PoolRef {
    /// Encodes it.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.name).fixed(&self.uuid);
    }

    /// Decodes one.
    pub fn decode(d: &mut Decoder<'_>) -> Result<PoolRef, XdrError> {
        Ok(PoolRef {
            name: d.string("pool name")?,
            uuid: uuid(d)?,
        })
    }
}

impl VolRef {
    /// Encodes it.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.pool).string(&self.name).string(&self.key);
    }

    /// Decodes one.
    pub fn decode(d: &mut Decoder<'_>) -> Result<VolRef, XdrError> {
        Ok(VolRef {
            pool: d.string("volume's pool")?,
            name: d.string("volume name")?,
            key: d.string("volume key")?,
        })
    }
}

/// `remote_error` (`virNetMessageError`): what a failed call or stream returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// `virErrorNumber`.
    pub code: i32,
    /// `virErrorDomain` (which part of libvirt).
    pub domain: i32,
    /// The message.
    pub message: String,
}

impl RemoteError {
    /// Decodes one; only code, domain and message are kept, the rest is read past.
    pub fn decode(d: &mut Decoder<'_>) -> Result<RemoteError, XdrError> {
        let code = d.i32("error code")?;
        let domain = d.i32("error domain")?;
        let message = d.opt_string("error message")?;
        let _level = d.i32("error level")?;
        if d.bool("error domain object")? {
            DomainRef::decode(d)?;
        }
        for _ in 0..3 {
            d.opt_string("error detail")?;
        }
        d.i32("error int1")?;
        d.i32("error int2")?;
        if d.bool("error network object")? {
            d.string("network name")?;
            d.fixed(UUID_LEN, "network uuid")?;
        }
        Ok(RemoteError {
            code,
            domain,
            message: message.unwrap_or_else(|| format!("libvirt error {code} (no message)")),
        })
    }
}

/// `remote_storage_vol_get_info_ret`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolInfo {
    /// `virStorageVolType` (0: file, 1: block, …).
    pub kind: i32,
    /// Capacity, bytes.
    pub capacity: u64,
    /// Allocation (with `VIR_STORAGE_VOL_GET_PHYSICAL`: the file's length), bytes.
    pub allocation: u64,
}

impl VolInfo {
    /// Decodes one (`char type` is an int on the wire).
    pub fn decode(d: &mut Decoder<'_>) -> Result<VolInfo, XdrError> {
        Ok(VolInfo {
            kind: d.i32("volume type")?,
            capacity: d.u64("volume capacity")?,
            allocation: d.u64("volume allocation")?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decodes_a_hand_built_error() {
        // code 50 (no storage vol), domain 18 (storage), message, level 2, no domain, str1 set, str2/str3 null,
        // int1, int2, no network.
        let mut e = Encoder::new();
        e.i32(50)
            .i32(18)
            .opt_string(Some(
                "Storage volume not found: no storage vol with matching name 'x'",
            ))
            .i32(2)
            .u32(0)
            .opt_string(Some("x"))
            .opt_string(None)
            .opt_string(None)
            .i32(-1)
            .i32(-1)
            .u32(0);
        let b = e.into_bytes();
        let mut d = Decoder::new(&b);
        let err = RemoteError::decode(&mut d).unwrap();
        d.finish().unwrap();
        assert_eq!((err.code, err.domain), (50, 18));
        assert!(err.message.starts_with("Storage volume not found"));
        // Truncated anywhere: an error, never a panic.
        for n in 0..b.len() {
            assert!(RemoteError::decode(&mut Decoder::new(&b[..n])).is_err());
        }
    }

    #[test]
    fn object_refs_round_trip() {
        let v = VolRef {
            pool: "p".into(),
            name: "v.qcow2".into(),
            key: "/pool/v.qcow2".into(),
        };
        let mut e = Encoder::new();
        v.encode(&mut e);
        let dom = DomainRef {
            name: "vm".into(),
            uuid: [7; 16],
            id: -1,
        };
        dom.encode(&mut e);
        let b = e.into_bytes();
        let mut d = Decoder::new(&b);
        assert_eq!(VolRef::decode(&mut d).unwrap(), v);
        assert_eq!(DomainRef::decode(&mut d).unwrap(), dom);
        d.finish().unwrap();
    }
}
