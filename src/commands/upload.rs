//! `imgshift upload aws|azure`: the job runner ([`crate::runner`]) with the upload and register stages only, on
//! the same target lifecycle `migrate` uses; the output is the upload's ids and counts.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

pub(crate) use crate::targets::{parse_tags, runtime};

use super::targets;
use crate::cli::{AwsConnArgs, AwsUploadArgs, AzureUploadArgs, OutputFormat, TrustArgs};
use crate::job::Target;
use crate::journal::state_dir;
use crate::progress::StageUi;
use crate::runner::{self, RunOutcome, RunSpec, Stages};
use crate::target_kind::TargetKind;
use crate::targets::aws::config;
use crate::targets::aws::retry::Policy;
use crate::targets::aws::volume_gib;

pub(crate) fn aws_target(c: &AwsConnArgs) -> config::AwsTarget {
    targets::aws_conn_args(c)
}

pub(crate) fn policy(c: &AwsConnArgs) -> Policy {
    Policy {
        max_attempts: c.max_attempts.max(1),
        ..Policy::default()
    }
}

/// Job id: the same source (path, size, modification time) going to the same place under the same name is the
/// same job, so rerunning an interrupted command resumes it.
fn job_id(args: &AwsUploadArgs) -> Result<String> {
    let key = format!(
        "aws-upload\0{}\0{:?}\0{:?}\0{:?}\0{:?}\0{}\0{:?}\0{:?}",
        crate::journal::source_identity(&args.src)?,
        args.name,
        args.conn.region,
        args.conn.profile,
        args.conn
            .endpoint_url
            .as_deref()
            .or(std::env::var("AWS_ENDPOINT_URL").ok().as_deref()),
        args.encrypted || args.kms_key_id.is_some(),
        args.kms_key_id,
        args.generalize,
    );
    Ok(crate::journal::job_id_from("aws", &key))
}

/// What an upload job runs: the source, the target and how to show it.
struct Upload<'a> {
    id: String,
    kind: &'static str,
    target: TargetKind,
    name: String,
    src: &'a std::path::Path,
    format: Option<String>,
    trust: &'a TrustArgs,
    generalize: Option<String>,
    register: bool,
    state_dir: Option<&'a std::path::Path>,
    tags: Vec<(String, String)>,
    verbose: bool,
    progress: bool,
}

/// Runs an upload job through the runner.
fn run_upload(u: Upload<'_>, target: &mut dyn Target, quiet: bool) -> Result<RunOutcome> {
    let sources = crate::open::open_disks(u.src, u.format.as_deref(), &u.trust.allow_dirs)?;
    let ui = Arc::new(StageUi::bars_only(
        quiet,
        2 + usize::from(u.generalize.is_some()) + target.after_stages().len(),
        u.progress,
        u.verbose,
    ));
    let src = u.src.to_path_buf();
    let format = u.format.clone();
    let trust = u.trust.clone();
    let spec = RunSpec {
        id: u.id,
        kind: u.kind.to_string(),
        target_name: u.target.name(),
        name: u.name,
        source_label: u.src.display().to_string(),
        sources,
        boot_path: u.src.to_path_buf(),
        reopen_boot: Box::new(move || super::open_image(&src, format.as_deref(), &trust)),
        generalize: u.generalize.map(|g| (g, u.target)),
        stages: Stages {
            inspect: false,
            register: u.register,
            verify: false,
        },
        boot_mode: None,
        force: false,
        confirm: false,
        yes: true,
        state_dir: state_dir(u.state_dir)?,
        tags: u.tags,
        verbose: u.verbose,
    };
    runner::run(spec, target, ui)
}

/// Runs `upload aws`.
pub fn aws(args: &AwsUploadArgs, quiet: bool) -> Result<u8> {
    let mut target = targets::aws_for_upload(args)?;
    let out = run_upload(
        Upload {
            id: job_id(args)?,
            kind: "aws-upload",
            target: TargetKind::Aws,
            name: args.name.clone().unwrap_or_else(|| "snapshot".into()),
            src: &args.src,
            format: args.format.clone(),
            trust: &args.trust,
            generalize: args.generalize.clone(),
            register: !args.snapshot_only,
            state_dir: args.state_dir.as_deref(),
            tags: parse_tags(&args.tags)?,
            verbose: args.verbose,
            progress: args.progress,
        },
        &mut target,
        quiet,
    )?;
    let o = &out.outputs;
    let snapshot = o["snapshot_ids"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let image = o["image_id"].as_str().map(str::to_string);
    let size = out.disks.first().map_or(0, |d| d.virtual_size);
    let stats = out.stats.first().copied().unwrap_or_default();
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": out.id,
                "snapshot_id": snapshot,
                "image_id": image,
                "encrypted": o["encrypted"][0].as_bool().unwrap_or(false),
                "resumed": out.resumed,
                "virtual_size": size,
                "volume_size_gib": volume_gib(size),
                "data_bytes": out.disks.first().map_or(0, |d| d.data_bytes),
                "blocks_in_snapshot": out.units_done.first().copied().unwrap_or(0),
                "blocks_put": stats.requests,
                "bytes_sent": stats.bytes_sent,
                "retries": stats.retries,
                "throttled": stats.throttled,
                "copies": o.get("copies"),
                "shared_with": o.get("shared_with"),
                "launch_template": o.get("launch_template"),
            }))?
        ),
        OutputFormat::Human => {
            if let Some(ami) = &image {
                println!("{ami}");
            }
            println!("{snapshot}");
            for c in o["copies"].as_array().into_iter().flatten() {
                println!(
                    "copy {} in {}",
                    c["image_id"].as_str().unwrap_or_default(),
                    c["region"].as_str().unwrap_or_default()
                );
            }
            if let Some(a) = o["shared_with"].as_array().filter(|a| !a.is_empty()) {
                let a: Vec<&str> = a.iter().filter_map(|v| v.as_str()).collect();
                println!("shared with {}", a.join(", "));
            }
            if let Some(t) = o["launch_template"].as_object() {
                println!(
                    "launch template {} version {}",
                    t.get("name").and_then(|v| v.as_str()).unwrap_or_default(),
                    t.get("version").map(|v| v.to_string()).unwrap_or_default()
                );
            }
        }
    }
    Ok(0)
}

/// Same source (path, size, mtime) to the same disk of the same subscription/resource group/endpoint = same job.
fn azure_job_id(args: &AzureUploadArgs) -> Result<String> {
    let key = format!(
        "azure-upload\0{}\0{}\0{}\0{}\0{}\0{:?}",
        crate::journal::source_identity(&args.src)?,
        args.arm_endpoint,
        args.subscription,
        args.resource_group,
        args.disk_name,
        args.generalize,
    );
    Ok(crate::journal::job_id_from("azure", &key))
}

/// Runs `upload azure`.
pub fn azure(args: &AzureUploadArgs, quiet: bool) -> Result<u8> {
    let mut target = targets::azure_for_upload(args)?;
    let register = args.image_name.is_some() || args.gallery.is_some();
    let out = run_upload(
        Upload {
            id: azure_job_id(args)?,
            kind: "azure-upload",
            target: TargetKind::Azure,
            name: args.disk_name.clone(),
            src: &args.src,
            format: args.format.clone(),
            trust: &args.trust,
            generalize: args.generalize.clone(),
            register,
            state_dir: args.state_dir.as_deref(),
            tags: parse_tags(&args.tags)?,
            verbose: args.verbose,
            progress: args.progress,
        },
        &mut target,
        quiet,
    )?;
    let o = &out.outputs;
    let disk_id = o["disk_ids"][0].as_str().unwrap_or_default().to_string();
    let image_id = o["image_id"].as_str().map(str::to_string);
    let version_id = o["gallery_image_version_id"].as_str().map(str::to_string);
    let size = out.disks.first().map_or(0, |d| d.virtual_size);
    let stats = out.stats.first().copied().unwrap_or_default();
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": out.id,
                "resumed": out.resumed,
                "disk_id": disk_id,
                "image_id": image_id,
                "gallery_image_version_id": version_id,
                "hyper_v_generation": o["hyper_v_generation"],
                "virtual_size": size,
                "upload_size_bytes": crate::targets::azure::upload_size_bytes(size),
                "data_bytes": out.disks.first().map_or(0, |d| d.data_bytes),
                "requests": stats.requests,
                "bytes_sent": stats.bytes_sent,
                "retries": stats.retries,
                "throttled": stats.throttled,
            }))?
        ),
        OutputFormat::Human => {
            if let Some(i) = &image_id {
                println!("{i}");
            }
            if let Some(v) = &version_id {
                println!("{v}");
            }
            println!("{disk_id}");
        }
    }
    Ok(0)
}
