#![allow(clippy::unwrap_used, clippy::expect_used)]
//! qcow2 through the CLI: cost follows data, and hostile headers fail cleanly (one line, non-zero exit, no
//! output left, under a second and 64 MiB).

mod util;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use util::*;

fn be32(f: &Path, off: u64, v: u32) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(f)
        .unwrap()
        .write_all_at(&v.to_be_bytes(), off)
        .unwrap();
}
fn be64(f: &Path, off: u64, v: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(f)
        .unwrap()
        .write_all_at(&v.to_be_bytes(), off)
        .unwrap();
}
fn read_be64(f: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(f)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

/// A small valid qcow2 with data in its first cluster.
fn good_qcow2(dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(format!("{name}.src"));
    make_raw(&raw, 4 << 20, &[(0, 256 << 10), (2 << 20, 64 << 10)], &[]);
    let img = dir.join(name);
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    std::fs::remove_file(&raw).unwrap();
    img
}

/// Runs `imgshift convert -f qcow2 BAD out.raw` and checks the hostile-input contract.
fn assert_rejected(dir: &Path, bad: &Path, expect: &str) {
    let out = dir.join("out.raw");
    let before = files_in(dir);
    let m = imgshift_measured(&["convert", "-f", "qcow2", "-O", "raw", s(bad), s(&out)]);
    assert_ne!(m.code, 0, "{bad:?} was accepted");
    assert!(
        m.code == 1,
        "exit code {} (a panic is 101): {}",
        m.code,
        m.stderr
    );
    let lines: Vec<&str> = m.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got: {}",
        m.stderr
    );
    assert!(
        lines[0].to_lowercase().contains(&expect.to_lowercase()),
        "error for {bad:?} should mention '{expect}': {}",
        lines[0]
    );
    // Bounded work, not time: the refusal reads the image about once at most (plus the loader's and /proc reads).
    let input = std::fs::metadata(bad).unwrap().len();
    assert!(
        m.rchar <= 2 * input + (1 << 20) && m.syscr <= 10_000,
        "read {} bytes of a {input}-byte image in {} calls",
        m.rchar,
        m.syscr
    );
    assert!(m.max_rss_kib < 64 * 1024, "peak RSS {} KiB", m.max_rss_kib);
    assert_eq!(files_in(dir), before, "output left behind");
    // info must fail the same way
    let r = imgshift(&["info", "-f", "qcow2", s(bad)]);
    assert_eq!(r.code, 1, "info: {}", r.stderr);
}

#[test]
fn cost_follows_data() {
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    // 16 GiB virtual, 64 MiB of data in 16 scattered pieces of 4 MiB.
    let pieces: Vec<(u64, u64)> = (0..16)
        .map(|i| (i * (1 << 30) + (i % 3) * (4 << 20), 4 << 20))
        .collect();
    make_raw(&raw, 16 << 30, &pieces, &[]);
    let img = d.path().join("src.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    std::fs::remove_file(&raw).unwrap();
    let out = d.path().join("out.qcow2");
    let r = imgshift(&["convert", "--stats", "-O", "qcow2", s(&img), s(&out)]).ok();
    let stats: serde_json::Value = serde_json::from_str(r.stderr.trim()).unwrap();
    let rchar = stats["rchar"].as_u64().unwrap();
    assert!(
        rchar < 4 * (64 << 20),
        "read {rchar} bytes for 64 MiB of data"
    );
    assert_eq!(stats["data_bytes"], 64u64 << 20);
    assert_check_clean(&out, "qcow2");
    assert_same(&img, "qcow2", &out, "qcow2");
}

#[test]
fn rejects_empty_and_truncated() {
    let d = tmpdir();
    let empty = d.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_rejected(d.path(), &empty, "qcow2");
    let trunc = d.path().join("trunc");
    std::fs::write(&trunc, b"QFI\xfb\0\0\0\x03\0\0").unwrap();
    assert_rejected(d.path(), &trunc, "qcow2");
}

#[test]
fn rejects_bad_magic() {
    let d = tmpdir();
    let img = good_qcow2(d.path(), "a.qcow2");
    be32(&img, 0, 0x1234_5678);
    assert_rejected(d.path(), &img, "magic");
}

#[test]
fn rejects_bad_cluster_bits() {
    for bits in [8u32, 30] {
        let d = tmpdir();
        let img = good_qcow2(d.path(), "a.qcow2");
        be32(&img, 20, bits);
        assert_rejected(d.path(), &img, "cluster");
    }
}

#[test]
fn rejects_l1_beyond_eof() {
    let d = tmpdir();
    let img = good_qcow2(d.path(), "a.qcow2");
    be64(&img, 40, 1 << 40);
    assert_rejected(d.path(), &img, "L1");
}

#[test]
fn rejects_huge_l1() {
    let d = tmpdir();
    let img = good_qcow2(d.path(), "a.qcow2");
    be32(&img, 36, 1 << 31);
    assert_rejected(d.path(), &img, "L1");
}

#[test]
fn rejects_refcount_order_7() {
    let d = tmpdir();
    let img = good_qcow2(d.path(), "a.qcow2");
    be32(&img, 96, 7);
    assert_rejected(d.path(), &img, "refcount");
}

#[test]
fn rejects_l2_entry_past_eof() {
    let d = tmpdir();
    let img = good_qcow2(d.path(), "a.qcow2");
    let l1 = read_be64(&img, 40);
    let l2 = read_be64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = read_be64(&img, l2);
    assert_ne!(entry, 0, "test image must have data in cluster 0");
    be64(&img, l2, (entry & !0x00ff_ffff_ffff_fe00) | (1 << 40));
    assert_rejected(d.path(), &img, "past the end");
}

#[test]
fn rejects_backing_loop() {
    let d = tmpdir();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "1M",
    ]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    assert_rejected(d.path(), &b, "loop");
}

#[test]
fn rejects_backing_outside_folder() {
    for name in ["/etc/passwd", "../x"] {
        let d = tmpdir();
        let sub = d.path().join("img");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(d.path().join("x"), vec![0u8; 1 << 20]).unwrap();
        let a = sub.join("a.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
        qemu_img(&["rebase", "-u", "-b", name, "-F", "raw", s(&a)]);
        assert_rejected(&sub, &a, "outside");
        // with explicit trust it opens
        let allow = if name.starts_with('/') {
            "/etc".to_string()
        } else {
            s(d.path()).to_string()
        };
        let r = imgshift(&["info", "--allow-dir", &allow, s(&a)]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
}
