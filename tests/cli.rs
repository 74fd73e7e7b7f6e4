#![allow(clippy::unwrap_used, clippy::expect_used)]
//! CLI behaviour on raw images: info/map/check/compare/convert, exit codes, stdout streaming, atomic output.

mod util;
use util::*;

#[test]
fn info_json_uses_qemu_field_names() {
    let d = tmpdir();
    let img = d.path().join("a.raw");
    make_raw(&img, 32 << 20, &[(1 << 20, 2 << 20)], &[]);
    let r = imgshift(&["info", "--output", "json", s(&img)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["virtual-size"], 32 << 20);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["data-bytes"], 2 << 20);
    assert!(v["actual-size"].as_u64().unwrap() >= 2 << 20);
    let q: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output", "json", s(&img)])).unwrap();
    assert_eq!(q["virtual-size"], v["virtual-size"]);
    assert_eq!(q["format"], v["format"]);
}

#[test]
fn map_json_matches_data_ranges() {
    let d = tmpdir();
    let img = d.path().join("a.raw");
    make_raw(&img, 16 << 20, &[(4 << 20, 1 << 20)], &[]);
    let r = imgshift(&["map", "--output", "json", s(&img)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let data: Vec<_> = rows.iter().filter(|r| r["data"] == true).collect();
    assert_eq!(data.len(), 1, "{rows:?}");
    assert_eq!(data[0]["start"], 4 << 20);
    assert_eq!(data[0]["length"], 1 << 20);
    let total: u64 = rows.iter().map(|r| r["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 16 << 20);
}

#[test]
fn compare_exit_codes_and_offset() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    make_raw(&a, 8 << 20, &[(0, 1 << 20)], &[]);
    std::fs::copy(&a, &b).unwrap();
    assert_eq!(imgshift(&["compare", s(&a), s(&b)]).code, 0);
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .write_all_at(b"\x01", 5 << 20)
        .unwrap();
    let r = imgshift(&["compare", s(&a), s(&b)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains(&format!("offset {}", 5 << 20)),
        "{}",
        r.stdout
    );
    let r = imgshift(&["compare", s(&a), "/nonexistent"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn convert_raw_to_stdout_and_file() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(
        &a,
        8 << 20,
        &[(1 << 20, 1 << 20), ((8 << 20) - 512, 512)],
        &[(3 << 20, 1 << 20)],
    );
    let out = std::process::Command::new(imgshift_bin())
        .args(["convert", "-O", "raw", s(&a), "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(&a).unwrap());
    let b = d.path().join("b.raw");
    imgshift(&["convert", "-O", "raw", s(&a), s(&b)]).ok();
    assert_same(&a, "raw", &b, "raw");
    assert_eq!(files_in(d.path()), vec!["a.raw", "b.raw"]);
    // A new file's mode is 0666 less the umask (as qemu-img's outputs), not a temporary file's private 0600.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&b).unwrap().permissions().mode() & 0o777;
    let reference = d.path().join("reference");
    std::fs::write(&reference, b"").unwrap();
    let want = std::fs::metadata(&reference).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, want, "output mode {mode:o}, a new file gets {want:o}");
}

/// Sync calls the binary makes for one conversion, counted by strace.
fn sync_calls(args: &[&str]) -> usize {
    let d = tmpdir();
    let log = d.path().join("strace.log");
    let out = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,syncfs,sync",
            "-o",
            s(&log),
        ])
        .arg(imgshift_bin())
        .args(args)
        .output()
        .expect("strace is missing: bash .ci/install-deps installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("sync"))
        .count()
}

#[test]
fn cache_mode_unsafe_never_syncs_and_writeback_does() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 64 << 20, &[(0, 48 << 20)], &[]);
    let q = d.path().join("q.qcow2");
    // The default is qemu-img convert's: no sync at all.
    assert_eq!(sync_calls(&["convert", "-O", "qcow2", s(&a), s(&q)]), 0);
    assert_same(&a, "raw", &q, "qcow2");
    let w = d.path().join("w.qcow2");
    assert!(sync_calls(&["convert", "-t", "writeback", "-O", "qcow2", s(&a), s(&w)]) >= 1);
    assert_same(&a, "raw", &w, "qcow2");
    assert_eq!(imgshift(&["convert", "-t", "bogus", s(&a), s(&w)]).code, 2);
}

#[test]
fn progress_on_a_non_terminal_is_plain_lines_with_p_and_nothing_without() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 8 << 20, &[(0, 4 << 20)], &[]);
    let r = imgshift(&[
        "convert",
        "-O",
        "qcow2",
        s(&a),
        s(&d.path().join("b.qcow2")),
    ]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    let r = imgshift(&[
        "convert",
        "-p",
        "-O",
        "qcow2",
        s(&a),
        s(&d.path().join("c.qcow2")),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The final progress line, then the summary (issue 21).
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert!(lines.len() >= 2, "{}", r.stderr);
    assert!(
        lines[lines.len() - 2].starts_with("imgshift: convert: 4 MiB of 4 MiB (100%)"),
        "{}",
        r.stderr
    );
    assert!(
        lines[lines.len() - 1].starts_with("imgshift: converted "),
        "{}",
        r.stderr
    );
    let r = imgshift(&[
        "-q",
        "convert",
        "-p",
        "-O",
        "qcow2",
        s(&a),
        s(&d.path().join("e.qcow2")),
    ]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
}

#[test]
fn convert_failure_leaves_nothing() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 1 << 20, &[(0, 4096)], &[]);
    let r = imgshift(&[
        "convert",
        "-O",
        "raw",
        "-o",
        "bogus=1",
        s(&a),
        s(&d.path().join("out.raw")),
    ]);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("bogus"), "{}", r.stderr);
    assert_eq!(files_in(d.path()), vec!["a.raw"]);
}

#[test]
fn check_on_raw_says_no_checks() {
    let d = tmpdir();
    let a = d.path().join("a.raw");
    make_raw(&a, 1 << 20, &[], &[]);
    let r = imgshift(&["check", s(&a)]);
    assert_eq!(r.code, 63);
    assert!(r.stderr.contains("no structural checks"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(imgshift(&["convert"]).code, 2);
    assert_eq!(imgshift(&["frobnicate"]).code, 2);
}
