//! `imgshift replicate`'s run: one recovery point per run, holding only what changed since the last.
//!
//! A run takes the replica's lock (one run at a time per replica and state folder), asks the target which points
//! exist (the target is the truth: replication goes on from another machine), finds what changed in the source
//! — the source's own diff when it has one, else per-block hashes against the last point's — writes the next
//! point over the last, records the new hashes, and drops the oldest points beyond `--keep`. A run that finds
//! nothing changed makes no point and says so.
//!
//! Hashes are cached in the state folder (`replicas/NAME.N.sha256`) and kept with the replica where the target
//! can hold them; when neither has them, the last point is read back from the target and hashed (reading, not
//! sending).

pub mod guest;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use imgshift_converters::DiskSource;
use imgshift_converters::engine::source_map;

use crate::replica::changes::ChangeSet;
use crate::replica::counting::CountingSource;
use crate::replica::hashes::{self, BlockHashes};
use crate::replica::{Point, PointInput, ReplicaStore, now_rfc3339};

/// Largest cached hash file read.
const MAX_HASHES: u64 = 4 << 30;

/// How a run finds what changed, when the source can say.
pub enum SourceDiff<'a> {
    /// The source cannot say: hash it.
    None,
    /// The dirty ranges of a persistent dirty bitmap of the source qcow2 (qemu's incremental-backup tracking):
    /// used when the last point was made with the same bitmap, which therefore already tracked every write
    /// since.
    Bitmap {
        /// The bitmap's name.
        name: String,
        /// Its dirty byte ranges `[start, end)`, sorted.
        ranges: Vec<(u64, u64)>,
    },
    /// The source is a snapshot that can be compared with the last point's source snapshot (an EBS snapshot).
    Snapshots(&'a dyn SnapshotDiff),
}

/// A source that can list what changed between two of its snapshots.
pub trait SnapshotDiff {
    /// Detection name (`ebs-changed-blocks`).
    fn how(&self) -> &'static str;
    /// Changed byte ranges between `previous` and the current snapshot, sorted; `Ok(None)` when the two cannot
    /// be compared (not of one lineage), so the run falls back to hashing.
    fn changed_since(&self, previous: &str) -> Result<Option<Vec<(u64, u64)>>>;
}

/// One run's settings.
pub struct Spec<'a> {
    /// Replica name.
    pub name: &'a str,
    /// The source as the user named it (recorded in the points).
    pub source_name: String,
    /// The source's snapshot id, when it has one (a snapshot of the same id as the last point's means nothing
    /// changed).
    pub source_snapshot: Option<String>,
    /// The source disk.
    pub src: &'a dyn DiskSource,
    /// Its own change tracking.
    pub diff: SourceDiff<'a>,
    /// Points to keep (oldest dropped first).
    pub keep: Option<u32>,
    /// The replica cache folder (`STATE_DIR/replicas`).
    pub cache_dir: PathBuf,
    /// Threads reading the source for hashing.
    pub threads: usize,
    /// Ends the work early.
    pub stop: &'a AtomicBool,
    /// What inspecting the source found (recorded with the point).
    pub guest: Option<crate::replica::GuestRecord>,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// The replica.
    pub replica: String,
    /// The point made (`None`: nothing changed).
    pub point: Option<Point>,
    /// The newest point before this run.
    pub previous: Option<u32>,
    /// How changes were found.
    pub detection: String,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes the detection called changed.
    pub changed_bytes: u64,
    /// Bytes sent to the target.
    pub sent_bytes: u64,
    /// Points deleted by `--keep`.
    pub deleted: Vec<u32>,
    /// One-line warnings (a fallback to hashing, a source that changed).
    pub warnings: Vec<String>,
}

/// Holds the replica's lock until dropped.
pub struct ReplicaLock {
    _file: std::fs::File,
}

/// Takes the lock of replica `name` in `cache_dir` (created when missing).
pub fn lock(cache_dir: &Path, name: &str) -> Result<ReplicaLock> {
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let path = cache_dir.join(format!("{name}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(ReplicaLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("replica {name} is being replicated by another imgshift process")
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// A replica name: letters, digits, `-`, `_` and `.`, not starting with `.` (it names files, volumes and tags).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 80
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!(
            "replica name '{name}': use 1 to 80 letters, digits, '-', '_' or '.', not starting with '.'"
        );
    }
    Ok(())
}

fn cache_path(dir: &Path, name: &str, n: u32) -> PathBuf {
    dir.join(format!("{name}.{n}.sha256"))
}

/// The hashes of point `p` kept in the local cache or with the replica (unreadable copies are reported in
/// `warnings` and passed over).
fn stored_hashes(
    spec: &Spec<'_>,
    store: &mut dyn ReplicaStore,
    p: &Point,
    warnings: &mut Vec<String>,
) -> Result<Option<BlockHashes>> {
    let cached = crate::replica::read_bounded(
        &cache_path(&spec.cache_dir, spec.name, p.number),
        MAX_HASHES,
    )?;
    for bytes in [cached, store.load_hashes(spec.name, p)?]
        .into_iter()
        .flatten()
    {
        match BlockHashes::from_bytes(&bytes, p.virtual_size) {
            Ok(h) => return Ok(Some(h)),
            Err(e) => warnings.push(format!(
                "ignoring stored block hashes of point {}: {e:#}",
                p.number
            )),
        }
    }
    Ok(None)
}

/// The hashes of point `p`: the local cache, else the store's copy, else read back from the target and hashed.
/// `None` when none of these is possible.
fn previous_hashes(
    spec: &Spec<'_>,
    store: &mut dyn ReplicaStore,
    p: &Point,
    warnings: &mut Vec<String>,
) -> Result<Option<BlockHashes>> {
    if let Some(h) = stored_hashes(spec, store, p, warnings)? {
        return Ok(Some(h));
    }
    match store.open_point(spec.name, p)? {
        Some(reader) => {
            warnings.push(format!(
                "no block hashes of point {} are kept here: reading it back from the target to hash it",
                p.number
            ));
            Ok(Some(BlockHashes::compute(
                reader.as_ref(),
                spec.threads,
                spec.stop,
            )?))
        }
        None => Ok(None),
    }
}

/// Makes the next point of `spec.name` in `store`.
pub fn run(
    spec: &Spec<'_>,
    store: &mut dyn ReplicaStore,
    progress: &dyn imgshift_converters::Progress,
) -> Result<Outcome> {
    check_name(spec.name)?;
    let _lock = lock(&spec.cache_dir, spec.name)?;
    let points = store.points(spec.name)?;
    let prev = points.last();
    let size = spec.src.virtual_size();
    let counting = CountingSource::new(spec.src);
    let mut warnings = Vec::new();
    let mut outcome = Outcome {
        replica: spec.name.to_string(),
        point: None,
        previous: prev.map(|p| p.number),
        detection: String::new(),
        bytes_read: 0,
        changed_bytes: 0,
        sent_bytes: 0,
        deleted: Vec::new(),
        warnings: Vec::new(),
    };
    if let Some(p) = prev {
        if p.source != spec.source_name {
            warnings.push(format!(
                "replica {} was made from {}; this point is from {}",
                spec.name, p.source, spec.source_name
            ));
        }
        if p.virtual_size != size {
            bail!(
                "the source is {size} bytes but replica {} holds {}-byte points: a replica keeps one disk size; \
                 start a new replica under another name",
                spec.name,
                p.virtual_size
            );
        }
        if spec.source_snapshot.is_some() && spec.source_snapshot == p.source_snapshot {
            outcome.detection = "same-snapshot".into();
            outcome.warnings = warnings;
            return Ok(outcome);
        }
    }

    // What changed, and the hashes of the new point when they come out of the detection.
    let mut new_hashes: Option<BlockHashes> = None;
    let (changes, how) = match prev {
        None => {
            let map = source_map(&counting).context("cannot map the source")?;
            (ChangeSet::data_of(&map, size), "full")
        }
        Some(p) => {
            let from_source = match &spec.diff {
                SourceDiff::None => None,
                SourceDiff::Bitmap { name, ranges } => {
                    if p.bitmap.as_deref() == Some(name.as_str()) {
                        Some((ChangeSet::from_ranges(ranges, size)?, "qcow2-bitmap"))
                    } else {
                        warnings.push(format!(
                            "point {} was not made with --bitmap {name}, so the bitmap may miss earlier writes: \
                             hashing the source this time (later runs read the bitmap)",
                            p.number
                        ));
                        None
                    }
                }
                SourceDiff::Snapshots(d) => match &p.source_snapshot {
                    Some(prev_snap) => match d.changed_since(prev_snap)? {
                        Some(r) => Some((ChangeSet::from_ranges(&r, size)?, d.how())),
                        None => {
                            warnings.push(format!(
                                "{} and the source snapshot of point {} cannot be compared: hashing the source \
                                 instead",
                                spec.source_snapshot.as_deref().unwrap_or("the source"),
                                p.number
                            ));
                            None
                        }
                    },
                    None => None,
                },
            };
            match from_source {
                Some(c) => c,
                None => match previous_hashes(spec, store, p, &mut warnings)? {
                    Some(before) => {
                        let now = BlockHashes::compute(&counting, spec.threads, spec.stop)?;
                        let c = now.changed_since(&before);
                        new_hashes = Some(now);
                        (c, "hashes")
                    }
                    None => {
                        warnings.push(format!(
                            "point {} cannot be read back and no block hashes of it are kept: sending the whole \
                             disk again",
                            p.number
                        ));
                        let all = [(0, size)];
                        (ChangeSet::from_ranges(&all, size)?, "full")
                    }
                },
            }
        }
    };
    outcome.detection = how.to_string();
    outcome.changed_bytes = changes.bytes();
    if prev.is_some() && changes.is_empty() {
        outcome.bytes_read = counting.bytes_read();
        outcome.warnings = warnings;
        return Ok(outcome);
    }

    let number = prev
        .map_or(Some(1), |p| p.number.checked_add(1))
        .context("too many points")?;
    counting.record_hashes();
    let point = store.write_point(PointInput {
        name: spec.name,
        point: Point {
            number,
            created: now_rfc3339(),
            target_id: String::new(),
            source: spec.source_name.clone(),
            source_snapshot: spec.source_snapshot.clone(),
            virtual_size: size,
            changed_bytes: changes.bytes(),
            sent_bytes: 0,
            detection: how.to_string(),
            bitmap: match &spec.diff {
                SourceDiff::Bitmap { name, .. } => Some(name.clone()),
                _ => None,
            },
            guest: spec.guest.clone(),
        },
        parent: prev,
        src: &counting,
        changes: &changes,
        progress,
    })?;
    let recorded = counting.take_hashes();
    if new_hashes.is_none() {
        let before = match prev {
            Some(p) => stored_hashes(spec, store, p, &mut warnings)?,
            None => None,
        };
        new_hashes = hashes::after_point(
            before.as_ref(),
            how == "full",
            &changes,
            recorded,
            &counting,
            spec.threads,
            spec.stop,
        )?;
    }
    if let Some(h) = &new_hashes {
        let bytes = h.to_bytes();
        crate::replica::write_atomic(
            &spec.cache_dir,
            &cache_path(&spec.cache_dir, spec.name, point.number),
            &bytes,
        )?;
        store.save_hashes(spec.name, &point, &bytes)?;
    }
    if let Some(p) = prev {
        let _ = std::fs::remove_file(cache_path(&spec.cache_dir, spec.name, p.number));
    }
    outcome.bytes_read = counting.bytes_read();
    outcome.sent_bytes = point.sent_bytes;
    outcome.point = Some(point);

    if let Some(keep) = spec.keep {
        let all = store.points(spec.name)?;
        let excess = all.len().saturating_sub(keep.max(1) as usize);
        if let (Some(drop), Some(first_kept)) = (all.get(..excess), all.get(excess))
            && !drop.is_empty()
        {
            store.delete_oldest(spec.name, drop, first_kept)?;
            outcome.deleted = drop.iter().map(|p| p.number).collect();
        }
    }
    outcome.warnings = warnings;
    Ok(outcome)
}
