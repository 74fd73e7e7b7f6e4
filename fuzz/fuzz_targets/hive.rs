//! Fuzz target: imgshift's registry hive reader (src/guest/hive.rs, compiled in here as a module), driven the
//! way Windows inspection drives it: open, walk to the keys inspection reads, list a key's subkeys and read
//! their values. The reader's own cell budget bounds each input.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/guest/hive.rs"]
#[allow(dead_code)]
mod hive;

/// The field readers hive.rs takes from its parent module (`src/guest/mod.rs`), the same code.
pub(crate) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fuzz_target!(|data: &[u8]| {
    let Ok(h) = hive::Hive::new(data.to_vec()) else {
        return;
    };
    for path in [
        "Microsoft\\Windows NT\\CurrentVersion",
        "Select",
        "ControlSet001\\Services",
        "Setup",
    ] {
        if let Ok(Some(k)) = h.key(path) {
            let _ = k.name();
            for v in ["ProductName", "Current", "Start", "CurrentMajorVersionNumber"] {
                if let Ok(Some(val)) = k.value(v) {
                    let _ = val.string();
                    let _ = val.dword();
                }
            }
            if let Ok(subs) = k.subkeys() {
                for s in subs.into_iter().take(64) {
                    let _ = s.name();
                    let _ = s.value("Start");
                    let _ = s.value("ImagePath");
                }
            }
        }
    }
    let _ = h.root().subkeys();
});
