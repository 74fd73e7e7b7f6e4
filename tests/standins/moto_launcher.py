#!/usr/bin/env python3
"""Starts moto's server with its EC2 RegisterImage corrected to follow the EC2 API reference.

Stock moto (5.x) keeps only Name and Description of a RegisterImage call: the block device mappings, the root
device name, the boot mode, the architecture and the ENA flag are dropped, and a made-up 15 GiB snapshot is
attached instead (shared/notes/cross-cloud.md section 4). imgshift reads AMIs as sources (`aws:ami-...`: every
EBS mapping, boot disk first, with its boot mode), so a stand-in that forgets them proves nothing. This launcher
patches exactly that call before starting the server; `tests/standin_moto.rs` tests the correction on its own
against the API reference's semantics (DescribeImages returns what RegisterImage was given).

Usage: moto_launcher.py [moto_server arguments...]   (the same arguments as moto_server)
"""
import sys

from moto.ec2.models.amis import Ami
from moto.ec2.responses.amis import AmisResponse
from moto.server import main


def _mappings(resp):
    """RegisterImage's BlockDeviceMapping.N.* parameters as the API reference names them."""
    # moto 5 parses the query into the botocore shape's member names; an empty list is simply absent.
    parsed = resp._get_param("BlockDeviceMappings") or []
    out = []
    for m in parsed or []:
        ebs = m.get("Ebs") or {}
        entry = {"DeviceName": m.get("DeviceName")}
        if ebs:
            e = {}
            for k in ("SnapshotId", "VolumeSize", "VolumeType", "DeleteOnTermination", "Encrypted", "Iops",
                      "Throughput", "KmsKeyId"):
                if ebs.get(k) is not None:
                    e[k] = ebs[k]
            if "VolumeSize" in e:
                e["VolumeSize"] = int(e["VolumeSize"])
            if "DeleteOnTermination" in e:
                e["DeleteOnTermination"] = str(e["DeleteOnTermination"]).lower() == "true"
            entry["Ebs"] = e
        if m.get("VirtualName"):
            entry["VirtualName"] = m["VirtualName"]
        out.append(entry)
    return out


def register_image(self):
    name = self._get_param("Name")
    description = self._get_param("Description", "")
    self.error_on_dryrun()
    image = self.ec2_backend.register_image(name, description)
    # RegisterImage over existing snapshots makes no snapshot of its own: drop moto's made-up one.
    self.ec2_backend.snapshots.pop(image.ebs_snapshot.id, None)
    image.registered_mappings = _mappings(self)
    image.root_device_name = self._get_param("RootDeviceName") or image.root_device_name
    image.root_device_type = "ebs"
    image.architecture = self._get_param("Architecture") or "x86_64"
    image.virtualization_type = self._get_param("VirtualizationType") or "hvm"
    boot_mode = self._get_param("BootMode")
    # The reference: an AMI registered without a boot mode has none (the instance type decides).
    image.boot_mode = boot_mode
    ena = self._get_param("EnaSupport")
    image.ena_support = None if ena is None else str(ena).lower() == "true"
    tpm = self._get_param("TpmSupport")
    if tpm:
        image.tpm_support = tpm
    imds = self._get_param("ImdsSupport")
    if imds:
        image.imds_support = imds
    for spec in self._get_param("TagSpecifications", []) or []:
        if spec.get("ResourceType") == "image":
            for t in spec.get("Tags", []):
                image.add_tag(t["Key"], t["Value"])
    from moto.core.responses import ActionResult
    return ActionResult({"ImageId": image.id})


_stock_mappings = Ami.block_device_mappings


def block_device_mappings(self):
    registered = getattr(self, "registered_mappings", None)
    if registered is not None:
        return registered
    return _stock_mappings.fget(self)


AmisResponse.register_image = register_image
Ami.block_device_mappings = property(block_device_mappings)

if __name__ == "__main__":
    main(sys.argv[1:])
