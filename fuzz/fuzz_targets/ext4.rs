//! Fuzz target: an ext2/3/4 filesystem as Linux inspection reads it (`src/guest/os.rs` over the `ext4-view`
//! crate: os-release, fstab, hostname, kernels and their initramfs, modules, agents), the filesystem given in the
//! sparse encoding (`imgshift_fuzz::guest_input`). The magic probe runs first, and the filesystem opens through
//! `fs::open_ext4` (superblock checks, then the crate), as in inspection.
#![no_main]

use imgshift_fuzz::guest::{fs, os};
use imgshift_fuzz::guest_input::{contain_crate_panics, no_panic, sparse_window};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    contain_crate_panics();
    let Some(w) = sparse_window(data) else {
        return;
    };
    let _ = fs::probe(&w);
    let Ok(e) = fs::open_ext4(&w) else {
        return;
    };
    // Inspection runs it under guest::no_panic (report.rs).
    let _ = no_panic(|| os::inspect(&e, None));
});
