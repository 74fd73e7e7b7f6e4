//! The domain to define, with its `auto` choices resolved: used by `upload libvirt --define` and by
//! `migrate --to libvirt`, so both pick firmware, disk bus and domain type the same way.
//!
//! - Firmware `auto`: with a Linux root, the boot mode imgshift's inspection found (its libvirt preflight setting
//!   `firmware`); without one, what the partition table suggests (UEFI for a GPT with an EFI system partition).
//! - Disk bus `auto`: with a Linux root, the preflight's `bus` setting (virtio when the initramfs has the virtio
//!   drivers, scsi when only virtio-scsi is there); otherwise SATA, which every current OS has drivers for.
//! - Domain type `auto`: kvm when the host's capabilities offer KVM, else qemu (TCG).
//!
//! The choices are this module's own ([`DomainChoices`]); the caller maps command-line options onto them and
//! inspects the guest ([`GuestHints`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};

use super::rpc::Connect;
use super::xml::{DomainDisk, DomainSpec, NicModel};
use super::{DiskBus, DomainType, Firmware, caps};

/// Firmware to give the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareChoice {
    /// From what is known about the guest.
    Auto,
    /// Legacy BIOS.
    Bios,
    /// UEFI.
    Uefi,
}

/// Bus of the domain's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusChoice {
    /// From what is known about the guest.
    Auto,
    /// virtio-blk.
    Virtio,
    /// SATA.
    Sata,
    /// virtio-scsi.
    Scsi,
}

/// Domain (hypervisor) type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeChoice {
    /// kvm when the host offers it, else qemu.
    Auto,
    /// KVM.
    Kvm,
    /// QEMU's TCG emulation.
    Qemu,
}

/// The domain options (`auto` not yet resolved).
#[derive(Debug, Clone)]
pub struct DomainChoices {
    /// Firmware.
    pub firmware: FirmwareChoice,
    /// Disk bus.
    pub disk_bus: BusChoice,
    /// Domain type.
    pub domain_type: TypeChoice,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// libvirt network to attach, if any.
    pub network: Option<String>,
    /// File on the daemon's host that receives the serial console.
    pub serial_log: Option<PathBuf>,
}

impl DomainChoices {
    /// Checks what can be checked without a connection; returns the serial log path as text.
    pub fn check(&self) -> Result<Option<String>> {
        if self.vcpus == 0 || self.memory_mib == 0 {
            bail!("--vcpus and --memory must be at least 1");
        }
        match &self.serial_log {
            Some(p) if !p.is_absolute() => bail!(
                "--serial-log {}: give an absolute path (it is opened on the daemon's host)",
                p.display()
            ),
            Some(p) => Ok(Some(
                p.to_str()
                    .ok_or_else(|| anyhow!("--serial-log {}: not UTF-8", p.display()))?
                    .to_string(),
            )),
            None => Ok(None),
        }
    }

    /// Whether an `auto` choice needs to know about the guest.
    pub fn needs_guest(&self) -> bool {
        self.firmware == FirmwareChoice::Auto || self.disk_bus == BusChoice::Auto
    }
}

/// What is known about the guest for the `auto` choices.
#[derive(Debug, Clone, Default)]
pub struct GuestHints {
    /// The guest's operating system was read — a Linux root filesystem or a Windows registry — so its boot
    /// drivers and boot mode are known.
    pub os_read: bool,
    /// The libvirt preflight's settings (`firmware`: bios/efi, `bus`: virtio/scsi/sata/ide).
    pub settings: BTreeMap<String, String>,
    /// The firmware the partition table suggests, and why (used without a Linux root).
    pub partition_firmware: Option<(Firmware, String)>,
}

impl GuestHints {
    fn setting(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }
}

/// A domain with every choice made.
#[derive(Debug, Clone)]
pub struct DomainPlan {
    /// What to define.
    pub spec: DomainSpec,
    /// Why `auto` choices came out as they did (printed unless quiet).
    pub notes: Vec<String>,
}

/// The name of a firmware as the notes and reports give it.
pub fn fw_name(f: Firmware) -> &'static str {
    match f {
        Firmware::Bios => "bios",
        Firmware::Uefi => "uefi",
    }
}

/// Checks the options and resolves the `auto` choices for a domain `name` with `disks` (boot disk first).
/// `guest` is what is known about the guest (needed only when firmware or bus is `auto`; `None` counts as a
/// disk without a Linux root or partition table); `conn` answers `--domain-type auto`.
pub fn plan_domain(
    name: &str,
    c: &DomainChoices,
    disks: Vec<DomainDisk>,
    guest: Option<&GuestHints>,
    conn: &Connect,
) -> Result<DomainPlan> {
    if name.is_empty() {
        bail!("the domain needs a name");
    }
    if disks.is_empty() {
        bail!("domain '{name}' needs at least one disk");
    }
    let serial_log = c.check()?;
    let mut notes = Vec::new();
    let none = GuestHints::default();
    let g = guest.unwrap_or(&none);
    let firmware = match c.firmware {
        FirmwareChoice::Bios => Firmware::Bios,
        FirmwareChoice::Uefi => Firmware::Uefi,
        FirmwareChoice::Auto => {
            let (fw, why) = auto_firmware(g);
            notes.push(format!("firmware {}: {why}", fw_name(fw)));
            fw
        }
    };
    let disk_bus = match c.disk_bus {
        BusChoice::Virtio => DiskBus::Virtio,
        BusChoice::Sata => DiskBus::Sata,
        BusChoice::Scsi => DiskBus::Scsi,
        BusChoice::Auto => {
            let (bus, why) = auto_bus(g);
            notes.push(why.to_string());
            bus
        }
    };
    // A Windows guest without the virtio network driver (netkvm) gets the e1000e NIC it has a driver for.
    let nic_model = if g.setting("nic_model") == Some("e1000e") {
        if c.network.is_some() {
            notes.push(
                "NIC model e1000e: the guest has no virtio network driver (netkvm) (inspection)"
                    .to_string(),
            );
        }
        NicModel::E1000e
    } else {
        NicModel::Virtio
    };
    let domain_type = match c.domain_type {
        TypeChoice::Kvm => DomainType::Kvm,
        TypeChoice::Qemu => DomainType::Qemu,
        TypeChoice::Auto => {
            let t = caps::auto_domain_type(conn)?;
            notes.push(match t {
                DomainType::Kvm => {
                    "domain type kvm: the host offers KVM (pass --domain-type qemu for TCG \
                                    emulation where KVM does not work)"
                        .to_string()
                }
                DomainType::Qemu => {
                    "domain type qemu (TCG emulation): the host does not offer KVM".to_string()
                }
            });
            t
        }
    };
    Ok(DomainPlan {
        spec: DomainSpec {
            name: name.to_string(),
            domain_type,
            memory_mib: c.memory_mib,
            vcpus: c.vcpus,
            firmware,
            disk_bus,
            disks,
            network: c.network.clone(),
            nic_model,
            serial_log,
        },
        notes,
    })
}

/// `--firmware auto`.
fn auto_firmware(g: &GuestHints) -> (Firmware, String) {
    let from_setting = || {
        if g.setting("firmware") == Some("efi") {
            Firmware::Uefi
        } else {
            Firmware::Bios
        }
    };
    if g.os_read {
        return (
            from_setting(),
            "from the guest's boot mode (inspection)".into(),
        );
    }
    match &g.partition_firmware {
        // No operating system read: an ESP on a GPT is what UEFI firmware boots from (Azure's rule).
        Some((fw, why)) => (*fw, why.clone()),
        None => (
            from_setting(),
            "from the disk's boot mode (inspection)".into(),
        ),
    }
}

/// `--disk-bus auto`.
fn auto_bus(g: &GuestHints) -> (DiskBus, &'static str) {
    match g.setting("bus") {
        Some("virtio") if g.os_read => (
            DiskBus::Virtio,
            "disk bus virtio: the guest starts the virtio block drivers at boot (inspection)",
        ),
        Some("scsi") if g.os_read => (
            DiskBus::Scsi,
            "disk bus scsi: inspection suggests it for this guest",
        ),
        _ => (
            DiskBus::Sata,
            "disk bus sata: the guest's virtio drivers were not found by inspection (pass --disk-bus virtio for a \
             guest that has them)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hints(linux: bool, fw: &str, bus: &str) -> GuestHints {
        GuestHints {
            os_read: linux,
            settings: [("firmware", fw), ("bus", bus)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            partition_firmware: None,
        }
    }

    #[test]
    fn auto_follows_inspection_for_linux_guests_only() {
        assert_eq!(
            auto_firmware(&hints(true, "efi", "virtio")).0,
            Firmware::Uefi
        );
        assert_eq!(auto_bus(&hints(true, "efi", "virtio")).0, DiskBus::Virtio);
        assert_eq!(auto_bus(&hints(true, "bios", "scsi")).0, DiskBus::Scsi);
        assert_eq!(auto_bus(&hints(true, "bios", "ide")).0, DiskBus::Sata);
        // Without a Linux root the default virtio setting is not trusted.
        assert_eq!(auto_bus(&hints(false, "bios", "virtio")).0, DiskBus::Sata);
        let mut g = hints(false, "bios", "virtio");
        g.partition_firmware = Some((Firmware::Uefi, "esp".into()));
        assert_eq!(auto_firmware(&g), (Firmware::Uefi, "esp".to_string()));
        assert_eq!(auto_firmware(&GuestHints::default()).0, Firmware::Bios);
    }
}
