//! EC2 side: wait for the snapshot, register the AMI, tag, wait for it to be available.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, ImageState,
    ImdsSupportValues, ResourceType, SnapshotState, Tag, TagSpecification, TpmSupportValues,
    VolumeType,
};

use super::retry::{self, Policy};

/// What the AMI should say about the guest.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// AMI name.
    pub name: String,
    /// AMI description.
    pub description: Option<String>,
    /// `x86_64` or `arm64`.
    pub architecture: String,
    /// `legacy-bios`, `uefi` or `uefi-preferred` (None: let EC2 decide).
    pub boot_mode: Option<String>,
    /// ENA networking.
    pub ena: bool,
    /// NitroTPM 2.0.
    pub tpm_v2: bool,
    /// Require IMDSv2.
    pub imds_v2_required: bool,
    /// Root volume type.
    pub volume_type: String,
    /// Root device name.
    pub root_device: String,
    /// Tags for the image and the snapshot.
    pub tags: Vec<(String, String)>,
}

/// Polls DescribeSnapshots until the snapshot is `completed` (or fails on `error`).
pub async fn wait_snapshot(
    ec2: &aws_sdk_ec2::Client,
    policy: &Policy,
    id: &str,
    limit: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let out = retry::with_retry(
            policy,
            "DescribeSnapshots",
            |_| {},
            || ec2.describe_snapshots().snapshot_ids(id).send(),
        )
        .await?;
        let state = out.snapshots().first().and_then(|s| s.state().cloned());
        match state {
            Some(SnapshotState::Completed) => return Ok(()),
            Some(SnapshotState::Error) => {
                bail!("snapshot {id} failed on the AWS side (state error)")
            }
            _ => {}
        }
        if start.elapsed() > limit {
            bail!("snapshot {id} is not completed after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn tags(list: &[(String, String)]) -> Vec<Tag> {
    list.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Device name of data disk `n` (1-based) next to the root device: `/dev/sdb`, `/dev/sdc`, ... (EC2's
/// recommended names for EBS data volumes).
pub fn data_device(n: usize) -> Option<String> {
    let letter = u8::try_from(n).ok().and_then(|n| b'a'.checked_add(n))?;
    (letter <= b'z').then(|| format!("/dev/sd{}", letter as char))
}

/// Registers the AMI with one block device mapping per snapshot: the first is the root device, the others are
/// data disks (`/dev/sdb`, ...). Tags the snapshots. Returns the AMI id.
pub async fn register_image_disks(
    ec2: &aws_sdk_ec2::Client,
    policy: &Policy,
    spec: &ImageSpec,
    snapshots: &[String],
) -> Result<String> {
    let arch = match spec.architecture.as_str() {
        "x86_64" => ArchitectureValues::X8664,
        "arm64" => ArchitectureValues::Arm64,
        other => bail!("unknown architecture {other} (x86_64 or arm64)"),
    };
    let mut mappings = Vec::new();
    for (i, snapshot_id) in snapshots.iter().enumerate() {
        let device = if i == 0 {
            spec.root_device.clone()
        } else {
            data_device(i).context("too many disks for one AMI")?
        };
        let ebs = EbsBlockDevice::builder()
            .snapshot_id(snapshot_id)
            .volume_type(VolumeType::from(spec.volume_type.as_str()))
            .delete_on_termination(true)
            .build();
        mappings.push(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(ebs)
                .build(),
        );
    }
    let out = retry::with_retry(
        policy,
        "RegisterImage",
        |_| {},
        || {
            let mut req = ec2
                .register_image()
                .name(&spec.name)
                .architecture(arch.clone())
                .root_device_name(&spec.root_device)
                .virtualization_type("hvm")
                .set_block_device_mappings(Some(mappings.clone()))
                .ena_support(spec.ena);
            if let Some(d) = &spec.description {
                req = req.description(d);
            }
            if let Some(b) = &spec.boot_mode {
                req = req.boot_mode(BootModeValues::from(b.as_str()));
            }
            if spec.tpm_v2 {
                req = req.tpm_support(TpmSupportValues::V20);
            }
            if spec.imds_v2_required {
                req = req.imds_support(ImdsSupportValues::V20);
            }
            if !spec.tags.is_empty() {
                req = req.tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Image)
                        .set_tags(Some(tags(&spec.tags)))
                        .build(),
                );
            }
            req.send()
        },
    )
    .await?;
    let ami = out
        .image_id()
        .context("RegisterImage returned no image id")?
        .to_string();
    if !spec.tags.is_empty() {
        retry::with_retry(
            policy,
            "CreateTags",
            |_| {},
            || {
                ec2.create_tags()
                    .set_resources(Some(snapshots.to_vec()))
                    .set_tags(Some(tags(&spec.tags)))
                    .send()
            },
        )
        .await?;
    }
    Ok(ami)
}

/// Polls DescribeImages until the AMI is `available`.
pub async fn wait_image(
    ec2: &aws_sdk_ec2::Client,
    policy: &Policy,
    id: &str,
    limit: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let out = retry::with_retry(
            policy,
            "DescribeImages",
            |_| {},
            || ec2.describe_images().image_ids(id).send(),
        )
        .await?;
        match out.images().first().and_then(|i| i.state().cloned()) {
            Some(ImageState::Available) => return Ok(()),
            Some(ImageState::Failed | ImageState::Invalid | ImageState::Error) => {
                bail!("image {id} failed to become available")
            }
            _ => {}
        }
        if start.elapsed() > limit {
            bail!("image {id} is not available after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
