//! `imgshift inspect`: real bootable test guests built by tests/guests/mkguest.sh (no loop devices, no mounts),
//! inspected as raw and converted, asserted field by field; preflight verdicts per target; the libvirt verdict
//! proven by booting every guest under QEMU/TCG (tests/guests/boot.sh); bounded reads; crafted bad input.
//!
//! Needs the guest tools and qemu-system-x86 (`.ci/install-deps` installs them). Each guest variant is built
//! once per test run and shared (inspection never writes it; boots run with -snapshot).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde_json::Value;
use util::*;

/// Where built guests are kept across runs (and worktrees: the target directory is shared), keyed by the
/// content of mkguest.sh: an unchanged script reuses its guests. Inspection never writes them and boots run
/// with -snapshot. Guests of other script versions are removed after a day.
fn guests_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("inspect-guests");
        std::fs::create_dir_all(&dir).unwrap();
        let tag = script_tag();
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 86_400));
            if old && !e.file_name().to_string_lossy().contains(&tag) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        dir
    })
}

/// FNV-1a of mkguest.sh: the cache key of its guests.
fn script_tag() -> String {
    let text = std::fs::read(script("mkguest.sh")).unwrap();
    let h = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// This process's scratch folder (converted images); folders of finished test processes are removed.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for e in std::fs::read_dir(base).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("inspect-scratch-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = base.join(format!("inspect-scratch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/guests")
        .join(name)
}

/// Builds (once per run) the raw guest `variant` of `size_mib` MiB.
fn guest_sized(variant: &str, size_mib: u64) -> PathBuf {
    // Pin the binary under test now, before seconds of guest building give another worktree's build the time to
    // replace target/debug/imgshift (see util::imgshift_bin).
    imgshift_bin();
    static BUILT: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let key = format!("{variant}-{size_mib}");
    let cell = {
        let mut m = BUILT.get_or_init(Default::default).lock().unwrap();
        Arc::clone(m.entry(key.clone()).or_default())
    };
    cell.get_or_init(|| {
        let out = guests_dir().join(format!("{key}-{}.raw", script_tag()));
        if out.exists() {
            return out;
        }
        // Built under a private name and renamed: a concurrent run never sees half a guest.
        let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
        let r = Command::new("bash")
            .arg(script("mkguest.sh"))
            .arg(variant)
            .arg(&tmp)
            .arg(size_mib.to_string())
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "mkguest.sh {variant} failed (run .ci/install-deps for its tools): {}",
            String::from_utf8_lossy(&r.stderr)
        );
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

fn guest(variant: &str) -> PathBuf {
    guest_sized(variant, 64)
}

fn convert(src: &Path, fmt: &str) -> PathBuf {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let dst = scratch().join(format!("{stem}.{}.{fmt}", rand_tag()));
    imgshift(&["convert", "-O", fmt, s(src), s(&dst)]).ok();
    dst
}

fn rand_tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("c{}", N.fetch_add(1, Ordering::Relaxed))
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
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn problems(v: &Value) -> String {
    v["problems"].to_string()
}

/// (exit code, verdict, finding ids, settings) of `inspect --target`.
fn verdict(img: &Path, target: &str, extra: &[&str]) -> (i32, String, Vec<String>, Value) {
    let mut args = vec!["--target", target];
    args.extend_from_slice(extra);
    let (code, v) = inspect(img, &args);
    let pf = &v["preflight"];
    let ids = pf["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(!f["reason"].as_str().unwrap().is_empty(), "{f}");
            assert!(!f["fix"].as_str().unwrap().is_empty(), "{f}");
            f["id"].as_str().unwrap().to_string()
        })
        .collect();
    (
        code,
        pf["verdict"].as_str().unwrap().to_string(),
        ids,
        pf["settings"].clone(),
    )
}

const UUID: &str = "5e1f0c2a-7b3d-4c8e-9f10-2a3b4c5d6e7f";
const KVER: &str = "6.1.0-";

/// What every variant's Debian root looks like.
fn assert_linux_root(v: &Value, variant: &str, root: &str) {
    let os = &v["operatingsystems"][0];
    assert_eq!(v["operatingsystems"].as_array().unwrap().len(), 1);
    assert_eq!(os["root"], root);
    assert_eq!(os["name"], "linux");
    assert_eq!(os["distro"], "debian");
    assert_eq!(os["product_name"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(os["version"], "12");
    assert_eq!(os["major_version"], 12);
    assert_eq!(os["minor_version"], 0);
    assert_eq!(os["package_format"], "deb");
    assert_eq!(os["arch"], "x86_64");
    assert_eq!(os["hostname"], format!("guest-{variant}"));
    assert_eq!(os["mountpoints"]["/"], root);
    let fs = &v["filesystems"][root];
    assert_eq!(fs["type"], "ext4");
    assert_eq!(fs["label"], "imgshift-root");
    assert_eq!(fs["uuid"], UUID);
    assert_eq!(fs["inspectable"], true);
    let m = &os["machine_state"];
    assert_eq!(m["machine_id"].as_str().unwrap().len(), 32);
    assert_eq!(
        strs(&m["ssh_host_keys"]),
        [
            "/etc/ssh/ssh_host_ecdsa_key",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_rsa_key"
        ]
    );
    assert_eq!(
        strs(&m["log_files"]),
        [
            "/var/log/apt/history.log",
            "/var/log/auth.log",
            "/var/log/syslog"
        ]
    );
    assert_eq!(strs(&m["shell_history"]), ["/root/.bash_history"]);
    assert_eq!(
        strs(&m["dhcp_leases"]),
        ["/var/lib/dhcp/dhclient.eth0.leases"]
    );
    assert_eq!(m["cloud_init_instance"], true);
    let k = &os["kernels"][0];
    assert!(k["version"].as_str().unwrap().starts_with(KVER), "{k}");
    assert!(k["version"].as_str().unwrap().ends_with("-amd64"), "{k}");
    assert_eq!(
        k["initramfs"],
        format!("initrd.img-{}", k["version"].as_str().unwrap())
    );
    assert_eq!(os["kernels"].as_array().unwrap().len(), 1);
}

const BIOS_DRIVERS: &[&str] = &[
    "ahci",
    "ata_piix",
    "ena",
    "nvme",
    "sd_mod",
    "virtio_blk",
    "virtio_net",
    "virtio_pci",
    "virtio_scsi",
];

#[test]
fn bios_guest_field_by_field_in_every_format() {
    let raw = guest("bios");
    let images = [
        raw.clone(),
        convert(&raw, "qcow2"),
        convert(&raw, "vmdk"),
        convert(&raw, "vhdx"),
        convert(&raw, "vpc"),
        convert(&raw, "vdi"),
    ];
    for img in &images {
        let (code, v) = inspect(img, &[]);
        assert_eq!(code, 0, "{v}");
        // VHD (vpc) rounds the size up to its CHS geometry.
        let size = v["virtual_size"].as_u64().unwrap();
        assert!(
            size == 64 << 20 || (img.extension().unwrap() == "vpc" && size < 65 << 20),
            "{size}"
        );
        assert_eq!(v["partition_table"]["scheme"], "mbr");
        let parts = v["partition_table"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0]["number"], 1);
        assert_eq!(parts[0]["start"], 1 << 20);
        assert_eq!(parts[0]["size"], 62 << 20);
        assert_eq!(parts[0]["type_id"], "mbr:0x83");
        assert_eq!(parts[0]["type_name"], "linux");
        assert_eq!(parts[0]["bootable"], true);
        assert_eq!(v["boot"]["mode"], "bios");
        assert_eq!(v["boot"]["bios_loader"], "grub");
        assert_eq!(v["boot"]["grub_core_lba"], 1);
        assert_eq!(v["boot"]["efi_loaders"].as_array().unwrap().len(), 0);
        assert_eq!(problems(&v), "[]");
        assert_linux_root(&v, "bios", "/dev/sda1");
        let os = &v["operatingsystems"][0];
        assert_eq!(os["mountpoints"]["/srv"], "/dev/sda1");
        assert_eq!(os["fstab"][0]["spec"], format!("UUID={UUID}"));
        assert_eq!(os["fstab"][0]["by"], "uuid");
        assert_eq!(os["fstab"][1]["by"], "label");
        assert_eq!(strs(&os["agents"]), ["cloud-init"]);
        let k = &os["kernels"][0];
        assert_eq!(strs(&k["initramfs_listing"]["archives"]), ["none", "gzip"]);
        assert!(
            k["cmdline"]
                .as_str()
                .unwrap()
                .starts_with("root=LABEL=imgshift-root ro")
        );
        assert_eq!(strs(&k["installed"]), ["ena", "virtio_net"]);
        assert_eq!(strs(&os["drivers"]), BIOS_DRIVERS);
    }
}

#[test]
fn uefi_guest_and_esp() {
    let raw = guest("uefi");
    for img in [raw.clone(), convert(&raw, "vhdx"), convert(&raw, "qcow2")] {
        let (code, v) = inspect(&img, &[]);
        assert_eq!(code, 0);
        assert_eq!(v["partition_table"]["scheme"], "gpt");
        assert_eq!(v["partition_table"]["mbr_boot_code"], false);
        let parts = v["partition_table"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0]["type_name"], "efi-system");
        assert_eq!(parts[0]["type_id"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(parts[0]["name"], "EFI System");
        assert_eq!(parts[0]["start"], 1 << 20);
        assert_eq!(parts[0]["size"], 32 << 20);
        assert_eq!(parts[1]["type_name"], "linux");
        assert_eq!(parts[1]["name"], "root");
        assert_eq!(parts[1]["start"], 67584 * 512);
        let esp = &v["filesystems"]["/dev/sda1"];
        assert_eq!(esp["type"], "vfat");
        assert_eq!(esp["uuid"], "ABCD-1234");
        assert_eq!(esp["label"], "ESP");
        assert_eq!(v["boot"]["mode"], "uefi");
        assert_eq!(v["boot"].get("bios_loader"), None);
        let l = &v["boot"]["efi_loaders"][0];
        assert_eq!(l["device"], "/dev/sda1");
        assert_eq!(l["path"], "\\EFI\\BOOT\\BOOTX64.EFI");
        assert_eq!(l["arch"], "x86_64");
        assert_eq!(
            v["boot"]["efi_fallback"],
            "/dev/sda1:\\EFI\\BOOT\\BOOTX64.EFI"
        );
        assert_eq!(problems(&v), "[]");
        assert_linux_root(&v, "uefi", "/dev/sda2");
        let os = &v["operatingsystems"][0];
        assert_eq!(os["mountpoints"]["/boot/efi"], "/dev/sda1");
        assert_eq!(strs(&os["agents"]), ["waagent", "amazon-ssm-agent"]);
        let k = &os["kernels"][0];
        assert_eq!(strs(&k["initramfs_listing"]["archives"]), ["none", "zstd"]);
        let mut want: Vec<&str> = BIOS_DRIVERS.to_vec();
        want.extend(["hv_netvsc", "hv_storvsc", "hv_vmbus"]);
        want.sort();
        assert_eq!(strs(&os["drivers"]), want);
    }
}

#[test]
fn other_variants_field_by_field() {
    let (_, v) = inspect(&guest("novirtio"), &[]);
    assert_linux_root(&v, "novirtio", "/dev/sda1");
    let os = &v["operatingsystems"][0];
    assert_eq!(
        strs(&os["kernels"][0]["initramfs_listing"]["archives"]),
        ["xz"]
    );
    assert_eq!(strs(&os["drivers"]), ["ahci", "ata_piix", "sd_mod"]);
    assert_eq!(strs(&os["kernels"][0]["installed"]), Vec::<String>::new());

    let (_, v) = inspect(&guest("sda"), &[]);
    assert_linux_root(&v, "sda", "/dev/sda1");
    let os = &v["operatingsystems"][0];
    assert_eq!(
        strs(&os["kernels"][0]["initramfs_listing"]["archives"]),
        ["lz4"]
    );
    assert!(
        os["kernels"][0]["cmdline"]
            .as_str()
            .unwrap()
            .starts_with("root=/dev/sda1 ro")
    );
    assert_eq!(os["fstab"][0]["spec"], "/dev/sda1");
    assert_eq!(os["fstab"][0]["by"], "device");
    assert_eq!(strs(&os["drivers"]), BIOS_DRIVERS);

    let (_, v) = inspect(&guest("noesp"), &[]);
    assert_linux_root(&v, "noesp", "/dev/sda2");
    assert_eq!(v["partition_table"]["scheme"], "gpt");
    let parts = v["partition_table"]["partitions"].as_array().unwrap();
    assert_eq!(parts[0]["type_name"], "bios-boot");
    assert_eq!(parts[0]["start"], 2048 * 512);
    assert_eq!(parts[1]["type_name"], "linux");
    assert_eq!(v["boot"]["mode"], "bios");
    assert_eq!(v["boot"]["grub_core_lba"], 2048);
    assert_eq!(problems(&v), "[]");
    assert_eq!(
        strs(&v["operatingsystems"][0]["kernels"][0]["initramfs_listing"]["archives"]),
        ["gzip"]
    );

    let (_, v) = inspect(&guest("bootpart"), &[]);
    assert_linux_root(&v, "bootpart", "/dev/sda2");
    let boot = &v["filesystems"]["/dev/sda1"];
    assert_eq!(boot["label"], "imgshift-boot");
    assert_eq!(boot["uuid"], "5e1f0c2a-7b3d-4c8e-9f10-00000000b007");
    let os = &v["operatingsystems"][0];
    assert_eq!(os["mountpoints"]["/boot"], "/dev/sda1");
    // Kernel, initramfs and grub.cfg were read from the separate /boot filesystem.
    assert!(
        os["kernels"][0]["cmdline"]
            .as_str()
            .unwrap()
            .starts_with("root=LABEL=imgshift-root")
    );
    assert_eq!(strs(&os["drivers"]), BIOS_DRIVERS);
    assert_eq!(v["boot"]["mode"], "bios");
    assert_eq!(problems(&v), "[]");

    let (_, v) = inspect(&guest("bomb"), &[]);
    assert_linux_root(&v, "bomb", "/dev/sda1");
    assert_eq!(v["operatingsystems"][0]["drivers"], Value::Null);
    let p = problems(&v);
    assert!(
        p.contains("gzip archive at byte 1024: member huge.bin declares 4294967295 bytes but the archive ends after 4096"),
        "{p}"
    );
    let l = &v["operatingsystems"][0]["kernels"][0]["initramfs_listing"];
    // 5 in the microcode archive (., kernel, kernel/x86, kernel/x86/microcode, GenuineIntel.bin), 1500 nested
    // directories, then huge.bin.
    assert_eq!(l["members"], 5 + 1500 + 1);
}

#[test]
fn preflight_verdicts_per_target() {
    // (variant, target, extra args, exit code, verdict, finding ids, settings checked)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [&'a str],
        i32,
        &'a str,
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
    );
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        ("bios", "aws", &[], 0, "ok", &[], &[("boot_mode", "legacy-bios")]),
        ("bios", "azure", &[], 1, "fail", &["azure-hv-storage", "azure-hv-net"], &[("hyper_v_generation", "V1")]),
        ("bios", "libvirt", &[], 0, "ok", &[], &[("bus", "virtio"), ("firmware", "bios")]),
        ("uefi", "aws", &[], 1, "fail", &["aws-boot-mode-uefi"], &[("boot_mode", "uefi")]),
        ("uefi", "aws", &["--boot-mode", "uefi"], 0, "ok", &[], &[("boot_mode", "uefi")]),
        ("uefi", "azure", &[], 0, "ok", &[], &[("hyper_v_generation", "V2")]),
        ("uefi", "libvirt", &[], 0, "ok", &[], &[("firmware", "efi")]),
        ("novirtio", "aws", &[], 1, "fail", &["aws-nvme", "aws-ena"], &[]),
        ("novirtio", "libvirt", &[], 0, "warn", &["libvirt-virtio-sata", "libvirt-virtio-net"], &[("bus", "sata")]),
        ("sda", "aws", &[], 1, "fail", &["aws-root-device"], &[]),
        ("sda", "libvirt", &[], 0, "warn", &["libvirt-root-sd-scsi"], &[("bus", "scsi")]),
        ("noesp", "aws", &[], 0, "ok", &[], &[("boot_mode", "legacy-bios")]),
        ("noesp", "aws", &["--boot-mode", "uefi"], 1, "fail", &["aws-boot-mode-bios"], &[]),
        ("noesp", "libvirt", &[], 0, "ok", &[], &[("firmware", "bios")]),
        ("bootpart", "aws", &[], 0, "ok", &[], &[("boot_mode", "legacy-bios")]),
        ("bootpart", "libvirt", &[], 0, "ok", &[], &[("bus", "virtio")]),
        ("bomb", "libvirt", &[], 1, "fail", &["libvirt-initramfs-unreadable"], &[]),
        ("bomb", "aws", &[], 1, "fail", &["aws-initramfs-unreadable"], &[]),
    ];
    for (variant, target, extra, code, want, ids, settings) in cases {
        let (c, v, got, set) = verdict(&guest(variant), target, extra);
        assert_eq!(
            (c, v.as_str(), got.clone()),
            (
                *code,
                *want,
                ids.iter().map(|s| s.to_string()).collect::<Vec<_>>()
            ),
            "{variant} {target} {extra:?}"
        );
        for (k, val) in *settings {
            assert_eq!(set[k], *val, "{variant} {target}: {set}");
        }
    }
    let r = imgshift(&["inspect", s(&guest("bios")), "--target", "gcp"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid value 'gcp'"), "{}", r.stderr);
}

/// Boots `img` with boot.sh; returns (booted, marker line, seconds).
fn boot(img: &Path, fmt: &str, firmware: &str, bus: &str) -> (bool, String, f64) {
    let t = Instant::now();
    let r = Command::new("bash")
        .arg(script("boot.sh"))
        .args([s(img), fmt, firmware, bus])
        .env("BOOT_TIMEOUT", "120")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert!(
        r.status.code() != Some(2),
        "boot.sh could not run (run .ci/install-deps): {}",
        String::from_utf8_lossy(&r.stderr)
    );
    (r.status.success(), out, t.elapsed().as_secs_f64())
}

/// For every guest converted to qcow2: `inspect --target libvirt` says ok exactly when the guest boots to its
/// marker with a virtio disk (with the firmware inspect names), and when it suggests another bus, the guest
/// boots on that bus. Boots run two at a time (TCG, 2 cores).
#[test]
fn libvirt_verdict_proven_by_booting() {
    let variants = [
        "bios", "uefi", "novirtio", "sda", "noesp", "bootpart", "bomb",
    ];
    let plans: Vec<(String, PathBuf, String, Value, Value)> = variants
        .iter()
        .map(|v| {
            let qcow = convert(&guest(v), "qcow2");
            let (_, verdict, _, settings) = verdict(&qcow, "libvirt", &[]);
            let (_, full) = inspect(&qcow, &[]);
            (v.to_string(), qcow, verdict, settings, full)
        })
        .collect();
    let queue = Mutex::new(plans.iter().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                loop {
                    let Some((variant, qcow, verdict, settings, full)) =
                        queue.lock().unwrap().pop()
                    else {
                        return;
                    };
                    let fw = if settings["firmware"] == "efi" {
                        "uefi"
                    } else {
                        "bios"
                    };
                    let virtio = boot(qcow, "qcow2", fw, "virtio");
                    let bus = settings["bus"].as_str().unwrap().to_string();
                    let fallback = (bus != "virtio").then(|| boot(qcow, "qcow2", fw, &bus));
                    results.lock().unwrap().push((
                        variant.clone(),
                        verdict.clone(),
                        fw,
                        bus,
                        virtio,
                        fallback,
                        full["operatingsystems"][0]["machine_state"]["machine_id"].clone(),
                    ));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| a.0.cmp(&b.0));
    for (variant, verdict, fw, bus, virtio, fallback, _) in &results {
        eprintln!(
            "{variant}: verdict {verdict}, {fw}/virtio: {} ({:.1} s); fallback {bus}: {:?}",
            virtio.1, virtio.2, fallback
        );
    }
    for (variant, verdict, _, bus, virtio, fallback, mid) in &results {
        assert_eq!(
            verdict == "ok",
            virtio.0,
            "{variant}: verdict {verdict} but the virtio boot printed {:?}",
            virtio.1
        );
        if virtio.0 {
            assert_eq!(
                virtio.1,
                format!("IMGSHIFT-BOOT-OK machine-id={}", mid.as_str().unwrap()),
                "{variant}: the guest booted from another root than inspect read"
            );
        }
        if let Some(fb) = fallback {
            assert!(
                fb.0,
                "{variant}: suggested bus {bus} does not boot: {:?}",
                fb.1
            );
        } else if verdict != "ok" {
            // No other bus suggested: the guest must fail on virtio (a fail verdict).
            assert_eq!(verdict, "fail", "{variant}");
        }
    }
    // The negative boots are real: novirtio and sda did not find their root on virtio.
    for v in ["novirtio", "sda"] {
        let r = results.iter().find(|r| r.0 == v).unwrap();
        assert_eq!(r.4.1, "IMGSHIFT-NO-ROOT", "{v}");
    }
}

/// Reads are bounded: on a 1 GiB guest, inspection reads under 64 MiB (rchar, the kernel's count of bytes the
/// process read, printed by `--stats` from /proc/self/io at exit). Work is bounded, not time.
#[test]
fn reads_little_of_a_1gib_guest() {
    let raw = guest_sized("bios", 1024);
    let qcow = convert(&raw, "qcow2");
    for img in [&raw, &qcow] {
        let r = imgshift(&[
            "inspect",
            s(img),
            "--output",
            "json",
            "--stats",
            "--target",
            "aws",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["virtual_size"], 1u64 << 30);
        assert_eq!(v["preflight"]["verdict"], "ok");
        let st: Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
        let rchar = st["rchar"].as_u64().unwrap();
        let guest_bytes = st["guest_bytes_read"].as_u64().unwrap();
        eprintln!(
            "{}: rchar {rchar} B, guest bytes read {guest_bytes} B",
            img.display()
        );
        assert!(rchar < 64 << 20, "read {rchar} bytes");
        assert!(
            guest_bytes < 64 << 20,
            "read {guest_bytes} bytes of the guest"
        );
    }
}

#[test]
fn bad_input_is_named_not_panicked() {
    let d = tmpdir();
    let raw = guest("bios");
    // Partition entry 2 pointing past the 64 MiB disk.
    let mut b = std::fs::read(&raw).unwrap();
    let e = 446 + 16;
    b[e + 4] = 0x83;
    b[e + 8..e + 12].copy_from_slice(&200_000u32.to_le_bytes());
    b[e + 12..e + 16].copy_from_slice(&100_000u32.to_le_bytes());
    let past = d.path().join("past.raw");
    std::fs::write(&past, &b).unwrap();
    let (code, v) = inspect(&past, &["--target", "libvirt"]);
    assert_eq!(code, 0, "{v}");
    assert!(
        problems(&v)
            .contains("partition 2 (102400000+51200000 bytes) lies outside the 67108864 byte disk"),
        "{v}"
    );
    assert_eq!(v["operatingsystems"][0]["distro"], "debian");

    // Corrupted ext4 superblock (metadata_csum catches a flipped byte in s_volume_name).
    let mut c = std::fs::read(&raw).unwrap();
    c[(1 << 20) + 1024 + 0x78] ^= 0xff;
    let sb = d.path().join("sb.raw");
    std::fs::write(&sb, &c).unwrap();
    let (code, v) = inspect(&sb, &["--target", "libvirt"]);
    assert_eq!(code, 0, "{v}");
    assert!(
        problems(&v).contains("/dev/sda1: ext4 filesystem unreadable"),
        "{v}"
    );
    assert_eq!(v["preflight"]["verdict"], "warn");
    assert_eq!(
        v["preflight"]["findings"][0]["id"],
        "libvirt-drivers-unknown"
    );

    // GPT header declaring 256-byte entries (the gpt crate would assert on it).
    let mut g = std::fs::read(guest("uefi")).unwrap();
    g[512 + 84..512 + 88].copy_from_slice(&256u32.to_le_bytes());
    let gp = d.path().join("gpt.raw");
    std::fs::write(&gp, &g).unwrap();
    let (_, v) = inspect(&gp, &[]);
    assert!(problems(&v).contains("256 byte entries"), "{v}");
    // ... and one declaring a million entries.
    g[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
    g[512 + 80..512 + 84].copy_from_slice(&1_000_000u32.to_le_bytes());
    std::fs::write(&gp, &g).unwrap();
    let (_, v) = inspect(&gp, &[]);
    assert!(problems(&v).contains("1000000 entries"), "{v}");

    // GRUB boot code whose core sector holds nothing: BIOS boot is not claimed.
    let mut n = std::fs::read(&raw).unwrap();
    n[512..1024].fill(0);
    let nocore = d.path().join("nocore.raw");
    std::fs::write(&nocore, &n).unwrap();
    let (code, v) = inspect(&nocore, &["--target", "libvirt"]);
    assert_eq!((code, &v["boot"]["mode"]), (1, &Value::from("unknown")));
    assert!(
        problems(&v).contains("sector 1, where it loads GRUB's core image from"),
        "{v}"
    );

    // Initramfs bomb (1500 nested directories, a member declaring 4 GiB): named, bounded memory.
    let bomb = guest("bomb");
    let m = imgshift_measured(&["inspect", s(&bomb), "--output", "json"]);
    assert_eq!(m.code, 0, "{}", m.stderr);
    assert!(m.max_rss_kib < 64 * 1024, "peak RSS {} KiB", m.max_rss_kib);

    // Filesystems recognised but not read: XFS, LUKS, btrfs and LVM on four MBR partitions.
    let mut x = vec![0u8; 8 << 20];
    for (slot, (lba, magic_at, magic)) in [
        (2048u32, 0usize, &b"XFSB"[..]),
        (4096, 0, &b"LUKS\xba\xbe"[..]),
        (8192, 0x10040, &b"_BHRfS_M"[..]),
        (
            12288,
            512,
            &b"LABELONE\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0LVM2 001"[..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 446 + 16 * slot;
        x[e + 4] = 0x83;
        x[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
        x[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
        let at = lba as usize * 512 + magic_at;
        x[at..at + magic.len()].copy_from_slice(magic);
    }
    x[510] = 0x55;
    x[511] = 0xAA;
    let fss = d.path().join("fss.raw");
    std::fs::write(&fss, &x).unwrap();
    let (code, v) = inspect(&fss, &["--target", "libvirt"]);
    assert_eq!(code, 1, "{v}");
    for (dev, t) in [
        ("/dev/sda1", "xfs"),
        ("/dev/sda2", "crypto_LUKS"),
        ("/dev/sda3", "btrfs"),
        ("/dev/sda4", "LVM2_member"),
    ] {
        assert_eq!(v["filesystems"][dev]["type"], t, "{v}");
        assert_eq!(v["filesystems"][dev]["inspectable"], false);
        assert!(
            problems(&v).contains(&format!("{dev}: {t} is present but not inspectable")),
            "{v}"
        );
    }
    assert_eq!(v["operatingsystems"].as_array().unwrap().len(), 0);
    let ids: Vec<&str> = v["preflight"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["libvirt-boot-loader", "libvirt-drivers-unknown"]);

    // Not a disk at all.
    let junk = d.path().join("junk.raw");
    std::fs::write(&junk, vec![0xA5u8; 4096]).unwrap();
    let (code, v) = inspect(&junk, &["--target", "aws"]);
    assert_eq!(code, 1);
    assert_eq!(v["partition_table"]["scheme"], "none");
    assert_eq!(v["preflight"]["findings"][0]["id"], "aws-boot-loader");

    // The source is never written.
    let before = std::fs::read(&raw).unwrap();
    inspect(&raw, &["--target", "azure"]);
    assert!(std::fs::read(&raw).unwrap() == before);
}

/// Random byte flips in the metadata a guest inspection reads (MBR/GPT, the GRUB core, the ESP's FAT, ext4
/// superblock, group descriptors, inode tables, the initramfs): every run ends with a report or a one-line
/// error, never a panic (not even one caught by the backstop around third-party parsers).
#[test]
fn corrupted_guests_never_panic() {
    let d = tmpdir();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for variant in ["bios", "uefi"] {
        use std::os::unix::fs::FileExt;
        // One copy, flipped in place and restored after each run (writing 64 MiB per round would dominate).
        let p = d.path().join(format!("{variant}.raw"));
        std::fs::copy(guest(variant), &p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let orig = std::fs::read(&p).unwrap();
        // Where the metadata lives: the first 2 MiB (tables, GRUB, FAT), the first MiB of each filesystem, and
        // the used part of the root (kernel and initramfs come first in mkfs.ext4 -d's allocation).
        let regions: [(usize, usize); 3] = [(0, 2 << 20), (1 << 20, 2 << 20), (33 << 20, 36 << 20)];
        for round in 0..40 {
            let (lo, hi) = regions[(next() % 3) as usize];
            let flips: Vec<usize> = (0..(1 + next() % 64))
                .map(|_| lo + (next() as usize) % (hi - lo))
                .collect();
            for &at in &flips {
                f.write_at(&[orig[at] ^ (next() % 255 + 1) as u8], at as u64)
                    .unwrap();
            }
            let r = imgshift(&["inspect", s(&p), "--output", "json", "--target", "libvirt"]);
            assert!(
                !r.stderr.contains("panicked"),
                "{variant} round {round}: {}",
                r.stderr
            );
            assert!(
                r.code == 0 || r.code == 1,
                "{variant} round {round}: {}",
                r.stderr
            );
            if r.code == 0 || !r.stdout.is_empty() {
                serde_json::from_str::<Value>(&r.stdout).unwrap();
            }
            for &at in &flips {
                f.write_at(&orig[at..at + 1], at as u64).unwrap();
            }
        }
    }
}
