//! `imgshift migrate`: maps its options to a target and the runner's stages ([`crate::runner`]), prints the
//! plan (`--dry-run`) or the report; rerunning the same command, or `imgshift resume JOB`, continues an
//! interrupted job from its journal.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Result, bail};
use serde_json::json;

use super::parse_tags;
use crate::cli::{MigrateArgs, OutputFormat};
use crate::guest::preflight::Level;
use crate::journal::state_dir;
use crate::progress::StageUi;
use crate::runner::plan::{self, ReportInput};
use crate::runner::{self, RunSpec, Stages};
use crate::sources::{self, SourceConn, SourceRef};
use crate::target_kind::TargetKind;

/// The `--to` options given on the command line for another target than `to`, as a usage error's text
/// (`--pool` belongs to `--to libvirt`). Options set by the environment (AZURE_SUBSCRIPTION_ID) are not counted.
pub fn foreign_options(to: TargetKind) -> Option<String> {
    use clap::{Args, CommandFactory};
    let matches = crate::cli::Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok()?;
    let (_, m) = matches.subcommand().filter(|(n, _)| *n == "migrate")?;
    let groups: [(TargetKind, clap::Command); 3] = [
        (
            TargetKind::Aws,
            crate::cli::MigrateAwsArgs::augment_args(clap::Command::new("aws")),
        ),
        (
            TargetKind::Azure,
            crate::cli::MigrateAzureArgs::augment_args(clap::Command::new("azure")),
        ),
        (
            TargetKind::Libvirt,
            crate::cli::MigrateLibvirtArgs::augment_args(clap::Command::new("libvirt")),
        ),
    ];
    let mut found = Vec::new();
    for (t, cmd) in &groups {
        if *t == to {
            continue;
        }
        for a in cmd.get_arguments() {
            if m.value_source(a.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine) {
                let flag = a
                    .get_long()
                    .map_or_else(|| a.get_id().to_string(), |l| format!("--{l}"));
                found.push(format!("{flag} (--to {})", t.name()));
            }
        }
    }
    if found.is_empty() {
        return None;
    }
    Some(format!(
        "{} belong{} to another target than --to {}: remove {}",
        found.join(", "),
        if found.len() == 1 { "s" } else { "" },
        to.name(),
        if found.len() == 1 { "it" } else { "them" }
    ))
}

/// Where `migrate`'s cloud source is read from: its `--source-*` options (the environment serves both sides).
pub(crate) fn source_conn(args: &MigrateArgs) -> SourceConn {
    source_conn_of(&args.source, args.max_attempts)
}

/// The connection a command's `--source-*` options name (the environment serves both sides).
pub fn source_conn_of(source: &crate::cli::MigrateSourceArgs, max_attempts: u32) -> SourceConn {
    SourceConn {
        aws: crate::targets::aws::config::AwsTarget {
            region: source.region.clone(),
            profile: source.profile.clone(),
            endpoint_url: source.endpoint_url.clone(),
        },
        max_attempts,
        azure: crate::targets::azure::source::AzureReadConn {
            arm_endpoint: source.arm_endpoint.clone(),
            ca_bundle: source
                .ca_bundle
                .clone()
                .or(env("IMGSHIFT_CA_BUNDLE").map(Into::into)),
            subscription: source.subscription.clone().or(env("AZURE_SUBSCRIPTION_ID")),
            max_attempts,
        },
        libvirt_uri: source
            .connect
            .clone()
            .or(env("LIBVIRT_DEFAULT_URI"))
            .unwrap_or_else(|| "qemu:///system".into()),
        allow_running: source.allow_running,
    }
}

/// What identifies the source for the job id: a local file's path, size and modification time; a cloud disk's
/// name and where it is read from.
fn source_key(args: &MigrateArgs) -> Result<String> {
    match SourceRef::parse(&args.src)? {
        SourceRef::File(p) => crate::journal::source_identity(&p),
        r @ (SourceRef::LibvirtVolume { .. } | SourceRef::LibvirtDomain { .. }) => Ok(format!(
            "{r:?}\0{:?}",
            args.source
                .connect
                .as_deref()
                .or(env("LIBVIRT_DEFAULT_URI").as_deref())
        )),
        r @ (SourceRef::AzureDisk { .. } | SourceRef::AzureSnapshot { .. }) => Ok(format!(
            "{r:?}\0{}\0{:?}",
            args.source.arm_endpoint,
            args.source
                .subscription
                .as_deref()
                .or(env("AZURE_SUBSCRIPTION_ID").as_deref()),
        )),
        r => Ok(format!(
            "{r:?}\0{:?}\0{:?}\0{:?}\0{:?}",
            args.source
                .region
                .as_deref()
                .or(env("AWS_REGION").as_deref()),
            args.source.profile,
            args.source
                .endpoint_url
                .as_deref()
                .or(env("AWS_ENDPOINT_URL").as_deref()),
            env("AWS_PROFILE"),
        )),
    }
}

/// Runs `migrate`.
pub fn run(args: &MigrateArgs, quiet: bool) -> Result<u8> {
    let name = job_name(args)?;
    let kind = args.to;
    let to = kind.name();
    let cloud = SourceRef::parse(&args.src)?.is_cloud();
    if cloud && args.generalize.is_some() {
        bail!(
            "--generalize works on a local image (libguestfs writes an overlay over it); a cloud disk is read \
             as it is"
        );
    }
    let opened = sources::open_all(
        &args.src,
        args.format.as_deref(),
        &args.trust.allow_dirs,
        &source_conn(args),
    )?;
    let facts = opened.facts;
    let srcs = opened.disks;
    let source_resources = opened.grants;
    // `aws:vol-` reads the volume's newest completed snapshot: an interrupted job of the same command must go on
    // with the snapshot it started from, never mix two.
    if matches!(SourceRef::parse(&args.src)?, SourceRef::AwsVolume(_)) && !args.dry_run {
        let id = job_id(args)?;
        let journal = state_dir(args.state_dir.as_deref())?.join(format!("{id}.json"));
        if let Some(st) = crate::journal::peek(&journal) {
            let started: Vec<String> = st.disks.iter().map(|d| d.name.clone()).collect();
            if started != srcs.names {
                bail!(
                    "{}: job {id} started from {} but the volume's newest completed snapshot is now {}: \
                     `imgshift jobs cancel {id}` removes what the job made, then run the command again",
                    args.src.display(),
                    started.join(", "),
                    srcs.names.join(", ")
                );
            }
        }
    }
    let mut target = super::targets::for_migrate_from(args, &facts)?;
    // The boot mode the guest is registered with on AWS: the flag, else what the source's cloud says.
    let boot_mode = match args.to {
        TargetKind::Aws => args.aws.boot_mode.clone().or(facts.boot_mode.clone()),
        _ => None,
    };

    if args.dry_run {
        let (disks, _) = runner::disks_of(&srcs)?;
        let Some(boot) = srcs.disks.first() else {
            bail!("{}: no disk", args.src.display());
        };
        let pf = plan::preflight(boot, to, boot_mode.as_deref());
        // A Windows guest: --generalize is refused unless sysprep already generalised it (then a no-op).
        let windows_note = match &args.generalize {
            Some(_) => plan::windows_generalize(boot)?,
            None => None,
        };
        target.follow(&pf.verdict.settings);
        let creates = target.plan(&name, &disks);
        // Everything that can be checked without creating anything: options, credentials, region or
        // connection, names free, pool present.
        runner::check_target(target.as_mut(), &name, &disks)?;
        let lines = plan::plan_lines(to, &disks, &creates);
        let fails = pf.verdict.verdict == Level::Fail;
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
                if let Some(note) = &windows_note {
                    println!("generalize: {note}");
                } else if let Some(g) = &args.generalize {
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

    let mut stage_count = 4 + target.after_stages().len();
    if args.generalize.is_some() {
        stage_count += 1;
    }
    let ui = Arc::new(StageUi::new(quiet, stage_count));
    let src = args.src.clone();
    let format = args.format.clone();
    let trust = args.trust.clone();
    let spec = RunSpec {
        id: job_id(args)?,
        kind: format!("migrate-{to}"),
        target_name: to,
        name,
        source_label: args.src.display().to_string(),
        sources: srcs,
        source_resources,
        boot_path: args.src.clone(),
        reopen_boot: Box::new(move || {
            crate::open::open_image(&src, format.as_deref(), &trust.allow_dirs)
        }),
        generalize: args.generalize.clone().map(|g| (g, kind)),
        stages: Stages {
            inspect: true,
            register: true,
            verify: true,
        },
        boot_mode,
        force: args.force,
        confirm: true,
        yes: args.yes,
        state_dir: state_dir(args.state_dir.as_deref())?,
        tags: parse_tags(&args.tags)?,
        verbose: args.verbose,
        rollback: false,
    };
    let out = runner::run(spec, target.as_mut(), ui)?;
    let source = args.src.display().to_string();
    let input = ReportInput {
        job: &out.id,
        target: to,
        source: &source,
        disks: &out.disks,
        sent: &out.sent,
        outputs: out.outputs.clone(),
        stages: &out.stages,
        resumed: out.resumed,
    };
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&plan::report_json(&input))?
        ),
        OutputFormat::Human => print!("{}", plan::report_text(&input)),
    }
    std::io::stdout().flush().ok();
    Ok(0)
}

/// `--name`, or the source file's stem with characters clouds refuse replaced.
pub fn job_name(args: &MigrateArgs) -> Result<String> {
    let raw = match &args.name {
        Some(n) => n.clone(),
        None => args
            .src
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches(|c| c == '.' || c == '-').to_string();
    if clean.is_empty() || clean.len() > 80 {
        bail!("--name: give a name of 1 to 80 letters, digits, '.', '-' or '_' (got {raw:?})");
    }
    if args.name.is_some() && clean != raw {
        bail!("--name {raw:?}: use only letters, digits, '.', '-' and '_'");
    }
    Ok(clean)
}

/// The job id: the same source (path, size, mtime) going to the same place under the same name is the same job,
/// so rerunning the command (or `resume`) continues it.
pub fn job_id(args: &MigrateArgs) -> Result<String> {
    let place = match args.to {
        TargetKind::Aws => format!(
            "{:?}\0{:?}\0{:?}\0{:?}\0{}",
            args.aws.region.as_deref().or(env("AWS_REGION").as_deref()),
            args.aws.profile,
            args.aws
                .endpoint_url
                .as_deref()
                .or(env("AWS_ENDPOINT_URL").as_deref()),
            args.aws.kms_key_id,
            args.aws.encrypted
        ),
        TargetKind::Azure => format!(
            "{}\0{:?}\0{:?}",
            args.azure.arm_endpoint, args.azure.subscription, args.azure.resource_group
        ),
        TargetKind::Libvirt => format!("{}\0{:?}", args.libvirt.connect, args.libvirt.pool),
    };
    let key = format!(
        "migrate\0{}\0{:?}\0{}\0{place}\0{:?}\0{:?}",
        source_key(args)?,
        args.to,
        job_name(args)?,
        args.generalize,
        args.format,
    );
    Ok(crate::journal::job_id_from("migrate", &key))
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}
