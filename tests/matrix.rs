#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The full conversion matrix at the CLI: every source kind qemu-img can make (13 formats and subformats),
//! converted by `imgshift convert` to every output kind, each output judged by `qemu-img check` (where qemu
//! checks that format) and `qemu-img compare` against its source. Also `imgshift info` against `qemu-img info`
//! for every source.

mod util;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use util::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One format + subformat, spelt as qemu-img (and imgshift) spell `-O` and `-o`.
#[derive(Debug, Clone, Copy)]
struct Kind {
    /// Short name used in file names and messages.
    name: &'static str,
    /// qemu-img / imgshift format name.
    fmt: &'static str,
    /// `-o` options ("" for none).
    opts: &'static str,
    /// Whether `qemu-img check` implements checks for the format (vpc and raw have none).
    checkable: bool,
}

const fn kind(name: &'static str, fmt: &'static str, opts: &'static str, checkable: bool) -> Kind {
    Kind {
        name,
        fmt,
        opts,
        checkable,
    }
}

const KINDS: [Kind; 13] = [
    kind("raw", "raw", "", false),
    kind("qcow2", "qcow2", "", true),
    kind("vpc-dynamic", "vpc", "subformat=dynamic", false),
    kind("vpc-fixed", "vpc", "subformat=fixed", false),
    kind("vhdx-dynamic", "vhdx", "subformat=dynamic", true),
    kind("vhdx-fixed", "vhdx", "subformat=fixed", true),
    kind(
        "vmdk-monosparse",
        "vmdk",
        "subformat=monolithicSparse",
        true,
    ),
    kind("vmdk-monoflat", "vmdk", "subformat=monolithicFlat", true),
    kind(
        "vmdk-2gbsparse",
        "vmdk",
        "subformat=twoGbMaxExtentSparse",
        true,
    ),
    kind("vmdk-2gbflat", "vmdk", "subformat=twoGbMaxExtentFlat", true),
    kind("vmdk-stream", "vmdk", "subformat=streamOptimized", true),
    kind("vdi-dynamic", "vdi", "", true),
    kind("vdi-static", "vdi", "static=on", true),
];

fn kind_named(name: &str) -> Kind {
    *KINDS.iter().find(|k| k.name == name).unwrap()
}

fn ext(k: Kind) -> &'static str {
    match k.fmt {
        "vpc" => "vhd",
        f => f,
    }
}

/// Makes every source kind from `raw` with qemu-img; returns (kind, path) pairs.
fn qemu_sources(dir: &Path, raw: &Path, kinds: &[Kind]) -> Vec<(Kind, PathBuf)> {
    let mut out = Vec::new();
    for &k in kinds {
        let path = dir.join(format!("src-{}.{}", k.name, ext(k)));
        let mut args = vec!["convert", "-f", "raw", "-O", k.fmt];
        if !k.opts.is_empty() {
            args.extend(["-o", k.opts]);
        }
        args.extend([s(raw), s(&path)]);
        qemu_img(&args);
        out.push((k, path));
    }
    out
}

/// Runs `jobs` on a few threads (the work is mostly waiting for child processes); returns every failure.
fn run_parallel<T: Sync>(
    jobs: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<(), String> + Sync,
) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    if let Err(e) = f(job) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

/// Converts `src` to kind `to` with imgshift (format probed), then judges the output with qemu-img.
fn convert_and_judge(src_kind: Kind, src: &Path, to: Kind, out_dir: &Path) -> Result<(), String> {
    let case = format!("{} -> {}", src_kind.name, to.name);
    let out = out_dir.join(format!("{}--{}.{}", src_kind.name, to.name, ext(to)));
    let mut args = vec!["convert", "-q", "-O", to.fmt];
    if !to.opts.is_empty() {
        args.extend(["-o", to.opts]);
    }
    args.extend([s(src), s(&out)]);
    let r = imgshift(&args);
    if r.code != 0 {
        return Err(format!(
            "{case}: imgshift convert exit {}: {}",
            r.code,
            r.stderr.trim()
        ));
    }
    if to.checkable {
        let c = qemu_img_status(&["check", "-f", to.fmt, s(&out)]);
        if c.code != 0 {
            return Err(format!(
                "{case}: qemu-img check exit {}: {}{}",
                c.code,
                c.stdout.trim(),
                c.stderr.trim()
            ));
        }
    }
    let c = qemu_img_status(&["compare", "-f", src_kind.fmt, "-F", to.fmt, s(src), s(&out)]);
    if c.code != 0 {
        return Err(format!(
            "{case}: qemu-img compare exit {}: {}{}",
            c.code,
            c.stdout.trim(),
            c.stderr.trim()
        ));
    }
    // Keep the disk small: outputs are judged, then removed (split VMDKs have extra files beside them).
    remove_with_extents(&out);
    Ok(())
}

/// Removes `path` and any files that share its stem (VMDK extents `x-s001.vmdk`, `x-flat.vmdk`).
fn remove_with_extents(path: &Path) {
    let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
    for e in std::fs::read_dir(path.parent().unwrap()).unwrap() {
        let e = e.unwrap();
        let n = e.file_name().to_string_lossy().into_owned();
        if n == path.file_name().unwrap().to_string_lossy() || n.starts_with(&format!("{stem}-")) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

/// `imgshift info --output json` (probed) agrees with `qemu-img info -f FMT` on virtual-size and format.
fn info_agrees(k: Kind, src: &Path) -> Result<(), String> {
    let r = imgshift(&["info", "--output", "json", s(src)]);
    if r.code != 0 {
        return Err(format!(
            "{}: imgshift info exit {}: {}",
            k.name,
            r.code,
            r.stderr.trim()
        ));
    }
    let ours: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // qemu probes a fixed VHD as raw (the footer is at the end); name the format as the test made it.
    let theirs: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        "-f",
        k.fmt,
        s(src),
    ]))
    .unwrap();
    if ours["format"] != theirs["format"] || ours["virtual-size"] != theirs["virtual-size"] {
        return Err(format!(
            "{}: imgshift says {} {}, qemu-img says {} {}",
            k.name, ours["format"], ours["virtual-size"], theirs["format"], theirs["virtual-size"]
        ));
    }
    Ok(())
}

fn assert_no_failures(what: &str, total: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A moderate disk: data (some unaligned), allocated zeros, holes, data in the last sector; its size is a
/// multiple of 512 but not of 64 KiB, 1 MiB or 2 MiB.
fn moderate_raw(path: &Path) -> u64 {
    let size = 10 * MIB + 3 * 64 * KIB + 5 * 512;
    make_raw(
        path,
        size,
        &[
            (0, 300 * KIB),
            (MIB + 1000, 3000),
            (2 * MIB - 4 * KIB, 72 * KIB),
            (6 * MIB + 512, MIB + 7 * 512),
            (size - 4 * KIB, 4 * KIB),
        ],
        &[(3 * MIB, MIB), (9 * MIB + 64 * KIB, 64 * KIB)],
    );
    size
}

#[test]
fn every_source_to_every_output() {
    let d = tmpdir();
    let raw = d.path().join("shape.raw");
    moderate_raw(&raw);
    let srcdir = d.path().join("src");
    let outdir = d.path().join("out");
    std::fs::create_dir(&srcdir).unwrap();
    std::fs::create_dir(&outdir).unwrap();
    let sources = qemu_sources(&srcdir, &raw, &KINDS);

    let failures = run_parallel(&sources, 3, |(k, p)| info_agrees(*k, p));
    assert_no_failures("info", sources.len(), &failures);

    let jobs: Vec<(Kind, &Path, Kind)> = sources
        .iter()
        .flat_map(|(k, p)| KINDS.iter().map(move |&to| (*k, p.as_path(), to)))
        .collect();
    assert_eq!(jobs.len(), 13 * 13);
    let failures = run_parallel(&jobs, 3, |(k, p, to)| {
        convert_and_judge(*k, p, *to, &outdir)
    });
    assert_no_failures("matrix", jobs.len(), &failures);
}

/// A sparse disk over 4 GiB (5 GiB + 3 MiB + 4.5 KiB) with data at the start, across the 2 GiB and 4 GiB
/// marks (twoGbMaxExtent extent and 32-bit boundaries) and in the last sectors.
fn big_raw(path: &Path) -> u64 {
    let size = 5 * GIB + 3 * MIB + 9 * 512;
    make_raw(
        path,
        size,
        &[
            (0, 128 * KIB),
            (2 * GIB - 8 * KIB, 16 * KIB),
            (4 * GIB - 512, 64 * KIB + 1024),
            (size - 8 * KIB, 8 * KIB),
        ],
        &[(3 * GIB, MIB)],
    );
    size
}

#[test]
fn large_sparse_sources_to_every_output() {
    let d = tmpdir();
    let raw = d.path().join("big.raw");
    let size = big_raw(&raw);
    let srcdir = d.path().join("src");
    let outdir = d.path().join("out");
    std::fs::create_dir(&srcdir).unwrap();
    std::fs::create_dir(&outdir).unwrap();
    let subset: Vec<Kind> = [
        "qcow2",
        "vpc-dynamic",
        "vhdx-dynamic",
        "vmdk-2gbsparse",
        "vmdk-stream",
        "vdi-dynamic",
    ]
    .iter()
    .map(|n| kind_named(n))
    .collect();
    let mut sources = qemu_sources(&srcdir, &raw, &subset);
    sources.insert(0, (kind_named("raw"), raw.clone()));

    // The split source really spans three extents.
    let desc = std::fs::read_to_string(srcdir.join("src-vmdk-2gbsparse.vmdk")).unwrap();
    let extents = desc.lines().filter(|l| l.starts_with("RW ")).count();
    assert!(extents >= 3, "{desc}");
    let split_files = std::fs::read_dir(&srcdir)
        .unwrap()
        .filter(|e| {
            let n = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            n.starts_with("src-vmdk-2gbsparse-s")
        })
        .count();
    assert_eq!(split_files, extents);

    let failures = run_parallel(&sources, 3, |(k, p)| info_agrees(*k, p));
    assert_no_failures("info", sources.len(), &failures);
    let v: serde_json::Value =
        serde_json::from_str(&imgshift(&["info", "--output", "json", s(&raw)]).ok().stdout)
            .unwrap();
    assert_eq!(v["virtual-size"], size);

    let jobs: Vec<(Kind, &Path, Kind)> = sources
        .iter()
        .flat_map(|(k, p)| KINDS.iter().map(move |&to| (*k, p.as_path(), to)))
        .collect();
    let failures = run_parallel(&jobs, 3, |(k, p, to)| {
        convert_and_judge(*k, p, *to, &outdir)
    });
    assert_no_failures("large matrix", jobs.len(), &failures);
}

/// imgshift's own twoGbMaxExtent outputs of a >4 GiB disk span three extents too, and qemu reads them back.
#[test]
fn split_vmdk_outputs_span_three_extents() {
    let d = tmpdir();
    let raw = d.path().join("big.raw");
    big_raw(&raw);
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let out = d.path().join(format!("{sub}.vmdk"));
        imgshift(&[
            "convert",
            "-q",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&raw),
            s(&out),
        ])
        .ok();
        let desc = std::fs::read_to_string(&out).unwrap();
        let extents: Vec<&str> = desc.lines().filter(|l| l.starts_with("RW ")).collect();
        assert!(extents.len() >= 3, "{sub}: {desc}");
        for line in &extents {
            let name = line.split('"').nth(1).unwrap();
            assert!(d.path().join(name).is_file(), "{sub}: {name} missing");
        }
        assert_check_clean(&out, "vmdk");
        assert_same(&raw, "raw", &out, "vmdk");
    }
}
