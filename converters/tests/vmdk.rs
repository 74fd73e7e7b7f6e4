#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use imgshift_converters::{
    ConvertOptions, ErrorKind, ExtentKind, Format, NoProgress, OpenGate, StreamSink, WriterOptions,
    convert, create_writer, open_path, resolved_extents,
};
use util::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// 33 MiB + 3 sectors: not a multiple of the 64 KiB grain.
const SMALL: u64 = 33 * MIB + 1536;
/// 5 GiB + 3 sectors: above 4 GiB, three 2 GiB extents.
const BIG: u64 = 5 * GIB + 1536;
const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

fn small_raw(path: &Path) {
    make_raw(
        path,
        SMALL,
        &[
            (0, MIB),
            (10 * MIB + 4096, 3 * MIB),
            (20 * MIB, 1000),
            (SMALL - 9000, 9000),
        ],
        &[(5 * MIB, MIB)],
    );
}

fn big_raw(path: &Path) {
    make_raw(
        path,
        BIG,
        &[
            (0, MIB),
            (2 * GIB - 4096, 8192),
            (3 * GIB, MIB),
            (4 * GIB + 12345, 70000),
            (BIG - 512, 512),
        ],
        &[(GIB, MIB)],
    );
}

fn qemu_to_vmdk(raw: &Path, out: &Path, opts: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        opts,
        raw.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
}

/// `qemu-img create -f vmdk -o subformat=SUBFORMAT NAME SIZE` in `dir`.
fn create_vmdk(dir: &Path, subformat: &str, name: &str, size: &str) {
    let opts = format!("subformat={subformat}");
    run_in(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "vmdk", "-o", &opts, name, size],
    );
}

fn run_in(dir: &Path, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} ({e}): install qemu-utils"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// imgshift reads a qemu-img image back to raw, identical to the source raw.
fn read_back(img: &Path, raw: &Path) {
    let back = img.with_extension("back.raw");
    imgshift_convert(img, None, &back, Format::Raw, "");
    assert_same(raw, "raw", &back, "raw");
    assert_same(img, "vmdk", &back, "raw");
}

#[test]
fn reads_every_qemu_subformat() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    small_raw(&raw);
    for sub in SUBFORMATS {
        let img = p(d.path(), &format!("{sub}.vmdk"));
        qemu_to_vmdk(&raw, &img, &format!("subformat={sub}"));
        read_back(&img, &raw);
    }
    // Options that change the header: zeroed-grain (version 2), other adapters.
    let img = p(d.path(), "zg.vmdk");
    qemu_to_vmdk(
        &raw,
        &img,
        "zeroed_grain=on,adapter_type=lsilogic,hwversion=7",
    );
    read_back(&img, &raw);
    let info = open_path(&img, None, &OpenGate::new()).unwrap().info();
    let spec = info.format_specific.unwrap();
    assert_eq!(spec["adapter-type"], "lsilogic");
    assert_eq!(spec["hw-version"], "7");
    assert_eq!(info.cluster_size, Some(65536));
}

#[test]
fn reads_big_split_images() {
    let d = tmpdir();
    let raw = p(d.path(), "big.raw");
    big_raw(&raw);
    for sub in SUBFORMATS {
        let img = p(d.path(), &format!("{sub}.vmdk"));
        qemu_to_vmdk(&raw, &img, &format!("subformat={sub}"));
        read_back(&img, &raw);
    }
    for name in [
        "twoGbMaxExtentSparse-s003.vmdk",
        "twoGbMaxExtentFlat-f003.vmdk",
    ] {
        assert!(p(d.path(), name).exists(), "{name}");
    }
    let src = open_path(
        &p(d.path(), "twoGbMaxExtentSparse.vmdk"),
        None,
        &OpenGate::new(),
    )
    .unwrap();
    assert_eq!(src.virtual_size(), BIG);
    let spec = src.info().format_specific.unwrap();
    assert_eq!(spec["extents"].as_array().unwrap().len(), 3);
}

#[test]
fn allocation_follows_data() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    small_raw(&raw);
    for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
        let img = p(d.path(), &format!("{sub}.vmdk"));
        qemu_to_vmdk(&raw, &img, &format!("subformat={sub}"));
        let src = open_path(&img, None, &OpenGate::new()).unwrap();
        let map = resolved_extents(src.as_ref(), 0, src.virtual_size()).unwrap();
        let data = map.bytes(ExtentKind::Data);
        assert!(
            (4 * MIB..=4 * MIB + 6 * 65536).contains(&data),
            "{sub}: {map:?}"
        );
        assert_eq!(data + map.bytes(ExtentKind::Zero), SMALL);
    }
}

#[test]
fn reads_zeroed_grains_and_snapshot_chain() {
    let d = tmpdir();
    let dir = d.path();
    let raw = p(dir, "base.raw");
    make_raw(&raw, 8 * MIB, &[(0, 4 * MIB)], &[]);
    qemu_to_vmdk(&raw, &p(dir, "base.vmdk"), "subformat=monolithicSparse");
    run_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            "delta.vmdk",
        ],
    );
    run_in(
        dir,
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -P 0xcd 6M 4k",
            "delta.vmdk",
        ],
    );
    let delta = p(dir, "delta.vmdk");
    let src = open_path(&delta, None, &OpenGate::new()).unwrap();
    let info = src.info();
    assert_eq!(info.backing_filename.as_deref(), Some("base.vmdk"));
    // The zeroed grains hide the parent's data: they are Zero in this layer.
    let top = src.extents(2 * MIB, 128 * 1024).unwrap();
    assert_eq!(top.bytes(ExtentKind::Zero), 128 * 1024, "{top:?}");
    let map = resolved_extents(src.as_ref(), 0, 8 * MIB).unwrap();
    assert!(
        map.iter()
            .any(|e| e.depth == 1 && e.kind == ExtentKind::Data)
    );
    drop(src);
    let out = p(dir, "flat.raw");
    imgshift_convert(&delta, None, &out, Format::Raw, "");
    assert_same(&delta, "vmdk", &out, "raw");

    // A parent whose CID changed after the snapshot is refused.
    let base = p(dir, "base.vmdk");
    let mut bytes = std::fs::read(&base).unwrap();
    let at = find(&bytes, b"\nCID=").unwrap() + 5;
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&base, &bytes).unwrap();
    let e = open_path(&delta, None, &OpenGate::new()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn write_vmdk(raw: &Path, out: &Path, opts: &str) {
    imgshift_convert(raw, Some(Format::Raw), out, Format::Vmdk, opts);
}

fn write_vmdk_stream(raw: &Path, out: &Path, opts: &str) -> imgshift_converters::Result<()> {
    let source = open_path(raw, Some(Format::Raw), &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut w = create_writer(Format::Vmdk, &mut o).unwrap();
    let mut sink = StreamSink::new(std::fs::File::create(out).unwrap());
    convert(
        source.as_ref(),
        w.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .map(|_| ())
}

#[test]
fn writes_every_subformat() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    small_raw(&raw);
    for sub in SUBFORMATS {
        let out = p(d.path(), &format!("{sub}.vmdk"));
        write_vmdk(&raw, &out, &format!("subformat={sub}"));
        assert_check_clean(&out, "vmdk");
        assert_same(&raw, "raw", &out, "vmdk");
        read_back(&out, &raw);
    }
    assert!(p(d.path(), "monolithicFlat-flat.vmdk").exists());
    let out = p(d.path(), "opts.vmdk");
    write_vmdk(
        &raw,
        &out,
        "adapter_type=buslogic,compat6=on,zeroed_grain=on,toolsversion=1234",
    );
    assert_check_clean(&out, "vmdk");
    assert_same(&raw, "raw", &out, "vmdk");
    let info = qemu_img(&["info", out.to_str().unwrap()]);
    assert!(info.contains("monolithicSparse"), "{info}");
    let text = std::fs::read(&out).unwrap();
    for needle in [
        "ddb.adapterType = \"buslogic\"",
        "ddb.virtualHWVersion = \"6\"",
        "ddb.toolsVersion = \"1234\"",
        "ddb.geometry.heads = \"255\"",
    ] {
        assert!(find(&text, needle.as_bytes()).is_some(), "{needle}");
    }
}

#[test]
fn writes_big_split_images() {
    let d = tmpdir();
    let raw = p(d.path(), "big.raw");
    big_raw(&raw);
    for sub in SUBFORMATS {
        let out = p(d.path(), &format!("{sub}.vmdk"));
        write_vmdk(&raw, &out, &format!("subformat={sub}"));
        assert_check_clean(&out, "vmdk");
        assert_same(&raw, "raw", &out, "vmdk");
    }
    for name in [
        "twoGbMaxExtentSparse-s001.vmdk",
        "twoGbMaxExtentSparse-s003.vmdk",
        "twoGbMaxExtentFlat-f003.vmdk",
    ] {
        assert!(p(d.path(), name).exists(), "{name}");
    }
    assert!(!p(d.path(), "twoGbMaxExtentFlat-f004.vmdk").exists());
    // The sparse output stays small.
    let len = std::fs::metadata(p(d.path(), "monolithicSparse.vmdk"))
        .unwrap()
        .len();
    assert!(len < 8 * MIB, "{len}");
}

#[test]
fn writes_to_streams() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    small_raw(&raw);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let out = p(d.path(), &format!("{sub}.vmdk"));
        write_vmdk_stream(&raw, &out, &format!("subformat={sub}")).unwrap();
        assert_check_clean(&out, "vmdk");
        assert_same(&raw, "raw", &out, "vmdk");
        read_back(&out, &raw);
    }
    // A stream and the local file hold the same stream-optimized layout.
    let local = p(d.path(), "local.vmdk");
    write_vmdk(&raw, &local, "subformat=streamOptimized");
    let a = walk_stream(&std::fs::read(&local).unwrap());
    let b = walk_stream(&std::fs::read(p(d.path(), "streamOptimized.vmdk")).unwrap());
    assert_eq!(a, b);
    for sub in ["monolithicFlat", "twoGbMaxExtentSparse"] {
        let e = write_vmdk_stream(&raw, &p(d.path(), "x.vmdk"), &format!("subformat={sub}"))
            .unwrap_err();
        assert!(e.to_string().contains("local file"), "{e}");
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Walks a stream-optimized file marker by marker, checking VMware's layout. Returns (grain LBAs, GT count).
fn walk_stream(f: &[u8]) -> (Vec<u64>, usize) {
    assert_eq!(&f[..4], b"KDMV");
    assert_eq!(le32(f, 4), 3, "version");
    assert_eq!(
        le32(f, 8),
        0x30001,
        "flags: NL detection, compressed, markers"
    );
    assert_eq!(le64(f, 12) * 512, SMALL.next_multiple_of(512), "capacity");
    assert_eq!(le64(f, 20), 128, "grain");
    assert_eq!(le64(f, 56), u64::MAX, "gdOffset = GD_AT_END");
    assert_eq!(&f[73..77], b"\n \r\n");
    assert_eq!(u16::from_le_bytes([f[77], f[78]]), 1, "deflate");
    let desc_len = le64(f, 36) as usize * 512;
    let desc = String::from_utf8_lossy(&f[512..512 + desc_len]);
    assert!(desc.contains("createType=\"streamOptimized\""), "{desc}");
    let over_head = le64(f, 64) as usize * 512;
    assert_eq!(over_head, 65536);
    assert!(f.len().is_multiple_of(512));

    let mut pos = over_head;
    let mut grains: Vec<(u64, usize)> = Vec::new();
    let mut gts: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut gd_sector = None;
    let mut footer_gd = None;
    loop {
        let (val, size, kind) = (le64(f, pos), le32(f, pos + 8), le32(f, pos + 12));
        if size != 0 {
            // A grain: LBAs increase, data inflates to exactly one grain.
            assert_eq!(val % 128, 0);
            assert!(grains.last().is_none_or(|g| g.0 < val));
            let data = &f[pos + 12..pos + 12 + size as usize];
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out.len(), 65536);
            assert!(out.iter().any(|&b| b != 0), "zero grains are not stored");
            grains.push((val, pos / 512));
            pos += (12 + size as usize).next_multiple_of(512);
            continue;
        }
        match kind {
            1 => {
                assert_eq!(val, 4);
                let t: Vec<u32> = (0..512).map(|i| le32(f, pos + 512 + 4 * i)).collect();
                gts.push((pos / 512 + 1, t));
            }
            2 => gd_sector = Some(pos / 512 + 1),
            3 => {
                assert_eq!(val, 1);
                assert_eq!(&f[pos + 512..pos + 516], b"KDMV");
                footer_gd = Some(le64(f, pos + 512 + 56) as usize);
            }
            0 => {
                assert_eq!(val, 0);
                assert_eq!(pos + 512, f.len(), "EOS is the last sector");
                break;
            }
            k => panic!("unknown marker {k} at {pos}"),
        }
        pos += 512 + val as usize * 512;
    }
    let gd_sector = gd_sector.expect("GD marker");
    assert_eq!(footer_gd, Some(gd_sector), "footer gdOffset");
    assert!(!gts.is_empty());
    // Every GT is in the GD, every grain in its GT.
    let mut seen = 0;
    for (gt_sector, t) in &gts {
        let gi = (0..)
            .find(|&i| le32(f, gd_sector * 512 + 4 * i) as usize == *gt_sector)
            .unwrap();
        for (j, &e) in t.iter().enumerate().filter(|(_, e)| **e != 0) {
            let lba = ((gi * 512 + j) * 128) as u64;
            assert!(grains.contains(&(lba, e as usize)), "GTE {lba} -> {e}");
            seen += 1;
        }
    }
    assert_eq!(seen, grains.len());
    (grains.iter().map(|g| g.0).collect(), gts.len())
}

#[test]
fn stream_optimized_structure() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    small_raw(&raw);
    let out = p(d.path(), "s.vmdk");
    write_vmdk(&raw, &out, "subformat=streamOptimized");
    let (grains, gts) = walk_stream(&std::fs::read(&out).unwrap());
    // 1 MiB + 3 MiB (+1 grain, unaligned) + 1000 bytes + the tail across two grains.
    assert_eq!(grains.len(), 16 + 49 + 1 + 2);
    assert_eq!(gts, 2);
}

// ---- hostile input ----

fn must_fail(path: &Path) -> imgshift_converters::Error {
    let owned = path.to_path_buf();
    let (r, work) = file_work(&path.display().to_string(), move || {
        open_path(&owned, Some(Format::Vmdk), &OpenGate::new()).and_then(|src| {
            let m = resolved_extents(src.as_ref(), 0, src.virtual_size())?;
            let mut buf = vec![0u8; MIB as usize];
            for e in m.iter().filter(|e| e.kind == ExtentKind::Data) {
                let n = e.len.min(MIB) as usize;
                src.read_at(&mut buf[..n], e.start)?;
            }
            Ok(())
        })
    });
    let e = r.err().unwrap_or_else(|| panic!("{path:?} was accepted"));
    eprintln!(
        "{}: {work:?}: {e}",
        path.file_name().unwrap().to_string_lossy()
    );
    // A few MiB at most (the descriptor bound is 1 MiB; the hostile images are small): never what a field
    // claims, and never the whole of a 27 MB descriptor.
    work.assert_at_most(&path.display().to_string(), MUST_FAIL_BYTES, 4096);
    e
}

/// What refusing a hostile VMDK may read (bytes).
const MUST_FAIL_BYTES: u64 = 8 * MIB;

/// Byte patches: (offset, new bytes).
type Edits = Vec<(usize, Vec<u8>)>;

fn patched(dir: &Path, src: &Path, name: &str, edits: &[(usize, Vec<u8>)]) -> std::path::PathBuf {
    let mut b = std::fs::read(src).unwrap();
    for (at, bytes) in edits {
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    let out = p(dir, name);
    std::fs::write(&out, b).unwrap();
    out
}

#[test]
fn rejects_hostile_sparse_headers() {
    let d = tmpdir();
    let dir = d.path();
    let raw = p(dir, "src.raw");
    make_raw(&raw, 64 * MIB, &[(0, MIB), (40 * MIB, MIB)], &[]);
    let good = p(dir, "good.vmdk");
    qemu_to_vmdk(&raw, &good, "subformat=monolithicSparse");
    let b = std::fs::read(&good).unwrap();
    let gd = le64(&b, 56) as usize * 512;
    let gt = le32(&b, gd) as usize * 512;

    let cases: Vec<(&str, Edits)> = vec![
        ("magic", vec![(0, b"XDMV".to_vec())]),
        ("grain0", vec![(20, 0u64.to_le_bytes().to_vec())]),
        ("grain2^20", vec![(20, (1u64 << 20).to_le_bytes().to_vec())]),
        (
            "capacity2^63",
            vec![(12, (1u64 << 63).to_le_bytes().to_vec())],
        ),
        // 64 TiB: a 2 Mi-entry grain directory that the 4 MiB file cannot hold.
        (
            "capacity64T",
            vec![(12, (1u64 << 37).to_le_bytes().to_vec())],
        ),
        ("gtes0", vec![(44, 0u32.to_le_bytes().to_vec())]),
        (
            "gd-past-eof",
            vec![(gd, 0x00ff_ffffu32.to_le_bytes().to_vec())],
        ),
        ("gd-shared-table", vec![(gd + 4, b[gd..gd + 4].to_vec())]),
        (
            "gdoffset-past-eof",
            vec![(56, (1u64 << 40).to_le_bytes().to_vec())],
        ),
        (
            "gte-past-eof",
            vec![(gt, 0x00ff_ffffu32.to_le_bytes().to_vec())],
        ),
        ("version", vec![(4, 9u32.to_le_bytes().to_vec())]),
        (
            "incompat-flag",
            vec![(8, (1u32 << 20 | 3).to_le_bytes().to_vec())],
        ),
        ("newline", vec![(73, b"\r\n\r\n".to_vec())]),
    ];
    for (name, edits) in cases {
        let f = patched(dir, &good, &format!("{name}.vmdk"), &edits);
        let e = must_fail(&f);
        assert!(!e.to_string().is_empty(), "{name}");
    }
}

#[test]
fn rejects_hostile_compressed_grains() {
    let d = tmpdir();
    let dir = d.path();
    let raw = p(dir, "src.raw");
    make_raw(&raw, 4 * MIB, &[(0, 256 * 1024)], &[]);
    let good = p(dir, "good.vmdk");
    write_vmdk(&raw, &good, "subformat=streamOptimized");
    let first = 65536; // our first grain marker (overHead 128 sectors)
    let huge = 0x7fff_fff0u32.to_le_bytes();
    let f = patched(
        dir,
        &good,
        "size-past-eof.vmdk",
        &[(first + 8, huge.to_vec())],
    );
    must_fail(&f);
    // A grain that inflates to two grains of zeros.
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &vec![0u8; 131072]).unwrap();
    let bomb = enc.finish().unwrap();
    let size = (bomb.len() as u32).to_le_bytes();
    let f = patched(
        dir,
        &good,
        "bomb.vmdk",
        &[(first + 8, size.to_vec()), (first + 12, bomb.clone())],
    );
    let e = must_fail(&f);
    assert!(e.to_string().contains("more than one grain"), "{e}");
    // Wrong LBA in the marker.
    let f = patched(
        dir,
        &good,
        "lba.vmdk",
        &[(first, 7u64.to_le_bytes().to_vec())],
    );
    must_fail(&f);
    // A marker whose size stays under two grains but runs past the end of a one-grain file.
    let one = p(dir, "one.raw");
    make_raw(&one, 4 * MIB, &[(0, 65536)], &[]);
    let small = p(dir, "small.vmdk");
    write_vmdk(&one, &small, "subformat=streamOptimized");
    let len = std::fs::metadata(&small).unwrap().len();
    assert!(len < 65536 + 130_000, "{len}");
    let f = patched(
        dir,
        &small,
        "past-eof.vmdk",
        &[(first + 8, 130_000u32.to_le_bytes().to_vec())],
    );
    assert!(must_fail(&f).to_string().contains("past the end"));
    // Truncated stream: no footer.
    let b = std::fs::read(&good).unwrap();
    let f = p(dir, "truncated.vmdk");
    std::fs::write(&f, &b[..b.len() - 512]).unwrap();
    must_fail(&f);
}

fn descriptor(create_type: &str, extents: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n{extents}\n"
    )
}

#[test]
fn rejects_hostile_descriptors() {
    let d = tmpdir();
    let dir = d.path();
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    std::fs::write(dir.join("x"), vec![0u8; 4096]).unwrap();
    std::fs::write(dir.join("a/b/ok-flat.vmdk"), vec![0u8; 4096]).unwrap();
    let write = |name: &str, text: &str| {
        let f = dir.join("a/b").join(name);
        std::fs::write(&f, text).unwrap();
        f
    };
    // The well-formed one opens.
    let ok = write(
        "ok.vmdk",
        &descriptor("monolithicFlat", "RW 8 FLAT \"ok-flat.vmdk\" 0"),
    );
    assert_eq!(
        open_path(&ok, None, &OpenGate::new())
            .unwrap()
            .virtual_size(),
        4096
    );
    for (name, target) in [("abs", "/etc/passwd"), ("up", "../../x")] {
        let f = write(
            &format!("{name}.vmdk"),
            &descriptor("monolithicFlat", &format!("RW 8 FLAT \"{target}\" 0")),
        );
        let e = must_fail(&f);
        assert_eq!(e.kind(), ErrorKind::Denied, "{name}: {e}");
    }
    let cases = [
        (
            "self",
            descriptor("monolithicFlat", "RW 8 FLAT \"self.vmdk\" 0"),
        ),
        (
            "short",
            descriptor("monolithicFlat", "RW 16 FLAT \"ok-flat.vmdk\" 0"),
        ),
        ("noextents", descriptor("monolithicFlat", "")),
        (
            "json",
            descriptor("monolithicFlat", "RW 8 FLAT \"json:{}\" 0"),
        ),
        (
            "sesparse",
            descriptor("seSparse", "RW 8 SESPARSE \"ok-flat.vmdk\""),
        ),
        (
            "vmfssparse",
            descriptor("vmfsSparse", "RW 8 VMFSSPARSE \"ok-flat.vmdk\""),
        ),
        (
            "noaccess",
            descriptor("monolithicFlat", "NOACCESS 8 FLAT \"ok-flat.vmdk\" 0"),
        ),
        (
            "huge",
            descriptor("monolithicFlat", "RW 18446744073709551615 ZERO"),
        ),
        (
            "embedded-type",
            descriptor("monolithicSparse", "RW 8 SPARSE \"ok-flat.vmdk\""),
        ),
        (
            "sparse-not-sparse",
            descriptor("twoGbMaxExtentSparse", "RW 8 SPARSE \"ok-flat.vmdk\""),
        ),
    ];
    for (name, text) in cases {
        // Each case names its own extent file, so it fails for its own reason, not for the extent-name rule.
        let own = format!("{name}-flat.vmdk");
        std::fs::write(dir.join("a/b").join(&own), vec![0u8; 4096]).unwrap();
        let f = write(&format!("{name}.vmdk"), &text.replace("ok-flat.vmdk", &own));
        let e = must_fail(&f);
        assert!(!e.to_string().contains("own extent files"), "{name}: {e}");
    }
    // 10^6 extent lines: over the 1 MiB descriptor bound; 5000 short ones: over the extent bound.
    let many = "RW 1 FLAT \"ok-flat.vmdk\" 0\n".repeat(1_000_000);
    let f = write("million.vmdk", &descriptor("twoGbMaxExtentFlat", &many));
    assert_eq!(must_fail(&f).kind(), ErrorKind::Limit);
    let many = "RW 1 ZERO\n".repeat(5000);
    let f = write("many.vmdk", &descriptor("custom", &many));
    assert_eq!(must_fail(&f).kind(), ErrorKind::Limit);
}

/// A descriptor edited to name `target` instead of its own extent, written as `dir/name`.
fn retargeted(dir: &Path, desc: &Path, own: &str, name: &str, target: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(desc).unwrap();
    assert!(text.contains(&format!("\"{own}\"")), "{text}");
    let out = p(dir, name);
    std::fs::write(
        &out,
        text.replace(&format!("\"{own}\""), &format!("\"{target}\"")),
    )
    .unwrap();
    out
}

#[test]
fn extents_are_only_the_images_own_files() {
    let d = tmpdir();
    let dir = d.path();
    // qemu-img's own layouts open: x-flat.vmdk beside x.vmdk, y-s001.vmdk.. beside y.vmdk, and the descriptor's
    // own extension (qemu names the flat file of a.img a-flat.img).
    create_vmdk(dir, "monolithicFlat", "x.vmdk", "1M");
    create_vmdk(dir, "twoGbMaxExtentSparse", "y.vmdk", "3G");
    create_vmdk(dir, "monolithicFlat", "a.img", "1M");
    run_in(
        dir,
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x5a 0 64k", "x.vmdk"],
    );
    for (img, size) in [("x.vmdk", MIB), ("y.vmdk", 3 * GIB), ("a.img", MIB)] {
        let src = open_path(&p(dir, img), Some(Format::Vmdk), &OpenGate::new()).unwrap();
        assert_eq!(src.virtual_size(), size, "{img}");
    }

    let x = p(dir, "x.vmdk");
    // A renamed descriptor still opens its extents: VMware's `Windows 10 x64.vmdk` saved as `win10.vmdk` names
    // `Windows 10 x64-s001.vmdk`..; and files copied through a case-insensitive file system, `C.img` naming
    // `c-flat.img` (own-extent pattern, stem in another case) and `Disk.vmdk` naming `disk-flat.vmdk`.
    for (made, opts, renamed, fill) in [
        (
            "Windows 10 x64.vmdk",
            "subformat=twoGbMaxExtentSparse",
            "win10.vmdk",
            0x31u8,
        ),
        ("c.img", "subformat=monolithicFlat", "C.img", 0x32),
        ("disk.vmdk", "subformat=monolithicFlat", "Disk.vmdk", 0x33),
    ] {
        run_in(
            dir,
            "qemu-img",
            &["create", "-q", "-f", "vmdk", "-o", opts, made, "3G"],
        );
        let write = format!("write -P {fill} 2G 64k");
        run_in(dir, "qemu-io", &["-f", "vmdk", "-c", &write, made]);
        std::fs::rename(p(dir, made), p(dir, renamed)).unwrap();
        let src = open_path(&p(dir, renamed), Some(Format::Vmdk), &OpenGate::new())
            .unwrap_or_else(|e| panic!("{renamed}: {e}"));
        let mut buf = vec![0u8; 65536];
        src.read_at(&mut buf, 2 * GIB).unwrap();
        assert!(buf.iter().all(|&b| b == fill), "{renamed}");
    }
    // Another image's extent beside the descriptor is a disk file too (the user's own, not a host secret).
    let other = retargeted(dir, &x, "x-flat.vmdk", "other.vmdk", "x-flat.vmdk");
    let src = open_path(&other, Some(Format::Vmdk), &OpenGate::new()).unwrap();
    let mut buf = vec![0u8; 4096];
    src.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));

    // A descriptor saved among other files names one of them: a file of the same folder, one in a subfolder
    // (`.ssh/id_rsa`, `sub/x-flat.vmdk`), a dot file named like a disk, an own-looking name that is a symlink to
    // another file.
    let secret = vec![0x5eu8; MIB as usize];
    std::fs::write(p(dir, "secret.txt"), &secret).unwrap();
    std::fs::create_dir(p(dir, "sub")).unwrap();
    std::fs::copy(p(dir, "x-flat.vmdk"), p(dir, "sub/x-flat.vmdk")).unwrap();
    std::fs::create_dir(p(dir, ".ssh")).unwrap();
    std::fs::write(p(dir, ".ssh/id_rsa"), &secret).unwrap();
    std::fs::copy(p(dir, "x-flat.vmdk"), p(dir, ".hidden.vmdk")).unwrap();
    std::os::unix::fs::symlink("secret.txt", p(dir, "z-flat.vmdk")).unwrap();
    let cases = [
        retargeted(dir, &x, "x-flat.vmdk", "same-folder.vmdk", "secret.txt"),
        retargeted(dir, &x, "x-flat.vmdk", "subfolder.vmdk", "sub/x-flat.vmdk"),
        retargeted(dir, &x, "x-flat.vmdk", "dotssh.vmdk", ".ssh/id_rsa"),
        retargeted(dir, &x, "x-flat.vmdk", "hidden.vmdk", ".hidden.vmdk"),
        retargeted(dir, &x, "x-flat.vmdk", "z.vmdk", "z-flat.vmdk"),
    ];
    for f in &cases {
        let e = must_fail(f);
        assert_eq!(e.kind(), ErrorKind::Denied, "{f:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("refused")
                && msg.contains(
                    "opens only its image's own extent files, those named *.vmdk or like '"
                ),
            "{f:?}: {msg}"
        );
        // The library says what is wrong, and marks it as a trust refusal: the CLI names its flag.
        assert!(e.is_untrusted(), "{f:?}: {msg}");
        assert!(!msg.contains("--allow-dir"), "{f:?}: {msg}");
    }
    // The symlink is named like an extent, so the message says where it leads.
    let e = must_fail(&cases[4]).to_string();
    assert!(
        e.contains("VMDK extent 'z-flat.vmdk' (it leads to ") && e.contains("secret.txt) refused"),
        "{e}"
    );
    // The descriptor's own name as its extent (named *.vmdk, but the gate sees the loop first).
    let own = retargeted(dir, &x, "x-flat.vmdk", "self.vmdk", "self.vmdk");
    let e = must_fail(&own);
    assert!(
        e.to_string()
            .contains("VMDK extent 'self.vmdk' makes a loop in the backing chain"),
        "{e}"
    );

    // Trusting the folder (--allow-dir) opens them, and the bytes are the named files'.
    let trusted = OpenGate::new().allow_dir(dir).unwrap();
    for f in &cases {
        let src = open_path(f, Some(Format::Vmdk), &trusted)
            .unwrap_or_else(|e| panic!("{f:?} with --allow-dir: {e}"));
        let mut buf = vec![0u8; 4096];
        src.read_at(&mut buf, 0).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        let want = if matches!(name, "subfolder.vmdk" | "hidden.vmdk") {
            0x5a
        } else {
            0x5e
        };
        assert!(buf.iter().all(|&b| b == want), "{name}");
    }
    // A trusted folder elsewhere does not widen the rule for the image's own folder.
    let elsewhere = tmpdir();
    let g = OpenGate::new().allow_dir(elsewhere.path()).unwrap();
    let e = open_path(&cases[0], Some(Format::Vmdk), &g).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
}

#[test]
fn extent_files_named_twice_are_refused() {
    let d = tmpdir();
    let dir = d.path();
    create_vmdk(dir, "twoGbMaxExtentSparse", "y.vmdk", "3G");
    create_vmdk(dir, "twoGbMaxExtentFlat", "f.vmdk", "3G");
    // The second sparse extent line names the first one's file again: each line would load its grain
    // directory once more (4096 lines of a big extent: hundreds of GiB).
    let y = p(dir, "y.vmdk");
    let twice = retargeted(dir, &y, "y-s002.vmdk", "y-twice.vmdk", "y-s001.vmdk");
    let text = std::fs::read_to_string(&twice).unwrap();
    std::fs::write(&twice, text.replace("y-", "y-twice-")).unwrap();
    std::fs::hard_link(p(dir, "y-s001.vmdk"), p(dir, "y-twice-s001.vmdk")).unwrap();
    // The same file under two own names: the second is a symlink to the first.
    let linked = retargeted(dir, &y, "y-s002.vmdk", "y.link.vmdk", "y.link-s002.vmdk");
    let text = std::fs::read_to_string(&linked).unwrap();
    std::fs::write(
        &linked,
        text.replace("\"y-s001.vmdk\"", "\"y.link-s001.vmdk\""),
    )
    .unwrap();
    std::fs::hard_link(p(dir, "y-s001.vmdk"), p(dir, "y.link-s001.vmdk")).unwrap();
    std::os::unix::fs::symlink("y.link-s001.vmdk", p(dir, "y.link-s002.vmdk")).unwrap();
    // Flat extents too.
    let flat = retargeted(
        dir,
        &p(dir, "f.vmdk"),
        "f-f002.vmdk",
        "f-twice.vmdk",
        "f-f001.vmdk",
    );
    let text = std::fs::read_to_string(&flat).unwrap();
    std::fs::write(
        &flat,
        text.replace("\"f-f001.vmdk\"", "\"f-twice-f001.vmdk\""),
    )
    .unwrap();
    std::fs::hard_link(p(dir, "f-f001.vmdk"), p(dir, "f-twice-f001.vmdk")).unwrap();
    for f in [&twice, &linked, &flat] {
        let e = must_fail(f);
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{f:?}: {e}");
        assert!(
            e.to_string().contains("named by two extent lines"),
            "{f:?}: {e}"
        );
    }
}
