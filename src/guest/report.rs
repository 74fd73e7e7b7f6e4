//! The whole inspection of one disk: partitions → filesystems → boot mode → Linux roots, and the facts the
//! preflight rules look at. Field names follow virt-inspector where it has one (root, distro, product_name,
//! major_version, minor_version, arch, hostname, package_format, mountpoints, filesystems with type/label/uuid).

use std::collections::BTreeMap;

use ext4_view::Ext4;
use serde::Serialize;

use super::Window;
use super::boot::{self, BootInfo, Volume};
use super::fs::{self, FsInfo};
use super::os::{self, OsFacts};
use super::partitions::{self, PartitionTable};
use super::preflight::Facts;

/// One operating system found.
#[derive(Debug, Clone, Serialize)]
pub struct OperatingSystem {
    /// Device of the root filesystem.
    pub root: String,
    /// "linux".
    pub name: String,
    /// Mount point → device, from fstab entries that resolve to a filesystem on this disk.
    pub mountpoints: BTreeMap<String, String>,
    /// Everything read from the root.
    #[serde(flatten)]
    pub facts: OsFacts,
}

/// The inspection report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// MBR or GPT and its partitions.
    pub partition_table: PartitionTable,
    /// Device → filesystem.
    pub filesystems: BTreeMap<String, FsInfo>,
    /// Boot mode and loaders.
    pub boot: BootInfo,
    /// Operating systems (Linux roots with an os-release).
    pub operatingsystems: Vec<OperatingSystem>,
    /// Windows installations (NTFS volumes with a system root), with what their registry says.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<super::windows::WindowsInstall>,
    /// Everything that could not be read, each naming the device or file.
    pub problems: Vec<String>,
}

struct Found {
    device: String,
    window: Window,
    info: FsInfo,
    type_name: String,
}

/// Inspects a whole disk.
pub fn inspect(disk: &Window) -> Report {
    let table = partitions::read(disk);
    let mut problems = table.problems.clone();
    let mut found = Vec::new();
    if table.scheme == "none" {
        let info = fs::probe(disk);
        if info.fs_type != "unknown" {
            found.push(Found {
                device: "/dev/sda".into(),
                window: disk.clone(),
                info,
                type_name: String::new(),
            });
        }
    }
    for p in &table.partitions {
        let Some(w) = disk.sub(p.start, p.size) else {
            continue;
        };
        found.push(Found {
            device: format!("/dev/sda{}", p.number),
            info: fs::probe(&w),
            window: w,
            type_name: p.type_name.clone(),
        });
    }
    if table
        .partitions
        .iter()
        .any(|p| p.type_name.starts_with("windows-ldm"))
    {
        problems.push(
            "the disk is a Windows dynamic disk (Logical Disk Manager): its volumes are not read; convert it to a \
             basic disk in the guest (Disk Management) before migrating"
                .into(),
        );
    }
    for f in &found {
        if f.info.fs_type == "BitLocker" {
            problems.push(format!(
                "{}: BitLocker-encrypted volume: not read, and imgshift refuses to write to it (generalisation \
                 included); suspend or decrypt BitLocker in the guest (manage-bde -off) before migrating",
                f.device
            ));
            continue;
        }
        if !f.info.inspectable && f.info.fs_type != "swap" && f.info.fs_type != "unknown" {
            problems.push(format!(
                "{}: {} is present but not inspectable (imgshift reads ext2/3/4 and FAT)",
                f.device, f.info.fs_type
            ));
        }
    }
    let volumes: Vec<Volume<'_>> = found
        .iter()
        .map(|f| Volume {
            device: &f.device,
            window: &f.window,
            info: &f.info,
            type_name: &f.type_name,
        })
        .collect();
    let boot = boot::detect(disk, &table, &volumes, &mut problems);
    let operatingsystems = linux_roots(&found, &mut problems);
    let mut windows = Vec::new();
    for f in found.iter().filter(|f| f.info.fs_type == "ntfs") {
        match super::windows::detect(&f.window, &f.device, &mut problems) {
            Ok(Some(w)) => windows.push(w),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    if !windows.is_empty() {
        windows_boot(&found, &table, &mut windows);
    }
    Report {
        virtual_size: disk.len(),
        filesystems: found
            .iter()
            .map(|f| (f.device.clone(), f.info.clone()))
            .collect(),
        partition_table: table,
        boot,
        operatingsystems,
        windows,
        problems,
    }
}

/// Windows Boot Manager's store: `\EFI\Microsoft\Boot\BCD` on an ESP (UEFI), or `bootmgr` with `\Boot\BCD` on
/// the Windows volume when it is the active partition of an MBR disk (BIOS).
fn windows_boot(
    found: &[Found],
    table: &PartitionTable,
    windows: &mut [super::windows::WindowsInstall],
) {
    let esp = found
        .iter()
        .filter(|f| f.type_name == "efi-system" && f.info.fs_type == "vfat")
        .find(|f| super::windows::esp_bcd(&f.window))
        .map(|f| f.device.clone());
    for w in windows.iter_mut() {
        if let Some(dev) = &esp {
            w.boot_loader = Some("uefi".into());
            w.boot_store = Some(format!("{dev}:\\EFI\\Microsoft\\Boot\\BCD"));
            continue;
        }
        let active_dev = (table.scheme == "mbr")
            .then(|| table.partitions.iter().find(|p| p.bootable))
            .flatten()
            .map(|p| format!("/dev/sda{}", p.number));
        // Windows Setup on BIOS puts bootmgr on a separate active "System Reserved" partition.
        if let Some(dev) = active_dev.as_ref().filter(|d| **d != w.root)
            && let Some(f) = found
                .iter()
                .find(|f| &f.device == dev && f.info.fs_type == "ntfs")
            && super::windows::bootmgr(&f.window)
        {
            w.boot_loader = Some("bios".into());
            w.boot_store = Some(format!("{dev}:\\bootmgr, \\Boot\\BCD (active partition)"));
            continue;
        }
        let active = active_dev.as_deref() == Some(w.root.as_str());
        match (&w.boot_store, active) {
            (Some(s), true) => {
                w.boot_loader = Some("bios".into());
                w.boot_store = Some(format!("{}:{s} (active partition)", w.root));
            }
            (Some(s), false) => {
                w.boot_store = Some(format!("{}:{s} (not an active MBR partition)", w.root));
            }
            (None, _) => {}
        }
    }
}

/// Finds ext2/3/4 filesystems holding an os-release and reads them.
fn linux_roots(found: &[Found], problems: &mut Vec<String>) -> Vec<OperatingSystem> {
    let mut exts: Vec<(&Found, Ext4)> = Vec::new();
    for f in found {
        if f.info.fs_type.starts_with("ext") {
            match fs::open_ext4(&f.window) {
                Ok(e) => exts.push((f, e)),
                Err(e) => problems.push(format!(
                    "{}: {} filesystem unreadable: {e}",
                    f.device, f.info.fs_type
                )),
            }
        }
    }
    let resolve = |spec: &str| -> Option<String> {
        let (k, v) = spec.split_once('=').unwrap_or(("", spec));
        found
            .iter()
            .find(|f| match k.to_ascii_uppercase().as_str() {
                "UUID" => f
                    .info
                    .uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(v)),
                "LABEL" => f.info.label.as_deref() == Some(v),
                _ => false,
            })
            .map(|f| f.device.clone())
    };
    let mut oses = Vec::new();
    for (f, e) in &exts {
        let is_root = e.exists("/etc/os-release").unwrap_or(false)
            || e.exists("/usr/lib/os-release").unwrap_or(false);
        if !is_root {
            continue;
        }
        let fstab = os::read_text(e, "/etc/fstab")
            .map(|t| os::parse_fstab(&t))
            .unwrap_or_default();
        let boot_dev = fstab
            .iter()
            .find(|x| x.mountpoint == "/boot")
            .and_then(|x| resolve(&x.spec));
        let boot = boot_dev
            .as_ref()
            .and_then(|b| exts.iter().find(|(g, _)| &g.device == b))
            .map(|(_, e)| e);
        let Some(facts) = super::no_panic(|| os::inspect(e, boot)) else {
            problems.push(format!(
                "{}: reading the root failed (the ext4-view crate panicked on it)",
                f.device
            ));
            continue;
        };
        let mut mountpoints = BTreeMap::new();
        mountpoints.insert("/".to_string(), f.device.clone());
        for x in &facts.fstab {
            if x.mountpoint.starts_with('/')
                && x.mountpoint != "/"
                && let Some(d) = resolve(&x.spec)
            {
                mountpoints.insert(x.mountpoint.clone(), d);
            }
        }
        problems.extend(facts.problems.iter().map(|p| format!("{}: {p}", f.device)));
        oses.push(OperatingSystem {
            root: f.device.clone(),
            name: "linux".into(),
            mountpoints,
            facts,
        });
    }
    oses
}

/// `true` when `spec` names a disk by a bus-dependent device (`/dev/sda1`, `/dev/vdb`, `/dev/xvda1`,
/// `/dev/nvme0n1p1`, `/dev/hda1`), as opposed to UUID=, LABEL=, /dev/mapper, /dev/disk/by-*.
pub fn bus_dependent(spec: &str) -> bool {
    let Some(name) = spec.strip_prefix("/dev/") else {
        return false;
    };
    ["sd", "vd", "xvd", "hd", "nvme"]
        .iter()
        .any(|p| name.starts_with(p))
}

impl Report {
    /// The facts the preflight rules look at (from the first operating system found).
    pub fn facts(&self, aws_boot_mode: Option<&str>) -> Facts {
        let os = self.operatingsystems.first().map(|o| &o.facts);
        let default_kernel = os.and_then(|o| o.kernels.first());
        let cmdline_root = default_kernel
            .and_then(|k| k.cmdline.as_deref())
            .and_then(os::cmdline_root)
            .filter(|r| bus_dependent(r))
            .map(|r| ("kernel command line".to_string(), r.to_string()));
        let fstab_root = os
            .and_then(|o| {
                o.fstab
                    .iter()
                    .find(|x| x.mountpoint == "/" && bus_dependent(&x.spec))
            })
            .map(|x| ("/etc/fstab".to_string(), x.spec.clone()));
        Facts {
            boot_mode: self.boot.mode.clone(),
            gpt_esp: self.partition_table.gpt_with_esp(),
            linux_root: os.is_some(),
            drivers: os.and_then(|o| o.drivers.clone()),
            installed: default_kernel
                .map(|k| k.installed.clone())
                .unwrap_or_default(),
            initramfs_problem: default_kernel
                .and_then(|k| k.initramfs_listing.as_ref())
                .and_then(|l| l.problem.clone()),
            root_device: cmdline_root.or(fstab_root),
            fstab_devices: os
                .map(|o| {
                    o.fstab
                        .iter()
                        .filter(|x| x.mountpoint != "/" && bus_dependent(&x.spec))
                        .map(|x| format!("{} on {}", x.spec, x.mountpoint))
                        .collect()
                })
                .unwrap_or_default(),
            agents: os.map(|o| o.agents.clone()).unwrap_or_default(),
            arch: os
                .and_then(|o| o.arch.clone())
                .or_else(|| self.windows.first().and_then(|w| w.arch.clone())),
            windows: if os.is_none() {
                self.windows.first().cloned()
            } else {
                None
            },
            size: self.virtual_size,
            aws_boot_mode: aws_boot_mode.map(str::to_string),
        }
    }
}
