#![allow(clippy::unwrap_used, clippy::expect_used)]
//! qcow2 persistent dirty bitmaps (issue 23's `--bitmap NAME`): bitmaps added with `qemu-img bitmap`, writes made
//! with `qemu-io`, and the dirty ranges the reader returns; the in-use flag, an inconsistent extension and
//! crafted directory entries give typed one-line errors, never a panic.
mod util;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use imgshift_converters::formats::qcow2::bitmaps::{BitmapError, list_bitmaps, read_dirty_bitmap};
use util::*;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(img).output().unwrap_or_else(|e| {
        panic!("cannot run qemu-io ({e}): install it with `apt-get install qemu-utils`")
    });
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 64 MiB image; data written before the bitmaps exist (not dirty), then bitmaps b0 (64 KiB), b1 (128 KiB) and
/// b2 (disabled), then writes they record.
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    qemu_io(&img, &["write -P 9 5M 1M"]);
    let s = img.to_str().unwrap();
    qemu_img(&["bitmap", "--add", s, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", s, "b1"]);
    qemu_img(&["bitmap", "--add", "--disable", s, "b2"]);
    qemu_io(
        &img,
        &[
            "write -P 1 1M 64k",
            "write -P 2 10M 100k",
            "write -z 30M 1M",
            "write -P 3 63M 4k",
            "write -P 4 65532k 4k",
        ],
    );
    img
}

#[test]
fn dirty_ranges_follow_the_writes_at_the_bitmaps_granularity() {
    let d = tmpdir();
    let img = image(d.path());
    let b0 = read_dirty_bitmap(&img, "b0").unwrap();
    assert_eq!(b0.granularity, 64 * K);
    assert_eq!(
        b0.ranges,
        vec![
            (M, 64 * K),
            (10 * M, 128 * K),
            (30 * M, M),
            (63 * M, 64 * K),
            (65472 * K, 64 * K),
        ]
    );
    let b1 = read_dirty_bitmap(&img, "b1").unwrap();
    assert_eq!(b1.granularity, 128 * K);
    assert_eq!(
        b1.ranges,
        vec![
            (M, 128 * K),
            (10 * M, 128 * K),
            (30 * M, M),
            (63 * M, 128 * K),
            (65408 * K, 128 * K),
        ]
    );
    // Disabled: it recorded nothing.
    let b2 = read_dirty_bitmap(&img, "b2").unwrap();
    assert!(b2.ranges.is_empty(), "{:?}", b2.ranges);
    let names: Vec<String> = list_bitmaps(&img)
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["b0", "b1", "b2"]);
}

/// The dirty ranges qemu itself reports: the bitmap exported by `qemu-nbd -B NAME` and read back with `qemu-img
/// map` through `x-dirty-bitmap` (where dirty areas show as `"data": false`).
fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = img.with_extension(format!("{name}.sock"));
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg(img)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-nbd ({e}): install it with `apt-get install qemu-utils`")
        });
    // Hang guard: the socket appears within milliseconds.
    for _ in 0..400 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let _ = nbd.kill();
    let _ = nbd.wait();
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut v: Vec<(u64, u64)> = Vec::new();
    for r in rows.as_array().unwrap() {
        if r["data"] != false {
            continue;
        }
        let (s, l) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        match v.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => v.push((s, l)),
        }
    }
    v
}

#[test]
fn dirty_ranges_equal_what_qemu_nbd_exports() {
    let d = tmpdir();
    let img = image(d.path());
    for name in ["b0", "b1", "b2"] {
        let ours = read_dirty_bitmap(&img, name).unwrap().ranges;
        assert_eq!(ours, qemu_dirty(&img, name), "{name}");
    }
}

#[test]
fn last_range_is_clamped_to_the_virtual_size() {
    let d = tmpdir();
    let img = d.path().join("odd.qcow2");
    let s = img.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s,
        &(10 * M + 4 * K).to_string(),
    ]);
    qemu_img(&["bitmap", "--add", s, "b"]);
    qemu_io(&img, &["write -P 5 10M 4k"]);
    let b = read_dirty_bitmap(&img, "b").unwrap();
    assert_eq!(b.ranges, vec![(10 * M, 4 * K)]);
    assert_eq!(b.dirty_bytes(), 4 * K);
}

/// (directory offset, header bytes) of a qemu-made image, found from the header extension by hand.
fn directory_offset(img: &Path) -> u64 {
    let head = std::fs::read(img).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(head[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(head[o..o + 8].try_into().unwrap());
    let mut off = be32(100) as usize;
    loop {
        let (typ, len) = (be32(off), be32(off + 4) as usize);
        assert_ne!(typ, 0, "no bitmaps extension");
        if typ == 0x2385_2875 {
            return be64(off + 8 + 16);
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn in_use_inconsistent_unknown_and_unsupported_are_typed() {
    let d = tmpdir();
    let img = image(d.path());
    let dir = directory_offset(&img);
    // No such bitmap: the names are listed.
    match read_dirty_bitmap(&img, "nope") {
        Err(e @ BitmapError::NotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("b0, b1, b2"), "{msg}");
            assert!(!msg.contains('\n'));
        }
        other => panic!("{other:?}"),
    }
    // in_use (flags bit 0 of the first entry) set by hand, as a VM killed while it held the image leaves it.
    patch(&img, dir + 12, &3u32.to_be_bytes());
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        img.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["flags"],
        serde_json::json!(["in-use", "auto"])
    );
    assert!(list_bitmaps(&img).unwrap()[0].in_use());
    assert!(matches!(
        read_dirty_bitmap(&img, "b0"),
        Err(BitmapError::InUse { .. })
    ));
    assert!(read_dirty_bitmap(&img, "b1").is_ok());
    // Type 2 (reserved) on the second entry: its entry starts after the first (24 + 2-byte name, padded).
    patch(&img, dir + 32 + 16, &[2]);
    assert!(matches!(
        read_dirty_bitmap(&img, "b1"),
        Err(BitmapError::UnsupportedType { kind: 2, .. })
    ));
    // The bitmaps autoclear bit cleared (a program that does not know bitmaps wrote the image).
    patch(&img, 88, &0u64.to_be_bytes());
    assert!(matches!(
        read_dirty_bitmap(&img, "b2"),
        Err(BitmapError::Inconsistent { .. })
    ));
}

#[test]
fn crafted_directory_entries_are_refused_in_one_line() {
    let d = tmpdir();
    let base = image(d.path());
    let dir = directory_offset(&base);
    let len = std::fs::metadata(&base).unwrap().len();
    // (what, offset from the directory, bytes)
    let cases: Vec<(&str, u64, Vec<u8>)> = vec![
        (
            "table past the end",
            0,
            (len + (1 << 16)).to_be_bytes().to_vec(),
        ),
        ("table unaligned", 0, 4096u64.to_be_bytes().to_vec()),
        ("table too small", 8, 0u32.to_be_bytes().to_vec()),
        ("huge table", 8, u32::MAX.to_be_bytes().to_vec()),
        ("reserved flags", 12, 0x8000_0002u32.to_be_bytes().to_vec()),
        ("granularity 64", 17, vec![64]),
        ("granularity 40", 17, vec![40]),
        ("granularity 0", 17, vec![0]),
        ("empty name", 18, 0u16.to_be_bytes().to_vec()),
        ("long name", 18, 0xffffu16.to_be_bytes().to_vec()),
        ("huge extra data", 20, u32::MAX.to_be_bytes().to_vec()),
        ("unknown extra data", 20, 8u32.to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        let img = d.path().join("crafted.qcow2");
        std::fs::copy(&base, &img).unwrap();
        patch(&img, dir + at, &bytes);
        match read_dirty_bitmap(&img, "b0") {
            Ok(b) => panic!("{what}: accepted with {} ranges", b.ranges.len()),
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty() && !msg.contains('\n'), "{what}: {msg}");
            }
        }
    }
    // Bitmap table entries: 512-byte clusters and 512-byte granularity make a 16 KiB bitmap over 32 clusters;
    // writes at 0 and 2 MiB allocate the first two.
    let img = d.path().join("small.qcow2");
    let si = img.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        si,
        "64M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "512", si, "b"]);
    qemu_io(&img, &["write -P 1 0 4k", "write -P 2 2M 4k"]);
    let ok = read_dirty_bitmap(&img, "b").unwrap();
    assert_eq!(ok.ranges, vec![(0, 4 * K), (2 * M, 4 * K)]);
    let dir = directory_offset(&img);
    let mut t = [0u8; 8];
    let f = std::fs::File::open(&img).unwrap();
    f.read_exact_at(&mut t, dir).unwrap();
    let table = u64::from_be_bytes(t);
    let mut e = [0u8; 16];
    f.read_exact_at(&mut e, table).unwrap();
    let (e0, e1) = (
        u64::from_be_bytes(e[..8].try_into().unwrap()),
        u64::from_be_bytes(e[8..].try_into().unwrap()),
    );
    assert!(e0 != 0 && e1 != 0, "{e0:#x} {e1:#x}");
    for (what, entry1) in [
        ("shared data cluster", e0),
        ("reserved bit", e1 | 2),
        ("all-ones with an offset", e1 | 1),
        ("past the end", 1u64 << 40),
    ] {
        let c = d.path().join("table.qcow2");
        std::fs::copy(&img, &c).unwrap();
        patch(&c, table + 8, &entry1.to_be_bytes());
        let r = read_dirty_bitmap(&c, "b");
        assert!(matches!(r, Err(BitmapError::Image(_))), "{what}: {r:?}");
    }
    // An unallocated all-ones entry reads as every bit set: the whole 2 MiB the cluster covers.
    let c = d.path().join("ones.qcow2");
    std::fs::copy(&img, &c).unwrap();
    patch(&c, table + 8, &1u64.to_be_bytes());
    let ones = read_dirty_bitmap(&c, "b").unwrap();
    assert_eq!(ones.ranges, vec![(0, 4 * K), (2 * M, 2 * M)]);
}
