//! `imgshift migrate`: runs a migration job's stages in order (see [`crate::migrate`]); rerunning the same
//! command, or `imgshift resume JOB`, continues an interrupted job from its journal.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, ExtentKind, ExtentMap};
use serde_json::json;

use super::parse_tags;
use crate::cli::{MigrateArgs, MigrateTo, OutputFormat};
use crate::generalize::operations::Target as GenTarget;
use crate::journal::{DiskPart, JobState, Journal, StageRecord, pause_point, state_dir};
use crate::migrate::plan::{self, Preflight, ReportInput};
use crate::migrate::stages::StageUi;
use crate::migrate::{self, DiskInfo, Job, source};

/// Disk stage once its upload finished.
const DISK_UPLOADED: &str = "uploaded";

fn target_name(t: MigrateTo) -> &'static str {
    match t {
        MigrateTo::Aws => "aws",
        MigrateTo::Azure => "azure",
        MigrateTo::Libvirt => "libvirt",
    }
}

/// Runs `migrate`.
pub fn run(args: &MigrateArgs, quiet: bool) -> Result<u8> {
    let name = migrate::job_name(args)?;
    let tags = parse_tags(&args.tags)?;
    let to = target_name(args.to);
    let mut target = migrate::target_for(args)?;
    let srcs = source::open(&args.src, args.format.as_deref(), &args.trust)?;
    if args.generalize.is_some() && srcs.ova {
        bail!(
            "--generalize cannot take a disk inside an OVA: convert the boot disk out of the OVA first \
             (imgshift convert {} boot.qcow2 -O qcow2)",
            args.src.display()
        );
    }
    let maps: Vec<ExtentMap> = srcs
        .disks
        .iter()
        .zip(&srcs.names)
        .map(|(d, n)| migrate::map_disk(d.as_ref(), n))
        .collect::<Result<_>>()?;
    let disks: Vec<DiskInfo> = srcs
        .disks
        .iter()
        .zip(&srcs.names)
        .zip(&maps)
        .map(|((d, n), m)| DiskInfo {
            name: n.clone(),
            virtual_size: d.virtual_size(),
            data_bytes: m.bytes(ExtentKind::Data),
        })
        .collect();
    let mut stage_names = vec!["inspect"];
    if args.generalize.is_some() {
        stage_names.push("generalize");
    }
    stage_names.extend(["upload", "register", "verify"]);
    let boot_mode = match args.to {
        MigrateTo::Aws => args.aws.boot_mode.as_deref(),
        _ => None,
    };
    let creates = target.plan(&name, &disks);

    if args.dry_run {
        let pf = plan::preflight(&srcs.disks[0], to, boot_mode);
        let lines = plan::plan_lines(to, &disks, &creates);
        let fails = pf.verdict.verdict == crate::guest::preflight::Level::Fail;
        match args.output {
            OutputFormat::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "dry_run": true,
                    "target": to,
                    "name": name,
                    "disks": disks,
                    "will_create": creates,
                    "generalize": args.generalize,
                    "guest": pf.guest,
                    "preflight": pf.verdict,
                }))?
            ),
            OutputFormat::Human => {
                println!("inspect: {}", pf.summary());
                for l in plan::finding_lines(&pf) {
                    println!("  {l}");
                }
                if let Some(g) = &args.generalize {
                    println!(
                        "generalize: operations {g} on disk 0 (in an overlay; the source is not changed)"
                    );
                }
                for l in lines {
                    println!("{l}");
                }
                if fails && !args.force {
                    println!(
                        "the preflight fails: migrate would stop here (pass --force to go on anyway)"
                    );
                }
            }
        }
        return Ok(u8::from(fails && !args.force));
    }

    let id = migrate::job_id(args)?;
    let dir = state_dir(args.state_dir.as_deref())?;
    let ui = Arc::new(StageUi::new(quiet, stage_names.len()));
    let existing = dir.join(format!("{id}.json")).exists();

    // Inspection and the plan come before the journal: a refused or unconfirmed job leaves nothing behind.
    let mut first = None;
    if !existing {
        let line = ui.begin(0, "inspect");
        let t = Instant::now();
        let pf = plan::preflight(&srcs.disks[0], to, boot_mode);
        let secs = t.elapsed().as_secs_f64();
        for l in plan::finding_lines(&pf) {
            ui.note(&l);
        }
        if pf.verdict.verdict == crate::guest::preflight::Level::Fail && !args.force {
            ui.fail(line);
            bail!(
                "the {to} preflight fails ({}): nothing was sent; fix the guest, or pass --force to migrate it anyway",
                pf.summary()
            );
        }
        ui.end(line, secs, &pf.summary());
        for l in plan::plan_lines(to, &disks, &creates) {
            ui.note(&l);
        }
        confirm(args)?;
        first = Some((pf, secs));
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
        version: 2,
        id: id.clone(),
        kind: format!("migrate-{to}"),
        source: args.src.display().to_string(),
        stage: "inspect".into(),
        disks: parts,
        ..JobState::default()
    };
    if let Some((pf, secs)) = &first {
        fresh.stages.push(StageRecord {
            name: "inspect".into(),
            seconds: *secs,
            detail: pf.summary(),
        });
        remember_settings(&mut fresh, pf);
    }
    let (journal, resumed) = Journal::open_or_create(&dir, fresh)?;
    let settings = journal
        .state
        .ids
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("setting:")
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    ui.note(&format!(
        "job {id}{} (journal {})",
        if resumed { ", resumed" } else { "" },
        journal.path().display()
    ));
    let job = Job {
        id: id.clone(),
        name,
        journal: Arc::new(Mutex::new(journal)),
        disks,
        ui: ui.clone(),
        verbose: args.verbose,
        tags,
        settings,
    };
    if first.is_some() {
        pause_point("after-inspect");
    } else if let Some(r) = recorded(&job, "inspect")? {
        ui.skipped(0, "inspect", &r.detail);
    }
    let stopped = |e: anyhow::Error, stage: &str| {
        e.context(format!(
            "job {id} stopped in stage {stage}; `imgshift resume {id}` continues it, `imgshift jobs cancel {id}` \
             removes what it created"
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
        return Err(stopped(e, "upload"));
    }
    let mut index = 1;

    // Generalisation: an overlay over the boot disk, kept in the job folder until the job is done.
    let overlay = dir.join(format!("{id}.overlay.qcow2"));
    let mut sources: Vec<Arc<dyn DiskSource>> = srcs.disks.clone();
    if let Some(spec) = &args.generalize {
        let gen_target = match args.to {
            MigrateTo::Aws => GenTarget::Aws,
            MigrateTo::Azure => GenTarget::Azure,
            MigrateTo::Libvirt => GenTarget::Libvirt,
        };
        let done = recorded(&job, "generalize")?;
        let reopened = super::open_image(&args.src, args.format.as_deref(), &args.trust)?;
        match done {
            Some(r) => {
                ui.skipped(index, "generalize", &r.detail);
                let g = crate::generalize::prepare(
                    &args.src,
                    reopened,
                    Some(spec),
                    Some(gen_target),
                    &overlay,
                    true,
                )?;
                sources[0] = Arc::from(g.source);
            }
            None => {
                let g = stage(&job, index, "generalize", || {
                    // Never reuse an overlay an interrupted virt-sysprep may have half written.
                    let g = crate::generalize::prepare(
                        &args.src,
                        reopened,
                        Some(spec),
                        Some(gen_target),
                        &overlay,
                        false,
                    )?;
                    let detail = g
                        .outcome
                        .as_ref()
                        .map(crate::generalize::summary)
                        .unwrap_or_default();
                    Ok((g, detail))
                })
                .map_err(|e| stopped(e, "generalize"))?;
                sources[0] = Arc::from(g.source);
            }
        }
        index += 1;
    }

    // Upload, disk by disk; a disk finished by an earlier run is not sent again.
    let maps: Vec<ExtentMap> = if args.generalize.is_some() {
        let mut m = maps;
        if let Some(first) = m.first_mut() {
            *first = migrate::map_disk(sources[0].as_ref(), "the generalised disk")?;
        }
        m
    } else {
        maps
    };
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
                    sent_now += n;
                    add_sent(&job, i, n)?;
                    set_part_stage(&job, i, DISK_UPLOADED)?;
                    pause_point(&format!("after-upload-disk-{i}"));
                }
                let total: u64 = (0..job.disks.len()).map(|i| sent(&job, i)).sum();
                Ok((
                    (),
                    format!(
                        "{} disk{}: sent {} ({} this run) for {} of data, {} virtual",
                        job.disks.len(),
                        if job.disks.len() == 1 { "" } else { "s" },
                        super::human_size(total),
                        super::human_size(sent_now),
                        super::human_size(job.disks.iter().map(|d| d.data_bytes).sum()),
                        super::human_size(job.disks.iter().map(|d| d.virtual_size).sum()),
                    ),
                ))
            })
            .map_err(|e| stopped(e, "upload"))?;
        }
    }
    index += 1;

    match recorded(&job, "register")? {
        Some(r) => ui.skipped(index, "register", &r.detail),
        None => {
            stage(&job, index, "register", || Ok(((), target.register(&job)?)))
                .map_err(|e| stopped(e, "register"))?;
        }
    }
    index += 1;

    match recorded(&job, "verify")? {
        Some(r) => ui.skipped(index, "verify", &r.detail),
        None => {
            stage(&job, index, "verify", || {
                Ok(((), target.verify(&job, &sources)?))
            })
            .map_err(|e| stopped(e, "verify"))?;
        }
    }

    // The report; then the job is finished and forgotten.
    let (stages, sent_per_disk) = {
        let j = job
            .journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        (
            j.state.stages.clone(),
            (0..job.disks.len())
                .map(|i| {
                    j.state
                        .disks
                        .get(i)
                        .and_then(|d| d.ids.get("bytes_sent"))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                })
                .collect::<Vec<u64>>(),
        )
    };
    let source = args.src.display().to_string();
    let input = ReportInput {
        job: &id,
        target: to,
        source: &source,
        disks: &job.disks,
        sent: &sent_per_disk,
        outputs: target.outputs(&job)?,
        stages: &stages,
        resumed,
    };
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&plan::report_json(&input))?
        ),
        OutputFormat::Human => print!("{}", plan::report_text(&input)),
    }
    std::io::stdout().flush().ok();
    let journal = Arc::try_unwrap(job.journal)
        .map_err(|_| anyhow::anyhow!("journal still shared"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    journal.remove()?;
    if overlay.exists() {
        std::fs::remove_file(&overlay)
            .with_context(|| format!("cannot remove the overlay {}", overlay.display()))?;
    }
    Ok(0)
}

/// Asks before creating anything, unless `--yes`; refuses without a terminal to ask on.
fn confirm(args: &MigrateArgs) -> Result<()> {
    if args.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "standard input is not a terminal to confirm on: pass --yes to migrate without asking"
        );
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

/// Keeps the preflight's settings (boot mode, generation, firmware, bus) in the journal for later stages.
fn remember_settings(state: &mut JobState, pf: &Preflight) {
    for (k, v) in &pf.verdict.settings {
        state.ids.insert(format!("setting:{k}"), v.clone());
    }
    state.ids.insert("guest".into(), pf.guest.clone());
    state.ids.insert(
        "setting:linux_root".into(),
        if pf.linux_root { "yes" } else { "no" }.into(),
    );
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
    job.disk_id(i, "bytes_sent")
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn add_sent(job: &Job, i: usize, n: u64) -> Result<()> {
    let total = sent(job, i).saturating_add(n);
    job.set_disk_id(i, "bytes_sent", &total.to_string())
}
