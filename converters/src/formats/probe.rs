//! Format probing by magic numbers. Probing is only for the image the user named: files named *inside* an
//! image get their format from the image's header or the user, never from here (CVE-2008-2004).

use crate::error::Result;
use crate::formats::Format;
use crate::storage::Storage;

/// qcow2 magic "QFI\xfb" (qemu docs/interop/qcow2.txt, "Header").
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// VHD footer cookie (VHD spec, "Hard Disk Footer Format").
pub const VHD_COOKIE: &[u8; 8] = b"conectix";
/// VHDX file type identifier (MS-VHDX 2.2.1).
pub const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// VMDK hosted sparse extent magic "KDMV" (VMDK 5.0, "Hosted Sparse Extent Header").
pub const VMDK_SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// VDI image signature at offset 0x40 (VirtualBox VDICore.h `VDI_IMAGE_SIGNATURE`).
pub const VDI_SIGNATURE: u32 = 0xbeda_107f;

/// Guesses the format of `storage` from its magic numbers; anything unrecognised is raw.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut head = [0u8; 1024];
    let n = storage.read_at_zero_fill(&mut head, 0)?;
    let head = &head[..n];
    Ok(probe_bytes(head, || {
        let len = storage.len();
        if len >= 512 {
            let mut foot = [0u8; 8];
            storage.read_exact_at(&mut foot, len - 512).ok()?;
            Some(foot)
        } else {
            None
        }
    }))
}

/// Probes from the first bytes of a file (up to 1 KiB) and, lazily, the first 8 bytes of its last sector.
pub fn probe_bytes(head: &[u8], last_sector: impl FnOnce() -> Option<[u8; 8]>) -> Format {
    if head.starts_with(QCOW2_MAGIC) {
        return Format::Qcow2;
    }
    if head.starts_with(VHDX_SIGNATURE) {
        return Format::Vhdx;
    }
    if head.starts_with(VHD_COOKIE) {
        return Format::Vpc;
    }
    if head.starts_with(VMDK_SPARSE_MAGIC) {
        return Format::Vmdk;
    }
    if head.len() >= 0x44 {
        let sig = u32::from_le_bytes([head[0x40], head[0x41], head[0x42], head[0x43]]);
        if sig == VDI_SIGNATURE {
            return Format::Vdi;
        }
    }
    if is_vmdk_descriptor(head) {
        return Format::Vmdk;
    }
    if is_ova(head) {
        return Format::Ova;
    }
    // A fixed VHD keeps its only footer in the last sector (qemu probes it as raw; we look there too).
    if last_sector().is_some_and(|f| &f == VHD_COOKIE) {
        return Format::Vpc;
    }
    Format::Raw
}

/// A text VMDK descriptor ("# Disk DescriptorFile" header, or a `createType=` line near the start).
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start();
    t.starts_with("# Disk DescriptorFile")
        || (t.starts_with('#') || t.starts_with("version=")) && text.contains("createType=")
}

/// A ustar archive whose first member is an `.ovf` descriptor (OVF 2.0 DSP0243, 5.3: the descriptor comes first).
fn is_ova(head: &[u8]) -> bool {
    if head.len() < 512 || &head[257..262] != b"ustar" {
        return false;
    }
    let name = &head[..100];
    let end = name.iter().position(|&b| b == 0).unwrap_or(100);
    String::from_utf8_lossy(&name[..end])
        .to_ascii_lowercase()
        .ends_with(".ovf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_magics() {
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x03", || None), Format::Qcow2);
        assert_eq!(probe_bytes(b"vhdxfile", || None), Format::Vhdx);
        assert_eq!(probe_bytes(b"conectix", || None), Format::Vpc);
        assert_eq!(probe_bytes(b"KDMV", || None), Format::Vmdk);
        assert_eq!(
            probe_bytes(b"# Disk DescriptorFile\nversion=1\n", || None),
            Format::Vmdk
        );
        assert_eq!(probe_bytes(&[0u8; 512], || Some(*b"conectix")), Format::Vpc);
        assert_eq!(probe_bytes(&[0u8; 512], || None), Format::Raw);
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        assert_eq!(probe_bytes(&vdi, || None), Format::Vdi);
    }
}
