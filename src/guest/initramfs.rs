//! Initramfs listing: concatenated newc cpio archives (an uncompressed early-microcode archive first, then a
//! gzip/zstd-compressed main one). Streamed: member data is skipped, never buffered (except `modules.builtin`,
//! capped), and the decompressed total, name lengths and member count are bounded.

use std::io::{self, Read};

/// Boot drivers imgshift looks for (module names with `_`).
pub const DRIVERS: &[&str] = &[
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_pci",
    "nvme",
    "ena",
    "xen_blkfront",
    "xen_netfront",
    "hv_vmbus",
    "hv_storvsc",
    "hv_netvsc",
    "ata_piix",
    "ahci",
    "sd_mod",
];

/// Limits on what one initramfs may cost.
const MAX_DECOMPRESSED: u64 = 1 << 30;
const MAX_MEMBERS: usize = 200_000;
const MAX_NAME: usize = 4096;
const MAX_BUILTIN: u64 = 1 << 20;
const MAX_ARCHIVES: usize = 16;

/// What an initramfs holds.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    /// Driver module names found as `.ko*` members.
    pub modules: Vec<String>,
    /// Contents of a `modules.builtin` member, when present.
    pub builtin: Option<String>,
    /// Members listed in all archives.
    pub members: usize,
    /// Compression of each archive in order ("none", "gzip", "zstd").
    pub archives: Vec<String>,
    /// Problems (unsupported compression, truncated or oversized archives).
    pub problems: Vec<String>,
}

/// The driver name of a module path (`.../virtio-blk.ko.zst` → `virtio_blk`), if it is one.
pub fn module_name(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    let stem = base
        .strip_suffix(".ko")
        .or_else(|| base.strip_suffix(".ko.xz"))
        .or_else(|| base.strip_suffix(".ko.zst"))
        .or_else(|| base.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// Lists `data` (a whole initramfs file).
pub fn list(data: &[u8]) -> Listing {
    let mut l = Listing::default();
    let mut pos = 0usize;
    for _ in 0..MAX_ARCHIVES {
        while data.get(pos) == Some(&0) {
            pos += 1;
        }
        let Some(rest) = data.get(pos..).filter(|r| !r.is_empty()) else {
            return l;
        };
        if rest.starts_with(b"070701") || rest.starts_with(b"070702") {
            l.archives.push("none".into());
            let mut cur = io::Cursor::new(rest);
            if let Err(e) = parse_cpio(&mut cur, &mut l) {
                l.problems.push(format!("cpio archive at byte {pos}: {e}"));
                return l;
            }
            pos = pos.saturating_add(usize::try_from(cur.position()).unwrap_or(usize::MAX));
            continue;
        }
        let (name, res) = if rest.starts_with(&[0x1f, 0x8b]) {
            let r = flate2::read::MultiGzDecoder::new(rest).take(MAX_DECOMPRESSED);
            ("gzip", parse_stream(r, &mut l))
        } else if rest.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            match zstd::stream::read::Decoder::new(rest) {
                Ok(d) => ("zstd", parse_stream(d.take(MAX_DECOMPRESSED), &mut l)),
                Err(e) => ("zstd", Err(e)),
            }
        } else if rest.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            l.archives.push("xz".into());
            l.problems.push("xz-compressed initramfs is not supported".into());
            return l;
        } else if rest.starts_with(&[0x02, 0x21, 0x4c, 0x18]) || rest.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
            l.archives.push("lz4".into());
            l.problems.push("lz4-compressed initramfs is not supported".into());
            return l;
        } else {
            l.problems.push(format!("unrecognised data at byte {pos} of the initramfs"));
            return l;
        };
        l.archives.push(name.into());
        if let Err(e) = res {
            l.problems.push(format!("{name} archive at byte {pos}: {e}"));
        }
        // A compressed archive runs to the end of the file.
        return l;
    }
    l.problems.push(format!("more than {MAX_ARCHIVES} concatenated archives"));
    l
}

/// Parses every cpio archive in a decompressed stream (archives may follow each other).
fn parse_stream(mut r: impl Read, l: &mut Listing) -> io::Result<()> {
    loop {
        match parse_cpio(&mut r, l) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn hex(field: &[u8]) -> io::Result<u64> {
    let s = std::str::from_utf8(field).map_err(|_| bad("non-ASCII header field"))?;
    u64::from_str_radix(s, 16).map_err(|_| bad("bad hex header field"))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got != n {
        return Err(bad(&format!(
            "a member declares {n} bytes but the archive ends after {got}"
        )));
    }
    Ok(())
}

fn pad4(n: u64) -> u64 {
    (4 - n % 4) % 4
}

/// Parses one newc archive up to its `TRAILER!!!`. Leading zero padding is skipped in 4-byte steps.
fn parse_cpio(r: &mut impl Read, l: &mut Listing) -> io::Result<()> {
    let mut first = true;
    loop {
        let mut hdr = [0u8; 110];
        r.read_exact(&mut hdr[..4])?;
        if first {
            // Padding between concatenated archives.
            let mut zeros = 0u32;
            while hdr[..4] == [0, 0, 0, 0] {
                zeros += 1;
                if zeros > 1 << 20 {
                    return Err(bad("too much padding"));
                }
                r.read_exact(&mut hdr[..4])?;
            }
            first = false;
        }
        r.read_exact(&mut hdr[4..])?;
        if &hdr[..6] != b"070701" && &hdr[..6] != b"070702" {
            return Err(bad("not a newc cpio header"));
        }
        let mode = hex(&hdr[14..22])?;
        let filesize = hex(&hdr[54..62])?;
        let namesize = hex(&hdr[94..102])?;
        let namesize = usize::try_from(namesize).unwrap_or(usize::MAX);
        if namesize == 0 || namesize > MAX_NAME {
            return Err(bad("member name length out of range"));
        }
        let mut name = vec![0u8; namesize];
        r.read_exact(&mut name)?;
        skip(r, pad4(110 + namesize as u64))?;
        let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(&name)).into_owned();
        if name == "TRAILER!!!" {
            return Ok(());
        }
        l.members += 1;
        if l.members > MAX_MEMBERS {
            return Err(bad("too many members"));
        }
        let is_file = mode & 0o170000 == 0o100000;
        if is_file && name.ends_with("modules.builtin") && filesize <= MAX_BUILTIN {
            let mut buf = Vec::new();
            r.take(filesize).read_to_end(&mut buf)?;
            if buf.len() as u64 != filesize {
                return Err(bad("modules.builtin is truncated"));
            }
            l.builtin = Some(String::from_utf8_lossy(&buf).into_owned());
        } else {
            skip(r, filesize)?;
        }
        skip(r, pad4(filesize))?;
        if let Some(m) = module_name(&name) {
            if DRIVERS.contains(&m.as_str()) && !l.modules.contains(&m) {
                l.modules.push(m);
            }
        }
    }
}

/// Driver names listed in a `modules.builtin` text.
pub fn builtin_drivers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().take(100_000) {
        if let Some(m) = module_name(line.trim()) {
            if DRIVERS.contains(&m.as_str()) && !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}
