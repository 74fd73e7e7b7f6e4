#![allow(clippy::unwrap_used, clippy::expect_used)]
//! OVA input at the CLI: `info` lists the descriptor's disks, `convert` converts the boot disk (or `--disk N`)
//! read in place from the tar. The OVA is built at test time: an OVF descriptor, a streamOptimized VMDK and a
//! qcow2 made by qemu-img.

mod util;

use std::path::{Path, PathBuf};

use util::*;

const MIB: u64 = 1 << 20;
/// Boot disk: 16 MiB (declared as 16 × 2^20 bytes in the descriptor).
const BOOT_SIZE: u64 = 16 * MIB;
/// Data disk: not a multiple of 64 KiB (declared in bytes).
const DATA_SIZE: u64 = 6 * MIB + 3 * 512;

struct Ova {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    ova: PathBuf,
    boot_raw: PathBuf,
    data_raw: PathBuf,
}

fn descriptor(data_bytes: u64, boot_bytes: u64) -> String {
    // DiskSection lists the data disk first; the hardware section puts the boot disk at address 0 of the
    // controller, so imgshift must list it first (index 0).
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:id="file1" ovf:href="vm-data.qcow2" ovf:size="{data_bytes}"/>
    <File ovf:id="file2" ovf:href="vm-disk1.vmdk" ovf:size="{boot_bytes}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:diskId="data" ovf:fileRef="file1" ovf:capacity="{DATA_SIZE}" ovf:capacityAllocationUnits="byte" ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html"/>
    <Disk ovf:diskId="boot" ovf:fileRef="file2" ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A virtual machine</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/data</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/boot</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// Builds `vm.ova` (descriptor first, as DSP0243 5.3 requires) in a fresh folder.
fn make_ova() -> Ova {
    let d = tmpdir();
    let dir = d.path().to_path_buf();
    let work = dir.join("parts");
    std::fs::create_dir(&work).unwrap();
    let boot_raw = dir.join("boot.raw");
    let data_raw = dir.join("data.raw");
    make_raw(
        &boot_raw,
        BOOT_SIZE,
        &[
            (0, MIB),
            (5 * MIB + 4096, 300 * 1024),
            (BOOT_SIZE - 512, 512),
        ],
        &[(8 * MIB, MIB)],
    );
    make_raw(
        &data_raw,
        DATA_SIZE,
        &[(64 * 1024, 128 * 1024), (DATA_SIZE - 2048, 2048)],
        &[],
    );
    let vmdk = work.join("vm-disk1.vmdk");
    let qcow = work.join("vm-data.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&boot_raw),
        s(&vmdk),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&data_raw),
        s(&qcow),
    ]);
    let ovf = work.join("vm.ovf");
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    std::fs::write(&ovf, descriptor(len(&qcow), len(&vmdk))).unwrap();
    let ova = dir.join("vm.ova");
    let mut b = tar::Builder::new(std::fs::File::create(&ova).unwrap());
    // Plain ustar members, as OVF exporters write them (DSP0243 5.3), not GNU sparse ones.
    b.sparse(false);
    b.mode(tar::HeaderMode::Deterministic);
    for (path, name) in [
        (&ovf, "vm.ovf"),
        (&vmdk, "vm-disk1.vmdk"),
        (&qcow, "vm-data.qcow2"),
    ] {
        b.append_path_with_name(path, name).unwrap();
    }
    b.into_inner().unwrap();
    std::fs::remove_dir_all(&work).unwrap();
    Ova {
        _dir: d,
        dir,
        ova,
        boot_raw,
        data_raw,
    }
}

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
