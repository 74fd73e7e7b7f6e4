//! `imgshift upload aws|azure|libvirt`: the job runner ([`crate::runner`]) with the upload and register stages
//! (and, for a libvirt domain whose firmware or bus is `auto`, the inspect stage), on the same target lifecycle
//! `migrate` uses; the output is the upload's ids and counts. `upload libvirt` is one-shot: a failure removes
//! what it created (the runner's `rollback`) rather than keeping the job for `resume`.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

pub(crate) use crate::targets::{parse_tags, runtime};

use super::targets;
use crate::cli::{
    AwsConnArgs, AwsUploadArgs, AzureUploadArgs, LibvirtUploadArgs, OutputFormat, TrustArgs,
};
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
    /// Run the inspect stage (its findings are not a refusal: the upload goes on).
    inspect: bool,
    /// Send only the boot disk (of an OVA).
    boot_only: bool,
    /// One-shot: a failure removes what was created.
    rollback: bool,
    state_dir: Option<&'a std::path::Path>,
    tags: Vec<(String, String)>,
    verbose: bool,
    progress: bool,
}

/// Runs an upload job through the runner.
fn run_upload(u: Upload<'_>, target: &mut dyn Target, quiet: bool) -> Result<RunOutcome> {
    let mut sources = crate::open::open_disks(u.src, u.format.as_deref(), &u.trust.allow_dirs)?;
    if u.boot_only {
        sources.disks.truncate(1);
        sources.names.truncate(1);
    }
    let ui = Arc::new(StageUi::bars_only(
        quiet,
        2 + usize::from(u.generalize.is_some())
            + usize::from(u.inspect)
            + target.after_stages().len(),
        u.progress,
        u.verbose,
    ));
    let src = u.src.to_path_buf();
    let format = u.format.clone();
    let trust = u.trust.clone();
    let spec = RunSpec {
        source_resources: Vec::new(),
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
            inspect: u.inspect,
            register: u.register,
            verify: false,
        },
        boot_mode: None,
        force: true,
        confirm: false,
        yes: true,
        state_dir: state_dir(u.state_dir)?,
        tags: u.tags,
        verbose: u.verbose,
        rollback: u.rollback,
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
            inspect: false,
            boot_only: false,
            rollback: false,
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
            inspect: false,
            boot_only: false,
            rollback: false,
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

/// Same source (path, size, mtime) to the same volume (and domain) of the same pool and daemon = same job.
fn libvirt_job_id(args: &LibvirtUploadArgs) -> Result<String> {
    let key = format!(
        "libvirt-upload\0{}\0{}\0{}\0{}\0{:?}\0{:?}",
        crate::journal::source_identity(&args.src)?,
        args.connect,
        args.pool,
        args.volume,
        args.define,
        args.output_format,
    );
    Ok(crate::journal::job_id_from("libvirt", &key))
}

/// Runs `upload libvirt`: the boot disk (of an OVA, or the image) into a new volume, optionally a domain that
/// boots from it; a failure removes what this run created.
pub fn libvirt(args: &LibvirtUploadArgs, quiet: bool) -> Result<u8> {
    let mut target = targets::libvirt_for_upload(args)?;
    let define = args.define.is_some();
    let out = run_upload(
        Upload {
            id: libvirt_job_id(args)?,
            kind: "libvirt-upload",
            target: TargetKind::Libvirt,
            name: args.define.clone().unwrap_or_else(|| args.volume.clone()),
            src: &args.src,
            format: args.format.clone(),
            trust: &args.trust,
            generalize: None,
            register: define,
            // `auto` firmware and bus follow inspection, as in `migrate`.
            inspect: target.needs_guest(),
            boot_only: true,
            rollback: true,
            state_dir: args.state_dir.as_deref(),
            tags: Vec::new(),
            verbose: false,
            progress: args.progress,
        },
        &mut target,
        quiet,
    )?;
    let o = &out.outputs;
    let path = o["paths"][0].as_str().unwrap_or_default().to_string();
    let started = o["started"].as_bool().unwrap_or(false);
    let size = out.disks.first().map_or(0, |d| d.virtual_size);
    let format = target.format();
    let stats = out.stats.first().copied().unwrap_or_default();
    match args.output {
        OutputFormat::Json => {
            let domain = define.then(|| {
                json!({
                    "name": o["domain"],
                    "type": o["domain_type"],
                    "firmware": o["firmware"],
                    "disk_bus": o["disk_bus"],
                    "memory_mib": args.memory,
                    "vcpus": args.vcpus,
                    "started": started,
                })
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "uri": args.connect,
                    "pool": args.pool,
                    "volume": args.volume,
                    "path": path,
                    "format": format,
                    "capacity": crate::targets::libvirt::fill::capacity(format, size)?,
                    "virtual_size": size,
                    "data_bytes": out.disks.first().map_or(0, |d| d.data_bytes),
                    "sent": {
                        "bytes_sent": stats.bytes_sent,
                        "zero_fill_bytes": stats.zero_fill_bytes,
                        "skipped_bytes": stats.skipped_bytes,
                        "holes": stats.holes,
                        "streams": stats.streams,
                    },
                    "domain": domain,
                }))?
            );
        }
        OutputFormat::Human => {
            println!("{path}");
            if let Some(name) = o["domain"].as_str() {
                println!("domain {name}{}", if started { " (started)" } else { "" });
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use crate::cli::{
        Cli, Command, DiskBusArg, DomainTypeArg, FirmwareArg, LibvirtVolFormat, UploadTarget,
    };

    use super::*;

    fn parse(extra: &[&str]) -> Result<LibvirtUploadArgs, clap::Error> {
        let mut argv = vec![
            "imgshift", "upload", "libvirt", "d.qcow2", "--pool", "p", "--volume", "v",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Upload {
                target: UploadTarget::Libvirt(a),
            } => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn libvirt_defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.output_format, LibvirtVolFormat::Qcow2);
        assert!(a.define.is_none() && !a.overwrite && !a.start);
        assert_eq!(a.firmware, FirmwareArg::Auto);
        assert_eq!(a.disk_bus, DiskBusArg::Auto);
        assert_eq!(a.domain_type, DomainTypeArg::Auto);
    }

    #[test]
    fn domain_flags_need_define() {
        for f in [
            &["--start"][..],
            &["--memory", "512"],
            &["--vcpus", "2"],
            &["--firmware", "uefi"],
            &["--disk-bus", "virtio"],
            &["--domain-type", "qemu"],
            &["--network", "default"],
            &["--serial-log", "/tmp/x"],
        ] {
            assert!(parse(f).is_err(), "{f:?} without --define");
        }
        let a = parse(&[
            "--define",
            "vm",
            "-O",
            "raw",
            "--overwrite",
            "--memory",
            "512",
            "--vcpus",
            "2",
            "--firmware",
            "uefi",
            "--disk-bus",
            "scsi",
            "--domain-type",
            "qemu",
            "--network",
            "default",
            "--serial-log",
            "/tmp/x",
            "--start",
            "--connect",
            "qemu:///session",
        ])
        .unwrap();
        assert_eq!(a.define.as_deref(), Some("vm"));
        assert_eq!(a.output_format, LibvirtVolFormat::Raw);
        assert_eq!((a.memory, a.vcpus), (512, 2));
        assert_eq!(a.firmware, FirmwareArg::Uefi);
        assert_eq!(a.disk_bus, DiskBusArg::Scsi);
        assert_eq!(a.domain_type, DomainTypeArg::Qemu);
        assert_eq!(a.connect, "qemu:///session");
        assert!(a.overwrite && a.start);
    }

    #[test]
    fn rejects_unknown_values() {
        assert!(parse(&["-O", "vmdk"]).is_err());
        assert!(parse(&["--define", "x", "--firmware", "coreboot"]).is_err());
        assert!(parse(&["--define", "x", "--disk-bus", "ide"]).is_err());
        assert!(parse(&["--define", "x", "--domain-type", "xen"]).is_err());
    }
}
