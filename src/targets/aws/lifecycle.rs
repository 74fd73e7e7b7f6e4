//! The AWS lifecycle of a job (`migrate --to aws`, `upload aws`, `resume`, `jobs cancel`): one EBS snapshot per disk (EBS direct APIs, resumable per 512 KiB block), one AMI with a
//! block device mapping per snapshot (root first, then `/dev/sdb`, ...), verified by listing each snapshot's
//! blocks and reading sampled ranges back (every block's SHA-256 checked).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{Filter, SnapshotState};
use imgshift_converters::{DiskSource, ExtentMap};
use serde_json::json;

use super::after::{self, AfterSettings, AmiFacts};
use super::download::EbsSnapshotSource;
use super::register::{self, ImageSpec};
use super::retry::{self, Policy};
use super::upload::{self as up, UploaderOptions};
use super::{EBS_BLOCK_SIZE, config, volume_gib};
use crate::job::{DiskInfo, Job, Target, UploadStats, map_disk, verify};
use crate::journal::{DiskKey, JobKey, Resource};
use crate::progress::{Bar, human_size};

/// How long to wait for a snapshot to complete or the AMI to become available.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);
/// Default requests in flight.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Most requests in flight.
pub const MAX_CONCURRENCY: usize = 1024;
/// Most disks one AMI maps (root + `/dev/sdb` ... `/dev/sdz`).
const MAX_DISKS: usize = 26;

/// Connected clients.
struct Clients {
    rt: tokio::runtime::Runtime,
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    region: String,
}

/// What an AWS job makes, and how it reaches AWS: the target's own settings (the command line maps its flags
/// to these).
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Region, profile, endpoint.
    pub conn: config::AwsTarget,
    /// Attempts per request for retryable failures.
    pub max_attempts: u32,
    /// Requests in flight per disk (at most [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// Encrypt the snapshots (with `kms_key_id`, or the account's default EBS key).
    pub encrypted: bool,
    /// KMS key for encrypted snapshots.
    pub kms_key_id: Option<String>,
    /// The AMI to register over the snapshots; `None` makes snapshots only.
    pub image: Option<ImageSpec>,
    /// Description of each snapshot (default: the job and disk).
    pub snapshot_description: Option<String>,
    /// Copies, sharing and a launch template once the AMI exists.
    pub after: AfterSettings,
    /// Say each step.
    pub verbose: bool,
}

/// The AWS target of one job.
pub struct AwsTarget {
    conn: config::AwsTarget,
    policy: Policy,
    concurrency: usize,
    image: Option<ImageSpec>,
    encrypted: bool,
    kms_key_id: Option<String>,
    snapshot_description: Option<String>,
    after: AfterSettings,
    verbose: bool,
    clients: Option<Clients>,
}

impl AwsTarget {
    /// The target `s` describe (no request is made).
    pub fn new(s: AwsSettings) -> Result<AwsTarget> {
        if s.concurrency == 0 || s.concurrency > MAX_CONCURRENCY {
            bail!("the concurrency must be between 1 and {MAX_CONCURRENCY}");
        }
        let mut t = AwsTarget::connection(s.conn, s.max_attempts);
        t.concurrency = s.concurrency;
        t.encrypted = s.encrypted || s.kms_key_id.is_some();
        t.kms_key_id = s.kms_key_id;
        t.image = s.image;
        t.snapshot_description = s.snapshot_description;
        s.after.check()?;
        t.after = s.after;
        t.verbose = s.verbose;
        Ok(t)
    }

    /// A connection only (for `jobs cancel`).
    pub fn connection(conn: config::AwsTarget, max_attempts: u32) -> AwsTarget {
        AwsTarget {
            conn,
            policy: Policy {
                max_attempts: max_attempts.max(1),
                ..Policy::default()
            },
            concurrency: DEFAULT_CONCURRENCY,
            image: None,
            encrypted: false,
            kms_key_id: None,
            snapshot_description: None,
            after: AfterSettings::default(),
            verbose: false,
            clients: None,
        }
    }

    fn clients(&mut self) -> Result<&Clients> {
        if self.clients.is_none() {
            let rt = crate::targets::runtime()?;
            let sdk = rt.block_on(config::load(&self.conn));
            let Some(region) = sdk.region().map(|r| r.to_string()) else {
                bail!("no AWS region: pass --region or set AWS_REGION");
            };
            // Credentials are resolved once, here: a missing or refused credential is never worth a retry.
            rt.block_on(config::check_credentials(&sdk))?;
            self.clients = Some(Clients {
                ebs: aws_sdk_ebs::Client::new(&sdk),
                ec2: aws_sdk_ec2::Client::new(&sdk),
                rt,
                region,
            });
        }
        self.clients
            .as_ref()
            .context("the AWS clients are not set up")
    }

    /// The AMI this job registered under its name, if one exists (a crash may have come between RegisterImage
    /// and the journal).
    fn find_image(&mut self, name: &str) -> Result<Option<String>> {
        let policy = self.policy;
        let place = self.place("ec2")?;
        let c = self.clients()?;
        let out =
            c.rt.block_on(retry::with_retry(
                &policy,
                "DescribeImages",
                |_| {},
                || {
                    c.ec2
                        .describe_images()
                        .owners("self")
                        .filters(Filter::builder().name("name").values(name).build())
                        .send()
                },
            ))
            .with_context(|| format!("cannot look up AMIs named '{name}' {place}"))?;
        Ok(out
            .images()
            .first()
            .and_then(|i| i.image_id().map(str::to_string)))
    }

    /// "in region R (endpoint E)" for errors: an unknown region fails as a DNS error on its endpoint.
    fn place(&mut self, service: &str) -> Result<String> {
        let endpoint = self.conn.endpoint_url.clone();
        let region = self.clients()?.region.clone();
        let endpoint = endpoint.unwrap_or_else(|| {
            format!("https://{service}.{region}.amazonaws.com; is the region name right?")
        });
        Ok(format!("in region {region} (endpoint {endpoint})"))
    }

    fn snapshot_state(&mut self, id: &str) -> Result<Option<SnapshotState>> {
        let policy = self.policy;
        let c = self.clients()?;
        let out = c.rt.block_on(retry::with_retry(
            &policy,
            "DescribeSnapshots",
            |_| {},
            || c.ec2.describe_snapshots().snapshot_ids(id).send(),
        ))?;
        Ok(out.snapshots().first().and_then(|s| s.state().cloned()))
    }
}

impl Target for AwsTarget {
    fn units(&self, virtual_size: u64) -> Result<(u64, u64)> {
        Ok((
            EBS_BLOCK_SIZE,
            volume_gib(virtual_size) * ((1 << 30) / EBS_BLOCK_SIZE),
        ))
    }

    fn plan(&self, _job_name: &str, disks: &[DiskInfo]) -> Vec<String> {
        let mut out: Vec<String> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "EBS snapshot of {} GiB{} from disk {i}",
                    volume_gib(d.virtual_size),
                    if self.encrypted { ", encrypted" } else { "" }
                )
            })
            .collect();
        if let Some(spec) = &self.image {
            let devices: Vec<String> = (0..disks.len())
                .map(|i| {
                    if i == 0 {
                        spec.root_device.clone()
                    } else {
                        register::data_device(i).unwrap_or_default()
                    }
                })
                .collect();
            out.push(format!(
                "AMI '{}' mapping {}",
                spec.name,
                devices.join(", ")
            ));
            out.extend(self.after.plan_lines());
        }
        out
    }

    fn connect(&mut self, job: &Job) -> Result<()> {
        if job.disks.len() > MAX_DISKS {
            bail!(
                "the source has {} disks; one AMI maps at most {MAX_DISKS}",
                job.disks.len()
            );
        }
        let region = self.clients()?.region.clone();
        job.say(&format!("AWS region {region}"));
        // A taken AMI name fails RegisterImage only at the end: refuse now, unless this job made it.
        if let Some(name) = self.image.as_ref().map(|i| i.name.clone())
            && job.id_of(JobKey::Image)?.is_none()
            && let Some(found) = self.find_image(&name)?
            && !job.owns("image", &found)
            && !job.owns("image-name", &name)
        {
            bail!(
                "an AMI named '{name}' already exists ({found}) in {region}: choose another name or deregister it"
            );
        }
        Ok(())
    }

    fn upload(
        &mut self,
        job: &Job,
        disk: usize,
        src: &dyn DiskSource,
        map: &ExtentMap,
        bar: Arc<Bar>,
    ) -> Result<UploadStats> {
        let size = src.virtual_size();
        let (_, block_count) = self.units(size)?;
        let snapshot = match job.disk_id(disk, DiskKey::Snapshot)? {
            Some(s) => {
                // The interrupted run got as far as CompleteSnapshot: every block is in; complete it again
                // (a snapshot already completed refuses, which is fine) and wait.
                if job.disk_id(disk, DiskKey::Completing)?.is_some() {
                    let policy = self.policy;
                    let changed = job.ledger(disk).bitmap()?.count();
                    if self.snapshot_state(&s)? != Some(SnapshotState::Completed) {
                        let c = self.clients()?;
                        if let Err(e) =
                            c.rt.block_on(up::complete_snapshot(&c.ebs, &policy, &s, changed))
                        {
                            job.say(&format!("completing {s} again: {e:#}"));
                        }
                    }
                    let c = self.clients()?;
                    c.rt.block_on(register::wait_snapshot(&c.ec2, &policy, &s, WAIT_LIMIT))?;
                    return Ok(UploadStats::default());
                }
                s
            }
            None => {
                let token = format!("{}-{disk}", job.id);
                let description = self
                    .snapshot_description
                    .clone()
                    .unwrap_or_else(|| format!("imgshift job {} disk {disk}", job.id));
                let tags = job.tags.clone();
                let kms = self.kms_key_id.clone();
                let req = up::SnapshotRequest {
                    volume_gib: volume_gib(size),
                    client_token: &token,
                    description: Some(&description),
                    encrypted: self.encrypted,
                    kms_key_arn: kms.as_deref(),
                    tags: &tags,
                    parent_snapshot_id: None,
                };
                let policy = self.policy;
                let place = self.place("ebs")?;
                let c = self.clients()?;
                let (s, enc) =
                    c.rt.block_on(up::start_snapshot(&c.ebs, &policy, &req))
                        .with_context(|| format!("cannot start a snapshot {place}"))?;
                job.record("snapshot", &s)?;
                job.set_disk_id(disk, DiskKey::Snapshot, &s)?;
                if enc {
                    job.set_disk_id(disk, DiskKey::Encrypted, "true")?;
                }
                job.say(&format!("started snapshot {s} for disk {disk}"));
                s
            }
        };
        let encrypted = job.disk_id(disk, DiskKey::Encrypted)?.is_some();
        let planned = if encrypted {
            block_count * EBS_BLOCK_SIZE
        } else {
            map.data_runs(EBS_BLOCK_SIZE)
                .iter()
                .map(|r| r.1 - r.0)
                .sum()
        };
        imgshift_converters::Progress::set_total(bar.as_ref(), planned);
        let bar2 = bar.clone();
        let progress: Arc<dyn Fn(u64) + Send + Sync> =
            Arc::new(move |n| imgshift_converters::Progress::inc(bar2.as_ref(), n));
        let opts = UploaderOptions {
            concurrency: self.concurrency,
            policy: self.policy,
        };
        let ledger = job.ledger(disk);
        let verbose = self.verbose;
        let policy = self.policy;
        let c = self.clients()?;
        let counts = up::stream_snapshot(
            &c.rt,
            &c.ebs,
            &snapshot,
            src,
            map,
            encrypted,
            block_count,
            ledger.clone(),
            opts,
            progress,
            verbose,
        )
        .with_context(|| {
            format!(
                "snapshot {snapshot} (disk {disk}) is kept pending for `imgshift resume {}`; or delete it with \
                 `aws ec2 delete-snapshot --snapshot-id {snapshot}`",
                job.id
            )
        })?;
        let changed = ledger.bitmap()?.count();
        job.set_disk_id(disk, DiskKey::Completing, "true")?;
        let c = self.clients()?;
        c.rt.block_on(up::complete_snapshot(&c.ebs, &policy, &snapshot, changed))?;
        c.rt.block_on(register::wait_snapshot(
            &c.ec2, &policy, &snapshot, WAIT_LIMIT,
        ))?;
        job.say(&format!("completed snapshot {snapshot}: {changed} blocks"));
        Ok(UploadStats {
            bytes_sent: counts.bytes_sent,
            requests: counts.blocks_put,
            retries: counts.retries,
            throttled: counts.throttled,
            ..UploadStats::default()
        })
    }

    fn register(&mut self, job: &Job) -> Result<String> {
        let mut snapshots = Vec::new();
        for i in 0..job.disks.len() {
            snapshots.push(
                job.disk_id(i, DiskKey::Snapshot)?
                    .with_context(|| format!("disk {i} has no snapshot in the journal"))?,
            );
        }
        let Some(mut spec) = self.image.clone() else {
            return Ok(format!("no AMI (snapshots only): {}", snapshots.join(", ")));
        };
        if spec.boot_mode.is_none() {
            spec.boot_mode = job.settings.get("boot_mode").cloned();
        }
        // A Windows guest without the ENA driver (inspection's `ena` setting): EnaSupport off, so EC2 launches
        // it only on instance types it can drive (Xen families); with EnaSupport, Nitro types would start it
        // without a network.
        if spec.ena && job.settings.get("ena").map(String::as_str) == Some("no") {
            spec.ena = false;
            job.say("EnaSupport off: the guest has no ENA driver (inspection)");
        }
        // What `imgshift images list` finds imgshift's AMIs (and their snapshots) by.
        spec.tags.extend(super::images::origin_tags(
            &job.id,
            job.disks.first().map(|d| d.name.as_str()),
            &spec.tags,
        ));
        let ami = match job.id_of(JobKey::Image)? {
            Some(a) => a,
            None => match self.find_image(&spec.name)? {
                // Registered by the interrupted run, after its last journal write.
                Some(a) => a,
                None => {
                    // On record before RegisterImage: a crash before the AMI id reaches the journal leaves
                    // its name, by which the rerun adopts it and `jobs cancel` finds it.
                    job.record("image-name", &spec.name)?;
                    let policy = self.policy;
                    let c = self.clients()?;
                    let ami = c.rt.block_on(register::register_image_disks(
                        &c.ec2, &policy, &spec, &snapshots,
                    ))?;
                    // Crash tests stop here: registered, not yet in the journal (the rerun finds it by name).
                    crate::journal::pause_point("after-register-image");
                    ami
                }
            },
        };
        job.record("image", &ami)?;
        job.set_id(JobKey::Image, &ami)?;
        let policy = self.policy;
        let c = self.clients()?;
        c.rt.block_on(register::wait_image(&c.ec2, &policy, &ami, WAIT_LIMIT))?;
        Ok(format!(
            "AMI {ami} ({}) with {} block device mapping{}, boot mode {}{}",
            spec.name,
            snapshots.len(),
            if snapshots.len() == 1 { "" } else { "s" },
            spec.boot_mode.as_deref().unwrap_or("EC2 default"),
            if spec.ena { "" } else { ", no ENA" }
        ))
    }

    fn verify(&mut self, job: &Job, sources: &[Arc<dyn DiskSource>]) -> Result<String> {
        let mut blocks = 0u64;
        let mut compared = 0u64;
        for (i, src) in sources.iter().enumerate() {
            let snapshot = job
                .disk_id(i, DiskKey::Snapshot)?
                .with_context(|| format!("disk {i} has no snapshot in the journal"))?;
            let encrypted = job.disk_id(i, DiskKey::Encrypted)?.is_some();
            let map = map_disk(src.as_ref(), &format!("disk {i}"))?;
            let (_, block_count) = self.units(src.virtual_size())?;
            let expected = if encrypted {
                block_count
            } else {
                map.data_runs(EBS_BLOCK_SIZE)
                    .iter()
                    .map(|r| (r.1 - r.0).div_ceil(EBS_BLOCK_SIZE))
                    .sum()
            };
            let policy = self.policy;
            let c = self.clients()?;
            let snap =
                EbsSnapshotSource::open(c.rt.handle().clone(), c.ebs.clone(), policy, &snapshot)
                    .with_context(|| format!("cannot read snapshot {snapshot} back"))?;
            let listed = snap.block_count();
            if listed > expected {
                bail!(
                    "snapshot {snapshot} (disk {i}) lists {listed} blocks; the source has {expected} blocks of data"
                );
            }
            if listed < expected {
                // The uploader skips blocks of data ranges that turn out all zeros: each block the snapshot
                // lacks must read as zeros in the source.
                missing_blocks_are_zero(src.as_ref(), &map, &snap)
                    .with_context(|| format!("snapshot {snapshot} (disk {i})"))?;
            }
            compared += verify::sample_compare(src.as_ref(), &map, &snap)
                .with_context(|| format!("snapshot {snapshot} (disk {i})"))?;
            blocks += listed;
        }
        Ok(format!(
            "{} snapshot{}: {blocks} blocks listed as expected; {} sampled and identical (block SHA-256s checked)",
            sources.len(),
            if sources.len() == 1 { "" } else { "s" },
            human_size(compared)
        ))
    }

    fn after_stages(&self) -> Vec<&'static str> {
        if self.image.is_none() {
            return Vec::new();
        }
        self.after.stages()
    }

    fn run_after_stage(&mut self, job: &Job, stage: &str) -> Result<String> {
        let image_id = job
            .id_of(JobKey::Image)?
            .context("the job has no AMI in its journal")?;
        let Some(spec) = self.image.clone() else {
            bail!("the job registers no AMI");
        };
        let boot_mode = spec
            .boot_mode
            .clone()
            .or_else(|| job.settings.get("boot_mode").cloned());
        let facts = AmiFacts {
            image_id: &image_id,
            architecture: &spec.architecture,
            boot_mode: boot_mode.as_deref(),
            ena: spec.ena,
            imds_v2_required: spec.imds_v2_required,
        };
        after::run_stage(
            &self.conn,
            self.policy.max_attempts,
            &self.after,
            job,
            stage,
            &facts,
        )
    }

    fn outputs(&self, job: &Job) -> Result<serde_json::Value> {
        let mut out = json!({
            "image_id": job.id_of(JobKey::Image)?,
            "snapshot_ids": job.disk_ids(DiskKey::Snapshot)?,
            "encrypted": job.disk_ids(DiskKey::Encrypted)?.iter().map(Option::is_some).collect::<Vec<bool>>(),
            "region": self.clients.as_ref().map(|c| c.region.clone()),
        });
        if !self.after_stages().is_empty()
            && let (Some(o), serde_json::Value::Object(more)) =
                (out.as_object_mut(), after::outputs(job)?)
        {
            o.extend(more);
        }
        Ok(out)
    }

    fn cancel(&mut self, resources: &[Resource]) -> Result<Vec<String>> {
        // An AMI registered by a run that stopped before its id reached the journal: found by its name.
        let mut images: Vec<Resource> = resources
            .iter()
            .filter(|r| r.kind == "image")
            .cloned()
            .collect();
        for r in resources.iter().filter(|r| r.kind == "image-name") {
            if let Some(id) = self.find_image(&r.id)?
                && !images.iter().any(|i| i.id == id)
            {
                images.push(Resource {
                    kind: "image".into(),
                    id,
                });
            }
        }
        // What acted on the AMI first: its permissions, template and copies.
        let ids: Vec<String> = images.iter().map(|r| r.id.clone()).collect();
        let mut done = after::cancel(&self.conn, self.policy.max_attempts, resources, &ids)?;
        let policy = self.policy;
        let c = self.clients()?;
        // The AMI first: a snapshot an AMI uses cannot be deleted.
        for r in &images {
            let res = c.rt.block_on(retry::with_retry(
                &policy,
                "DeregisterImage",
                |_| {},
                || c.ec2.deregister_image().image_id(&r.id).send(),
            ));
            match res {
                Ok(_) => done.push(format!("deregistered AMI {}", r.id)),
                Err(e) if not_found(&e) => done.push(format!("AMI {} was already gone", r.id)),
                Err(e) => return Err(e.context(format!("cannot deregister AMI {}", r.id))),
            }
        }
        for r in resources.iter().filter(|r| r.kind == "snapshot") {
            let res = c.rt.block_on(retry::with_retry(
                &policy,
                "DeleteSnapshot",
                |_| {},
                || c.ec2.delete_snapshot().snapshot_id(&r.id).send(),
            ));
            match res {
                Ok(_) => done.push(format!("deleted snapshot {}", r.id)),
                Err(e) if not_found(&e) => done.push(format!("snapshot {} was already gone", r.id)),
                Err(e) => return Err(e.context(format!("cannot delete snapshot {}", r.id))),
            }
        }
        Ok(done)
    }
}

/// Whether an EC2 call failed because the AMI or snapshot does not exist (any more), decided by the service's
/// error code: `InvalidAMIID.NotFound`/`.Unavailable` (deregistered), `InvalidSnapshot.NotFound`. A 503
/// (`Unavailable`, `ServiceUnavailable`) or a throttle is not "gone".
fn not_found(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<retry::CallError>())
        .any(|c| {
            matches!(
                c.code.as_deref(),
                Some(
                    "InvalidAMIID.NotFound"
                        | "InvalidAMIID.Unavailable"
                        | "InvalidSnapshot.NotFound"
                )
            )
        })
}

/// Checks that every 512 KiB block of `map`'s data runs that `snap` does not hold reads as zeros in `src`.
fn missing_blocks_are_zero(
    src: &dyn DiskSource,
    map: &imgshift_converters::ExtentMap,
    snap: &EbsSnapshotSource,
) -> Result<()> {
    let size = src.virtual_size();
    let mut buf = vec![0u8; EBS_BLOCK_SIZE as usize];
    for (start, end) in map.data_runs(EBS_BLOCK_SIZE) {
        let mut at = start;
        while at < end {
            let len = EBS_BLOCK_SIZE.min(size.saturating_sub(at));
            if len == 0 {
                break;
            }
            let held = snap
                .extents(at, len)?
                .bytes(imgshift_converters::ExtentKind::Data)
                > 0;
            if !held {
                let b = buf
                    .get_mut(..len as usize)
                    .context("block larger than its buffer")?;
                src.read_at(b, at)?;
                if !imgshift_converters::engine::is_zero(b) {
                    bail!(
                        "block {} holds data in the source but is not in the snapshot",
                        at / EBS_BLOCK_SIZE
                    );
                }
            }
            at = at.saturating_add(EBS_BLOCK_SIZE);
        }
    }
    Ok(())
}
