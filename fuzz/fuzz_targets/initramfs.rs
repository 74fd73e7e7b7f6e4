//! Fuzz target: the initramfs lister (`src/guest/initramfs.rs`: concatenated newc cpio archives, each plain or
//! gzip/zstd/xz/lz4 compressed, zero padding between them) on plain bytes. The limits are the inspection's
//! except the decompressed total (16 MiB instead of 1 GiB), so a decompression bomb ends within the fuzzer's
//! timeout; the code path that enforces it is the same.
#![no_main]

use imgshift_fuzz::guest::initramfs::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        decompressed: 16 << 20,
        ..Limits::default()
    };
    let l = initramfs::list(data, &limits);
    if let Some(text) = &l.builtin {
        let _ = initramfs::builtin_drivers(text);
    }
});
