//! The malformed-image corpus: `tests/corpus/make-corpus.py` builds well over 60 images from qemu-img output with
//! one field mutated each; every one must be refused by `convert` and `info` cleanly: exit code 1 (never a
//! panic's 101), exactly one stderr line containing the manifest's expected text, no output file left behind,
//! reading at most twice the image (plus 1 MiB the loader and /proc take), in at most 10,000 read calls and 64
//! MiB of peak RSS. Work is bounded, not time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::path::Path;
use std::process::Command;

use util::{Measured, imgshift_measured, tmpdir};

/// A command reads at most this many times the image (plus [`READ_SLACK`]).
const MAX_READ_FACTOR: u64 = 2;
/// Bytes every run reads besides its input: the loader, /proc and /sys files.
const READ_SLACK: u64 = 1 << 20;
/// Read calls per command.
const MAX_READ_CALLS: u64 = 10_000;
/// Peak RSS bound per command (KiB).
const MAX_RSS_KIB: u64 = 64 * 1024;
/// The manifest must list at least this many cases.
const MIN_CASES: usize = 60;

struct Case {
    file: String,
    format: String,
    commands: String,
    expect: String,
}

fn build_corpus(dir: &Path) -> Vec<Case> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/make-corpus.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install it with `apt-get install python3`")
        });
    assert!(
        out.status.success(),
        "{} failed (it needs qemu-img and qemu-io: `apt-get install qemu-utils`): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(dir.join("manifest.tsv")).unwrap();
    manifest
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 4, "bad manifest line {l:?}");
            Case {
                file: f[0].into(),
                format: f[1].into(),
                commands: f[2].into(),
                expect: f[3].into(),
            }
        })
        .collect()
}

/// Checks one refused run; returns a description of what is wrong, if anything.
fn judge(what: &str, m: &Measured, input: u64, expect: &str) -> Option<String> {
    let lines: Vec<&str> = m.stderr.lines().collect();
    let mut bad = Vec::new();
    if m.code != 1 {
        bad.push(format!("exit code {} (want 1)", m.code));
    }
    if lines.len() != 1 {
        bad.push(format!("{} stderr lines (want 1)", lines.len()));
    }
    if !m.stderr.contains(expect) {
        bad.push(format!("stderr lacks {expect:?}"));
    }
    if m.rchar > MAX_READ_FACTOR * input + READ_SLACK {
        bad.push(format!("read {} bytes of a {input}-byte image", m.rchar));
    }
    if m.syscr > MAX_READ_CALLS {
        bad.push(format!("{} read calls", m.syscr));
    }
    if m.max_rss_kib > MAX_RSS_KIB {
        bad.push(format!("peak RSS {} KiB", m.max_rss_kib));
    }
    (!bad.is_empty()).then(|| format!("{what}: {} -- stderr: {}", bad.join(", "), m.stderr.trim()))
}

#[test]
fn every_malformed_image_is_refused_with_one_clear_line() {
    let dir = tmpdir();
    let cases = build_corpus(dir.path());
    assert!(
        cases.len() >= MIN_CASES,
        "only {} cases in the corpus",
        cases.len()
    );
    let mut failures = Vec::new();
    let (mut most_read, mut fattest) = (0u64, 0u64);
    for c in &cases {
        let img = dir.path().join(&c.file);
        let input = std::fs::metadata(&img).unwrap().len();
        let img = img.to_str().unwrap();
        let out = dir.path().join(format!("{}.out.raw", c.file));
        let out_s = out.to_str().unwrap();
        let m = imgshift_measured(&["convert", "-f", &c.format, "-O", "raw", img, out_s]);
        most_read = most_read.max(m.rchar);
        fattest = fattest.max(m.max_rss_kib);
        if let Some(f) = judge(&format!("{} convert", c.file), &m, input, &c.expect) {
            failures.push(f);
        }
        if out.exists() {
            failures.push(format!("{} convert: left {out_s} behind", c.file));
        }
        let leftovers: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".out.raw"))
            .collect();
        if !leftovers.is_empty() {
            failures.push(format!("{} convert: left {leftovers:?} behind", c.file));
        }
        let m = imgshift_measured(&["info", "-f", &c.format, img]);
        most_read = most_read.max(m.rchar);
        fattest = fattest.max(m.max_rss_kib);
        match c.commands.as_str() {
            "both" => {
                if let Some(f) = judge(&format!("{} info", c.file), &m, input, &c.expect) {
                    failures.push(f);
                }
            }
            // Only reading the data notices these; info must still not crash.
            "convert" => {
                if m.code != 0 && m.code != 1 {
                    failures.push(format!(
                        "{} info: exit code {} -- {}",
                        c.file,
                        m.code,
                        m.stderr.trim()
                    ));
                }
            }
            other => panic!("bad commands field {other:?} for {}", c.file),
        }
    }
    eprintln!(
        "corpus: {} cases, most read by a command {most_read} B, largest peak RSS {fattest} KiB",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases misbehave:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
