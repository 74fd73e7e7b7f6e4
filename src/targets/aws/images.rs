//! After the AMI exists: list the AMIs imgshift made, share them (launch permissions and the snapshots' create
//! volume permissions), copy them to other regions, and delete them with their snapshots.
//!
//! imgshift's AMIs carry the tag [`JOB_TAG`] (the job that registered them) and [`SOURCE_TAG`] (the source disk);
//! copies carry [`COPY_OF_TAG`] (the AMI they were copied from). Every decision on a failure is made on the
//! service's error code ([`retry::CallError`]), never on its message.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{
    Filter, Image, ImageAttributeName, LaunchPermission, LaunchPermissionModifications,
    OperationType, PermissionGroup, ResourceType, SnapshotAttributeName, Tag, TagSpecification,
};
use serde::Serialize;

use super::config;
use super::register;
use super::retry::{self, Policy};

/// The job that registered an AMI (on the AMI and its snapshots).
pub const JOB_TAG: &str = "imgshift:job";
/// The source disk an AMI was made from.
pub const SOURCE_TAG: &str = "imgshift:source";
/// On a copy: the AMI it was copied from.
pub const COPY_OF_TAG: &str = "imgshift:copy-of";
/// On a copy: the region of the AMI it was copied from.
pub const COPY_REGION_TAG: &str = "imgshift:copied-from-region";

/// Longest EC2 tag value.
const TAG_VALUE_MAX: usize = 256;
/// How long to wait for a copy to become available.
const COPY_WAIT: Duration = Duration::from_secs(3 * 3600);
/// How long a snapshot may still be "in use" just after its AMI was deregistered.
const IN_USE_GRACE: Duration = Duration::from_secs(60);

/// The tags imgshift adds to an AMI it registers for job `job` from `source` (those not already in `given`).
pub fn origin_tags(
    job: &str,
    source: Option<&str>,
    given: &[(String, String)],
) -> Vec<(String, String)> {
    let has = |k: &str| given.iter().any(|(g, _)| g == k);
    let mut out = Vec::new();
    if !has(JOB_TAG) {
        out.push((JOB_TAG.to_string(), clip(job)));
    }
    if let Some(s) = source
        && !has(SOURCE_TAG)
    {
        out.push((SOURCE_TAG.to_string(), clip(s)));
    }
    out
}

fn clip(v: &str) -> String {
    v.chars().take(TAG_VALUE_MAX).collect()
}

/// One AMI as `images list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// AMI id.
    pub image_id: String,
    /// AMI name.
    pub name: String,
    /// Region it lives in.
    pub region: String,
    /// EC2 state (`available`, `pending`...).
    pub state: String,
    /// Its EBS snapshots, in block device mapping order.
    pub snapshot_ids: Vec<String>,
    /// Whether any of its EBS volumes is encrypted.
    pub encrypted: bool,
    /// Launchable by everyone.
    pub public: bool,
    /// Who may launch it: account ids, `all`, organization and OU ARNs.
    pub launch_permissions: Vec<String>,
    /// The job that made it (tag `imgshift:job`).
    pub job: Option<String>,
    /// The AMI it was copied from (tag `imgshift:copy-of`).
    pub copy_of: Option<String>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// What `images delete` removes and keeps.
#[derive(Debug, Clone, Serialize)]
pub struct DeletePlan {
    /// The AMI to deregister.
    pub image_id: String,
    /// Its name.
    pub name: String,
    /// Region.
    pub region: String,
    /// Snapshots deleted after the AMI.
    pub delete_snapshots: Vec<String>,
    /// Snapshots kept because another AMI still maps them.
    pub kept_snapshots: Vec<KeptSnapshot>,
}

/// A snapshot kept, and the AMIs still using it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptSnapshot {
    /// Snapshot id.
    pub snapshot_id: String,
    /// The other AMIs mapping it.
    pub used_by: Vec<String>,
}

/// Whom to share with (or stop sharing with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantees {
    /// AWS account ids (12 digits).
    Accounts(Vec<String>),
    /// An AWS Organizations organization ARN.
    Org(String),
    /// An organizational unit ARN.
    Ou(String),
    /// Everyone (group `all`).
    Public,
}

/// What a share or unshare did.
#[derive(Debug, Clone, Serialize)]
pub struct ShareOutcome {
    /// The AMI.
    pub image_id: String,
    /// Region.
    pub region: String,
    /// Launch permissions after the change.
    pub launch_permissions: Vec<String>,
    /// Snapshots whose create-volume permission changed.
    pub snapshot_ids: Vec<String>,
    /// What was done and what the other side needs, one line each.
    pub notes: Vec<String>,
}

/// Settings of `images copy`.
#[derive(Debug, Clone, Default)]
pub struct CopySettings {
    /// Destination regions.
    pub regions: Vec<String>,
    /// Encrypt the copies' snapshots.
    pub encrypted: bool,
    /// KMS key for the copies (implies `encrypted`).
    pub kms_key_id: Option<String>,
}

/// One copy.
#[derive(Debug, Clone, Serialize)]
pub struct CopyOutcome {
    /// Destination region.
    pub region: String,
    /// The copy's AMI id.
    pub image_id: String,
    /// Whether this run made it (false: an earlier run had).
    pub created: bool,
}

/// What a copy tells its caller: lines to show, and each copy's region before CopyImage is called and its AMI
/// once known (a job records them for `resume` and `jobs cancel`).
pub trait CopyHooks {
    /// A line saying what happened.
    fn say(&mut self, msg: &str);
    /// CopyImage is about to be called for `region`.
    fn before_copy(&mut self, _region: &str) -> Result<()> {
        Ok(())
    }
    /// The copy in `region` is `image` (made now or by an earlier run).
    fn copied(&mut self, _region: &str, _image: &str) -> Result<()> {
        Ok(())
    }
}

/// Hooks that only show the lines.
struct SayOnly<F: FnMut(&str)>(F);

impl<F: FnMut(&str)> CopyHooks for SayOnly<F> {
    fn say(&mut self, msg: &str) {
        (self.0)(msg)
    }
}

/// A connection to EC2 in one region.
pub struct AwsImages {
    pub(super) rt: tokio::runtime::Runtime,
    sdk: aws_config::SdkConfig,
    pub(super) ec2: aws_sdk_ec2::Client,
    region: String,
    pub(super) policy: Policy,
}

fn tags_of(list: &[Tag]) -> BTreeMap<String, String> {
    list.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

fn snapshots_of(img: &Image) -> Vec<String> {
    img.block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
        .collect()
}

fn permission_label(p: &LaunchPermission) -> Option<String> {
    if let Some(u) = p.user_id() {
        return Some(u.to_string());
    }
    if let Some(g) = p.group() {
        return Some(g.as_str().to_string());
    }
    if let Some(o) = p.organization_arn() {
        return Some(o.to_string());
    }
    p.organizational_unit_arn().map(str::to_string)
}

/// Whether `e` is an EC2 error with one of `codes`.
pub(super) fn has_code(e: &anyhow::Error, codes: &[&str]) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<retry::CallError>())
        .any(|c| c.code.as_deref().is_some_and(|code| codes.contains(&code)))
}

fn ec2_tags(list: &[(String, String)]) -> Vec<Tag> {
    list.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

impl AwsImages {
    /// Connects (credentials checked once, before any request).
    pub fn connect(conn: &config::AwsTarget, max_attempts: u32) -> Result<AwsImages> {
        let rt = crate::targets::runtime()?;
        let sdk = rt.block_on(config::load(conn));
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            bail!("no AWS region: pass --region or set AWS_REGION");
        };
        rt.block_on(config::check_credentials(&sdk))?;
        Ok(AwsImages {
            ec2: aws_sdk_ec2::Client::new(&sdk),
            rt,
            sdk,
            region,
            policy: Policy {
                max_attempts: max_attempts.max(1),
                ..Policy::default()
            },
        })
    }

    /// The region this connection talks to.
    pub fn region(&self) -> &str {
        &self.region
    }

    fn client_in(&self, region: &str) -> aws_sdk_ec2::Client {
        let conf = aws_sdk_ec2::config::Builder::from(&self.sdk)
            .region(aws_config::Region::new(region.to_string()))
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }

    /// Every AMI this account owns in `ec2`'s region that matches `filters`.
    fn owned_images(&self, ec2: &aws_sdk_ec2::Client, filters: &[Filter]) -> Result<Vec<Image>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.rt.block_on(retry::with_retry(
                &self.policy,
                "DescribeImages",
                |_| {},
                || {
                    ec2.describe_images()
                        .owners("self")
                        .set_filters((!filters.is_empty()).then(|| filters.to_vec()))
                        .set_next_token(token.clone())
                        .send()
                },
            ))?;
            out.extend(page.images().iter().cloned());
            match page.next_token() {
                Some(t) if !t.is_empty() && token.as_deref() != Some(t) => {
                    token = Some(t.to_string())
                }
                _ => return Ok(out),
            }
        }
    }

    /// The AMI `id` (which must exist in this region).
    fn image(&self, id: &str) -> Result<Image> {
        let res = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DescribeImages",
            |_| {},
            || self.ec2.describe_images().image_ids(id).send(),
        ));
        let out = match res {
            Ok(o) => o,
            Err(e) if has_code(&e, &["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"]) => {
                bail!("no AMI {id} in region {}", self.region)
            }
            Err(e) if has_code(&e, &["InvalidAMIID.Malformed"]) => {
                bail!("'{id}' is not an AMI id (ami-...)")
            }
            Err(e) => return Err(e.context(format!("cannot describe AMI {id}"))),
        };
        out.images()
            .iter()
            .find(|i| i.image_id() == Some(id))
            .cloned()
            .with_context(|| format!("no AMI {id} in region {}", self.region))
    }

    fn launch_permissions(&self, id: &str) -> Result<Vec<String>> {
        let out = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DescribeImageAttribute",
            |_| {},
            || {
                self.ec2
                    .describe_image_attribute()
                    .image_id(id)
                    .attribute(ImageAttributeName::LaunchPermission)
                    .send()
            },
        ))?;
        Ok(out
            .launch_permissions()
            .iter()
            .filter_map(permission_label)
            .collect())
    }

    /// The AMIs in this region tagged as copies of `source` ([`COPY_OF_TAG`]).
    pub fn copies_of(&self, source: &str) -> Result<Vec<String>> {
        let f = Filter::builder()
            .name(format!("tag:{COPY_OF_TAG}"))
            .values(source)
            .build();
        Ok(self
            .owned_images(&self.ec2, &[f])?
            .iter()
            .filter_map(|i| i.image_id().map(str::to_string))
            .collect())
    }

    /// Whether AMI `id` is registered in this region (deregistered or unknown: false).
    pub fn exists(&self, id: &str) -> Result<bool> {
        self.still_there(id)
    }

    /// Whether AMI `id` is still registered here.
    fn still_there(&self, id: &str) -> Result<bool> {
        let res = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DescribeImages",
            |_| {},
            || self.ec2.describe_images().image_ids(id).send(),
        ));
        match res {
            Ok(o) => Ok(o.images().iter().any(|i| {
                i.image_id() == Some(id) && i.state().is_some_and(|s| s.as_str() != "deregistered")
            })),
            Err(e) if has_code(&e, &["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"]) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The AMI as listed; `None` when it was deregistered while being listed.
    fn info(&self, img: &Image) -> Result<Option<ImageInfo>> {
        let id = img
            .image_id()
            .context("DescribeImages returned an image without an id")?;
        let launch_permissions = match self.launch_permissions(id) {
            Ok(p) => p,
            // Gone since DescribeImages (decided by asking again, not by the failure's text)?
            Err(e) => {
                if self.still_there(id)? {
                    return Err(
                        e.context(format!("cannot read the launch permissions of AMI {id}"))
                    );
                }
                return Ok(None);
            }
        };
        let tags = tags_of(img.tags());
        Ok(Some(ImageInfo {
            image_id: id.to_string(),
            name: img.name().unwrap_or("").to_string(),
            region: self.region.clone(),
            state: img
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            snapshot_ids: snapshots_of(img),
            encrypted: img
                .block_device_mappings()
                .iter()
                .any(|m| m.ebs().and_then(|e| e.encrypted()) == Some(true)),
            public: img.public() == Some(true),
            launch_permissions,
            job: tags.get(JOB_TAG).cloned(),
            copy_of: tags.get(COPY_OF_TAG).cloned(),
            tags,
        }))
    }

    /// The AMIs imgshift made in this region (tagged [`JOB_TAG`] or [`COPY_OF_TAG`]); with `all`, every AMI the
    /// account owns here.
    pub fn list(&self, all: bool) -> Result<Vec<ImageInfo>> {
        let images = if all {
            self.owned_images(&self.ec2, &[])?
        } else {
            let mut found = Vec::new();
            for key in [JOB_TAG, COPY_OF_TAG] {
                let f = Filter::builder().name("tag-key").values(key).build();
                for img in self.owned_images(&self.ec2, &[f])? {
                    if !found.iter().any(|i: &Image| i.image_id() == img.image_id()) {
                        found.push(img);
                    }
                }
            }
            found
        };
        let mut out = Vec::new();
        for i in &images {
            out.extend(self.info(i)?);
        }
        out.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| a.image_id.cmp(&b.image_id))
        });
        Ok(out)
    }

    /// What deleting `id` removes: the AMI, and each of its snapshots no other AMI of this account maps.
    pub fn delete_plan(&self, id: &str) -> Result<DeletePlan> {
        let img = self.image(id)?;
        let snapshots = snapshots_of(&img);
        let others = self.owned_images(&self.ec2, &[])?;
        let mut delete = Vec::new();
        let mut kept = Vec::new();
        for s in snapshots {
            let used_by: Vec<String> = others
                .iter()
                .filter(|o| o.image_id() != Some(id) && snapshots_of(o).contains(&s))
                .filter_map(|o| o.image_id().map(str::to_string))
                .collect();
            if used_by.is_empty() {
                if !delete.contains(&s) {
                    delete.push(s);
                }
            } else {
                kept.push(KeptSnapshot {
                    snapshot_id: s,
                    used_by,
                });
            }
        }
        Ok(DeletePlan {
            image_id: id.to_string(),
            name: img.name().unwrap_or("").to_string(),
            region: self.region.clone(),
            delete_snapshots: delete,
            kept_snapshots: kept,
        })
    }

    /// Deregisters the AMI, then deletes the planned snapshots (already gone is fine); returns what was done.
    pub fn delete(&self, plan: &DeletePlan) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let res = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DeregisterImage",
            |_| {},
            || self.ec2.deregister_image().image_id(&plan.image_id).send(),
        ));
        match res {
            Ok(_) => done.push(format!("deregistered AMI {}", plan.image_id)),
            Err(e) if has_code(&e, &["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"]) => {
                done.push(format!("AMI {} was already deregistered", plan.image_id))
            }
            Err(e) => return Err(e.context(format!("cannot deregister AMI {}", plan.image_id))),
        }
        for s in &plan.delete_snapshots {
            let started = std::time::Instant::now();
            loop {
                let res = self.rt.block_on(retry::with_retry(
                    &self.policy,
                    "DeleteSnapshot",
                    |_| {},
                    || self.ec2.delete_snapshot().snapshot_id(s).send(),
                ));
                match res {
                    Ok(_) => done.push(format!("deleted snapshot {s}")),
                    Err(e) if has_code(&e, &["InvalidSnapshot.NotFound"]) => {
                        done.push(format!("snapshot {s} was already gone"))
                    }
                    // Just after DeregisterImage the snapshot can still count as in use for a moment.
                    Err(e)
                        if has_code(&e, &["InvalidSnapshot.InUse"])
                            && started.elapsed() < IN_USE_GRACE =>
                    {
                        std::thread::sleep(Duration::from_secs(2));
                        continue;
                    }
                    Err(e) => {
                        return Err(e.context(format!(
                            "deregistered AMI {} but cannot delete snapshot {s} (delete it with `aws ec2 \
                             delete-snapshot --snapshot-id {s} --region {}`)",
                            plan.image_id, self.region
                        )));
                    }
                }
                break;
            }
        }
        for k in &plan.kept_snapshots {
            done.push(format!(
                "kept snapshot {}: still used by {}",
                k.snapshot_id,
                k.used_by.join(", ")
            ));
        }
        Ok(done)
    }

    /// The KMS key of each encrypted snapshot (None: encrypted with no key id reported).
    fn snapshot_keys(&self, snapshots: &[String]) -> Result<Vec<(String, Option<String>)>> {
        if snapshots.is_empty() {
            return Ok(Vec::new());
        }
        let out = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DescribeSnapshots",
            |_| {},
            || {
                self.ec2
                    .describe_snapshots()
                    .set_snapshot_ids(Some(snapshots.to_vec()))
                    .send()
            },
        ))?;
        Ok(out
            .snapshots()
            .iter()
            .filter(|s| s.encrypted() == Some(true))
            .filter_map(|s| {
                Some((
                    s.snapshot_id()?.to_string(),
                    s.kms_key_id().map(str::to_string),
                ))
            })
            .collect())
    }

    /// Whether image block public access is on in this region (GetImageBlockPublicAccessState).
    fn public_sharing_blocked(&self) -> Result<Option<String>> {
        let out = self
            .rt
            .block_on(retry::with_retry(
                &self.policy,
                "GetImageBlockPublicAccessState",
                |_| {},
                || self.ec2.get_image_block_public_access_state().send(),
            ))
            .with_context(|| {
                format!(
                    "cannot check the account's image block public access state in {} (needed before making \
                     an AMI public)",
                    self.region
                )
            })?;
        Ok(match out.image_block_public_access_state() {
            Some("unblocked") => None,
            Some(other) => Some(other.to_string()),
            None => Some("unknown".to_string()),
        })
    }

    /// Adds (`add`) or removes launch permissions on the AMI for `who`, and for accounts the create-volume
    /// permission on its snapshots.
    pub fn share(&self, id: &str, who: &Grantees, add: bool) -> Result<ShareOutcome> {
        let img = self.image(id)?;
        let snapshots = snapshots_of(&img);
        let mut notes = Vec::new();
        if add
            && *who == Grantees::Public
            && let Some(state) = self.public_sharing_blocked()?
        {
            bail!(
                "image block public access is on for this account in {r} (state {state}): AWS refuses to \
                     make any AMI public while it is; turn it off with `aws ec2 disable-image-block-public-access \
                     --region {r}` (it can take up to 10 minutes to apply), then share again",
                r = self.region
            );
        }
        let keys = if add {
            self.snapshot_keys(&snapshots)?
        } else {
            Vec::new()
        };
        if add && !keys.is_empty() {
            if *who == Grantees::Public {
                bail!(
                    "AMI {id} is encrypted: an encrypted AMI cannot be made public (share it with accounts instead)"
                );
            }
            let default: Vec<&str> = keys
                .iter()
                .filter(|(_, k)| k.as_deref().is_none_or(|k| k.ends_with("alias/aws/ebs")))
                .map(|(s, _)| s.as_str())
                .collect();
            if !default.is_empty() {
                bail!(
                    "AMI {id} is encrypted with the default EBS key (aws/ebs, snapshot {}), an AWS managed key \
                     that cannot be shared with another account: copy the AMI with a customer managed key \
                     (`imgshift images copy {id} --on aws --to-regions {} --kms-key-id KEY`), give the other \
                     account a grant on KEY (kms:Decrypt, kms:DescribeKey, kms:CreateGrant, \
                     kms:GenerateDataKeyWithoutPlaintext, kms:ReEncrypt*) and share the copy",
                    default.join(", "),
                    self.region
                );
            }
            let mut ks: Vec<&str> = keys.iter().filter_map(|(_, k)| k.as_deref()).collect();
            ks.sort_unstable();
            ks.dedup();
            let whom = match who {
                Grantees::Accounts(a) => format!("account(s) {}", a.join(", ")),
                Grantees::Org(a) | Grantees::Ou(a) => format!("the accounts of {a}"),
                Grantees::Public => "everyone".to_string(),
            };
            for k in ks {
                notes.push(format!(
                    "the AMI is encrypted with KMS key {k}: {whom} need kms:Decrypt, kms:DescribeKey, \
                     kms:CreateGrant, kms:GenerateDataKeyWithoutPlaintext and kms:ReEncrypt* on it (a key policy \
                     statement, or `aws kms create-grant`) to launch it"
                ));
            }
        }
        let perms: Vec<LaunchPermission> = match who {
            Grantees::Accounts(a) => a
                .iter()
                .map(|u| LaunchPermission::builder().user_id(u).build())
                .collect(),
            Grantees::Org(arn) => vec![LaunchPermission::builder().organization_arn(arn).build()],
            Grantees::Ou(arn) => vec![
                LaunchPermission::builder()
                    .organizational_unit_arn(arn)
                    .build(),
            ],
            Grantees::Public => vec![
                LaunchPermission::builder()
                    .group(PermissionGroup::All)
                    .build(),
            ],
        };
        let mods = if add {
            LaunchPermissionModifications::builder()
                .set_add(Some(perms))
                .build()
        } else {
            LaunchPermissionModifications::builder()
                .set_remove(Some(perms))
                .build()
        };
        self.rt
            .block_on(retry::with_retry(
                &self.policy,
                "ModifyImageAttribute",
                |_| {},
                || {
                    self.ec2
                        .modify_image_attribute()
                        .image_id(id)
                        .launch_permission(mods.clone())
                        .send()
                },
            ))
            .with_context(|| format!("cannot change the launch permissions of AMI {id}"))?;
        let verb = if add { "shared" } else { "stopped sharing" };
        let mut changed = Vec::new();
        match who {
            Grantees::Accounts(a) => {
                notes.push(format!("{verb} AMI {id} with account(s) {}", a.join(", ")));
                // The OperationType + UserIds form of the call (as documented beside CreateVolumePermission):
                // the same effect, and the form every EC2 implementation accepts.
                let op = if add {
                    OperationType::Add
                } else {
                    OperationType::Remove
                };
                for s in &snapshots {
                    self.rt
                        .block_on(retry::with_retry(
                            &self.policy,
                            "ModifySnapshotAttribute",
                            |_| {},
                            || {
                                self.ec2
                                    .modify_snapshot_attribute()
                                    .snapshot_id(s)
                                    .attribute(SnapshotAttributeName::CreateVolumePermission)
                                    .operation_type(op.clone())
                                    .set_user_ids(Some(a.clone()))
                                    .send()
                            },
                        ))
                        .with_context(|| {
                            format!("cannot change the create-volume permission of snapshot {s}")
                        })?;
                    notes.push(format!(
                        "{} create-volume permission on snapshot {s}",
                        if add { "granted" } else { "removed" }
                    ));
                    changed.push(s.clone());
                }
            }
            Grantees::Org(arn) | Grantees::Ou(arn) => {
                notes.push(format!("{verb} AMI {id} with {arn}"));
                notes.push(
                    "its snapshots stay private: launching an AMI shared with an organization or OU needs no \
                     snapshot permission"
                        .to_string(),
                );
            }
            Grantees::Public => {
                notes.push(format!(
                    "{} AMI {id} {}",
                    if add { "made" } else { "no longer" },
                    "public"
                ));
                if add {
                    notes.push(
                        "its snapshots stay private: launching a public AMI needs no snapshot permission"
                            .to_string(),
                    );
                }
            }
        }
        Ok(ShareOutcome {
            image_id: id.to_string(),
            region: self.region.clone(),
            launch_permissions: self.launch_permissions(id)?,
            snapshot_ids: changed,
            notes,
        })
    }

    /// The idempotency token of the copy of `source` into `region` (at most 64 ASCII characters).
    pub fn copy_token(source: &str, region: &str) -> String {
        let t = format!("imgshift-copy-{source}-{region}");
        t.chars().take(64).collect()
    }

    /// Copies the AMI to each region (CopyImage with a token derived from the AMI and the region; a copy an
    /// earlier run made, found by its [`COPY_OF_TAG`], is reused), waits until each is available, and tags it
    /// (the source's tags, plus where it came from).
    pub fn copy(
        &self,
        id: &str,
        s: &CopySettings,
        say: impl FnMut(&str),
    ) -> Result<Vec<CopyOutcome>> {
        self.copy_with(id, s, &mut SayOnly(say))
    }

    /// [`AwsImages::copy`], telling `hooks` before each CopyImage call and after it returned (for a journal).
    pub fn copy_with(
        &self,
        id: &str,
        s: &CopySettings,
        hooks: &mut dyn CopyHooks,
    ) -> Result<Vec<CopyOutcome>> {
        let img = self.image(id)?;
        let name = img.name().unwrap_or(id).to_string();
        let mut tags: Vec<(String, String)> = tags_of(img.tags())
            .into_iter()
            .filter(|(k, _)| !k.starts_with("aws:") && k != COPY_OF_TAG && k != COPY_REGION_TAG)
            .collect();
        tags.push((COPY_OF_TAG.to_string(), id.to_string()));
        tags.push((COPY_REGION_TAG.to_string(), self.region.clone()));
        let encrypted = s.encrypted || s.kms_key_id.is_some();
        let mut out = Vec::new();
        for region in &s.regions {
            let ec2 = self.client_in(region);
            let f = Filter::builder()
                .name(format!("tag:{COPY_OF_TAG}"))
                .values(id)
                .build();
            let existing = self
                .owned_images(&ec2, &[f])
                .with_context(|| format!("cannot look for an earlier copy in {region}"))?
                .into_iter()
                .find_map(|i| i.image_id().map(str::to_string));
            let (copy, created) = match existing {
                Some(c) => {
                    hooks.say(&format!("{region}: {c} is already a copy of {id}"));
                    hooks.copied(region, &c)?;
                    (c, false)
                }
                None => {
                    hooks.before_copy(region)?;
                    let token = Self::copy_token(id, region);
                    let spec = TagSpecification::builder()
                        .resource_type(ResourceType::Image)
                        .set_tags(Some(ec2_tags(&tags)))
                        .build();
                    let res = self
                        .rt
                        .block_on(retry::with_retry(
                            &self.policy,
                            "CopyImage",
                            |_| {},
                            || {
                                let mut req = ec2
                                    .copy_image()
                                    .source_image_id(id)
                                    .source_region(&self.region)
                                    .name(&name)
                                    .client_token(&token)
                                    .copy_image_tags(true)
                                    .tag_specifications(spec.clone());
                                if let Some(d) = img.description() {
                                    req = req.description(d);
                                }
                                if encrypted {
                                    req = req.encrypted(true);
                                }
                                if let Some(k) = &s.kms_key_id {
                                    req = req.kms_key_id(k);
                                }
                                req.send()
                            },
                        ))
                        .with_context(|| format!("cannot copy AMI {id} to {region}"))?;
                    let c = res
                        .image_id()
                        .with_context(|| format!("CopyImage to {region} returned no image id"))?
                        .to_string();
                    hooks.say(&format!("{region}: copying {id} as {c}"));
                    hooks.copied(region, &c)?;
                    (c, true)
                }
            };
            self.rt
                .block_on(register::wait_image(&ec2, &self.policy, &copy, COPY_WAIT))
                .with_context(|| format!("copy {copy} in {region}"))?;
            // The tags again, on the copy and its snapshots: CopyImage's tag parameters are newer than some
            // endpoints, and the copy's snapshots get none from them.
            let described = self.rt.block_on(retry::with_retry(
                &self.policy,
                "DescribeImages",
                |_| {},
                || ec2.describe_images().image_ids(&copy).send(),
            ))?;
            let mut resources = vec![copy.clone()];
            if let Some(i) = described.images().first() {
                resources.extend(snapshots_of(i));
            }
            self.rt
                .block_on(retry::with_retry(
                    &self.policy,
                    "CreateTags",
                    |_| {},
                    || {
                        ec2.create_tags()
                            .set_resources(Some(resources.clone()))
                            .set_tags(Some(ec2_tags(&tags)))
                            .send()
                    },
                ))
                .with_context(|| format!("cannot tag copy {copy} in {region}"))?;
            hooks.say(&format!("{region}: {copy} available and tagged"));
            out.push(CopyOutcome {
                region: region.clone(),
                image_id: copy,
                created,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_tags_are_added_once() {
        let given = vec![("team".to_string(), "x".to_string())];
        let t = origin_tags("migrate-1", Some("web01.vmdk"), &given);
        assert_eq!(
            t,
            vec![
                (JOB_TAG.to_string(), "migrate-1".to_string()),
                (SOURCE_TAG.to_string(), "web01.vmdk".to_string())
            ]
        );
        let given = vec![(JOB_TAG.to_string(), "mine".to_string())];
        assert_eq!(origin_tags("j", None, &given), vec![]);
        let long = "a".repeat(300);
        assert_eq!(origin_tags("j", Some(&long), &[])[1].1.len(), TAG_VALUE_MAX);
    }

    #[test]
    fn copy_tokens_fit_and_differ_by_region() {
        let a = AwsImages::copy_token("ami-0123456789abcdef0", "us-west-2");
        let b = AwsImages::copy_token("ami-0123456789abcdef0", "eu-west-1");
        assert_ne!(a, b);
        assert!(a.len() <= 64);
        assert_eq!(
            a,
            AwsImages::copy_token("ami-0123456789abcdef0", "us-west-2")
        );
    }
}
