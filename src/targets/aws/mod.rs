//! AWS target: stream a disk into an EBS snapshot through the EBS direct APIs (no S3 staging, no VM Import),
//! register an AMI with EC2, and read snapshots back.
//!
//! EBS direct API facts used here (EBS API reference, "PutSnapshotBlock", "StartSnapshot"): blocks are exactly
//! 512 KiB and addressed by index; each carries a base64 SHA-256; a volume is at most 64 TiB (65536 GiB); a
//! snapshot that receives no block and is not completed within its timeout is cancelled.

pub mod after;
pub mod config;
pub mod download;
pub mod images;
pub mod launch_template;
pub mod lifecycle;
pub mod register;
pub mod replica;
pub mod retry;
pub mod source;
pub mod upload;

/// EBS direct API block size: fixed by the API, never taken from a server's reply (moto says 512 bytes).
pub const EBS_BLOCK_SIZE: u64 = 512 * 1024;

/// Largest EBS volume/snapshot in GiB (StartSnapshot `VolumeSize`).
pub const EBS_MAX_VOLUME_GIB: u64 = 65536;

/// Volume size in GiB for a disk of `bytes` (rounded up, at least 1).
pub fn volume_gib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30).max(1)
}

/// base64(SHA-256(data)), the checksum PutSnapshotBlock expects.
pub fn block_checksum(data: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        // sha256 of "", of 512 KiB of zeros and of "abc", base64 (values from Python hashlib).
        assert_eq!(
            block_checksum(b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            block_checksum(&vec![0u8; 512 * 1024]),
            "B4VNL+8pega6gWheZgwzLeNtXRjVRpJ9MNqtbX/aFUE="
        );
        assert_eq!(
            block_checksum(b"abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn volume_sizes_round_up() {
        assert_eq!(volume_gib(0), 1);
        assert_eq!(volume_gib(1), 1);
        assert_eq!(volume_gib(1 << 30), 1);
        assert_eq!(volume_gib((1 << 30) + 1), 2);
    }
}
