//! `imgshift migrate`: one resumable job from a source image (or an OVA with several disks) to an AWS AMI, an
//! Azure image or a libvirt domain.
//!
//! Stages, in order, each recorded in the job's journal when it finishes (so `resume` skips it):
//! `inspect` (inspection + the target's preflight; a failing verdict stops before any target call unless
//! `--force`), `generalize` (optional, a qcow2 overlay in the job folder), `upload` (per disk, streamed from the
//! engine, resumable per block/window), `register`, `verify` (read back what the target holds) and the report.
//! Every target-side resource is recorded in the journal before or as it is created, which is what
//! `jobs cancel` removes.

pub mod aws;
pub mod azure;
pub mod libvirt;
pub mod plan;
pub mod source;
pub mod stages;
pub mod verify;

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, ExtentMap};

use crate::cli::{MigrateArgs, MigrateTo};
use crate::journal::{Journal, Ledger, Resource};
use crate::progress::Bar;
use stages::StageUi;

/// One disk of the job, as the stages see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskInfo {
    /// Name in the source (the file, or the OVA member).
    pub name: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes of data (allocated, not known to be zero).
    pub data_bytes: u64,
}

/// The job as the targets see it: its journal and how to report.
pub struct Job {
    /// Job id.
    pub id: String,
    /// The name given to what is made (`--name`).
    pub name: String,
    /// The journal, shared with upload tasks.
    pub journal: Arc<Mutex<Journal>>,
    /// The disks, boot disk first.
    pub disks: Vec<DiskInfo>,
    /// Progress display.
    pub ui: Arc<StageUi>,
    /// `--verbose`.
    pub verbose: bool,
    /// Tags for what is created.
    pub tags: Vec<(String, String)>,
    /// Preflight settings for the target (e.g. AWS boot mode, libvirt firmware and bus).
    pub settings: std::collections::BTreeMap<String, String>,
}

impl Job {
    fn lock(&self) -> Result<MutexGuard<'_, Journal>> {
        self.journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))
    }

    /// A target id of disk `disk` stored in the journal.
    pub fn disk_id(&self, disk: usize, key: &str) -> Result<Option<String>> {
        Ok(self
            .lock()?
            .state
            .disks
            .get(disk)
            .and_then(|d| d.ids.get(key).cloned()))
    }

    /// The target id `key` of every disk, in disk order.
    pub fn disk_ids(&self, key: &str) -> Result<Vec<Option<String>>> {
        (0..self.disks.len())
            .map(|i| self.disk_id(i, key))
            .collect()
    }

    /// Stores a target id of disk `disk` and saves the journal.
    pub fn set_disk_id(&self, disk: usize, key: &str, value: &str) -> Result<()> {
        let mut j = self.lock()?;
        if let Some(d) = j.state.disks.get_mut(disk) {
            d.ids.insert(key.to_string(), value.to_string());
        }
        j.save()
    }

    /// A job-level target id.
    pub fn id_of(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock()?.state.ids.get(key).cloned())
    }

    /// Stores a job-level target id and saves the journal.
    pub fn set_id(&self, key: &str, value: &str) -> Result<()> {
        let mut j = self.lock()?;
        j.state.ids.insert(key.to_string(), value.to_string());
        j.save()
    }

    /// Records a target resource for `jobs cancel` and saves the journal (before creating it when its name is
    /// known in advance, so a crash in between still leaves it on record).
    pub fn record(&self, kind: &str, id: &str) -> Result<()> {
        let mut j = self.lock()?;
        j.record(kind, id);
        j.save()
    }

    /// Whether `kind`/`id` is on the job's record (made, or about to be made, by this job).
    pub fn owns(&self, kind: &str, id: &str) -> bool {
        self.journal
            .lock()
            .map(|j| {
                j.state
                    .resources
                    .iter()
                    .any(|r| r.kind == kind && r.id == id)
            })
            .unwrap_or(false)
    }

    /// The done-ledger of disk `disk`.
    pub fn ledger(&self, disk: usize) -> Ledger {
        Ledger::new(self.journal.clone(), Some(disk))
    }

    /// A line for `--verbose`.
    pub fn say(&self, msg: &str) {
        if self.verbose {
            self.ui.note(msg);
        }
    }
}

/// What a target does in each stage. Implementations keep every id they need to resume in the journal (through
/// `Job`), and never create a resource twice for the same job.
pub trait Target {
    /// Resumable unit size of a disk of `virtual_size` bytes, and the number of units.
    fn units(&self, virtual_size: u64) -> Result<(u64, u64)>;
    /// What the job would create, one line each (for the plan and `--dry-run`).
    fn plan(&self, job_name: &str, disks: &[DiskInfo]) -> Vec<String>;
    /// Connects and checks what can be checked before anything is created (credentials, names, pool).
    fn connect(&mut self, job: &Job) -> Result<()>;
    /// Uploads disk `disk` from `src` (resuming from its ledger). Returns the bytes sent by this run.
    fn upload(
        &mut self,
        job: &Job,
        disk: usize,
        src: &dyn DiskSource,
        map: &ExtentMap,
        bar: Arc<Bar>,
    ) -> Result<u64>;
    /// Registers the image or domain from the uploaded disks; returns a one-line summary.
    fn register(&mut self, job: &Job) -> Result<String>;
    /// Reads back what the target holds and compares it with the sources; returns a one-line verdict.
    fn verify(&mut self, job: &Job, sources: &[Arc<dyn DiskSource>]) -> Result<String>;
    /// The ids of what was made, for the report.
    fn outputs(&self, job: &Job) -> Result<serde_json::Value>;
    /// Deletes the recorded resources (absent ones are fine); returns what was removed, one line each.
    fn cancel(&mut self, resources: &[Resource]) -> Result<Vec<String>>;
}

/// Builds the target `args` name (no network call yet).
pub fn target_for(args: &MigrateArgs) -> Result<Box<dyn Target>> {
    match args.to {
        MigrateTo::Aws => Ok(Box::new(aws::AwsTarget::new(args)?)),
        MigrateTo::Azure => Ok(Box::new(azure::AzureTarget::new(args)?)),
        MigrateTo::Libvirt => Ok(Box::new(libvirt::LibvirtTarget::new(args)?)),
    }
}

/// `--name`, or the source file's stem with characters clouds refuse replaced.
pub fn job_name(args: &MigrateArgs) -> Result<String> {
    let raw = match &args.name {
        Some(n) => n.clone(),
        None => args
            .src
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches(|c| c == '.' || c == '-').to_string();
    if clean.is_empty() || clean.len() > 80 {
        bail!("--name: give a name of 1 to 80 letters, digits, '.', '-' or '_' (got {raw:?})");
    }
    if args.name.is_some() && clean != raw {
        bail!("--name {raw:?}: use only letters, digits, '.', '-' and '_'");
    }
    Ok(clean)
}

/// The job id: the same source (path, size, mtime) going to the same place under the same name is the same job,
/// so rerunning the command (or `resume`) continues it.
pub fn job_id(args: &MigrateArgs) -> Result<String> {
    let place = match args.to {
        MigrateTo::Aws => format!(
            "{:?}\0{:?}\0{:?}\0{:?}\0{}",
            args.aws.region.as_deref().or(env("AWS_REGION").as_deref()),
            args.aws.profile,
            args.aws
                .endpoint_url
                .as_deref()
                .or(env("AWS_ENDPOINT_URL").as_deref()),
            args.aws.kms_key_id,
            args.aws.encrypted
        ),
        MigrateTo::Azure => format!(
            "{}\0{:?}\0{:?}",
            args.azure.arm_endpoint, args.azure.subscription, args.azure.resource_group
        ),
        MigrateTo::Libvirt => format!("{}\0{:?}", args.libvirt.connect, args.libvirt.pool),
    };
    let key = format!(
        "migrate\0{}\0{:?}\0{}\0{place}\0{:?}\0{:?}",
        crate::journal::source_identity(&args.src)?,
        args.to,
        job_name(args)?,
        args.generalize,
        args.format,
    );
    Ok(crate::journal::job_id_from("migrate", &key))
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Maps a disk, naming it in errors.
pub fn map_disk(src: &dyn DiskSource, name: &str) -> Result<ExtentMap> {
    imgshift_converters::engine::source_map(src).with_context(|| format!("cannot map {name}"))
}
