#![allow(clippy::unwrap_used, clippy::expect_used)]
//! OVA input at the CLI: `info` lists the descriptor's disks, `convert` converts the boot disk (or `--disk N`)
//! read in place from the tar. The OVA is built at test time: an OVF descriptor, a streamOptimized VMDK and a
//! qcow2 made by qemu-img.

mod ova_util;
mod util;

use ova_util::*;
use util::*;

#[test]
fn converts_the_boot_disk_and_disk_n_from_the_archive() {
    let o = make_ova();
    // Default: the boot disk (probed as an OVA).
    let out = o.dir.join("boot.qcow2");
    imgshift(&["convert", "-q", "-O", "qcow2", s(&o.ova), s(&out)]).ok();
    assert_check_clean(&out, "qcow2");
    assert_same(&o.boot_raw, "raw", &out, "qcow2");
    let v: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        "-f",
        "qcow2",
        s(&out),
    ]))
    .unwrap();
    assert_eq!(v["virtual-size"], BOOT_SIZE);

    // --disk 1: the data disk, with -f ova given.
    let out1 = o.dir.join("data.vhdx");
    imgshift(&[
        "convert",
        "-q",
        "-f",
        "ova",
        "--disk",
        "1",
        "-O",
        "vhdx",
        s(&o.ova),
        s(&out1),
    ])
    .ok();
    assert_check_clean(&out1, "vhdx");
    assert_same(&o.data_raw, "raw", &out1, "vhdx");
    // --disk 0 is the boot disk again.
    let out0 = o.dir.join("boot0.raw");
    imgshift(&["convert", "-q", "--disk", "0", s(&o.ova), s(&out0)]).ok();
    assert_same(&o.boot_raw, "raw", &out0, "raw");
    // Nothing was extracted beside the archive.
    assert_eq!(
        files_in(&o.dir),
        vec![
            "boot.qcow2",
            "boot.raw",
            "boot0.raw",
            "data.raw",
            "data.vhdx",
            "vm.ova"
        ]
    );
}

#[test]
fn info_lists_every_disk() {
    let o = make_ova();
    let r = imgshift(&["info", "--output", "json", s(&o.ova)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // The boot disk's qemu-style fields.
    assert_eq!(v["virtual-size"], BOOT_SIZE);
    assert_eq!(v["format"], "vmdk");
    assert_eq!(v["filename"], s(&o.ova));
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{v}");
    assert_eq!(disks[0]["index"], 0);
    assert_eq!(disks[0]["id"], "boot");
    assert_eq!(disks[0]["file"], "vm-disk1.vmdk");
    assert_eq!(disks[0]["capacity"], BOOT_SIZE);
    assert_eq!(disks[0]["format"], "vmdk");
    assert_eq!(disks[1]["index"], 1);
    assert_eq!(disks[1]["id"], "data");
    assert_eq!(disks[1]["file"], "vm-data.qcow2");
    assert_eq!(disks[1]["capacity"], DATA_SIZE);
    assert_eq!(disks[1]["format"], "qcow2");

    let r = imgshift(&["info", s(&o.ova)]).ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.contains(&"file format: vmdk"), "{}", r.stdout);
    let disk_line = |i: usize| {
        lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{i}: ")))
            .unwrap_or_else(|| panic!("no line for disk {i}: {}", r.stdout))
            .to_string()
    };
    let l0 = disk_line(0);
    for want in [
        "id boot",
        "file vm-disk1.vmdk",
        "(16777216 bytes)",
        "format vmdk",
    ] {
        assert!(l0.contains(want), "{l0}");
    }
    let l1 = disk_line(1);
    let cap = format!("({DATA_SIZE} bytes)");
    for want in [
        "id data",
        "file vm-data.qcow2",
        cap.as_str(),
        "format qcow2",
    ] {
        assert!(l1.contains(want), "{l1}");
    }
}

#[test]
fn disk_errors_are_one_line() {
    let o = make_ova();
    let out = o.dir.join("x.raw");
    let r = imgshift(&["convert", "-q", "--disk", "2", s(&o.ova), s(&out)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("no disk 2"), "{}", r.stderr);
    assert!(!out.exists());
    // --disk on an image that is not an OVA.
    let r = imgshift(&["convert", "-q", "--disk", "1", s(&o.boot_raw), s(&out)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("not an OVA"), "{}", r.stderr);
    assert!(!out.exists());
    // Not a number: a usage error.
    let r = imgshift(&["convert", "--disk", "first", s(&o.ova), s(&out)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}
