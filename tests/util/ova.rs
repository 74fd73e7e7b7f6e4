//! A two-disk OVA built at test time: an OVF descriptor (listing the data disk first, the boot disk at address
//! 0), a streamOptimized VMDK boot disk and a qcow2 data disk made by qemu-img, in a plain ustar archive.

use std::path::{Path, PathBuf};

use super::*;

pub const MIB: u64 = 1 << 20;
/// Boot disk: 16 MiB (declared as 16 × 2^20 bytes in the descriptor).
pub const BOOT_SIZE: u64 = 16 * MIB;
/// Data disk: not a multiple of 64 KiB (declared in bytes).
pub const DATA_SIZE: u64 = 6 * MIB + 3 * 512;

pub struct Ova {
    pub _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub ova: PathBuf,
    pub boot_raw: PathBuf,
    pub data_raw: PathBuf,
}

pub fn descriptor(data_bytes: u64, boot_bytes: u64) -> String {
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
pub fn make_ova() -> Ova {
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

// A general builder: any number of disks, in controller order (boot disk first), descriptor first.

/// `ovf:format` of a streamOptimized VMDK.
pub const VMDK_STREAM: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
/// `ovf:format` of a qcow2 disk.
pub const QCOW2: &str = "http://www.gnome.org/~markmc/qcow-image-format.html";

/// One disk of the package: the member name, the image file, its `ovf:format` and its capacity in bytes.
pub struct OvaDisk<'a> {
    pub member: &'a str,
    pub image: &'a Path,
    pub format: &'a str,
    pub capacity: u64,
}

/// Writes `out`: `vm.ovf` then every disk, disk 0 at controller address 0 (the boot disk).
pub fn build_ova(out: &Path, disks: &[OvaDisk<'_>]) {
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    let mut refs = String::new();
    let mut section = String::new();
    let mut items = String::new();
    for (i, d) in disks.iter().enumerate() {
        refs += &format!(
            "    <File ovf:id=\"file{i}\" ovf:href=\"{}\" ovf:size=\"{}\"/>\n",
            d.member,
            len(d.image)
        );
        section += &format!(
            "    <Disk ovf:diskId=\"disk{i}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:format=\"{}\"/>\n",
            d.capacity, d.format
        );
        items += &format!(
            "      <Item>\n        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>\n        <rasd:ElementName>Hard Disk {}</rasd:ElementName>\n        <rasd:HostResource>ovf:/disk/disk{i}</rasd:HostResource>\n        <rasd:InstanceID>{}</rasd:InstanceID>\n        <rasd:Parent>3</rasd:Parent>\n        <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n",
            i + 1,
            i + 10
        );
    }
    let ovf = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{section}  </DiskSection>
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
{items}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    );
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.sparse(false);
    b.mode(tar::HeaderMode::Deterministic);
    let mut h = tar::Header::new_ustar();
    h.set_size(ovf.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "vm.ovf", ovf.as_bytes()).unwrap();
    for d in disks {
        b.append_path_with_name(d.image, d.member).unwrap();
    }
    b.into_inner().unwrap();
}
