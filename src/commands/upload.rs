//! `imgshift upload aws`: source image → EBS snapshot (EBS direct APIs) → AMI, resumable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use imgshift_converters::{Progress as _, engine};
use serde_json::json;

use super::open_image;
use crate::cli::{AwsConnArgs, AwsUploadArgs, OutputFormat};
use crate::journal::{JobState, Journal, state_dir};
use crate::progress::Bar;
use crate::targets::aws::register::{self, ImageSpec};
use crate::targets::aws::retry::Policy;
use crate::targets::aws::upload::{self as up, UploaderOptions};
use crate::targets::aws::{EBS_BLOCK_SIZE, config, volume_gib};

/// How long to wait for the snapshot to complete and the AMI to become available.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);

pub(crate) use crate::targets::{parse_tags, runtime};

/// "in region R (endpoint E)" for errors: an unknown region fails as a DNS error on its EBS endpoint.
fn where_ebs(sdk: &aws_config::SdkConfig, c: &AwsConnArgs) -> String {
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
    let endpoint = match &c.endpoint_url {
        Some(e) => e.clone(),
        None => format!("https://ebs.{region}.amazonaws.com; is the region name right?"),
    };
    format!("cannot start a snapshot in region {region} (endpoint {endpoint})")
}

pub(crate) fn aws_target(c: &AwsConnArgs) -> config::AwsTarget {
    config::AwsTarget {
        region: c.region.clone(),
        profile: c.profile.clone(),
        endpoint_url: c.endpoint_url.clone(),
    }
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

/// Runs `upload aws`.
pub fn aws(args: &AwsUploadArgs, quiet: bool) -> Result<u8> {
    if args.concurrency == 0 || args.concurrency > 1024 {
        bail!("--concurrency must be between 1 and 1024");
    }
    let tags = parse_tags(&args.tags)?;
    let id = job_id(args)?;
    let src = open_image(&args.src, args.format.as_deref(), &args.trust)?;
    let (src, overlay) = super::generalize_for_upload(
        &args.src,
        src,
        args.generalize.as_deref(),
        crate::generalize::operations::Target::Aws,
        &state_dir(args.state_dir.as_deref())?,
        &id,
        quiet,
    )?;
    let size = src.virtual_size();
    let gib = volume_gib(size);
    let block_count = gib * ((1 << 30) / EBS_BLOCK_SIZE);
    let map = engine::source_map(src.as_ref())
        .with_context(|| format!("cannot map {}", args.src.display()))?;
    let say = |m: String| {
        if args.verbose {
            eprintln!("imgshift: {m}");
        }
    };

    let rt = runtime()?;
    let sdk = rt.block_on(config::load(&aws_target(&args.conn)));
    if sdk.region().is_none() {
        bail!("no AWS region: pass --region or set AWS_REGION");
    }
    let ebs = aws_sdk_ebs::Client::new(&sdk);
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let pol = policy(&args.conn);

    let encrypted_req = args.encrypted || args.kms_key_id.is_some();
    let fresh = JobState {
        version: 1,
        id: id.clone(),
        kind: "aws-upload".into(),
        source: args.src.display().to_string(),
        block_count,
        block_size: EBS_BLOCK_SIZE,
        stage: "new".into(),
        encrypted: encrypted_req,
        ..JobState::default()
    };
    let (journal, resumed) =
        Journal::open_or_create(&state_dir(args.state_dir.as_deref())?, fresh)?;
    say(format!("job {id} (journal {})", journal.path().display()));

    // 1. The snapshot: started once per job (ClientToken = job id makes StartSnapshot idempotent).
    let (snapshot_id, encrypted) = match journal.state.ids.get("snapshot") {
        Some(s) => {
            if !quiet {
                eprintln!(
                    "imgshift: resuming job {id}: snapshot {s}, {} of {block_count} blocks already uploaded",
                    journal.done.count()
                );
            }
            (s.clone(), journal.state.encrypted)
        }
        None => {
            let req = up::SnapshotRequest {
                volume_gib: gib,
                client_token: &id,
                description: args.description.as_deref(),
                encrypted: encrypted_req,
                kms_key_arn: args.kms_key_id.as_deref(),
                tags: &tags,
            };
            let (s, enc) = rt
                .block_on(up::start_snapshot(&ebs, &pol, &req))
                .with_context(|| where_ebs(&sdk, &args.conn))?;
            say(format!(
                "started snapshot {s} ({gib} GiB{})",
                if enc { ", encrypted" } else { "" }
            ));
            (s, enc)
        }
    };
    let journal = Arc::new(Mutex::new(journal));
    {
        let mut j = journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        j.state.ids.insert("snapshot".into(), snapshot_id.clone());
        j.record("snapshot", &snapshot_id);
        j.state.encrypted = encrypted;
        if j.state.stage == "new" {
            j.state.stage = "started".into();
        }
        j.save()?;
    }
    let leftover = |e: anyhow::Error| {
        e.context(format!(
            "snapshot {snapshot_id} was left pending (job {id}): rerun the same command to resume, or delete it with \
             `aws ec2 delete-snapshot --snapshot-id {snapshot_id}`"
        ))
    };
    if encrypted && !quiet {
        eprintln!("imgshift: the snapshot is encrypted: every block is written, zeros included");
    }

    // 2. The blocks: the engine feeds 512 KiB blocks, the uploader sends them.
    let stage = journal
        .lock()
        .map(|j| j.state.stage.clone())
        .unwrap_or_default();
    let mut counts = up::UploadCounts::default();
    if stage == "started" {
        let planned = if encrypted {
            block_count * EBS_BLOCK_SIZE
        } else {
            map.data_runs(EBS_BLOCK_SIZE)
                .iter()
                .map(|r| r.1 - r.0)
                .sum()
        };
        let bar = Arc::new(Bar::new("upload", args.progress, quiet));
        bar.set_total(planned);
        let bar2 = bar.clone();
        let progress: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| bar2.inc(n));
        let opts = UploaderOptions {
            concurrency: args.concurrency,
            policy: pol,
        };
        let r = up::stream_snapshot(
            &rt,
            &ebs,
            &snapshot_id,
            src.as_ref(),
            &map,
            encrypted,
            block_count,
            crate::journal::Ledger::new(journal.clone(), None),
            opts,
            progress,
            args.verbose,
        );
        bar.finish();
        counts = r
            .map_err(|e| e.context(format!("{}", args.src.display())))
            .map_err(leftover)?;
        let mut j = journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        let changed = j.done.count();
        drop(j);
        rt.block_on(up::complete_snapshot(&ebs, &pol, &snapshot_id, changed))
            .map_err(leftover)?;
        j = journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        j.state.stage = "completed".into();
        j.save()?;
        say(format!(
            "completed snapshot {snapshot_id}: {changed} blocks"
        ));
    }
    rt.block_on(register::wait_snapshot(
        &ec2,
        &pol,
        &snapshot_id,
        WAIT_LIMIT,
    ))?;

    // 3. The AMI.
    let mut image_id = journal
        .lock()
        .ok()
        .and_then(|j| j.state.ids.get("image").cloned());
    if !args.snapshot_only && image_id.is_none() {
        let spec = ImageSpec {
            name: args.name.clone().unwrap_or_default(),
            description: args.description.clone(),
            architecture: args.architecture.clone(),
            boot_mode: args.boot_mode.clone(),
            ena: !args.no_ena,
            tpm_v2: args.tpm_v2,
            imds_v2_required: args.imds_v2_required,
            volume_type: args.volume_type.clone(),
            root_device: args.root_device.clone(),
            tags: tags.clone(),
        };
        let ami = rt.block_on(register::register_image(&ec2, &pol, &spec, &snapshot_id))?;
        {
            let mut j = journal
                .lock()
                .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
            j.state.ids.insert("image".into(), ami.clone());
            j.record("image", &ami);
            j.state.stage = "registered".into();
            j.save()?;
        }
        rt.block_on(register::wait_image(&ec2, &pol, &ami, WAIT_LIMIT))?;
        say(format!("registered {ami}"));
        image_id = Some(ami);
    }

    let (blocks_total, data_bytes) = {
        let j = journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        (
            j.done.count(),
            map.bytes(imgshift_converters::ExtentKind::Data),
        )
    };
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": id,
                "snapshot_id": snapshot_id,
                "image_id": image_id,
                "encrypted": encrypted,
                "resumed": resumed,
                "virtual_size": size,
                "volume_size_gib": gib,
                "data_bytes": data_bytes,
                "blocks_in_snapshot": blocks_total,
                "blocks_put": counts.blocks_put,
                "bytes_sent": counts.bytes_sent,
                "retries": counts.retries,
                "throttled": counts.throttled,
            }))?
        ),
        OutputFormat::Human => {
            if let Some(ami) = &image_id {
                println!("{ami}");
            }
            println!("{snapshot_id}");
        }
    }
    let j = Arc::try_unwrap(journal)
        .map_err(|_| anyhow::anyhow!("journal still shared"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    j.remove()?;
    super::remove_overlay(overlay.as_deref())?;
    Ok(0)
}
