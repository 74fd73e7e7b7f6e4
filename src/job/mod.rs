//! A job as targets see it: its journal, its disks and how to report ([`Job`]), and the lifecycle every target
//! implements ([`Target`]). This is the layer between the journal and the targets: it knows no command line, no
//! runner and no particular target.

pub mod verify;

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use imgshift_converters::{DiskSource, ExtentMap};

use crate::journal::{DiskKey, JobKey, Journal, Ledger, Resource};
use crate::progress::{Bar, StageUi};

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

/// What one upload run of one disk sent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct UploadStats {
    /// Payload bytes the target acknowledged in this run.
    pub bytes_sent: u64,
    /// Requests that carried data (EBS blocks, Put Page windows, stream pieces).
    pub requests: u64,
    /// Requests sent again after a retryable failure.
    pub retries: u64,
    /// Of those, throttled ones.
    pub throttled: u64,
    /// Upload streams opened (libvirt: one per volume).
    pub streams: u64,
    /// Gaps sent as holes rather than data (libvirt sparse streams).
    pub holes: u64,
    /// Bytes those holes covered (never sent as data).
    pub skipped_bytes: u64,
    /// Zero bytes sent as data to fill gaps too short for a hole (included in `bytes_sent`).
    pub zero_fill_bytes: u64,
}

impl UploadStats {
    /// Adds `o` to these counts.
    pub fn add(&mut self, o: &UploadStats) {
        self.bytes_sent = self.bytes_sent.saturating_add(o.bytes_sent);
        self.requests = self.requests.saturating_add(o.requests);
        self.retries = self.retries.saturating_add(o.retries);
        self.throttled = self.throttled.saturating_add(o.throttled);
        self.streams = self.streams.saturating_add(o.streams);
        self.holes = self.holes.saturating_add(o.holes);
        self.skipped_bytes = self.skipped_bytes.saturating_add(o.skipped_bytes);
        self.zero_fill_bytes = self.zero_fill_bytes.saturating_add(o.zero_fill_bytes);
    }
}

/// Maps a disk, naming it in errors.
pub fn map_disk(src: &dyn DiskSource, name: &str) -> Result<ExtentMap> {
    imgshift_converters::engine::source_map(src).with_context(|| format!("cannot map {name}"))
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
    pub fn disk_id(&self, disk: usize, key: DiskKey) -> Result<Option<String>> {
        Ok(self
            .lock()?
            .state
            .disks
            .get(disk)
            .and_then(|d| d.ids.get(&key).cloned()))
    }

    /// The target id `key` of every disk, in disk order.
    pub fn disk_ids(&self, key: DiskKey) -> Result<Vec<Option<String>>> {
        (0..self.disks.len())
            .map(|i| self.disk_id(i, key))
            .collect()
    }

    /// Stores a target id of disk `disk` and saves the journal.
    pub fn set_disk_id(&self, disk: usize, key: DiskKey, value: &str) -> Result<()> {
        let mut j = self.lock()?;
        if let Some(d) = j.state.disks.get_mut(disk) {
            d.ids.insert(key, value.to_string());
        }
        j.save()
    }

    /// A job-level target id.
    pub fn id_of(&self, key: JobKey) -> Result<Option<String>> {
        Ok(self.lock()?.state.ids.get(&key).cloned())
    }

    /// Stores a job-level target id and saves the journal.
    pub fn set_id(&self, key: JobKey, value: &str) -> Result<()> {
        let mut j = self.lock()?;
        j.state.ids.insert(key, value.to_string());
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
        Ledger::new(self.journal.clone(), disk)
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
    /// Takes the settings inspection chose for the guest (the preflight's, or the journal's on resume: boot
    /// mode, OS type and state, ...) where the target's own options left the choice open. Called before
    /// [`Target::plan`] and [`Target::connect`]; the default ignores them.
    fn follow(&mut self, settings: &std::collections::BTreeMap<String, String>) {
        let _ = settings;
    }
    /// What the job would create, one line each (for the plan and `--dry-run`).
    fn plan(&self, job_name: &str, disks: &[DiskInfo]) -> Vec<String>;
    /// Connects and checks what can be checked before anything is created (credentials, names, pool).
    fn connect(&mut self, job: &Job) -> Result<()>;
    /// Uploads disk `disk` from `src` (resuming from its ledger). Returns what this run sent.
    fn upload(
        &mut self,
        job: &Job,
        disk: usize,
        src: &dyn DiskSource,
        map: &ExtentMap,
        bar: Arc<Bar>,
    ) -> Result<UploadStats>;
    /// Registers the image or domain from the uploaded disks; returns a one-line summary.
    fn register(&mut self, job: &Job) -> Result<String>;
    /// Reads back what the target holds and compares it with the sources; returns a one-line verdict.
    fn verify(&mut self, job: &Job, sources: &[Arc<dyn DiskSource>]) -> Result<String>;
    /// Stages after `verify`, in order, that act on what was registered (AWS: copies, sharing, a launch
    /// template). None by default.
    fn after_stages(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Runs after-stage `stage` (one of [`Target::after_stages`]); returns a one-line summary.
    fn run_after_stage(&mut self, _job: &Job, stage: &str) -> Result<String> {
        anyhow::bail!("this target has no stage {stage}")
    }
    /// The ids of what was made, for the report.
    fn outputs(&self, job: &Job) -> Result<serde_json::Value>;
    /// Deletes the recorded resources (absent ones are fine); returns what was removed, one line each.
    fn cancel(&mut self, resources: &[Resource]) -> Result<Vec<String>>;
}
