//! Partition tables: MBR (primary entries via `mbrman`, logical partitions by a bounded EBR walk) and GPT (via
//! `gpt`, after checking the header fields that crate would trust).

use serde::Serialize;

use super::{WindowOf, le_u32, le_u64};

/// Most logical partitions followed in an extended partition, and most GPT entries accepted.
const MAX_LOGICAL: usize = 128;
const MAX_GPT_ENTRIES: u32 = 1024;
const SECTOR: u64 = 512;

/// One partition.
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// 1-based number, as Linux names it (sda1; logical partitions start at 5).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// `mbr:0x83` or the GPT type GUID.
    pub type_id: String,
    /// Readable type ("linux", "efi-system", "bios-boot", ...).
    pub type_name: String,
    /// MBR active flag.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
    /// GPT partition name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT unique partition GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// The disk's partitioning.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PartitionTable {
    /// "mbr", "gpt" or "none".
    pub scheme: String,
    /// Partitions that lie inside the disk.
    pub partitions: Vec<Partition>,
    /// The MBR holds boot code (its first 440 bytes are not all zero).
    pub mbr_boot_code: bool,
    /// Problems found (entries past the disk end, bad headers); each one names what is wrong.
    pub problems: Vec<String>,
}

impl PartitionTable {
    /// A GPT holding an EFI system partition: what UEFI firmware boots from (and what Azure's Hyper-V
    /// generation 2 needs).
    pub fn gpt_with_esp(&self) -> bool {
        self.scheme == "gpt" && self.partitions.iter().any(|p| p.type_name == "efi-system")
    }
}

/// The partition table of a disk the caller holds only by reference.
pub fn read_source(src: &dyn imgshift_converters::DiskSource) -> PartitionTable {
    read(&WindowOf::borrowed(
        src,
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    ))
}

/// Reads the partition table of `disk`.
pub fn read(disk: &WindowOf<'_>) -> PartitionTable {
    let mut t = PartitionTable {
        scheme: "none".into(),
        ..Default::default()
    };
    let Ok(mbr) = disk.read_vec(0, SECTOR as usize) else {
        t.problems.push("disk is smaller than one sector".into());
        return t;
    };
    if mbr.get(510..512) != Some(&[0x55, 0xAA][..]) {
        return t;
    }
    t.mbr_boot_code = mbr.iter().take(440).any(|&b| b != 0);
    let mut r = disk.clone();
    let header = match mbrman::MBRHeader::read_from(&mut r) {
        Ok(h) => h,
        Err(e) => {
            t.problems.push(format!("MBR is invalid: {e}"));
            return t;
        }
    };
    let protective = header.iter().any(|(_, p)| p.sys == 0xEE);
    if protective {
        t.scheme = "gpt".into();
        read_gpt(disk, &mut t);
        return t;
    }
    t.scheme = "mbr".into();
    let size = disk.len();
    for (i, p) in header.iter() {
        if !p.is_used() {
            continue;
        }
        let number = u32::try_from(i).unwrap_or(0);
        let start = u64::from(p.starting_lba) * SECTOR;
        let len = u64::from(p.sectors) * SECTOR;
        if p.is_extended() {
            walk_ebr(disk, u64::from(p.starting_lba), &mut t);
            continue;
        }
        push_checked(&mut t, size, number, start, len, p.sys, p.boot == 0x80);
    }
    t
}

fn push_checked(
    t: &mut PartitionTable,
    size: u64,
    number: u32,
    start: u64,
    len: u64,
    sys: u8,
    boot: bool,
) {
    if start.checked_add(len).is_none_or(|end| end > size) || len == 0 {
        t.problems.push(format!(
            "partition {number} ({start}+{len} bytes) lies outside the {size} byte disk"
        ));
        return;
    }
    t.partitions.push(Partition {
        number,
        start,
        size: len,
        type_id: format!("mbr:0x{sys:02x}"),
        type_name: mbr_type_name(sys).into(),
        bootable: boot,
        name: None,
        partuuid: None,
    });
}

/// MBR partition types that link to the next extended boot record (DOS, Windows LBA, Linux extended).
fn is_extended_type(sys: u8) -> bool {
    matches!(sys, 0x05 | 0x0F | 0x85)
}

/// Walks the chain of extended boot records as Linux does (block/partitions/msdos.c `parse_extended`): in each
/// EBR, every non-empty entry that is not a link is a logical partition, numbered from 5 in the order found
/// (empty EBRs take no number); the first link entry, relative to the extended partition's start, leads to the
/// next EBR. Links need not go forward (fdisk appends a partition made in an earlier gap at the chain's end): a
/// revisited EBR ends the walk, and at most `MAX_LOGICAL` EBRs are read.
fn walk_ebr(disk: &WindowOf<'_>, ext_lba: u64, t: &mut PartitionTable) {
    let size = disk.len();
    let mut rel = 0u64;
    let mut visited = std::collections::HashSet::new();
    let mut number = 5u32;
    for n in 0..MAX_LOGICAL {
        if !visited.insert(rel) {
            t.problems
                .push("extended partition chain loops back".into());
            return;
        }
        let Some(off) = ext_lba.checked_add(rel).and_then(|l| l.checked_mul(SECTOR)) else {
            t.problems.push("extended partition chain overflows".into());
            return;
        };
        let Ok(ebr) = disk.read_vec(off, SECTOR as usize) else {
            t.problems.push(format!(
                "extended boot record at byte {off} lies outside the disk"
            ));
            return;
        };
        if ebr.len() < 512 || ebr.get(510..512) != Some(&[0x55, 0xAA][..]) {
            if n > 0 {
                t.problems.push(format!(
                    "extended boot record at byte {off} has no signature"
                ));
            }
            return;
        }
        let entry = |k: usize| {
            let b = 446 + 16 * k;
            (
                ebr.get(b + 4).copied().unwrap_or(0),
                le_u32(&ebr, b + 8).unwrap_or(0),
                le_u32(&ebr, b + 12).unwrap_or(0),
            )
        };
        let mut next = None;
        for k in 0..4 {
            let (sys, lba, secs) = entry(k);
            if sys == 0 || secs == 0 {
                continue;
            }
            if is_extended_type(sys) {
                next = next.or(Some(u64::from(lba)));
                continue;
            }
            // Data entries are relative to this EBR.
            let start = ext_lba
                .saturating_add(rel)
                .saturating_add(u64::from(lba))
                .saturating_mul(SECTOR);
            push_checked(t, size, number, start, u64::from(secs) * SECTOR, sys, false);
            number = number.saturating_add(1);
        }
        match next {
            Some(l) => rel = l,
            None => return,
        }
    }
    t.problems.push(format!(
        "more than {MAX_LOGICAL} logical partitions; the rest were not read"
    ));
}

/// Checks a GPT header's entry fields before the `gpt` crate sees them: it asserts an entry size of 128 and
/// would read any number of entries. `Ok(None)`: no header there; `Ok(Some(backup_lba))`: a sane header.
fn gpt_header_sane(disk: &WindowOf<'_>, lba: u64) -> Result<Option<u64>, String> {
    let Some(off) = lba.checked_mul(SECTOR) else {
        return Ok(None);
    };
    let Ok(h) = disk.read_vec(off, 92) else {
        return Ok(None);
    };
    if h.get(0..8) != Some(&b"EFI PART"[..]) {
        return Ok(None);
    }
    let entries = le_u32(&h, 80).unwrap_or(0);
    let entry_size = le_u32(&h, 84).unwrap_or(0);
    let start = le_u64(&h, 72).unwrap_or(0);
    if entry_size != 128 {
        return Err(format!(
            "GPT header at LBA {lba} declares {entry_size} byte entries (only 128 is valid)"
        ));
    }
    if entries > MAX_GPT_ENTRIES {
        return Err(format!(
            "GPT header at LBA {lba} declares {entries} entries (at most {MAX_GPT_ENTRIES} accepted)"
        ));
    }
    let table_end = start
        .checked_mul(SECTOR)
        .and_then(|s| s.checked_add(u64::from(entries) * 128));
    if table_end.is_none_or(|e| e > disk.len()) {
        return Err(format!(
            "GPT header at LBA {lba} puts its partition entries outside the disk"
        ));
    }
    Ok(Some(le_u64(&h, 32).unwrap_or(0)))
}

fn read_gpt(disk: &WindowOf<'_>, t: &mut PartitionTable) {
    let last = (disk.len() / SECTOR).saturating_sub(1);
    let mut any = false;
    // The gpt crate reads the primary header, then the backup it names (or the last sector when the primary is
    // damaged): every header it may read is checked first.
    let mut lbas = vec![1, last];
    let mut i = 0;
    while let Some(&lba) = lbas.get(i) {
        i += 1;
        match gpt_header_sane(disk, lba) {
            Ok(Some(backup)) => {
                any = true;
                if !lbas.contains(&backup) && lbas.len() < 3 {
                    lbas.push(backup);
                }
            }
            Ok(None) => {}
            Err(e) => {
                t.problems.push(e);
                return;
            }
        }
    }
    if !any {
        t.problems.push("protective MBR but no GPT header".into());
        return;
    }
    let opened = super::no_panic(|| {
        gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .open_from_device(disk.clone())
    });
    let gd = match opened {
        Some(Ok(g)) => g,
        Some(Err(e)) => {
            t.problems.push(format!("GPT is invalid: {e}"));
            return;
        }
        None => {
            t.problems
                .push("GPT could not be parsed (the gpt crate panicked on it)".into());
            return;
        }
    };
    if gd.primary_header().is_err() {
        t.problems
            .push("primary GPT header is damaged (the backup was used)".into());
    } else if gd.backup_header().is_err() {
        t.problems
            .push("backup GPT header is damaged or missing".into());
    }
    let size = disk.len();
    for (&n, p) in gd.partitions() {
        let start = p.first_lba.checked_mul(SECTOR);
        let end = p
            .last_lba
            .checked_add(1)
            .and_then(|l| l.checked_mul(SECTOR));
        let (Some(start), Some(end)) = (start, end) else {
            t.problems
                .push(format!("partition {n} has out-of-range bounds"));
            continue;
        };
        if end <= start || end > size {
            t.problems.push(format!(
                "partition {n} ({start}..{end}) lies outside the {size} byte disk"
            ));
            continue;
        }
        let guid = p.part_type_guid.guid.to_string().to_uppercase();
        t.partitions.push(Partition {
            number: n,
            start,
            size: end.saturating_sub(start),
            type_name: gpt_type_name(&guid).into(),
            type_id: guid,
            bootable: false,
            name: Some(p.name.clone()).filter(|s| !s.is_empty()),
            partuuid: Some(p.part_guid.to_string()),
        });
    }
}

fn mbr_type_name(sys: u8) -> &'static str {
    match sys {
        0x83 => "linux",
        0x82 => "linux-swap",
        0x8e => "linux-lvm",
        0xfd => "linux-raid",
        0xef => "efi-system",
        0x07 => "ntfs-exfat",
        0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e => "fat",
        0x27 => "windows-recovery",
        0x42 => "windows-ldm",
        _ => "other",
    }
}

/// Known GPT partition types (UUID spelling, upper case).
const GPT_TYPES: &[(&str, &str)] = &[
    ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "efi-system"),
    ("21686148-6449-6E6F-744E-656564454649", "bios-boot"),
    ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "linux"),
    ("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "linux-root-x86-64"),
    (
        "BC13C2FF-59E6-4262-A352-B275FD6F7172",
        "linux-extended-boot",
    ),
    ("E6D6D379-F507-44C2-A23C-238F2A3DF928", "linux-lvm"),
    ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "linux-swap"),
    ("A19D880F-05FC-4D3B-A006-743F0F84911E", "linux-raid"),
    (
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "microsoft-basic-data",
    ),
    ("E3C9E316-0B5C-4DB8-817D-F92DF00215AE", "microsoft-reserved"),
    // Windows dynamic disks (Logical Disk Manager).
    (
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3",
        "windows-ldm-metadata",
    ),
    ("AF9B60A0-1431-4F62-BC68-3311714A69AD", "windows-ldm-data"),
    ("DE94BBA4-06D1-4D40-A16A-BFD50179D6AC", "windows-recovery"),
];

fn gpt_type_name(guid: &str) -> &'static str {
    GPT_TYPES
        .iter()
        .find(|(g, _)| *g == guid)
        .map_or("other", |(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::mem_window;

    fn entry(disk: &mut [u8], sector: usize, slot: usize, sys: u8, lba: u32, secs: u32) {
        let b = sector * 512 + 446 + 16 * slot;
        disk[b + 4] = sys;
        disk[b + 8..b + 12].copy_from_slice(&lba.to_le_bytes());
        disk[b + 12..b + 16].copy_from_slice(&secs.to_le_bytes());
        disk[sector * 512 + 510] = 0x55;
        disk[sector * 512 + 511] = 0xAA;
    }

    #[test]
    fn mbr_partition_past_the_disk_is_named() {
        let mut d = vec![0u8; 1 << 20];
        entry(&mut d, 0, 0, 0x83, 2048, 1_000_000);
        entry(&mut d, 0, 1, 0x83, 100, 100);
        let t = read(&mem_window(d));
        assert_eq!(t.scheme, "mbr");
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(t.partitions[0].number, 2);
        assert_eq!(
            t.problems,
            ["partition 1 (1048576+512000000 bytes) lies outside the 1048576 byte disk"]
        );
    }

    #[test]
    fn ebr_chain_loop_and_length_are_bounded() {
        // Extended partition at LBA 100; its EBR points to itself.
        let mut d = vec![0u8; 1 << 20];
        entry(&mut d, 0, 0, 0x05, 100, 1000);
        entry(&mut d, 100, 0, 0x83, 10, 10);
        entry(&mut d, 100, 1, 0x05, 0, 10);
        let t = read(&mem_window(d));
        assert_eq!(t.partitions.len(), 1);
        assert!(
            t.problems.iter().all(|p| p.contains("loops back")),
            "{:?}",
            t.problems
        );
        // A chain of 200 EBRs, each pointing to the next: stops at MAX_LOGICAL.
        let mut d = vec![0u8; 4 << 20];
        entry(&mut d, 0, 0, 0x05, 100, 6000);
        for k in 0..200u32 {
            let s = 100 + 20 * k as usize;
            entry(&mut d, s, 0, 0x83, 1, 1);
            entry(&mut d, s, 1, 0x05, 20 * (k + 1), 20);
        }
        let t = read(&mem_window(d));
        assert_eq!(t.partitions.len(), MAX_LOGICAL);
        assert!(
            t.problems
                .iter()
                .any(|p| p.contains("more than 128 logical partitions"))
        );
    }

    #[test]
    fn ebr_chain_out_of_disk_order_is_followed_and_numbered_like_linux() {
        // Extended partition at LBA 100. Chain: rel 0 -> rel 400 -> rel 600 (an EBR with only a link, no data:
        // it takes no number) -> rel 200, as fdisk leaves it after a partition is made in an earlier gap.
        let mut d = vec![0u8; 1 << 20];
        entry(&mut d, 0, 0, 0x05, 100, 1000);
        entry(&mut d, 100, 0, 0x83, 2, 50);
        entry(&mut d, 100, 1, 0x05, 400, 100);
        entry(&mut d, 500, 0, 0x82, 2, 60);
        entry(&mut d, 500, 1, 0x05, 600, 100);
        entry(&mut d, 700, 1, 0x0F, 200, 100);
        entry(&mut d, 300, 0, 0x83, 2, 70);
        let t = read(&mem_window(d));
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let got: Vec<(u32, u64, u64)> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512))
            .collect();
        assert_eq!(got, [(5, 102, 50), (6, 502, 60), (7, 302, 70)]);
    }

    #[test]
    fn rejects_gpt_backup_header_the_crate_would_assert_on() {
        let mut d = vec![0u8; 1 << 20];
        entry(&mut d, 0, 0, 0xEE, 1, 2047);
        let sectors = (d.len() / 512) as u64;
        for (lba, entry_size) in [(1u64, 128u32), (sectors - 1, 256)] {
            let h = lba as usize * 512;
            d[h..h + 8].copy_from_slice(b"EFI PART");
            d[h + 32..h + 40].copy_from_slice(&(sectors - 1).to_le_bytes());
            d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
            d[h + 80..h + 84].copy_from_slice(&4u32.to_le_bytes());
            d[h + 84..h + 88].copy_from_slice(&entry_size.to_le_bytes());
        }
        let t = read(&mem_window(d));
        assert_eq!(t.scheme, "gpt");
        assert_eq!(
            t.problems,
            ["GPT header at LBA 2047 declares 256 byte entries (only 128 is valid)"]
        );
    }
}
