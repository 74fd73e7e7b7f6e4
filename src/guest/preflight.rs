//! Preflight rules: one table per target. Each rule looks at the inspected facts and, when it fires, gives a
//! level, one reason and one fix. The verdict is the worst level fired (ok < warn < fail).

use serde::Serialize;

/// Facts the rules look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// "bios", "uefi", "bios+uefi" or "unknown".
    pub boot_mode: String,
    /// Boot drivers; `None` when no Linux root could be read.
    pub drivers: Option<Vec<String>>,
    /// fstab specs that name a bus-dependent /dev device.
    pub fstab_devices: Vec<String>,
    /// Agents installed.
    pub agents: Vec<String>,
    /// Virtual disk size in bytes.
    pub size: u64,
}

impl Facts {
    fn has(&self, d: &str) -> bool {
        self.drivers.as_ref().is_some_and(|v| v.iter().any(|x| x == d))
    }
}

/// Severity of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One rule of a target's table.
pub struct Rule {
    pub id: &'static str,
    pub level: Level,
    /// Whether the rule depends on the driver list (skipped with a warning when drivers are unknown).
    pub needs_drivers: bool,
    pub fires: fn(&Facts) -> bool,
    pub reason: &'static str,
    pub fix: &'static str,
}

/// A fired rule.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: String,
    pub level: Level,
    pub reason: String,
    pub fix: String,
}

/// The result for one target.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub target: String,
    pub verdict: Level,
    pub findings: Vec<Finding>,
}

pub const AWS: &[Rule] = &[
    Rule {
        id: "aws-nvme",
        level: Level::Fail,
        needs_drivers: true,
        fires: |f| !f.has("nvme"),
        reason: "no NVMe driver at boot: Nitro instance types expose EBS volumes as NVMe devices",
        fix: "add nvme to the initramfs (dracut --add-drivers nvme -f, or echo nvme >> /etc/initramfs-tools/modules && update-initramfs -u)",
    },
    Rule {
        id: "aws-ena",
        level: Level::Warn,
        needs_drivers: true,
        fires: |f| !f.has("ena"),
        reason: "no ENA network driver at boot: Nitro instance types will have no network",
        fix: "install a kernel with the ena module and add it to the initramfs",
    },
    Rule {
        id: "aws-boot-mode",
        level: Level::Fail,
        needs_drivers: false,
        fires: |f| f.boot_mode == "unknown",
        reason: "no BIOS boot code and no EFI loader found: the guest will not boot",
        fix: "install a boot loader (grub-install) before migrating",
    },
    Rule {
        id: "aws-fstab-device",
        level: Level::Warn,
        needs_drivers: false,
        fires: |f| !f.fstab_devices.is_empty(),
        reason: "fstab names disks by device (/dev/sdX, /dev/vdX); on Nitro they are /dev/nvmeXnY",
        fix: "use UUID= or LABEL= in /etc/fstab",
    },
];

pub const AZURE: &[Rule] = &[
    Rule {
        id: "azure-hv-storage",
        level: Level::Fail,
        needs_drivers: true,
        fires: |f| !(f.has("hv_storvsc") && f.has("hv_vmbus")),
        reason: "no Hyper-V storage drivers (hv_vmbus, hv_storvsc) at boot: Azure disks will not be found",
        fix: "add hv_vmbus hv_storvsc to the initramfs (dracut --add-drivers \"hv_vmbus hv_storvsc\" -f)",
    },
    Rule {
        id: "azure-hv-net",
        level: Level::Warn,
        needs_drivers: true,
        fires: |f| !f.has("hv_netvsc"),
        reason: "no Hyper-V network driver (hv_netvsc) at boot: the VM will have no network",
        fix: "add hv_netvsc to the initramfs",
    },
    Rule {
        id: "azure-boot-mode",
        level: Level::Fail,
        needs_drivers: false,
        fires: |f| f.boot_mode == "unknown",
        reason: "no BIOS boot code and no EFI loader found: neither generation 1 nor 2 will boot",
        fix: "install a boot loader (grub-install) before migrating",
    },
    Rule {
        id: "azure-size-alignment",
        level: Level::Warn,
        needs_drivers: false,
        fires: |f| f.size % (1 << 20) != 0,
        reason: "virtual size is not a whole number of MiB, which Azure requires",
        fix: "round the disk up to the next MiB (qemu-img resize, or the upload pads it)",
    },
    Rule {
        id: "azure-agent",
        level: Level::Warn,
        needs_drivers: false,
        fires: |f| !f.agents.iter().any(|a| a == "waagent" || a == "cloud-init"),
        reason: "neither waagent nor cloud-init is installed: Azure cannot provision the VM",
        fix: "install walinuxagent (or cloud-init with the Azure datasource)",
    },
    Rule {
        id: "azure-fstab-device",
        level: Level::Warn,
        needs_drivers: false,
        fires: |f| !f.fstab_devices.is_empty(),
        reason: "fstab names disks by device; Azure's disk order is not guaranteed",
        fix: "use UUID= or LABEL= in /etc/fstab",
    },
];

pub const LIBVIRT: &[Rule] = &[
    Rule {
        id: "libvirt-virtio-fallback",
        level: Level::Warn,
        needs_drivers: true,
        fires: |f| {
            !(f.has("virtio_blk") || f.has("virtio_scsi"))
                && (f.has("ahci") || f.has("ata_piix"))
        },
        reason: "no virtio disk driver at boot, but a SATA/IDE driver is present",
        fix: "attach the disk with bus='sata' (ahci) or bus='ide' (ata_piix), or add virtio_blk to the initramfs",
    },
    Rule {
        id: "libvirt-no-disk-driver",
        level: Level::Fail,
        needs_drivers: true,
        fires: |f| {
            !(f.has("virtio_blk") || f.has("virtio_scsi") || f.has("ahci") || f.has("ata_piix"))
        },
        reason: "no virtio, SATA or IDE disk driver at boot: the root disk will not be found",
        fix: "add virtio_blk virtio_pci to the initramfs",
    },
    Rule {
        id: "libvirt-boot-mode",
        level: Level::Fail,
        needs_drivers: false,
        fires: |f| f.boot_mode == "unknown",
        reason: "no BIOS boot code and no EFI loader found: the guest will not boot",
        fix: "install a boot loader (grub-install) before migrating",
    },
    Rule {
        id: "libvirt-fstab-device",
        level: Level::Warn,
        needs_drivers: false,
        fires: |f| !f.fstab_devices.is_empty(),
        reason: "fstab names disks by device; with virtio the disk is /dev/vda, not /dev/sda",
        fix: "use UUID= or LABEL= in /etc/fstab",
    },
];

/// The rule table of a target name.
pub fn table(target: &str) -> Option<&'static [Rule]> {
    match target {
        "aws" => Some(AWS),
        "azure" => Some(AZURE),
        "libvirt" => Some(LIBVIRT),
        _ => None,
    }
}

/// Applies a target's rules.
pub fn evaluate(target: &str, rules: &[Rule], f: &Facts) -> Verdict {
    let mut findings = Vec::new();
    let mut unknown_noted = false;
    for r in rules {
        if r.needs_drivers && f.drivers.is_none() {
            if !unknown_noted {
                findings.push(Finding {
                    id: format!("{target}-drivers-unknown"),
                    level: Level::Warn,
                    reason: "the Linux root filesystem could not be read, so boot drivers are unknown".into(),
                    fix: "check the guest's initramfs by hand before migrating".into(),
                });
                unknown_noted = true;
            }
            continue;
        }
        if (r.fires)(f) {
            findings.push(Finding {
                id: r.id.into(),
                level: r.level,
                reason: r.reason.into(),
                fix: r.fix.into(),
            });
        }
    }
    let verdict = findings.iter().map(|x| x.level).max().unwrap_or(Level::Ok);
    Verdict {
        target: target.into(),
        verdict,
        findings,
    }
}
