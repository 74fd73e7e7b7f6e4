//! Hyper-V generation for `--hyper-v-generation auto`: V2 (UEFI) when the disk has a GPT holding an EFI system
//! partition, else V1 (BIOS). The guest's boot mode is what decides, and an ESP is what UEFI firmware boots
//! from; a BIOS-booting GPT disk has a BIOS boot partition instead. The partition table is the guest
//! inspection's fact (`crate::guest::partitions`): this module reads no disk structure itself.

use imgshift_converters::DiskSource;

use crate::guest::partitions::{self, PartitionTable};

/// The generation a disk with partition table `table` needs, and why.
pub fn generation(table: &PartitionTable) -> (&'static str, &'static str) {
    if table.gpt_with_esp() {
        (
            "V2",
            "the disk has a GPT with an EFI system partition (UEFI boot)",
        )
    } else if table.scheme == "gpt" {
        ("V1", "the disk has a GPT but no EFI system partition")
    } else {
        ("V1", "the disk has no GPT (BIOS boot)")
    }
}

/// The generation `src` needs, from its partition table as guest inspection reads it.
pub fn detect(src: &dyn DiskSource) -> (&'static str, &'static str) {
    generation(&partitions::read_source(src))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::partitions::Partition;

    fn table(scheme: &str, types: &[&str]) -> PartitionTable {
        PartitionTable {
            scheme: scheme.into(),
            partitions: types
                .iter()
                .enumerate()
                .map(|(i, t)| Partition {
                    number: i as u32 + 1,
                    start: (i as u64 + 1) << 20,
                    size: 1 << 20,
                    type_id: String::new(),
                    type_name: (*t).into(),
                    bootable: false,
                    name: None,
                    partuuid: None,
                })
                .collect(),
            ..PartitionTable::default()
        }
    }

    #[test]
    fn generations() {
        assert_eq!(
            generation(&table("gpt", &["bios-boot", "efi-system", "linux"])).0,
            "V2"
        );
        assert_eq!(generation(&table("gpt", &["bios-boot", "linux"])).0, "V1");
        // An MBR partition of type 0xef is named efi-system too, but only a GPT makes generation 2.
        assert_eq!(generation(&table("mbr", &["efi-system", "linux"])).0, "V1");
        assert_eq!(generation(&table("none", &[])).0, "V1");
    }

    fn raw_disk(raw: Vec<u8>) -> Box<dyn DiskSource> {
        let st = std::sync::Arc::new(imgshift_converters::MemStorage::new(raw, "mem"));
        imgshift_converters::open(
            st,
            Some(imgshift_converters::Format::Raw),
            &imgshift_converters::OpenGate::new(),
        )
        .unwrap()
    }

    #[test]
    fn a_disk_without_a_partition_table_or_with_a_hostile_gpt_header_is_v1() {
        assert_eq!(detect(raw_disk(vec![0u8; 1 << 20]).as_ref()).0, "V1");
        // A protective MBR and a GPT header claiming 2^32-1 entries far outside the disk.
        let mut raw = vec![0u8; 4096];
        raw[446 + 4] = 0xEE;
        raw[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        raw[446 + 12..446 + 16].copy_from_slice(&7u32.to_le_bytes());
        raw[510..512].copy_from_slice(&[0x55, 0xAA]);
        raw[512..520].copy_from_slice(b"EFI PART");
        raw[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        raw[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        raw[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let (g, why) = detect(raw_disk(raw).as_ref());
        assert_eq!(g, "V1", "{why}");
    }
}
