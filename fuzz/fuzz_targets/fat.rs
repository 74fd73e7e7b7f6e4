//! Fuzz target: a FAT filesystem as boot detection reads an EFI system partition (`src/guest/fs.rs`
//! `efi_loaders` over the `fatfs` crate, `src/guest/windows.rs` `esp_bcd`), given in the sparse encoding
//! (`imgshift_fuzz::guest_input`). The magic probe runs first, as in inspection.
#![no_main]

use imgshift_fuzz::guest::{fs, windows};
use imgshift_fuzz::guest_input::{contain_crate_panics, no_panic, sparse_window};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    contain_crate_panics();
    let Some(w) = sparse_window(data) else {
        return;
    };
    let _ = fs::probe(&w);
    // Inspection runs it under guest::no_panic (boot.rs).
    if let Some(Ok(loaders)) = no_panic(|| fs::efi_loaders(&w)) {
        for (_, head) in &loaders {
            let _ = imgshift_fuzz::guest::boot::pe_arch(head);
        }
    }
    let _ = windows::esp_bcd(&w);
});
