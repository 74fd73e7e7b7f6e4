//! Hyper-V generation for `--hyper-v-generation auto`: V2 (UEFI) when the disk has a GPT (UEFI spec 2.10 §5.3)
//! holding an EFI system partition, else V1 (BIOS). The guest's boot mode is what decides, and an ESP is what
//! UEFI firmware boots from; a BIOS-booting GPT disk has a BIOS boot partition instead. Every field read is
//! bounded: the header is untrusted.

use imgshift_converters::DiskSource;

/// GPT header signature at LBA 1.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// EFI system partition type GUID C12A7328-F81F-11D2-BA4B-00A0C93EC93B, in on-disk (mixed-endian) order.
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
];
/// Most partition entries looked at (the spec's minimum array holds 128).
const MAX_ENTRIES: u32 = 1024;
/// Largest entry size accepted (the spec says 128 × 2^n).
const MAX_ENTRY_SIZE: u32 = 1024;
/// Sector size assumed (512-byte logical sectors; 4Kn disks are not looked at).
const SECTOR: u64 = 512;

/// The generation chosen, and why.
pub fn detect(src: &dyn DiskSource) -> (&'static str, &'static str) {
    match has_esp(src) {
        Some(true) => (
            "V2",
            "the disk has a GPT with an EFI system partition (UEFI boot)",
        ),
        Some(false) => ("V1", "the disk has a GPT but no EFI system partition"),
        None => ("V1", "the disk has no GPT (BIOS boot)"),
    }
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `Some(true)` with an ESP, `Some(false)` with a GPT and no ESP, `None` without a readable GPT.
fn has_esp(src: &dyn DiskSource) -> Option<bool> {
    let size = src.virtual_size();
    if size < 3 * SECTOR {
        return None;
    }
    let mut hdr = [0u8; 512];
    src.read_at(&mut hdr, SECTOR).ok()?;
    if hdr.get(..8)? != GPT_SIGNATURE {
        return None;
    }
    let entries_lba = le_u64(&hdr, 72)?;
    let count = le_u32(&hdr, 80)?.min(MAX_ENTRIES);
    let esize = le_u32(&hdr, 84)?;
    if !(128..=MAX_ENTRY_SIZE).contains(&esize) || !esize.is_multiple_of(8) {
        return None;
    }
    let start = entries_lba.checked_mul(SECTOR)?;
    let len = u64::from(count).checked_mul(u64::from(esize))?;
    if start.checked_add(len)? > size {
        return None;
    }
    let mut table = vec![0u8; usize::try_from(len).ok()?];
    src.read_at(&mut table, start).ok()?;
    Some(
        table
            .chunks_exact(esize as usize)
            .any(|e| e.get(..16) == Some(&ESP_TYPE[..])),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(gpt: bool, esp: bool) -> Box<dyn DiskSource> {
        let mut raw = vec![0u8; 1 << 20];
        if gpt {
            raw[512..520].copy_from_slice(GPT_SIGNATURE);
            raw[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
            raw[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
            raw[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
            if esp {
                let e = 1024 + 128; // second entry
                raw[e..e + 16].copy_from_slice(&ESP_TYPE);
            }
        }
        let st = std::sync::Arc::new(imgshift_converters::MemStorage::new(raw, "mem"));
        imgshift_converters::open(
            st,
            Some(imgshift_converters::Format::Raw),
            &imgshift_converters::OpenGate::new(),
        )
        .unwrap()
    }

    #[test]
    fn generations() {
        assert_eq!(detect(disk(true, true).as_ref()).0, "V2");
        assert_eq!(detect(disk(true, false).as_ref()).0, "V1");
        assert_eq!(detect(disk(false, false).as_ref()).0, "V1");
    }

    #[test]
    fn hostile_headers_are_ignored() {
        let mut raw = vec![0u8; 4096];
        raw[512..520].copy_from_slice(GPT_SIGNATURE);
        raw[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        raw[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        raw[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let st = std::sync::Arc::new(imgshift_converters::MemStorage::new(raw, "mem"));
        let d = imgshift_converters::open(
            st,
            Some(imgshift_converters::Format::Raw),
            &imgshift_converters::OpenGate::new(),
        )
        .unwrap();
        assert_eq!(detect(d.as_ref()).0, "V1");
    }
}
