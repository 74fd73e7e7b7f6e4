//! Azure target: stream a disk into a managed disk created for upload, then make an image (or a gallery image
//! version) of it — no VHD file on disk, no azcopy.
//!
//! Facts used here (Azure docs, "Upload a VHD to Azure or copy a managed disk to another region - Azure CLI",
//! "Put Page" in the Blob service REST reference, and the Microsoft.Compute REST reference for disks, images and
//! gallery image versions):
//! - an upload disk is created with `creationData.createOption = Upload` and `uploadSizeBytes` = the size of a
//!   *fixed* VHD: a whole number of MiB of data plus the 512-byte footer, at least 20 MiB + 512 and at most
//!   32 TiB + 512;
//! - `beginGetAccess` (access `Write`) hands out a SAS for the disk's page blob; `endGetAccess` revokes it, and
//!   the disk cannot be used before that;
//! - Put Page writes at most 4 MiB per request, 512-byte aligned, inside the blob.

pub mod arm;
pub mod credential;
pub mod http;
pub mod hyperv;
pub mod lifecycle;
pub mod lro;
pub mod pages;
pub mod readback;
pub mod redact;
pub mod retry;
pub mod source;
pub mod upload;
pub mod vhd;

/// Bytes in a MiB: fixed VHDs for Azure hold a whole number of MiB before the footer.
pub const MIB: u64 = 1 << 20;
/// The VHD footer that ends the page blob.
pub const FOOTER: u64 = 512;
/// Page blob page size: every Put Page range starts and ends on it.
pub const PAGE: u64 = 512;
/// Largest Put Page body (Blob REST API "Put Page": "the maximum size of a range that can be updated is 4 MiB").
pub const MAX_PUT_PAGE: u64 = 4 * MIB;
/// Smallest upload disk's data part: Azure pads smaller disks up to 20 MiB.
pub const MIN_DISK: u64 = 20 * MIB;
/// Largest upload disk's data part: 32 TiB.
pub const MAX_DISK: u64 = 32 << 40;
/// An OS disk above 2 TiB boots only as generation V2.
pub const GEN1_MAX_OS_DISK: u64 = 2 << 40;

/// The data part of the fixed VHD for a source of `virtual_size` bytes: rounded up to a whole MiB and to at
/// least 20 MiB. `None` when the result is above Azure's 32 TiB.
pub fn disk_data_size(virtual_size: u64) -> Option<u64> {
    let v = virtual_size.checked_next_multiple_of(MIB)?.max(MIN_DISK);
    (v <= MAX_DISK).then_some(v)
}

/// `uploadSizeBytes` for a source of `virtual_size` bytes: the fixed VHD's data part plus its footer.
pub fn upload_size_bytes(virtual_size: u64) -> Option<u64> {
    disk_data_size(virtual_size)?.checked_add(FOOTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_sizes() {
        assert_eq!(upload_size_bytes(0), Some(20 * MIB + 512));
        assert_eq!(upload_size_bytes(1), Some(20 * MIB + 512));
        assert_eq!(upload_size_bytes(20 * MIB), Some(20 * MIB + 512));
        assert_eq!(upload_size_bytes(20 * MIB + 1), Some(21 * MIB + 512));
        assert_eq!(upload_size_bytes(1 << 30), Some((1 << 30) + 512));
        assert_eq!(
            upload_size_bytes((1 << 30) + 512),
            Some((1 << 30) + MIB + 512)
        );
        assert_eq!(upload_size_bytes(MAX_DISK), Some(MAX_DISK + 512));
        assert_eq!(upload_size_bytes(MAX_DISK + 1), None);
        assert_eq!(upload_size_bytes(u64::MAX), None);
    }
}
