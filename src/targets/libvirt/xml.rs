//! Volume and domain XML, written with quick-xml's writer: names and paths the user gives are attribute values
//! or text, escaped by the writer, never spliced into markup.
//!
//! Schemas: <https://libvirt.org/formatstorage.html#storage-volume-xml> and
//! <https://libvirt.org/formatdomain.html>.

use std::io::Cursor;

use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};

use super::{DiskBus, DomainType, Error, Firmware, Result, VolFormat};

/// Volume definition: `name`, `capacity` bytes, `format`, nothing allocated up front.
pub fn volume_xml(name: &str, capacity: u64, format: VolFormat) -> Result<String> {
    let mut w = Xml::new(false);
    w.open("volume", &[])?;
    w.text("name", &[], name)?;
    w.text("capacity", &[("unit", "bytes")], &capacity.to_string())?;
    w.text("allocation", &[("unit", "bytes")], "0")?;
    w.open("target", &[])?;
    w.empty("format", &[("type", format.name())])?;
    w.close("target")?;
    w.close("volume")?;
    w.finish()
}

/// A qcow2 volume `name` of `capacity` bytes over the qcow2 file `backing` (a path on the daemon's host): it
/// reads as `backing` and takes the writes, leaving `backing` as it was.
pub fn overlay_volume_xml(name: &str, capacity: u64, backing: &str) -> Result<String> {
    let mut w = Xml::new(false);
    w.open("volume", &[])?;
    w.text("name", &[], name)?;
    w.text("capacity", &[("unit", "bytes")], &capacity.to_string())?;
    w.text("allocation", &[("unit", "bytes")], "0")?;
    w.open("target", &[])?;
    w.empty("format", &[("type", VolFormat::Qcow2.name())])?;
    w.close("target")?;
    w.open("backingStore", &[])?;
    w.text("path", &[], backing)?;
    w.empty("format", &[("type", VolFormat::Qcow2.name())])?;
    w.close("backingStore")?;
    w.close("volume")?;
    w.finish()
}

/// What `--define` puts into the domain.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// Domain name.
    pub name: String,
    /// Hypervisor type.
    pub domain_type: DomainType,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Firmware.
    pub firmware: Firmware,
    /// Bus of the disks.
    pub disk_bus: DiskBus,
    /// The disks, the boot disk first (at least one).
    pub disks: Vec<DomainDisk>,
    /// A libvirt network for the NIC.
    pub network: Option<String>,
    /// The NIC's model.
    pub nic_model: NicModel,
    /// A file (on the daemon's host) that receives everything the guest writes to its serial console.
    pub serial_log: Option<String>,
}

/// The model of the domain's NIC (libvirt `<model type=...>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicModel {
    /// virtio-net: needs the guest's virtio network driver (Linux virtio_net, Windows netkvm).
    Virtio,
    /// Intel 82574 (e1000e) emulation: Windows has an in-box driver for it (e1000e is also q35's default).
    E1000e,
}

impl NicModel {
    /// The name libvirt gives it.
    pub fn name(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000e => "e1000e",
        }
    }
}

/// A volume attached to the domain as a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// Pool holding the volume.
    pub pool: String,
    /// The volume.
    pub volume: String,
    /// The volume's format.
    pub format: VolFormat,
}

/// The guest device name of disk `index` on `bus`: `vda`, `vdb`, … for virtio, `sda`, `sdb`, … for SATA and
/// SCSI; after `z` come `aa`, `ab`, … (libvirt's own naming).
pub fn device_name(bus: DiskBus, index: usize) -> String {
    let prefix = match bus {
        DiskBus::Virtio => "vd",
        DiskBus::Sata | DiskBus::Scsi => "sd",
    };
    let mut letters = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&letters))
}

/// The namespace of imgshift's `<metadata>` element in the domains it defines.
pub const METADATA_NS: &str = "http://imgshift.invalid/libvirt/domain/1";

/// Domain XML for `spec`.
///
/// - x86_64, machine `q35` (PCIe, AHCI built in), boots from the first disk (`<boot order='1'/>` on it, so
///   the firmware's choice does not depend on how the disks were enumerated).
/// - UEFI through libvirt's firmware auto-selection (`<os firmware='efi'>`), Secure Boot off: converted guests
///   are rarely signed for Microsoft's keys, and the enrolled-keys OVMF build would refuse them.
/// - `<features><acpi/><apic/></features>`: without `<acpi/>`, libvirt 9 passes `-no-acpi`, which QEMU 10 no
///   longer accepts, and guests without ACPI cannot be shut down cleanly anyway.
/// - A serial console on a pty (`virsh console`), optionally logged to a file.
pub fn domain_xml(spec: &DomainSpec) -> Result<String> {
    let mut w = Xml::new(true);
    w.open("domain", &[("type", spec.domain_type.name())])?;
    w.text("name", &[], &spec.name)?;
    w.text("memory", &[("unit", "MiB")], &spec.memory_mib.to_string())?;
    w.text("vcpu", &[], &spec.vcpus.to_string())?;
    // What `imgshift images list --on libvirt` knows imgshift's domains by (libvirt keeps namespaced metadata).
    w.open("metadata", &[])?;
    w.empty(
        "imgshift:domain",
        &[("xmlns:imgshift", METADATA_NS), ("made-by", "imgshift")],
    )?;
    w.close("metadata")?;

    let os: &[(&str, &str)] = match spec.firmware {
        Firmware::Uefi => &[("firmware", "efi")],
        Firmware::Bios => &[],
    };
    w.open("os", os)?;
    w.text("type", &[("arch", "x86_64"), ("machine", "q35")], "hvm")?;
    if spec.firmware == Firmware::Uefi {
        w.open("firmware", &[])?;
        w.empty("feature", &[("enabled", "no"), ("name", "secure-boot")])?;
        w.close("firmware")?;
    }
    w.close("os")?;

    w.open("features", &[])?;
    w.empty("acpi", &[])?;
    w.empty("apic", &[])?;
    w.close("features")?;

    w.open("devices", &[])?;
    disks(&mut w, spec)?;
    if let Some(net) = &spec.network {
        w.open("interface", &[("type", "network")])?;
        w.empty("source", &[("network", net)])?;
        w.empty("model", &[("type", spec.nic_model.name())])?;
        w.close("interface")?;
    }
    w.open("serial", &[("type", "pty")])?;
    if let Some(log) = &spec.serial_log {
        w.empty("log", &[("file", log), ("append", "off")])?;
    }
    w.empty("target", &[("port", "0")])?;
    w.close("serial")?;
    w.open("console", &[("type", "pty")])?;
    w.empty("target", &[("type", "serial"), ("port", "0")])?;
    w.close("console")?;
    w.close("devices")?;
    w.close("domain")?;
    w.finish()
}

/// The volumes as the domain's disks, the boot disk first (plus the virtio-scsi controller SCSI disks need).
fn disks(w: &mut Xml, spec: &DomainSpec) -> Result<()> {
    if spec.disks.is_empty() {
        return Err(Error::Xml(format!("domain '{}' has no disk", spec.name)));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let dev = device_name(spec.disk_bus, i);
        w.open("disk", &[("type", "volume"), ("device", "disk")])?;
        w.empty("driver", &[("name", "qemu"), ("type", d.format.name())])?;
        w.empty("source", &[("pool", &d.pool), ("volume", &d.volume)])?;
        w.empty("target", &[("dev", &dev), ("bus", spec.disk_bus.name())])?;
        if i == 0 {
            w.empty("boot", &[("order", "1")])?;
        }
        w.close("disk")?;
    }
    if spec.disk_bus == DiskBus::Scsi {
        w.empty("controller", &[("type", "scsi"), ("model", "virtio-scsi")])?;
    }
    Ok(())
}

/// A small wrapper over quick-xml's writer into memory.
struct Xml {
    w: Writer<Cursor<Vec<u8>>>,
}

fn xml_err(e: impl std::fmt::Display) -> Error {
    Error::Xml(e.to_string())
}

impl Xml {
    fn new(indent: bool) -> Xml {
        let out = Cursor::new(Vec::new());
        Xml {
            w: if indent {
                Writer::new_with_indent(out, b' ', 2)
            } else {
                Writer::new(out)
            },
        }
    }

    fn start<'a>(name: &'a str, attrs: &[(&str, &str)]) -> BytesStart<'a> {
        let mut e = BytesStart::new(name);
        for (k, v) in attrs {
            e.push_attribute((*k, *v));
        }
        e
    }

    fn open(&mut self, name: &str, attrs: &[(&str, &str)]) -> Result<()> {
        self.w
            .write_event(Event::Start(Self::start(name, attrs)))
            .map_err(xml_err)
    }

    fn close(&mut self, name: &str) -> Result<()> {
        self.w
            .write_event(Event::End(BytesEnd::new(name)))
            .map_err(xml_err)
    }

    fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) -> Result<()> {
        self.w
            .write_event(Event::Empty(Self::start(name, attrs)))
            .map_err(xml_err)
    }

    fn text(&mut self, name: &str, attrs: &[(&str, &str)], body: &str) -> Result<()> {
        self.open(name, attrs)?;
        self.w
            .write_event(Event::Text(BytesText::new(body)))
            .map_err(xml_err)?;
        self.close(name)
    }

    fn finish(self) -> Result<String> {
        String::from_utf8(self.w.into_inner().into_inner()).map_err(xml_err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "vm".into(),
            domain_type: DomainType::Qemu,
            memory_mib: 512,
            vcpus: 2,
            firmware: Firmware::Bios,
            disk_bus: DiskBus::Virtio,
            disks: vec![DomainDisk {
                pool: "pool".into(),
                volume: "vm.qcow2".into(),
                format: VolFormat::Qcow2,
            }],
            network: None,
            nic_model: NicModel::Virtio,
            serial_log: None,
        }
    }

    #[test]
    fn names_are_escaped() {
        let s = DomainSpec {
            name: "a<b>&'\"".into(),
            firmware: Firmware::Uefi,
            disk_bus: DiskBus::Scsi,
            disks: vec![DomainDisk {
                pool: "p'".into(),
                volume: "v\"".into(),
                format: VolFormat::Raw,
            }],
            network: Some("n&".into()),
            serial_log: Some("/tmp/<x>".into()),
            ..spec()
        };
        let x = domain_xml(&s).unwrap();
        assert!(
            x.contains("<name>a&lt;b&gt;&amp;&apos;&quot;</name>"),
            "{x}"
        );
        assert!(x.contains("pool=\"p&apos;\""), "{x}");
        assert!(x.contains("volume=\"v&quot;\""), "{x}");
        assert!(x.contains("network=\"n&amp;\""), "{x}");
        assert!(x.contains("<model type=\"virtio\"/>"), "{x}");
        let e = domain_xml(&DomainSpec {
            network: Some("default".into()),
            nic_model: NicModel::E1000e,
            ..spec()
        })
        .unwrap();
        assert!(e.contains("<model type=\"e1000e\"/>"), "{e}");
        assert!(x.contains("file=\"/tmp/&lt;x&gt;\""), "{x}");
        let v = volume_xml("x&y", 1234, VolFormat::Raw).unwrap();
        assert_eq!(
            v,
            "<volume><name>x&amp;y</name><capacity unit=\"bytes\">1234</capacity><allocation \
             unit=\"bytes\">0</allocation><target><format type=\"raw\"/></target></volume>"
        );
    }

    #[test]
    fn uefi_without_secure_boot() {
        let x = domain_xml(&DomainSpec {
            firmware: Firmware::Uefi,
            ..spec()
        })
        .unwrap();
        assert!(x.contains("<os firmware=\"efi\">"), "{x}");
        assert!(
            x.contains("<feature enabled=\"no\" name=\"secure-boot\"/>"),
            "{x}"
        );
        let b = domain_xml(&spec()).unwrap();
        assert!(b.contains("<os>") && !b.contains("efi"), "{b}");
    }

    #[test]
    fn features_disk_and_console() {
        let x = domain_xml(&spec()).unwrap();
        assert!(x.starts_with("<domain type=\"qemu\">"), "{x}");
        assert!(x.contains("<acpi/>") && x.contains("<apic/>"), "{x}");
        assert!(
            x.contains("<source pool=\"pool\" volume=\"vm.qcow2\"/>"),
            "{x}"
        );
        assert!(x.contains("<driver name=\"qemu\" type=\"qcow2\"/>"), "{x}");
        assert!(x.contains("<target dev=\"vda\" bus=\"virtio\"/>"), "{x}");
        assert!(x.contains("<serial type=\"pty\">"), "{x}");
        assert!(!x.contains("virtio-scsi") && !x.contains("<log"), "{x}");
        let s = domain_xml(&DomainSpec {
            disk_bus: DiskBus::Scsi,
            domain_type: DomainType::Kvm,
            ..spec()
        })
        .unwrap();
        assert!(s.contains("<target dev=\"sda\" bus=\"scsi\"/>"), "{s}");
        assert!(s.contains("model=\"virtio-scsi\""), "{s}");
        assert!(s.starts_with("<domain type=\"kvm\">"), "{s}");
    }

    #[test]
    fn several_disks_boot_disk_first() {
        let data = DomainDisk {
            pool: "pool".into(),
            volume: "vm-data1.raw".into(),
            format: VolFormat::Raw,
        };
        let x = domain_xml(&DomainSpec {
            disks: vec![spec().disks[0].clone(), data.clone()],
            ..spec()
        })
        .unwrap();
        let a = x.find("volume=\"vm.qcow2\"").unwrap();
        let b = x.find("volume=\"vm-data1.raw\"").unwrap();
        assert!(a < b, "{x}");
        assert!(x.contains("<target dev=\"vdb\" bus=\"virtio\"/>"), "{x}");
        assert!(x.contains("<driver name=\"qemu\" type=\"raw\"/>"), "{x}");
        assert_eq!(x.matches("<boot order=\"1\"/>").count(), 1, "{x}");
        assert!(x.find("<boot order").unwrap() < b, "{x}");
        assert!(!x.contains("<boot dev"), "{x}");
        let none = domain_xml(&DomainSpec {
            disks: Vec::new(),
            ..spec()
        });
        assert!(none.is_err());
    }

    #[test]
    fn device_names() {
        assert_eq!(device_name(DiskBus::Virtio, 0), "vda");
        assert_eq!(device_name(DiskBus::Sata, 1), "sdb");
        assert_eq!(device_name(DiskBus::Scsi, 25), "sdz");
        assert_eq!(device_name(DiskBus::Virtio, 26), "vdaa");
        assert_eq!(device_name(DiskBus::Virtio, 27), "vdab");
        assert_eq!(device_name(DiskBus::Virtio, 701), "vdzz");
        assert_eq!(device_name(DiskBus::Virtio, 702), "vdaaa");
    }
}
