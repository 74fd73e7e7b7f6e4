//! Recovery points as a qcow2 chain in one folder: `NAME.1.qcow2` holds the first full copy, `NAME.N.qcow2` only
//! the blocks that changed since point N-1 (its backing file, named relative to the folder, so the folder can be
//! moved). Beside them `NAME.replica.json` records the points and `NAME.N.sha256` their block hashes: the state
//! lives with the replica.
//!
//! Each point file is written under a temporary name and renamed when complete, then the state file is replaced
//! atomically: a run killed at any moment leaves either no point N or a complete one, and the rerun writes point
//! N again. Dropping the oldest point (`--keep`) first makes the next point self-contained (its chain copied into
//! one file, renamed over it), then deletes the oldest file.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use imgshift_converters::engine::{convert_with_map, source_map};
use imgshift_converters::{ConvertOptions, Durability, Format, NoProgress, WriterOptions};
use serde::{Deserialize, Serialize};

use crate::replica::{Point, PointInput, ReplicaStore, read_bounded, write_atomic};

/// Version of the state file's layout.
const STATE_VERSION: u32 = 1;
/// Largest state file read (thousands of points fit in far less).
const MAX_STATE: u64 = 16 << 20;
/// Largest hash file read (64 KiB per GiB of disk: 64 TiB).
const MAX_HASHES: u64 = 4 << 30;

/// The state file.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    version: u32,
    name: String,
    points: Vec<Point>,
}

/// A folder of qcow2 layers.
pub struct FileStore {
    dir: PathBuf,
    stop: std::sync::Arc<AtomicBool>,
}

impl FileStore {
    /// Points in `dir` (which must exist); `stop` ends a copy early.
    pub fn new(dir: &Path, stop: std::sync::Arc<AtomicBool>) -> Result<FileStore> {
        if !dir.is_dir() {
            bail!("the replica folder {} does not exist", dir.display());
        }
        Ok(FileStore {
            dir: dir.to_path_buf(),
            stop,
        })
    }

    /// The file of point `n` of replica `name`.
    pub fn point_file(name: &str, n: u32) -> String {
        format!("{name}.{n}.qcow2")
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.replica.json"))
    }

    fn hashes_path(&self, name: &str, n: u32) -> PathBuf {
        self.dir.join(format!("{name}.{n}.sha256"))
    }

    fn read_state(&self, name: &str) -> Result<State> {
        let path = self.state_path(name);
        let text = match read_bounded(&path, MAX_STATE)? {
            Some(t) => t,
            None => {
                return Ok(State {
                    version: STATE_VERSION,
                    name: name.to_string(),
                    points: Vec::new(),
                });
            }
        };
        let state: State = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a replica state file", path.display()))?;
        if state.version != STATE_VERSION {
            bail!(
                "{} has layout version {}; this imgshift reads version {STATE_VERSION}",
                path.display(),
                state.version
            );
        }
        if state.name != name {
            bail!("{} is the state of replica {}", path.display(), state.name);
        }
        Ok(state)
    }

    fn write_state(&self, state: &State) -> Result<()> {
        let path = self.state_path(&state.name);
        let body = serde_json::to_vec_pretty(state)?;
        write_atomic(&self.dir, &path, &body)
    }

    fn open_file(&self, file: &str) -> Result<Box<dyn imgshift_converters::DiskSource>> {
        let path = self.dir.join(file);
        crate::open::open_image(&path, Some("qcow2"), std::slice::from_ref(&self.dir))
    }

    /// Writes `src` restricted to `map` as a qcow2 file named `file` (over `backing` when given).
    fn write_layer(
        &self,
        file: &str,
        backing: Option<&str>,
        src: &dyn imgshift_converters::DiskSource,
        map: &imgshift_converters::ExtentMap,
        progress: &dyn imgshift_converters::Progress,
    ) -> Result<u64> {
        let mut opts = WriterOptions::default();
        if let Some(b) = backing {
            opts.set("backing_file", b);
            opts.set("backing_fmt", "qcow2");
        }
        let mut writer = imgshift_converters::create_writer(Format::Qcow2, &mut opts)?;
        self.remove_stale_temporaries(file)?;
        let path = self.dir.join(file);
        let (set, mut sink) = crate::interrupt::output_set(&path, Durability::Writeback)
            .map_err(|e| crate::open::naming(e, &path))?;
        let stats = convert_with_map(
            src,
            map,
            writer.as_mut(),
            &mut sink,
            &ConvertOptions::default(),
            progress,
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        drop(sink);
        crate::journal::pause_point("replicate-point-written");
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        set.commit().map_err(|e| crate::open::naming(e, &path))?;
        Ok(stats.bytes_written)
    }
}

impl FileStore {
    /// Removes what a run killed while writing `file` left behind: its temporary files (`.FILE.*.imgshift-tmp`,
    /// as [`imgshift_converters::OutputSet`] names them). Only runs holding the replica's lock write them.
    fn remove_stale_temporaries(&self, file: &str) -> Result<()> {
        let prefix = format!(".{file}.");
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?;
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&prefix) && n.ends_with(".imgshift-tmp") {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("cannot remove {}", e.path().display()))?;
            }
        }
        Ok(())
    }
}

impl ReplicaStore for FileStore {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    fn points(&mut self, name: &str) -> Result<Vec<Point>> {
        let state = self.read_state(name)?;
        for p in &state.points {
            if !self.dir.join(&p.target_id).is_file() {
                bail!(
                    "point {} of replica {name} ({}) is missing from {}",
                    p.number,
                    p.target_id,
                    self.dir.display()
                );
            }
        }
        Ok(state.points)
    }

    fn write_point(&mut self, input: PointInput<'_>) -> Result<crate::replica::Point> {
        let file = Self::point_file(input.name, input.point.number);
        let backing = input.parent.map(|p| p.target_id.as_str());
        let map = input.changes.as_map()?;
        let sent = self.write_layer(&file, backing, input.src, &map, input.progress)?;
        let mut point = input.point;
        point.target_id = file;
        point.sent_bytes = sent;
        let mut state = self.read_state(input.name)?;
        state.points.retain(|p| p.number < point.number);
        state.points.push(point.clone());
        self.write_state(&state)?;
        Ok(point)
    }

    fn delete_oldest(&mut self, name: &str, drop: &[Point], first_kept: &Point) -> Result<()> {
        let kept = self.open_file(&first_kept.target_id)?;
        if kept.backing().is_some() {
            // Make the first kept point self-contained: its whole chain into one file, renamed over it.
            let map = source_map(kept.as_ref())?;
            self.write_layer(
                &first_kept.target_id,
                None,
                kept.as_ref(),
                &map,
                &NoProgress,
            )?;
        }
        drop_reader(kept);
        let mut state = self.read_state(name)?;
        state
            .points
            .retain(|p| !drop.iter().any(|d| d.number == p.number));
        self.write_state(&state)?;
        for d in drop {
            for path in [
                self.dir.join(&d.target_id),
                self.hashes_path(name, d.number),
            ] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot delete {}", path.display()));
                    }
                }
            }
        }
        Ok(())
    }

    fn open_point(
        &mut self,
        _name: &str,
        p: &Point,
    ) -> Result<Option<Box<dyn imgshift_converters::DiskSource>>> {
        self.open_file(&p.target_id).map(Some)
    }

    fn load_hashes(&mut self, name: &str, p: &Point) -> Result<Option<Vec<u8>>> {
        read_bounded(&self.hashes_path(name, p.number), MAX_HASHES)
    }

    fn save_hashes(&mut self, name: &str, p: &Point, hashes: &[u8]) -> Result<()> {
        write_atomic(&self.dir, &self.hashes_path(name, p.number), hashes)
    }
}

/// Closes a reader (and the files of its chain).
fn drop_reader(r: Box<dyn imgshift_converters::DiskSource>) {
    std::mem::drop(r);
}
