//! `imgshift upload azure`: source image → fixed VHD stream → managed disk (Put Page through the disk's write
//! SAS) → image and/or gallery image version, resumable through the job journal.
//!
//! Stages kept in the journal: `new` → `creating` (disk PUT sent) → `uploading` (SAS granted at least once) →
//! `uploaded` (every window and the footer acknowledged) → `revoked` → `done`. The SAS itself is never stored:
//! every run asks for a fresh one.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use imgshift_converters::{ExtentKind, engine};
use serde_json::json;

use super::open_image;
use super::upload::{parse_tags, runtime};
use crate::cli::{AzureUploadArgs, OutputFormat};
use crate::journal::{JobState, Journal, state_dir};
use crate::progress::Bar;
use crate::targets::azure::arm::{Arm, DISK_API, DiskSpec, check_name};
use crate::targets::azure::pages::slot_count;
use crate::targets::azure::retry::Policy;
use crate::targets::azure::{
    GEN1_MAX_OS_DISK, MAX_DISK, MAX_PUT_PAGE, credential, disk_data_size, http, hyperv, upload,
    upload_size_bytes,
};

/// Same source (path, size, mtime) to the same disk of the same subscription/resource group/endpoint = same job.
fn job_id(args: &AzureUploadArgs) -> Result<String> {
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

fn lock(j: &Mutex<Journal>) -> Result<std::sync::MutexGuard<'_, Journal>> {
    j.lock()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))
}

fn set_stage(j: &Mutex<Journal>, stage: &str) -> Result<()> {
    let mut g = lock(j)?;
    g.state.stage = stage.into();
    g.save()
}

/// Runs `upload azure`.
pub fn run(args: &AzureUploadArgs, quiet: bool) -> Result<u8> {
    if args.concurrency == 0 || args.concurrency > 256 {
        bail!("--concurrency must be between 1 and 256");
    }
    if !(300..=7 * 86400).contains(&args.access_duration) {
        bail!("--access-duration must be between 300 and 604800 seconds");
    }
    check_name("--disk-name", &args.disk_name)?;
    for (what, v) in [
        ("--image-name", &args.image_name),
        ("--gallery", &args.gallery),
        ("--gallery-image", &args.gallery_image),
        ("--gallery-version", &args.gallery_version),
    ] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    let tags = parse_tags(&args.tags)?;
    let say = |m: String| {
        if args.verbose {
            eprintln!("imgshift: {m}");
        }
    };

    let src = open_image(&args.src, args.format.as_deref(), &args.trust)?;
    let (src, overlay) = super::generalize_for_upload(
        &args.src,
        src,
        args.generalize.as_deref(),
        crate::generalize::operations::Target::Azure,
        &state_dir(args.state_dir.as_deref())?,
        &job_id(args)?,
        quiet,
    )?;
    let size = src.virtual_size();
    let data_size = disk_data_size(size).ok_or_else(|| {
        anyhow::anyhow!(
            "{} has a virtual size of {size} bytes; Azure managed disks hold at most {MAX_DISK} bytes",
            args.src.display()
        )
    })?;
    let upload_size = upload_size_bytes(size).context("disk too large")?;
    let (generation, why) = match args.hyper_v_generation.as_str() {
        "auto" => {
            let (g, why) = hyperv::detect(src.as_ref());
            (g, Some(why))
        }
        "V2" => ("V2", None),
        _ => ("V1", None),
    };
    if generation == "V1" && data_size > GEN1_MAX_OS_DISK {
        bail!(
            "an OS disk over 2 TiB boots only as Hyper-V generation V2; this one is {data_size} bytes{}",
            if why.is_some() {
                " and looks like a BIOS disk"
            } else {
                ": pass --hyper-v-generation V2"
            }
        );
    }
    if let Some(why) = why
        && !quiet
    {
        eprintln!("imgshift: Hyper-V generation {generation}: {why}");
    }
    let map = engine::source_map(src.as_ref())
        .with_context(|| format!("cannot map {}", args.src.display()))?;

    let rt = runtime()?;
    let transport = http::transport(args.ca_bundle.as_deref())?;
    let cred = credential::choose(&transport)?;
    rt.block_on(credential::check(&cred))?;
    say(format!("credentials: {}", cred.source));
    let arm = Arm::new(
        &args.arm_endpoint,
        cred.credential.clone(),
        &transport,
        args.max_attempts.max(1),
        &args.subscription,
        &args.resource_group,
        args.verbose,
    )?;
    let id = job_id(args)?;
    let slots = slot_count(data_size);
    let fresh = JobState {
        version: 1,
        id: id.clone(),
        kind: "azure-upload".into(),
        source: args.src.display().to_string(),
        block_count: slots,
        block_size: MAX_PUT_PAGE,
        stage: "new".into(),
        ..JobState::default()
    };
    let (journal, resumed) =
        Journal::open_or_create(&state_dir(args.state_dir.as_deref())?, fresh)?;
    say(format!("job {id} (journal {})", journal.path().display()));
    let journal = Arc::new(Mutex::new(journal));

    let disk = args.disk_name.as_str();
    let rg = args.resource_group.as_str();
    let leftover = |e: anyhow::Error| {
        e.context(format!(
            "disk {disk} was left in resource group {rg} (job {id}): rerun the same command to resume, or \
             delete it with `az disk delete -g {rg} -n {disk}`"
        ))
    };

    // 1. The disk.
    let stage = lock(&journal)?.state.stage.clone();
    if stage == "new" {
        let found = rt.block_on(arm.get(
            &format!("disks/{disk}"),
            DISK_API,
            &format!("looking up disk {disk}"),
        ));
        let refused = match found {
            Err(e) => Some(e),
            Ok(Some(_)) => Some(anyhow::anyhow!(
                "disk {disk} already exists in resource group {rg}: choose another --disk-name or delete it"
            )),
            Ok(None) => None,
        };
        if let Some(e) = refused {
            // Nothing was created: no job to resume.
            if let Ok(m) = Arc::try_unwrap(journal)
                && let Ok(j) = m.into_inner()
            {
                let _ = j.remove();
            }
            return Err(e);
        }
        {
            let mut g = lock(&journal)?;
            g.record("disk", disk);
        }
        set_stage(&journal, "creating")?;
    }
    if stage == "new" || stage == "creating" {
        let spec = DiskSpec {
            name: disk,
            location: &args.location,
            sku: &args.sku,
            os_type: Some(if args.os_type == "windows" {
                "Windows"
            } else {
                "Linux"
            }),
            hyper_v_generation: Some(generation),
            upload_size_bytes: upload_size,
            tags: &tags,
        };
        rt.block_on(arm.create_disk(&spec)).map_err(leftover)?;
        say(format!(
            "created disk {disk}: uploadSizeBytes {upload_size}, {generation}, {}",
            spec.os_type.unwrap_or_default()
        ));
        {
            let mut g = lock(&journal)?;
            g.state
                .ids
                .insert("disk".into(), arm.id(&format!("disks/{disk}")));
        }
        set_stage(&journal, "uploading")?;
    }

    // 2. The data.
    let mut counts = upload::Counts::default();
    let stage = lock(&journal)?.state.stage.clone();
    if stage == "uploading" {
        let (skip, old_expiry) = {
            let g = lock(&journal)?;
            (g.done.count(), g.state.ids.get("sas_expiry").cloned())
        };
        if resumed && !quiet {
            eprintln!(
                "imgshift: resuming job {id}: disk {disk}, {} of {slots} pieces already uploaded; requesting a new \
                 SAS{}",
                skip,
                old_expiry
                    .map(|e| format!(" (the last one expires {e})"))
                    .unwrap_or_default()
            );
        }
        let sas = rt
            .block_on(arm.grant_write(disk, args.access_duration))
            .map_err(leftover)?;
        if let Some(e) = upload::sas_expiry(&sas) {
            let mut g = lock(&journal)?;
            g.state.ids.insert("sas_expiry".into(), e);
            g.save()?;
        }
        say(format!("write access granted to disk {disk}"));
        let client = upload::blob_client(&sas, &transport).map_err(leftover)?;
        drop(sas);
        let planned: u64 = map.bytes(ExtentKind::Data);
        let bar = Arc::new(Bar::new("upload", args.progress, quiet));
        imgshift_converters::Progress::set_total(bar.as_ref(), planned);
        let bar2 = bar.clone();
        let progress: Arc<dyn Fn(u64) + Send + Sync> =
            Arc::new(move |n| imgshift_converters::Progress::inc(bar2.as_ref(), n));
        let src_name = args.src.display().to_string();
        let r = upload::stream_disk(
            &rt,
            client,
            upload::DiskStream {
                src: src.as_ref(),
                map: &map,
                src_name: &src_name,
                data_size,
                concurrency: args.concurrency,
                policy: Policy {
                    max_attempts: args.max_attempts.max(1),
                    ..Policy::default()
                },
                ledger: crate::journal::Ledger::new(journal.clone(), None),
                progress,
            },
        );
        bar.finish();
        counts = match r {
            Ok(c) => c,
            Err(e) => {
                // Revoke access so the SAS stops working; a rerun asks for a new one.
                if let Err(r) = rt.block_on(arm.revoke(disk)) {
                    say(format!("could not revoke access: {r:#}"));
                }
                return Err(leftover(e));
            }
        };
        say(format!(
            "uploaded {} bytes in {} Put Page requests ({} retried)",
            counts.bytes_sent, counts.requests, counts.retries
        ));
        set_stage(&journal, "uploaded")?;
    }
    let stage = lock(&journal)?.state.stage.clone();
    if stage == "uploaded" {
        rt.block_on(arm.revoke(disk)).map_err(leftover)?;
        say(format!("revoked access to disk {disk}"));
        set_stage(&journal, "revoked")?;
    }

    // 3. The image and the gallery version.
    let disk_id = arm.id(&format!("disks/{disk}"));
    let mut image_id = None;
    if let Some(name) = &args.image_name {
        let known = lock(&journal)?.state.ids.get("image").cloned();
        image_id = match known {
            Some(i) => Some(i),
            None => {
                let os = if args.os_type == "windows" {
                    "Windows"
                } else {
                    "Linux"
                };
                rt.block_on(arm.create_image(name, &args.location, disk, os, generation, &tags))
                    .map_err(|e| {
                        e.context(format!(
                            "the disk {disk} is uploaded and kept; rerun the same command to retry the image"
                        ))
                    })?;
                let i = arm.id(&format!("images/{name}"));
                let mut g = lock(&journal)?;
                g.state.ids.insert("image".into(), i.clone());
                g.record("image", name);
                g.save()?;
                say(format!("created image {name}"));
                Some(i)
            }
        };
    }
    let mut version_id = None;
    if let (Some(g), Some(def), Some(ver)) =
        (&args.gallery, &args.gallery_image, &args.gallery_version)
    {
        rt.block_on(arm.create_gallery_version(g, def, ver, &args.location, disk, &tags))
            .map_err(|e| {
                e.context(format!(
                    "the disk {disk} is uploaded and kept; rerun the same command to retry the gallery version"
                ))
            })?;
        say(format!("created gallery image version {g}/{def}/{ver}"));
        version_id = Some(arm.id(&format!("galleries/{g}/images/{def}/versions/{ver}")));
    }

    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": id,
                "resumed": resumed,
                "disk_id": disk_id,
                "image_id": image_id,
                "gallery_image_version_id": version_id,
                "hyper_v_generation": generation,
                "virtual_size": size,
                "upload_size_bytes": upload_size,
                "data_bytes": map.bytes(ExtentKind::Data),
                "requests": counts.requests,
                "bytes_sent": counts.bytes_sent,
                "retries": counts.retries,
                "throttled": counts.throttled,
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
    let j = Arc::try_unwrap(journal)
        .map_err(|_| anyhow::anyhow!("journal still shared"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
    j.remove()?;
    super::remove_overlay(overlay.as_deref())?;
    Ok(0)
}
