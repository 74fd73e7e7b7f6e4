//! Windows guests (issue 24): disks built by tests/guests/mkwindows.sh from the minimal hive in tests/data/windows
//! (hives merged with hivexregedit, an NTFS volume made with mkntfs and filled by guestfish, MBR or GPT+ESP),
//! inspected as raw and converted by qemu-img; the preflight verdict of every variant for every target, from the
//! table below; generalisation's refusal and no-op; hostile hives named, not panicked on; what `migrate` and
//! `upload` register a Windows guest as (AWS RegisterImage through the recording proxy, Azure through the fake
//! ARM's recorded bodies, the libvirt domain XML read back from the private libvirtd).
//!
//! Needs libwin-hivex-perl, ntfs-3g, libguestfs-tools, fdisk, dosfstools, mtools and qemu-utils
//! (`.ci/install-deps` installs them); a missing tool fails the build of the disks, naming that script.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod azure_util;
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use util::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/mkwindows.sh")
}

/// FNV-1a of the builder and its inputs: the cache key of the built disks.
fn tag() -> String {
    let mut text = std::fs::read(script()).unwrap();
    text.extend(
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/windows/hive-minimal"),
        )
        .unwrap(),
    );
    let h = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The folder holding every variant (built once, kept across runs while the builder is unchanged; the disks
/// are never written by the tests).
fn disks() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        imgshift_bin();
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("windows-guests");
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join(tag());
        if dir.join("sysreserved.raw").exists() {
            return dir;
        }
        let tmp = base.join(format!("building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let r = Command::new("bash")
            .arg(script())
            .arg(&tmp)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "mkwindows.sh failed (run .ci/install-deps for its tools): {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another run finished first: use its disks.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        dir
    })
}

fn disk(variant: &str) -> PathBuf {
    disks().join(format!("{variant}.raw"))
}

fn inspect(img: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["inspect", s(img), "--output", "json"];
    args.extend_from_slice(extra);
    let r = imgshift(&args);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {} / {}", r.stdout, r.stderr));
    (r.code, v)
}

fn windows(v: &Value) -> &Value {
    let w = &v["windows"];
    assert_eq!(w.as_array().map(Vec::len), Some(1), "{v:#}");
    &w[0]
}

/// name → start type of the drivers reported.
fn drivers(w: &Value) -> Vec<(String, String)> {
    w["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["file_present"], true, "{d}");
            (
                d["name"].as_str().unwrap().to_string(),
                d["start_type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (variant, product, edition, build, (major, minor), hostname, control set, boot mode, boot loader, generalised)
type Row = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    (u64, u64),
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
);
/// (variant, target, verdict, finding ids in table order, settings that must be set)
type Expected = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn inspect_reads_the_registry_of_every_variant() {
    // (variant, product, edition, build, major.minor, hostname, control set, boot mode, boot loader, generalised)
    let rows: &[Row] = &[
        (
            "server2019",
            "Windows Server 2019 Datacenter",
            "ServerDatacenter",
            "17763",
            (10, 0),
            "WIN2019",
            "ControlSet001",
            "bios",
            "bios",
            false,
        ),
        (
            "server2016",
            "Windows Server 2016 Standard",
            "ServerStandard",
            "14393",
            (10, 0),
            "WIN2016",
            "ControlSet001",
            "bios",
            "bios",
            false,
        ),
        (
            "win11",
            "Windows 11 Pro",
            "Professional",
            "22631",
            (10, 0),
            "DESKTOP-W11",
            "ControlSet001",
            "uefi",
            "uefi",
            false,
        ),
        (
            "sysprep",
            "Windows Server 2019 Datacenter",
            "ServerDatacenter",
            "17763",
            (10, 0),
            "WIN2019",
            "ControlSet001",
            "bios",
            "bios",
            true,
        ),
        (
            "controlset2",
            "Windows Server 2019 Datacenter",
            "ServerDatacenter",
            "17763",
            (10, 0),
            "WIN-CS2",
            "ControlSet002",
            "bios",
            "bios",
            false,
        ),
        (
            "server2008",
            "Windows Server 2008 R2 Datacenter",
            "ServerDatacenter",
            "7601",
            (6, 1),
            "WIN2008",
            "ControlSet001",
            "uefi",
            "uefi",
            false,
        ),
        (
            "sysreserved",
            "Windows Server 2019 Datacenter",
            "ServerDatacenter",
            "17763",
            (10, 0),
            "WIN2019",
            "ControlSet001",
            "bios",
            "bios",
            false,
        ),
    ];
    for &(variant, product, edition, build, (major, minor), host, cs, mode, loader, gen_) in rows {
        let (code, v) = inspect(&disk(variant), &[]);
        assert_eq!(code, 0, "{variant}: {v:#}");
        let w = windows(&v);
        let ctx = format!("{variant}: {w:#}");
        assert_eq!(w["product_name"], product, "{ctx}");
        assert_eq!(w["edition"], edition, "{ctx}");
        assert_eq!(w["build"], build, "{ctx}");
        assert_eq!(
            (w["major_version"].as_u64(), w["minor_version"].as_u64()),
            (Some(major), Some(minor)),
            "{ctx}"
        );
        assert_eq!(w["arch"], "x86_64", "{ctx}");
        assert_eq!(w["hostname"], host, "{ctx}");
        assert_eq!(w["current_control_set"], cs, "{ctx}");
        assert_eq!(w["boot_loader"], loader, "{ctx}");
        assert_eq!(v["boot"]["mode"], mode, "{ctx}");
        assert_eq!(w["generalized"], gen_, "{ctx}");
        assert_eq!(w["registry_read"], true, "{ctx}");
        assert_eq!(v["problems"], serde_json::json!([]), "{ctx}");
    }
    let w = windows(&inspect(&disk("sysprep"), &[]).1).clone();
    assert_eq!(w["image_state"], "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE");
    assert_eq!(w["setup_cmdline"], "oobe\\windeploy.exe");
    // bootmgr on the active "System Reserved" partition, Windows on the next one.
    let w = windows(&inspect(&disk("sysreserved"), &[]).1).clone();
    assert_eq!(w["root"], "/dev/sda2");
    assert_eq!(
        w["boot_store"],
        "/dev/sda1:\\bootmgr, \\Boot\\BCD (active partition)"
    );
    let w = windows(&inspect(&disk("win11"), &[]).1).clone();
    assert_eq!(w["display_version"], "23H2");
    assert_eq!(w["product_variant"], "Client");
    assert!(
        w["boot_store"]
            .as_str()
            .unwrap()
            .ends_with("\\EFI\\Microsoft\\Boot\\BCD"),
        "{w}"
    );

    // Drivers with their start types, from the current control set only.
    let w = windows(&inspect(&disk("server2019"), &[]).1).clone();
    assert_eq!(
        drivers(&w),
        pairs(&[
            ("atapi", "demand"),
            ("AWSNVMe", "boot"),
            ("AWSPVStorage", "boot"),
            ("ena", "demand"),
            ("netkvm", "demand"),
            ("netvsc", "demand"),
            ("pciide", "demand"),
            ("storahci", "boot"),
            ("stornvme", "demand"),
            ("storvsc", "boot"),
            ("vioscsi", "boot"),
            ("viostor", "boot"),
            ("vmbus", "boot"),
            ("xenvbd", "disabled"),
        ])
    );
    let w = windows(&inspect(&disk("controlset2"), &[]).1).clone();
    assert_eq!(
        drivers(&w),
        pairs(&[
            ("atapi", "demand"),
            ("netvsc", "demand"),
            ("pciide", "demand"),
            ("storahci", "boot"),
            ("stornvme", "demand"),
            ("storvsc", "boot"),
            ("vmbus", "boot"),
        ]),
        "ControlSet002 (current) has no virtio drivers; ControlSet001 has"
    );
}

#[test]
fn converted_images_read_the_same() {
    let raw = disk("server2019");
    let (_, want) = inspect(&raw, &[]);
    let dir = tmpdir();
    for fmt in ["qcow2", "vhdx", "vmdk"] {
        let out = dir.path().join(format!("w.{fmt}"));
        qemu_img(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&out)]);
        let (code, got) = inspect(&out, &[]);
        assert_eq!(code, 0, "{fmt}");
        assert_eq!(got["windows"], want["windows"], "{fmt}");
        assert_eq!(got["boot"], want["boot"], "{fmt}");
    }
}

/// The verdict table. Provider requirements each rule checks:
/// - AWS Nitro: EBS volumes are NVMe devices, Windows needs the AWS NVMe driver (or in-box stornvme) at boot
///   (docs.aws.amazon.com/AWSEC2/latest/WindowsGuide/aws-nvme-drivers.html); the network is ENA only
///   (.../enhanced-networking-ena.html); an AMI registered from a snapshot is not license-included
///   (docs.aws.amazon.com/vm-import/latest/userguide/licensing.html); a UEFI-only guest needs --boot-mode uefi
///   (.../ami-boot.html).
/// - Azure: VMBus storage (storvsc, vmbus) at boot, netvsc for the network
///   (learn.microsoft.com/azure/virtual-machines/windows/prepare-for-upload-vhd-image); generation 2 (UEFI) is
///   64-bit Windows Server 2012+ and Windows 10/11 only (.../generation-2); a non-generalised image is a
///   specialised one (.../shared-image-galleries#generalized-and-specialized-images).
/// - libvirt/KVM: a virtio disk needs viostor (virtio-blk) or vioscsi (virtio-scsi) at boot, else SATA with the
///   in-box storahci (INACCESSIBLE_BOOT_DEVICE otherwise, libguestfs/virt-v2v#13); a virtio NIC needs netkvm, else
///   the in-box e1000e.
const TABLE: &[Expected] = &[
    (
        "server2019",
        "aws",
        "warn",
        &["aws-windows-license"],
        &[("boot_mode", "legacy-bios")],
    ),
    (
        "server2019",
        "azure",
        "warn",
        &["azure-windows-specialized"],
        &[("hyper_v_generation", "V1")],
    ),
    (
        "server2019",
        "libvirt",
        "ok",
        &[],
        &[("bus", "virtio"), ("firmware", "bios")],
    ),
    (
        "server2016",
        "aws",
        "fail",
        &["aws-windows-nvme", "aws-windows-ena", "aws-windows-license"],
        &[],
    ),
    (
        "server2016",
        "azure",
        "warn",
        &["azure-windows-specialized"],
        &[("hyper_v_generation", "V1")],
    ),
    (
        "server2016",
        "libvirt",
        "warn",
        &["libvirt-windows-sata", "libvirt-windows-nic"],
        &[("bus", "sata"), ("nic_model", "e1000e")],
    ),
    (
        "win11",
        "aws",
        "fail",
        &[
            "aws-boot-mode-uefi",
            "aws-windows-ena",
            "aws-windows-license",
        ],
        &[("boot_mode", "uefi")],
    ),
    (
        "win11",
        "azure",
        "warn",
        &["azure-windows-specialized"],
        &[("hyper_v_generation", "V2")],
    ),
    (
        "win11",
        "libvirt",
        "warn",
        &["libvirt-windows-sata", "libvirt-windows-nic"],
        &[("bus", "sata"), ("firmware", "efi")],
    ),
    ("sysprep", "aws", "warn", &["aws-windows-license"], &[]),
    (
        "sysprep",
        "azure",
        "ok",
        &[],
        &[("hyper_v_generation", "V1")],
    ),
    ("sysprep", "libvirt", "ok", &[], &[("bus", "virtio")]),
    (
        "controlset2",
        "aws",
        "fail",
        &["aws-windows-nvme", "aws-windows-ena", "aws-windows-license"],
        &[],
    ),
    (
        "controlset2",
        "azure",
        "warn",
        &["azure-windows-specialized"],
        &[],
    ),
    (
        "controlset2",
        "libvirt",
        "warn",
        &["libvirt-windows-sata", "libvirt-windows-nic"],
        &[("bus", "sata")],
    ),
    (
        "server2008",
        "aws",
        "fail",
        &[
            "aws-boot-mode-uefi",
            "aws-windows-nvme",
            "aws-windows-ena",
            "aws-windows-license",
        ],
        &[],
    ),
    (
        "server2008",
        "azure",
        "fail",
        &["azure-windows-gen2", "azure-windows-specialized"],
        &[("hyper_v_generation", "V2")],
    ),
    (
        "server2008",
        "libvirt",
        "warn",
        &["libvirt-windows-sata", "libvirt-windows-nic"],
        &[("bus", "sata"), ("firmware", "efi")],
    ),
    (
        "sysreserved",
        "libvirt",
        "ok",
        &[],
        &[("bus", "virtio"), ("firmware", "bios")],
    ),
    (
        "sysreserved",
        "aws",
        "warn",
        &["aws-windows-license"],
        &[("boot_mode", "legacy-bios")],
    ),
];

#[test]
fn preflight_verdicts_follow_the_table() {
    for &(variant, target, verdict, ids, settings) in TABLE {
        let (code, v) = inspect(&disk(variant), &["--target", target]);
        let p = &v["preflight"];
        let ctx = format!("{variant} on {target}: {p:#}");
        assert_eq!(p["verdict"], verdict, "{ctx}");
        assert_eq!(code, i32::from(verdict == "fail"), "{ctx}");
        let got: Vec<&str> = p["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap())
            .collect();
        assert_eq!(got, ids, "{ctx}");
        for f in p["findings"].as_array().unwrap() {
            assert!(
                !f["reason"].as_str().unwrap().is_empty() && !f["fix"].as_str().unwrap().is_empty(),
                "{ctx}"
            );
        }
        for (k, want) in settings {
            assert_eq!(p["settings"][k], *want, "{ctx}: setting {k}");
        }
    }
    // The evidence names the drivers and their start types.
    let (_, v) = inspect(&disk("server2016"), &["--target", "aws"]);
    let nvme = &v["preflight"]["findings"][0];
    assert!(
        nvme["reason"]
            .as_str()
            .unwrap()
            .contains("stornvme start demand"),
        "{nvme}"
    );
    assert!(nvme["fix"].as_str().unwrap().contains("AWSNVMe"), "{nvme}");
    // --boot-mode uefi clears the UEFI finding, not the driver ones.
    let (_, v) = inspect(&disk("win11"), &["--target", "aws", "--boot-mode", "uefi"]);
    assert_eq!(v["preflight"]["findings"][0]["id"], "aws-windows-ena");
    // Human output names the Windows facts.
    let r = imgshift(&["inspect", s(&disk("server2016")), "--target", "libvirt"]);
    assert!(
        r.stdout
            .contains("os: Windows Server 2016 Standard [windows 10.0]"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("driver storahci: start boot"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("control set ControlSet001"),
        "{}",
        r.stdout
    );
}

#[test]
fn generalize_refuses_a_specialised_windows_and_passes_a_generalised_one() {
    let dir = tmpdir();
    let ov = dir.path().join("o.qcow2");
    let r = imgshift(&["generalize", s(&disk("server2019")), "--overlay", s(&ov)]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("sysprep.exe /generalize /oobe /shutdown"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("IMAGE_STATE_COMPLETE"), "{}", r.stderr);
    assert!(!ov.exists());
    let r = imgshift(&[
        "generalize",
        s(&disk("sysprep")),
        "--overlay",
        s(&ov),
        "--output",
        "json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["already_generalized"], true);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("already generalised"),
        "{v}"
    );
    assert!(
        !ov.exists(),
        "nothing written for an already generalised guest"
    );
    // convert --generalize: the generalised guest is converted unchanged.
    let out = dir.path().join("c.raw");
    let r = imgshift(&[
        "convert",
        "-O",
        "raw",
        "--generalize",
        s(&disk("sysprep")),
        s(&out),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("already generalised"), "{}", r.stderr);
    assert_same(&disk("sysprep"), "raw", &out, "raw");
    let r = imgshift(&[
        "convert",
        "-O",
        "raw",
        "--generalize",
        s(&disk("win11")),
        s(&dir.path().join("d.raw")),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("sysprep.exe /generalize"), "{}", r.stderr);
}

#[test]
fn unreadable_hives_are_named_and_the_verdict_says_the_drivers_are_unknown() {
    // Both hives' root cell offsets pointed past their ends.
    let dir = tmpdir();
    let img = dir.path().join("bad.raw");
    let mut bytes = std::fs::read(disk("server2016")).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while let Some(p) = bytes[i..].windows(4).position(|w| w == b"regf") {
        let at = i + p;
        // A hive's base block starts a cluster; its hive bins follow at +4096.
        if at % 512 == 0 && bytes.get(at + 4096..at + 4100) == Some(b"hbin") {
            bytes[at + 0x24..at + 0x28].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
            hits += 1;
        }
        i = at + 4;
    }
    assert_eq!(hits, 2, "SOFTWARE and SYSTEM found in the image");
    std::fs::write(&img, &bytes).unwrap();
    let (code, v) = inspect(&img, &["--target", "azure"]);
    assert_eq!(code, 0, "{v:#}");
    let w = windows(&v);
    assert_eq!(w["registry_read"], false);
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("config\\\\SOFTWARE") && problems.contains("config\\\\SYSTEM"),
        "{problems}"
    );
    assert_eq!(v["preflight"]["verdict"], "warn");
    assert_eq!(
        v["preflight"]["findings"][0]["id"],
        "azure-windows-registry"
    );
}

#[test]
fn bitlocker_volumes_and_dynamic_disks_are_named() {
    let dir = tmpdir();
    // BitLocker: the volume header's OEM id is "-FVE-FS-" (the Windows volume starts at 34 MiB).
    let img = dir.path().join("bitlocker.raw");
    let mut bytes = std::fs::read(disk("server2019")).unwrap();
    let at = (34 << 20) + 3;
    bytes[at..at + 8].copy_from_slice(b"-FVE-FS-");
    std::fs::write(&img, &bytes).unwrap();
    let (code, v) = inspect(&img, &["--target", "libvirt"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["filesystems"]["/dev/sda1"]["type"], "BitLocker", "{v:#}");
    assert_eq!(v["filesystems"]["/dev/sda1"]["inspectable"], false);
    assert!(v.get("windows").is_none(), "{v:#}");
    assert!(
        v["problems"]
            .to_string()
            .contains("/dev/sda1: BitLocker-encrypted volume"),
        "{v:#}"
    );
    assert_eq!(
        v["preflight"]["findings"][0]["id"],
        "libvirt-drivers-unknown"
    );
    let ov = dir.path().join("o.qcow2");
    let r = imgshift(&["generalize", s(&img), "--overlay", s(&ov)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("/dev/sda1 is a BitLocker-encrypted volume"),
        "{}",
        r.stderr
    );
    assert!(!ov.exists());

    // A dynamic disk: MBR partition type 0x42 (Logical Disk Manager).
    let img = dir.path().join("dynamic.raw");
    let mut bytes = std::fs::read(disk("server2016")).unwrap();
    bytes[446 + 4] = 0x42;
    std::fs::write(&img, &bytes).unwrap();
    let (code, v) = inspect(&img, &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(
        v["partition_table"]["partitions"][0]["type_name"],
        "windows-ldm"
    );
    assert!(
        v["problems"].to_string().contains("Windows dynamic disk"),
        "{v:#}"
    );
}

/// The libvirt domain follows the Windows verdict: virtio when viostor starts at boot (server2019), SATA when
/// only the in-box AHCI driver does (server2016), as `--disk-bus auto` does for Linux guests.
#[test]
fn libvirt_auto_bus_follows_the_windows_drivers() {
    let pool = util::libvirt::Pool::new();
    for (variant, bus) in [("server2019", "virtio"), ("server2016", "sata")] {
        let dom = format!("{}-{variant}", pool.name);
        let r = pool.upload(
            &disk(variant),
            &format!("{variant}.qcow2"),
            &["--define", &dom, "--disk-bus", "auto", "--firmware", "auto"],
        );
        assert_eq!(r.code, 0, "{variant}: {}", r.stderr);
        let xml = util::libvirt::virsh_ok(&["dumpxml", &dom]);
        assert!(
            xml.contains(&format!("bus='{bus}'")) || xml.contains(&format!("bus=\"{bus}\"")),
            "{variant}: expected bus {bus} in {xml}"
        );
        util::libvirt::virsh(&["undefine", &dom]);
    }
}

/// A qcow2 copy of a variant, in `dir`. The AWS tests send these: qemu-img leaves all-zero clusters out, while
/// the raw disks hold allocated all-zero 512 KiB blocks, which the upload skips and the verify stage (which
/// counts every EBS block a data range touches) then misses ("lists N blocks; the source has M").
fn qcow2_of(variant: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{variant}.qcow2"));
    if !out.exists() {
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&disk(variant)),
            s(&out),
        ]);
    }
    out
}

/// The fields of every RegisterImage request the recording proxy saw in front of moto (moto keeps neither the
/// boot mode nor EnaSupport: what imgshift *sent* is what is checked), one map per request.
fn register_requests(proxy: &util::aws::Proxy) -> Vec<std::collections::BTreeMap<String, String>> {
    proxy
        .records()
        .iter()
        .filter_map(|r| r["body"].as_str().map(str::to_string))
        .filter(|b| b.contains("Action=RegisterImage"))
        .map(|b| {
            b.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// AWS registers a Windows guest with the boot mode its boot loader needs and EnaSupport only when the ENA
/// driver is installed (EC2 refuses to launch an EnaSupport AMI on non-ENA types, and an ENA-less guest on a
/// Nitro type has no network: <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/enhanced-networking-ena.html>),
/// and says that an AMI from a snapshot carries no license-included billing
/// (<https://docs.aws.amazon.com/vm-import/latest/userguide/licensing.html>). `migrate` (inspect stage) and
/// `upload aws` (quiet inspection) alike; checked on the requests sent through the recording proxy.
#[test]
fn aws_registers_windows_with_its_boot_mode_and_ena_flag() {
    use util::aws::*;
    let dir = tmpdir();
    let proxy = Proxy::start(dir.path(), &[]);
    let tag = std::process::id();
    let migrate = |variant: &str, extra: &[&str]| {
        let mut c = aws_cmd(dir.path());
        c.args(["migrate", s(&qcow2_of(variant, dir.path())), "--to", "aws"])
            .args(["--endpoint-url", &proxy.url])
            .args(["--name", &format!("win-{variant}-{tag}"), "--yes"])
            .args(["--state-dir", s(&dir.path().join("state"))])
            .args(extra);
        run(c)
    };
    // Server 2019: AWSNVMe at boot and ena installed: passes, BIOS, ENA on.
    let r = migrate("server2019", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("aws-windows-license") && r.stderr.contains("license-included"),
        "the licence warning is shown: {}",
        r.stderr
    );
    // Server 2016: no ENA driver (and no NVMe driver: the preflight fails unless forced).
    let r = migrate("server2016", &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("aws-windows-ena"), "{}", r.stderr);
    let r = migrate("server2016", &["--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Windows 11 by `upload aws` (no inspect stage): UEFI only, no ENA driver.
    let mut c = aws_cmd(dir.path());
    c.args([
        "upload",
        "aws",
        s(&qcow2_of("win11", dir.path())),
        "--endpoint-url",
        &proxy.url,
    ])
    .args(["--name", &format!("win-win11-{tag}")])
    .args(["--state-dir", s(&dir.path().join("state"))]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("aws-windows-license"), "{}", r.stderr);
    let regs = register_requests(&proxy);
    let got: Vec<(String, String, String)> = regs
        .iter()
        .map(|m| {
            (
                m["Name"].clone(),
                m.get("BootMode").cloned().unwrap_or_default(),
                m.get("EnaSupport").cloned().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                format!("win-server2019-{tag}"),
                "legacy-bios".into(),
                "true".into()
            ),
            (
                format!("win-server2016-{tag}"),
                "legacy-bios".into(),
                "false".into()
            ),
            (format!("win-win11-{tag}"), "uefi".into(), "false".into()),
        ]
    );
}

/// `migrate --to azure` of a Windows guest, checked on the fake ARM's recorded request bodies: osType Windows on
/// the disk and the image, the Hyper-V generation from the boot mode (BIOS → V1, UEFI → V2), osState
/// Generalized for a sysprep'd guest; a guest that is not generalised becomes no managed image (Azure's managed
/// images are generalised only; a specialised one is a specialized gallery image version:
/// <https://learn.microsoft.com/azure/virtual-machines/shared-image-galleries#generalized-and-specialized-images>),
/// `upload azure --image-name` of it is refused before anything is created, and a gallery image definition whose
/// osState differs is refused.
#[test]
fn azure_registers_windows_as_generalised_or_specialised() {
    use azure_util::*;
    let env = Env::start("win", &[], None);
    let state = env.path().join("state");
    let migrate = |variant: &str, name: &str, extra: &[&str]| {
        let mut c = env.cmd();
        c.args([
            "migrate",
            s(&disk(variant)),
            "--to",
            "azure",
            "--subscription",
            SUB,
        ])
        .args(["--resource-group", RG, "--location", "westeurope"])
        .args(["--arm-endpoint", &env.arm_url(), "--name", name])
        .args(["--state-dir", s(&state), "--yes"])
        .args(extra);
        run(c)
    };
    let disk_props = |name: &str| -> serde_json::Value {
        let b = env.bodies("PUT", &format!("/disks/{name}"));
        assert_eq!(b.len(), 1, "one PUT of disk {name}");
        b[0]["properties"].clone()
    };
    // Sysprep'd, BIOS: a Windows V1 disk and a Generalized Windows image.
    let r = migrate("sysprep", "wsys", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = disk_props("wsys-os");
    assert_eq!(
        (d["osType"].as_str(), d["hyperVGeneration"].as_str()),
        (Some("Windows"), Some("V1"))
    );
    let img = env.bodies("PUT", "/images/wsys");
    assert_eq!(img.len(), 1, "{img:?}");
    let os = &img[0]["properties"]["storageProfile"]["osDisk"];
    assert_eq!(
        (os["osType"].as_str(), os["osState"].as_str()),
        (Some("Windows"), Some("Generalized"))
    );
    // Not generalised: the plan says there will be no managed image ...
    let r = migrate("server2019", "wdry", &["--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("no managed image 'wdry'"), "{}", r.stdout);
    assert!(
        env.bodies("PUT", "/disks/wdry-os").is_empty(),
        "a dry run creates nothing"
    );
    // ... and the run makes the disk, a gallery version (its definition absent from the fake), no managed image.
    let r = migrate(
        "server2019",
        "wspec",
        &[
            "--gallery",
            "gal",
            "--gallery-image",
            "def",
            "--gallery-version",
            "1.0.0",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("no managed image 'wspec'"),
        "{}",
        r.stderr
    );
    assert_eq!(disk_props("wspec-os")["osType"], "Windows");
    assert!(
        env.bodies("PUT", "/images/wspec").is_empty(),
        "no managed image of a specialised guest"
    );
    assert_eq!(
        env.bodies("PUT", "/galleries/gal/images/def/versions/1.0.0")
            .len(),
        1
    );
    // A definition made for generalised images does not take it: refused before any disk is made.
    let def = serde_json::json!({"location": "westeurope", "properties": {"osType": "Windows",
        "osState": "Generalized", "hyperVGeneration": "V1"}});
    let put = Command::new("curl")
        .args(["-sf", "--cacert", s(&env.ca), "-X", "PUT", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .args(["-H", "Content-Type: application/json", "--data", &def.to_string()])
        .arg(format!(
            "{}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/galleries/gal/images/gen\
             ?api-version=2023-07-03",
            env.arm_url()
        ))
        .output()
        .unwrap();
    assert!(put.status.success(), "{put:?}");
    let r = migrate(
        "server2019",
        "wgen",
        &[
            "--gallery",
            "gal",
            "--gallery-image",
            "gen",
            "--gallery-version",
            "1.0.0",
        ],
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("osState Generalized, the guest is Specialized"),
        "{}",
        r.stderr
    );
    assert!(
        env.bodies("PUT", "/disks/wgen-os").is_empty(),
        "nothing created"
    );
    // upload azure --image-name of a specialised guest: refused, nothing created.
    let r = env.upload(&disk("server2016"), "w16", &["--image-name", "w16img"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("sysprep /generalize /oobe /shutdown"),
        "{}",
        r.stderr
    );
    assert!(
        env.bodies("PUT", "/disks/w16").is_empty(),
        "nothing created"
    );
    // upload azure of Windows 11 (UEFI only, GPT + ESP; no inspect stage): a Windows V2 disk.
    let r = env.upload(&disk("win11"), "w11", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = disk_props("w11");
    assert_eq!(
        (d["osType"].as_str(), d["hyperVGeneration"].as_str()),
        (Some("Windows"), Some("V2"))
    );
}

/// `--generalize` on a migration: a guest sysprep already generalised passes unchanged and the run says so (no
/// overlay, no virt-sysprep); one that is not is refused before the job exists, with the command to run inside
/// the guest, and no request reaches the target.
#[test]
fn migrate_generalize_says_already_generalised_or_refuses() {
    use util::aws::*;
    let dir = tmpdir();
    let proxy = Proxy::start(dir.path(), &[]);
    let tag = std::process::id();
    let migrate = |variant: &str| {
        let mut c = aws_cmd(dir.path());
        c.args(["migrate", s(&qcow2_of(variant, dir.path())), "--to", "aws"])
            .arg("--generalize")
            .args(["--endpoint-url", &proxy.url])
            .args(["--name", &format!("gen-{variant}-{tag}"), "--yes"])
            .args(["--state-dir", s(&dir.path().join("state"))]);
        run(c)
    };
    let r = migrate("server2019");
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("sysprep.exe /generalize /oobe /shutdown"),
        "{}",
        r.stderr
    );
    assert!(
        proxy.records().is_empty(),
        "a refused --generalize sends nothing"
    );
    assert!(
        !dir.path().join("state").exists() || files_in(&dir.path().join("state")).is_empty(),
        "no job left behind"
    );
    let r = migrate("sysprep");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("already generalised"), "{}", r.stderr);
    assert_eq!(register_requests(&proxy).len(), 1);
}

/// libvirt: the domain's NIC follows the guest's network drivers — virtio with netkvm (server2019), e1000e
/// without (server2016) — read back from the defined domain's XML on the private libvirtd.
#[test]
fn libvirt_nic_model_follows_the_windows_drivers() {
    let pool = util::libvirt::Pool::new();
    for (variant, model) in [("server2019", "virtio"), ("server2016", "e1000e")] {
        let dom = format!("{}-nic-{variant}", pool.name);
        let r = pool.upload(
            &disk(variant),
            &format!("{variant}-nic.qcow2"),
            &["--define", &dom, "--network", "default"],
        );
        assert_eq!(r.code, 0, "{variant}: {}", r.stderr);
        let xml = util::libvirt::virsh_ok(&["dumpxml", &dom]);
        util::libvirt::virsh(&["undefine", &dom]);
        assert!(
            xml.contains(&format!("<model type='{model}'/>")),
            "{variant}: expected NIC model {model} in {xml}"
        );
    }
}

/// The `ntfs` fuzz target's input on which the ntfs crate panics (an index entry sliced out of range), as the
/// volume of an MBR partition: inspection names it in one problem line, prints no panic, exits 0.
#[test]
fn a_crate_panic_on_a_crafted_ntfs_volume_is_one_problem_line() {
    let enc = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/ntfs/crash-6ab3252a450dfe29216d7971567a06cd8108cfd9"),
    )
    .unwrap();
    // The sparse encoding (fuzz/src/guest_input.rs): [u32 length] then [u32 offset][u16 length][bytes]...
    let len = u32::from_le_bytes(enc[..4].try_into().unwrap()) as usize;
    let mut vol = vec![0u8; len];
    let mut p = 4;
    while p + 6 <= enc.len() {
        let off = u32::from_le_bytes(enc[p..p + 4].try_into().unwrap()) as usize;
        let n = usize::from(u16::from_le_bytes(enc[p + 4..p + 6].try_into().unwrap()))
            .min(enc.len() - p - 6);
        let end = (off + n).min(len);
        if off < end {
            vol[off..end].copy_from_slice(&enc[p + 6..p + 6 + (end - off)]);
        }
        p += 6 + n;
    }
    let dir = tmpdir();
    let img = dir.path().join("crafted.raw");
    let mut disk = vec![0u8; 1 << 20];
    disk.extend_from_slice(&vol);
    disk.resize(disk.len().next_multiple_of(512), 0);
    // One active NTFS partition from sector 2048 to the end.
    let sectors = (disk.len() / 512 - 2048) as u32;
    disk[446] = 0x80;
    disk[450] = 0x07;
    disk[454..458].copy_from_slice(&2048u32.to_le_bytes());
    disk[458..462].copy_from_slice(&sectors.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xAA;
    std::fs::write(&img, &disk).unwrap();
    let r = imgshift(&["inspect", s(&img)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("problem: /dev/sda1: NTFS volume unreadable (the ntfs crate panicked on it)"),
        "{}",
        r.stdout
    );
}
