//! Recovery points as EBS snapshots (`replicate --to aws`): point 1 a full snapshot, each later point a snapshot
//! started with `ParentSnapshotId` = the previous point's, holding only the changed blocks (a block that became
//! zero is put as zeros). Each snapshot is complete on its own, so any point can be deleted.
//!
//! The state lives on the snapshots: tags `imgshift:replica` (the name), `imgshift:point`, `imgshift:source`,
//! `imgshift:source-snapshot`, `imgshift:created`, `imgshift:changed`, `imgshift:detection`, `imgshift:size`,
//! and for failover the guest's AWS preflight verdict and settings. `imgshift:sent` is tagged last, once the
//! snapshot is completed: a snapshot without it is a point an interrupted run left, which the rerun continues
//! (its id and the blocks already put are in a journal in the state folder) or deletes and starts again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{Filter, SnapshotState, Tag};

use super::config::{self, AwsTarget as AwsConn};
use super::download::EbsSnapshotSource;
use super::retry::{self, Policy};
use super::upload::{self as up, SnapshotRequest, UploaderOptions};
use super::{EBS_BLOCK_SIZE, register, volume_gib};
use crate::journal::{DiskKey, DiskPart, JobState, Journal, Ledger};
use crate::replica::{GuestRecord, Point, PointInput, ReplicaStore, TargetVerdict};

/// How long a completed snapshot may take to show as completed.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);
const TAG_REPLICA: &str = "imgshift:replica";
const TAG_POINT: &str = "imgshift:point";
const TAG_SENT: &str = "imgshift:sent";

/// A snapshot of a replica: its id, state and tags.
type Snapshot = (String, Option<SnapshotState>, BTreeMap<String, String>);

/// EBS snapshots holding a replica's points.
pub struct AwsStore {
    rt: Arc<tokio::runtime::Runtime>,
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    policy: Policy,
    region: String,
    concurrency: usize,
    journal_dir: PathBuf,
    stop: Arc<AtomicBool>,
}

impl AwsStore {
    /// Connects (credentials checked before any request); interrupted points keep their journal in
    /// `journal_dir`.
    pub fn new(
        conn: &AwsConn,
        max_attempts: u32,
        concurrency: usize,
        journal_dir: &Path,
        stop: Arc<AtomicBool>,
    ) -> Result<AwsStore> {
        let rt = Arc::new(crate::targets::runtime()?);
        let sdk = rt.block_on(config::load(conn));
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            bail!("no AWS region: pass --region or set AWS_REGION");
        };
        rt.block_on(config::check_credentials(&sdk))?;
        Ok(AwsStore {
            ebs: aws_sdk_ebs::Client::new(&sdk),
            ec2: aws_sdk_ec2::Client::new(&sdk),
            policy: Policy {
                max_attempts: max_attempts.max(1),
                ..Policy::default()
            },
            region,
            rt,
            concurrency: concurrency.max(1),
            journal_dir: journal_dir.to_path_buf(),
            stop,
        })
    }

    /// The replica's snapshots: `(id, state, tags)`.
    fn snapshots(&self, name: &str) -> Result<Vec<Snapshot>> {
        let ec2 = self.ec2.clone();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let t = token.clone();
            let page = self.rt.block_on(retry::with_retry(
                &self.policy,
                "DescribeSnapshots",
                |_| {},
                || {
                    ec2.describe_snapshots()
                        .owner_ids("self")
                        .filters(
                            Filter::builder()
                                .name(format!("tag:{TAG_REPLICA}"))
                                .values(name)
                                .build(),
                        )
                        .set_next_token(t.clone())
                        .send()
                },
            ))?;
            for s in page.snapshots() {
                let Some(id) = s.snapshot_id() else { continue };
                let tags: BTreeMap<String, String> = s
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect();
                out.push((id.to_string(), s.state().cloned(), tags));
            }
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    fn tag(&self, id: &str, tags: &[(String, String)]) -> Result<()> {
        let ec2 = self.ec2.clone();
        let list: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        self.rt.block_on(retry::with_retry(
            &self.policy,
            "CreateTags",
            |_| {},
            || {
                ec2.create_tags()
                    .resources(id)
                    .set_tags(Some(list.clone()))
                    .send()
            },
        ))?;
        Ok(())
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        let ec2 = self.ec2.clone();
        let r = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DeleteSnapshot",
            |_| {},
            || ec2.delete_snapshot().snapshot_id(id).send(),
        ));
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if e.downcast_ref::<retry::CallError>()
                    .and_then(|c| c.code.as_deref())
                    == Some("InvalidSnapshot.NotFound") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The journal of point `n` of replica `name` (its snapshot id and the blocks put so far).
    fn point_journal(&self, name: &str, n: u32, block_count: u64) -> Result<Arc<Mutex<Journal>>> {
        let (j, _) = Journal::open_or_create(
            &self.journal_dir,
            JobState {
                id: format!("{name}.aws-point-{n}"),
                kind: "replicate".into(),
                disks: vec![DiskPart {
                    block_count,
                    ..DiskPart::default()
                }],
                ..JobState::default()
            },
        )?;
        Ok(Arc::new(Mutex::new(j)))
    }

    /// Registers an AMI named `image_name` over point `p` (its boot mode from the point's inspection unless
    /// `boot_mode` says), and waits until it is available. An AMI of that name made by an interrupted failover
    /// is adopted.
    pub fn failover(
        &self,
        p: &Point,
        image_name: &str,
        boot_mode: Option<String>,
        architecture: &str,
    ) -> Result<String> {
        let aws = p.guest.as_ref().and_then(|g| g.targets.get("aws"));
        let spec = register::ImageSpec {
            name: image_name.to_string(),
            description: Some(format!(
                "imgshift failover: point {} of replica {}",
                p.number, p.source
            )),
            architecture: architecture.to_string(),
            boot_mode: boot_mode.or_else(|| aws.and_then(|v| v.settings.get("boot_mode").cloned())),
            ena: true,
            tpm_v2: false,
            imds_v2_required: false,
            volume_type: "gp3".into(),
            root_device: "/dev/xvda".into(),
            tags: vec![
                ("imgshift:failover-of".into(), p.target_id.clone()),
                ("imgshift:point".into(), p.number.to_string()),
            ],
        };
        let ec2 = self.ec2.clone();
        let existing = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DescribeImages",
            |_| {},
            || {
                ec2.describe_images()
                    .owners("self")
                    .filters(Filter::builder().name("name").values(image_name).build())
                    .send()
            },
        ))?;
        let ami = match existing.images().iter().find_map(|i| i.image_id()) {
            Some(a) => a.to_string(),
            None => self.rt.block_on(register::register_image_disks(
                &self.ec2,
                &self.policy,
                &spec,
                std::slice::from_ref(&p.target_id),
            ))?,
        };
        self.rt.block_on(register::wait_image(
            &self.ec2,
            &self.policy,
            &ami,
            WAIT_LIMIT,
        ))?;
        Ok(ami)
    }

    /// The region the points are in.
    pub fn region(&self) -> &str {
        &self.region
    }
}

/// A point from its snapshot's tags.
fn point_of(id: &str, tags: &BTreeMap<String, String>) -> Option<Point> {
    let num = |k: &str| tags.get(k).and_then(|v| v.parse::<u64>().ok());
    let verdict = tags.get("imgshift:aws-verdict").cloned();
    let guest = verdict.map(|verdict| {
        let settings = tags
            .get("imgshift:aws-settings")
            .map(|s| {
                s.split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        GuestRecord {
            os: tags.get("imgshift:os").cloned().unwrap_or_default(),
            os_read: tags.get("imgshift:os-read").map(String::as_str) == Some("yes"),
            partition_firmware: None,
            targets: [(
                "aws".to_string(),
                TargetVerdict {
                    verdict,
                    findings: Vec::new(),
                    settings,
                },
            )]
            .into_iter()
            .collect(),
        }
    });
    Some(Point {
        number: u32::try_from(num(TAG_POINT)?).ok()?,
        created: tags.get("imgshift:created").cloned().unwrap_or_default(),
        target_id: id.to_string(),
        source: tags.get("imgshift:source").cloned().unwrap_or_default(),
        source_snapshot: tags.get("imgshift:source-snapshot").cloned(),
        virtual_size: num("imgshift:size")?,
        changed_bytes: num("imgshift:changed").unwrap_or(0),
        sent_bytes: num(TAG_SENT)?,
        detection: tags.get("imgshift:detection").cloned().unwrap_or_default(),
        bitmap: tags.get("imgshift:bitmap").cloned(),
        guest,
    })
}

/// A tag value EC2 accepts (at most 256 characters).
fn tag_value(v: &str) -> String {
    v.chars().take(256).collect()
}

/// The tags a point's snapshot gets when started (everything but what is known only at the end).
fn start_tags(name: &str, p: &Point) -> Vec<(String, String)> {
    let mut t = vec![
        (TAG_REPLICA.to_string(), name.to_string()),
        (TAG_POINT.to_string(), p.number.to_string()),
        ("imgshift:source".to_string(), tag_value(&p.source)),
        ("imgshift:created".to_string(), p.created.clone()),
        ("imgshift:size".to_string(), p.virtual_size.to_string()),
        ("imgshift:changed".to_string(), p.changed_bytes.to_string()),
        ("imgshift:detection".to_string(), p.detection.clone()),
        (
            "Name".to_string(),
            tag_value(&format!("{name} point {}", p.number)),
        ),
    ];
    if let Some(s) = &p.source_snapshot {
        t.push(("imgshift:source-snapshot".to_string(), s.clone()));
    }
    if let Some(b) = &p.bitmap {
        t.push(("imgshift:bitmap".to_string(), tag_value(b)));
    }
    if let Some(g) = &p.guest {
        t.push(("imgshift:os".to_string(), tag_value(&g.os)));
        t.push((
            "imgshift:os-read".to_string(),
            if g.os_read { "yes" } else { "no" }.to_string(),
        ));
        if let Some(v) = g.targets.get("aws") {
            t.push(("imgshift:aws-verdict".to_string(), v.verdict.clone()));
            let s: Vec<String> = v.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
            t.push(("imgshift:aws-settings".to_string(), tag_value(&s.join(";"))));
        }
    }
    t
}

impl ReplicaStore for AwsStore {
    fn describe(&self) -> String {
        format!("EBS snapshots in {}", self.region)
    }

    fn points(&mut self, name: &str) -> Result<Vec<Point>> {
        let mut points: Vec<Point> = self
            .snapshots(name)?
            .iter()
            .filter(|(_, state, _)| *state == Some(SnapshotState::Completed))
            .filter_map(|(id, _, tags)| point_of(id, tags))
            .collect();
        points.sort_by_key(|p| p.number);
        points.dedup_by_key(|p| p.number);
        Ok(points)
    }

    fn write_point(&mut self, input: PointInput<'_>) -> Result<Point> {
        let n = input.point.number;
        let size = input.point.virtual_size;
        let gib = volume_gib(size);
        let block_count = gib.saturating_mul(1 << 30) / EBS_BLOCK_SIZE;
        let journal = self.point_journal(input.name, n, block_count)?;
        let recorded = journal.lock().ok().and_then(|j| {
            j.state
                .disks
                .first()
                .and_then(|d| d.ids.get(&DiskKey::Snapshot).cloned())
        });
        // What an interrupted run left: the journal's snapshot if still pending, else nothing of point n.
        let others = self.snapshots(input.name)?;
        let mut resume: Option<String> = None;
        for (id, state, tags) in &others {
            if tags.get(TAG_POINT).map(String::as_str) != Some(n.to_string().as_str())
                || tags.contains_key(TAG_SENT)
            {
                continue;
            }
            if Some(id) == recorded.as_ref() && *state == Some(SnapshotState::Pending) {
                resume = Some(id.clone());
            } else {
                self.delete_snapshot(id)?;
            }
        }
        let snapshot = match resume {
            Some(id) => id,
            None => {
                if let Ok(mut j) = journal.lock() {
                    if let Some(d) = j.state.disks.first_mut() {
                        d.ids.clear();
                    }
                    if let Some(b) = j.bitmap_mut(0) {
                        *b = crate::journal::Bitmap::new(block_count);
                    }
                    j.save()?;
                }
                let token = format!("{}-{n}-{}", input.name, crate::replica::now_rfc3339());
                let tags = start_tags(input.name, &input.point);
                let req = SnapshotRequest {
                    volume_gib: gib,
                    client_token: &token,
                    description: Some("imgshift replica point"),
                    tags: &tags,
                    parent_snapshot_id: input.parent.map(|p| p.target_id.as_str()),
                    ..SnapshotRequest::default()
                };
                let (id, _) =
                    self.rt
                        .block_on(up::start_snapshot(&self.ebs, &self.policy, &req))?;
                if let Ok(mut j) = journal.lock() {
                    if let Some(d) = j.state.disks.first_mut() {
                        d.ids.insert(DiskKey::Snapshot, id.clone());
                    }
                    j.save()?;
                }
                // EC2 shows StartSnapshot's tags; set them through EC2 as well so DescribeSnapshots finds the
                // point by them wherever the two disagree.
                self.tag(&id, &tags)?;
                id
            }
        };
        let ledger = Ledger::new(journal.clone(), 0);
        input.progress.set_total(input.changes.bytes());
        let noop: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(|_| {});
        let opts = UploaderOptions {
            concurrency: self.concurrency,
            policy: self.policy,
        };
        let counts = if input.parent.is_none() {
            let map = imgshift_converters::engine::source_map(input.src)?;
            up::stream_snapshot(
                &self.rt,
                &self.ebs,
                &snapshot,
                input.src,
                &map,
                false,
                block_count,
                ledger.clone(),
                opts,
                noop.clone(),
                false,
            )?
        } else {
            up::stream_ranges(
                &self.rt,
                &self.ebs,
                &snapshot,
                input.src,
                input.changes.ranges(),
                block_count,
                ledger.clone(),
                opts,
                noop,
                false,
            )?
        };
        input.progress.inc(input.changes.bytes());
        let _ = counts;
        if self.stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        crate::journal::pause_point("replicate-point-written");
        let put = ledger.bitmap()?.count();
        self.rt.block_on(up::complete_snapshot(
            &self.ebs,
            &self.policy,
            &snapshot,
            put,
        ))?;
        self.rt.block_on(register::wait_snapshot(
            &self.ec2,
            &self.policy,
            &snapshot,
            WAIT_LIMIT,
        ))?;
        let sent = put.saturating_mul(EBS_BLOCK_SIZE);
        self.tag(&snapshot, &[(TAG_SENT.to_string(), sent.to_string())])?;
        // The point is complete: its journal goes (the ledger holds the last other reference to it).
        drop(ledger);
        if let Ok(j) = Arc::try_unwrap(journal)
            .map_err(|_| ())
            .and_then(|m| m.into_inner().map_err(|_| ()))
        {
            j.remove()?;
        }
        let mut point = input.point;
        point.target_id = snapshot;
        point.sent_bytes = sent;
        Ok(point)
    }

    fn delete_oldest(&mut self, _name: &str, drop: &[Point], _first_kept: &Point) -> Result<()> {
        for p in drop {
            self.delete_snapshot(&p.target_id)
                .with_context(|| format!("cannot delete point {} ({})", p.number, p.target_id))?;
        }
        Ok(())
    }

    fn open_point(
        &mut self,
        _name: &str,
        p: &Point,
    ) -> Result<Option<Box<dyn imgshift_converters::DiskSource>>> {
        let s = EbsSnapshotSource::open(
            self.rt.handle().clone(),
            self.ebs.clone(),
            self.policy,
            &p.target_id,
        )
        .with_context(|| format!("cannot read point {} back ({})", p.number, p.target_id))?;
        Ok(Some(Box::new(s.owning(Arc::clone(&self.rt)))))
    }
}
