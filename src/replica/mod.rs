//! A replica and its recovery points, as every replica store keeps them: the point record ([`Point`]), what
//! changed since the last point ([`changes::ChangeSet`]), per-block hashes for sources that cannot say what
//! changed ([`hashes::BlockHashes`]), a source that counts what is read from it ([`counting::CountingSource`]),
//! and the trait each target implements to hold points ([`ReplicaStore`]).
//!
//! This is the layer between the targets and `imgshift replicate`: it knows no command line and no particular
//! target. The orchestration (lock, change detection, pruning) is in `crate::replicate`.

pub mod changes;
pub mod counting;
pub mod hashes;

use std::path::Path;

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, Progress};
use serde::{Deserialize, Serialize};

use changes::ChangeSet;

/// The replication block: EBS's snapshot block size (512 KiB), so one changed block is one EBS block; a
/// multiple of every qcow2 cluster size up to 512 KiB and of Azure's 512-byte pages.
pub const BLOCK: u64 = 512 * 1024;

/// One recovery point, as the replica's target records it (tags, blob metadata, or the state file beside the
/// points).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// 1 for the first (full) copy, then 2, 3, ...
    pub number: u32,
    /// When the point was made (RFC 3339, UTC).
    pub created: String,
    /// The target's name for it: an EBS snapshot id, a blob snapshot time, a file or volume name.
    pub target_id: String,
    /// What was replicated (`aws:snap-…`, a file's path, ...).
    pub source: String,
    /// The source-side snapshot the point was made from, when the source has snapshots (the next run asks the
    /// source what changed since it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_snapshot: Option<String>,
    /// Virtual size of the disk in bytes.
    pub virtual_size: u64,
    /// Bytes the change detection called changed (the whole disk's data for point 1).
    pub changed_bytes: u64,
    /// Bytes sent to the target for this point.
    pub sent_bytes: u64,
    /// How the changes were found: `full`, `hashes`, `ebs-changed-blocks`, `azure-page-diff`, `qcow2-bitmap`.
    pub detection: String,
    /// The source qcow2's dirty bitmap the point was made with (`--bitmap`): the next run may read only what it
    /// marks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What inspecting the source found when the point was made (failover sets the target up from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestRecord>,
}

/// What inspection found about the guest of a point, per target: the preflight verdict and the settings it
/// implies (boot mode, firmware, disk bus), so failover needs no second look at the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// One line: the operating system found, or that none was.
    pub os: String,
    /// The guest's OS was read (a Linux root or a Windows registry): its drivers and boot mode are known.
    pub os_read: bool,
    /// What the partition table suggests: `uefi` (GPT with an ESP) or `bios`, and why.
    pub partition_firmware: Option<(String, String)>,
    /// Per target (`aws`, `azure`, `libvirt`): the preflight verdict.
    pub targets: std::collections::BTreeMap<String, TargetVerdict>,
}

/// A preflight verdict as recorded with a point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetVerdict {
    /// `ok`, `warn` or `fail`.
    pub verdict: String,
    /// Each finding: level, reason and fix, one line.
    pub findings: Vec<String>,
    /// Settings for the target (boot mode, firmware, bus).
    pub settings: std::collections::BTreeMap<String, String>,
}

/// What a store needs to write one point.
pub struct PointInput<'a> {
    /// The replica's name.
    pub name: &'a str,
    /// The point to make: everything but `target_id` and `sent_bytes`, which the store fills in.
    pub point: Point,
    /// The point it builds on (`None` for the first).
    pub parent: Option<&'a Point>,
    /// The source disk.
    pub src: &'a dyn DiskSource,
    /// The ranges to write; everything else is the parent's. For the first point, the source's data.
    pub changes: &'a ChangeSet,
    /// Progress over the changed bytes.
    pub progress: &'a dyn Progress,
}

/// Where a replica's points live. Each target keeps its points in its own terms (EBS snapshots, a page blob's
/// snapshots, qcow2 layers) and records in them what [`Point`] says, so replication can go on from another machine.
pub trait ReplicaStore {
    /// One line naming where the points live (`file /srv/dr`, `aws eu-west-1`).
    fn describe(&self) -> String;
    /// The replica's complete points, oldest first, as the target records them.
    fn points(&mut self, name: &str) -> Result<Vec<Point>>;
    /// Writes one point. A point of the same number left unfinished by an interrupted run is finished or
    /// replaced, never duplicated.
    fn write_point(&mut self, input: PointInput<'_>) -> Result<Point>;
    /// Deletes the oldest points `drop`; `first_kept`, the point after them, must keep its content.
    fn delete_oldest(&mut self, name: &str, drop: &[Point], first_kept: &Point) -> Result<()>;
    /// A reader of point `p`'s full content, when the target can be read back.
    fn open_point(&mut self, name: &str, p: &Point) -> Result<Option<Box<dyn DiskSource>>>;
    /// The block hashes stored with point `p`, when the target keeps them.
    fn load_hashes(&mut self, name: &str, p: &Point) -> Result<Option<Vec<u8>>> {
        let _ = (name, p);
        Ok(None)
    }
    /// Stores the block hashes of point `p` with the replica, when the target can.
    fn save_hashes(&mut self, name: &str, p: &Point, hashes: &[u8]) -> Result<()> {
        let _ = (name, p, hashes);
        Ok(())
    }
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// `secs` since the epoch as RFC 3339 UTC (civil-from-days, Howard Hinnant's algorithm).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The contents of `path`, `None` when it does not exist; refuses files over `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut buf = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if buf.len() as u64 > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(Some(buf))
}

/// Replaces `path` (in `dir`) with `body` atomically: a temporary file, synced, renamed.
pub fn write_atomic(dir: &Path, path: &Path, body: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = tempfile::Builder::new()
        .prefix(".imgshift-state.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(body)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename onto {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_601_600 + 3661), "2026-12-07T01:01:01Z");
    }
}
