//! Fuzz target: the partition-table reader (`src/guest/partitions.rs`: MBR primaries, the bounded EBR walk of
//! extended chains, GPT after the header checks) and the filesystem magic probe of every partition it finds, on
//! a whole disk given in the sparse encoding (`imgshift_fuzz::guest_input`), as inspection does.
#![no_main]

use imgshift_fuzz::guest::{fs, partitions};
use imgshift_fuzz::guest_input::{contain_crate_panics, sparse_window};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    contain_crate_panics();
    let Some(disk) = sparse_window(data) else {
        return;
    };
    let table = partitions::read(&disk);
    let _ = table.gpt_with_esp();
    for p in &table.partitions {
        if let Some(w) = disk.sub(p.start, p.size) {
            let _ = fs::probe(&w);
        }
    }
});
