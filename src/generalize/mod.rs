//! Generalisation: strip machine-specific state from a guest offline, into a small qcow2 overlay whose backing
//! file is the untouched source. libguestfs (virt-sysprep) does the filesystem writes; imgshift chooses the
//! operations, writes the overlay, and checks the result with its own inspection before and after.

pub mod operations;
pub mod overlay;
pub mod sysprep;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use imgshift_converters::{DiskSource, Format, OpenGate};
use serde::Serialize;

use operations::{Effect, Operation};
use verify::Found;

/// What one operation found and did.
#[derive(Debug, Clone, Serialize)]
pub struct OperationReport {
    /// Operation name.
    pub name: &'static str,
    /// "remove" or "empty".
    pub action: &'static str,
    /// Matching paths in the source (path → size).
    pub before: BTreeMap<String, u64>,
    /// Paths removed (or, for an emptying operation, emptied), by imgshift's own inspection of the result.
    pub done: Vec<String>,
    /// Paths still there with content after generalisation.
    pub remaining: Vec<String>,
}

/// The outcome of a generalisation (or a dry run).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The source image (never modified).
    pub source: String,
    /// Root filesystem device.
    pub root: String,
    /// Distribution and version, from the source's inspection.
    pub distro: Option<String>,
    /// True for `--dry-run`: nothing was written.
    pub dry_run: bool,
    /// Per operation.
    pub operations: Vec<OperationReport>,
    /// Files that must stay intact, with their SHA-256 before (and whether it is unchanged after).
    pub kept: BTreeMap<String, KeptFile>,
    /// The overlay written (absent for a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayReport>,
    /// Seconds spent in virt-sysprep.
    pub sysprep_seconds: f64,
    /// Seconds in all.
    pub total_seconds: f64,
}

/// A file that generalisation must not change.
#[derive(Debug, Clone, Serialize)]
pub struct KeptFile {
    /// SHA-256 in the source.
    pub sha256: String,
    /// Whether the generalised guest has the same bytes (absent for a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unchanged: Option<bool>,
}

/// The overlay written.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayReport {
    /// Where it is.
    pub path: String,
    /// Its backing file, as recorded in it.
    pub backing_file: String,
    /// Its backing file's format, as recorded in it.
    pub backing_format: String,
    /// Bytes the overlay occupies on disk.
    pub allocated_bytes: u64,
}

/// What to do.
pub struct Request<'a> {
    /// The source image path.
    pub source: &'a Path,
    /// Its format.
    pub format: Format,
    /// The opened source.
    pub src: Arc<dyn DiskSource>,
    /// Where the overlay goes.
    pub overlay: &'a Path,
    /// Operations to run.
    pub ops: &'a [&'static Operation],
    /// New hostname.
    pub hostname: Option<&'a str>,
    /// Only inspect and list.
    pub dry_run: bool,
}

/// Generalises (or, with `dry_run`, lists what would be removed).
pub fn run(req: &Request<'_>) -> Result<Outcome> {
    let started = Instant::now();
    if !req.dry_run {
        // Before the (slower) inspection: the overlay could not be made anyway.
        overlay::refuse_ova(req.source, req.format)?;
        overlay::refuse_chain_qemu_reads_differently(req.src.as_ref())?;
    }
    let before = verify::open(req.src.clone())
        .with_context(|| format!("cannot generalise {}", req.source.display()))?;
    let globs: Vec<&str> = req
        .ops
        .iter()
        .flat_map(|o| o.paths.iter().copied())
        .collect();
    let before_found = before.find(&globs);
    let kept_before = before.hashes(verify::KEPT);
    let distro = before.report.operatingsystems.first().and_then(|o| {
        o.facts
            .product_name
            .clone()
            .or_else(|| o.facts.distro.clone())
    });
    let mut outcome = Outcome {
        source: req.source.display().to_string(),
        root: before.root.clone(),
        distro,
        dry_run: req.dry_run,
        operations: Vec::new(),
        kept: kept_before
            .iter()
            .map(|(p, h)| {
                (
                    p.clone(),
                    KeptFile {
                        sha256: h.clone(),
                        unchanged: None,
                    },
                )
            })
            .collect(),
        overlay: None,
        sysprep_seconds: 0.0,
        total_seconds: 0.0,
    };
    if req.dry_run {
        for op in req.ops {
            let found = before.find(op.paths);
            outcome.operations.push(OperationReport {
                name: op.name,
                action: action(op.effect),
                before: sizes(&found),
                done: Vec::new(),
                remaining: Vec::new(),
            });
        }
        outcome.total_seconds = started.elapsed().as_secs_f64();
        return Ok(outcome);
    }
    drop(before_found);

    let pending = overlay::create(req.source, req.format, req.src.virtual_size(), req.overlay)?;
    let took: Duration = sysprep::run(&pending.temp_path, req.ops, req.hostname)?;
    outcome.sysprep_seconds = took.as_secs_f64();

    // The result, through the overlay and its backing chain (the source's folder is trusted for it).
    let gate = source_gate(req.source)?;
    let after_src: Arc<dyn DiskSource> =
        imgshift_converters::open_path(&pending.temp_path, Some(Format::Qcow2), &gate)
            .map(Arc::from)
            .context("cannot open the overlay virt-sysprep wrote")?;
    let after = verify::open(after_src).context("cannot inspect the generalised guest")?;
    for op in req.ops {
        let b = before.find(op.paths);
        let a = after.find(op.paths);
        let mut done = Vec::new();
        let mut remaining = Vec::new();
        for (path, f) in &b {
            match (op.effect, a.get(path)) {
                (Effect::Remove, None) => done.push(path.clone()),
                (Effect::Empty, Some(Found { size: 0 })) if f.size > 0 => done.push(path.clone()),
                (Effect::Empty, None) => done.push(path.clone()),
                (_, Some(g)) if g.size > 0 || op.effect == Effect::Remove => {
                    remaining.push(path.clone())
                }
                _ => {}
            }
        }
        outcome.operations.push(OperationReport {
            name: op.name,
            action: action(op.effect),
            before: sizes(&b),
            done,
            remaining,
        });
    }
    let kept_after = after.hashes(verify::KEPT);
    for (p, k) in outcome.kept.iter_mut() {
        k.unchanged = Some(kept_after.get(p) == Some(&k.sha256));
    }
    let final_path: PathBuf = pending.final_path.clone();
    let backing_file = pending.backing_name.clone();
    pending.commit()?;
    outcome.overlay = Some(OverlayReport {
        path: final_path.display().to_string(),
        backing_file,
        backing_format: req.format.name().to_string(),
        allocated_bytes: allocated(&final_path),
    });
    outcome.total_seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// The open gate for an overlay: its own folder (the default) and the source's folder, where its backing file is.
fn source_gate(source: &Path) -> Result<OpenGate> {
    let canon = source
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", source.display()))?;
    let mut gate = OpenGate::new();
    if let Some(dir) = canon.parent() {
        gate = gate.allow_dir(dir)?;
    }
    Ok(gate)
}

fn action(e: Effect) -> &'static str {
    match e {
        Effect::Remove => "remove",
        Effect::Empty => "empty",
    }
}

fn sizes(found: &BTreeMap<String, Found>) -> BTreeMap<String, u64> {
    found.iter().map(|(p, f)| (p.clone(), f.size)).collect()
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or(0, |m| m.blocks().saturating_mul(512))
}

/// A source seen through a generalisation overlay, for `convert --generalize` and the upload commands.
pub struct Generalized {
    /// The overlay with its backing chain: what gets converted or uploaded.
    pub source: Box<dyn DiskSource>,
    /// The report, when this run generalised (absent when an earlier run's overlay was reused).
    pub outcome: Option<Outcome>,
    /// Why nothing was done: a Windows guest that sysprep already generalised is passed through unchanged.
    pub note: Option<String>,
}

/// Generalises `source` into `overlay` (or, when `reuse` and it exists, takes the overlay an interrupted earlier
/// run made: a resumed upload must send the same bytes) and opens it with its backing chain.
pub fn prepare(
    source: &Path,
    src: Box<dyn DiskSource>,
    spec: Option<&str>,
    target: Option<operations::Target>,
    overlay: &Path,
    reuse: bool,
) -> Result<Generalized> {
    // Windows: already generalised passes through unchanged; otherwise refused with the sysprep command.
    let src: Arc<dyn DiskSource> = Arc::from(src);
    if let Some(note) = verify::windows_state(Arc::clone(&src))? {
        return Ok(Generalized {
            source: Box::new(src),
            outcome: None,
            note: Some(note),
        });
    }
    let format = src.format();
    let outcome = if reuse && overlay.exists() {
        None
    } else {
        sysprep::find()?;
        if overlay.exists() {
            std::fs::remove_file(overlay).with_context(|| {
                format!("cannot remove the stale overlay {}", overlay.display())
            })?;
        }
        let ops = operations::select(spec, target).map_err(|e| anyhow::anyhow!(e))?;
        Some(run(&Request {
            source,
            format,
            src,
            overlay,
            ops: &ops,
            hostname: None,
            dry_run: false,
        })?)
    };
    let gate = source_gate(source)?;
    let opened = imgshift_converters::open_path(overlay, Some(Format::Qcow2), &gate)
        .with_context(|| format!("cannot open the overlay {}", overlay.display()))?;
    Ok(Generalized {
        source: opened,
        outcome,
        note: None,
    })
}

/// One line for standard error about what a generalisation did.
pub fn summary(o: &Outcome) -> String {
    let done: usize = o.operations.iter().map(|op| op.done.len()).sum();
    let remaining: Vec<&str> = o
        .operations
        .iter()
        .flat_map(|op| op.remaining.iter().map(String::as_str))
        .collect();
    format!(
        "generalised {} ({}): {done} item(s) removed or emptied by {} operation(s){}; virt-sysprep {:.1} s",
        o.source,
        o.distro.as_deref().unwrap_or("unknown distribution"),
        o.operations.len(),
        if remaining.is_empty() {
            String::new()
        } else {
            format!(", still present: {}", remaining.join(" "))
        },
        o.sysprep_seconds
    )
}
