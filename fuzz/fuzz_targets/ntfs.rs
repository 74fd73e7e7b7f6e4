//! Fuzz target: an NTFS volume as Windows inspection reads it (`src/guest/windows.rs` over the `ntfs` crate:
//! `\Windows\System32\ntoskrnl.exe`, the SOFTWARE and SYSTEM hives read into the registry reader, the drivers
//! folder, `\bootmgr` and `\Boot\BCD`), given in the sparse encoding (`imgshift_fuzz::guest_input`).
#![no_main]

use imgshift_fuzz::guest::{fs, windows};
use imgshift_fuzz::guest_input::{contain_crate_panics, sparse_window};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    contain_crate_panics();
    let Some(w) = sparse_window(data) else {
        return;
    };
    let _ = fs::probe(&w);
    let mut problems = Vec::new();
    let _ = windows::detect(&w, "/dev/sda1", &mut problems);
    let _ = windows::bootmgr(&w);
});
