//! Boot mode: what firmware can start this disk.
//!
//! - BIOS: the MBR's first 440 bytes hold boot code. For GRUB (boot.img, which names itself "GRUB " in its
//!   strings) the sector it loads next is read from its `kernel_sector` field (offset 0x5c, u64 LE, GRUB's
//!   `boot/i386/pc/boot.S`) and must hold GRUB's diskboot.img (which carries the string "loading"): in the MBR
//!   gap (LBA 1) on MBR disks, in the BIOS boot partition on GPT disks. Other boot code on an MBR disk is taken
//!   as bootable; on a GPT disk only GRUB with its core is (a protective MBR's code cannot find a partition).
//! - UEFI: an ESP (GPT type C12A7328-..., MBR type 0xEF) with a FAT filesystem holding the removable-media
//!   fallback loader `\EFI\BOOT\BOOTX64.EFI` (or BOOTAA64.EFI): a migrated disk arrives with empty NVRAM, so
//!   that path is what the target's firmware runs (UEFI 2.10, 3.5.1.1). Loaders are checked to be PE images.

use serde::Serialize;

use super::Window;
use super::fs::{self, FsInfo};
use super::partitions::PartitionTable;

/// An EFI loader on an ESP.
#[derive(Debug, Clone, Serialize)]
pub struct EfiLoader {
    /// Device of the ESP (`/dev/sda1`).
    pub device: String,
    /// Path on the ESP, `\EFI\BOOT\BOOTX64.EFI`.
    pub path: String,
    /// Architecture from the PE header (x86_64, aarch64, i386, ...), if it is a PE image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// What the disk offers each firmware.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BootInfo {
    /// "bios", "uefi", "bios+uefi" or "unknown" (nothing bootable found).
    pub mode: String,
    /// BIOS boot code found in the MBR: "grub", "other", or absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bios_loader: Option<String>,
    /// For GRUB: the LBA of its core image and whether it is there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grub_core_lba: Option<u64>,
    /// EFI loaders found on ESPs.
    pub efi_loaders: Vec<EfiLoader>,
    /// The removable-media fallback loader, if present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub efi_fallback: Option<String>,
}

/// GRUB boot.img's `kernel_sector` field.
const GRUB_KERNEL_SECTOR: usize = 0x5c;
/// Bytes of MBR boot code (the rest of the sector is the disk signature and the partition table).
const MBR_CODE: usize = 440;

/// A filesystem found on a partition (or the whole disk).
pub struct Volume<'a> {
    /// Linux-style device name.
    pub device: &'a str,
    /// The bytes of the partition.
    pub window: &'a Window,
    /// What the superblock says.
    pub info: &'a FsInfo,
    /// Partition type name ("efi-system", ...).
    pub type_name: &'a str,
}

/// Works out the boot mode; problems found on the way go to `problems`.
pub fn detect(
    disk: &Window,
    table: &PartitionTable,
    volumes: &[Volume<'_>],
    problems: &mut Vec<String>,
) -> BootInfo {
    let mut b = BootInfo::default();
    let bios = bios(disk, table, &mut b, problems);
    for v in volumes {
        let esp = v.type_name == "efi-system";
        if !esp || v.info.fs_type != "vfat" {
            continue;
        }
        match super::no_panic(|| fs::efi_loaders(v.window)).unwrap_or_else(|| {
            Err("FAT filesystem could not be parsed (the fatfs crate panicked on it)".into())
        }) {
            Ok(list) => {
                for (path, head) in list {
                    b.efi_loaders.push(EfiLoader {
                        device: v.device.to_string(),
                        arch: pe_arch(&head).map(str::to_string),
                        path,
                    });
                }
            }
            Err(e) => problems.push(format!("{}: {e}", v.device)),
        }
    }
    b.efi_fallback = b
        .efi_loaders
        .iter()
        .find(|l| {
            let up = l.path.to_ascii_uppercase();
            l.arch.is_some()
                && (up == "\\EFI\\BOOT\\BOOTX64.EFI" || up == "\\EFI\\BOOT\\BOOTAA64.EFI")
        })
        .map(|l| format!("{}:{}", l.device, l.path));
    if b.efi_fallback.is_none() && !b.efi_loaders.is_empty() {
        problems.push(
            "the ESP has EFI loaders but no \\EFI\\BOOT\\BOOTX64.EFI fallback: a target with empty NVRAM will not find them"
                .into(),
        );
    }
    let uefi = b.efi_fallback.is_some();
    b.mode = match (bios, uefi) {
        (true, true) => "bios+uefi",
        (true, false) => "bios",
        (false, true) => "uefi",
        (false, false) => "unknown",
    }
    .into();
    b
}

fn bios(
    disk: &Window,
    table: &PartitionTable,
    b: &mut BootInfo,
    problems: &mut Vec<String>,
) -> bool {
    let Ok(mbr) = disk.read_vec(0, 512) else {
        return false;
    };
    if mbr.get(510..512) != Some(&[0x55, 0xAA][..]) {
        return false;
    }
    let code = mbr.get(..MBR_CODE).unwrap_or_default();
    if code.iter().all(|&x| x == 0) {
        return false;
    }
    let is_grub = code.windows(5).any(|w| w == b"GRUB ");
    if !is_grub {
        b.bios_loader = Some("other".into());
        return table.scheme == "mbr";
    }
    b.bios_loader = Some("grub".into());
    let Some(lba) = super::le_u64(&mbr, GRUB_KERNEL_SECTOR) else {
        return false;
    };
    b.grub_core_lba = Some(lba);
    let core = lba
        .checked_mul(512)
        .and_then(|o| disk.read_vec(o, 512).ok());
    let found = core.is_some_and(|c| c.len() == 512 && c.windows(7).any(|w| w == b"loading"));
    if !found {
        problems.push(format!(
            "the MBR holds GRUB boot code but sector {lba}, where it loads GRUB's core image from, does not hold one"
        ));
        return false;
    }
    if table.scheme == "gpt" {
        let in_bios_boot = lba.checked_mul(512).is_some_and(|o| {
            table.partitions.iter().any(|p| {
                p.type_name == "bios-boot" && o >= p.start && o < p.start.saturating_add(p.size)
            })
        });
        if !in_bios_boot {
            problems.push(format!(
                "GRUB's core image at sector {lba} lies outside a BIOS boot partition on a GPT disk"
            ));
        }
    }
    true
}

/// Architecture of a PE image from its COFF header (PE/COFF spec, "Machine Types").
pub fn pe_arch(head: &[u8]) -> Option<&'static str> {
    if head.get(..2) != Some(b"MZ") {
        return None;
    }
    let pe = usize::try_from(super::le_u32(head, 0x3c)?).ok()?;
    if head.get(pe..pe.checked_add(4)?) != Some(b"PE\0\0") {
        return None;
    }
    Some(match super::le_u16(head, pe.checked_add(4)?)? {
        0x8664 => "x86_64",
        0xaa64 => "aarch64",
        0x014c => "i386",
        0x01c4 => "arm",
        0x5064 => "riscv64",
        _ => "unknown",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pe_machine_types() {
        let mut h = vec![0u8; 512];
        h[..2].copy_from_slice(b"MZ");
        h[0x3c] = 0x80;
        h[0x80..0x84].copy_from_slice(b"PE\0\0");
        h[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
        assert_eq!(pe_arch(&h), Some("x86_64"));
        h[0x3c] = 0xff;
        h[0x3d] = 0xff;
        assert_eq!(pe_arch(&h), None);
        assert_eq!(pe_arch(b"MZ"), None);
    }
}
