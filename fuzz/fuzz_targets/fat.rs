//! Fuzz target: a FAT filesystem as boot detection reads an EFI system partition (`src/guest/fs.rs`
//! `efi_loaders` over the `fatfs` crate, `src/guest/windows.rs` `esp_bcd`), given in the sparse encoding
//! (`imgshift_fuzz::guest_input`). The magic probe runs first, as in inspection.
#![no_main]

use imgshift_fuzz::guest::{fs, windows};
use imgshift_fuzz::guest_input::sparse_window;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(w) = sparse_window(data) else {
        return;
    };
    let _ = fs::probe(&w);
    if let Ok(loaders) = fs::efi_loaders(&w) {
        for (_, head) in &loaders {
            let _ = imgshift_fuzz::guest::boot::pe_arch(head);
        }
    }
    let _ = windows::esp_bcd(&w);
});
