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


# --- AMI lifecycle corrections (issue 25): kept in their own functions ----------------------------------------

_copies_by_token = {}


def copy_image_honouring_client_token_and_tags(self):
    """CopyImage as the EC2 API reference describes it, where stock moto differs:

    - ClientToken makes the call idempotent: the same token with the same parameters returns the AMI the first
      call made, and makes no second copy; the same token with other parameters fails with
      IdempotentParameterMismatch.
    - TagSpecifications tag the new AMI (ResourceType image) and its snapshots (ResourceType snapshot).
    - CopyImageTags=true copies the source AMI's user-defined tags to the copy.
    Stock moto ignores all three (a rerun makes a second copy, untagged).
    """
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import ec2_backends

    source_image_id = self._get_param("SourceImageId")
    source_region = self._get_param("SourceRegion")
    name = self._get_param("Name")
    description = self._get_param("Description")
    token = self._get_param("ClientToken")
    self.error_on_dryrun()
    params = (source_image_id, source_region, name, description)
    key = (self.current_account, self.region, token)
    if token and key in _copies_by_token:
        ami_id, first = _copies_by_token[key]
        if first != params:
            raise EC2ClientError(
                "IdempotentParameterMismatch",
                "The client token you have provided is associated with a resource that is already deleted or "
                "with different parameters.",
            )
        return ActionResult({"ImageId": ami_id})
    image = self.ec2_backend.copy_image(source_image_id, source_region, name, description)
    if token:
        _copies_by_token[key] = (image.id, params)
    if str(self._get_param("CopyImageTags", "false")).lower() == "true":
        source = ec2_backends[self.current_account][source_region].describe_images(ami_ids=[source_image_id])[0]
        for t in source.get_tags():
            if not t["key"].startswith("aws:"):
                image.add_tag(t["key"], t["value"])
    for spec in self._get_param("TagSpecifications", []) or []:
        kind = spec.get("ResourceType")
        for t in spec.get("Tags", []):
            if kind == "image":
                image.add_tag(t["Key"], t["Value"])
            elif kind == "snapshot":
                image.ebs_snapshot.add_tag(t["Key"], t["Value"])
    return ActionResult({"ImageId": image.id})


def describe_images_sees_amis_shared_by_other_accounts(self):
    """DescribeImages as the EC2 API reference describes it across accounts.

    "Images available to you include public images, private images that you own, and private images owned by
    other accounts for which you have explicit launch permissions." With ImageIds, only those (an image you
    cannot launch is left out); with Owners, those owners' images you can launch ('self' is you); with
    ExecutableUsers, images with an explicit launch permission for that account ('self' is you; 'all' is the
    public ones). Stock moto keeps each account (header x-moto-account-id) in its own backend and never
    returns another account's AMI, however it was shared. Only this call changes: another account still cannot
    modify or describe the attributes of an AMI it does not own.
    """
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import InvalidAMIIdError
    from moto.ec2.models import ec2_backends
    from moto.ec2.utils import generic_filter

    self.error_on_dryrun()
    ami_ids = self._get_param("ImageIds", [])
    filters = self._filters_from_querystring()
    owners = self._get_param("Owners", [])
    exec_users = self._get_param("ExecutableUsers", [])
    me = self.current_account
    mine = {"UserId": me}

    shared = []
    for account in list(dict.keys(ec2_backends)):
        if account == me:
            continue
        regional = dict.get(dict.__getitem__(ec2_backends, account), self.region)
        if regional is None:
            continue
        for ami in list(regional.amis.values()):
            if ami.is_public or mine in ami.launch_permissions:
                shared.append(ami)
    if ami_ids:
        shared = [a for a in shared if a.id in ami_ids]
    else:
        if exec_users:
            def launchable_by(ami, user):
                if user == "all":
                    return ami.is_public
                account = me if user == "self" else user
                return {"UserId": account} in ami.launch_permissions
            shared = [a for a in shared if any(launchable_by(a, u) for u in exec_users)]
        if owners:
            wanted = [me if o == "self" else o for o in owners]
            shared = [a for a in shared if a.owner_id in wanted or a.owner_alias in wanted]
        if filters:
            shared = list(generic_filter(filters, shared))
    try:
        own = self.ec2_backend.describe_images(
            ami_ids=ami_ids, filters=filters, exec_users=exec_users, owners=owners
        )
    except InvalidAMIIdError:
        if not shared:
            raise
        own = []
    return ActionResult({"Images": list(own) + shared})


AmisResponse.copy_image = copy_image_honouring_client_token_and_tags
AmisResponse.describe_images = describe_images_sees_amis_shared_by_other_accounts

if __name__ == "__main__":
    main(sys.argv[1:])
