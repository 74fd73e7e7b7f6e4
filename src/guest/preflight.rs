//! Preflight rules: one table per target. A rule looks at the inspected [`Facts`]; when it fires it gives a
//! level, one reason (with the evidence that made it fire), one fix, and optionally settings the target should
//! use (a disk bus, a boot mode). The verdict is the worst level fired (ok < warn < fail): `ok` means the guest
//! boots on the target as imgshift would create it, `warn` that it boots with the settings given (or boots but
//! lacks something, such as network drivers), `fail` that it will not boot without a change to the guest.

use std::collections::BTreeMap;

use serde::Serialize;

use super::windows::WindowsInstall;

/// Facts the rules look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// "bios", "uefi", "bios+uefi" or "unknown".
    pub boot_mode: String,
    /// The disk has a GPT with an EFI system partition (what `upload azure --hyper-v-generation auto` looks at).
    pub gpt_esp: bool,
    /// A Linux root filesystem was read.
    pub linux_root: bool,
    /// Boot drivers of the default kernel; `None` when unknown.
    pub drivers: Option<Vec<String>>,
    /// Boot drivers installed as modules on the root (loadable once it is mounted: enough for network drivers).
    pub installed: Vec<String>,
    /// Why the default kernel's initramfs could not be listed, if it could not.
    pub initramfs_problem: Option<String>,
    /// How the root filesystem is named when that depends on the disk bus: (where, name), e.g.
    /// ("kernel command line", "/dev/sda1"), ("/etc/fstab", "/dev/sda1").
    pub root_device: Option<(String, String)>,
    /// Other fstab entries naming a bus-dependent device.
    pub fstab_devices: Vec<String>,
    /// Agents installed.
    pub agents: Vec<String>,
    /// Guest architecture.
    pub arch: Option<String>,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// `--boot-mode` requested for AWS (legacy-bios, uefi, uefi-preferred).
    pub aws_boot_mode: Option<String>,
    /// The Windows installation, when the guest is Windows (no Linux root).
    pub windows: Option<WindowsInstall>,
}

impl Facts {
    fn has(&self, d: &str) -> bool {
        self.drivers
            .as_ref()
            .is_some_and(|v| v.iter().any(|x| x == d))
    }
    /// A network driver is available: at boot, or as a module on the root.
    fn net(&self, d: &str) -> bool {
        self.has(d) || self.installed.iter().any(|x| x == d)
    }
    fn known(&self) -> bool {
        self.drivers.is_some()
    }
    fn virtio_blk(&self) -> bool {
        self.has("virtio_blk") && self.has("virtio_pci")
    }
    fn virtio_scsi(&self) -> bool {
        self.has("virtio_scsi") && self.has("virtio_pci") && self.has("sd_mod")
    }
    fn sata(&self) -> bool {
        self.has("ahci") && self.has("sd_mod")
    }
    fn ide(&self) -> bool {
        self.has("ata_piix") && self.has("sd_mod")
    }
    /// The root's bus-dependent name, when it starts with `prefix` (`sd`, `vd`, `xvd`, `nvme`, `hd`).
    fn root_named(&self, prefix: &str) -> Option<String> {
        let (place, dev) = self.root_device.as_ref()?;
        dev.strip_prefix("/dev/")?
            .starts_with(prefix)
            .then(|| format!("{dev} in the {place}"))
    }
    fn boot(&self, mode: &str) -> bool {
        self.boot_mode == mode
    }
    /// The Windows installation, when its registry was read.
    fn win(&self) -> Option<&WindowsInstall> {
        self.windows.as_ref().filter(|w| w.registry_read)
    }
    /// Windows drivers of `names` that are installed with a boot start type; `None` when not a Windows guest.
    fn win_boot(&self, names: &[&str]) -> Option<bool> {
        self.win().map(|w| names.iter().any(|n| w.boot_driver(n)))
    }
    /// Windows drivers `names`, present at all.
    fn win_has(&self, names: &[&str]) -> Option<bool> {
        self.win()
            .map(|w| names.iter().any(|n| w.driver(n).is_some()))
    }
}

/// `driver (start type)` for each of `names` present, or "none of: ...".
fn win_evidence(f: &Facts, names: &[&str]) -> String {
    let Some(w) = f.win() else {
        return String::new();
    };
    let seen: Vec<String> = names
        .iter()
        .filter_map(|n| w.driver(n))
        .map(|d| {
            format!(
                "{} start {}{}",
                d.name,
                d.start_type,
                if d.file_present { "" } else { ", file missing" }
            )
        })
        .collect();
    if seen.is_empty() {
        format!("none of {} installed", names.join(", "))
    } else {
        seen.join("; ")
    }
}

/// Windows storage drivers a libvirt/KVM disk bus needs: virtio-blk, virtio-scsi, SATA (AHCI), IDE.
const WIN_VIRTIO_BLK: &[&str] = &["viostor"];
const WIN_VIRTIO_SCSI: &[&str] = &["vioscsi"];
const WIN_SATA: &[&str] = &["storahci", "msahci"];
const WIN_IDE: &[&str] = &["pciide", "atapi"];
const WIN_NVME: &[&str] = &["stornvme", "AWSNVMe"];
const WIN_HV_STORAGE: &[&str] = &["storvsc", "vmbus"];

/// Windows rules for every target: the registry could not be read.
const WIN_UNREAD: Rule = Rule {
    id: "windows-registry",
    level: Level::Warn,
    when: |f| {
        f.windows
            .as_ref()
            .filter(|w| !w.registry_read)
            .map(|w| w.root.clone())
    },
    reason: "a Windows system root was found but its SOFTWARE and SYSTEM hives could not be read, so its drivers are unknown",
    fix: "check the guest's storage and network drivers by hand before migrating (see the problems)",
    set: &[],
};

/// Severity of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing to do.
    Ok,
    /// Boots with the given settings, or boots with something missing.
    Warn,
    /// Will not boot.
    Fail,
}

/// One rule of a target's table.
pub struct Rule {
    /// Stable identifier (`<target>-<what>`).
    pub id: &'static str,
    /// Level when it fires.
    pub level: Level,
    /// Fires when this returns the evidence.
    pub when: fn(&Facts) -> Option<String>,
    /// Why it matters.
    pub reason: &'static str,
    /// What to do.
    pub fix: &'static str,
    /// Settings the target should use when this fired (the first rule to set a key wins).
    pub set: &'static [(&'static str, &'static str)],
}

/// A fired rule.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The rule's id.
    pub id: String,
    /// Its level.
    pub level: Level,
    /// Why, with the evidence.
    pub reason: String,
    /// What to do.
    pub fix: String,
}

/// The result for one target.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// aws, azure or libvirt.
    pub target: String,
    /// Worst level fired.
    pub verdict: Level,
    /// Fired rules, in table order.
    pub findings: Vec<Finding>,
    /// What the target should be set up with (boot mode, generation, firmware, disk bus).
    pub settings: BTreeMap<String, String>,
}

fn yes(c: bool) -> Option<String> {
    c.then(String::new)
}

fn missing(f: &Facts, need: &[&str]) -> Option<String> {
    if !f.known() {
        return None;
    }
    let gone: Vec<&str> = need.iter().copied().filter(|d| !f.has(d)).collect();
    (!gone.is_empty()).then(|| format!("missing: {}", gone.join(", ")))
}

fn missing_net(f: &Facts, d: &str) -> Option<String> {
    (f.known() && !f.net(d)).then(|| format!("missing: {d}"))
}

fn fstab_devices(f: &Facts) -> Option<String> {
    (!f.fstab_devices.is_empty()).then(|| f.fstab_devices.join(", "))
}

/// Rules every target shares: nothing bootable, an initramfs the kernel cannot unpack, no Linux root read.
const BOOT_UNKNOWN: Rule = Rule {
    id: "boot-loader",
    level: Level::Fail,
    when: |f| yes(f.boot("unknown")),
    reason: "no BIOS boot code with its next stage and no UEFI fallback loader found: the guest will not boot",
    fix: "install a boot loader in the guest (grub-install; for UEFI also grub-install --removable) before migrating",
    set: &[],
};
const INITRAMFS_BROKEN: Rule = Rule {
    id: "initramfs-unreadable",
    level: Level::Fail,
    when: |f| f.initramfs_problem.clone(),
    reason: "the default kernel's initramfs cannot be read; the kernel would fail to unpack it the same way",
    fix: "rebuild the initramfs in the guest (update-initramfs -u -k all, or dracut -f --regenerate-all)",
    set: &[],
};
const DRIVERS_UNKNOWN: Rule = Rule {
    id: "drivers-unknown",
    level: Level::Warn,
    when: |f| yes(!f.linux_root && f.windows.is_none()),
    reason: "no Linux root filesystem and no Windows system root could be read, so the boot drivers are unknown",
    fix: "check the guest's storage and network drivers by hand before migrating",
    set: &[],
};

/// AWS (EC2). Nitro instance types expose EBS as NVMe and the network as ENA
/// (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/nvme-ebs-volumes.html>); an AMI registered without a
/// boot mode boots x86_64 instances by legacy BIOS
/// (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ami-boot.html>).
pub const AWS: &[Rule] = &[
    BOOT_UNKNOWN,
    INITRAMFS_BROKEN,
    DRIVERS_UNKNOWN,
    Rule {
        id: "aws-boot-mode-uefi",
        level: Level::Fail,
        when: |f| {
            yes(f.boot("uefi")
                && !matches!(f.aws_boot_mode.as_deref(), Some("uefi" | "uefi-preferred")))
        },
        reason: "the guest boots only by UEFI, and EC2 boots x86_64 AMIs by legacy BIOS unless registered otherwise",
        fix: "upload with --boot-mode uefi",
        set: &[("boot_mode", "uefi")],
    },
    Rule {
        id: "aws-boot-mode-bios",
        level: Level::Fail,
        when: |f| yes(f.boot("bios") && f.aws_boot_mode.as_deref() == Some("uefi")),
        reason: "the guest boots only by BIOS but --boot-mode uefi was asked for",
        fix: "upload with --boot-mode legacy-bios (or uefi-preferred)",
        set: &[("boot_mode", "legacy-bios")],
    },
    Rule {
        id: "aws-nvme",
        level: Level::Fail,
        when: |f| missing(f, &["nvme"]),
        reason: "no NVMe driver at boot: Nitro instance types expose EBS volumes as NVMe devices",
        fix: "add nvme to the initramfs (echo nvme >> /etc/initramfs-tools/modules && update-initramfs -u, or dracut --add-drivers nvme -f)",
        set: &[],
    },
    Rule {
        id: "aws-root-device",
        level: Level::Fail,
        when: |f| {
            f.root_named("sd")
                .or_else(|| f.root_named("vd"))
                .or_else(|| f.root_named("hd"))
        },
        reason: "the root is named by a bus-dependent device; on Nitro instance types it is /dev/nvme0n1p*, so it will not be found",
        fix: "name the root by UUID= or LABEL= in /etc/fstab and the boot loader (root=UUID=... in GRUB_CMDLINE_LINUX, update-grub)",
        set: &[],
    },
    Rule {
        id: "aws-ena",
        level: Level::Warn,
        when: |f| missing_net(f, "ena"),
        reason: "no ENA network driver in the initramfs or the root's modules: Nitro instance types will boot without network",
        fix: "install a kernel that ships the ena module",
        set: &[],
    },
    Rule {
        id: "aws-fstab-device",
        level: Level::Warn,
        when: fstab_devices,
        reason: "fstab names disks by device; on Nitro instance types they are /dev/nvmeXnY",
        fix: "use UUID= or LABEL= in /etc/fstab",
        set: &[],
    },
    WIN_UNREAD,
    Rule {
        id: "aws-windows-nvme",
        level: Level::Fail,
        when: |f| yes(f.win_boot(WIN_NVME) == Some(false)).map(|_| win_evidence(f, WIN_NVME)),
        reason: "no NVMe storage driver with a boot start type: Nitro instance types expose EBS volumes as NVMe \
                 devices, so Windows stops with INACCESSIBLE_BOOT_DEVICE \
                 (https://docs.aws.amazon.com/AWSEC2/latest/WindowsGuide/aws-nvme-drivers.html)",
        fix: "install the AWS NVMe driver in the guest before capturing it (AWSNVMe, from the AWS NVMe driver \
              package or AWS's EC2 drivers installer), or launch a Xen instance family (t2, m4, c4) with the AWS PV \
              drivers",
        set: &[],
    },
    Rule {
        id: "aws-windows-ena",
        level: Level::Fail,
        when: |f| yes(f.win_has(&["ena"]) == Some(false)).map(|_| win_evidence(f, &["ena"])),
        reason: "no ENA network driver: Nitro instance types have only ENA network interfaces, so the instance \
                 is unreachable (https://docs.aws.amazon.com/AWSEC2/latest/WindowsGuide/enhanced-networking-ena.html)",
        fix: "install the ENA driver in the guest before capturing it (AWS's ENA driver package), or launch a Xen \
              instance family with the AWS PV drivers",
        set: &[],
    },
    Rule {
        id: "aws-windows-license",
        level: Level::Warn,
        when: |f| {
            f.windows
                .as_ref()
                .map(|w| w.product_name.clone().unwrap_or_else(|| "Windows".into()))
        },
        reason: "an AMI registered from an EBS snapshot does not carry Windows license-included billing: \
                 instances from it need your own licence \
                 (https://docs.aws.amazon.com/vm-import/latest/userguide/licensing.html)",
        fix: "bring your own licence (BYOL, on Dedicated Hosts where the licence requires it), or import the image \
              with VM Import (aws ec2 import-image) for license-included billing",
        set: &[],
    },
    Rule {
        id: "aws-arch",
        level: Level::Fail,
        when: |f| f.arch.clone().filter(|a| a != "x86_64" && a != "aarch64"),
        reason: "EC2 runs x86_64 and arm64 guests only",
        fix: "migrate to a target that runs this architecture",
        set: &[],
    },
];

/// Azure. Hyper-V guests need the VMBus storage and network drivers
/// (<https://learn.microsoft.com/azure/virtual-machines/linux/create-upload-generic>); generation 1 boots by
/// BIOS, generation 2 by UEFI; managed disks are whole MiB; provisioning needs waagent or cloud-init.
pub const AZURE: &[Rule] = &[
    BOOT_UNKNOWN,
    INITRAMFS_BROKEN,
    DRIVERS_UNKNOWN,
    Rule {
        id: "azure-generation-v1",
        level: Level::Fail,
        when: |f| yes(f.boot("bios") && f.gpt_esp),
        reason: "the guest boots only by BIOS, but its GPT has an EFI system partition, so --hyper-v-generation auto picks V2 (UEFI)",
        fix: "upload with --hyper-v-generation V1",
        set: &[("hyper_v_generation", "V1")],
    },
    Rule {
        id: "azure-generation-v2",
        level: Level::Fail,
        when: |f| yes(f.boot("uefi") && !f.gpt_esp),
        reason: "the guest boots only by UEFI, but --hyper-v-generation auto picks V1 (BIOS) without a GPT EFI system partition",
        fix: "upload with --hyper-v-generation V2",
        set: &[("hyper_v_generation", "V2")],
    },
    Rule {
        id: "azure-hv-storage",
        level: Level::Fail,
        when: |f| missing(f, &["hv_vmbus", "hv_storvsc"]),
        reason: "no Hyper-V storage drivers at boot: Azure disks will not be found",
        fix: "add hv_vmbus and hv_storvsc to the initramfs (dracut --add-drivers \"hv_vmbus hv_storvsc\" -f, or /etc/initramfs-tools/modules)",
        set: &[],
    },
    Rule {
        id: "azure-hv-net",
        level: Level::Warn,
        when: |f| missing_net(f, "hv_netvsc"),
        reason: "no Hyper-V network driver (hv_netvsc) in the initramfs or the root's modules: the VM will have no network",
        fix: "install a kernel that ships hv_netvsc (linux-azure, or the distribution's generic kernel)",
        set: &[],
    },
    WIN_UNREAD,
    Rule {
        id: "azure-windows-hv-storage",
        level: Level::Fail,
        when: |f| {
            f.win()
                .filter(|w| !(w.boot_driver("storvsc") && w.boot_driver("vmbus")))
                .map(|_| win_evidence(f, WIN_HV_STORAGE))
        },
        reason: "the Hyper-V storage drivers (vmbus and storvsc with a boot start type) are not installed: Azure \
                 disks are VMBus SCSI disks, so Windows stops with INACCESSIBLE_BOOT_DEVICE \
                 (https://learn.microsoft.com/azure/virtual-machines/windows/prepare-for-upload-vhd-image); they are \
                 in-box since Windows Server 2008 R2",
        fix: "in the guest, set the storvsc and vmbus services to start at boot (sc config storvsc start= boot; \
              sc config vmbus start= boot), or boot it once on Hyper-V, before capturing",
        set: &[],
    },
    Rule {
        id: "azure-windows-hv-net",
        level: Level::Warn,
        when: |f| yes(f.win_has(&["netvsc"]) == Some(false)).map(|_| win_evidence(f, &["netvsc"])),
        reason: "no Hyper-V network driver (netvsc): the VM will have no network",
        fix: "boot the guest once on Hyper-V, or install the Hyper-V integration components, before capturing",
        set: &[],
    },
    Rule {
        id: "azure-windows-gen2",
        level: Level::Fail,
        when: |f| {
            let w = f.win()?;
            if !f.boot("uefi") {
                return None;
            }
            let old = w.version().is_some_and(|v| v < (6, 2));
            let arch = w.arch.as_deref().is_some_and(|a| a != "x86_64");
            let client_old = !w.is_server() && w.version().is_some_and(|v| v < (10, 0));
            (old || arch || client_old).then(|| {
                format!(
                    "{} {}, version {}",
                    w.product_name.as_deref().unwrap_or("Windows"),
                    w.arch.as_deref().unwrap_or("unknown arch"),
                    w.version()
                        .map_or("unknown".into(), |(a, b)| format!("{a}.{b}"))
                )
            })
        },
        reason: "the guest boots only by UEFI (Hyper-V generation 2), which Azure supports for 64-bit Windows \
                 Server 2012 or later and 64-bit Windows 10/11 only \
                 (https://learn.microsoft.com/azure/virtual-machines/generation-2)",
        fix: "migrate a BIOS-bootable copy as generation 1 (--hyper-v-generation V1), or upgrade the guest",
        set: &[],
    },
    Rule {
        id: "azure-windows-specialized",
        level: Level::Warn,
        when: |f| {
            f.win().filter(|w| w.generalized != Some(true)).map(|w| {
                format!(
                    "ImageState {}",
                    w.image_state.as_deref().unwrap_or("not set")
                )
            })
        },
        reason: "the guest is not generalised (sysprep /generalize): Azure takes it as a specialised image \
                 (a specialized gallery image version, not a managed image), and every VM made from it keeps its \
                 computer name, SIDs and accounts \
                 (https://learn.microsoft.com/azure/virtual-machines/shared-image-galleries#generalized-and-specialized-images)",
        fix: "run `sysprep /generalize /oobe /shutdown` inside the guest before capturing it, or register it as \
              a specialized image",
        set: &[],
    },
    Rule {
        id: "azure-agent",
        level: Level::Warn,
        when: |f| yes(f.linux_root && !f.agents.iter().any(|a| a == "waagent" || a == "cloud-init")),
        reason: "neither waagent nor cloud-init is installed: Azure cannot provision the VM or report it ready",
        fix: "install walinuxagent (or cloud-init with the Azure datasource)",
        set: &[],
    },
    Rule {
        id: "azure-size-alignment",
        level: Level::Warn,
        when: |f| (f.size % (1 << 20) != 0).then(|| format!("{} bytes", f.size)),
        reason: "the virtual size is not a whole number of MiB; the upload pads it, so the guest sees a slightly larger disk",
        fix: "nothing required; to avoid the padding, resize the disk to a whole MiB (qemu-img resize)",
        set: &[],
    },
    Rule {
        id: "azure-root-device",
        level: Level::Warn,
        when: |f| {
            f.root_named("sd")
                .or_else(|| f.root_named("vd"))
                .or_else(|| f.root_named("hd"))
        },
        reason: "the root is named by device; Azure's disk order (OS, resource and data disks) is not guaranteed",
        fix: "name the root by UUID= or LABEL= in /etc/fstab and the boot loader",
        set: &[],
    },
    Rule {
        id: "azure-fstab-device",
        level: Level::Warn,
        when: fstab_devices,
        reason: "fstab names disks by device; Azure's disk order is not guaranteed",
        fix: "use UUID= or LABEL= in /etc/fstab",
        set: &[],
    },
];

/// libvirt (KVM/QEMU). The default disk is virtio-blk (`/dev/vdX`, needs virtio_blk + virtio_pci); the
/// fallbacks are virtio-scsi (`/dev/sdX`), SATA (ahci) and IDE (ata_piix).
pub const LIBVIRT: &[Rule] = &[
    BOOT_UNKNOWN,
    INITRAMFS_BROKEN,
    DRIVERS_UNKNOWN,
    WIN_UNREAD,
    Rule {
        id: "libvirt-windows-virtio-scsi",
        level: Level::Warn,
        when: |f| {
            yes(f.win_boot(WIN_VIRTIO_BLK) == Some(false)
                && f.win_boot(WIN_VIRTIO_SCSI) == Some(true))
            .map(|_| win_evidence(f, &["viostor", "vioscsi"]))
        },
        reason: "viostor (virtio-blk) is not installed with a boot start type, but vioscsi (virtio-scsi) is",
        fix: "attach the disk with bus='scsi' on a virtio-scsi controller",
        set: &[("bus", "scsi")],
    },
    Rule {
        id: "libvirt-windows-sata",
        level: Level::Warn,
        when: |f| {
            yes(f.win_boot(WIN_VIRTIO_BLK) == Some(false)
                && f.win_boot(WIN_VIRTIO_SCSI) == Some(false)
                && f.win_boot(WIN_SATA) == Some(true))
            .map(|_| win_evidence(f, &["viostor", "vioscsi", "storahci", "msahci"]))
        },
        reason: "no virtio storage driver (viostor, vioscsi) with a boot start type: on a virtio disk Windows stops \
                 with INACCESSIBLE_BOOT_DEVICE; the in-box SATA (AHCI) driver is there",
        fix: "attach the disk with bus='sata'; to move to virtio later, install the virtio-win drivers in the \
              guest, add a small virtio disk, boot once, then switch the boot disk to virtio",
        set: &[("bus", "sata")],
    },
    Rule {
        id: "libvirt-windows-ide",
        level: Level::Warn,
        when: |f| {
            yes(f.win_boot(WIN_VIRTIO_BLK) == Some(false)
                && f.win_boot(WIN_VIRTIO_SCSI) == Some(false)
                && f.win_boot(WIN_SATA) == Some(false)
                && f.win_boot(WIN_IDE) == Some(true))
            .map(|_| win_evidence(f, &["pciide", "atapi"]))
        },
        reason: "no virtio or SATA storage driver with a boot start type, but the in-box IDE one is",
        fix: "attach the disk with bus='ide'",
        set: &[("bus", "ide")],
    },
    Rule {
        id: "libvirt-windows-no-disk-driver",
        level: Level::Fail,
        when: |f| {
            let all = [WIN_VIRTIO_BLK, WIN_VIRTIO_SCSI, WIN_SATA, WIN_IDE].concat();
            yes(f.win_boot(&all) == Some(false)).map(|_| win_evidence(f, &all))
        },
        reason: "no virtio, SATA or IDE storage driver with a boot start type: Windows stops with \
                 INACCESSIBLE_BOOT_DEVICE on every libvirt disk bus",
        fix: "in the guest, install the virtio-win drivers (viostor) or set storahci to start at boot \
              (sc config storahci start= boot) before capturing",
        set: &[],
    },
    Rule {
        id: "libvirt-windows-nic",
        level: Level::Warn,
        when: |f| yes(f.win_has(&["netkvm"]) == Some(false)).map(|_| win_evidence(f, &["netkvm"])),
        reason: "no virtio network driver (netkvm): a virtio NIC will not work",
        fix: "define the interface with model type='e1000e' (in-box), or install the virtio-win drivers in the guest",
        set: &[("nic_model", "e1000e")],
    },
    Rule {
        id: "libvirt-root-sd-scsi",
        level: Level::Warn,
        when: |f| f.root_named("sd").filter(|_| f.virtio_scsi()),
        reason: "the root is named /dev/sdX, which a virtio-blk disk is not (/dev/vdX); on virtio-scsi it is",
        fix: "attach the disk with bus='scsi' on a virtio-scsi controller, or name the root by UUID=",
        set: &[("bus", "scsi")],
    },
    Rule {
        id: "libvirt-root-sd-sata",
        level: Level::Warn,
        when: |f| f.root_named("sd").filter(|_| !f.virtio_scsi() && f.sata()),
        reason: "the root is named /dev/sdX, which a virtio-blk disk is not (/dev/vdX); on SATA it is",
        fix: "attach the disk with bus='sata', or name the root by UUID=",
        set: &[("bus", "sata")],
    },
    Rule {
        id: "libvirt-root-sd-ide",
        level: Level::Warn,
        when: |f| {
            f.root_named("sd")
                .filter(|_| !f.virtio_scsi() && !f.sata() && f.ide())
        },
        reason: "the root is named /dev/sdX, which a virtio-blk disk is not (/dev/vdX); on IDE (libata) it is",
        fix: "attach the disk with bus='ide', or name the root by UUID=",
        set: &[("bus", "ide")],
    },
    Rule {
        id: "libvirt-root-sd-none",
        level: Level::Fail,
        when: |f| {
            f.root_named("sd")
                .filter(|_| f.known() && !f.virtio_scsi() && !f.sata() && !f.ide())
        },
        reason: "the root is named /dev/sdX and no driver that gives that name (virtio-scsi, ahci, ata_piix with sd_mod) is at boot",
        fix: "name the root by UUID= or LABEL= in /etc/fstab and the boot loader",
        set: &[],
    },
    Rule {
        id: "libvirt-root-device",
        level: Level::Fail,
        when: |f| {
            f.root_named("xvd")
                .or_else(|| f.root_named("nvme"))
                .or_else(|| f.root_named("hd"))
        },
        reason: "the root is named by a device name no libvirt disk bus gives it",
        fix: "name the root by UUID= or LABEL= in /etc/fstab and the boot loader",
        set: &[],
    },
    Rule {
        id: "libvirt-virtio-scsi",
        level: Level::Warn,
        when: |f| yes(f.known() && !f.virtio_blk() && f.virtio_scsi()),
        reason: "no virtio-blk driver at boot, but virtio-scsi is there",
        fix: "attach the disk with bus='scsi' on a virtio-scsi controller, or add virtio_blk to the initramfs",
        set: &[("bus", "scsi")],
    },
    Rule {
        id: "libvirt-virtio-sata",
        level: Level::Warn,
        when: |f| yes(f.known() && !f.virtio_blk() && !f.virtio_scsi() && f.sata()),
        reason: "no virtio disk driver at boot, but a SATA (ahci) driver is there",
        fix: "attach the disk with bus='sata', or add virtio_blk and virtio_pci to the initramfs",
        set: &[("bus", "sata")],
    },
    Rule {
        id: "libvirt-virtio-ide",
        level: Level::Warn,
        when: |f| yes(f.known() && !f.virtio_blk() && !f.virtio_scsi() && !f.sata() && f.ide()),
        reason: "no virtio or SATA disk driver at boot, but an IDE (ata_piix) driver is there",
        fix: "attach the disk with bus='ide', or add virtio_blk and virtio_pci to the initramfs",
        set: &[("bus", "ide")],
    },
    Rule {
        id: "libvirt-no-disk-driver",
        level: Level::Fail,
        when: |f| yes(f.known() && !f.virtio_blk() && !f.virtio_scsi() && !f.sata() && !f.ide()),
        reason: "no virtio, SATA or IDE disk driver at boot: the root disk will not be found",
        fix: "add virtio_blk and virtio_pci to the initramfs",
        set: &[],
    },
    Rule {
        id: "libvirt-virtio-net",
        level: Level::Warn,
        when: |f| missing_net(f, "virtio_net"),
        reason: "no virtio network driver in the initramfs or the root's modules: a virtio NIC will not work",
        fix: "install a kernel that ships virtio_net, or define the interface with model type='e1000'",
        set: &[],
    },
    Rule {
        id: "libvirt-fstab-device",
        level: Level::Warn,
        when: fstab_devices,
        reason: "fstab names disks by device; their names depend on the disk bus (vdX on virtio, sdX on SATA/SCSI)",
        fix: "use UUID= or LABEL= in /etc/fstab",
        set: &[],
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

/// Settings that follow from the facts before any rule: the boot mode the target must use, the default bus; for
/// a Windows guest also what the image is registered as.
///
/// - aws `ena`: `no` for a Windows guest whose registry lists no `ena` driver. EC2 launches an AMI with
///   EnaSupport only on instance types with ENA interfaces, which such a guest cannot drive; without the flag it
///   runs on Xen instance families (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/enhanced-networking-ena.html>).
/// - azure `os_type`: `windows` when a Windows system root was found (the disk's and image's osType).
/// - azure `os_state`: `Generalized` unless the guest is a Windows that sysprep has not generalised (or whose
///   state is unknown): then `Specialized`, which Azure takes only as a specialized gallery image version, never
///   as a managed image (<https://learn.microsoft.com/azure/virtual-machines/shared-image-galleries#generalized-and-specialized-images>).
fn base_settings(target: &str, f: &Facts) -> Vec<(&'static str, &'static str)> {
    let uefi_only = f.boot("uefi");
    match target {
        "aws" => {
            let mut v = vec![("boot_mode", if uefi_only { "uefi" } else { "legacy-bios" })];
            if f.win_has(&["ena"]) == Some(false) {
                v.push(("ena", "no"));
            }
            v
        }
        "azure" => {
            let mut v = vec![("hyper_v_generation", if uefi_only { "V2" } else { "V1" })];
            if let Some(w) = &f.windows {
                v.push(("os_type", "windows"));
                v.push((
                    "os_state",
                    if w.generalized == Some(true) {
                        "Generalized"
                    } else {
                        "Specialized"
                    },
                ));
            }
            v
        }
        "libvirt" => vec![
            ("firmware", if uefi_only { "efi" } else { "bios" }),
            ("bus", "virtio"),
        ],
        _ => Vec::new(),
    }
}

/// Applies a target's rules.
pub fn evaluate(target: &str, rules: &[Rule], f: &Facts) -> Verdict {
    let mut findings = Vec::new();
    let mut settings = BTreeMap::new();
    for r in rules {
        let Some(evidence) = (r.when)(f) else {
            continue;
        };
        let reason = if evidence.is_empty() {
            r.reason.to_string()
        } else {
            format!("{} ({evidence})", r.reason)
        };
        let id = if r.id.starts_with(target) {
            r.id.to_string()
        } else {
            format!("{target}-{}", r.id)
        };
        findings.push(Finding {
            id,
            level: r.level,
            reason,
            fix: r.fix.into(),
        });
        for (k, v) in r.set {
            settings
                .entry(k.to_string())
                .or_insert_with(|| v.to_string());
        }
    }
    for (k, v) in base_settings(target, f) {
        settings
            .entry(k.to_string())
            .or_insert_with(|| v.to_string());
    }
    let verdict = findings.iter().map(|x| x.level).max().unwrap_or(Level::Ok);
    Verdict {
        target: target.into(),
        verdict,
        findings,
        settings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(drivers: &[&str]) -> Facts {
        Facts {
            boot_mode: "bios".into(),
            linux_root: true,
            drivers: Some(drivers.iter().map(|s| s.to_string()).collect()),
            agents: vec!["cloud-init".into()],
            arch: Some("x86_64".into()),
            size: 64 << 20,
            ..Facts::default()
        }
    }

    const ALL: &[&str] = &[
        "virtio_blk",
        "virtio_pci",
        "virtio_scsi",
        "virtio_net",
        "nvme",
        "ena",
        "ahci",
        "ata_piix",
        "sd_mod",
        "hv_vmbus",
        "hv_storvsc",
        "hv_netvsc",
    ];

    fn ids(v: &Verdict) -> Vec<&str> {
        v.findings.iter().map(|f| f.id.as_str()).collect()
    }

    #[test]
    fn all_drivers_is_ok_everywhere() {
        for t in ["aws", "azure", "libvirt"] {
            let v = evaluate(t, table(t).unwrap_or_default(), &facts(ALL));
            assert_eq!(v.verdict, Level::Ok, "{t}: {:?}", v.findings);
        }
    }

    #[test]
    fn libvirt_fallback_buses() {
        let v = evaluate("libvirt", LIBVIRT, &facts(&["ahci", "ata_piix", "sd_mod"]));
        assert_eq!(ids(&v), ["libvirt-virtio-sata", "libvirt-virtio-net"]);
        assert_eq!(v.settings["bus"], "sata");
        let v = evaluate("libvirt", LIBVIRT, &facts(&["ata_piix", "sd_mod"]));
        assert_eq!(v.settings["bus"], "ide");
        let v = evaluate("libvirt", LIBVIRT, &facts(&["virtio_net"]));
        assert_eq!(
            (v.verdict, ids(&v)),
            (Level::Fail, vec!["libvirt-no-disk-driver"])
        );
        let mut f = facts(ALL);
        f.root_device = Some(("kernel command line".into(), "/dev/sda1".into()));
        let v = evaluate("libvirt", LIBVIRT, &f);
        assert_eq!(
            (v.verdict, v.settings["bus"].as_str()),
            (Level::Warn, "scsi")
        );
        assert!(
            v.findings[0]
                .reason
                .contains("/dev/sda1 in the kernel command line")
        );
    }

    #[test]
    fn boot_modes() {
        let mut f = facts(ALL);
        f.boot_mode = "uefi".into();
        f.gpt_esp = true;
        let v = evaluate("aws", AWS, &f);
        assert_eq!(ids(&v), ["aws-boot-mode-uefi"]);
        f.aws_boot_mode = Some("uefi".into());
        assert_eq!(evaluate("aws", AWS, &f).verdict, Level::Ok);
        assert_eq!(
            evaluate("azure", AZURE, &f).settings["hyper_v_generation"],
            "V2"
        );
        assert_eq!(evaluate("libvirt", LIBVIRT, &f).settings["firmware"], "efi");
        f.boot_mode = "bios".into();
        assert_eq!(ids(&evaluate("azure", AZURE, &f)), ["azure-generation-v1"]);
        assert_eq!(ids(&evaluate("aws", AWS, &f)), ["aws-boot-mode-bios"]);
        f.boot_mode = "unknown".into();
        assert_eq!(
            ids(&evaluate("libvirt", LIBVIRT, &f)),
            ["libvirt-boot-loader"]
        );
    }

    fn windows(drivers: &[(&str, u32)], generalized: bool) -> Facts {
        use crate::guest::windows::{Driver, start_type};
        Facts {
            boot_mode: "bios".into(),
            arch: Some("x86_64".into()),
            size: 64 << 20,
            windows: Some(WindowsInstall {
                root: "/dev/sda1".into(),
                arch: Some("x86_64".into()),
                product_name: Some("Windows Server 2019 Datacenter".into()),
                product_variant: Some("Server".into()),
                major_version: Some(10),
                minor_version: Some(0),
                generalized: Some(generalized),
                registry_read: true,
                drivers: drivers
                    .iter()
                    .map(|&(n, st)| Driver {
                        name: n.into(),
                        start: Some(st),
                        start_type: start_type(Some(st)).into(),
                        image_path: None,
                        file_present: true,
                    })
                    .collect(),
                ..WindowsInstall::default()
            }),
            ..Facts::default()
        }
    }

    #[test]
    fn windows_rules() {
        let all = [
            ("viostor", 0),
            ("netkvm", 3),
            ("AWSNVMe", 0),
            ("ena", 3),
            ("storvsc", 0),
            ("vmbus", 0),
            ("netvsc", 3),
            ("storahci", 0),
        ];
        let f = windows(&all, true);
        assert_eq!(ids(&evaluate("aws", AWS, &f)), ["aws-windows-license"]);
        assert_eq!(evaluate("azure", AZURE, &f).verdict, Level::Ok);
        assert_eq!(evaluate("libvirt", LIBVIRT, &f).verdict, Level::Ok);
        // stornvme on demand does not count; in-box SATA on demand leaves IDE, then nothing.
        let f = windows(&[("stornvme", 3), ("storahci", 3), ("pciide", 0)], false);
        let aws = evaluate("aws", AWS, &f);
        assert_eq!(
            ids(&aws),
            ["aws-windows-nvme", "aws-windows-ena", "aws-windows-license"]
        );
        assert!(aws.findings[0].reason.contains("stornvme start demand"));
        let lv = evaluate("libvirt", LIBVIRT, &f);
        assert_eq!(ids(&lv), ["libvirt-windows-ide", "libvirt-windows-nic"]);
        assert_eq!(lv.settings["bus"], "ide");
        assert_eq!(lv.settings["nic_model"], "e1000e");
        let az = evaluate("azure", AZURE, &f);
        assert_eq!(
            ids(&az),
            [
                "azure-windows-hv-storage",
                "azure-windows-hv-net",
                "azure-windows-specialized"
            ]
        );
        let f = windows(&[("vioscsi", 0)], true);
        assert_eq!(evaluate("libvirt", LIBVIRT, &f).settings["bus"], "scsi");
        let f = windows(&[], true);
        assert_eq!(
            evaluate("libvirt", LIBVIRT, &f).verdict,
            Level::Fail,
            "no storage driver at all"
        );
        // A driver whose file is gone does not count.
        let mut f = windows(&[("viostor", 0), ("storahci", 0)], true);
        if let Some(w) = f.windows.as_mut() {
            w.drivers[0].file_present = false;
        }
        assert_eq!(evaluate("libvirt", LIBVIRT, &f).settings["bus"], "sata");
        // Generation 2: 64-bit Server 2012 (6.2) or later, or Windows 10/11.
        let mut f = windows(&all, true);
        f.boot_mode = "uefi".into();
        f.gpt_esp = true;
        assert_eq!(evaluate("azure", AZURE, &f).verdict, Level::Ok);
        if let Some(w) = f.windows.as_mut() {
            (w.major_version, w.minor_version) = (Some(6), Some(1));
        }
        assert_eq!(ids(&evaluate("azure", AZURE, &f)), ["azure-windows-gen2"]);
        // Registry unread: one warning, no driver rules.
        let mut f = windows(&[], false);
        if let Some(w) = f.windows.as_mut() {
            w.registry_read = false;
        }
        assert_eq!(
            ids(&evaluate("aws", AWS, &f)),
            ["aws-windows-registry", "aws-windows-license"]
        );
    }

    /// What a Windows guest is registered as: osType and osState on Azure, EnaSupport on AWS, the NIC model
    /// on libvirt; a Linux guest keeps the defaults (no os_type/os_state/ena settings).
    #[test]
    fn windows_registration_settings() {
        let with_ena = [("AWSNVMe", 0), ("ena", 3), ("netkvm", 3), ("viostor", 0)];
        let sysprepped = windows(&with_ena, true);
        let az = evaluate("azure", AZURE, &sysprepped).settings;
        assert_eq!(
            (az["os_type"].as_str(), az["os_state"].as_str()),
            ("windows", "Generalized")
        );
        let aws = evaluate("aws", AWS, &sysprepped).settings;
        assert_eq!(aws.get("ena"), None, "ena installed: EnaSupport stays on");
        assert_eq!(aws["boot_mode"], "legacy-bios");
        assert_eq!(
            evaluate("libvirt", LIBVIRT, &sysprepped)
                .settings
                .get("nic_model"),
            None,
            "netkvm installed: the default virtio NIC"
        );
        let specialised = windows(&[("stornvme", 0), ("storahci", 0)], false);
        let az = evaluate("azure", AZURE, &specialised).settings;
        assert_eq!(az["os_state"], "Specialized");
        assert_eq!(evaluate("aws", AWS, &specialised).settings["ena"], "no");
        assert_eq!(
            evaluate("libvirt", LIBVIRT, &specialised).settings["nic_model"],
            "e1000e"
        );
        let mut uefi = specialised.clone();
        uefi.boot_mode = "uefi".into();
        assert_eq!(
            evaluate("azure", AZURE, &uefi).settings["hyper_v_generation"],
            "V2"
        );
        assert_eq!(evaluate("aws", AWS, &uefi).settings["boot_mode"], "uefi");
        // State unknown (registry unread): specialised, the safe side; ENA unknown: the flag stays.
        let mut unread = windows(&[], true);
        if let Some(w) = unread.windows.as_mut() {
            w.registry_read = false;
            w.generalized = None;
        }
        assert_eq!(
            evaluate("azure", AZURE, &unread).settings["os_state"],
            "Specialized"
        );
        assert_eq!(evaluate("aws", AWS, &unread).settings.get("ena"), None);
        let linux = evaluate("azure", AZURE, &facts(ALL)).settings;
        assert_eq!((linux.get("os_type"), linux.get("os_state")), (None, None));
        assert_eq!(evaluate("aws", AWS, &facts(ALL)).settings.get("ena"), None);
    }

    #[test]
    fn unknown_drivers() {
        let mut f = facts(ALL);
        f.drivers = None;
        f.initramfs_problem = Some("gzip archive at byte 0: truncated".into());
        let v = evaluate("aws", AWS, &f);
        assert_eq!(
            (v.verdict, ids(&v)),
            (Level::Fail, vec!["aws-initramfs-unreadable"])
        );
        f.initramfs_problem = None;
        f.linux_root = false;
        let v = evaluate("azure", AZURE, &f);
        assert_eq!(
            (v.verdict, ids(&v)),
            (Level::Warn, vec!["azure-drivers-unknown"])
        );
    }
}
