//! The built binary starts anywhere: it links only the C runtime (no libvirt, no OpenSSL, no liblzma…), and
//! the build needs no system library: every `-sys` crate in the dependency tree builds its C from vendored
//! sources with the C compiler (or is pure Rust).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// What `ldd` may list: the vDSO, the loader, libc, libm and libgcc_s (Rust's unwinder).
const ALLOWED_LIBS: &[&str] = &[
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
];

/// `-sys` crates allowed in the normal dependency tree, and why.
const ALLOWED_SYS: &[(&str, &str)] = &[
    ("zstd-sys", "builds the vendored zstd C sources with cc"),
    (
        "lzma-sys",
        "builds the vendored liblzma C sources with cc (xz2's `static` feature)",
    ),
    (
        "aws-lc-sys",
        "builds the vendored AWS-LC sources (rustls' crypto provider)",
    ),
    (
        "linux-raw-sys",
        "pure Rust: Linux syscall numbers and structures",
    ),
];

#[test]
fn binary_links_only_the_c_runtime() {
    let bin = env!("CARGO_BIN_EXE_imgshift");
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd ({e}): it comes with libc-bin"));
    assert!(
        out.status.success(),
        "ldd {bin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let libs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|l| l.rsplit('/').next().unwrap_or(l))
        .collect();
    assert!(libs.contains(&"libc.so.6"), "ldd output: {text}");
    let extra: Vec<&&str> = libs.iter().filter(|l| !ALLOWED_LIBS.contains(l)).collect();
    assert!(
        extra.is_empty(),
        "the binary needs {extra:?} at run time, beyond the C runtime; ldd said:\n{text}"
    );
}

#[test]
fn no_sys_crate_needs_a_system_library() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-f",
            "{p}",
            "-p",
            "imgshift",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.contains(&"imgshift"), "{text}");
    assert!(!names.contains(&"virt"), "the virt crate is back");
    let sys: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.ends_with("-sys"))
        .collect();
    let unexpected: Vec<&str> = sys
        .iter()
        .copied()
        .filter(|n| !ALLOWED_SYS.iter().any(|(a, _)| a == n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "-sys crates outside the allowed set (each needs a reason in ALLOWED_SYS, or a vendored build): {unexpected:?}"
    );
}
