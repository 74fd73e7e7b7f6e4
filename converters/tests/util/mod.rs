//! Helpers for the library's integration tests: qemu-img as the oracle, images generated at test time.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use imgshift_converters::{
    ConvertOptions, Format, NoProgress, OpenGate, OutputSet, WriterOptions, convert, create_writer,
    open_path,
};

/// Runs qemu-img with `args`; panics with its stderr (and how to install it) on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils` (the tests' format oracle)")
    });
    if !out.status.success() {
        panic!(
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-img and returns (exit code, stdout+stderr) without judging it.
pub fn qemu_img_status(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils`")
        });
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

/// A fresh temporary folder.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgshift-test")
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

/// Writes a sparse raw file of `size` bytes with deterministic pseudo-random data in `(offset, len)` ranges,
/// explicit zero bytes in `zeros` ranges (allocated but zero), holes elsewhere.
pub fn make_raw(path: &Path, size: u64, data: &[(u64, u64)], zeros: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    for &(off, len) in data {
        let mut buf = vec![0u8; len as usize];
        for chunk in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let b = seed.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        f.write_all_at(&buf, off).unwrap();
    }
    for &(off, len) in zeros {
        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
    }
}

/// Converts `src` to `dst` in `fmt` with imgshift's library, as the CLI does (atomic output).
pub fn imgshift_convert(src: &Path, src_fmt: Option<Format>, dst: &Path, fmt: Format, opts: &str) {
    let source = open_path(src, src_fmt, &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut writer = create_writer(fmt, &mut o).unwrap();
    let (set, mut sink) = OutputSet::new(dst).unwrap();
    convert(
        source.as_ref(),
        writer.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
    set.commit().unwrap();
}

/// Asserts `qemu-img compare` says the two images hold the same content.
pub fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (code, out) = qemu_img_status(&[
        "compare",
        "-f",
        fa,
        "-F",
        fb,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}");
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_check_clean(img: &Path, fmt: &str) {
    let (code, out) = qemu_img_status(&["check", "-f", fmt, img.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {img:?}: {out}");
}

/// Path helper.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
