//! EBS snapshots and AMIs as sources (`aws:snap-...`, `aws:ami-...`): an AMI's EBS block device mappings, boot
//! disk first, each read as an [`EbsSnapshotSource`], with the facts the AMI carries (boot mode, architecture,
//! ENA) so another cloud can be told the same. Nothing is written on AWS and nothing locally.

use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::config::{self, AwsTarget as AwsConn};
use super::download::EbsSnapshotSource;
use super::retry::{self, Policy};

/// What an AMI says about its guest and disks.
#[derive(Debug, Clone, Default)]
pub struct ImageFacts {
    /// `(device name, snapshot id)` of each EBS mapping, the root device's first, then by device name.
    pub disks: Vec<(String, String)>,
    /// `legacy-bios`, `uefi`, `uefi-preferred`, or none registered.
    pub boot_mode: Option<String>,
    /// `x86_64`, `arm64`...
    pub architecture: Option<String>,
    /// Whether the AMI is marked ENA-capable.
    pub ena: Option<bool>,
}

/// A connection to EBS and EC2 for reading, with its own runtime.
pub struct AwsReader {
    rt: Arc<tokio::runtime::Runtime>,
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    policy: Policy,
    region: String,
}

impl AwsReader {
    /// Connects (credentials resolved once, before any request).
    pub fn connect(conn: &AwsConn, max_attempts: u32) -> Result<AwsReader> {
        let rt = Arc::new(crate::targets::runtime()?);
        let sdk = rt.block_on(config::load(conn));
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            bail!("no AWS region for the source: pass the region option or set AWS_REGION");
        };
        rt.block_on(config::check_credentials(&sdk))?;
        Ok(AwsReader {
            ebs: aws_sdk_ebs::Client::new(&sdk),
            ec2: aws_sdk_ec2::Client::new(&sdk),
            policy: Policy {
                max_attempts: max_attempts.max(1),
                ..Policy::default()
            },
            region,
            rt,
        })
    }

    /// Snapshot `id` as a disk source (its block list read now).
    pub fn snapshot(&self, id: &str) -> Result<EbsSnapshotSource> {
        let s = EbsSnapshotSource::open(
            self.rt.handle().clone(),
            self.ebs.clone(),
            self.policy,
            id,
        )
        .with_context(|| {
            format!(
                "cannot list the blocks of snapshot {id} in {} (an encrypted snapshot needs kms:Decrypt on its key)",
                self.region
            )
        })?;
        Ok(s.owning(Arc::clone(&self.rt)))
    }

    /// What AMI `id` maps and says about its guest.
    pub fn image(&self, id: &str) -> Result<ImageFacts> {
        let ec2 = self.ec2.clone();
        let out = self
            .rt
            .block_on(retry::with_retry(
                &self.policy,
                "DescribeImages",
                |_| {},
                || ec2.describe_images().image_ids(id).send(),
            ))
            .with_context(|| format!("cannot describe AMI {id} in {}", self.region))?;
        let Some(img) = out.images().first() else {
            bail!("no AMI {id} in {}", self.region);
        };
        let root = img.root_device_name().unwrap_or_default().to_string();
        let mut disks: Vec<(String, String)> = img
            .block_device_mappings()
            .iter()
            .filter_map(|m| {
                let snap = m.ebs()?.snapshot_id()?;
                Some((m.device_name()?.to_string(), snap.to_string()))
            })
            .collect();
        if disks.is_empty() {
            bail!("AMI {id} maps no EBS snapshot (instance-store AMIs cannot be read)");
        }
        disks.sort_by(|a, b| (a.0 != root, &a.0).cmp(&(b.0 != root, &b.0)));
        Ok(ImageFacts {
            disks,
            boot_mode: img.boot_mode().map(|b| b.as_str().to_string()),
            architecture: img.architecture().map(|a| a.as_str().to_string()),
            ena: img.ena_support(),
        })
    }
}
