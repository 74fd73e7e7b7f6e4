//! The qcow2 header (cluster 0): fixed fields, header extensions, backing file name.
//! Spec: qemu docs/interop/qcow2.txt, "Header", "Header extensions", "Feature name table".

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{
    FMT, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
};
use crate::error::{Error, Result};
use crate::formats::probe::QCOW2_MAGIC;

/// Bytes of the version 2 header ("For version 2, the header is exactly 72 bytes").
pub const V2_HEADER_LEN: usize = 72;
/// Smallest version 3 header ("at least 104 bytes").
pub const V3_HEADER_LEN: usize = 104;
/// The version 3 header with the compression_type byte, padded to a multiple of 8 (what qemu writes).
pub const V3_HEADER_LEN_WITH_COMPRESSION: usize = 112;

/// Header extension types ("Header extensions").
pub const EXT_END: u32 = 0;
/// Backing file format name string.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name string.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits ("incompatible_features").
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Corrupt bit: any structure may be corrupt; the image must not be written.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// External data file bit.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Compression type bit (non-zlib compression).
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries (32 subclusters per cluster).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this reader understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Feature name table entry size: type (1), bit (1), name (46).
const FEATURE_ENTRY_LEN: usize = 48;
/// qemu keeps the backing format in a 16-byte buffer (`ext_backing_format: len too large` above 15).
const MAX_BACKING_FORMAT: usize = 15;

/// The fixed header fields up to `header_length` (bytes 0..104), big-endian.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RawHeader {
    /// "QFI\xfb".
    pub magic: [u8; 4],
    /// 2 or 3.
    pub version: U32,
    /// Offset of the backing file name (not NUL terminated), 0 without one.
    pub backing_file_offset: U64,
    /// Length of the backing file name; at most 1023.
    pub backing_file_size: U32,
    /// log2 of the cluster size; at least 9.
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: U32,
    /// Entries in the active L1 table.
    pub l1_size: U32,
    /// Cluster-aligned offset of the active L1 table.
    pub l1_table_offset: U64,
    /// Cluster-aligned offset of the refcount table.
    pub refcount_table_offset: U64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Number of internal snapshots.
    pub nb_snapshots: U32,
    /// Cluster-aligned offset of the snapshot table.
    pub snapshots_offset: U64,
    /// v3: bitmask of incompatible features.
    pub incompatible_features: U64,
    /// v3: bitmask of compatible features.
    pub compatible_features: U64,
    /// v3: bitmask of auto-clear features.
    pub autoclear_features: U64,
    /// v3: refcount width is `1 << refcount_order` bits (at most 6).
    pub refcount_order: U32,
    /// v3: length of the header structure (at least 104).
    pub header_length: U32,
}

/// Compression used by compressed clusters (header byte 104, "compression_type").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// 0: raw deflate (no zlib header), qemu's default.
    Zlib,
    /// 1: zstd frames.
    Zstd,
}

impl Compression {
    /// qemu-img's name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The bitmaps extension ("Bitmaps extension"): where the bitmap directory is.
#[derive(Debug, Clone, Copy)]
pub struct BitmapsExt {
    /// Number of bitmaps (at least 1).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Cluster-aligned offset of the bitmap directory.
    pub directory_offset: u64,
    /// Bytes 4-7, "Reserved, must be zero".
    pub reserved: u32,
    /// Length of the extension's data (24 by the spec).
    pub ext_len: u64,
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u64,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u64,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Auto-clear feature bits.
    pub autoclear: u64,
    /// Refcount width is `1 << refcount_order` bits.
    pub refcount_order: u32,
    /// Compression of compressed clusters.
    pub compression: Compression,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension.
    pub backing_format: Option<String>,
    /// Bitmaps extension, when present.
    pub bitmaps: Option<BitmapsExt>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Extended L2 entries (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// The dirty bit.
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }
    /// The corrupt bit.
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }
    /// Entries per L2 table ("l2_entries": 8-byte entries, 16-byte with extended L2).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }
}

/// Big-endian u32 at `off` of `buf`, or an error naming `what`.
pub fn be32(buf: &[u8], off: usize, what: &str) -> Result<u32> {
    let b = bytes(buf, off, 4, what)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Big-endian u64 at `off` of `buf`, or an error naming `what`.
pub fn be64(buf: &[u8], off: usize, what: &str) -> Result<u64> {
    let b = bytes(buf, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_be_bytes(a))
}

/// `buf[off..off+len]`, or an error naming `what`.
pub fn bytes<'a>(buf: &'a [u8], off: usize, len: usize, what: &str) -> Result<&'a [u8]> {
    off.checked_add(len)
        .and_then(|end| buf.get(off..end))
        .ok_or_else(|| Error::invalid(FMT, format!("{what} at byte {off} is truncated")))
}

/// Parses and validates the header from the first bytes of the file (`head` holds up to one cluster; a file
/// shorter than a cluster gives fewer). `file_len` bounds the tables.
pub fn parse(head: &[u8], file_len: u64) -> Result<Header> {
    if head.len() < V2_HEADER_LEN {
        return Err(Error::invalid(
            FMT,
            format!(
                "the file is {} bytes, shorter than the {V2_HEADER_LEN}-byte header",
                head.len()
            ),
        ));
    }
    let magic = bytes(head, 0, 4, "magic")?;
    if magic != QCOW2_MAGIC {
        return Err(Error::invalid(FMT, "bad magic (expected QFI\\xfb)"));
    }
    let version = be32(head, 4, "version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::unsupported(
                FMT,
                "version 1 is the old qcow format, not qcow2",
            ));
        }
        v => return Err(Error::unsupported(FMT, format!("version {v}"))),
    }
    // v2 headers end at byte 72; what follows may be an extension, so the v3 fields read as absent (zero).
    let mut fixed = [0u8; V3_HEADER_LEN];
    let take = if version == 2 {
        V2_HEADER_LEN
    } else {
        V3_HEADER_LEN
    };
    let src = bytes(head, 0, take, "version 3 header")?;
    fixed
        .get_mut(..take)
        .ok_or_else(|| Error::invalid(FMT, "header"))?
        .copy_from_slice(src);
    let raw = RawHeader::read_from_bytes(&fixed)
        .map_err(|_| Error::invalid(FMT, "header has the wrong size"))?;
    validate(&raw, head, file_len)
}

fn validate(raw: &RawHeader, head: &[u8], file_len: u64) -> Result<Header> {
    let version = raw.version.get();
    // "cluster_bits ... Must not be less than 9"; qemu refuses more than 21 (2 MiB).
    let cluster_bits = raw.cluster_bits.get();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::invalid(
            FMT,
            format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB, qemu's limits)"
            ),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let header_length = if version == 2 {
        V2_HEADER_LEN as u64
    } else {
        u64::from(raw.header_length.get())
    };
    if version >= 3 {
        if header_length < V3_HEADER_LEN as u64 {
            return Err(Error::invalid(
                FMT,
                format!("header_length {header_length} is below 104"),
            ));
        }
        if header_length > cluster_size {
            return Err(Error::invalid(
                FMT,
                format!("header_length {header_length} exceeds the cluster size {cluster_size}"),
            ));
        }
        if header_length > head.len() as u64 {
            return Err(Error::invalid(
                FMT,
                format!("the file ends inside the {header_length}-byte header"),
            ));
        }
    }
    let crypt = raw.crypt_method.get();
    if crypt != 0 {
        return Err(Error::unsupported(
            FMT,
            format!(
                "encrypted images are not supported (crypt_method {crypt}: {})",
                if crypt == 1 { "AES" } else { "LUKS" }
            ),
        ));
    }
    // "For version 2 images, the order is always assumed to be 4"; "may not exceed 6".
    let refcount_order = if version == 2 {
        4
    } else {
        raw.refcount_order.get()
    };
    if refcount_order > 6 {
        return Err(Error::invalid(
            FMT,
            format!("refcount_order {refcount_order} is above 6 (64-bit refcounts)"),
        ));
    }

    // Header extensions: from header_length to the backing file name (or the end of cluster 0).
    let backing_offset = raw.backing_file_offset.get();
    if backing_offset > cluster_size {
        return Err(Error::invalid(
            FMT,
            format!("backing file name offset {backing_offset} is outside the first cluster"),
        ));
    }
    let ext_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster_size
    };
    let ext = parse_extensions(head, header_length, ext_end, version)?;

    let incompatible = raw.incompatible_features.get();
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let names: Vec<String> = (0..64u8)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| {
                ext.features
                    .iter()
                    .find(|f| f.0 == 0 && f.1 == b)
                    .map_or_else(|| format!("bit {b}"), |f| format!("'{}' (bit {b})", f.2))
            })
            .collect();
        return Err(Error::unsupported(
            FMT,
            format!("unknown incompatible features {}", names.join(", ")),
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        let name = ext
            .data_file
            .as_deref()
            .map_or(String::new(), |n| format!(" ('{n}')"));
        return Err(Error::unsupported(
            FMT,
            format!(
                "external data files are not supported{name}: the data lives in another file the image names (CVE-2024-32498)"
            ),
        ));
    }
    // "compression_type ... If the incompatible bit is set: the field must be present and non-zero".
    let compression_field = if header_length > V3_HEADER_LEN as u64 {
        head.get(V3_HEADER_LEN).copied().unwrap_or(0)
    } else {
        0
    };
    let compression = if incompatible & INCOMPAT_COMPRESSION != 0 {
        match compression_field {
            1 => Compression::Zstd,
            0 => {
                return Err(Error::invalid(
                    FMT,
                    "the compression type bit is set but compression_type is 0 or absent",
                ));
            }
            t => return Err(Error::unsupported(FMT, format!("compression_type {t}"))),
        }
    } else if compression_field != 0 {
        return Err(Error::invalid(
            FMT,
            format!(
                "compression_type {compression_field} without the compression type feature bit"
            ),
        ));
    } else {
        Compression::Zlib
    };
    // "if the image has Extended L2 Entries then cluster_bits must be at least 14".
    if incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
        return Err(Error::invalid(
            FMT,
            format!(
                "extended L2 entries need clusters of at least 16 KiB (cluster_bits {cluster_bits})"
            ),
        ));
    }

    let backing_file = if backing_offset != 0 && raw.backing_file_size.get() != 0 {
        let len = u64::from(raw.backing_file_size.get());
        if len > MAX_BACKING_NAME {
            return Err(Error::invalid(
                FMT,
                format!("backing file name is {len} bytes, longer than {MAX_BACKING_NAME}"),
            ));
        }
        if backing_offset + len > cluster_size {
            return Err(Error::invalid(
                FMT,
                "backing file name runs past the first cluster",
            ));
        }
        let name = bytes(
            head,
            backing_offset as usize,
            len as usize,
            "backing file name",
        )?;
        Some(
            String::from_utf8(name.to_vec())
                .map_err(|_| Error::invalid(FMT, "backing file name is not UTF-8"))?,
        )
    } else {
        None
    };

    let header = Header {
        version,
        cluster_bits,
        size: raw.size.get(),
        l1_size: u64::from(raw.l1_size.get()),
        l1_table_offset: raw.l1_table_offset.get(),
        refcount_table_offset: raw.refcount_table_offset.get(),
        refcount_table_clusters: u64::from(raw.refcount_table_clusters.get()),
        nb_snapshots: raw.nb_snapshots.get(),
        snapshots_offset: raw.snapshots_offset.get(),
        incompatible,
        compatible: raw.compatible_features.get(),
        autoclear: raw.autoclear_features.get(),
        refcount_order,
        compression,
        backing_file,
        backing_format: ext.backing_format,
        bitmaps: ext.bitmaps,
    };
    validate_tables(&header, file_len)?;
    Ok(header)
}

/// What the header extensions told.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<String>,
    /// (type, bit, name) from the feature name table.
    features: Vec<(u8, u8, String)>,
    bitmaps: Option<BitmapsExt>,
}

fn parse_extensions(head: &[u8], start: u64, end: u64, version: u32) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let mut off = start;
    // Each extension takes at least 8 bytes, so this runs at most cluster_size / 8 times.
    while off < end {
        if off + 8 > end {
            return Err(Error::invalid(
                FMT,
                format!("header extension at byte {off} overruns the extension area"),
            ));
        }
        let o = off as usize;
        let typ = be32(head, o, "header extension")?;
        let len = u64::from(be32(head, o + 4, "header extension")?);
        if typ == EXT_END {
            break;
        }
        if len > end - off - 8 {
            return Err(Error::invalid(
                FMT,
                format!(
                    "header extension {typ:#x} at byte {off} is {len} bytes, past the extension area"
                ),
            ));
        }
        let data = bytes(head, o + 8, len as usize, "header extension data")?;
        let known = [
            EXT_BACKING_FORMAT,
            EXT_FEATURE_TABLE,
            EXT_BITMAPS,
            EXT_DATA_FILE,
            EXT_CRYPTO,
        ];
        if known.contains(&typ) {
            if seen.contains(&typ) {
                return Err(Error::invalid(
                    FMT,
                    format!("header extension {typ:#x} appears twice"),
                ));
            }
            seen.push(typ);
        }
        match typ {
            EXT_BACKING_FORMAT => {
                if data.len() > MAX_BACKING_FORMAT {
                    return Err(Error::invalid(
                        FMT,
                        format!(
                            "backing format name is {} bytes, longer than {MAX_BACKING_FORMAT}",
                            data.len()
                        ),
                    ));
                }
                let s = String::from_utf8(data.to_vec())
                    .map_err(|_| Error::invalid(FMT, "backing format name is not UTF-8"))?;
                ext.backing_format = Some(s);
            }
            EXT_DATA_FILE => {
                ext.data_file = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(FEATURE_ENTRY_LEN) {
                    let (Some(&t), Some(&b), Some(name)) = (e.first(), e.get(1), e.get(2..)) else {
                        continue;
                    };
                    let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    let name = String::from_utf8_lossy(name.get(..n).unwrap_or(&[])).into_owned();
                    ext.features.push((t, b, name));
                }
            }
            EXT_BITMAPS if version >= 3 => {
                ext.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: be32(data, 0, "bitmaps extension")?,
                    directory_size: be64(data, 8, "bitmaps extension")?,
                    directory_offset: be64(data, 16, "bitmaps extension")?,
                    reserved: be32(data, 4, "bitmaps extension")?,
                    ext_len: len,
                });
            }
            // "other - Unknown header extension, can be safely ignored"
            _ => {}
        }
        off = off + 8 + len.div_ceil(8) * 8;
    }
    Ok(ext)
}

fn validate_tables(h: &Header, file_len: u64) -> Result<()> {
    let cs = h.cluster_size();
    let aligned = |off: u64| off.is_multiple_of(cs);
    // The L1 table must cover the virtual disk ("L1 table is too small" in qemu).
    let needed = h.size.div_ceil(h.l2_span());
    if needed.saturating_mul(8) > MAX_L1_BYTES {
        return Err(Error::limit(
            FMT,
            format!(
                "virtual size {} needs an L1 table above qemu's {} MiB limit",
                h.size,
                MAX_L1_BYTES >> 20
            ),
        ));
    }
    if h.l1_size < needed {
        return Err(Error::invalid(
            FMT,
            format!(
                "the L1 table has {} entries; the virtual size {} needs {needed}",
                h.l1_size, h.size
            ),
        ));
    }
    let l1_bytes = h.l1_size * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Error::limit(
            FMT,
            format!(
                "l1_size {} ({l1_bytes} bytes) is above qemu's {} MiB L1 limit",
                h.l1_size,
                MAX_L1_BYTES >> 20
            ),
        ));
    }
    if h.l1_size > 0 {
        if !aligned(h.l1_table_offset) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "L1 table offset {:#x} is not cluster aligned",
                    h.l1_table_offset
                ),
            ));
        }
        if h.l1_table_offset
            .checked_add(l1_bytes)
            .is_none_or(|e| e > file_len)
        {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "L1 table at {:#x} ({l1_bytes} bytes) extends past the end of the file ({file_len} bytes)",
                    h.l1_table_offset
                ),
            ));
        }
    }
    // Refcount table: at most 8 MiB (qemu's QCOW_MAX_REFTABLE_SIZE), inside the file.
    let rt_bytes = h.refcount_table_clusters.saturating_mul(cs);
    if h.refcount_table_clusters == 0 {
        return Err(Error::invalid(FMT, "the image has no refcount table"));
    }
    if rt_bytes > MAX_REFTABLE_BYTES {
        return Err(Error::limit(
            FMT,
            format!(
                "refcount table of {rt_bytes} bytes is above qemu's {} MiB limit",
                MAX_REFTABLE_BYTES >> 20
            ),
        ));
    }
    if !aligned(h.refcount_table_offset) {
        return Err(Error::corrupt(
            FMT,
            format!(
                "refcount table offset {:#x} is not cluster aligned",
                h.refcount_table_offset
            ),
        ));
    }
    if h.refcount_table_offset
        .checked_add(rt_bytes)
        .is_none_or(|e| e > file_len)
    {
        return Err(Error::corrupt(
            FMT,
            format!(
                "refcount table at {:#x} ({rt_bytes} bytes) extends past the end of the file ({file_len} bytes)",
                h.refcount_table_offset
            ),
        ));
    }
    if h.nb_snapshots > 0 {
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::limit(
                FMT,
                format!("{} snapshots, above qemu's {MAX_SNAPSHOTS}", h.nb_snapshots),
            ));
        }
        if !aligned(h.snapshots_offset) || h.snapshots_offset >= file_len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "snapshot table offset {:#x} is unaligned or past the end of the file",
                    h.snapshots_offset
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header in one 64 KiB cluster: 1 MiB disk, L1 at cluster 3, refcount table at 1.
    pub(crate) fn valid() -> Vec<u8> {
        let mut h = RawHeader {
            magic: *QCOW2_MAGIC,
            version: U32::new(3),
            cluster_bits: U32::new(16),
            size: U64::new(1 << 20),
            l1_size: U32::new(1),
            l1_table_offset: U64::new(3 << 16),
            refcount_table_offset: U64::new(1 << 16),
            refcount_table_clusters: U32::new(1),
            refcount_order: U32::new(4),
            header_length: U32::new(104),
            ..RawHeader::default()
        };
        h.nb_snapshots = U32::new(0);
        let mut v = vec![0u8; 4 << 16];
        v[..104].copy_from_slice(h.as_bytes());
        v
    }

    fn parse_buf(v: &[u8]) -> Result<Header> {
        parse(&v[..v.len().min(1 << 16)], v.len() as u64)
    }

    fn set32(v: &mut [u8], off: usize, x: u32) {
        v[off..off + 4].copy_from_slice(&x.to_be_bytes());
    }

    fn set64(v: &mut [u8], off: usize, x: u64) {
        v[off..off + 8].copy_from_slice(&x.to_be_bytes());
    }

    #[test]
    fn accepts_valid() {
        let h = parse_buf(&valid()).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.compression, Compression::Zlib);
    }

    #[test]
    fn rejects_short_and_magic() {
        assert!(parse(&[], 0).is_err());
        assert!(parse(&valid()[..50], 50).is_err());
        let mut v = valid();
        v[0] = b'X';
        assert!(parse_buf(&v).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn rejects_versions() {
        for ver in [1, 4, 0] {
            let mut v = valid();
            set32(&mut v, 4, ver);
            assert!(parse_buf(&v).is_err(), "version {ver}");
        }
    }

    #[test]
    fn rejects_cluster_bits() {
        for cb in [8, 22, 30, 63] {
            let mut v = valid();
            set32(&mut v, 20, cb);
            assert!(
                parse_buf(&v)
                    .unwrap_err()
                    .to_string()
                    .contains("cluster_bits")
            );
        }
    }

    #[test]
    fn rejects_refcount_order_and_crypt() {
        let mut v = valid();
        set32(&mut v, 96, 7);
        assert!(
            parse_buf(&v)
                .unwrap_err()
                .to_string()
                .contains("refcount_order")
        );
        let mut v = valid();
        set32(&mut v, 32, 2);
        assert!(parse_buf(&v).unwrap_err().to_string().contains("encrypted"));
    }

    #[test]
    fn rejects_tables() {
        let mut v = valid();
        set32(&mut v, 36, 1 << 31);
        assert!(parse_buf(&v).unwrap_err().to_string().contains("limit"));
        let mut v = valid();
        set64(&mut v, 40, 1 << 40);
        assert!(
            parse_buf(&v)
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
        let mut v = valid();
        set64(&mut v, 40, 100);
        assert!(parse_buf(&v).unwrap_err().to_string().contains("aligned"));
        let mut v = valid();
        set32(&mut v, 56, 1 << 20);
        assert!(parse_buf(&v).is_err());
        let mut v = valid();
        set64(&mut v, 24, 1 << 62);
        assert!(parse_buf(&v).is_err());
    }

    #[test]
    fn rejects_features() {
        let mut v = valid();
        set64(&mut v, 72, INCOMPAT_DATA_FILE);
        assert!(
            parse_buf(&v)
                .unwrap_err()
                .to_string()
                .contains("external data files are not supported")
        );
        // an unknown bit, named from the feature table
        let mut v = valid();
        set64(&mut v, 72, 1 << 9);
        set32(&mut v, 104, EXT_FEATURE_TABLE);
        set32(&mut v, 108, 48);
        v[112] = 0;
        v[113] = 9;
        v[114..118].copy_from_slice(b"warp");
        let e = parse_buf(&v).unwrap_err().to_string();
        assert!(e.contains("'warp' (bit 9)"), "{e}");
        // compression bit without the field
        let mut v = valid();
        set64(&mut v, 72, INCOMPAT_COMPRESSION);
        assert!(parse_buf(&v).is_err());
    }

    #[test]
    fn rejects_bad_extensions_and_backing_name() {
        let mut v = valid();
        set32(&mut v, 104, 0x1234);
        set32(&mut v, 108, 1 << 20);
        assert!(parse_buf(&v).is_err());
        let mut v = valid();
        set64(&mut v, 8, 512);
        set32(&mut v, 16, 2000);
        assert!(
            parse_buf(&v)
                .unwrap_err()
                .to_string()
                .contains("longer than 1023")
        );
        let mut v = valid();
        set64(&mut v, 8, 1 << 20);
        set32(&mut v, 16, 4);
        assert!(parse_buf(&v).is_err());
    }
}
