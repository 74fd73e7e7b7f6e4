#!/usr/bin/env python3
"""Starts moto's server with its EC2 RegisterImage corrected to follow the EC2 API reference.

Stock moto (5.x) keeps only Name and Description of a RegisterImage call: the block device mappings, the root
device name, the boot mode, the architecture and the ENA flag are dropped, and a made-up 15 GiB snapshot is
attached instead (shared/notes/cross-cloud.md section 4). imgshift reads AMIs as sources (`aws:ami-...`: every
EBS mapping, boot disk first, with its boot mode), so a stand-in that forgets them proves nothing. This launcher
patches exactly that call before starting the server; `tests/standin_moto.rs` tests the correction on its own
against the API reference's semantics (DescribeImages returns what RegisterImage was given).

Its EBS direct model is corrected too (`fix_ebs_lineage`, below): incremental snapshots (StartSnapshot with
ParentSnapshotId), ListChangedBlocks over both snapshots with pagination and the lineage check, the real 512 KiB
BlockSize, and pending/completed states seen by EC2 DescribeSnapshots; `tests/standin_moto.rs` tests each of these
on its own against the EBS direct API reference.

For the AMI lifecycle (`imgshift images`, the copy/share stages), two EC2 calls follow the reference too
(`copy_image_honouring_client_token_and_tags`, `describe_images_sees_amis_shared_by_other_accounts`, below):
CopyImage keeps its ClientToken, TagSpecifications and CopyImageTags, and DescribeImages shows an AMI shared with
another account (header x-moto-account-id) to that account; each has its own test in `tests/standin_moto.rs`.

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


def fix_ebs_lineage():
    """Corrects moto's EBS direct model where incremental snapshots need it (EBS API reference,
    https://docs.aws.amazon.com/ebs/latest/APIReference/ : StartSnapshot, ListChangedBlocks, ListSnapshotBlocks,
    ValidationException, ResourceNotFoundException). Stock moto (5.2) ignores ParentSnapshotId, walks only the first
    snapshot's blocks in ListChangedBlocks, pages nothing, reports a BlockSize of 512, and shows a pending snapshot
    as completed to EC2 (shared/notes/cross-cloud.md section 4).

    - StartSnapshot(ParentSnapshotId=P): the new snapshot holds P's blocks plus what is put; an unknown P is
      ResourceNotFoundException (Reason DEPENDENCY_RESOURCE_NOT_FOUND); P together with Encrypted is a
      ValidationException (the reference: "You can't specify ParentSnapshotId and Encrypted in the same request").
      The child joins its parent's volume (lineage), so DescribeSnapshots(volume-id) lists a series of one volume.
    - ListChangedBlocks(First, Second): the union of both snapshots' block indices, in order, without the blocks
      whose data is identical; FirstBlockToken absent when the first snapshot lacks the block, SecondBlockToken
      absent when the second does; StartingBlockIndex, MaxResults (100..10000, default 10000) and NextToken (when
      given, StartingBlockIndex is ignored); snapshots of different lineages are ValidationException (Reason
      UNRELATED_SNAPSHOTS); an unknown snapshot is ResourceNotFoundException (SNAPSHOT_NOT_FOUND). Without
      FirstSnapshotId every block of the second is listed.
    - ListSnapshotBlocks: in block order with the same StartingBlockIndex/MaxResults/NextToken paging.
    - BlockSize is 524288 everywhere (the API's only block size).
    - EC2 sees the EBS state: pending from StartSnapshot until CompleteSnapshot.
    """
    import base64
    import datetime
    import json

    from moto.core.exceptions import ServiceException
    from moto.core.responses import ActionResult
    from moto.ebs.models import EBSBackend, EBSSnapshot, Block
    from moto.ebs.responses import EBSResponse

    block_size = 512 * 1024

    class EbsError(ServiceException):
        def __init__(self, code, reason, message):
            super().__init__(code, message)
            self.Reason = reason

    def validation(reason, message):
        return EbsError("ValidationException", reason, message)

    def not_found(reason, message):
        return EbsError("ResourceNotFoundException", reason, message)

    stock_init = EBSSnapshot.__init__

    def snapshot_init(self, account_id, snapshot):
        stock_init(self, account_id, snapshot)
        self.block_size = block_size
        self.lineage = self.snapshot_id
        self.parent_id = None
        self.ec2_snapshot = snapshot
        # EC2 shows a direct-API snapshot as pending until CompleteSnapshot.
        snapshot.status = "pending"

    EBSSnapshot.__init__ = snapshot_init

    def find(backend, snapshot_id):
        snap = backend.snapshots.get(snapshot_id)
        if snap is None:
            raise not_found("SNAPSHOT_NOT_FOUND", f"The snapshot '{snapshot_id}' does not exist.")
        return snap

    def start_snapshot(self):
        parent_id = self._get_param("ParentSnapshotId")
        backend = self.ebs_backend
        parent = None
        if parent_id:
            if self._get_param("Encrypted") is not None:
                raise validation("INVALID_PARAMETER_VALUE",
                                 "ParentSnapshotId and Encrypted cannot be specified in the same request.")
            parent = backend.snapshots.get(parent_id)
            if parent is None:
                raise not_found("DEPENDENCY_RESOURCE_NOT_FOUND",
                                f"The parent snapshot '{parent_id}' does not exist.")
        snap = backend.start_snapshot(
            volume_size=self._get_param("VolumeSize"),
            tags=self._get_param("Tags"),
            description=self._get_param("Description"),
        )
        if parent is not None:
            snap.lineage = parent.lineage
            snap.parent_id = parent.snapshot_id
            for idx, b in parent.blocks.items():
                snap.blocks[idx] = Block(b.block_data, b.checksum, b.checksum_algorithm, b.data_length)
            # The child belongs to its parent's volume: one lineage, one volume.
            ec2 = snap.ec2_snapshot
            ec2.volume = parent.ec2_snapshot.volume
        result = {
            "SnapshotId": snap.snapshot_id,
            "OwnerId": snap.account_id,
            "Status": snap.status,
            "StartTime": snap.start_time,
            "VolumeSize": snap.volume_size,
            "BlockSize": snap.block_size,
            "Tags": snap.tags,
            "Description": snap.description,
        }
        if parent is not None:
            result["ParentSnapshotId"] = parent.snapshot_id
        return ActionResult(result)

    stock_complete = EBSBackend.complete_snapshot

    def complete_snapshot(self, snapshot_id):
        find(self, snapshot_id)
        status = stock_complete(self, snapshot_id)
        self.snapshots[snapshot_id].ec2_snapshot.status = "completed"
        return status

    def paging(resp, key):
        """(first index, page size) from StartingBlockIndex/NextToken/MaxResults; `key` ties a token to its call."""
        max_results = resp._get_param("MaxResults")
        if max_results is None:
            max_results = 10000
        max_results = int(max_results)
        if not 100 <= max_results <= 10000:
            raise validation("INVALID_PARAMETER_VALUE", "MaxResults must be between 100 and 10000.")
        token = resp._get_param("NextToken")
        if token:
            try:
                t = json.loads(base64.b64decode(token))
                if t["k"] != key:
                    raise ValueError("token of another call")
                start = int(t["i"])
            except (ValueError, KeyError, TypeError):
                raise validation("INVALID_PAGE_TOKEN", "The pagination token is not valid.")
        else:
            start = int(resp._get_param("StartingBlockIndex") or 0)
        return start, max_results

    def page_out(key, indices, start, max_results):
        chosen = [i for i in indices if i >= start][: max_results + 1]
        more = len(chosen) > max_results
        chosen = chosen[:max_results]
        token = None
        if more:
            token = base64.b64encode(json.dumps({"k": key, "i": chosen[-1] + 1}).encode()).decode()
        return chosen, token

    def expiry():
        return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=7)

    def list_changed_blocks(self):
        backend = self.ebs_backend
        first_id = self._get_param("FirstSnapshotId")
        second = find(backend, self._get_param("SecondSnapshotId"))
        first = find(backend, first_id) if first_id else None
        if first is not None and first.lineage != second.lineage:
            raise validation("UNRELATED_SNAPSHOTS",
                             f"The snapshots '{first.snapshot_id}' and '{second.snapshot_id}' are not related.")
        key = f"{first_id or ''}/{second.snapshot_id}"
        start, max_results = paging(self, key)
        a = first.blocks if first is not None else {}
        b = second.blocks
        changed = sorted(
            i for i in set(a) | set(b)
            if not (i in a and i in b and a[i].block_data == b[i].block_data)
        )
        chosen, token = page_out(key, changed, start, max_results)
        blocks = []
        for i in chosen:
            entry = {"BlockIndex": i}
            if i in a:
                entry["FirstBlockToken"] = a[i].block_token
            if i in b:
                entry["SecondBlockToken"] = b[i].block_token
            blocks.append(entry)
        result = {
            "ChangedBlocks": blocks,
            "ExpiryTime": expiry(),
            "VolumeSize": second.volume_size,
            "BlockSize": second.block_size,
        }
        if token:
            result["NextToken"] = token
        return ActionResult(result)

    def list_snapshot_blocks(self):
        snap = find(self.ebs_backend, self._get_param("SnapshotId"))
        key = snap.snapshot_id
        start, max_results = paging(self, key)
        chosen, token = page_out(key, sorted(snap.blocks), start, max_results)
        result = {
            "Blocks": [{"BlockIndex": i, "BlockToken": snap.blocks[i].block_token} for i in chosen],
            "ExpiryTime": expiry(),
            "VolumeSize": snap.volume_size,
            "BlockSize": snap.block_size,
        }
        if token:
            result["NextToken"] = token
        return ActionResult(result)

    EBSResponse.start_snapshot = start_snapshot
    EBSResponse.list_changed_blocks = list_changed_blocks
    EBSResponse.list_snapshot_blocks = list_snapshot_blocks
    EBSBackend.complete_snapshot = complete_snapshot


fix_ebs_lineage()

if __name__ == "__main__":
    main(sys.argv[1:])
