#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::path::Path;

use imgshift_converters::{
    ConvertOptions, ExtentKind, Format, NoProgress, OpenGate, StreamSink, WriterOptions, convert,
    create_writer, open, open_path, resolved_extents,
};
use util::*;

const MIB: u64 = 1 << 20;

fn sample_raw(path: &Path, size: u64) {
    make_raw(
        path,
        size,
        &[
            (0, MIB / 2),
            (5 * MIB + 4096, 3 * MIB),
            (size - 3 * 512, 3 * 512),
        ],
        &[(12 * MIB, 2 * MIB)],
    );
}

fn stream_convert(src: &Path, dst: &Path, opts: &str) {
    let source = open_path(src, Some(Format::Raw), &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut writer = create_writer(Format::Vdi, &mut o).unwrap();
    let mut sink = StreamSink::new(std::fs::File::create(dst).unwrap());
    convert(
        source.as_ref(),
        writer.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
}

#[test]
fn reads_qemu_dynamic_and_static() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    let size = 19 * MIB + 5 * 512; // not a multiple of the 1 MiB block
    sample_raw(&src, size);
    for (i, o) in ["static=off", "static=on"].iter().enumerate() {
        let img = p(d.path(), &format!("q{i}.vdi"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vdi",
            "-o",
            o,
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let r = open_path(&img, None, &OpenGate::new()).unwrap();
        assert_eq!(r.format(), Format::Vdi);
        assert_eq!(r.virtual_size(), size);
        assert!(r.check().unwrap().corruptions == 0);
        let out = p(d.path(), &format!("q{i}.raw"));
        imgshift_convert(&img, Some(Format::Vdi), &out, Format::Raw, "");
        assert_same(&src, "raw", &out, "raw");
        if i == 0 {
            // dynamic: unallocated blocks are zeros, data follows the allocated blocks
            let map = resolved_extents(r.as_ref(), 0, size).unwrap();
            assert!(map.bytes(ExtentKind::Data) <= 7 * MIB, "{map:?}");
        }
    }
}

#[test]
fn reads_a_sparse_disk_above_4_gib() {
    let d = tmpdir();
    let src = p(d.path(), "big.raw");
    let size = 5 * (1 << 30) + 512;
    make_raw(
        &src,
        size,
        &[(MIB, MIB), ((4 << 30) + 777 * 512, MIB), (size - 512, 512)],
        &[],
    );
    let img = p(d.path(), "big.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let out = p(d.path(), "big.out.raw");
    imgshift_convert(&img, Some(Format::Vdi), &out, Format::Raw, "");
    assert_same(&src, "raw", &out, "raw");
    // and write one back
    let w = p(d.path(), "big.w.vdi");
    imgshift_convert(&src, Some(Format::Raw), &w, Format::Vdi, "");
    assert_check_clean(&w, "vdi");
    assert_same(&w, "vdi", &src, "raw");
}

#[test]
fn writes_vdi_that_qemu_checks_clean() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    let size = 21 * MIB + 7 * 512;
    sample_raw(&src, size);
    for o in ["", "static=on"] {
        for streaming in [false, true] {
            let img = p(d.path(), &format!("w{}{streaming}.vdi", o.len()));
            if streaming {
                stream_convert(&src, &img, o);
            } else {
                imgshift_convert(&src, Some(Format::Raw), &img, Format::Vdi, o);
            }
            assert_check_clean(&img, "vdi");
            assert_same(&img, "vdi", &src, "raw");
            let info = qemu_img(&[
                "info",
                "-f",
                "vdi",
                "--output",
                "json",
                img.to_str().unwrap(),
            ]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(v["virtual-size"].as_u64().unwrap(), size);
            let r = open_path(&img, Some(Format::Vdi), &OpenGate::new()).unwrap();
            let c = r.check().unwrap();
            assert_eq!((c.corruptions, c.leaks), (0, 0), "{:?}", c.messages);
            let len = std::fs::metadata(&img).unwrap().len();
            if o.is_empty() && !streaming {
                // blocks with data: 0, 5..=8, 21 (+ header, map, alignment)
                assert!(len <= 8 * MIB, "{len}");
            }
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn check_finds_duplicate_blocks() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    make_raw(&src, 8 * MIB, &[(0, MIB), (3 * MIB, MIB)], &[]);
    let img = p(d.path(), "dup.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let mut b = std::fs::read(&img).unwrap();
    let bmap = le32(&b, 0x154) as usize;
    let e0 = le32(&b, bmap);
    put32(&mut b, bmap + 4 * 5, e0); // block 5 shares block 0's data
    std::fs::write(&img, &b).unwrap();
    let (code, out) = qemu_img_status(&["check", "-f", "vdi", img.to_str().unwrap()]);
    assert_ne!(code, 0, "qemu-img check should complain too: {out}");
    let r = open_path(&img, Some(Format::Vdi), &OpenGate::new()).unwrap();
    let c = r.check().unwrap();
    assert!(c.corruptions >= 1, "{:?}", c.messages);
    assert!(
        c.messages
            .iter()
            .any(|m| m.contains("used by blocks 0 and 5")),
        "{:?}",
        c.messages
    );
}

#[test]
fn refuses_mutated_images_quickly() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    make_raw(&src, 4 * MIB, &[(0, 4 * MIB)], &[]);
    let img = p(d.path(), "x.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let base = std::fs::read(&img).unwrap();
    let bmap = le32(&base, 0x154) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        b
    };
    cases.push(("signature", edit(&|b| put32(b, 0x40, 0x1234_5678))));
    cases.push(("version 1.0", edit(&|b| put32(b, 0x44, 0x0001_0000))));
    cases.push(("differencing type", edit(&|b| put32(b, 0x4c, 4))));
    cases.push(("parent uuid", edit(&|b| b[0x1b8] = 1)));
    cases.push(("block size 3 MiB", edit(&|b| put32(b, 0x178, 3 << 20))));
    cases.push(("block size 512", edit(&|b| put32(b, 0x178, 512))));
    cases.push(("blocks in image", edit(&|b| put32(b, 0x180, u32::MAX))));
    cases.push((
        "disk size",
        edit(&|b| b[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes())),
    ));
    cases.push((
        "entry not below blocks_allocated",
        edit(&|b| put32(b, bmap, 100)),
    ));
    cases.push((
        "blocks_allocated above blocks_in_image",
        edit(&|b| {
            put32(b, 0x184, 1000);
            put32(b, bmap, 999);
        }),
    ));
    cases.push((
        "block map past EOF",
        edit(&|b| put32(b, 0x154, 0x7fff_fe00)),
    ));
    cases.push(("truncated", base[..base.len() - 2 * MIB as usize].to_vec()));
    cases.push(("short", base[..300].to_vec()));
    for (what, bytes) in cases {
        // Refused after reading the header and at most the block map the file really holds, never what the
        // header claims (up to 2^32 blocks).
        let len = bytes.len() as u64;
        let (r, work) = no_hang(what, move || {
            let st = CountingStorage::mem(bytes, what);
            let r = open(st.clone(), Some(Format::Vdi), &OpenGate::deny_all()).map(|_| ());
            (r, st.work())
        });
        match r {
            Ok(()) => panic!("{what} must be refused"),
            Err(e) => eprintln!("{what}: {work:?}: {e}"),
        }
        work.assert_at_most(what, len.min(1 << 20), 64);
    }
}
