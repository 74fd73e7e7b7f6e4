//! `imgshift replicate`: maps its options to a replica store and a source, runs [`crate::replicate::run`] and
//! prints the report; `replicate points` lists a replica's points.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::cli::{
    OutputFormat, ReplicaPointsArgs, ReplicaTargetArgs, ReplicateAction, ReplicateArgs,
};
use crate::journal::state_dir;
use crate::progress::{Bar, human_size};
use crate::replica::{Point, ReplicaStore};
use crate::replicate::{self, SourceDiff, Spec};
use crate::sources::SourceRef;
use crate::target_kind::ReplicaKind;

/// The store `to` names with `t`'s options.
fn store(
    to: ReplicaKind,
    t: &ReplicaTargetArgs,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Box<dyn ReplicaStore>> {
    match to {
        ReplicaKind::File => {
            let Some(dir) = &t.dir else {
                bail!("--to file needs --dir DIR, the folder of the points");
            };
            Ok(Box::new(crate::targets::file::replica::FileStore::new(
                dir, stop,
            )?))
        }
    }
}

/// `imgshift replicate …`.
pub fn run(args: &ReplicateArgs, quiet: bool) -> Result<u8> {
    if let Some(ReplicateAction::Points(p)) = &args.action {
        return points(p);
    }
    let (Some(src), Some(to), Some(name)) = (&args.src, args.to, &args.name) else {
        bail!("replicate needs SRC, --to and --name");
    };
    replicate::check_name(name)?;
    crate::interrupt::install()?;
    let stop = crate::interrupt::stop_flag();
    let mut store = store(to, &args.target, stop.clone())?;
    let source = SourceRef::parse(src)?;
    let SourceRef::File(path) = &source else {
        bail!(
            "{}: replicate reads local images so far; copy a cloud disk with `imgshift convert` first",
            src.display()
        );
    };
    let disk = crate::open::open_image(path, args.format.as_deref(), &args.trust.allow_dirs)?;
    let source_name = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.clone())
        .display()
        .to_string();
    let diff = SourceDiff::None;
    let cache_dir: PathBuf = state_dir(args.state_dir.as_deref())?.join("replicas");
    let spec = Spec {
        name,
        source_name,
        source_snapshot: None,
        src: disk.as_ref(),
        diff,
        keep: args.keep,
        cache_dir,
        threads: args.threads.clamp(1, 64),
        stop: &stop,
    };
    let bar = Bar::new("replicate", args.progress, quiet);
    let outcome = replicate::run(&spec, store.as_mut(), &bar);
    bar.finish();
    if let Err(e) = crate::interrupt::check() {
        return Ok(e.exit_code());
    }
    let outcome = outcome.with_context(|| format!("replica {name}"))?;
    for w in &outcome.warnings {
        eprintln!("imgshift: warning: {w}");
    }
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&outcome)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("target".into(), to.name().into());
                o.insert("where".into(), store.describe().into());
            }
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        }
        OutputFormat::Human => match &outcome.point {
            Some(p) => {
                writeln!(
                    out,
                    "replica {name}: point {} made in {} ({}): {} changed ({}), {} sent, {} read from the source",
                    p.number,
                    store.describe(),
                    p.target_id,
                    human_size(outcome.changed_bytes),
                    outcome.detection,
                    human_size(outcome.sent_bytes),
                    human_size(outcome.bytes_read)
                )?;
                if !outcome.deleted.is_empty() {
                    let list: Vec<String> = outcome.deleted.iter().map(u32::to_string).collect();
                    writeln!(out, "deleted point(s) {} (--keep)", list.join(", "))?;
                }
            }
            None => writeln!(
                out,
                "replica {name}: nothing changed since point {} ({} read from the source); no point made",
                outcome
                    .previous
                    .map_or_else(|| "-".into(), |n| n.to_string()),
                human_size(outcome.bytes_read)
            )?,
        },
    }
    Ok(0)
}

/// `imgshift replicate points NAME`.
fn points(args: &ReplicaPointsArgs) -> Result<u8> {
    replicate::check_name(&args.name)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut store = store(args.to, &args.target, stop)?;
    let points = store.points(&args.name)?;
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &points)?;
            writeln!(out)?;
        }
        OutputFormat::Human => {
            if points.is_empty() {
                writeln!(
                    out,
                    "replica {} has no points in {}",
                    args.name,
                    store.describe()
                )?;
                return Ok(0);
            }
            writeln!(
                out,
                "{:>5}  {:<20}  {:<24}  {:>10}  {:>10}  {:<18}  SOURCE",
                "POINT", "CREATED", "TARGET ID", "CHANGED", "SENT", "DETECTION"
            )?;
            for p in &points {
                writeln!(out, "{}", row(p))?;
            }
        }
    }
    Ok(0)
}

fn row(p: &Point) -> String {
    let source = match &p.source_snapshot {
        Some(s) => format!("{} ({s})", p.source),
        None => p.source.clone(),
    };
    format!(
        "{:>5}  {:<20}  {:<24}  {:>10}  {:>10}  {:<18}  {source}",
        p.number,
        p.created,
        p.target_id,
        human_size(p.changed_bytes),
        human_size(p.sent_bytes),
        p.detection
    )
}
