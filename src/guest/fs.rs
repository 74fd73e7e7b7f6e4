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

/// Lists `\EFI\*\*.EFI` loaders on a FAT filesystem (two levels deep, at most 64), each with its first 4 KiB.
pub fn efi_loaders(part: &Window) -> Result<Vec<(String, Vec<u8>)>, String> {
    use std::io::Read;
    let fs = fatfs::FileSystem::new(part.clone(), fatfs::FsOptions::new())
        .map_err(|e| format!("FAT filesystem unreadable: {e}"))?;
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
