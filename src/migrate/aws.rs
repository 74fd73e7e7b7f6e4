//! `migrate --to aws`: one EBS snapshot per disk (EBS direct APIs, resumable per 512 KiB block), one AMI with a
//! block device mapping per snapshot (root first, then `/dev/sdb`, ...), verified by listing each snapshot's
//! blocks and reading sampled ranges back (every block's SHA-256 checked).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{Filter, SnapshotState};
use imgshift_converters::{DiskSource, ExtentMap};
use serde_json::json;

use super::{DiskInfo, Job, Target};
use crate::cli::MigrateArgs;
use crate::journal::Resource;
use crate::progress::Bar;
use crate::targets::aws::download::EbsSnapshotSource;
use crate::targets::aws::register::{self, ImageSpec};
use crate::targets::aws::retry::{self, Policy};
use crate::targets::aws::upload::{self as up, UploaderOptions};
use crate::targets::aws::{EBS_BLOCK_SIZE, config, volume_gib};

/// How long to wait for a snapshot to complete or the AMI to become available.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);
/// Default requests in flight.
const DEFAULT_CONCURRENCY: usize = 64;
/// Most disks one AMI maps (root + `/dev/sdb` ... `/dev/sdz`).
const MAX_DISKS: usize = 26;

/// Connected clients.
struct Clients {
    rt: tokio::runtime::Runtime,
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    region: String,
}

/// The AWS target of one job.
pub struct AwsTarget {
    conn: config::AwsTarget,
    policy: Policy,
    concurrency: usize,
    image: Option<ImageSpec>,
    encrypted: bool,
    kms_key_id: Option<String>,
    verbose: bool,
    clients: Option<Clients>,
}

impl AwsTarget {
    /// The target `args` describe (no request is made).
    pub fn new(args: &MigrateArgs) -> Result<AwsTarget> {
        let concurrency = args.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 || concurrency > 1024 {
            bail!("--concurrency must be between 1 and 1024");
        }
        let a = &args.aws;
        let mut t = AwsTarget::connection(
            a.region.clone(),
            a.profile.clone(),
            a.endpoint_url.clone(),
            args.max_attempts,
        );
        t.concurrency = concurrency;
        t.encrypted = a.encrypted || a.kms_key_id.is_some();
        t.kms_key_id = a.kms_key_id.clone();
        t.verbose = args.verbose;
        t.image = Some(ImageSpec {
            name: super::job_name(args)?,
            description: a.description.clone(),
            architecture: a.architecture.clone(),
            boot_mode: a.boot_mode.clone(),
            ena: !a.no_ena,
            tpm_v2: a.tpm_v2,
            imds_v2_required: a.imds_v2_required,
            volume_type: a.volume_type.clone(),
            root_device: "/dev/xvda".into(),
            tags: crate::targets::parse_tags(&args.tags)?,
        });
        Ok(t)
    }

    /// A connection only (for `jobs cancel` of an `upload aws` job).
    pub fn connection(
        region: Option<String>,
        profile: Option<String>,
        endpoint_url: Option<String>,
        max_attempts: u32,
    ) -> AwsTarget {
        AwsTarget {
            conn: config::AwsTarget {
                region,
                profile,
                endpoint_url,
            },
            policy: Policy {
                max_attempts: max_attempts.max(1),
                ..Policy::default()
            },
            concurrency: DEFAULT_CONCURRENCY,
            image: None,
            encrypted: false,
            kms_key_id: None,
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
        let c = self.clients()?;
        let out = c.rt.block_on(retry::with_retry(
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
        ))?;
        Ok(out
            .images()
            .first()
            .and_then(|i| i.image_id().map(str::to_string)))
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

    fn plan(&self, job_name: &str, disks: &[DiskInfo]) -> Vec<String> {
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
        let devices: Vec<String> = (0..disks.len())
            .map(|i| {
                if i == 0 {
                    "/dev/xvda".to_string()
                } else {
                    register::data_device(i).unwrap_or_default()
                }
            })
            .collect();
        out.push(format!("AMI '{job_name}' mapping {}", devices.join(", ")));
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
        if job.id_of("image")?.is_none()
            && let Some(found) = self.find_image(&job.name)?
            && !job.owns("image", &found)
        {
            bail!(
                "an AMI named '{}' already exists ({found}) in {region}: choose another --name or deregister it",
                job.name
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
    ) -> Result<u64> {
        let size = src.virtual_size();
        let (_, block_count) = self.units(size)?;
        let snapshot = match job.disk_id(disk, "snapshot")? {
            Some(s) => {
                // The interrupted run got as far as CompleteSnapshot: every block is in; complete it again
                // (a snapshot already completed refuses, which is fine) and wait.
                if job.disk_id(disk, "completing")?.is_some() {
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
                    return Ok(0);
                }
                s
            }
            None => {
                let token = format!("{}-{disk}", job.id);
                let description = format!("imgshift job {} disk {disk}", job.id);
                let tags = job.tags.clone();
                let kms = self.kms_key_id.clone();
                let req = up::SnapshotRequest {
                    volume_gib: volume_gib(size),
                    client_token: &token,
                    description: Some(&description),
                    encrypted: self.encrypted,
                    kms_key_arn: kms.as_deref(),
                    tags: &tags,
                };
                let policy = self.policy;
                let c = self.clients()?;
                let (s, enc) =
                    c.rt.block_on(up::start_snapshot(&c.ebs, &policy, &req))
                        .with_context(|| format!("cannot start a snapshot in {}", c.region))?;
                job.record("snapshot", &s)?;
                job.set_disk_id(disk, "snapshot", &s)?;
                if enc {
                    job.set_disk_id(disk, "encrypted", "true")?;
                }
                job.say(&format!("started snapshot {s} for disk {disk}"));
                s
            }
        };
        let encrypted = job.disk_id(disk, "encrypted")?.is_some();
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
        .with_context(|| format!("snapshot {snapshot} (disk {disk})"))?;
        let changed = ledger.bitmap()?.count();
        job.set_disk_id(disk, "completing", "true")?;
        let c = self.clients()?;
        c.rt.block_on(up::complete_snapshot(&c.ebs, &policy, &snapshot, changed))?;
        c.rt.block_on(register::wait_snapshot(
            &c.ec2, &policy, &snapshot, WAIT_LIMIT,
        ))?;
        job.say(&format!("completed snapshot {snapshot}: {changed} blocks"));
        Ok(counts.bytes_sent)
    }

    fn register(&mut self, job: &Job) -> Result<String> {
        let mut snapshots = Vec::new();
        for i in 0..job.disks.len() {
            snapshots.push(
                job.disk_id(i, "snapshot")?
                    .with_context(|| format!("disk {i} has no snapshot in the journal"))?,
            );
        }
        let mut spec = self.image.clone().context("no AMI settings for this job")?;
        if spec.boot_mode.is_none() {
            spec.boot_mode = job.settings.get("boot_mode").cloned();
        }
        let ami = match job.id_of("image")? {
            Some(a) => a,
            None => match self.find_image(&spec.name)? {
                // Registered by the interrupted run, after its last journal write.
                Some(a) => a,
                None => {
                    let policy = self.policy;
                    let c = self.clients()?;
                    c.rt.block_on(register::register_image_disks(
                        &c.ec2, &policy, &spec, &snapshots,
                    ))?
                }
            },
        };
        job.record("image", &ami)?;
        job.set_id("image", &ami)?;
        let policy = self.policy;
        let c = self.clients()?;
        c.rt.block_on(register::wait_image(&c.ec2, &policy, &ami, WAIT_LIMIT))?;
        Ok(format!(
            "AMI {ami} ({}) with {} block device mapping{}, boot mode {}",
            spec.name,
            snapshots.len(),
            if snapshots.len() == 1 { "" } else { "s" },
            spec.boot_mode.as_deref().unwrap_or("EC2 default")
        ))
    }

    fn verify(&mut self, job: &Job, sources: &[Arc<dyn DiskSource>]) -> Result<String> {
        let mut blocks = 0u64;
        let mut compared = 0u64;
        for (i, src) in sources.iter().enumerate() {
            let snapshot = job
                .disk_id(i, "snapshot")?
                .with_context(|| format!("disk {i} has no snapshot in the journal"))?;
            let encrypted = job.disk_id(i, "encrypted")?.is_some();
            let map = super::map_disk(src.as_ref(), &format!("disk {i}"))?;
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
            if listed != expected {
                bail!(
                    "snapshot {snapshot} (disk {i}) lists {listed} blocks; the source has {expected} blocks of data"
                );
            }
            compared += super::verify::sample_compare(src.as_ref(), &map, &snap)
                .with_context(|| format!("snapshot {snapshot} (disk {i})"))?;
            blocks += listed;
        }
        Ok(format!(
            "{} snapshot{}: {blocks} blocks listed as expected; {} sampled and identical (block SHA-256s checked)",
            sources.len(),
            if sources.len() == 1 { "" } else { "s" },
            crate::progress::human_size(compared)
        ))
    }

    fn outputs(&self, job: &Job) -> Result<serde_json::Value> {
        Ok(json!({
            "image_id": job.id_of("image")?,
            "snapshot_ids": job.disk_ids("snapshot")?,
            "region": self.clients.as_ref().map(|c| c.region.clone()),
        }))
    }

    fn cancel(&mut self, resources: &[Resource]) -> Result<Vec<String>> {
        let policy = self.policy;
        let c = self.clients()?;
        let mut done = Vec::new();
        // The AMI first: a snapshot an AMI uses cannot be deleted.
        for r in resources.iter().filter(|r| r.kind == "image") {
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

/// Whether an error says the resource does not exist.
fn not_found(e: &anyhow::Error) -> bool {
    let t = format!("{e:#}");
    t.contains("NotFound") || t.contains("does not exist") || t.contains("Unavailable")
}
