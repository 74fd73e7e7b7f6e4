//! Filesystem detection by superblock magic. Only what the magic and a few fixed fields say; nothing guessed.

use serde::Serialize;

use super::{Window, le_u16, le_u32};

/// What a filesystem probe found (virt-inspector's `type`, `label`, `uuid`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct FsInfo {
    /// ext2, ext3, ext4, vfat, ntfs, xfs, btrfs, LVM2_member, crypto_LUKS, swap, or unknown.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Volume label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Volume UUID (or FAT/NTFS serial), as blkid spells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Whether imgshift can read files on it (ext2/3/4, FAT, and NTFS for Windows detection).
    pub inspectable: bool,
}

fn uuid_str(b: &[u8]) -> Option<String> {
    let b: [u8; 16] = b.try_into().ok()?;
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        h.get(0..8)?,
        h.get(8..12)?,
        h.get(12..16)?,
        h.get(16..20)?,
        h.get(20..32)?
    ))
}

fn label_str(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(b.get(..end)?)
        .trim_end()
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// Probes the start of a partition (reads at most 72 KiB).
pub fn probe(part: &Window) -> FsInfo {
    let Ok(h) = part.read_vec(0, 0x11000) else {
        return unknown();
    };
    let at = |o: usize, m: &[u8]| h.get(o..o + m.len()) == Some(m);
    if le_u16(&h, 0x438) == Some(0xEF53) {
        let compat = le_u32(&h, 0x45C).unwrap_or(0);
        let incompat = le_u32(&h, 0x460).unwrap_or(0);
        let t = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return FsInfo {
            fs_type: t.into(),
            label: h.get(0x478..0x488).and_then(label_str),
            uuid: h.get(0x468..0x478).and_then(uuid_str),
            inspectable: true,
        };
    }
    if at(0, b"XFSB") {
        return not_inspectable(
            "xfs",
            h.get(108..120).and_then(label_str),
            h.get(32..48).and_then(uuid_str),
        );
    }
    if at(0x10040, b"_BHRfS_M") {
        return not_inspectable(
            "btrfs",
            h.get(0x1012B..0x1022B).and_then(label_str),
            h.get(0x10020..0x10030).and_then(uuid_str),
        );
    }
    if at(0, b"LUKS\xba\xbe") {
        return not_inspectable("crypto_LUKS", None, h.get(168..208).and_then(label_str));
    }
    if at(512, b"LABELONE") && at(512 + 24, b"LVM2 001") {
        let uuid = h.get(512 + 32..512 + 64).and_then(label_str);
        return not_inspectable("LVM2_member", None, uuid);
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return FsInfo {
            fs_type: "swap".into(),
            label: h.get(0x41c..0x42c).and_then(label_str),
            uuid: h.get(0x40c..0x41c).and_then(uuid_str),
            inspectable: false,
        };
    }
    if at(3, b"-FVE-FS-") {
        // BitLocker's volume header (blkid's "BitLocker"): the NTFS inside is encrypted.
        return not_inspectable("BitLocker", None, None);
    }
    if at(3, b"NTFS    ") {
        let serial = super::le_u64(&h, 0x48).unwrap_or(0);
        return FsInfo {
            fs_type: "ntfs".into(),
            label: None,
            uuid: Some(format!("{serial:016X}")),
            // Read for Windows detection (guest::windows).
            inspectable: true,
        };
    }
    if le_u16(&h, 510) == Some(0xAA55) {
        let fat = if at(54, b"FAT12") || at(54, b"FAT16") {
            Some((39usize, 43usize))
        } else if at(82, b"FAT32") {
            Some((67, 71))
        } else {
            None
        };
        if let Some((id, lab)) = fat {
            let serial = le_u32(&h, id).unwrap_or(0);
            return FsInfo {
                fs_type: "vfat".into(),
                label: h
                    .get(lab..lab + 11)
                    .and_then(label_str)
                    .filter(|l| l != "NO NAME"),
                uuid: Some(format!("{:04X}-{:04X}", serial >> 16, serial & 0xffff)),
                inspectable: true,
            };
        }
    }
    unknown()
}

fn not_inspectable(t: &str, label: Option<String>, uuid: Option<String>) -> FsInfo {
    FsInfo {
        fs_type: t.into(),
        label,
        uuid,
        inspectable: false,
    }
}

fn unknown() -> FsInfo {
    FsInfo {
        fs_type: "unknown".into(),
        ..Default::default()
    }
}

/// Most EFI loaders listed, and bytes of each read (enough for the PE header).
const MAX_LOADERS: usize = 64;
const LOADER_HEAD: u64 = 4096;

/// Checks a FAT boot sector's BIOS parameter block before the `fatfs` crate trusts it (Microsoft's "FAT: General
/// Overview of On-Disk Format", BPB fields at 0x0B-0x27): a sector size of 512-4096, at least one FAT, and the
/// reserved sectors, FATs and root directory inside the volume, the volume inside its partition, all in u32
/// sector counts without overflow. fatfs 0.3 multiplies the FAT count by the FAT size unchecked (a
/// debug-assertion panic, a wrapped value in release builds: found by the `fat` fuzz target).
pub fn fat_sane(part: &Window) -> Result<(), String> {
    let b = part
        .read_vec(0, 512)
        .map_err(|e| format!("FAT boot sector unreadable: {e}"))?;
    let bad = |what: &str| Err(format!("FAT boot sector: {what}"));
    let (Some(bps), Some(reserved), Some(root_entries), Some(total16), Some(spf16)) = (
        le_u16(&b, 0x0B),
        le_u16(&b, 0x0E),
        le_u16(&b, 0x11),
        le_u16(&b, 0x13),
        le_u16(&b, 0x16),
    ) else {
        return bad("shorter than 512 bytes");
    };
    let (Some(&fats), Some(total32), Some(spf32)) =
        (b.get(0x10), le_u32(&b, 0x20), le_u32(&b, 0x24))
    else {
        return bad("shorter than 512 bytes");
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096) {
        return bad(&format!("{bps} bytes per sector (512, 1024, 2048 or 4096)"));
    }
    if fats == 0 {
        return bad("no FAT");
    }
    let total = if total16 != 0 {
        u32::from(total16)
    } else {
        total32
    };
    let spf = if spf16 != 0 { u32::from(spf16) } else { spf32 };
    // fatfs multiplies the FAT count by whichever FAT size field it reads: neither may overflow.
    let fat_sectors = u32::from(fats)
        .checked_mul(u32::from(spf16))
        .and(u32::from(fats).checked_mul(spf32))
        .and(u32::from(fats).checked_mul(spf));
    let root_sectors = (u32::from(root_entries) * 32).div_ceil(u32::from(bps));
    let first_data = fat_sectors
        .and_then(|f| f.checked_add(u32::from(reserved)))
        .and_then(|f| f.checked_add(root_sectors));
    match first_data {
        Some(d) if d < total => {}
        _ => return bad("the reserved sectors, FATs and root directory do not fit the volume"),
    }
    if u64::from(total) * u64::from(bps) > part.len() {
        return bad(&format!(
            "{total} sectors of {bps} bytes do not fit the {} byte partition",
            part.len()
        ));
    }
    Ok(())
}

/// Opens a FAT filesystem after [`fat_sane`].
pub fn open_fat(part: &Window) -> Result<fatfs::FileSystem<Window>, String> {
    fat_sane(part)?;
    match super::no_panic(|| fatfs::FileSystem::new(part.clone(), fatfs::FsOptions::new())) {
        Some(Ok(fs)) => Ok(fs),
        Some(Err(e)) => Err(format!("FAT filesystem unreadable: {e}")),
        None => Err("FAT filesystem unreadable (the fatfs crate panicked on it)".into()),
    }
}

/// Checks an ext2/3/4 superblock before the `ext4-view` crate trusts it (kernel
/// `Documentation/filesystems/ext4/super.rst`): a block size of 1-64 KiB, and the block count (low and high
/// words, as ext4-view reads them) inside the partition. ext4-view sizes its group descriptor table from the
/// block count before any other check: a 521-byte input claiming 2^38 blocks made it allocate 713 MB (found by
/// the `ext4` fuzz target).
pub fn ext4_sane(part: &Window) -> Result<(), String> {
    let sb = part
        .read_vec(1024, 1024)
        .map_err(|e| format!("superblock unreadable: {e}"))?;
    let (Some(lo), Some(log), Some(per_group), Some(hi)) = (
        le_u32(&sb, 0x04),
        le_u32(&sb, 0x18),
        le_u32(&sb, 0x20),
        le_u32(&sb, 0x150),
    ) else {
        return Err("superblock shorter than 1024 bytes".into());
    };
    if log > 6 {
        return Err(format!(
            "block size 2^{} bytes (at most 64 KiB)",
            log.saturating_add(10)
        ));
    }
    if per_group == 0 {
        return Err("no blocks per group".into());
    }
    let blocks = u64::from(lo) | (u64::from(hi) << 32);
    let block_size = 1024u64 << log;
    match blocks.checked_mul(block_size) {
        Some(n) if n <= part.len() => Ok(()),
        _ => Err(format!(
            "{blocks} blocks of {block_size} bytes do not fit the {} byte partition",
            part.len()
        )),
    }
}

/// Opens an ext2/3/4 filesystem after [`ext4_sane`].
pub fn open_ext4(part: &Window) -> Result<ext4_view::Ext4, String> {
    ext4_sane(part)?;
    match super::no_panic(|| ext4_view::Ext4::load(Box::new(part.clone()))) {
        Some(Ok(e)) => Ok(e),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the ext4-view crate panicked on it".into()),
    }
}

/// Lists `\EFI\*\*.EFI` loaders on a FAT filesystem (two levels deep, at most 64), each with its first 4 KiB.
pub fn efi_loaders(part: &Window) -> Result<Vec<(String, Vec<u8>)>, String> {
    use std::io::Read;
    let fs = open_fat(part)?;
    let root = fs.root_dir();
    let mut out = Vec::new();
    let Ok(efi) = root.open_dir("EFI") else {
        return Ok(out);
    };
    for vendor in efi.iter().take(MAX_LOADERS) {
        let vendor = vendor.map_err(|e| format!("FAT directory \\EFI unreadable: {e}"))?;
        if !vendor.is_dir() || vendor.file_name().starts_with('.') {
            continue;
        }
        for f in vendor.to_dir().iter().take(MAX_LOADERS) {
            let f = f.map_err(|e| format!("FAT directory unreadable: {e}"))?;
            if !(f.is_file() && f.file_name().to_ascii_uppercase().ends_with(".EFI")) {
                continue;
            }
            let mut head = Vec::new();
            f.to_file()
                .take(LOADER_HEAD)
                .read_to_end(&mut head)
                .map_err(|e| format!("{} unreadable: {e}", f.file_name()))?;
            out.push((
                format!("\\EFI\\{}\\{}", vendor.file_name(), f.file_name()),
                head,
            ));
            if out.len() >= MAX_LOADERS {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::guest::mem_window;

    /// A FAT16 boot sector (512-byte sectors, 1 reserved, 2 FATs of `spf` sectors, 512 root entries, `total`
    /// sectors) at the start of a `size`-byte partition.
    fn fat16(size: usize, total: u16, spf16: u16, fats: u8, spf32: u32) -> Vec<u8> {
        let mut b = vec![0u8; size];
        b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
        b[0x0D] = 1;
        b[0x0E..0x10].copy_from_slice(&1u16.to_le_bytes());
        b[0x10] = fats;
        b[0x11..0x13].copy_from_slice(&512u16.to_le_bytes());
        b[0x13..0x15].copy_from_slice(&total.to_le_bytes());
        b[0x16..0x18].copy_from_slice(&spf16.to_le_bytes());
        b[0x24..0x28].copy_from_slice(&spf32.to_le_bytes());
        b[54..59].copy_from_slice(b"FAT16");
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    #[test]
    fn fat_bpb_that_fits_passes() {
        assert_eq!(fat_sane(&mem_window(fat16(1 << 20, 2048, 8, 2, 0))), Ok(()));
    }

    /// The `fat` fuzz target's crash: FAT count x FAT size overflowed inside fatfs (a panic with overflow checks).
    #[test]
    fn rejects_fat_whose_fat_size_overflows() {
        let w = mem_window(fat16(1 << 20, 2048, 0, 255, 0x7FFF_FFFF));
        assert!(fat_sane(&w).is_err());
        assert!(efi_loaders(&w).is_err(), "refused before fatfs sees it");
        assert!(!crate::guest::windows::esp_bcd(&w));
    }

    #[test]
    fn rejects_fat_volume_larger_than_its_partition() {
        let e = fat_sane(&mem_window(fat16(64 << 10, 2048, 8, 2, 0))).unwrap_err();
        assert!(e.contains("do not fit the 65536 byte partition"), "{e}");
    }

    #[test]
    fn rejects_fat_metadata_past_the_volume() {
        assert!(fat_sane(&mem_window(fat16(1 << 20, 40, 8, 2, 0))).is_err());
        assert!(
            fat_sane(&mem_window(fat16(1 << 20, 2048, 8, 0, 0))).is_err(),
            "no FAT"
        );
    }

    /// An ext superblock (magic, `log` block size, `lo`/`hi` block counts) in a `size`-byte partition.
    fn ext(size: usize, lo: u32, hi: u32, log: u32) -> Vec<u8> {
        let mut b = vec![0u8; size];
        let sb = 1024;
        b[sb + 0x04..sb + 0x08].copy_from_slice(&lo.to_le_bytes());
        b[sb + 0x18..sb + 0x1C].copy_from_slice(&log.to_le_bytes());
        b[sb + 0x20..sb + 0x24].copy_from_slice(&8192u32.to_le_bytes());
        b[sb + 0x38..sb + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[sb + 0x150..sb + 0x154].copy_from_slice(&hi.to_le_bytes());
        b
    }

    #[test]
    fn ext_superblock_that_fits_passes() {
        assert_eq!(ext4_sane(&mem_window(ext(8 << 20, 8192, 0, 0))), Ok(()));
    }

    /// The `ext4` fuzz target's out-of-memory: 8192 + 85 x 2^32 blocks made ext4-view allocate a 713 MB group
    /// descriptor table for an 8 MiB input.
    #[test]
    fn rejects_ext_block_count_beyond_the_partition() {
        let w = mem_window(ext(8 << 20, 8192, 85, 0));
        let e = ext4_sane(&w).unwrap_err();
        assert!(e.contains("do not fit the 8388608 byte partition"), "{e}");
        assert!(open_ext4(&w).is_err());
        assert!(
            ext4_sane(&mem_window(ext(8 << 20, 8192, 0, 7))).is_err(),
            "128 KiB blocks"
        );
    }
}
