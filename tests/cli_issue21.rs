#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Issue 21: a command line a qemu-img user trusts. Closed pipes, check's exit codes on corrupt images, `-o help`,
//! signals, inspect without an OS, --help, the smaller items, and `measure` against qemu-img measure.

mod util;

use std::io::Read as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::*;

/// A qcow2 made by qemu-img (64 MiB virtual, 1 MiB of data at 0 and 3 MiB at 10 MiB).
fn qcow2_with_data(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0xab 0 1M", "write -P 0x5a 10M 3M"],
    );
    img
}

/// Runs imgshift with its standard output a pipe whose reader is already gone (as after `| head -c 10` has
/// read its bytes and exited). Returns (exit code, stderr).
fn with_closed_stdout(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(imgshift_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our (the only) read end before the child writes anything.
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), err)
}

/// Regression (issue 21): every printing command ends quietly with exit 0 when its reader went away; today
/// `failed printing to stdout: Broken pipe` and exit 101.
#[test]
fn closed_pipe_ends_printing_commands_quietly() {
    let d = tmpdir();
    let q = qcow2_with_data(d.path(), "a.qcow2");
    let b = d.path().join("b.qcow2");
    std::fs::copy(&q, &b).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", s(&q)],
        vec!["info", "--output", "json", s(&q)],
        vec!["check", s(&q)],
        vec!["check", "--output", "json", s(&q)],
        vec!["map", s(&q)],
        vec!["map", "--output", "json", s(&q)],
        vec!["compare", s(&q), s(&b)],
        vec!["inspect", s(&q)],
        vec!["measure", "-O", "qcow2", s(&q)],
        vec!["convert", "-O", "qcow2", "-o", "help"],
    ];
    for args in cases {
        let (code, err) = with_closed_stdout(&args);
        assert_eq!((code, err.as_str()), (0, ""), "imgshift {args:?}");
    }
}

/// `convert ... -` whose reader went away: one line saying so, exit 1.
#[test]
fn closed_pipe_on_convert_to_stdout_says_the_reader_went_away() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 8 << 20, &[(0, 4 << 20)], &[]);
    let (code, err) = with_closed_stdout(&["convert", "-O", "raw", s(&a), "-"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("reader went away"), "{err}");
}

/// A qcow2 whose first L2 entry points far past the end of the file (the corpus's qcow2-data-past-eof).
fn data_past_eof(dir: &Path) -> PathBuf {
    let img = qcow2_with_data(dir, "bad.qcow2");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&((1u64 << 63) | (1u64 << 40)).to_be_bytes(), l2)
        .unwrap();
    img
}

/// Regression (issue 21): a structurally corrupt qcow2 is a check result: exit 2 with the problems listed, as
/// qemu-img check; not exit 1.
#[test]
fn check_on_corrupt_qcow2_exits_2_listing_the_problems() {
    let d = tmpdir();
    // Truncated: to 1 MiB (data clusters cut off), and to 100 KiB (the L1 table at 0x30000 cut off too, so
    // the reader itself refuses the image).
    let truncated = |name: &str, len: u64| {
        let p = qcow2_with_data(d.path(), name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len)
            .unwrap();
        p
    };
    let trunc = truncated("trunc.qcow2", 1 << 20);
    let short = truncated("short.qcow2", 100 << 10);
    let bad = data_past_eof(d.path());
    for img in [&trunc, &short, &bad] {
        let q = qemu_img_status(&["check", "-f", "qcow2", s(img)]);
        assert_eq!(
            q.code, 2,
            "qemu-img check {img:?}: {}{}",
            q.stdout, q.stderr
        );
        let r = imgshift(&["check", s(img)]);
        assert_eq!(r.code, 2, "{img:?}: {} {}", r.stdout, r.stderr);
        assert!(r.stdout.contains("ERROR"), "{}", r.stdout);
        assert!(
            r.stdout.contains("errors were found on the image"),
            "{}",
            r.stdout
        );
        let j = imgshift(&["check", "--output", "json", s(img)]);
        assert_eq!(j.code, 2, "{}", j.stderr);
        let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
        assert!(v["corruptions"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(v["format"], "qcow2");
    }
    // A file that is no qcow2 at all is still an error (exit 1), as qemu-img's "Could not open".
    let junk = d.path().join("junk");
    std::fs::write(&junk, b"QFI\xfb\0\0\0\x03").unwrap();
    assert_eq!(imgshift(&["check", "-f", "qcow2", s(&junk)]).code, 1);
}

/// `-o help` lists each writer's options with defaults and descriptions; every key named there is accepted.
#[test]
fn o_help_lists_each_writers_options() {
    let expect: &[(&str, &[&str])] = &[
        ("raw", &[]),
        (
            "qcow2",
            &[
                "cluster_size",
                "compression_type",
                "backing_file",
                "backing_fmt",
                "lazy_refcounts",
            ],
        ),
        ("vpc", &["subformat", "force_size", "round_to_mib"]),
        (
            "vhdx",
            &["subformat", "block_size", "log_size", "block_state_zero"],
        ),
        (
            "vmdk",
            &[
                "subformat",
                "adapter_type",
                "hwversion",
                "compat6",
                "zeroed_grain",
            ],
        ),
        ("vdi", &["static"]),
    ];
    for (fmt, keys) in expect {
        let r = imgshift(&["convert", "-O", fmt, "-o", "help"]).ok();
        for k in *keys {
            let line = r
                .stdout
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{k}=")))
                .unwrap_or_else(|| panic!("-O {fmt} -o help lacks {k}: {}", r.stdout));
            assert!(line.contains("default: "), "{line}");
            assert!(line.contains(" - "), "no description: {line}");
        }
        // qemu-img knows every key imgshift lists for these formats (except imgshift's own additions).
        let q = qemu_img(&["create", "-f", fmt, "-o", "help"]);
        for k in keys
            .iter()
            .filter(|k| !["round_to_mib", "logical_sector_size"].contains(k))
        {
            assert!(q.contains(&format!("{k}=")), "qemu-img -O {fmt} has no {k}");
        }
    }
    assert!(
        imgshift(&["convert", "-O", "vpc", "-o", "help"])
            .stdout
            .contains("default: dynamic")
    );
    assert!(
        imgshift(&["convert", "-O", "qcow2", "-o", "help"])
            .stdout
            .contains("default: 64k")
    );
}

/// An unknown `-o` key lists the valid ones; `-c -O vmdk` points at subformat=streamOptimized.
#[test]
fn unknown_option_lists_valid_ones_and_c_with_vmdk_names_the_subformat() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 1 << 20, &[(0, 4096)], &[]);
    let out = d.path().join("o.vhd");
    let r = imgshift(&["convert", "-O", "vpc", "-o", "bogus=1", s(&a), s(&out)]);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    for k in ["bogus", "subformat", "force_size", "round_to_mib"] {
        assert!(r.stderr.contains(k), "{}", r.stderr);
    }
    let vmdk = d.path().join("o.vmdk");
    let r = imgshift(&["convert", "-c", "-O", "vmdk", s(&a), s(&vmdk)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("subformat=streamOptimized"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("'compress'"), "{}", r.stderr);
    // With the subformat, -c is accepted (the output is compressed anyway).
    imgshift(&[
        "convert",
        "-c",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&a),
        s(&vmdk),
    ])
    .ok();
    assert_same(&a, "raw", &vmdk, "vmdk");
    assert_eq!(files_in(d.path()), vec!["a.raw", "o.vmdk"]);
}

/// Regression (issue 19/21): SIGINT during convert removes the hidden temporary output and exits 130; SIGTERM
/// exits 143.
#[test]
fn signal_during_convert_leaves_nothing_and_exits_130_or_143() {
    let d = tmpdir();
    let src = d.path().join("src.raw");
    // 8 GiB virtual with 384 MiB of incompressible data: compressing it into streamOptimized takes seconds.
    let pieces: Vec<(u64, u64)> = (0..12).map(|i| (i * (512 << 20), 32 << 20)).collect();
    make_raw(&src, 8 << 30, &pieces, &[]);
    for (sig, want) in [("-INT", 130), ("-TERM", 143)] {
        let out_dir = d.path().join(format!("out{want}"));
        std::fs::create_dir(&out_dir).unwrap();
        let mut child = Command::new(imgshift_bin())
            .args([
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                s(&src),
                s(&out_dir.join("out.vmdk")),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The temporary output exists: the conversion is under way.
        let mut seen = false;
        for _ in 0..2000 {
            if !files_in(&out_dir).is_empty() {
                seen = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(seen, "no temporary output appeared");
        let k = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(k.success());
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(want), "{sig}: {err}");
        assert_eq!(files_in(&out_dir), Vec::<String>::new(), "{sig}: {err}");
    }
}

/// A raw disk holding no operating system: inspect says so, names what it found, and claims no disk bus.
#[test]
fn inspect_without_an_os_says_so() {
    let d = tmpdir();
    let img = d.path().join("blank.raw");
    make_raw(&img, 64 << 20, &[], &[]);
    let r = imgshift(&["inspect", s(&img)]).ok();
    assert!(
        r.stdout.contains("no operating system found"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("partition table none"), "{}", r.stdout);
    let r = imgshift(&[
        "inspect",
        "--target",
        "libvirt",
        "--output",
        "json",
        s(&img),
    ]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        v["no_operating_system"]
            .as_str()
            .unwrap()
            .contains("no operating system found"),
        "{v}"
    );
    assert!(v["preflight"]["settings"].get("bus").is_none(), "{v}");
    // An XFS root (superblock magic only): recognised, and said to be unread, with the reason.
    let xfs = d.path().join("xfs.raw");
    make_raw(&xfs, 64 << 20, &[], &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&xfs)
        .unwrap()
        .write_all_at(b"XFSB", 0)
        .unwrap();
    let r = imgshift(&["inspect", s(&xfs)]).ok();
    assert!(
        r.stdout.contains("no operating system found"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("XFS, btrfs, LVM and LUKS"),
        "{}",
        r.stdout
    );
}

/// --help: examples on the main commands; one true --disk-bus description; --allow-dir outside the libvirt
/// options of migrate; --output json claims qemu-img names only where they are.
#[test]
fn help_has_examples_and_true_descriptions() {
    for cmd in ["convert", "info", "inspect", "migrate", "measure", "check"] {
        let r = imgshift(&[cmd, "--help"]).ok();
        assert!(r.stdout.contains("Examples:"), "{cmd} --help: {}", r.stdout);
    }
    let m = imgshift(&["migrate", "--help"]).ok().stdout;
    let libvirt = m.find("libvirt (--to libvirt):").unwrap();
    let allow = m.find("--allow-dir").unwrap();
    let heading_between = m[libvirt..allow]
        .lines()
        .skip(1)
        .any(|l| !l.starts_with(' ') && l.ends_with(':'));
    assert!(allow < libvirt || heading_between, "{m}");
    // The text of `opt`'s description (up to its default) in `cmd --help`.
    let desc = |cmd: &[&str], opt: &str| -> String {
        let h = imgshift(cmd).ok().stdout;
        let i = h.find(&format!("{opt} <")).unwrap();
        h[i..]
            .split("[default")
            .next()
            .unwrap()
            .split_whitespace()
            .skip(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    for opt in ["--disk-bus", "--firmware"] {
        assert_eq!(
            desc(&["migrate", "--help"], opt),
            desc(&["upload", "libvirt", "--help"], opt),
            "{opt}"
        );
    }
    let info = imgshift(&["upload", "libvirt", "--help"]).ok().stdout;
    assert!(!info.contains("qemu-img's field names"), "{info}");
}

/// The smaller items: folder errors, usage exit code, compare's size warning, an overlay onto its own backing
/// file, holes on a redirected stdout, the summary line.
#[test]
fn smaller_items() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 8 << 20, &[(0, 1 << 20)], &[]);
    // A missing output folder is named, not the hidden temporary file.
    let r = imgshift(&[
        "convert",
        "-O",
        "qcow2",
        s(&a),
        "/nonexistent-dir/out.qcow2",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("/nonexistent-dir does not exist"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("imgshift-tmp"), "{}", r.stderr);
    // A folder as the image: said once.
    let adir = d.path().join("adir");
    std::fs::create_dir(&adir).unwrap();
    let r = imgshift(&["info", s(&adir)]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.matches(s(&adir)).count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("is a directory"), "{}", r.stderr);
    let r = imgshift(&["convert", "-O", "raw", s(&a), s(&adir)]);
    assert_eq!(r.stderr.matches(s(&adir)).count(), 1, "{}", r.stderr);
    // An unknown -O is a usage error.
    let r = imgshift(&["convert", "-O", "qcow3", s(&a), s(&d.path().join("x"))]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("qcow3"), "{}", r.stderr);
    // compare warns as qemu-img does when sizes differ.
    let big = d.path().join("big.raw");
    make_raw(&big, 16 << 20, &[], &[]);
    std::fs::copy(&a, &big).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let q = qemu_img_status(&["compare", s(&a), s(&big)]);
    let r = imgshift(&["compare", s(&a), s(&big)]);
    assert_eq!((r.code, r.stdout.as_str()), (q.code, q.stdout.as_str()));
    assert!(r.stdout.contains("Warning: Image size mismatch!"));
    // Converting an overlay onto its own backing file is refused, and the backing file is untouched.
    let base = d.path().join("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&a), s(&base)]);
    let top = d.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let before = std::fs::read(&base).unwrap();
    let r = imgshift(&["convert", "-O", "qcow2", s(&top), s(&base)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("backing file"), "{}", r.stderr);
    assert_eq!(std::fs::read(&base).unwrap(), before);
    // `convert -O raw - > FILE` makes holes.
    let sparse = d.path().join("sparse.raw");
    make_raw(&sparse, 256 << 20, &[(0, 1 << 20)], &[]);
    let redirected = d.path().join("redirected.raw");
    let out = std::fs::File::create(&redirected).unwrap();
    let st = Command::new(imgshift_bin())
        .args(["convert", "-O", "raw", s(&sparse), "-"])
        .stdout(out)
        .status()
        .unwrap();
    assert!(st.success());
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&redirected).unwrap();
    assert_eq!(m.len(), 256 << 20);
    assert!(
        m.blocks() * 512 < 16 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );
    assert_same(&sparse, "raw", &redirected, "raw");
    // A summary line once the progress display ends.
    let r = imgshift(&[
        "convert",
        "-p",
        "-O",
        "qcow2",
        s(&a),
        s(&d.path().join("p.qcow2")),
    ])
    .ok();
    assert!(
        r.stderr.lines().last().unwrap().contains("converted"),
        "{}",
        r.stderr
    );
}

/// `measure` agrees with `qemu-img measure` for raw and qcow2 (the formats qemu measures) on several cluster
/// sizes, and for the other formats `required` is exactly the length of the streamed output.
#[test]
fn measure_agrees_with_qemu_img() {
    let d = tmpdir();
    let q = qcow2_with_data(d.path(), "m.qcow2");
    let cases: &[(&str, &[&str])] = &[
        ("raw", &[]),
        ("qcow2", &[]),
        ("qcow2", &["-o", "cluster_size=2M"]),
        ("qcow2", &["-o", "cluster_size=4k"]),
    ];
    for (fmt, extra) in cases {
        let mut a = vec!["measure", "--output", "json", "-O", fmt];
        a.extend_from_slice(extra);
        a.push(s(&q));
        let ours: serde_json::Value = serde_json::from_str(&imgshift(&a).ok().stdout).unwrap();
        let mut b = vec!["measure", "--output", "json", "-O", fmt];
        b.extend_from_slice(extra);
        b.push(s(&q));
        let theirs: serde_json::Value = serde_json::from_str(&qemu_img(&b)).unwrap();
        assert_eq!(ours["required"], theirs["required"], "-O {fmt} {extra:?}");
        assert_eq!(
            ours["fully-allocated"], theirs["fully-allocated"],
            "-O {fmt} {extra:?}"
        );
    }
    // Sources of other formats: the same numbers as qemu-img (not VHDX: qemu's vhdx driver reports no
    // allocation, so it counts every block as data).
    for src_fmt in ["vmdk", "vpc", "vdi"] {
        let src = d.path().join(format!("src.{src_fmt}"));
        qemu_img(&["convert", "-O", src_fmt, s(&q), s(&src)]);
        for out in ["qcow2", "raw"] {
            let ours: serde_json::Value = serde_json::from_str(
                &imgshift(&["measure", "--output", "json", "-O", out, s(&src)])
                    .ok()
                    .stdout,
            )
            .unwrap();
            let theirs: serde_json::Value = serde_json::from_str(&qemu_img(&[
                "measure",
                "--output",
                "json",
                "-O",
                out,
                s(&src),
            ]))
            .unwrap();
            for k in ["required", "fully-allocated"] {
                assert_eq!(ours[k], theirs[k], "{src_fmt} -> {out}: {k}");
            }
        }
    }
    for (fmt, opts) in [
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
        ("vhdx", "subformat=dynamic"),
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("vdi", "static=off"),
    ] {
        let v: serde_json::Value = serde_json::from_str(
            &imgshift(&["measure", "--output", "json", "-O", fmt, "-o", opts, s(&q)])
                .ok()
                .stdout,
        )
        .unwrap();
        let out = Command::new(imgshift_bin())
            .args(["convert", "-O", fmt, "-o", opts, s(&q), "-"])
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            v["required"].as_u64().unwrap(),
            out.stdout.len() as u64,
            "-O {fmt} -o {opts}"
        );
        if opts != "subformat=streamOptimized" {
            assert!(v["fully-allocated"].as_u64().unwrap() >= v["required"].as_u64().unwrap());
        }
    }
    let r = imgshift(&["measure", "-O", "raw", "--target", "aws", s(&q)]).ok();
    assert!(r.stdout.contains("EBS volume: 1 GiB"), "{}", r.stdout);
    let r = imgshift(&["measure", "-O", "vpc", "--target", "azure", s(&q)]).ok();
    assert!(
        r.stdout
            .contains(&format!("Azure upload size: {} bytes", (64 << 20) + 512)),
        "{}",
        r.stdout
    );
}

/// `map --output json` gives qemu-img map's rows, host `offset` included, for an overlay over a qcow2 and for a
/// raw file.
#[test]
fn map_json_has_host_offsets_like_qemu_img() {
    let d = tmpdir();
    let base = qcow2_with_data(d.path(), "base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io("qcow2", &top, &["write -P 0x11 512k 64k"]);
    let raw = d.path().join("a.raw");
    make_raw(&raw, 4 << 20, &[(1 << 20, 64 << 10)], &[]);
    let vdi = d.path().join("a.vdi");
    qemu_img(&["convert", "-O", "vdi", s(&base), s(&vdi)]);
    for img in [&base, &top, &raw, &vdi] {
        let ours: serde_json::Value =
            serde_json::from_str(&imgshift(&["map", "--output", "json", s(img)]).ok().stdout)
                .unwrap();
        let theirs: serde_json::Value =
            serde_json::from_str(&qemu_img(&["map", "--output", "json", s(img)])).unwrap();
        let keys = [
            "start",
            "length",
            "depth",
            "present",
            "zero",
            "data",
            "compressed",
            "offset",
        ];
        let pick = |v: &serde_json::Value| -> Vec<Vec<serde_json::Value>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| keys.iter().map(|k| r[k].clone()).collect())
                .collect()
        };
        assert_eq!(pick(&ours), pick(&theirs), "{img:?}");
    }
}

/// The rows of a `map --output json` as comparable tuples (every field qemu-img prints; `offset` null when absent).
fn map_rows(json: &str) -> Vec<Vec<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let keys = [
        "start",
        "length",
        "depth",
        "present",
        "zero",
        "data",
        "compressed",
        "offset",
    ];
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| keys.iter().map(|k| r[k].clone()).collect())
        .collect()
}

/// Regression (issue 21): `map --output json` gives qemu-img's rows, `offset` included, for VHD (fixed and
/// dynamic) and every VMDK subformat; for multi-file VMDKs the offset is within the extent's own file, as
/// qemu-img reports it (its JSON names no file); stream-optimized grains are compressed, without an offset.
#[test]
fn map_json_host_offsets_for_vhd_and_vmdk_match_qemu_img() {
    let d = tmpdir();
    let base = qcow2_with_data(d.path(), "base.qcow2");
    qemu_io(
        "qcow2",
        &base,
        &["write -z 20M 1M", "write -P 0x77 30M 64k"],
    );
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();
    for (name, fmt, opts) in [
        ("dyn.vhd", "vpc", "subformat=dynamic"),
        ("fixed.vhd", "vpc", "subformat=fixed"),
        ("mono.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("stream.vmdk", "vmdk", "subformat=streamOptimized"),
    ] {
        let img = d.path().join(name);
        qemu_img(&["convert", "-O", fmt, "-o", opts, s(&base), s(&img)]);
        cases.push((img, fmt));
    }
    // Multi-file: 5 GiB in 2 GiB extents, data in the second and third files.
    for (name, sub) in [
        ("split.vmdk", "twoGbMaxExtentSparse"),
        ("splitflat.vmdk", "twoGbMaxExtentFlat"),
    ] {
        let img = d.path().join(name);
        let o = format!("subformat={sub}");
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", &o, s(&img), "5G"]);
        qemu_io(
            "vmdk",
            &img,
            &[
                "write -P 1 0 64k",
                "write -P 2 3G 128k",
                "write -P 3 4607M 64k",
            ],
        );
        cases.push((img, "vmdk"));
    }
    for (img, fmt) in &cases {
        let ours = imgshift(&["map", "--output", "json", "-f", fmt, s(img)])
            .ok()
            .stdout;
        let theirs = qemu_img(&["map", "--output", "json", "-f", fmt, s(img)]);
        let rows = map_rows(&ours);
        assert_eq!(
            rows,
            map_rows(&theirs),
            "{img:?}\nours: {ours}\ntheirs: {theirs}"
        );
        let with_offset = rows.iter().filter(|r| !r[7].is_null()).count();
        if img.ends_with("stream.vmdk") {
            assert_eq!(with_offset, 0, "{ours}");
            assert!(rows.iter().any(|r| r[6] == true), "{ours}");
        } else {
            assert!(with_offset > 0, "{img:?}: {ours}");
        }
    }
}

/// VHDX: qemu-img's vhdx driver reports no offsets (it has no block status), so the oracle is the file itself:
/// the bytes at each reported offset are the guest's bytes there.
#[test]
fn map_json_host_offsets_for_vhdx_point_at_the_data() {
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let img = d.path().join("a.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&img), "256M"]);
    qemu_io(
        "vhdx",
        &img,
        &[
            "write -P 0x31 0 64k",
            "write -P 0x32 40M 3M",
            "write -P 0x33 200M 1M",
        ],
    );
    let raw = d.path().join("a.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let ours = imgshift(&["map", "--output", "json", s(&img)]).ok().stdout;
    let rows: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let (file, guest) = (
        std::fs::File::open(&img).unwrap(),
        std::fs::File::open(&raw).unwrap(),
    );
    let mut mapped = 0u64;
    for r in rows.as_array().unwrap() {
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        match r["offset"].as_u64() {
            Some(off) => {
                assert_eq!(r["data"], true, "{r}");
                let (mut a, mut b) = (vec![0u8; len as usize], vec![0u8; len as usize]);
                file.read_exact_at(&mut a, off).unwrap();
                guest.read_exact_at(&mut b, start).unwrap();
                assert!(
                    a == b,
                    "row {r}: the file's bytes at the offset differ from the guest's"
                );
                mapped += len;
            }
            None => assert_eq!(r["zero"], true, "{r}"),
        }
    }
    // Every written range is mapped (whole payload blocks: qemu allocates blocks of 8 MiB or more).
    assert!(mapped >= (64 << 10) + (3 << 20) + (1 << 20), "{ours}");
}

/// Issue 23: `info` lists a qcow2's persistent bitmaps under format-specific `bitmaps` (name, granularity, flags)
/// as qemu-img info does, the in-use flag included; the human form nests them as qemu-img does.
#[test]
fn info_lists_qcow2_bitmaps_like_qemu_img() {
    let d = tmpdir();
    let img = qcow2_with_data(d.path(), "bm.qcow2");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "1M",
        "--disable",
        s(&img),
        "nightly",
    ]);
    qemu_io("qcow2", &img, &["write -P 1 2M 64k"]);
    let check = |img: &Path| {
        let ours: serde_json::Value =
            serde_json::from_str(&imgshift(&["info", "--output", "json", s(img)]).ok().stdout)
                .unwrap();
        let theirs: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output", "json", s(img)])).unwrap();
        let b = &theirs["format-specific"]["data"]["bitmaps"];
        assert_eq!(b.as_array().map(Vec::len), Some(2), "{theirs}");
        assert_eq!(&ours["format-specific"]["data"]["bitmaps"], b, "{ours}");
    };
    check(&img);
    let human = imgshift(&["info", s(&img)]).ok().stdout;
    for line in [
        "    bitmaps:",
        "        [1]:",
        "            name: nightly",
        "            granularity: 1048576",
    ] {
        assert!(human.lines().any(|l| l == line), "{line:?} in\n{human}");
    }
    // The in-use flag set by hand (flags of the first directory entry) shows as qemu-img shows it.
    let head = std::fs::read(&img).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(head[o..o + 4].try_into().unwrap());
    let mut off = be32(100) as usize;
    while be32(off) != 0x2385_2875 {
        assert_ne!(be32(off), 0, "no bitmaps extension");
        off += 8 + (be32(off + 4) as usize).div_ceil(8) * 8;
    }
    let dir = u64::from_be_bytes(head[off + 24..off + 32].try_into().unwrap());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&3u32.to_be_bytes(), dir + 12).unwrap();
    drop(f);
    check(&img);
}

/// `info --backing-chain` lists every layer as qemu-img info --backing-chain does.
#[test]
fn info_backing_chain_lists_every_layer() {
    let d = tmpdir();
    qcow2_with_data(d.path(), "base.qcow2");
    let mid = d.path().join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&mid),
    ]);
    let top = d.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let ours: serde_json::Value = serde_json::from_str(
        &imgshift(&["info", "--backing-chain", "--output", "json", s(&top)])
            .ok()
            .stdout,
    )
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        s(&top),
    ]))
    .unwrap();
    let pick =
        |v: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["filename"].clone(),
                        l["format"].clone(),
                        l["backing-filename"].clone(),
                    )
                })
                .collect()
        };
    assert_eq!(pick(&ours), pick(&theirs));
    let human = imgshift(&["info", "--backing-chain", s(&top)]).ok().stdout;
    assert_eq!(
        human.lines().filter(|l| l.starts_with("image: ")).count(),
        3,
        "{human}"
    );
}

/// `convert -n` writes into an existing raw target as qemu-img convert -n does: zero ranges overwritten unless
/// `--target-is-zero`; the target keeps its size and inode; other output formats are a usage error.
#[test]
fn convert_n_writes_into_an_existing_target() {
    let d = tmpdir();
    let q = qcow2_with_data(d.path(), "src.qcow2");
    let fill = |p: &Path, len: u64| {
        std::fs::write(p, vec![0xffu8; len as usize]).unwrap();
    };
    // A target full of 0xff, larger than the source: after -n its first 64 MiB are the source's.
    let t = d.path().join("t.raw");
    fill(&t, (64 << 20) + 4096);
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&t).unwrap().ino();
    imgshift(&["convert", "-n", "-O", "raw", s(&q), s(&t)]).ok();
    assert_eq!(std::fs::metadata(&t).unwrap().ino(), ino);
    assert_eq!(std::fs::metadata(&t).unwrap().len(), (64 << 20) + 4096);
    let r = qemu_img_status(&["compare", "-f", "qcow2", "-F", "raw", s(&q), s(&t)]);
    // qemu-img compare: the longer image's tail (0xff) differs, the rest is equal.
    assert!(
        r.stdout.contains(&format!("offset {}", 64 << 20)),
        "{}",
        r.stdout
    );
    // Same with qemu-img convert -n, for the oracle.
    let t2 = d.path().join("t2.raw");
    fill(&t2, (64 << 20) + 4096);
    qemu_img(&["convert", "-n", "-O", "raw", s(&q), s(&t2)]);
    assert_eq!(std::fs::read(&t).unwrap(), std::fs::read(&t2).unwrap());
    // --target-is-zero trusts the user: zero ranges are not written.
    let z = d.path().join("z.raw");
    fill(&z, 64 << 20);
    imgshift(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "raw",
        s(&q),
        s(&z),
    ])
    .ok();
    let bytes = std::fs::read(&z).unwrap();
    assert_eq!(bytes[(2 << 20) as usize], 0xff, "a zero range was written");
    assert_eq!(bytes[0], 0xab);
    // A smaller target is refused; -n with another format is a usage error.
    let small = d.path().join("small.raw");
    fill(&small, 1 << 20);
    let r = imgshift(&["convert", "-n", "-O", "raw", s(&q), s(&small)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("smaller"), "{}", r.stderr);
    let r = imgshift(&["convert", "-n", "-O", "vmdk", s(&q), s(&t)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("qcow2 image or fixed VHD"),
        "{}",
        r.stderr
    );
    let r = imgshift(&["convert", "--target-is-zero", "-O", "raw", s(&q), s(&t)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// The source of the `-n` tests: 64 MiB, data at 0 and 10 MiB, a piece that starts and ends inside clusters,
/// and the last 4 KiB.
fn n_source(dir: &Path) -> PathBuf {
    let img = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x5a 10M 3M",
            "write -P 0x11 33000k 5k",
            "write -P 0x22 65532k 4k",
        ],
    );
    img
}

/// Regression (issue 21): `convert -n -O qcow2` writes through the existing qcow2's own tables (qemu-img
/// convert -n): empty, small- and large-cluster, compat=0.10, pre-filled, backed and larger targets all pass
/// qemu-img check and compare equal to the source; `--target-is-zero` leaves zero ranges alone.
#[test]
fn convert_n_into_existing_qcow2() {
    let d = tmpdir();
    let src = n_source(d.path());
    let t = d.path().join("t.qcow2");
    let base = d.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    qemu_io("qcow2", &base, &["write -P 0x77 0 64M"]);
    // (create options, pre-fill the target with 0xff, backing file, size)
    let cases: [(&[&str], bool, bool, &str); 9] = [
        (&[], false, false, "64M"),
        (&["-o", "cluster_size=4096"], false, false, "64M"),
        (&["-o", "cluster_size=2M"], false, false, "64M"),
        (&["-o", "compat=0.10"], false, false, "64M"),
        (&[], true, false, "64M"),
        (&["-o", "compat=0.10,cluster_size=4096"], true, false, "64M"),
        (&[], false, true, "64M"),
        (&["-o", "compat=0.10"], false, true, "64M"),
        (&[], true, false, "96M"),
    ];
    for (opts, fill, backed, size) in cases {
        let _ = std::fs::remove_file(&t);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        if backed {
            args.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
        }
        args.extend_from_slice(&[s(&t), size]);
        qemu_img(&args);
        if fill {
            qemu_io("qcow2", &t, &["write -P 0xff 0 64M"]);
        }
        let what = format!("{opts:?} fill={fill} backed={backed} size={size}");
        let r = imgshift(&["convert", "-n", "-O", "qcow2", s(&src), s(&t)]);
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert_check_clean(&t, "qcow2");
        let c = qemu_img_status(&["compare", "-f", "qcow2", "-F", "qcow2", s(&src), s(&t)]);
        assert_eq!(c.code, 0, "{what}: {}{}", c.stdout, c.stderr);
        if backed {
            // Nothing of the backing file shows through: zero ranges are zero clusters (v3) or zeros (v2).
            let info: serde_json::Value =
                serde_json::from_str(&qemu_img(&["map", "--output", "json", s(&t)])).unwrap();
            assert!(
                info.as_array().unwrap().iter().all(|r| r["depth"] == 0),
                "{what}: {info}"
            );
        }
    }
    // 512-byte clusters: 24 MiB of new data outgrows the refcount table qemu-img made (one cluster, covering
    // 8 MiB of file); the table moves to a larger copy and the header follows it, as in qemu's driver.
    let big = d.path().join("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&big), "64M"]);
    qemu_io("qcow2", &big, &["write -P 1 0 24M", "write -P 2 40M 1k"]);
    let _ = std::fs::remove_file(&t);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&t),
        "64M",
    ]);
    let reftable = |p: &Path| std::fs::read(p).unwrap()[48..60].to_vec();
    let before = reftable(&t);
    let r = imgshift(&["convert", "-n", "-O", "qcow2", s(&big), s(&t)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_check_clean(&t, "qcow2");
    assert_same(&big, "qcow2", &t, "qcow2");
    assert_ne!(reftable(&t), before, "the refcount table did not move");
    // --target-is-zero: zero ranges are not written (the pre-filled 0xff stays where the source has zeros).
    let _ = std::fs::remove_file(&t);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&t), "64M"]);
    qemu_io("qcow2", &t, &["write -P 0xff 2M 64k"]);
    let r = imgshift(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "qcow2",
        s(&src),
        s(&t),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_check_clean(&t, "qcow2");
    let raw = d.path().join("t.raw");
    qemu_img(&["convert", "-O", "raw", s(&t), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes[2 << 20], 0xff, "a zero range was written");
    assert_eq!(bytes[0], 0xab);
    assert_eq!(bytes[10 << 20], 0x5a);
}

/// `convert -n` refuses, in one line and before writing anything, what it cannot write in place: compressed,
/// snapshotted, bitmapped, dirty, corrupt or smaller qcow2 targets, dynamic VHDs, other formats (usage error);
/// into a fixed VHD the data goes in place and the footer stays.
#[test]
fn convert_n_refusals_and_fixed_vhd() {
    let d = tmpdir();
    let src = n_source(d.path());
    let t = d.path().join("t.qcow2");
    let fresh = |extra: &dyn Fn(&Path)| {
        let _ = std::fs::remove_file(&t);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&t), "64M"]);
        extra(&t);
    };
    let set_incompat_bit = |p: &Path, bit: u8| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 79).unwrap();
        f.write_all_at(&[b[0] | bit], 79).unwrap();
    };
    type Prep<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Prep)> = vec![
        (
            "compressed",
            Box::new(|p: &Path| {
                let _ = std::fs::remove_file(p);
                qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(p)]);
            }),
        ),
        (
            "snapshot",
            Box::new(|p: &Path| {
                qemu_img(&["snapshot", "-c", "s1", s(p)]);
            }),
        ),
        (
            "bitmaps",
            Box::new(|p: &Path| {
                qemu_img(&["bitmap", "--add", s(p), "b0"]);
            }),
        ),
        (
            "not closed cleanly",
            Box::new(move |p: &Path| set_incompat_bit(p, 1)),
        ),
        ("corrupt", Box::new(move |p: &Path| set_incompat_bit(p, 2))),
        (
            "L2 entry pointing at the L1 table",
            Box::new(|p: &Path| {
                qemu_io("qcow2", p, &["write -P 1 0 64k"]);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .unwrap();
                let mut b = [0u8; 8];
                f.read_exact_at(&mut b, 40).unwrap();
                let l1 = u64::from_be_bytes(b);
                f.read_exact_at(&mut b, l1).unwrap();
                let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
                f.write_all_at(&(l1 | 1 << 63).to_be_bytes(), l2).unwrap();
            }),
        ),
        (
            "smaller",
            Box::new(|p: &Path| {
                let _ = std::fs::remove_file(p);
                qemu_img(&["create", "-q", "-f", "qcow2", s(p), "32M"]);
            }),
        ),
    ];
    for (what, prep) in cases {
        fresh(&*prep);
        let before = std::fs::read(&t).unwrap();
        let r = imgshift(&["convert", "-n", "-O", "qcow2", s(&src), s(&t)]);
        assert_eq!(r.code, 1, "{what}: {}", r.stderr);
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{what}: {}",
            r.stderr
        );
        assert!(
            std::fs::read(&t).unwrap() == before,
            "{what}: the target changed"
        );
    }
    // -o / -c with -n into a qcow2: usage errors.
    fresh(&|_: &Path| {});
    let r = imgshift(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&src),
        s(&t),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // A fixed VHD, pre-filled: the data region becomes the source, the footer is untouched.
    let v = d.path().join("t.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&v),
        "64M",
    ]);
    qemu_io("vpc", &v, &["write -P 0xff 0 64M"]);
    let len = std::fs::metadata(&v).unwrap().len();
    let footer = std::fs::read(&v).unwrap()[(len - 512) as usize..].to_vec();
    let r = imgshift(&["convert", "-n", "-O", "vpc", s(&src), s(&v)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let after = std::fs::read(&v).unwrap();
    assert_eq!(after.len() as u64, len);
    assert!(
        after[(len - 512) as usize..] == footer[..],
        "the footer changed"
    );
    let c = qemu_img_status(&["compare", "-f", "qcow2", "-F", "vpc", s(&src), s(&v)]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    // A dynamic VHD is refused.
    let dynv = d.path().join("d.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&dynv), "64M"]);
    let r = imgshift(&["convert", "-n", "-O", "vpc", s(&src), s(&dynv)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("fixed"), "{}", r.stderr);
}

/// A qcow2 whose first data cluster is leaked: its L2 entry cleared, its refcount left at 1.
fn leaked_qcow2(dir: &Path, name: &str) -> PathBuf {
    let img = qcow2_with_data(dir, name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&[0u8; 8], l2).unwrap();
    img
}

/// `check -r leaks` (and `--repair leaks`) repairs leaked clusters as qemu-img check -r leaks: into a copy by
/// default (the original untouched), in place with --in-place; qemu-img check finds the result clean and the
/// content unchanged.
#[test]
fn check_repair_leaks_into_a_copy_or_in_place() {
    let d = tmpdir();
    let img = leaked_qcow2(d.path(), "leak.qcow2");
    assert_eq!(qemu_img_status(&["check", s(&img)]).code, 3);
    assert_eq!(imgshift(&["check", s(&img)]).code, 3);
    let original = std::fs::read(&img).unwrap();
    let r = imgshift(&["check", "-r", "leaks", s(&img)]).ok();
    assert!(r.stdout.contains("1 leaked clusters"), "{}", r.stdout);
    let copy = d.path().join("leak.repaired.qcow2");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        original,
        "the original was modified"
    );
    assert_check_clean(&copy, "qcow2");
    assert_same(&img, "qcow2", &copy, "qcow2");
    // The copy must not be overwritten by a second run; --into picks another name.
    assert_eq!(imgshift(&["check", "-r", "leaks", s(&img)]).code, 1);
    let other = d.path().join("other.qcow2");
    imgshift(&["check", "--repair", "leaks", "--into", s(&other), s(&img)]).ok();
    assert_check_clean(&other, "qcow2");
    // In place, as qemu-img check -r leaks does.
    let theirs = d.path().join("theirs.qcow2");
    std::fs::copy(&img, &theirs).unwrap();
    qemu_img(&["check", "-q", "-r", "leaks", s(&theirs)]);
    imgshift(&["check", "--repair", "leaks", "--in-place", s(&img)]).ok();
    assert_check_clean(&img, "qcow2");
    assert_same(&img, "qcow2", &theirs, "qcow2");
    // Errors other than leaks are not repaired; nothing is left behind.
    let bad = data_past_eof(d.path());
    let before = files_in(d.path());
    let r = imgshift(&["check", "-r", "leaks", s(&bad)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("only leaks are repaired"), "{}", r.stderr);
    assert_eq!(files_in(d.path()), before);
    // Only qcow2 is repaired.
    let raw = d.path().join("a.raw");
    make_raw(&raw, 1 << 20, &[], &[]);
    assert_eq!(imgshift(&["check", "-r", "leaks", s(&raw)]).code, 2);
}

/// `info` on a qcow2 whose tables the reader refuses still shows what the header says (as qemu-img info does),
/// then the one-line error and exit 1.
#[test]
fn info_on_a_corrupt_qcow2_shows_the_header() {
    let d = tmpdir();
    let img = qcow2_with_data(d.path(), "short.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(100 << 10)
        .unwrap();
    let r = imgshift(&["info", s(&img)]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stdout.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("cluster_size: 65536"), "{}", r.stdout);
    let q = qemu_img(&["info", s(&img)]);
    assert!(q.contains("virtual size: 64 MiB (67108864 bytes)"), "{q}");
}
