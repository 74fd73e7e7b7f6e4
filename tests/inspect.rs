//! `imgshift inspect`: test guests built by tests/guests/mkguest.sh (no loop devices, no mounts), inspected as
//! raw and converted, asserted field by field; preflight verdicts per target; crafted bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use util::*;

fn mkguest(dir: &Path, variant: &str, size_mib: u64) -> PathBuf {
    let out = dir.join(format!("{variant}.raw"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/mkguest.sh");
    let r = Command::new(&script)
        .arg(variant)
        .arg(&out)
        .arg(size_mib.to_string())
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "mkguest.sh {variant} failed (needs e2fsprogs fdisk dosfstools mtools cpio: run .ci/install-deps): {}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

fn inspect(img: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["inspect", s(img), "--output", "json"];
    args.extend_from_slice(extra);
    let r = imgshift(&args);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {} / {}", r.stdout, r.stderr));
    (r.code, v)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn verdict(img: &Path, target: &str) -> (i32, String, Vec<String>) {
    let (code, v) = inspect(img, &["--target", target]);
    let pf = &v["preflight"];
    let ids = pf["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(!f["reason"].as_str().unwrap().is_empty());
            assert!(!f["fix"].as_str().unwrap().is_empty());
            f["id"].as_str().unwrap().to_string()
        })
        .collect();
    (code, pf["verdict"].as_str().unwrap().to_string(), ids)
}

#[test]
fn bios_guest_field_by_field_in_every_format() {
    let d = tmpdir();
    let raw = mkguest(d.path(), "bios", 64);
    let qcow = d.path().join("g.qcow2");
    let vmdk = d.path().join("g.vmdk");
    imgshift(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]).ok();
    imgshift(&["convert", "-O", "vmdk", s(&raw), s(&vmdk)]).ok();
    for img in [&raw, &qcow, &vmdk] {
        let (code, v) = inspect(img, &[]);
        assert_eq!(code, 0, "{v}");
        assert_eq!(v["partition_table"]["scheme"], "mbr");
        let parts = v["partition_table"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0]["number"], 1);
        assert_eq!(parts[0]["start"], 1048576);
        assert_eq!(parts[0]["type_id"], "mbr:0x83");
        assert_eq!(parts[0]["bootable"], true);
        assert_eq!(v["partition_table"]["mbr_boot_code"], true);
        let fs = &v["filesystems"]["/dev/sda1"];
        assert_eq!(fs["type"], "ext4");
        assert_eq!(fs["label"], "guestroot");
        assert_eq!(fs["uuid"], "11111111-2222-3333-4444-555555555555");
        assert_eq!(v["boot_mode"], "bios");
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
        let os = &v["operatingsystems"][0];
        assert_eq!(os["root"], "/dev/sda1");
        assert_eq!(os["distro"], "debian");
        assert_eq!(os["product_name"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os["major_version"], 12);
        assert_eq!(os["minor_version"], 0);
        assert_eq!(os["arch"], "x86_64");
        assert_eq!(os["hostname"], "guest-bios");
        assert_eq!(os["mountpoints"]["/"], "/dev/sda1");
        assert_eq!(os["mountpoints"]["/srv"], "/dev/sda1");
        assert_eq!(os["fstab"][0]["by"], "uuid");
        assert_eq!(os["fstab"][1]["by"], "label");
        assert_eq!(strs(&os["agents"]), ["cloud-init"]);
        assert_eq!(os["machine_specific"]["machine_id"], true);
        assert_eq!(
            strs(&os["machine_specific"]["ssh_host_keys"]),
            ["ssh_host_ecdsa_key", "ssh_host_ed25519_key", "ssh_host_rsa_key"]
        );
        let k = &os["kernels"][0];
        assert_eq!(k["version"], "6.1.0-99-amd64");
        assert_eq!(k["initramfs"], "initrd.img-6.1.0-99-amd64");
        assert_eq!(strs(&k["initramfs_archives"]), ["none", "gzip"]);
        assert_eq!(os["kernels"][1]["version"], "5.10.0-1-amd64");
        assert_eq!(
            strs(&os["drivers"]),
            ["ena", "nvme", "sd_mod", "virtio_blk", "virtio_net", "virtio_pci", "virtio_scsi"]
        );
    }
}

#[test]
fn uefi_guest_and_esp() {
    let d = tmpdir();
    let raw = mkguest(d.path(), "uefi", 64);
    let vmdk = d.path().join("g.vmdk");
    imgshift(&["convert", "-O", "vmdk", s(&raw), s(&vmdk)]).ok();
    for img in [&raw, &vmdk] {
        let (_, v) = inspect(img, &[]);
        assert_eq!(v["partition_table"]["scheme"], "gpt");
        let parts = v["partition_table"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0]["type_name"], "efi-system");
        assert_eq!(parts[0]["name"], "EFI System");
        assert_eq!(parts[0]["size"], 32 << 20);
        assert_eq!(parts[1]["type_name"], "linux");
        assert_eq!(v["filesystems"]["/dev/sda1"]["type"], "vfat");
        assert_eq!(v["filesystems"]["/dev/sda1"]["uuid"], "ABCD-1234");
        assert_eq!(v["filesystems"]["/dev/sda1"]["label"], "ESP");
        assert_eq!(v["filesystems"]["/dev/sda2"]["type"], "ext4");
        assert_eq!(strs(&v["efi_loaders"]), ["/dev/sda1:\\EFI\\BOOT\\BOOTX64.EFI"]);
        assert_eq!(v["boot_mode"], "uefi");
        let os = &v["operatingsystems"][0];
        assert_eq!(os["root"], "/dev/sda2");
        assert_eq!(os["mountpoints"]["/boot/efi"], "/dev/sda1");
        assert_eq!(strs(&os["agents"]), ["waagent"]);
        assert!(strs(&os["drivers"]).contains(&"hv_storvsc".to_string()));
    }
}

#[test]
fn preflight_verdicts_per_target() {
    let d = tmpdir();
    let bios = mkguest(d.path(), "bios", 64);
    let uefi = mkguest(d.path(), "uefi", 64);
    let novirtio = mkguest(d.path(), "novirtio", 64);
    let sda = mkguest(d.path(), "sda", 64);
    let noesp = mkguest(d.path(), "noesp", 64);

    assert_eq!(verdict(&bios, "aws"), (0, "ok".into(), vec![]));
    assert_eq!(verdict(&bios, "libvirt"), (0, "ok".into(), vec![]));
    let (code, v, ids) = verdict(&bios, "azure");
    assert_eq!((code, v.as_str()), (1, "fail"));
    assert_eq!(ids, ["azure-hv-storage", "azure-hv-net", "azure-agent"]);

    let (code, v, ids) = verdict(&uefi, "azure");
    assert_eq!((code, v.as_str(), ids.len()), (0, "ok", 0), "{ids:?}");
    let (code, v, ids) = verdict(&uefi, "aws");
    assert_eq!((code, v.as_str()), (1, "fail"));
    assert_eq!(ids, ["aws-nvme", "aws-ena"]);

    let (code, v, ids) = verdict(&novirtio, "libvirt");
    assert_eq!((code, v.as_str()), (0, "warn"));
    assert_eq!(ids, ["libvirt-virtio-fallback"]);

    let (code, v, ids) = verdict(&sda, "aws");
    assert_eq!((code, v.as_str()), (0, "warn"));
    assert_eq!(ids, ["aws-fstab-device"]);
    let (_, v) = inspect(&sda, &[]);
    assert_eq!(v["operatingsystems"][0]["fstab"][0]["by"], "device");

    let (code, v, ids) = verdict(&noesp, "libvirt");
    assert_eq!((code, v.as_str()), (1, "fail"));
    assert_eq!(ids, ["libvirt-boot-mode"]);
    let (_, v) = inspect(&noesp, &[]);
    assert_eq!(v["boot_mode"], "unknown");

    let r = imgshift(&["inspect", s(&bios), "--target", "gcp"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown target"), "{}", r.stderr);
}

fn problems(v: &Value) -> String {
    v["problems"].to_string()
}

#[test]
fn bad_input_is_named_not_panicked() {
    let d = tmpdir();
    // Partition entry 2 pointing past the 64 MiB disk.
    let raw = mkguest(d.path(), "bios", 64);
    let mut b = std::fs::read(&raw).unwrap();
    let e = 446 + 16;
    b[e + 4] = 0x83;
    b[e + 8..e + 12].copy_from_slice(&200_000u32.to_le_bytes());
    b[e + 12..e + 16].copy_from_slice(&100_000u32.to_le_bytes());
    let past = d.path().join("past.raw");
    std::fs::write(&past, &b).unwrap();
    let (code, v) = inspect(&past, &[]);
    assert_eq!(code, 0);
    assert!(problems(&v).contains("partition 2"), "{v}");
    assert!(problems(&v).contains("outside the 67108864 byte disk"), "{v}");
    assert_eq!(v["operatingsystems"][0]["distro"], "debian");

    // Corrupted ext4 superblock (metadata_csum catches a flipped byte in s_volume_name).
    let mut c = std::fs::read(&raw).unwrap();
    c[1048576 + 1024 + 0x78] ^= 0xff;
    let sb = d.path().join("sb.raw");
    std::fs::write(&sb, &c).unwrap();
    let (code, v) = inspect(&sb, &["--target", "libvirt"]);
    assert_eq!(code, 0, "{v}");
    assert!(problems(&v).contains("/dev/sda1: ext4 filesystem unreadable"), "{v}");
    assert_eq!(v["preflight"]["findings"][0]["id"], "libvirt-drivers-unknown");

    // GPT header declaring 256-byte entries (the gpt crate would assert).
    let uefi = mkguest(d.path(), "uefi", 64);
    let mut g = std::fs::read(&uefi).unwrap();
    g[512 + 84..512 + 88].copy_from_slice(&256u32.to_le_bytes());
    let gp = d.path().join("gpt.raw");
    std::fs::write(&gp, &g).unwrap();
    let (_, v) = inspect(&gp, &[]);
    assert!(problems(&v).contains("256 byte entries"), "{v}");

    // Initramfs member declaring 4 GiB in a tiny archive: named, bounded memory.
    let bomb = mkguest(d.path(), "bomb", 64);
    let (_, v) = inspect(&bomb, &[]);
    assert!(problems(&v).contains("declares 4294967295 bytes"), "{v}");
    let m = imgshift_measured(&["inspect", s(&bomb), "--output", "json"]);
    assert_eq!(m.code, 0, "{}", m.stderr);
    assert!(m.max_rss_kib < 64 * 1024, "peak RSS {} KiB", m.max_rss_kib);

    // Not a disk at all: a few random bytes.
    let junk = d.path().join("junk.raw");
    std::fs::write(&junk, vec![0xA5u8; 4096]).unwrap();
    let (code, v) = inspect(&junk, &["--target", "aws"]);
    assert_eq!(code, 1);
    assert_eq!(v["partition_table"]["scheme"], "none");
}

#[test]
fn reads_little_of_a_1gib_guest() {
    let d = tmpdir();
    let raw = mkguest(d.path(), "bios", 1024);
    let qcow = d.path().join("g.qcow2");
    imgshift(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]).ok();
    for img in [&raw, &qcow] {
        let r = imgshift(&["inspect", s(img), "--output", "json", "--stats"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let st: Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
        let rchar = st["rchar"].as_u64().unwrap();
        eprintln!("{}: {st}", img.display());
        assert!(rchar < 64 << 20, "read {rchar} bytes");
        let m = imgshift_measured(&["inspect", s(img)]);
        assert_eq!(m.code, 0);
        assert!(m.seconds < 1.0, "{} s", m.seconds);
    }
}
