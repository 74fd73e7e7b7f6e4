//! `libvirt:domain/NAME` as a source (issue 22) against the private libvirtd (`bash .ci/standins start`): every
//! disk of a domain, boot disk first, read in place over libvirt's download streams. A two-disk domain converts
//! (its boot disk) and migrates (both disks) to equal copies; a running domain is refused with the hint, and read
//! with `--allow-running` after one warning. Each test has its own transient pools and domain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::path::{Path, PathBuf};

use util::libvirt::*;
use util::*;

const MIB: u64 = 1 << 20;

/// A domain whose two disks live in `pool`: the boot disk `boot.qcow2` (24 MiB) named by its path (`type='file'`,
/// `<boot order='1'/>`) but listed second, and the data disk `data.raw` (16 MiB) named by pool and volume. Returns
/// the domain's name and the raw contents of the boot and data disks.
fn two_disk_domain(pool: &mut Pool, dir: &Path) -> (String, PathBuf, PathBuf) {
    let boot_raw = dir.join("boot.raw");
    make_raw(
        &boot_raw,
        24 * MIB,
        &[(0, 2 * MIB), (12 * MIB - 4096, 8192), (23 * MIB, MIB)],
        &[(4 * MIB, MIB)],
    );
    let data_raw = dir.join("data.raw");
    make_raw(&data_raw, 16 * MIB, &[(MIB, 3 * MIB), (15 * MIB, MIB)], &[]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&boot_raw),
        s(&pool.path("boot.qcow2")),
    ]);
    std::fs::copy(&data_raw, pool.path("data.raw")).unwrap();
    virsh_ok(&["pool-refresh", &pool.name]);
    let name = pool.domain();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <features><acpi/><apic/></features>\
         <devices>\
         <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>\
         <disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
           <source pool='{pool}' volume='data.raw'/><target dev='vdb' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
           <source file='{boot}'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>\
         </devices></domain>",
        pool = pool.name,
        boot = s(&pool.path("boot.qcow2")),
    );
    let f = dir.join("dom.xml");
    std::fs::write(&f, xml).unwrap();
    virsh_ok(&["define", s(&f)]);
    (name, boot_raw, data_raw)
}

fn one_line_error(r: &Run) {
    assert_eq!(r.code, 1, "stdout={} stderr={}", r.stdout, r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}

#[test]
fn two_disk_domain_converts_and_migrates_to_equal_disks() {
    let d = tmpdir();
    let mut src_pool = Pool::new();
    let (dom, boot_raw, data_raw) = two_disk_domain(&mut src_pool, d.path());
    let source = format!("libvirt:domain/{dom}");
    let u = uri();

    // A reading command takes the boot disk: the one with boot order 1, although it is listed second.
    let r = imgshift(&["info", &source, "--connect", &u, "--output", "json"]).ok();
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["virtual-size"], 24 * MIB, "{}", r.stdout);
    let out = d.path().join("out.vmdk");
    imgshift(&["convert", &source, s(&out), "-O", "vmdk", "--connect", &u]).ok();
    assert_same(&boot_raw, "raw", &out, "vmdk");
    let r = imgshift(&["compare", &source, s(&boot_raw), "--connect", &u]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = imgshift(&["map", &source, "--connect", &u, "--output", "json"]).ok();
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let mapped: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(mapped, 24 * MIB, "{}", r.stdout);
    let r = imgshift(&["inspect", &source, "--connect", &u, "--output", "json"]).ok();
    assert!(r.stdout.contains("no_operating_system"), "{}", r.stdout);

    // migrate --to libvirt: both disks, boot disk first, into another pool on one new domain.
    let mut dst = Pool::new();
    let name = dst.domain();
    let state = d.path().join("state");
    let r = imgshift(&[
        "migrate",
        &source,
        "--source-connect",
        &u,
        "--to",
        "libvirt",
        "--connect",
        &u,
        "--pool",
        &dst.name,
        "--name",
        &name,
        "--domain-type",
        "qemu",
        "--force",
        "--yes",
        "--state-dir",
        s(&state),
        "--output",
        "json",
    ])
    .ok();
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let v0 = format!("{name}.qcow2");
    let v1 = format!("{name}-data1.qcow2");
    assert_eq!(
        j["outputs"]["volumes"],
        serde_json::json!([v0, v1]),
        "{}",
        r.stdout
    );
    for (vol, want) in [(&v0, &boot_raw), (&v1, &data_raw)] {
        let back = d.path().join(format!("back-{vol}"));
        dst.download(vol, &back);
        assert_check_clean(&back, "qcow2");
        assert_same(want, "raw", &back, "qcow2");
    }
    // The source domain and its disks are untouched.
    assert_eq!(virsh_ok(&["domstate", &dom]).trim(), "shut off");
    assert_same(&boot_raw, "raw", &src_pool.path("boot.qcow2"), "qcow2");
}

#[test]
fn running_domain_is_refused_unless_allowed_then_warned_once() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let (dom, boot_raw, _) = two_disk_domain(&mut pool, d.path());
    let source = format!("libvirt:domain/{dom}");
    let u = uri();
    // The disks hold no boot loader: the firmware keeps looking for one, the domain keeps running.
    virsh_ok(&["start", &dom]);

    let r = imgshift(&["info", &source, "--connect", &u]);
    one_line_error(&r);
    assert!(
        r.stderr.contains(&format!("domain '{dom}' is running"))
            && r.stderr.contains("crash-consistent at best")
            && r.stderr.contains("--allow-running"),
        "{}",
        r.stderr
    );
    let out = d.path().join("out.qcow2");
    let r = imgshift(&["convert", &source, s(&out), "-O", "qcow2", "--connect", &u]);
    one_line_error(&r);
    assert!(!out.exists());

    let r = imgshift(&[
        "convert",
        &source,
        s(&out),
        "-O",
        "qcow2",
        "--connect",
        &u,
        "--allow-running",
    ])
    .ok();
    assert_eq!(
        r.stderr.matches("crash-consistent at best").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("warning: domain '{dom}' is running")),
        "{}",
        r.stderr
    );
    // Nothing writes to these disks while the firmware waits: the copy is equal here.
    assert_same(&boot_raw, "raw", &out, "qcow2");

    // migrate names the flag the same way.
    let dst = Pool::new();
    let r = imgshift(&[
        "migrate",
        &source,
        "--source-connect",
        &u,
        "--to",
        "libvirt",
        "--connect",
        &u,
        "--pool",
        &dst.name,
        "--dry-run",
    ]);
    one_line_error(&r);
    assert!(r.stderr.contains("--allow-running"), "{}", r.stderr);
    assert_eq!(virsh_ok(&["domstate", &dom]).trim(), "running");
}

#[test]
fn missing_domain_and_unreadable_disk_are_one_line() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let u = uri();
    let r = imgshift(&[
        "info",
        "libvirt:domain/imgshift-no-such-domain",
        "--connect",
        &u,
    ]);
    one_line_error(&r);
    assert!(
        r.stderr.contains("no domain 'imgshift-no-such-domain'"),
        "{}",
        r.stderr
    );

    // A disk outside every pool: libvirt cannot serve it; the message says how to make it a volume.
    let outside = d.path().join("outside.raw");
    make_raw(&outside, 4 * MIB, &[(0, MIB)], &[]);
    let name = pool.domain();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/></disk></devices></domain>",
        s(&outside)
    );
    let f = d.path().join("dom.xml");
    std::fs::write(&f, xml).unwrap();
    virsh_ok(&["define", s(&f)]);
    let r = imgshift(&["info", &format!("libvirt:domain/{name}"), "--connect", &u]);
    one_line_error(&r);
    assert!(
        r.stderr.contains("is in no storage pool") && r.stderr.contains("pool-create-as"),
        "{}",
        r.stderr
    );
}
