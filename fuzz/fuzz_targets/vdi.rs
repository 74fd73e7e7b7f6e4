//! Fuzz target: the vdi reader (probe, open with a deny-all gate, map, bounded reads, check).
#![no_main]

use imgshift_converters::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imgshift_fuzz::run(Format::Vdi, data));
