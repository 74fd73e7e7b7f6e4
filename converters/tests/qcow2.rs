#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::path::Path;
use std::process::Command;

use imgshift_converters::{
    ConvertOptions, ExtentKind, Format, NoProgress, OpenGate, StreamSink, WriterOptions, convert,
    create_writer, open_path, resolved_extents,
};
use util::*;

const MIB: u64 = 1 << 20;

/// Runs qemu-io on `img` (format `fmt`) with one `-c` per command.
fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(img);
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run qemu-io ({e}): install it with `apt-get install qemu-utils`")
    });
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// imgshift's raw conversion of `img` must equal qemu-img's; imgshift's check must agree with qemu-img check
/// that the image is clean.
fn assert_reads_like_qemu(img: &Path) {
    let dir = img.parent().unwrap();
    let stem = img.file_name().unwrap().to_str().unwrap();
    let theirs = dir.join(format!("{stem}.qemu.raw"));
    let ours = dir.join(format!("{stem}.ours.raw"));
    qemu_img(&["convert", "-O", "raw", s(img), s(&theirs)]);
    imgshift_convert(img, Some(Format::Qcow2), &ours, Format::Raw, "");
    assert_same(&ours, "raw", &theirs, "raw");
    assert_check_clean(img, "qcow2");
    let r = open_path(img, Some(Format::Qcow2), &OpenGate::new()).unwrap();
    let rep = r.check().unwrap();
    assert_eq!(
        (rep.corruptions, rep.leaks),
        (0, 0),
        "{img:?}: {:?}",
        rep.messages
    );
    std::fs::remove_file(&theirs).unwrap();
    std::fs::remove_file(&ours).unwrap();
}

/// A raw source: data, explicit zeros, holes; `size` not a multiple of 64 KiB.
fn source_raw(dir: &Path) -> std::path::PathBuf {
    let src = p(dir, "src.raw");
    let size = 12 * MIB + 3 * 512;
    make_raw(
        &src,
        size,
        &[
            (0, 300 << 10),
            (3 * MIB + 4096, 70_000),
            (9 * MIB, MIB),
            (size - 1000, 1000),
        ],
        &[(5 * MIB, 2 * MIB)],
    );
    src
}

#[test]
fn reads_qemu_images_of_each_cluster_size() {
    let d = tmpdir();
    let src = source_raw(d.path());
    for cs in ["512", "64k", "2M"] {
        let img = p(d.path(), &format!("c{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&src),
            s(&img),
        ]);
        // zero clusters (zero flag) and fresh data over existing data
        qemu_io(
            &img,
            "qcow2",
            &["write -z 0 64k", "write -z 8M 2M", "write -P 0xab 6M 4k"],
        );
        assert_reads_like_qemu(&img);
        let r = open_path(&img, Some(Format::Qcow2), &OpenGate::new()).unwrap();
        assert_eq!(r.info().cluster_size, Some(parse_cs(cs)));
        let map = resolved_extents(r.as_ref(), 0, r.virtual_size()).unwrap();
        // holes and zero clusters are Zero: data follows what was written, not the virtual size
        assert!(
            map.bytes(ExtentKind::Data) <= 4 * MIB + 6 * parse_cs(cs),
            "{cs}: {map:?}"
        );
        assert_eq!(map.lookup(9 * MIB).unwrap().kind, ExtentKind::Zero, "{cs}");
    }
}

fn parse_cs(cs: &str) -> u64 {
    match cs {
        "512" => 512,
        "64k" => 64 << 10,
        _ => 2 * MIB,
    }
}

#[test]
fn reads_compressed_zlib_and_zstd() {
    let d = tmpdir();
    let src = source_raw(d.path());
    for (name, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd"),
    ] {
        let img = p(d.path(), &format!("{name}.qcow2"));
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", opts, s(&src), s(&img)]);
        assert_reads_like_qemu(&img);
        let r = open_path(&img, None, &OpenGate::new()).unwrap();
        let fs = r.info().format_specific.unwrap();
        assert_eq!(fs["compression-type"], name);
    }
}

#[test]
fn reads_compat_010_and_odd_sizes() {
    let d = tmpdir();
    let src = source_raw(d.path());
    let img = p(d.path(), "v2.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&src),
        s(&img),
    ]);
    assert_reads_like_qemu(&img);
    let r = open_path(&img, None, &OpenGate::new()).unwrap();
    assert_eq!(r.info().format_specific.unwrap()["compat"], "0.10");

    // a virtual size that is not a multiple of the cluster size, written at its very end
    let odd = p(d.path(), "odd.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&odd), "5244416"]);
    qemu_io(
        &odd,
        "qcow2",
        &["write -P 0x33 5242880 1536", "write -P 0x44 0 1000"],
    );
    assert_reads_like_qemu(&odd);
    assert_eq!(
        open_path(&odd, None, &OpenGate::new())
            .unwrap()
            .virtual_size(),
        5244416
    );
}

#[test]
fn reads_large_virtual_size() {
    let d = tmpdir();
    let img = p(d.path(), "big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "6G"]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x5a 5G 128k", "write -P 0x5b 4095M 2M"],
    );
    let r = open_path(&img, None, &OpenGate::new()).unwrap();
    let map = resolved_extents(r.as_ref(), 0, r.virtual_size()).unwrap();
    assert_eq!(map.bytes(ExtentKind::Data), 128 * 1024 + 2 * MIB);
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 5 << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    r.read_at(&mut buf, (4095 << 20) + MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5b));
    let rep = r.check().unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0));
    // qcow2 → qcow2 keeps it sparse
    let out = p(d.path(), "big2.qcow2");
    imgshift_convert(&img, None, &out, Format::Qcow2, "");
    assert_check_clean(&out, "qcow2");
    assert_same(&img, "qcow2", &out, "qcow2");
    assert!(std::fs::metadata(&out).unwrap().len() < 8 * MIB);
}

#[test]
fn reads_extended_l2_subclusters() {
    let d = tmpdir();
    let base = p(d.path(), "base.raw");
    make_raw(&base, 4 * MIB, &[(0, 4 * MIB)], &[]);
    for backing in [false, true] {
        let img = p(d.path(), &format!("ext{backing}.qcow2"));
        let mut args = vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
        ];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([s(&img), "4M"]);
        qemu_img(&args);
        // 2 KiB subclusters: partial clusters, zero subclusters, whole clusters
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x11 4k 2k",
                "write -P 0x22 70k 6k",
                "write -z 132k 4k",
                "write -P 0x33 1M 64k",
                "write -z 2M 64k",
                "write -P 0x44 3M 2k",
                "write -z 3M 2k",
            ],
        );
        assert_reads_like_qemu(&img);
        let r = open_path(&img, None, &OpenGate::new()).unwrap();
        assert_eq!(r.info().format_specific.unwrap()["extended-l2"], true);
        let e = r.extents(0, 128 << 10).unwrap();
        let kinds: Vec<_> = e.iter().map(|x| x.kind).collect();
        assert!(kinds.contains(&ExtentKind::Data) && kinds.contains(&ExtentKind::Unallocated));
    }
}

#[test]
fn reads_backing_chain_of_depth_3() {
    let d = tmpdir();
    let base = p(d.path(), "base.qcow2");
    let mid = p(d.path(), "mid.qcow2");
    let top = p(d.path(), "top.qcow2");
    // base is smaller than the overlays: reads past its end are zeros
    qemu_img(&["create", "-f", "qcow2", s(&base), "3M"]);
    qemu_io(&base, "qcow2", &["write -P 0x01 0 3M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&mid),
        "6M",
    ]);
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x02 1M 1M", "write -z 2816k 64k"],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "8M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x03 1536k 1M", "write -P 0x04 7M 4k"],
    );
    assert_reads_like_qemu(&top);
    let r = open_path(&top, None, &OpenGate::new()).unwrap();
    let info = r.info();
    assert_eq!(info.backing_filename.as_deref(), Some("mid.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    let map = resolved_extents(r.as_ref(), 0, r.virtual_size()).unwrap();
    assert_eq!(map.lookup(0).unwrap().depth, 2);
    assert_eq!(map.lookup(2816 << 10).unwrap().kind, ExtentKind::Zero);
    assert_eq!(map.lookup(4 * MIB).unwrap().kind, ExtentKind::Zero);
}

#[test]
fn writes_each_cluster_size_and_compression() {
    let d = tmpdir();
    let src = source_raw(d.path());
    for opts in [
        "cluster_size=512",
        "",
        "cluster_size=2M",
        "compress=on",
        "compress=on,compression_type=zstd",
        "compress=on,cluster_size=2M,compression_type=zstd",
        "lazy_refcounts=on,compat=1.1,preallocation=off,extended_l2=off",
    ] {
        let out = p(d.path(), "out.qcow2");
        imgshift_convert(&src, Some(Format::Raw), &out, Format::Qcow2, opts);
        assert_check_clean(&out, "qcow2");
        assert_same(&src, "raw", &out, "qcow2");
        let info = qemu_img(&["info", "--output=json", s(&out)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let fs = &v["format-specific"]["data"];
        assert_eq!(fs["compat"], "1.1", "{opts}");
        if opts.contains("zstd") {
            assert_eq!(fs["compression-type"], "zstd");
        }
        if opts.contains("compress") {
            // the compressible ranges really were compressed
            let len = std::fs::metadata(&out).unwrap().len();
            // with 2 MiB clusters: header, one cluster of packed data, L2, L1, refcount table and block
            let limit = if opts.contains("2M") {
                12 * MIB
            } else {
                4 * MIB
            };
            assert!(len <= limit, "{opts}: {len}");
        }
        // our own reader agrees, and our check finds it clean
        let r = open_path(&out, None, &OpenGate::new()).unwrap();
        let rep = r.check().unwrap();
        assert_eq!(
            (rep.corruptions, rep.leaks),
            (0, 0),
            "{opts}: {:?}",
            rep.messages
        );
        std::fs::remove_file(&out).unwrap();
    }
}

/// raw → qcow2 through a forward-only stream (the layout used for stdout and uploads).
fn stream_convert(src: &Path, out: &Path, opts: &str) {
    let source = open_path(src, Some(Format::Raw), &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut w = create_writer(Format::Qcow2, &mut o).unwrap();
    let mut sink = StreamSink::new(std::fs::File::create(out).unwrap());
    convert(
        source.as_ref(),
        w.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
}

#[test]
fn writes_streaming_layout() {
    let d = tmpdir();
    let src = source_raw(d.path());
    for opts in ["", "cluster_size=512", "cluster_size=2M"] {
        let out = p(d.path(), "stream.qcow2");
        stream_convert(&src, &out, opts);
        assert_check_clean(&out, "qcow2");
        assert_same(&src, "raw", &out, "qcow2");
    }
    // compression needs a seekable destination
    let source = open_path(&src, Some(Format::Raw), &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.set("compress", "on");
    let mut w = create_writer(Format::Qcow2, &mut o).unwrap();
    let mut sink = StreamSink::new(Vec::new());
    let e = convert(
        source.as_ref(),
        w.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("seekable destination"), "{e}");
}

#[test]
fn writes_backing_file_reference() {
    let d = tmpdir();
    let base = p(d.path(), "base.raw");
    make_raw(&base, 8 * MIB, &[(0, 8 * MIB)], &[]);
    // the overlay's source: data in some clusters, explicit zeros in others, holes elsewhere
    let src = p(d.path(), "src.raw");
    let data = [(MIB, 256 << 10), (6 * MIB, 64 << 10)];
    let zeros = [(3 * MIB, MIB)];
    make_raw(&src, 8 * MIB, &data, &zeros);
    // expected: the base, with the source's data and zero ranges laid over it
    let expected = p(d.path(), "expected.raw");
    std::fs::copy(&base, &expected).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let s_ = std::fs::File::open(&src).unwrap();
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&expected)
            .unwrap();
        for &(off, len) in data.iter().chain(zeros.iter()) {
            let mut buf = vec![0u8; len as usize];
            s_.read_exact_at(&mut buf, off).unwrap();
            e.write_all_at(&buf, off).unwrap();
        }
    }
    for opts in ["", ",compress=on", "stream"] {
        let out = p(d.path(), "overlay.qcow2");
        if opts == "stream" {
            stream_convert(&src, &out, "backing_file=base.raw,backing_fmt=raw");
        } else {
            imgshift_convert(
                &src,
                Some(Format::Raw),
                &out,
                Format::Qcow2,
                &format!("backing_file=base.raw,backing_fmt=raw{opts}"),
            );
        }
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", s(&out)])).unwrap();
        assert_eq!(info["backing-filename"], "base.raw");
        assert_eq!(info["backing-filename-format"], "raw");
        assert_check_clean(&out, "qcow2");
        assert_same(&out, "qcow2", &expected, "raw");
        // and through imgshift's own reader, following the backing file through the gate
        let ours = p(d.path(), "ours.raw");
        imgshift_convert(&out, None, &ours, Format::Raw, "");
        assert_same(&ours, "raw", &expected, "raw");
        std::fs::remove_file(&out).unwrap();
    }
}

/// (refcount block offset, L1 table offset) of a qcow2 file with one refcount block.
fn tables(img: &Path) -> (u64, u64) {
    let b = std::fs::read(img).unwrap();
    let be = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let rt = be(48) as usize;
    (be(rt), be(40))
}

fn patch(img: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn check_reports_clean_leaks_and_corruption() {
    let d = tmpdir();
    let src = source_raw(d.path());
    let img = p(d.path(), "c.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&img)]);
    let open = |i: &Path| {
        open_path(i, None, &OpenGate::new())
            .unwrap()
            .check()
            .unwrap()
    };
    let rep = open(&img);
    assert_eq!((rep.corruptions, rep.leaks), (0, 0));
    assert!(rep.allocated_clusters > 0);
    assert_eq!(rep.total_clusters, (12 * MIB + 1536).div_ceil(65536));

    // a leak: one more cluster at the end of the file with refcount 1
    let leak = p(d.path(), "leak.qcow2");
    std::fs::copy(&img, &leak).unwrap();
    let len = std::fs::metadata(&leak).unwrap().len();
    let n = len.div_ceil(65536);
    let (rb, _) = tables(&leak);
    patch(&leak, rb + 2 * n, &1u16.to_be_bytes());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leak)
        .unwrap()
        .set_len((n + 1) * 65536)
        .unwrap();
    let rep = open(&leak);
    assert_eq!((rep.corruptions, rep.leaks), (0, 1), "{:?}", rep.messages);
    assert_eq!(qemu_img_status(&["check", s(&leak)]).0, 3);

    // corruption: the L1 table's cluster gets refcount 0
    let bad = p(d.path(), "bad.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    let (rb, l1) = tables(&bad);
    patch(&bad, rb + 2 * (l1 / 65536), &0u16.to_be_bytes());
    let rep = open(&bad);
    assert!(rep.corruptions >= 1, "{:?}", rep.messages);
    assert_eq!(qemu_img_status(&["check", s(&bad)]).0, 2);
}

#[test]
fn check_counts_snapshots_and_bitmaps() {
    let d = tmpdir();
    let src = source_raw(d.path());
    let img = p(d.path(), "snap.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&img)]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_img(&["bitmap", "--add", s(&img), "b1"]);
    // writes after the snapshot copy shared clusters; the bitmap records them
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x66 0 128k", "write -P 0x67 9M 64k"],
    );
    qemu_img(&["snapshot", "-c", "s2", s(&img)]);
    qemu_io(&img, "qcow2", &["write -P 0x68 64k 64k"]);
    // assert_reads_like_qemu also requires our check to find no errors and no leaks
    assert_reads_like_qemu(&img);
}

#[test]
fn refuses_bad_images() {
    let d = tmpdir();
    let good = p(d.path(), "good.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&good), "16M"]);
    qemu_io(&good, "qcow2", &["write -P 0x77 0 128k"]);
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = {
        let mut v = Vec::new();
        let mut m = |name: &'static str, f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = bytes.clone();
            f(&mut b);
            v.push((name, b));
        };
        m("empty", &|b| b.clear());
        m("truncated header", &|b| b.truncate(60));
        m("bad magic", &|b| b[3] = 0);
        m("version 1", &|b| {
            b[4..8].copy_from_slice(&1u32.to_be_bytes())
        });
        m("version 4", &|b| {
            b[4..8].copy_from_slice(&4u32.to_be_bytes())
        });
        m("cluster_bits 8", &|b| {
            b[20..24].copy_from_slice(&8u32.to_be_bytes())
        });
        m("cluster_bits 30", &|b| {
            b[20..24].copy_from_slice(&30u32.to_be_bytes())
        });
        m("L1 beyond EOF", &|b| {
            b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())
        });
        m("l1_size 2^31", &|b| {
            b[36..40].copy_from_slice(&(1u32 << 31).to_be_bytes())
        });
        m("refcount_order 7", &|b| {
            b[96..100].copy_from_slice(&7u32.to_be_bytes())
        });
        m("external data file bit", &|b| b[79] |= 4);
        m("unknown incompatible bit", &|b| b[78] |= 1);
        m("huge size", &|b| {
            b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())
        });
        v
    };
    for (name, b) in cases {
        let f = p(d.path(), "bad.qcow2");
        std::fs::write(&f, &b).unwrap();
        // Refused after reading the header and small tables: never the tables or disk a field claims.
        let (r, work) = file_work(name, move || {
            open_path(&f, Some(Format::Qcow2), &OpenGate::new()).map(|_| ())
        });
        let e = r.err().unwrap_or_else(|| panic!("{name}: opened"));
        eprintln!("{name}: {work:?}: {e}");
        work.assert_at_most(name, 1 << 20, 64);
        if name.contains("external") {
            assert!(
                e.to_string()
                    .contains("external data files are not supported"),
                "{e}"
            );
        }
    }

    // an L2 entry past the end of the file: open works, the read fails naming the offset
    let l2bad = p(d.path(), "l2bad.qcow2");
    let mut b = bytes.clone();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2..l2 + 8].copy_from_slice(&((1u64 << 45) | (1 << 63)).to_be_bytes());
    std::fs::write(&l2bad, &b).unwrap();
    let r = open_path(&l2bad, Some(Format::Qcow2), &OpenGate::new()).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = r.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("0x200000000000"), "{e}");

    // an external data file made by qemu-img
    let df = p(d.path(), "df.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&p(d.path(), "df.raw"))),
        s(&df),
        "1M",
    ]);
    let e = open_path(&df, None, &OpenGate::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("external data files are not supported"), "{e}");
}

#[test]
fn refuses_dangerous_backing_files() {
    let d = tmpdir();
    let sub = p(d.path(), "sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(p(d.path(), "x"), vec![0u8; 1 << 20]).unwrap();
    for (name, fmt) in [
        ("/etc/passwd", "raw"),
        ("../x", "raw"),
        ("json:{\"file\":\"/etc/passwd\"}", "raw"),
    ] {
        let img = sub.join("evil.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            name,
            "-F",
            fmt,
            s(&img),
            "1M",
        ]);
        let e = open_path(&img, None, &OpenGate::new()).err().unwrap();
        assert!(e.to_string().contains("refused"), "{name}: {e}");
    }
    // no recorded backing format: refused with the rebase hint
    let img = sub.join("nofmt.qcow2");
    std::fs::write(sub.join("b.raw"), vec![0u8; 1 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.raw",
        "-F",
        "raw",
        s(&img),
        "1M",
    ]);
    let mut b = std::fs::read(&img).unwrap();
    let ext = b
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    b[ext..ext + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&img, &b).unwrap();
    let e = open_path(&img, None, &OpenGate::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("qemu-img rebase -u"), "{e}");

    // a loop: a → b → a
    let a = p(d.path(), "a.qcow2");
    let bq = p(d.path(), "b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&bq),
        "1M",
    ]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    let e = open_path(&a, None, &OpenGate::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("loop"), "{e}");
}

/// Byte offset of the bitmaps header extension's data (qcow2.txt "Header extensions", type 0x23852875):
/// nb_bitmaps u32 at +0, bitmap_directory_size u64 at +8, bitmap_directory_offset u64 at +16.
fn bitmaps_extension(b: &[u8]) -> usize {
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let mut at = be32(100) as usize;
    loop {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn check_bounds_the_bitmap_walk() {
    let d = tmpdir();
    let img = p(d.path(), "bm.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "16M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b1"]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x42 0 128k", "write -P 0x43 8M 64k"],
    );
    let bytes = std::fs::read(&img).unwrap();
    let ext = bitmaps_extension(&bytes);
    let be64 = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap());
    let (dir_size, dir_off) = (be64(ext + 8), be64(ext + 16) as usize);
    // One entry: 24 bytes, the 2-byte name "b1", padded to 32.
    assert_eq!(dir_size, 32);
    let entry = bytes[dir_off..dir_off + 32].to_vec();
    let table_off = u64::from_be_bytes(entry[..8].try_into().unwrap());
    let check = |b: &[u8], name: &str| {
        let f = p(d.path(), name);
        std::fs::write(&f, b).unwrap();
        let (rep, work) = file_work(name, move || {
            open_path(&f, None, &OpenGate::new())
                .unwrap()
                .check()
                .unwrap()
        });
        // However many bitmaps or table entries the directory claims, check reads the file about once: each
        // table is read once, not once per entry naming it.
        eprintln!("{name}: check of {} bytes did {work:?}", b.len());
        work.assert_at_most(name, 2 * b.len() as u64 + (1 << 20), 4096);
        rep
    };
    let rep = check(&bytes, "clean.qcow2");
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);

    // nb_bitmaps above qemu's QCOW2_MAX_BITMAPS: reported, the one real entry still counted.
    let mut b = bytes.clone();
    b[ext..ext + 4].copy_from_slice(&70_000u32.to_be_bytes());
    let rep = check(&b, "many.qcow2");
    assert!(
        rep.messages.iter().any(|m| m
            .contains("the bitmaps extension claims 70000 bitmaps, above qemu's limit of 65535")),
        "{:?}",
        rep.messages
    );
    assert!(
        rep.messages
            .iter()
            .any(|m| m.contains("bitmap directory entry 1 is truncated")),
        "{:?}",
        rep.messages
    );
    assert_eq!(rep.leaks, 0, "{:?}", rep.messages);

    // The directory cluster filled with 2000 copies of the entry: the table is read once and its cluster
    // counted 2000 times, as qemu-img check would count it.
    let mut b = bytes.clone();
    // qemu allocated the directory a cluster of its own; the file may end inside it.
    b.resize(b.len().max(dir_off + 64_000), 0);
    for i in 0..2000 {
        b[dir_off + 32 * i..dir_off + 32 * (i + 1)].copy_from_slice(&entry);
    }
    b[ext..ext + 4].copy_from_slice(&2000u32.to_be_bytes());
    b[ext + 8..ext + 16].copy_from_slice(&64_000u64.to_be_bytes());
    let rep = check(&b, "repeated.qcow2");
    let table_msg = format!("(offset {table_off:#x}) refcount=1 reference=2000");
    assert!(
        rep.messages.iter().any(|m| m.contains(&table_msg)),
        "{table_msg}: {:?}",
        rep.messages
    );

    // ... and each copy claiming a table that runs to the end of the file: still one read of the file.
    let to_eof = ((b.len() as u64 - table_off) / 8) as u32;
    for i in 0..2000 {
        b[dir_off + 32 * i + 8..dir_off + 32 * i + 12].copy_from_slice(&to_eof.to_be_bytes());
    }
    let rep = check(&b, "repeated-to-eof.qcow2");
    assert!(rep.corruptions > 0, "{:?}", rep.messages);

    // A table larger than qemu's BME_MAX_TABLE_SIZE.
    let mut b = bytes.clone();
    b[dir_off + 8..dir_off + 12].copy_from_slice(&0x800_0001u32.to_be_bytes());
    let rep = check(&b, "huge-table.qcow2");
    assert!(
        rep.messages
            .iter()
            .any(|m| m
                .contains("bitmap 0: a table of 134217729 entries (qemu allows 1 to 134217728)")),
        "{:?}",
        rep.messages
    );
}
