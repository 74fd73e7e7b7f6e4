//! `imgshift generalize` and `convert --generalize`: a real test guest (tests/guests/mkguest.sh) generalised by
//! libguestfs into a qcow2 overlay; the result is checked by imgshift's report, independently with e2fsprogs'
//! debugfs, and by booting it under QEMU/TCG. Needs libguestfs (`.ci/install-deps` installs it) and a cached
//! guest kernel for its appliance (tests/guests/guestfs-env.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use util::*;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/guests")
        .join(name)
}

/// The `bios` test guest as raw (built once per run; never written: tests copy or overlay it).
fn guest_raw() -> &'static Path {
    static G: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &G.get_or_init(|| {
        imgshift_bin();
        let d = tempfile::Builder::new()
            .prefix("imgshift-gen-guest")
            .tempdir()
            .unwrap();
        let out = d.path().join("bios.raw");
        let r = Command::new("bash")
            .arg(script("mkguest.sh"))
            .arg("bios")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "mkguest.sh bios failed (run .ci/install-deps for its tools): {}",
            String::from_utf8_lossy(&r.stderr)
        );
        (d, out)
    })
    .1
}

/// libguestfs's environment here (appliance kernel from the guest cache, TCG forced).
fn guestfs_env() -> Vec<(String, String)> {
    guest_raw();
    let r = Command::new("bash")
        .arg(script("guestfs-env.sh"))
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "guestfs-env.sh: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let env: Vec<(String, String)> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let has = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("virt-sysprep").is_file());
    assert!(
        has,
        "virt-sysprep is missing: run .ci/install-deps (it installs libguestfs-tools)"
    );
    env
}

fn run_with_env(args: &[&str], env: &[(String, String)]) -> Run {
    let out = Command::new(imgshift_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// debugfs on the root filesystem (partition 1 at 1 MiB) of a raw image: `stat` or `cat` of a guest path.
fn debugfs(raw: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd, &format!("{}?offset=1048576", raw.display())])
        .output()
        .expect("debugfs is missing: run .ci/install-deps (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exists_in(raw: &Path, path: &str) -> bool {
    debugfs(raw, &format!("stat {path}")).contains("Inode:")
}

fn size_in(raw: &Path, path: &str) -> u64 {
    let st = debugfs(raw, &format!("stat {path}"));
    st.split("Size: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// A qcow2 copy of the guest in its own folder.
fn source_in(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(guest_raw()), s(&src)]);
    src
}

const GENERALISED: &[&str] = &[
    "/etc/ssh/ssh_host_rsa_key",
    "/etc/ssh/ssh_host_ed25519_key.pub",
    "/var/log/syslog",
    "/root/.bash_history",
    "/var/lib/dhcp/dhclient.eth0.leases",
    "/var/lib/cloud/instance",
];

#[test]
fn generalizes_into_a_small_overlay_that_boots_with_a_new_identity() {
    let env = guestfs_env();
    let d = tmpdir();
    let src = source_in(d.path());
    let before_hash = sha256(&src);
    let source_id = debugfs(guest_raw(), "cat /etc/machine-id")
        .trim()
        .to_string();
    assert_eq!(
        source_id.len(),
        32,
        "the test guest has a machine-id: {source_id:?}"
    );
    for p in GENERALISED {
        assert!(exists_in(guest_raw(), p), "the test guest lacks {p}");
    }
    let ov = d.path().join("ov.qcow2");
    let r = run_with_env(
        &[
            "generalize",
            s(&src),
            "--overlay",
            s(&ov),
            "--output",
            "json",
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();

    // imgshift's own report: every item found in the source is gone (or, machine-id, emptied).
    for want in [
        "machine-id",
        "ssh-hostkeys",
        "logs",
        "shell-history",
        "dhcp-leases",
        "cloud-init",
    ] {
        let op = v["operations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == want)
            .unwrap();
        let before = op["before"].as_object().unwrap();
        assert!(
            !before.is_empty(),
            "{want}: the guest has items for it: {op}"
        );
        assert_eq!(
            op["done"].as_array().unwrap().len(),
            before.len(),
            "{want}: {op}"
        );
        assert!(
            op["remaining"].as_array().unwrap().is_empty(),
            "{want}: {op}"
        );
    }
    for (path, k) in v["kept"].as_object().unwrap() {
        assert_eq!(k["unchanged"], true, "{path} changed");
    }
    assert!(
        v["kept"]
            .as_object()
            .unwrap()
            .contains_key("/etc/os-release")
    );

    // The source is untouched; the overlay is small, clean and names its backing file and format.
    assert_eq!(sha256(&src), before_hash, "the source changed");
    assert_check_clean(&ov, "qcow2");
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output", "json", s(&ov)])).unwrap();
    assert_eq!(info["backing-filename"], "src.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    let allocated = v["overlay"]["allocated_bytes"].as_u64().unwrap();
    eprintln!(
        "overlay: {allocated} bytes on disk, virt-sysprep {} s",
        v["sysprep_seconds"]
    );
    assert!(allocated < 16 << 20, "overlay of {allocated} bytes");

    // Independently (e2fsprogs' debugfs on the flattened result): the items are gone, the rest intact.
    let flat = d.path().join("flat.raw");
    imgshift(&["convert", "-O", "raw", s(&ov), s(&flat)]).ok();
    for p in GENERALISED {
        assert!(!exists_in(&flat, p), "{p} survived generalisation");
    }
    assert_eq!(size_in(&flat, "/etc/machine-id"), 0);
    for p in ["/etc/os-release", "/etc/fstab", "/etc/hostname"] {
        assert_eq!(
            debugfs(&flat, &format!("cat {p}")),
            debugfs(guest_raw(), &format!("cat {p}")),
            "{p}"
        );
    }

    // It boots under TCG, with a machine-id other than the source's.
    let bootable = d.path().join("boot.qcow2");
    imgshift(&["convert", "-O", "qcow2", s(&ov), s(&bootable)]).ok();
    let out = Command::new("bash")
        .arg(script("boot.sh"))
        .args([s(&bootable), "qcow2", "bios", "virtio"])
        .env("BOOT_TIMEOUT", "120")
        .output()
        .unwrap();
    let marker = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "the generalised guest did not boot: {marker} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = marker
        .split("machine-id=")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    assert_ne!(id, source_id, "{marker}");
}

#[test]
fn dry_run_lists_and_changes_nothing() {
    let d = tmpdir();
    let src = source_in(d.path());
    let before_hash = sha256(&src);
    // No libguestfs needed for a dry run: a PATH without it still works.
    let no_gfs = [("PATH".to_string(), "/nonexistent".to_string())];
    let r = run_with_env(
        &["generalize", s(&src), "--dry-run", "--output", "json"],
        &no_gfs,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    let keys = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "ssh-hostkeys")
        .unwrap();
    assert!(
        keys["before"]
            .as_object()
            .unwrap()
            .contains_key("/etc/ssh/ssh_host_rsa_key"),
        "{keys}"
    );
    assert_eq!(files_in(d.path()), vec!["src.qcow2"]);
    assert_eq!(sha256(&src), before_hash);
    let human = run_with_env(
        &[
            "generalize",
            s(&src),
            "--dry-run",
            "--operations",
            "machine-id,logs",
        ],
        &[],
    );
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert!(
        human.stdout.contains("would empty 1 path(s)") && human.stdout.contains("/var/log/syslog"),
        "{}",
        human.stdout
    );
    assert!(!human.stdout.contains("ssh-hostkeys"), "{}", human.stdout);
    // The list of operations: every one described, the lock-out ones off.
    let l = imgshift(&["generalize", "--list-operations"]);
    assert_eq!(l.code, 0);
    assert!(
        l.stdout
            .lines()
            .any(|x| x.starts_with("ssh-userdir") && x.contains(" off ")),
        "{}",
        l.stdout
    );
    assert!(l.stdout.lines().count() >= 12, "{}", l.stdout);
}

/// A disk with one MBR partition at 1 MiB whose first sector carries `magic` at `at`.
fn crafted_disk(path: &Path, part_type: u8, at: usize, magic: &[u8]) {
    let mut disk = vec![0u8; 4 << 20];
    let e = 446;
    disk[e + 4] = part_type;
    disk[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
    disk[e + 12..e + 16].copy_from_slice(&6144u32.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xAA;
    disk[(1 << 20) + at..(1 << 20) + at + magic.len()].copy_from_slice(magic);
    std::fs::write(path, disk).unwrap();
}

#[test]
fn refusals_are_one_line_and_leave_nothing_behind() {
    let env = guestfs_env();
    let d = tmpdir();
    let src = source_in(d.path());
    let one_line = |r: &Run, want: &str| {
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(want), "want {want:?}: {}", r.stderr);
    };
    let ov = d.path().join("ov.qcow2");
    one_line(
        &run_with_env(
            &[
                "generalize",
                s(&src),
                "--overlay",
                s(&ov),
                "--operations",
                "machine-id,bogus",
            ],
            &env,
        ),
        "unknown operation 'bogus'",
    );
    let win = d.path().join("win.raw");
    crafted_disk(&win, 0x07, 3, b"NTFS    ");
    one_line(
        &run_with_env(&["generalize", s(&win), "--overlay", s(&ov)], &env),
        "sysprep.exe",
    );
    let luks = d.path().join("luks.raw");
    crafted_disk(&luks, 0x83, 0, b"LUKS\xba\xbe\x00\x02");
    one_line(
        &run_with_env(&["generalize", s(&luks), "--overlay", s(&ov)], &env),
        "LUKS",
    );
    // An OVA: qemu would open the archive itself as the overlay's backing file (as a VMDK, the boot disk's
    // format), outside imgshift's gate; refused before anything is written, for generalize and the uploads.
    let ova = util::ova::make_ova();
    let ova_ov = ova.dir.join("ov.qcow2");
    one_line(
        &run_with_env(&["generalize", s(&ova.ova), "--overlay", s(&ova_ov)], &env),
        "an OVA cannot back an overlay",
    );
    one_line(
        &run_with_env(
            &[
                "generalize",
                "-f",
                "ova",
                s(&ova.ova),
                "--overlay",
                s(&ova_ov),
            ],
            &env,
        ),
        "an OVA cannot back an overlay",
    );
    assert!(!ova_ov.exists());
    // Without libguestfs: a one-line error naming the package; everything else keeps working.
    let no_gfs = [("PATH".to_string(), "/nonexistent".to_string())];
    one_line(
        &run_with_env(&["generalize", s(&src), "--overlay", s(&ov)], &no_gfs),
        "libguestfs-tools",
    );
    let copy = d.path().join("copy.raw");
    let r = run_with_env(&["convert", "-O", "raw", s(&src), s(&copy)], &no_gfs);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::remove_file(&copy).unwrap();
    assert_eq!(files_in(d.path()), vec!["luks.raw", "src.qcow2", "win.raw"]);
}

#[test]
fn convert_generalize_uses_a_temporary_overlay() {
    let env = guestfs_env();
    let d = tmpdir();
    let src = source_in(d.path());
    let before_hash = sha256(&src);
    let scratch = d.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let mut env = env;
    env.push(("TMPDIR".into(), s(&scratch).to_string()));
    let out = d.path().join("out.qcow2");
    let r = run_with_env(
        &[
            "convert",
            "-O",
            "qcow2",
            "--generalize=ssh-hostkeys,logs",
            s(&src),
            s(&out),
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("generalised"), "{}", r.stderr);
    assert_check_clean(&out, "qcow2");
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output", "json", s(&out)])).unwrap();
    assert!(
        info.get("backing-filename").is_none(),
        "a standalone output: {info}"
    );
    let flat = d.path().join("flat.raw");
    imgshift(&["convert", "-O", "raw", s(&out), s(&flat)]).ok();
    assert!(!exists_in(&flat, "/etc/ssh/ssh_host_rsa_key") && !exists_in(&flat, "/var/log/syslog"));
    // Not named, so kept.
    assert!(exists_in(&flat, "/root/.bash_history") && size_in(&flat, "/etc/machine-id") > 0);
    assert_eq!(sha256(&src), before_hash);
    assert!(
        files_in(&scratch).is_empty(),
        "the temporary overlay is gone: {:?}",
        files_in(&scratch)
    );
}

#[test]
fn upload_generalize_sends_the_generalised_guest_and_drops_its_overlay() {
    let mut env = guestfs_env();
    let d = tmpdir();
    let src = source_in(d.path());
    let state = d.path().join("state");
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        env.push((k.into(), v.into()));
    }
    let url = util::aws::moto_url();
    let r = run_with_env(
        &[
            "upload",
            "aws",
            s(&src),
            "--snapshot-only",
            "--generalize=ssh-hostkeys,machine-id",
            "--endpoint-url",
            &url,
            "--state-dir",
            s(&state),
            "--output",
            "json",
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("generalised"), "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let snap = v["snapshot_id"].as_str().unwrap();
    // The job finished: its journal and its overlay are gone.
    assert!(files_in(&state).is_empty(), "{:?}", files_in(&state));
    let back = d.path().join("back.raw");
    let r = run_with_env(
        &[
            "download",
            "aws",
            snap,
            s(&back),
            "-O",
            "raw",
            "--endpoint-url",
            &url,
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!exists_in(&back, "/etc/ssh/ssh_host_rsa_key"));
    assert_eq!(size_in(&back, "/etc/machine-id"), 0);
    assert!(
        exists_in(&back, "/root/.bash_history"),
        "not named, so kept"
    );
}

/// A real NTFS volume (made by libguestfs) holding `\Windows\System32\ntoskrnl.exe` with an x86_64 PE header.
fn windows_disk(dir: &Path, env: &[(String, String)]) -> PathBuf {
    let pe = dir.join("ntoskrnl.exe");
    let mut head = vec![0u8; 4096];
    head[..2].copy_from_slice(b"MZ");
    head[0x3c] = 0x80;
    head[0x80..0x84].copy_from_slice(b"PE\0\0");
    head[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
    std::fs::write(&pe, head).unwrap();
    let img = dir.join("win.img");
    let script = format!(
        "part-disk /dev/sda mbr\npart-set-mbr-id /dev/sda 1 0x07\nmkfs ntfs /dev/sda1\nmount /dev/sda1 /\n\
         mkdir-p /Windows/System32/config\nupload {} /Windows/System32/ntoskrnl.exe\n",
        pe.display()
    );
    let mut c = Command::new("guestfish")
        .args(["-N", &format!("{}=disk:32M", img.display())])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("guestfish is missing: run .ci/install-deps (libguestfs-tools)");
    {
        use std::io::Write as _;
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "guestfish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&pe).unwrap();
    img
}

#[test]
fn windows_guest_is_detected_and_never_generalised() {
    let env = guestfs_env();
    let d = tmpdir();
    let img = windows_disk(d.path(), &env);
    let r = imgshift(&["inspect", s(&img), "--output", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let w = &v["windows"][0];
    assert_eq!(w["root"], "/dev/sda1", "{v}");
    assert_eq!(w["distro"], "windows");
    assert_eq!(w["windows_systemroot"], "\\Windows");
    assert_eq!(w["arch"], "x86_64");
    let human = imgshift(&["inspect", s(&img)]);
    assert!(human.stdout.contains("os: Windows"), "{}", human.stdout);
    let ov = d.path().join("ov.qcow2");
    let r = run_with_env(&["generalize", s(&img), "--overlay", s(&ov)], &env);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("/dev/sda1 holds Windows") && r.stderr.contains("sysprep.exe"),
        "{}",
        r.stderr
    );
    assert!(!ov.exists());
}
