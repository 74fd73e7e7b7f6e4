//! `imgshift images list|delete|share|unshare|copy`: the image after migration.

use anyhow::Result;
use serde_json::json;

use super::targets::aws_conn_args;
use crate::cli::{ImagesAction, ImagesCommon, OutputFormat, ShareWith};
use crate::target_kind::TargetKind;
use crate::targets::aws::images::{AwsImages, CopySettings, Grantees};
use crate::targets::azure::images::{AzureImages, AzureImagesSettings};

/// A usage error: one line, exit 2.
fn usage(msg: &str) -> Result<u8> {
    eprintln!("imgshift: {msg}");
    Ok(2)
}

fn connect(c: &ImagesCommon) -> Result<AwsImages> {
    AwsImages::connect(&aws_conn_args(&c.aws), c.aws.max_attempts)
}

/// Why `action` cannot run `--on` that cloud (a usage error), if it cannot.
fn unsupported(action: &str, c: &ImagesCommon) -> Option<String> {
    let ok = match c.on {
        TargetKind::Aws => true,
        TargetKind::Azure => true,
        TargetKind::Libvirt => matches!(action, "list" | "delete"),
    };
    (!ok).then(|| {
        format!(
            "images {action} works --on aws and --on azure (on libvirt: images list and images delete)"
        )
    })
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The grantees `w` names, or why they are not valid.
fn grantees(w: &ShareWith) -> std::result::Result<Grantees, String> {
    if w.principal.is_some() || !w.subscriptions.is_empty() || !w.tenants.is_empty() {
        return Err(
            "--principal, --subscriptions and --tenants are for --on azure; on AWS share with --accounts,              --org, --ou or --public"
                .into(),
        );
    }
    if w.public {
        return Ok(Grantees::Public);
    }
    if let Some(o) = &w.org {
        if !o.starts_with("arn:") || !o.contains(":organization/") {
            return Err(format!(
                "--org wants an organization ARN (arn:aws:organizations::ACCOUNT:organization/o-...), not '{o}'"
            ));
        }
        return Ok(Grantees::Org(o.clone()));
    }
    if let Some(o) = &w.ou {
        if !o.starts_with("arn:") || !o.contains(":ou/") {
            return Err(format!(
                "--ou wants an organizational unit ARN (arn:aws:organizations::ACCOUNT:ou/o-.../ou-...), not '{o}'"
            ));
        }
        return Ok(Grantees::Ou(o.clone()));
    }
    Ok(Grantees::Accounts(account_ids("--accounts", &w.accounts)?))
}

/// 12-digit AWS account ids, once each, or why `flag`'s list is not.
pub(crate) fn account_ids(flag: &str, list: &[String]) -> std::result::Result<Vec<String>, String> {
    let mut ids = Vec::new();
    for a in list {
        let a = a.trim();
        if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{flag} wants 12-digit AWS account ids, not '{a}'"));
        }
        if !ids.iter().any(|i| i == a) {
            ids.push(a.to_string());
        }
    }
    if ids.is_empty() {
        return Err(format!("{flag} names no account"));
    }
    Ok(ids)
}

/// Region names, once each, or why `flag`'s list is not.
pub(crate) fn region_names(
    flag: &str,
    list: &[String],
) -> std::result::Result<Vec<String>, String> {
    let mut regions: Vec<String> = Vec::new();
    for r in list {
        let r = r.trim();
        if r.is_empty()
            || !r
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "{flag}: '{r}' is not a region name (like eu-west-1)"
            ));
        }
        if !regions.iter().any(|x| x == r) {
            regions.push(r.to_string());
        }
    }
    Ok(regions)
}

fn check_ami(image: &str) -> Option<String> {
    (!image.starts_with("ami-")).then(|| format!("'{image}' is not an AMI id (ami-...)"))
}

/// Runs an `images` action; returns the exit code.
pub fn run(action: &ImagesAction) -> Result<u8> {
    let (name, common) = match action {
        ImagesAction::List { common, .. } => ("list", common),
        ImagesAction::Delete { common, .. } => ("delete", common),
        ImagesAction::Share { common, .. } => ("share", common),
        ImagesAction::Unshare { common, .. } => ("unshare", common),
        ImagesAction::Copy { common, .. } => ("copy", common),
    };
    if let Some(m) = unsupported(name, common) {
        return usage(&m);
    }
    match action {
        ImagesAction::List { all, common } if common.on == TargetKind::Azure => {
            list_azure(*all, common)
        }
        ImagesAction::List { all, common } if common.on == TargetKind::Libvirt => {
            list_libvirt(*all, common)
        }
        ImagesAction::List { all, common } => list(*all, common),
        ImagesAction::Share {
            image,
            with,
            common,
        } if common.on == TargetKind::Azure => share_azure(image, with, common, true),
        ImagesAction::Unshare {
            image,
            with,
            common,
        } if common.on == TargetKind::Azure => share_azure(image, with, common, false),
        ImagesAction::Copy {
            image,
            to_regions,
            encrypted,
            kms_key_id,
            common,
        } if common.on == TargetKind::Azure => {
            if *encrypted || kms_key_id.is_some() {
                return usage("--encrypted and --kms-key-id are for --on aws");
            }
            copy_azure(image, to_regions, common)
        }
        ImagesAction::Delete {
            image,
            dry_run,
            common,
        } if common.on == TargetKind::Azure => delete_azure(image, *dry_run, common),
        ImagesAction::Delete {
            image,
            dry_run,
            common,
        } if common.on == TargetKind::Libvirt => delete_libvirt(image, *dry_run, common),
        ImagesAction::Delete {
            image,
            dry_run,
            common,
        } => {
            if let Some(m) = check_ami(image) {
                return usage(&m);
            }
            delete(image, *dry_run, common)
        }
        ImagesAction::Share {
            image,
            with,
            common,
        } => share(image, with, common, true),
        ImagesAction::Unshare {
            image,
            with,
            common,
        } => share(image, with, common, false),
        ImagesAction::Copy {
            image,
            to_regions,
            encrypted,
            kms_key_id,
            common,
        } => {
            if let Some(m) = check_ami(image) {
                return usage(&m);
            }
            let regions = match region_names("--to-regions", to_regions) {
                Ok(r) => r,
                Err(m) => return usage(&m),
            };
            let s = CopySettings {
                regions,
                encrypted: *encrypted,
                kms_key_id: kms_key_id.clone(),
            };
            copy(image, &s, common)
        }
    }
}

fn list(all: bool, common: &ImagesCommon) -> Result<u8> {
    let c = connect(common)?;
    let images = c.list(all)?;
    if common.output == OutputFormat::Json {
        print_json(&json!({ "region": c.region(), "images": images }))?;
        return Ok(0);
    }
    if images.is_empty() {
        println!(
            "no {}AMI in {}",
            if all { "" } else { "imgshift " },
            c.region()
        );
        return Ok(0);
    }
    for i in &images {
        let sharing = if i.public {
            "public".to_string()
        } else if i.launch_permissions.is_empty() {
            "private".to_string()
        } else {
            format!("shared with {}", i.launch_permissions.join(", "))
        };
        println!(
            "{}  {}  {}  {}  snapshots {}{}  {}{}",
            i.image_id,
            i.name,
            i.region,
            i.state,
            if i.snapshot_ids.is_empty() {
                "none".to_string()
            } else {
                i.snapshot_ids.join(",")
            },
            if i.encrypted { " (encrypted)" } else { "" },
            sharing,
            match (&i.job, &i.copy_of) {
                (_, Some(src)) => format!("  copy of {src}"),
                (Some(j), None) => format!("  job {j}"),
                (None, None) => String::new(),
            }
        );
    }
    Ok(0)
}

fn delete(image: &str, dry_run: bool, common: &ImagesCommon) -> Result<u8> {
    let c = connect(common)?;
    let plan = c.delete_plan(image)?;
    if dry_run {
        if common.output == OutputFormat::Json {
            print_json(&json!({ "dry_run": true, "plan": plan }))?;
            return Ok(0);
        }
        println!(
            "would deregister AMI {} ({}) in {}",
            plan.image_id, plan.name, plan.region
        );
        for s in &plan.delete_snapshots {
            println!("would delete snapshot {s}");
        }
        for k in &plan.kept_snapshots {
            println!(
                "would keep snapshot {}: still used by {}",
                k.snapshot_id,
                k.used_by.join(", ")
            );
        }
        return Ok(0);
    }
    let done = c.delete(&plan)?;
    if common.output == OutputFormat::Json {
        print_json(&json!({
            "dry_run": false,
            "region": plan.region,
            "deregistered_image_id": plan.image_id,
            "deleted_snapshot_ids": plan.delete_snapshots,
            "kept_snapshots": plan.kept_snapshots,
        }))?;
    } else {
        for d in done {
            println!("{d}");
        }
    }
    Ok(0)
}

fn share(image: &str, with: &ShareWith, common: &ImagesCommon, add: bool) -> Result<u8> {
    if let Some(m) = check_ami(image) {
        return usage(&m);
    }
    let who = match grantees(with) {
        Ok(g) => g,
        Err(m) => return usage(&m),
    };
    let c = connect(common)?;
    let out = c.share(image, &who, add)?;
    if common.output == OutputFormat::Json {
        print_json(&serde_json::to_value(&out)?)?;
    } else {
        for n in &out.notes {
            println!("{n}");
        }
        println!(
            "launch permissions of {} now: {}",
            out.image_id,
            if out.launch_permissions.is_empty() {
                "none (private)".to_string()
            } else {
                out.launch_permissions.join(", ")
            }
        );
    }
    Ok(0)
}

fn copy(image: &str, s: &CopySettings, common: &ImagesCommon) -> Result<u8> {
    let c = connect(common)?;
    let json_out = common.output == OutputFormat::Json;
    let copies = c.copy(image, s, |m| {
        if json_out {
            eprintln!("imgshift: {m}");
        } else {
            println!("{m}");
        }
    })?;
    if json_out {
        print_json(
            &json!({ "source_image_id": image, "source_region": c.region(), "copies": copies }),
        )?;
    }
    Ok(0)
}

/// The Azure connection of an `images ACTION --on azure`, or the usage error when the place is not given.
fn azure(action: &str, common: &ImagesCommon) -> Result<std::result::Result<AzureImages, String>> {
    let a = &common.azure;
    let (Some(subscription), Some(resource_group)) = (&a.subscription, &a.resource_group) else {
        return Ok(Err(format!(
            "images {action} --on azure needs --subscription (or AZURE_SUBSCRIPTION_ID) and --resource-group"
        )));
    };
    Ok(Ok(AzureImages::connect(&AzureImagesSettings {
        arm_endpoint: a.arm_endpoint.clone(),
        ca_bundle: a.ca_bundle.clone(),
        subscription: subscription.clone(),
        resource_group: resource_group.clone(),
        max_attempts: common.aws.max_attempts,
    })?))
}

fn list_azure(all: bool, common: &ImagesCommon) -> Result<u8> {
    let c = match azure("list", common)? {
        Ok(c) => c,
        Err(m) => return usage(&m),
    };
    let images = c.list(all)?;
    let rg = common.azure.resource_group.clone().unwrap_or_default();
    if common.output == OutputFormat::Json {
        print_json(&json!({ "resource_group": rg, "images": images }))?;
        return Ok(0);
    }
    if images.is_empty() {
        println!(
            "no {}image or gallery image version in resource group {rg}",
            if all { "" } else { "imgshift " }
        );
        return Ok(0);
    }
    for i in &images {
        let mut line = format!("{}  {}  {}", i.kind, i.name, i.location);
        if !i.target_regions.is_empty() {
            line.push_str(&format!("  replicated to {}", i.target_regions.join(",")));
        }
        if let Some(sh) = &i.sharing {
            line.push_str(&format!("  gallery sharing {sh}"));
        }
        if !i.source_disks.is_empty() {
            let names: Vec<&str> = i
                .source_disks
                .iter()
                .map(|d| d.rsplit('/').next().unwrap_or(d))
                .collect();
            line.push_str(&format!("  disks {}", names.join(",")));
        }
        if let Some(j) = &i.job {
            line.push_str(&format!("  job {j}"));
        }
        println!("{line}");
    }
    Ok(0)
}

fn share_azure(image: &str, with: &ShareWith, common: &ImagesCommon, add: bool) -> Result<u8> {
    use crate::targets::azure::images::{AzureGrantee, is_guid};
    if !with.accounts.is_empty() || with.org.is_some() || with.ou.is_some() {
        return usage(
            "--accounts, --org and --ou are for --on aws; on Azure share with --principal, --subscriptions,              --tenants or --public",
        );
    }
    let guids = |flag: &str, list: &[String]| -> std::result::Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        for v in list {
            let v = v.trim();
            if !is_guid(v) {
                return Err(format!("{flag} wants ids (GUIDs), not '{v}'"));
            }
            if !out.iter().any(|o| o.eq_ignore_ascii_case(v)) {
                out.push(v.to_string());
            }
        }
        Ok(out)
    };
    let who = if with.public {
        AzureGrantee::Public
    } else if let Some(p) = &with.principal {
        AzureGrantee::Principal(p.trim().to_string())
    } else if !with.subscriptions.is_empty() {
        match guids("--subscriptions", &with.subscriptions) {
            Ok(v) => AzureGrantee::Subscriptions(v),
            Err(m) => return usage(&m),
        }
    } else {
        match guids("--tenants", &with.tenants) {
            Ok(v) => AzureGrantee::Tenants(v),
            Err(m) => return usage(&m),
        }
    };
    let c = match azure(if add { "share" } else { "unshare" }, common)? {
        Ok(c) => c,
        Err(m) => return usage(&m),
    };
    let out = match (&common.azure.gallery, &common.azure.gallery_image) {
        (Some(g), Some(d)) => c.share(g, d, &who, add)?,
        _ => c.refuse_managed_image(image)?,
    };
    if common.output == OutputFormat::Json {
        print_json(&serde_json::to_value(&out)?)?;
    } else {
        for n in &out.notes {
            println!("{n}");
        }
    }
    Ok(0)
}

fn copy_azure(version: &str, to_regions: &[String], common: &ImagesCommon) -> Result<u8> {
    let (Some(g), Some(d)) = (&common.azure.gallery, &common.azure.gallery_image) else {
        return usage(
            "images copy --on azure replicates a gallery image version: name its gallery and image definition              with --gallery and --gallery-image (a managed image cannot be replicated)",
        );
    };
    let regions: Vec<String> = to_regions
        .iter()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    if regions.is_empty()
        || regions
            .iter()
            .any(|r| !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' '))
    {
        return usage("--to-regions wants Azure region names (like westeurope,eastus2)");
    }
    let c = match azure("copy", common)? {
        Ok(c) => c,
        Err(m) => return usage(&m),
    };
    let (now, changed) = c.copy(g, d, version, &regions)?;
    if common.output == OutputFormat::Json {
        print_json(&json!({
            "gallery_image_version": format!("{g}/{d}/{version}"),
            "target_regions": now,
            "changed": changed,
        }))?;
    } else if changed {
        println!("{g}/{d}/{version} replicated to {}", now.join(", "));
    } else {
        println!(
            "{g}/{d}/{version} was already replicated to {}",
            now.join(", ")
        );
    }
    Ok(0)
}

fn delete_azure(name: &str, dry_run: bool, common: &ImagesCommon) -> Result<u8> {
    let c = match azure("delete", common)? {
        Ok(c) => c,
        Err(m) => return usage(&m),
    };
    let resource_group = common.azure.resource_group.clone().unwrap_or_default();
    let a = &common.azure;
    let gallery = a.gallery.as_deref().zip(a.gallery_image.as_deref());
    let plan = c.delete_plan(name, gallery)?;
    let json_out = common.output == OutputFormat::Json;
    if dry_run {
        if json_out {
            print_json(&json!({ "dry_run": true, "plan": plan }))?;
        } else {
            println!("would delete {} {}", plan.kind, plan.id);
            for d in &plan.delete_disks {
                println!("would delete disk {d}");
            }
            for k in &plan.kept_disks {
                println!("would keep disk {k}: not in resource group {resource_group}");
            }
        }
        return Ok(0);
    }
    let done = c.delete(&plan)?;
    if json_out {
        print_json(&json!({
            "dry_run": false,
            "deleted_id": plan.id,
            "deleted_disks": plan.delete_disks,
            "kept_disks": plan.kept_disks,
        }))?;
    } else {
        for d in done {
            println!("{d}");
        }
    }
    Ok(0)
}

fn list_libvirt(all: bool, common: &ImagesCommon) -> Result<u8> {
    use crate::targets::libvirt::images as lvi;
    let uri = &common.connect;
    let domains = lvi::list(uri, all)?;
    if common.output == OutputFormat::Json {
        print_json(&json!({ "uri": uri, "domains": domains }))?;
        return Ok(0);
    }
    if domains.is_empty() {
        println!("no {}domain at {uri}", if all { "" } else { "imgshift " });
        return Ok(0);
    }
    for d in &domains {
        let vols: Vec<String> = d
            .volumes
            .iter()
            .map(|v| format!("{}/{}", v.pool, v.volume))
            .chain(d.other_disks.iter().cloned())
            .collect();
        println!(
            "{}  {}  {}  disks {}{}",
            d.domain,
            if d.active { "running" } else { "shut off" },
            d.firmware,
            if vols.is_empty() {
                "none".to_string()
            } else {
                vols.join(",")
            },
            if all && d.made_by_imgshift {
                "  (imgshift)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

fn delete_libvirt(domain: &str, dry_run: bool, common: &ImagesCommon) -> Result<u8> {
    use crate::targets::libvirt::images as lvi;
    let uri = &common.connect;
    let plan = lvi::delete_plan(uri, domain)?;
    let json_out = common.output == OutputFormat::Json;
    if dry_run {
        if json_out {
            print_json(&json!({ "dry_run": true, "plan": plan }))?;
        } else {
            println!("would undefine domain '{}'", plan.domain);
            for v in &plan.delete_volumes {
                println!("would delete volume '{}' from pool '{}'", v.volume, v.pool);
            }
            for k in &plan.kept_volumes {
                println!(
                    "would keep volume '{}' of pool '{}': still used by {}",
                    k.volume,
                    k.pool,
                    k.used_by.join(", ")
                );
            }
            for o in &plan.other_disks {
                println!("would leave disk {o} alone: not a storage volume");
            }
        }
        return Ok(0);
    }
    let done = lvi::delete(uri, &plan)?;
    if json_out {
        print_json(&json!({
            "dry_run": false,
            "undefined_domain": plan.domain,
            "deleted_volumes": plan.delete_volumes,
            "kept_volumes": plan.kept_volumes,
            "other_disks": plan.other_disks,
        }))?;
    } else {
        for d in done {
            println!("{d}");
        }
    }
    Ok(0)
}
