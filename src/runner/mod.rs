//! The job runner: one resumable job from source disks to a target, in stages, for every command that makes
//! something on a target (`migrate`, `upload aws|azure`, and `resume` of either).
//!
//! Stages, in order, each recorded in the job's journal when it finishes (so a rerun or `resume` skips it):
//! `inspect` (inspection + the target's preflight; a failing verdict stops before any target call unless
//! forced), `generalize` (optional, a qcow2 overlay in the job folder), `upload` (per disk, streamed from the
//! engine, resumable per unit), `register`, `verify` (read back what the target holds), then the target's
//! after-stages (AWS: `copy`, `share`, `launch-template`). Which stages run is the
//! command's choice ([`Stages`]); what each does on a cloud is the target's ([`crate::job::Target`]), and every
//! target-side resource is recorded in the journal before or as it is created, which is what `jobs cancel`
//! removes through the same target.

pub mod plan;

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, ExtentKind, ExtentMap};

use crate::generalize::operations::Target as GenTarget;
use crate::guest::preflight::Level;
use crate::job::{DiskInfo, Job, Target, UploadStats, map_disk};
use crate::journal::{DiskPart, JOURNAL_VERSION, JobState, Journal, StageRecord, pause_point};
use crate::open::SourceDisks;
use crate::progress::{StageUi, human_size};
use plan::Preflight;

/// Disk stage once its upload finished.
const DISK_UPLOADED: &str = "uploaded";

/// Which stages a job runs (`upload` always).
#[derive(Debug, Clone, Copy)]
pub struct Stages {
    /// Inspect the boot disk and apply the target's preflight.
    pub inspect: bool,
    /// Register an image or domain.
    pub register: bool,
    /// Read back what the target holds.
    pub verify: bool,
}

/// What the runner needs to know of a job besides its target.
pub struct RunSpec {
    /// Job id (the same command on the same unchanged source gives the same id).
    pub id: String,
    /// Journal kind ("migrate-aws", "aws-upload"), which `resume` and `jobs` read.
    pub kind: String,
    /// The target's name ("aws").
    pub target_name: &'static str,
    /// What is made is named after this.
    pub name: String,
    /// The source, as the user named it.
    pub source_label: String,
    /// The opened source disks.
    pub sources: SourceDisks,
    /// What reading the sources holds open (a cloud's read grant), as `(kind, id)`: recorded in the journal once
    /// the target is reached, so `jobs cancel` releases it after a killed run.
    pub source_resources: Vec<(String, String)>,
    /// The boot disk's image file and how to open it again (for generalisation).
    pub boot_path: PathBuf,
    /// Opens the boot disk again (the generalisation overlay's backing).
    pub reopen_boot: Box<dyn Fn() -> Result<Box<dyn DiskSource>>>,
    /// `--generalize` operations and the target they are for.
    pub generalize: Option<(String, GenTarget)>,
    /// The stages to run.
    pub stages: Stages,
    /// Boot mode given on the command line (AWS), for the preflight.
    pub boot_mode: Option<String>,
    /// Go on although the preflight fails.
    pub force: bool,
    /// Ask before creating anything (unless `yes`).
    pub confirm: bool,
    /// Do not ask.
    pub yes: bool,
    /// Folder of the journal.
    pub state_dir: PathBuf,
    /// Tags for what is made.
    pub tags: Vec<(String, String)>,
    /// Say each step.
    pub verbose: bool,
    /// A one-shot job (`upload libvirt`): a failure after the journal was made removes what the job created
    /// (through the target's `cancel`) and forgets the job, instead of keeping it for `resume`.
    pub rollback: bool,
}

/// What a finished job made and sent.
pub struct RunOutcome {
    /// Job id.
    pub id: String,
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
    /// The disks, boot disk first.
    pub disks: Vec<DiskInfo>,
    /// Bytes sent per disk over every run of the job.
    pub sent: Vec<u64>,
    /// What this run sent, per disk.
    pub stats: Vec<UploadStats>,
    /// Units the target holds per disk (acknowledged blocks or windows).
    pub units_done: Vec<u64>,
    /// What the target made (its ids).
    pub outputs: serde_json::Value,
    /// The stages with their times and results.
    pub stages: Vec<StageRecord>,
}

/// The disks of `sources` with their maps.
pub fn disks_of(sources: &SourceDisks) -> Result<(Vec<DiskInfo>, Vec<ExtentMap>)> {
    let maps: Vec<ExtentMap> = sources
        .disks
        .iter()
        .zip(&sources.names)
        .map(|(d, n)| map_disk(d.as_ref(), n))
        .collect::<Result<_>>()?;
    let disks = sources
        .disks
        .iter()
        .zip(&sources.names)
        .zip(&maps)
        .map(|((d, n), m)| DiskInfo {
            name: n.clone(),
            virtual_size: d.virtual_size(),
            data_bytes: m.bytes(ExtentKind::Data),
        })
        .collect();
    Ok((disks, maps))
}

/// Runs the job's stages on `target`, resuming from its journal; the journal is removed when the job is done.
pub fn run(spec: RunSpec, target: &mut dyn Target, ui: Arc<StageUi>) -> Result<RunOutcome> {
    let RunSpec {
        id,
        kind,
        target_name: to,
        name,
        source_label,
        sources: srcs,
        source_resources,
        boot_path,
        reopen_boot,
        generalize,
        stages: which,
        boot_mode,
        force,
        confirm: ask,
        yes,
        state_dir: dir,
        tags,
        verbose,
        rollback,
    } = spec;
    if generalize.is_some() && srcs.ova {
        bail!(
            "--generalize cannot take a disk inside an OVA: convert the boot disk out of the OVA first \
             (imgshift convert {source_label} boot.qcow2 -O qcow2)"
        );
    }
    crate::interrupt::install().context("cannot install the Ctrl-C handler")?;
    let Some(boot) = srcs.disks.first().cloned() else {
        bail!("{source_label}: no disk to send");
    };
    let (disks, maps) = disks_of(&srcs)?;
    let existing = dir.join(format!("{id}.json")).exists();

    // Inspection and the plan come before the journal: a refused or unconfirmed job leaves nothing behind.
    let mut index = 0;
    let mut first: Option<(Option<Preflight>, f64)> = None;
    let mut quiet_settings: Option<BTreeMap<String, String>> = None;
    if !existing {
        let mut pf = None;
        let mut secs = 0.0;
        if which.inspect {
            let line = ui.begin(index, "inspect");
            let t = Instant::now();
            let p = plan::preflight(&boot, to, boot_mode.as_deref());
            secs = t.elapsed().as_secs_f64();
            for l in plan::finding_lines(&p) {
                ui.note(&l);
            }
            if p.verdict.verdict == Level::Fail && !force {
                ui.fail(line);
                bail!(
                    "the {to} preflight fails ({}): nothing was sent; fix the guest, or pass --force to go on anyway",
                    p.summary()
                );
            }
            ui.end(line, secs, &p.summary());
            pf = Some(p);
        } else {
            // Uploads have no inspect stage, but a Windows guest is registered as its registry says all the
            // same (Azure osType and osState, AWS boot mode and EnaSupport): inspected quietly, never refused.
            let p = plan::preflight(&boot, to, boot_mode.as_deref());
            if p.windows {
                // What the guest lacks on this target (Windows licence on AWS, drivers) is said all the same.
                for l in plan::finding_lines(&p) {
                    ui.say(&l);
                }
                quiet_settings = Some(p.verdict.settings.clone());
                target.follow(&p.verdict.settings);
            }
        }
        if generalize.is_some()
            && let Some(note) = plan::windows_generalize(&boot)?
        {
            ui.say(&format!("generalize: {note}"));
        }
        if let Some(p) = &pf {
            target.follow(&p.verdict.settings);
        }
        let creates = target.plan(&name, &disks);
        for l in plan::plan_lines(to, &disks, &creates) {
            ui.note(&l);
        }
        if ask {
            confirm(yes)?;
        }
        first = Some((pf, secs));
    }
    if which.inspect {
        index += 1;
    }

    let mut parts = Vec::new();
    for d in &disks {
        let (block_size, block_count) = target.units(d.virtual_size)?;
        parts.push(DiskPart {
            name: d.name.clone(),
            virtual_size: d.virtual_size,
            block_count,
            block_size,
            stage: "new".into(),
            ..DiskPart::default()
        });
    }
    let mut fresh = JobState {
        version: JOURNAL_VERSION,
        id: id.clone(),
        kind,
        source: source_label.clone(),
        stage: "new".into(),
        disks: parts,
        ..JobState::default()
    };
    if let Some((Some(pf), secs)) = &first {
        fresh.stages.push(StageRecord {
            name: "inspect".into(),
            seconds: *secs,
            detail: pf.summary(),
        });
        fresh.settings = pf.verdict.settings.clone();
        fresh.settings.insert(
            "os_read".into(),
            if pf.os_read { "yes" } else { "no" }.into(),
        );
        fresh.guest = Some(pf.guest.clone());
    }
    if let Some(s) = quiet_settings {
        fresh.settings = s;
    }
    let (journal, resumed) = Journal::open_or_create(&dir, fresh)?;
    let settings: BTreeMap<String, String> = journal.state.settings.clone();
    target.follow(&settings);
    if resumed {
        let done: u64 = journal.parts.iter().map(|b| b.count()).sum();
        ui.say(&format!(
            "resuming job {id} ({done} units already sent; journal {})",
            journal.path().display()
        ));
    } else {
        ui.note(&format!("job {id} (journal {})", journal.path().display()));
    }
    let job = Job {
        id: id.clone(),
        name,
        journal: Arc::new(Mutex::new(journal)),
        disks,
        ui: ui.clone(),
        verbose,
        tags,
        settings,
    };
    if first.is_some() {
        if which.inspect {
            pause_point("after-inspect");
        }
    } else if which.inspect
        && let Some(r) = recorded(&job, "inspect")?
    {
        ui.skipped(0, "inspect", &r.detail);
    }
    let overlay = dir.join(format!("{id}.overlay.qcow2"));
    let stopped = |e: anyhow::Error, stage: &str, target: &mut dyn Target| {
        // A failure because a signal arrived (a stream cancelled by the stop flag) is an interruption: the
        // process exits 130/143, as the shell expects.
        let e = match crate::interrupt::check() {
            Err(i) if e.downcast_ref::<crate::interrupt::Interrupted>().is_none() => e.context(i),
            _ => e,
        };
        if rollback {
            return roll_back(&job, target, &overlay, e);
        }
        let saved = if e.chain().any(|c| c.is::<crate::interrupt::Interrupted>()) {
            " with its journal saved"
        } else {
            ""
        };
        e.context(format!(
            "job {id} stopped in stage {stage}{saved}; `imgshift resume {id}` continues it, `imgshift jobs cancel \
             {id}` removes what it created"
        ))
    };

    if let Err(e) = target.connect(&job) {
        // Refused before anything was created (a taken name, missing access): a new job leaves nothing behind.
        let nothing_made = job
            .journal
            .lock()
            .map(|j| j.state.resources.is_empty())
            .unwrap_or(false);
        if !resumed && nothing_made {
            if let Ok(m) = Arc::try_unwrap(job.journal)
                && let Ok(j) = m.into_inner()
            {
                let _ = j.remove();
            }
            return Err(e);
        }
        return Err(stopped(e, "upload", target));
    }
    for (kind, rid) in &source_resources {
        job.record(kind, rid)?;
    }

    // Generalisation: an overlay over the boot disk, kept in the job folder until the job is done.
    let mut sources: Vec<Arc<dyn DiskSource>> = srcs.disks.clone();
    let mut maps = maps;
    if let Some((ops, gen_target)) = &generalize {
        let done = recorded(&job, "generalize")?;
        let reopened = reopen_boot()?;
        let g = match done {
            Some(r) => {
                ui.skipped(index, "generalize", &r.detail);
                crate::generalize::prepare(
                    &boot_path,
                    reopened,
                    Some(ops),
                    Some(*gen_target),
                    &overlay,
                    true,
                )?
            }
            None => stage(&job, index, "generalize", || {
                // Never reuse an overlay an interrupted virt-sysprep may have half written.
                let g = crate::generalize::prepare(
                    &boot_path,
                    reopened,
                    Some(ops),
                    Some(*gen_target),
                    &overlay,
                    false,
                )?;
                // A Windows guest sysprep already generalised passes through: the note says so.
                let detail = g
                    .outcome
                    .as_ref()
                    .map(crate::generalize::summary)
                    .or_else(|| g.note.clone())
                    .unwrap_or_default();
                Ok((g, detail))
            })
            .map_err(|e| stopped(e, "generalize", target))?,
        };
        // An upload shows no stage lines, but what generalisation removed is worth saying.
        if !ui.stage_lines()
            && let Some(o) = &g.outcome
        {
            ui.say(&crate::generalize::summary(o));
        }
        sources[0] = Arc::from(g.source);
        if let Some(m) = maps.first_mut() {
            *m = map_disk(sources[0].as_ref(), "the generalised disk")?;
        }
        index += 1;
    }

    // Upload, disk by disk; a disk finished by an earlier run is not sent again.
    let mut stats = vec![UploadStats::default(); job.disks.len()];
    match recorded(&job, "upload")? {
        Some(r) => ui.skipped(index, "upload", &r.detail),
        None => {
            stage(&job, index, "upload", || {
                let mut sent_now = 0u64;
                for (i, (src, map)) in sources.iter().zip(&maps).enumerate() {
                    if part_stage(&job, i)? == DISK_UPLOADED {
                        continue;
                    }
                    set_part_stage(&job, i, "uploading")?;
                    let bar = Arc::new(ui.bar(&format!("disk {i}")));
                    let r = target.upload(&job, i, src.as_ref(), map, bar.clone());
                    bar.finish();
                    let n = r?;
                    sent_now = sent_now.saturating_add(n.bytes_sent);
                    if let Some(s) = stats.get_mut(i) {
                        s.add(&n);
                    }
                    add_sent(&job, i, n.bytes_sent)?;
                    set_part_stage(&job, i, DISK_UPLOADED)?;
                    pause_point(&format!("after-upload-disk-{i}"));
                    crate::interrupt::check()?;
                }
                let total: u64 = (0..job.disks.len()).map(|i| sent(&job, i)).sum();
                Ok((
                    (),
                    format!(
                        "{} disk{}: sent {} ({} this run) for {} of data, {} virtual",
                        job.disks.len(),
                        if job.disks.len() == 1 { "" } else { "s" },
                        human_size(total),
                        human_size(sent_now),
                        human_size(job.disks.iter().map(|d| d.data_bytes).sum()),
                        human_size(job.disks.iter().map(|d| d.virtual_size).sum()),
                    ),
                ))
            })
            .map_err(|e| stopped(e, "upload", target))?;
        }
    }
    index += 1;

    if which.register {
        match recorded(&job, "register")? {
            Some(r) => ui.skipped(index, "register", &r.detail),
            None => {
                stage(&job, index, "register", || Ok(((), target.register(&job)?)))
                    .map_err(|e| stopped(e, "register", target))?;
            }
        }
        index += 1;
    }

    if which.verify {
        match recorded(&job, "verify")? {
            Some(r) => ui.skipped(index, "verify", &r.detail),
            None => {
                stage(&job, index, "verify", || {
                    Ok(((), target.verify(&job, &sources)?))
                })
                .map_err(|e| stopped(e, "verify", target))?;
            }
        }
        index += 1;
    }

    // What acts on the registered image (copies, sharing, a launch template), each resumable on its own.
    if which.register {
        for name in target.after_stages() {
            match recorded(&job, name)? {
                Some(r) => ui.skipped(index, name, &r.detail),
                None => {
                    stage(&job, index, name, || {
                        Ok(((), target.run_after_stage(&job, name)?))
                    })
                    .map_err(|e| stopped(e, name, target))?;
                }
            }
            index += 1;
        }
    }

    let outputs = target.outputs(&job)?;
    let journal = Arc::try_unwrap(job.journal)
        .map_err(|_| anyhow::anyhow!("journal still shared"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    let outcome = RunOutcome {
        id,
        resumed,
        sent: journal.state.disks.iter().map(|d| d.bytes_sent).collect(),
        units_done: journal.parts.iter().map(|b| b.count()).collect(),
        stages: journal.state.stages.clone(),
        disks: job.disks,
        stats,
        outputs,
    };
    journal.remove()?;
    if overlay.exists() {
        std::fs::remove_file(&overlay)
            .with_context(|| format!("cannot remove the overlay {}", overlay.display()))?;
    }
    Ok(outcome)
}

/// Undoes a failed one-shot job: removes what it created through the target's `cancel`, then its journal and
/// overlay. Returns `e` saying what was removed, or, when removing failed, what is left and how to retry.
fn roll_back(
    job: &Job,
    target: &mut dyn Target,
    overlay: &std::path::Path,
    e: anyhow::Error,
) -> anyhow::Error {
    let (resources, path) = match job.journal.lock() {
        Ok(j) => (j.state.resources.clone(), j.path().to_path_buf()),
        Err(_) => return e.context("journal lock poisoned"),
    };
    match target.cancel(&resources) {
        Ok(lines) => {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("lock"));
            let _ = std::fs::remove_file(overlay);
            if lines.is_empty() {
                e
            } else {
                e.context(format!("rolled back: {}", lines.join(", ")))
            }
        }
        Err(c) => e.context(format!(
            "removing what job {} created failed ({}); `imgshift jobs cancel {}` tries again",
            job.id,
            format!("{c:#}").replace('\n', " "),
            job.id
        )),
    }
}

/// What a dry run checks on the target without creating anything: the target's `connect` (credentials, region
/// or connection, names free, pool present), through a throwaway journal in a temporary folder.
pub fn check_target(target: &mut dyn Target, name: &str, disks: &[DiskInfo]) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot make a temporary folder for the dry run")?;
    let mut parts = Vec::new();
    for d in disks {
        let (block_size, block_count) = target.units(d.virtual_size)?;
        parts.push(DiskPart {
            name: d.name.clone(),
            virtual_size: d.virtual_size,
            block_count,
            block_size,
            ..DiskPart::default()
        });
    }
    let (journal, _) = Journal::open_or_create(
        dir.path(),
        JobState {
            version: JOURNAL_VERSION,
            id: "dry-run".into(),
            kind: "dry-run".into(),
            disks: parts,
            ..JobState::default()
        },
    )?;
    let job = Job {
        id: "dry-run".into(),
        name: name.to_string(),
        journal: Arc::new(Mutex::new(journal)),
        disks: disks.to_vec(),
        ui: Arc::new(StageUi::new(true, 1)),
        verbose: false,
        tags: Vec::new(),
        settings: BTreeMap::new(),
    };
    target.connect(&job)
}

/// Asks before creating anything, unless `yes`; refuses without a terminal to ask on.
fn confirm(yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("standard input is not a terminal to confirm on: pass --yes to go on without asking");
    }
    eprint!("imgshift: go ahead? [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed: nothing was created");
    }
    Ok(())
}

/// The record of `name` when an earlier run finished it.
fn recorded(job: &Job, name: &str) -> Result<Option<StageRecord>> {
    let j = job
        .journal
        .lock()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    Ok(j.state.stages.iter().find(|s| s.name == name).cloned())
}

/// Runs stage `name`: shows it, times it, records it in the journal, then stops at the test pause point
/// `after-NAME` if asked.
fn stage<T>(
    job: &Job,
    index: usize,
    name: &str,
    f: impl FnOnce() -> Result<(T, String)>,
) -> Result<T> {
    crate::interrupt::check()?;
    let line = job.ui.begin(index, name);
    let t = Instant::now();
    let (v, detail) = match f() {
        Ok(v) => v,
        Err(e) => {
            job.ui.fail(line);
            return Err(e);
        }
    };
    let secs = t.elapsed().as_secs_f64();
    {
        let mut j = job
            .journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        j.state.stages.push(StageRecord {
            name: name.to_string(),
            seconds: secs,
            detail: detail.clone(),
        });
        j.state.stage = name.to_string();
        j.save()?;
    }
    job.ui.end(line, secs, &detail);
    pause_point(&format!("after-{name}"));
    Ok(v)
}

fn part_stage(job: &Job, i: usize) -> Result<String> {
    let j = job
        .journal
        .lock()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    Ok(j.state
        .disks
        .get(i)
        .map(|d| d.stage.clone())
        .unwrap_or_default())
}

fn set_part_stage(job: &Job, i: usize, stage: &str) -> Result<()> {
    let mut j = job
        .journal
        .lock()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    if let Some(d) = j.state.disks.get_mut(i) {
        d.stage = stage.to_string();
    }
    j.save()
}

fn sent(job: &Job, i: usize) -> u64 {
    job.journal
        .lock()
        .ok()
        .and_then(|j| j.state.disks.get(i).map(|d| d.bytes_sent))
        .unwrap_or(0)
}

fn add_sent(job: &Job, i: usize, n: u64) -> Result<()> {
    let mut j = job
        .journal
        .lock()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    if let Some(d) = j.state.disks.get_mut(i) {
        d.bytes_sent = d.bytes_sent.saturating_add(n);
    }
    j.save()
}
