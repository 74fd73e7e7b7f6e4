//! `imgshift upload libvirt` against a real libvirtd (started by `bash .ci/standins start`, private socket).
//! Each test makes its own transient dir pool in a temporary folder and removes it afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use util::*;

const DEFAULT_URI: &str = "qemu:///system?socket=/var/tmp/imgshift-standins/libvirt/run/libvirt-sock";
const MIB: u64 = 1 << 20;

fn uri() -> String {
    std::env::var("IMGSHIFT_LIBVIRT_URI").unwrap_or_else(|_| DEFAULT_URI.to_string())
}

fn virsh(args: &[&str]) -> Run {
    let out = Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(uri())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run virsh ({e}): install libvirt-clients (`bash .ci/install-deps`)")
        });
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn virsh_ok(args: &[&str]) -> String {
    let r = virsh(args);
    assert_eq!(r.code, 0, "virsh {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "imgshift-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A transient dir pool in a temporary folder; destroyed (and its domains undefined) when dropped.
struct Pool {
    name: String,
    dir: tempfile::TempDir,
    domains: Vec<String>,
}

impl Pool {
    fn new() -> Pool {
        let r = virsh(&["uri"]);
        assert_eq!(
            r.code,
            0,
            "libvirtd is not reachable at {}: start it with `bash .ci/standins start` ({})",
            uri(),
            r.stderr.trim()
        );
        let dir = tmpdir();
        let name = unique("pool");
        virsh_ok(&["pool-create-as", &name, "dir", "--target", s(dir.path())]);
        Pool {
            name,
            dir,
            domains: Vec::new(),
        }
    }

    fn upload(&self, src: &Path, vol: &str, extra: &[&str]) -> Run {
        let u = uri();
        let mut args = vec![
            "upload",
            "libvirt",
            s(src),
            "--connect",
            &u,
            "--pool",
            &self.name,
            "--volume",
            vol,
        ];
        args.extend_from_slice(extra);
        imgshift(&args)
    }

    fn download(&self, vol: &str, dst: &Path) {
        virsh_ok(&["vol-download", "--pool", &self.name, vol, s(dst)]);
    }

    fn vol_xml(&self, vol: &str) -> String {
        virsh_ok(&["vol-dumpxml", "--pool", &self.name, vol])
    }

    fn volumes(&self) -> Vec<String> {
        let mut v: Vec<String> = virsh_ok(&["vol-list", "--pool", &self.name])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    fn path(&self, vol: &str) -> PathBuf {
        self.dir.path().join(vol)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d, "--nvram"]);
        }
        let _ = virsh(&["pool-destroy", &self.name]);
    }
}

/// A 24 MiB raw disk: data at the start, a piece straddling 12 MiB, data at the end, an allocated zero range.
fn test_raw(dir: &Path, name: &str, seed_len: u64) -> PathBuf {
    let raw = dir.join(name);
    make_raw(
        &raw,
        24 * MIB,
        &[
            (0, seed_len),
            (12 * MIB - 4096, 8192),
            (23 * MIB, MIB),
        ],
        &[(4 * MIB, 2 * MIB)],
    );
    raw
}

fn source_in(dir: &Path, raw: &Path, fmt: &str) -> PathBuf {
    let img = dir.join(format!("src.{fmt}"));
    qemu_img(&["convert", "-f", "raw", "-O", fmt, s(raw), s(&img)]);
    img
}

fn capacity_and_format(xml: &str) -> (u64, String) {
    let cap = xml
        .split("<capacity unit='bytes'>")
        .nth(1)
        .and_then(|t| t.split('<').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no capacity in {xml}"));
    let fmt = xml
        .split("<format type='")
        .nth(1)
        .and_then(|t| t.split('\'').next())
        .unwrap_or_else(|| panic!("no format in {xml}"))
        .to_string();
    (cap, fmt)
}

#[test]
fn uploads_three_source_formats_as_qcow2_and_raw() {
    let d = tmpdir();
    let pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", 3 * MIB);
    for src_fmt in ["vmdk", "vhdx", "vdi"] {
        let src = source_in(d.path(), &raw, src_fmt);
        for out in ["qcow2", "raw"] {
            let vol = format!("{src_fmt}-{out}.img");
            let r = pool
                .upload(&src, &vol, &["-O", out, "--output", "json"])
                .ok();
            let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            assert_eq!(j["capacity"], 24 * MIB, "{}", r.stdout);
            assert_eq!(
                j["path"].as_str().unwrap(),
                s(&pool.path(&vol)),
                "{}",
                r.stdout
            );
            let (cap, fmt) = capacity_and_format(&pool.vol_xml(&vol));
            assert_eq!(cap, 24 * MIB, "{src_fmt} -> {out}");
            assert_eq!(fmt, out, "{src_fmt} -> {out}");
            let back = d.path().join(format!("back-{vol}"));
            pool.download(&vol, &back);
            assert_same(&src, src_fmt, &back, out);
            if out == "qcow2" {
                assert_check_clean(&back, "qcow2");
            } else {
                // Holes stay holes: only the data (~4 MiB + the zero-filled short gaps) is allocated.
                let blocks = std::fs::metadata(pool.path(&vol)).unwrap().blocks() * 512;
                assert!(
                    blocks < 12 * MIB,
                    "{vol}: {blocks} bytes allocated of 24 MiB ({})",
                    r.stdout
                );
                assert!(j["streams"].as_u64().unwrap() >= 2, "{}", r.stdout);
            }
        }
    }
}

#[test]
fn define_writes_firmware_bus_disk_and_features() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let src = source_in(d.path(), &raw, "qcow2");
    for (firmware, bus, out) in [("bios", "sata", "qcow2"), ("uefi", "auto", "raw")] {
        let dom = unique("dom");
        pool.domains.push(dom.clone());
        let vol = format!("{dom}.img");
        let r = pool
            .upload(
                &src,
                &vol,
                &[
                    "-O",
                    out,
                    "--define",
                    &dom,
                    "--memory",
                    "256",
                    "--vcpus",
                    "2",
                    "--firmware",
                    firmware,
                    "--disk-bus",
                    bus,
                ],
            )
            .ok();
        assert!(r.stdout.contains(&dom), "{}", r.stdout);
        let x = virsh_ok(&["dumpxml", &dom]);
        assert!(x.contains("<domain type='qemu'"), "{x}");
        let want_bus = if bus == "auto" { "virtio" } else { bus };
        assert!(x.contains(&format!("bus='{want_bus}'")), "{x}");
        assert!(
            x.contains(&format!(
                "<source pool='{}' volume='{vol}'/>",
                pool.name
            )),
            "{x}"
        );
        assert!(x.contains(&format!("<driver name='qemu' type='{out}'/>")), "{x}");
        assert!(x.contains("<acpi/>") && x.contains("<apic/>"), "{x}");
        assert!(x.contains("<serial type='pty'>"), "{x}");
        assert!(x.contains("<memory unit='KiB'>262144</memory>"), "{x}");
        assert!(x.contains(">2</vcpu>"), "{x}");
        assert_eq!(x.contains("firmware='efi'"), firmware == "uefi", "{x}");
    }
}

#[test]
fn missing_pool_is_one_line() {
    let d = tmpdir();
    let _pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let u = uri();
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&raw),
        "--connect",
        &u,
        "--pool",
        "imgshift-no-such-pool",
        "--volume",
        "x.img",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("storage pool 'imgshift-no-such-pool' not found"),
        "{}",
        r.stderr
    );
}

#[test]
fn existing_volume_and_domain_need_overwrite() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let first = test_raw(d.path(), "first.raw", MIB);
    let second = test_raw(d.path(), "second.raw", 5 * MIB);
    pool.upload(&first, "v.img", &["-O", "raw"]).ok();

    let r = pool.upload(&second, "v.img", &["-O", "raw"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    let back = d.path().join("back.raw");
    pool.download("v.img", &back);
    assert_same(&first, "raw", &back, "raw");

    pool.upload(&second, "v.img", &["-O", "qcow2", "--overwrite"]).ok();
    std::fs::remove_file(&back).unwrap();
    pool.download("v.img", &back);
    assert_same(&second, "raw", &back, "qcow2");
    assert_eq!(capacity_and_format(&pool.vol_xml("v.img")).1, "qcow2");

    // A taken domain name is refused before any volume is created.
    let dom = unique("dom");
    pool.domains.push(dom.clone());
    pool.upload(&first, "d1.img", &["--define", &dom]).ok();
    let r = pool.upload(&first, "d2.img", &["--define", &dom]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("domain '{dom}' already exists")), "{}", r.stderr);
    assert_eq!(pool.volumes(), ["d1.img", "v.img"]);
    // With --overwrite the domain now uses the new volume.
    pool.upload(&first, "d2.img", &["--define", &dom, "--overwrite"])
        .ok();
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains("volume='d2.img'"), "{x}");
}

#[test]
fn unreachable_daemon_says_how_to_start_one() {
    let d = tmpdir();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let sock = d.path().join("no-such-sock");
    let u = format!("qemu:///system?socket={}", s(&sock));
    let r = imgshift(&[
        "upload", "libvirt", s(&raw), "--connect", &u, "--pool", "p", "--volume", "v",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot connect to libvirt") && r.stderr.contains("start libvirtd"),
        "{}",
        r.stderr
    );
}

#[test]
fn source_failing_mid_stream_leaves_no_volume() {
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", 3 * MIB);
    let img = d.path().join("bad.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    // Garble the compressed data of the cluster holding 12 MiB: the map still says data, the read fails.
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
    let idx = (12 * MIB - 4096) / 65536;
    f.read_exact_at(&mut b, l2 + idx * 8).unwrap();
    let entry = u64::from_be_bytes(b);
    assert_ne!(entry & (1 << 62), 0, "cluster must be compressed");
    let host = entry & ((1u64 << 54) - 1);
    f.write_all_at(&[0xffu8; 64], host).unwrap();
    drop(f);
    for out in ["qcow2", "raw"] {
        let r = pool.upload(&img, "bad.img", &["-O", out]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("was removed"), "{}", r.stderr);
        assert!(pool.volumes().is_empty(), "{:?}", pool.volumes());
        assert!(files_in(pool.dir.path()).is_empty());
    }
}
