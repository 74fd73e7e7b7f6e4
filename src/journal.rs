//! Resumable job state: a JSON document (header fields + a done-bitmap of blocks) replaced atomically
//! (temp file, fsync, rename, folder fsync), with one writer at a time enforced by a lock file
//! (`File::try_lock`). Lives under `$XDG_STATE_HOME/imgshift/jobs/` (default `~/.local/state/imgshift/jobs/`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The folder jobs are kept in: `--state-dir`, else `$XDG_STATE_HOME/imgshift/jobs`, else
/// `~/.local/state/imgshift/jobs`.
pub fn state_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("imgshift/jobs"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".local/state/imgshift/jobs")),
        None => bail!(
            "cannot find a folder for job state: set HOME, XDG_STATE_HOME or pass --state-dir"
        ),
    }
}

/// A set of block indices, stored as a bitmap.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    bits: Vec<u8>,
    count: u64,
}

impl Bitmap {
    /// An empty bitmap for `n` blocks.
    pub fn new(n: u64) -> Bitmap {
        Bitmap {
            bits: vec![0; n.div_ceil(8) as usize],
            count: 0,
        }
    }
    /// True when block `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
    /// Sets block `i` (ignored when out of range).
    pub fn set(&mut self, i: u64) {
        if let Some(b) = self.bits.get_mut((i / 8) as usize) {
            let m = 1 << (i % 8);
            if *b & m == 0 {
                *b |= m;
                self.count += 1;
            }
        }
    }
    /// Number of blocks set.
    pub fn count(&self) -> u64 {
        self.count
    }
    fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bits)
    }
    fn decode(s: &str, n: u64) -> Result<Bitmap> {
        let bits = base64::engine::general_purpose::STANDARD
            .decode(s)
            .context("corrupt bitmap in job journal")?;
        if bits.len() as u64 != n.div_ceil(8) {
            bail!("job journal bitmap has the wrong length");
        }
        let count = bits.iter().map(|b| u64::from(b.count_ones())).sum();
        Ok(Bitmap { bits, count })
    }
}

/// What a job records about its target as a whole: each field named by the target that writes it. A journal
/// naming any other field is refused as corrupt (never misread).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKey {
    /// AWS: the AMI id; Azure: the image's resource id.
    Image,
    /// Azure: the gallery image version's resource id.
    GalleryVersion,
    /// Azure: the Hyper-V generation the OS disk was created with.
    HyperVGeneration,
    /// libvirt: the domain defined.
    Domain,
    /// libvirt: whether the domain was started.
    Started,
    /// libvirt: the firmware chosen (bios, uefi).
    Firmware,
    /// libvirt: the disk bus chosen.
    DiskBus,
    /// libvirt: the domain type chosen (kvm, qemu).
    DomainType,
    /// libvirt: the volume format (qcow2, raw).
    VolumeFormat,
    /// libvirt: the firmware the boot disk's partition table suggests.
    PartitionFirmware,
    /// libvirt: why.
    PartitionFirmwareWhy,
}

/// What a job records about one disk on its target. A journal naming any other field is refused as corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKey {
    /// AWS: the EBS snapshot id.
    Snapshot,
    /// AWS: present when the snapshot is encrypted (every block is written).
    Encrypted,
    /// AWS: present once CompleteSnapshot was sent.
    Completing,
    /// Azure: the managed disk's name.
    ManagedDisk,
    /// Azure: the managed disk's resource id.
    ManagedDiskId,
    /// Azure: where the disk is (creating, created, granted, uploaded, revoked).
    AzureStage,
    /// Azure: when the last write SAS expires (not a secret).
    SasExpiry,
    /// libvirt: the volume, as POOL/VOLUME.
    Volume,
}

/// The journal layout this imgshift writes and reads. 3: every job keeps its disks in `disks` (single-disk
/// uploads too), bytes sent and preflight settings are typed fields. A journal of another version is refused by
/// name, never misread.
pub const JOURNAL_VERSION: u32 = 3;

/// What a job journal stores. Never holds credentials.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct JobState {
    /// Layout version of this file ([`JOURNAL_VERSION`]).
    pub version: u32,
    /// Job id (also the cloud-side idempotency token).
    pub id: String,
    /// What the job does ("migrate-aws", "aws-upload").
    pub kind: String,
    /// The source image path.
    pub source: String,
    /// The last stage finished ("new", "inspect", "upload", "register", "verify").
    pub stage: String,
    /// What the target recorded about the job as a whole (typed keys: [`JobKey`]).
    #[serde(default)]
    pub ids: std::collections::BTreeMap<JobKey, String>,
    /// The disks: each with its own done-bitmap and target ids.
    #[serde(default)]
    pub disks: Vec<DiskPart>,
    /// The preflight's settings for the target (boot mode, generation, firmware, bus, os_read).
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, String>,
    /// What inspection found, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// Stages finished, in order, with their time and a one-line result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageRecord>,
    /// Target resources the job created (or was about to create), for `jobs cancel`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
    /// The command line that started the job, for `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<SavedCommand>,
    /// When the job was created (seconds since the epoch).
    #[serde(default)]
    pub created: u64,
}

/// One disk of a job: its own done-bitmap and target ids.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DiskPart {
    /// The disk's name in the source (file name, or the OVA member).
    pub name: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Resumable units of this disk.
    pub block_count: u64,
    /// Unit size in bytes.
    pub block_size: u64,
    /// Where this disk is: "new", "uploading", "uploaded".
    pub stage: String,
    /// Payload bytes the target acknowledged, over every run.
    #[serde(default)]
    pub bytes_sent: u64,
    /// What the target recorded about this disk (typed keys: [`DiskKey`]).
    #[serde(default)]
    pub ids: std::collections::BTreeMap<DiskKey, String>,
    /// Done-bitmap, base64.
    #[serde(default)]
    pub done: String,
}

/// A finished stage.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StageRecord {
    /// Stage name ("inspect", "upload", ...).
    pub name: String,
    /// Wall time it took, in seconds (summed over runs when it was resumed).
    pub seconds: f64,
    /// One line saying what it found or made.
    pub detail: String,
}

/// A target resource a job created: what `jobs cancel` removes.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Resource {
    /// "snapshot", "image", "disk", "gallery-version", "volume", "domain".
    pub kind: String,
    /// The target's id or name for it.
    pub id: String,
}

/// A command line to run again on `resume`: arguments, working folder, and the non-secret environment
/// variables that chose the endpoint, region or connection.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SavedCommand {
    /// `argv[1..]`.
    pub args: Vec<String>,
    /// The working folder (relative paths in `args` are relative to it).
    pub cwd: String,
    /// Environment variables from [`SAVED_ENV`] that were set.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// Environment variables saved with a job: they select where it goes, and hold no secret.
pub const SAVED_ENV: &[&str] = &[
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AZURE_SUBSCRIPTION_ID",
    "IMGSHIFT_CA_BUNDLE",
    "LIBVIRT_DEFAULT_URI",
];

impl SavedCommand {
    /// This process's command line.
    pub fn current() -> SavedCommand {
        let args = std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let cwd = std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let env = SAVED_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        SavedCommand { args, cwd, env }
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An open, locked job journal.
pub struct Journal {
    path: PathBuf,
    _lock: File,
    /// The job's state (header fields).
    pub state: JobState,
    /// Per-disk done-bitmaps (`state.disks[i]`).
    pub parts: Vec<Bitmap>,
}

impl Journal {
    /// Opens the journal of job `id` in `dir`, or creates a new one from `fresh`. Fails when another process
    /// holds the job.
    pub fn open_or_create(dir: &Path, fresh: JobState) -> Result<(Journal, bool)> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.json", fresh.id));
        let lock_path = dir.join(format!("{}.lock", fresh.id));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!("job {} is running in another imgshift process", fresh.id)
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            check_version(&text, &path)?;
            let state: JobState = serde_json::from_str(&text)
                .with_context(|| format!("corrupt job journal {}", path.display()))?;
            if state.kind != fresh.kind
                || state.disks.len() != fresh.disks.len()
                || state
                    .disks
                    .iter()
                    .zip(&fresh.disks)
                    .any(|(a, b)| a.block_count != b.block_count)
            {
                bail!(
                    "job journal {} does not match this job (source changed?); remove it to start over",
                    path.display()
                );
            }
            let parts = state
                .disks
                .iter()
                .map(|d| Bitmap::decode(&d.done, d.block_count))
                .collect::<Result<Vec<_>>>()?;
            return Ok((
                Journal {
                    path,
                    _lock: lock,
                    state,
                    parts,
                },
                true,
            ));
        }
        let parts = fresh
            .disks
            .iter()
            .map(|d| Bitmap::new(d.block_count))
            .collect();
        let mut fresh = fresh;
        fresh.version = JOURNAL_VERSION;
        if fresh.created == 0 {
            fresh.created = now_secs();
        }
        if fresh.command.is_none() {
            fresh.command = Some(SavedCommand::current());
        }
        let j = Journal {
            path,
            _lock: lock,
            state: fresh,
            parts,
        };
        j.save()?;
        Ok((j, false))
    }

    /// Opens the existing journal of job `id` in `dir` (for `jobs cancel`); fails when it does not exist or
    /// another process holds it.
    pub fn open_existing(dir: &Path, id: &str) -> Result<Journal> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("'{id}' is not a job id (`imgshift jobs` lists them)");
        }
        let path = dir.join(format!("{id}.json"));
        let Some(state) = peek(&path) else {
            bail!(
                "no job {id} in {} (`imgshift jobs` lists them)",
                dir.display()
            );
        };
        let (j, _) = Journal::open_or_create(dir, state)?;
        Ok(j)
    }

    /// Writes the journal atomically.
    pub fn save(&self) -> Result<()> {
        let mut state = self.state.clone();
        state.version = JOURNAL_VERSION;
        for (d, b) in state.disks.iter_mut().zip(&self.parts) {
            d.done = b.encode();
        }
        let text = serde_json::to_vec_pretty(&state)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).context("cannot create a journal temp file")?;
        tmp.write_all(&text)
            .context("cannot write the job journal")?;
        tmp.as_file()
            .sync_all()
            .context("cannot sync the job journal")?;
        tmp.persist(&self.path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot replace {}", self.path.display()))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes the journal (the job finished).
    pub fn remove(self) -> Result<()> {
        let lock = self.path.with_extension("lock");
        std::fs::remove_file(&self.path)
            .with_context(|| format!("cannot remove {}", self.path.display()))?;
        let _ = std::fs::remove_file(lock);
        Ok(())
    }

    /// Where the journal lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a resource the job is about to create or has created (once).
    pub fn record(&mut self, kind: &str, id: &str) {
        let r = Resource {
            kind: kind.to_string(),
            id: id.to_string(),
        };
        if !self.state.resources.contains(&r) {
            self.state.resources.push(r);
        }
    }

    /// The done-bitmap of disk `part`.
    pub fn bitmap_mut(&mut self, part: usize) -> Option<&mut Bitmap> {
        self.parts.get_mut(part)
    }
}

/// Test hook for crash tests, compiled only into debug builds (the test profile), never into a release binary:
/// with `IMGSHIFT_TEST_PAUSE_AT=<point>` in the environment, the process stops at that point (every journal write
/// before it done), says `imgshift-test: paused at <point>` on standard error and waits there, so a test can
/// `kill -9` it at an exact place. Does nothing otherwise.
#[cfg(debug_assertions)]
pub fn pause_point(point: &str) {
    if std::env::var("IMGSHIFT_TEST_PAUSE_AT").is_ok_and(|v| v == point) {
        eprintln!("imgshift-test: paused at {point}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Release builds: no test hook.
#[cfg(not(debug_assertions))]
pub fn pause_point(_point: &str) {}

/// Reads a job's journal without locking it (for `imgshift jobs`); `None` when it is not a job journal of this
/// layout version.
pub fn peek(path: &Path) -> Option<JobState> {
    let text = std::fs::read_to_string(path).ok()?;
    check_version(&text, path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The layout version of a journal's text, read before anything else of it.
pub fn version_of(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Version {
        version: Option<u64>,
    }
    serde_json::from_str::<Version>(text).ok()?.version
}

/// Refuses a journal written in another layout than [`JOURNAL_VERSION`], naming both versions.
pub fn check_version(text: &str, path: &Path) -> Result<()> {
    match version_of(text) {
        Some(v) if v == u64::from(JOURNAL_VERSION) => Ok(()),
        Some(v) if v > u64::from(JOURNAL_VERSION) => bail!(
            "job journal {} has layout version {v}, newer than this imgshift reads ({JOURNAL_VERSION}): use the \
             imgshift that started the job",
            path.display()
        ),
        Some(v) => bail!(
            "job journal {} has layout version {v}, older than this imgshift reads ({JOURNAL_VERSION}): finish or \
             cancel the job with the imgshift that started it, or remove the file to start over",
            path.display()
        ),
        None => bail!(
            "{} is not a job journal (no layout version)",
            path.display()
        ),
    }
}

/// Whether another process holds job `id` in `dir` right now.
pub fn is_running(dir: &Path, id: &str) -> bool {
    let Ok(f) = OpenOptions::new()
        .write(true)
        .open(dir.join(format!("{id}.lock")))
    else {
        return false;
    };
    matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// Acknowledged units of one disk (or of the whole job), shared by the upload tasks of one job: marks units
/// done and saves the journal now and then.
#[derive(Clone)]
pub struct Ledger {
    journal: std::sync::Arc<std::sync::Mutex<Journal>>,
    part: usize,
}

impl Ledger {
    /// The ledger of disk `part`.
    pub fn new(journal: std::sync::Arc<std::sync::Mutex<Journal>>, part: usize) -> Ledger {
        Ledger { journal, part }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Journal>> {
        self.journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))
    }

    /// Marks unit `i` acknowledged; saves the journal when `save`.
    pub fn mark(&self, i: u64, save: bool) -> Result<()> {
        let mut j = self.lock()?;
        if let Some(b) = j.bitmap_mut(self.part) {
            b.set(i);
        }
        if save {
            j.save()?;
        }
        Ok(())
    }

    /// Saves the journal.
    pub fn save(&self) -> Result<()> {
        self.lock()?.save()
    }

    /// A copy of the done-bitmap.
    pub fn bitmap(&self) -> Result<Bitmap> {
        let mut j = self.lock()?;
        Ok(j.bitmap_mut(self.part)
            .map(|b| b.clone())
            .unwrap_or_default())
    }
}

/// What identifies a job's source: its resolved path, size and modification time (`path\0size\0mtime`), so
/// rerunning an interrupted command on the same, unchanged file finds the same job.
pub fn source_identity(src: &Path) -> Result<String> {
    let canon = src
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", src.display()))?;
    let meta =
        std::fs::metadata(&canon).with_context(|| format!("cannot stat {}", canon.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{}\0{}\0{mtime}", canon.display(), meta.len()))
}

/// A job id: `prefix-` and the first 12 bytes of SHA-256 of `key`, in hex.
pub fn job_id_from(prefix: &str, key: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(key.as_bytes());
    let hex: String = h.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_roundtrip() {
        let mut b = Bitmap::new(20);
        b.set(0);
        b.set(19);
        b.set(19);
        b.set(25);
        assert_eq!(b.count(), 2);
        let c = Bitmap::decode(&b.encode(), 20).unwrap();
        assert!(c.get(0) && c.get(19) && !c.get(1));
        assert_eq!(c.count(), 2);
    }

    #[test]
    fn journal_locks_and_resumes() {
        let d = tempfile::tempdir().unwrap();
        let fresh = JobState {
            id: "j1".into(),
            kind: "t".into(),
            version: JOURNAL_VERSION,
            disks: vec![DiskPart {
                block_count: 10,
                ..Default::default()
            }],
            ..Default::default()
        };
        let (mut j, resumed) = Journal::open_or_create(d.path(), fresh.clone()).unwrap();
        assert!(!resumed);
        assert!(
            Journal::open_or_create(d.path(), fresh.clone()).is_err(),
            "second writer must be refused"
        );
        j.parts[0].set(3);
        j.state.ids.insert(JobKey::Image, "ami-1".into());
        j.save().unwrap();
        drop(j);
        let (j, resumed) = Journal::open_or_create(d.path(), fresh.clone()).unwrap();
        assert!(resumed && j.parts[0].get(3) && j.state.ids[&JobKey::Image] == "ami-1");
        drop(j);
        // A journal of another layout version is refused by name, never misread.
        let path = d.path().join("j1.json");
        let text = std::fs::read_to_string(&path).unwrap();
        for (v, word) in [(JOURNAL_VERSION + 1, "newer"), (2, "older")] {
            let other = text.replacen(
                &format!("\"version\": {JOURNAL_VERSION}"),
                &format!("\"version\": {v}"),
                1,
            );
            assert_ne!(other, text);
            std::fs::write(&path, &other).unwrap();
            let e = Journal::open_or_create(d.path(), fresh.clone())
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains(&format!("layout version {v}")) && e.contains(word),
                "{e}"
            );
            assert!(peek(&path).is_none());
        }
        // A field no target writes is refused as corrupt, not ignored.
        let bogus = text.replacen("\"ids\": {", "\"ids\": {\n    \"bogus\": \"x\",", 1);
        assert_ne!(bogus, text);
        std::fs::write(&path, &bogus).unwrap();
        let e = format!(
            "{:#}",
            Journal::open_or_create(d.path(), fresh).err().unwrap()
        );
        assert!(
            e.contains("corrupt job journal") && e.contains("bogus"),
            "{e}"
        );
    }
}
