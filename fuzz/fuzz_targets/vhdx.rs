//! Fuzz target: the vhdx reader (probe, open with a deny-all gate, map, bounded reads, check), fed through the
//! sparse input encoding (`imgshift_fuzz::run_sparse`): a VHDX is at least 3 MiB, mostly zeros.
#![no_main]

use imgshift_converters::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imgshift_fuzz::run_sparse(Format::Vhdx, data));
