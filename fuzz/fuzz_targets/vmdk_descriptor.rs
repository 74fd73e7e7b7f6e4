//! Fuzz target: the VMDK text descriptor parser on its own (the `vmdk` target reaches it only behind a
//! sparse header or as a whole file; this one spends every execution in the parser).
#![no_main]

use imgshift_converters::formats::vmdk::descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = descriptor::parse(data);
});
