//! Builds OVA packages at test time: an OVF descriptor naming each disk in controller order (boot disk first),
//! then the disk members, as plain ustar (DSP0243 5.3).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

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
