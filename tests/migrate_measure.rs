#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Measurement, not a test (issue 12): for each target, `imgshift migrate` next to the same migration done the
//! usual way (convert to a temporary file with qemu-img, then upload that file), in the same run, on the same
//! source: the `bios` test guest of `tests/guests/mkguest.sh` built at 1 GiB, with a 300 MiB file of random data
//! written into its root filesystem (`debugfs -w`, so the file is real: allocated in the ext4 bitmaps, e2fsck
//! clean), as qcow2.
//!
//! Every test is `#[ignore]` and prints Markdown table rows; none asserts on a number. Run explicitly:
//!
//! ```text
//! IMGSHIFT_MEASURE_BIN=/path/to/release/imgshift \
//!   cargo test --test migrate_measure -- --ignored --nocapture --test-threads=1
//! ```
//!
//! The binary measured is `IMGSHIFT_MEASURE_BIN` (default: this worktree's test build, `util::imgshift_bin()`).
//! The tests take a lock so that measurements never overlap even without `--test-threads=1`.
//!
//! What is measured, per command: wall time from fork to exit, and
//! - AWS (moto): bytes sent = the sum of the request content lengths in the recording proxy's log (every EC2 and
//!   EBS call goes through it);
//! - Azure (fake ARM + Azurite): bytes sent = the sum of the request content lengths the recording proxy in front
//!   of Azurite logged (the blob data path); the few ARM control calls (JSON bodies of well under 1 KiB each) go
//!   to the fake ARM server directly and are not counted;
//! - libvirt (private libvirtd): bytes sent = `wchar` of the client process (`/proc/PID/io`, read after it exited
//!   but before it was reaped): the bytes it wrote with write(2)-family calls, which is the libvirt RPC stream
//!   to the daemon's socket plus, for imgshift, its job journal (a few KiB).

mod azure_util;
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use util::libvirt::{Pool, uri};
use util::*;

const MIB: u64 = 1 << 20;
const DATA_BYTES: u64 = 300 * MIB;
/// The guest's virtual size.
const GUEST_BYTES: u64 = 1024 * MIB;

/// Measurements never overlap (the machine is the instrument).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The binary under measurement.
fn measure_bin() -> PathBuf {
    std::env::var_os("IMGSHIFT_MEASURE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(imgshift_bin)
}

/// `c` with its program replaced by the binary under measurement. The helpers' commands clear the environment
/// and set what they need, so a command with explicit variables gets exactly those.
fn rebin(c: &Command) -> Command {
    let mut n = Command::new(measure_bin());
    n.args(c.get_args());
    if c.get_envs().next().is_some() {
        n.env_clear();
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                n.env(k, v);
            }
        }
    }
    n
}

/// Runs the child, waits for its exit without reaping it (waitid WNOWAIT), reads its /proc/PID/io, then reaps
/// it; writes "SECONDS WCHAR" to argv[1] and exits with the child's code.
const WRAP: &str = r#"
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
dt = time.monotonic() - t
io = dict(l.split(": ") for l in open(f"/proc/{pid}/io").read().splitlines())
_, st = os.waitpid(pid, 0)
open(out, "w").write(f"{dt} {io['wchar']}\n")
code = os.waitstatus_to_exitcode(st)
sys.exit(code if code >= 0 else 128 - code)
"#;

/// One command's measurement.
struct Timed {
    secs: f64,
    wchar: u64,
    stdout: String,
    stderr: String,
}

/// Runs `c` (program, arguments and explicit environment) under the WRAP script; panics on failure.
fn timed(c: &Command) -> Timed {
    let dir = tmpdir();
    let out = dir.path().join("measure");
    let mut w = Command::new("python3");
    w.arg("-c")
        .arg(WRAP)
        .arg(&out)
        .arg(c.get_program())
        .args(c.get_args());
    if c.get_envs().next().is_some() {
        w.env_clear();
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                w.env(k, v);
            }
        }
    }
    let o = w.output().unwrap();
    let r = Timed {
        secs: 0.0,
        wchar: 0,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(
        o.status.success(),
        "{:?} {:?} failed ({}): {}{}",
        c.get_program(),
        c.get_args().collect::<Vec<_>>(),
        o.status,
        r.stdout,
        r.stderr
    );
    let t = std::fs::read_to_string(&out).unwrap();
    let mut it = t.split_whitespace();
    Timed {
        secs: it.next().unwrap().parse().unwrap(),
        wchar: it.next().unwrap().parse().unwrap(),
        ..r
    }
}

/// Whether `migrate` needs `--force` for this guest: runs it with `--dry-run` (inspection and the target's
/// preflight, nothing created) and returns the preflight's refusal when it refuses. A refused preflight is a
/// property of the guest (e.g. the bios guest has no Hyper-V drivers for Azure), not of the data path measured.
fn preflight_refusal(migrate: &Command) -> Option<String> {
    // The human output (the dry run's JSON report exits 1 the same way, but the human lines name the findings).
    let mut args: Vec<&std::ffi::OsStr> = Vec::new();
    let mut it = migrate.get_args();
    while let Some(a) = it.next() {
        if a == "--output" {
            it.next();
        } else {
            args.push(a);
        }
    }
    let full = rebin(migrate);
    let mut c = Command::new(full.get_program());
    c.args(args).arg("--dry-run");
    if full.get_envs().next().is_some() {
        c.env_clear();
        for (k, v) in full.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
    }
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    if o.status.success() {
        return None;
    }
    assert!(
        out.contains("--force"),
        "dry run failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(
        out.lines()
            .map(str::trim)
            .filter(|l| l.contains("fail:"))
            .map(|l| l.split(" (fix:").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Adds `--force` to `c` when its preflight refuses the guest; returns the note for the report.
fn force_if_refused(c: &mut Command) -> String {
    match preflight_refusal(c) {
        None => String::new(),
        Some(why) => {
            c.arg("--force");
            format!("; migrate ran with --force (preflight refused: {why})")
        }
    }
}

/// The measured source: the bios guest at 1 GiB with a 300 MiB random file in its root filesystem, as qcow2.
fn source(dir: &Path) -> PathBuf {
    let raw = dir.join("guest.raw");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/mkguest.sh");
    let r = Command::new("bash")
        .arg(&script)
        .args(["bios", s(&raw), &(GUEST_BYTES / MIB).to_string()])
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "mkguest.sh: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let data = dir.join("data.bin");
    let mut f = std::fs::File::create(&data).unwrap();
    let n = std::io::copy(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), DATA_BYTES),
        &mut f,
    )
    .unwrap();
    assert_eq!(n, DATA_BYTES);
    drop(f);
    // The bios variant's root partition (the filesystem) starts at LBA 2048.
    let fs = format!("{}?offset={}", s(&raw), MIB);
    let dbg = |req: String, write: bool| {
        let mut c = Command::new("debugfs");
        if write {
            c.arg("-w");
        }
        let o = c.arg("-R").arg(req).arg(&fs).output().unwrap_or_else(|e| {
            panic!("cannot run debugfs ({e}): install it with `apt-get install e2fsprogs`")
        });
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    dbg(
        format!("write {} /var/lib/measure-data.bin", s(&data)),
        true,
    );
    let stat = dbg("stat /var/lib/measure-data.bin".into(), false);
    assert!(
        stat.contains(&format!("Size: {DATA_BYTES}")),
        "debugfs did not write the data file: {stat}"
    );
    std::fs::remove_file(&data).unwrap();
    let qcow = dir.join("guest.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)]);
    std::fs::remove_file(&raw).unwrap();
    // Both ways start with the source in the page cache.
    std::fs::read(&qcow).unwrap();
    qcow
}

/// Apparent size and allocated bytes of a file.
fn sizes(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.len(), m.blocks() * 512)
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn sum_lengths(records: &[serde_json::Value]) -> u64 {
    records
        .iter()
        .map(|r| r["length"].as_u64().unwrap_or(0))
        .sum()
}

/// The measurements of one target.
struct Row {
    target: &'static str,
    migrate: Timed,
    migrate_sent: u64,
    convert: Timed,
    upload: Timed,
    usual_sent: u64,
    temp: (u64, u64),
    notes: String,
}

fn print(src: &Path, row: &Row) {
    let (file, _) = sizes(src);
    let report_sent = serde_json::from_str::<serde_json::Value>(&row.migrate.stdout)
        .ok()
        .and_then(|v| v["bytes_sent"].as_u64());
    println!(
        "\nsource: {} ({} qcow2 file; 1 GiB virtual)",
        s(src),
        mb(file)
    );
    println!(
        "| target | imgshift migrate: wall | imgshift: bytes sent | usual: convert | usual: upload | usual: total | usual: bytes sent | usual: temp file (apparent / allocated) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.1} s | {} | {:.1} s | {:.1} s | {:.1} s | {} | {} / {} |",
        row.target,
        row.migrate.secs,
        mb(row.migrate_sent),
        row.convert.secs,
        row.upload.secs,
        row.convert.secs + row.upload.secs,
        mb(row.usual_sent),
        mb(row.temp.0),
        mb(row.temp.1),
    );
    println!(
        "exact: migrate sent {} B (its report says bytes_sent={}), usual sent {} B, temp file {} B apparent, {} B allocated{}",
        row.migrate_sent,
        report_sent.map_or("?".into(), |b| b.to_string()),
        row.usual_sent,
        row.temp.0,
        row.temp.1,
        row.notes
    );
}

fn unique(what: &str) -> String {
    format!("measure-{what}-{}", std::process::id())
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_aws() {
    use util::aws::*;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = tmpdir();
    let src = source(d.path());

    // imgshift migrate, through its own recording proxy.
    let dm = d.path().join("migrate");
    std::fs::create_dir(&dm).unwrap();
    let proxy = Proxy::start(&dm, &[]);
    let mut c = aws_cmd(&dm);
    c.args([
        "migrate",
        s(&src),
        "--to",
        "aws",
        "--endpoint-url",
        &proxy.url,
    ])
    .args([
        "--name",
        &unique("aws-migrate"),
        "--yes",
        "--output",
        "json",
    ])
    .args(["--state-dir", s(&dm.join("state"))]);
    let notes = force_if_refused(&mut c);
    let before = proxy.records().len();
    let migrate = timed(&rebin(&c));
    let migrate_sent = sum_lengths(&proxy.records()[before..]);
    drop(proxy);

    // The usual way: qemu-img convert -O raw, then upload the raw file.
    let du = d.path().join("usual");
    std::fs::create_dir(&du).unwrap();
    let tmp = du.join("tmp.raw");
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "qcow2", "-O", "raw", s(&src), s(&tmp)]);
    let convert = timed(&c);
    let temp = sizes(&tmp);
    let proxy = Proxy::start(&du, &[]);
    let mut c = aws_cmd(&du);
    c.args(["upload", "aws", s(&tmp), "--endpoint-url", &proxy.url])
        .args(["--name", &unique("aws-usual"), "--quiet"])
        .args(["--state-dir", s(&du.join("state"))]);
    let upload = timed(&rebin(&c));
    let usual_sent = sum_lengths(&proxy.records());
    drop(proxy);

    print(
        &src,
        &Row {
            target: "aws (moto)",
            migrate,
            migrate_sent,
            convert,
            upload,
            usual_sent,
            temp,
            notes,
        },
    );
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_azure() {
    use azure_util::{Env, RG, SUB};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = tmpdir();
    let src = source(d.path());
    let blob_log = |env: &Env| azure_util::read_jsonl(&env.proxy.as_ref().unwrap().1);

    // imgshift migrate, blob traffic through the recording proxy.
    let env = Env::start("measure-m", &[], Some(&[]));
    let mut c = env.cmd();
    c.args(["migrate", s(&src), "--to", "azure", "--subscription", SUB])
        .args(["--resource-group", RG, "--location", "westeurope"])
        .args([
            "--arm-endpoint",
            &env.arm_url(),
            "--name",
            &unique("az-migrate"),
        ])
        .args(["--state-dir", s(&env.path().join("state")), "--yes"])
        .args(["--output", "json"]);
    let notes = force_if_refused(&mut c);
    let before = blob_log(&env).len();
    let migrate = timed(&rebin(&c));
    let migrate_sent = sum_lengths(&blob_log(&env)[before..]);
    drop(env);

    // The usual way: qemu-img convert to a fixed VHD, then upload it (the stand-in for azcopy).
    let env = Env::start("measure-u", &[], Some(&[]));
    let tmp = env.path().join("tmp.vhd");
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "qcow2", "-O", "vpc"]).args([
        "-o",
        "subformat=fixed,force_size",
        s(&src),
        s(&tmp),
    ]);
    let convert = timed(&c);
    let temp = sizes(&tmp);
    let upload = timed(&rebin(&env.upload_cmd(
        &tmp,
        &unique("az-usual"),
        &["--quiet"],
    )));
    let usual_sent = sum_lengths(&blob_log(&env));
    drop(env);

    print(
        &src,
        &Row {
            target: "azure (Azurite + fake ARM)",
            migrate,
            migrate_sent,
            convert,
            upload,
            usual_sent,
            temp,
            notes,
        },
    );
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_libvirt() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = tmpdir();
    let src = source(d.path());
    let u = uri();

    // imgshift migrate: volumes and a domain in a fresh pool.
    let mut pool = Pool::new();
    let dom = pool.domain();
    let mut c = Command::new("imgshift");
    c.args(["migrate", s(&src), "--to", "libvirt", "--connect", &u])
        .args([
            "--pool",
            &pool.name,
            "--name",
            &dom,
            "--domain-type",
            "qemu",
        ])
        .args(["--yes", "--output", "json"])
        .args(["--state-dir", s(&d.path().join("state"))]);
    let forced = force_if_refused(&mut c);
    let migrate = timed(&rebin(&c));
    let migrate_sent = migrate.wchar;
    drop(pool);

    // The usual way: qemu-img convert -O qcow2, then virsh vol-create-as + vol-upload --sparse.
    let pool = Pool::new();
    let tmp = d.path().join("tmp.qcow2");
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "qcow2", "-O", "qcow2", s(&src), s(&tmp)]);
    let convert = timed(&c);
    let temp = sizes(&tmp);
    let vol = "usual.qcow2";
    let mut c = Command::new("virsh");
    c.args(["-q", "-c", &u, "vol-create-as", &pool.name, vol])
        .arg(GUEST_BYTES.to_string())
        .args(["--format", "qcow2"]);
    let create = timed(&c);
    let mut c = Command::new("virsh");
    c.args([
        "-q",
        "-c",
        &u,
        "vol-upload",
        "--pool",
        &pool.name,
        vol,
        s(&tmp),
    ])
    .arg("--sparse");
    let mut upload = timed(&c);
    let notes = format!(
        "{forced}; upload = vol-create-as {:.2} s + vol-upload --sparse {:.2} s",
        create.secs, upload.secs
    );
    upload.secs += create.secs;
    let usual_sent = create.wchar + upload.wchar;
    drop(pool);

    print(
        &src,
        &Row {
            target: "libvirt (private libvirtd)",
            migrate,
            migrate_sent,
            convert,
            upload,
            usual_sent,
            temp,
            notes,
        },
    );
}
