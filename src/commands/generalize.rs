//! `imgshift generalize`: machine-specific state out, into a qcow2 overlay over the untouched source.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

use super::open_image;
use crate::cli::{GeneralizeArgs, GeneralizeTarget, OutputFormat};
use crate::generalize::operations::{self, OPERATIONS, Target};
use crate::generalize::{self, Outcome, Request};

/// The library's target for the CLI's.
pub fn target(t: Option<GeneralizeTarget>) -> Option<Target> {
    t.map(|t| match t {
        GeneralizeTarget::Aws => Target::Aws,
        GeneralizeTarget::Azure => Target::Azure,
        GeneralizeTarget::Libvirt => Target::Libvirt,
    })
}

/// Runs the command.
pub fn run(args: &GeneralizeArgs) -> Result<u8> {
    if args.list_operations {
        list(args.output)?;
        return Ok(0);
    }
    let image = args
        .image
        .as_deref()
        .ok_or_else(|| anyhow!("name the image to generalise"))?;
    let ops = operations::select(args.operations.as_deref(), target(args.target))
        .map_err(|e| anyhow!(e))?;
    let src: Arc<dyn imgshift_converters::DiskSource> =
        Arc::from(open_image(image, args.format.as_deref(), &args.trust)?);
    // Windows: sysprep cannot run offline. Generalised already: say so and do nothing; otherwise refuse.
    if let Some(note) = generalize::verify::windows_state(Arc::clone(&src))? {
        match args.output {
            OutputFormat::Json => outln!(
                "{}",
                serde_json::json!({
                    "source": image.display().to_string(),
                    "windows": true,
                    "already_generalized": true,
                    "overlay": null,
                    "message": note,
                })
            ),
            OutputFormat::Human => outln!("{note}"),
        }
        return Ok(0);
    }
    if !args.dry_run {
        // Before anything is written: without libguestfs nothing can be done.
        generalize::sysprep::find()?;
    }
    let format = src.format();
    let overlay = match (&args.overlay, args.dry_run) {
        (Some(o), _) => o.clone(),
        (None, true) => std::path::PathBuf::new(),
        (None, false) => bail!("--overlay OUT.qcow2 is required"),
    };
    if !args.dry_run && overlay.exists() {
        bail!(
            "{} already exists: remove it or choose another --overlay",
            overlay.display()
        );
    }
    if !args.dry_run {
        // The overlay did not exist before (checked above): an interrupted run removes what it wrote.
        let partial = overlay.clone();
        crate::interrupt::on_signal(move || {
            let _ = std::fs::remove_file(&partial);
        });
    }
    let outcome = generalize::run(&Request {
        source: image,
        format,
        src,
        overlay: &overlay,
        ops: &ops,
        hostname: args.hostname.as_deref(),
        dry_run: args.dry_run,
    })?;
    match args.output {
        OutputFormat::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&outcome).context("cannot print the report")?
        ),
        OutputFormat::Human => print_human(&outcome)?,
    }
    Ok(0)
}

fn list(output: OutputFormat) -> Result<()> {
    match output {
        OutputFormat::Json => {
            let v: Vec<serde_json::Value> = OPERATIONS
                .iter()
                .map(|o| {
                    serde_json::json!({
                        "name": o.name,
                        "description": o.description,
                        "default": o.default,
                        "target": o.target.map(|t| format!("{t:?}").to_lowercase()),
                    })
                })
                .collect();
            outln!("{}", serde_json::Value::Array(v));
        }
        OutputFormat::Human => {
            for o in OPERATIONS {
                let when = match (o.default, o.target) {
                    (false, _) => "off".to_string(),
                    (true, None) => "on".to_string(),
                    (true, Some(t)) => format!("on for {}", format!("{t:?}").to_lowercase()),
                };
                outln!("{:<16} {:<12} {}", o.name, when, o.description);
            }
        }
    }
    Ok(())
}

fn print_human(o: &Outcome) -> Result<()> {
    outln!(
        "{} ({}, root {}){}",
        o.source,
        o.distro.as_deref().unwrap_or("unknown distribution"),
        o.root,
        if o.dry_run {
            ": dry run, nothing written"
        } else {
            ""
        }
    );
    for op in &o.operations {
        if o.dry_run {
            outln!(
                "  {:<16} would {} {} path(s)",
                op.name,
                op.action,
                op.before.len()
            );
            for p in op.before.keys() {
                outln!("      {p}");
            }
        } else {
            outln!(
                "  {:<16} {} of {} path(s) done{}",
                op.name,
                op.done.len(),
                op.before.len(),
                if op.remaining.is_empty() {
                    String::new()
                } else {
                    format!(", still present: {}", op.remaining.join(" "))
                }
            );
        }
    }
    let changed: Vec<&str> = o
        .kept
        .iter()
        .filter(|(_, k)| k.unchanged == Some(false))
        .map(|(p, _)| p.as_str())
        .collect();
    if !o.dry_run {
        outln!(
            "  kept intact: {} of {} checked file(s){}",
            o.kept.len() - changed.len(),
            o.kept.len(),
            if changed.is_empty() {
                String::new()
            } else {
                format!(" (changed: {})", changed.join(" "))
            }
        );
    }
    if let Some(ov) = &o.overlay {
        outln!(
            "overlay {} ({} KiB on disk) over {} ({}); virt-sysprep {:.1} s, total {:.1} s",
            ov.path,
            ov.allocated_bytes / 1024,
            ov.backing_file,
            ov.backing_format,
            o.sysprep_seconds,
            o.total_seconds
        );
    }
    Ok(())
}
