//! After the AMI exists, as stages of an AWS job (`migrate --to aws`, `upload aws`): copies to other regions
//! (`copy`), launch permissions for other accounts on the AMI and its copies (`share`), and a launch template
//! pointing at the AMI (`launch-template`). Each stage records what it is about to make in the journal before
//! the call that makes it, so a rerun adopts what a killed run made (copies by their tag and CopyImage's token,
//! template versions by the AMI they launch) and `jobs cancel` undoes it: unshare, delete the template or the
//! version, deregister the copies and delete their snapshots.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::config::AwsTarget as Conn;
use super::images::{AwsImages, CopyHooks, CopySettings, Grantees};
use super::launch_template::{self, TemplateSpec};
use crate::job::Job;
use crate::journal::Resource;

/// Stage name: copies to other regions.
pub const STAGE_COPY: &str = "copy";
/// Stage name: launch permissions for other accounts.
pub const STAGE_SHARE: &str = "share";
/// Stage name: the launch template.
pub const STAGE_LAUNCH_TEMPLATE: &str = "launch-template";

/// Journal kind: CopyImage is about to be called for the region (the id).
const RES_COPY_PENDING: &str = "image-copy-pending";
/// Journal kind: a copy, `REGION/AMI`.
const RES_COPY: &str = "image-copy";
/// Journal kind: a launch permission, `REGION/AMI/ACCOUNT`.
const RES_SHARE: &str = "image-share";
/// Journal kind: a template call is about to be made, `JOB/NAME`.
const RES_TEMPLATE_PENDING: &str = "launch-template-pending";
/// Journal kind: a template the job created, `NAME`.
const RES_TEMPLATE: &str = "launch-template";
/// Journal kind: a version the job added, `NAME/VERSION`.
const RES_TEMPLATE_VERSION: &str = "launch-template-version";

/// What to do once the AMI exists.
#[derive(Debug, Clone, Default)]
pub struct AfterSettings {
    /// Regions to copy the AMI to.
    pub copy_to_regions: Vec<String>,
    /// Accounts to share the AMI (and its copies) with.
    pub share_with: Vec<String>,
    /// Launch template to point at the AMI.
    pub launch_template: Option<String>,
    /// Its instance type (default: [`launch_template::instance_type_for`]).
    pub instance_type: Option<String>,
}

impl AfterSettings {
    /// The stages these settings add, in the order they run.
    pub fn stages(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.copy_to_regions.is_empty() {
            out.push(STAGE_COPY);
        }
        if !self.share_with.is_empty() {
            out.push(STAGE_SHARE);
        }
        if self.launch_template.is_some() {
            out.push(STAGE_LAUNCH_TEMPLATE);
        }
        out
    }

    /// What the stages would make, one line each.
    pub fn plan_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.copy_to_regions.is_empty() {
            out.push(format!(
                "a copy of the AMI in {} (with its snapshots)",
                self.copy_to_regions.join(", ")
            ));
        }
        if !self.share_with.is_empty() {
            out.push(format!(
                "launch permission on the AMI{} and create-volume permission on the snapshots for account(s) {}",
                if self.copy_to_regions.is_empty() { "" } else { " and its copies" },
                self.share_with.join(", ")
            ));
        }
        if let Some(t) = &self.launch_template {
            out.push(format!(
                "launch template '{t}' pointing at the AMI (created, or a new version){}",
                self.instance_type
                    .as_ref()
                    .map(|i| format!(", instance type {i}"))
                    .unwrap_or_default()
            ));
        }
        out
    }

    /// Refuses what the API would refuse later (names, ids), before anything is made.
    pub fn check(&self) -> Result<()> {
        if let Some(t) = &self.launch_template
            && let Err(m) = launch_template::check_name(t)
        {
            bail!("{m}");
        }
        Ok(())
    }
}

/// The AMI, as the stages need it.
pub struct AmiFacts<'a> {
    /// The AMI id.
    pub image_id: &'a str,
    /// Its architecture.
    pub architecture: &'a str,
    /// The boot mode it was registered with (None: EC2's default).
    pub boot_mode: Option<&'a str>,
    /// ENA on.
    pub ena: bool,
    /// IMDSv2 required.
    pub imds_v2_required: bool,
}

fn in_region(conn: &Conn, region: &str, max_attempts: u32) -> Result<AwsImages> {
    let mut c = conn.clone();
    c.region = Some(region.to_string());
    AwsImages::connect(&c, max_attempts)
}

fn resources(job: &Job) -> Result<Vec<Resource>> {
    Ok(job
        .journal
        .lock()
        .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?
        .state
        .resources
        .clone())
}

/// The copies the journal holds: (region, AMI).
fn copies_in(res: &[Resource]) -> Vec<(String, String)> {
    res.iter()
        .filter(|r| r.kind == RES_COPY)
        .filter_map(|r| {
            r.id.split_once('/')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

/// Records a job's copies as they happen.
struct JobHooks<'a> {
    job: &'a Job,
}

impl CopyHooks for JobHooks<'_> {
    fn say(&mut self, msg: &str) {
        self.job.say(msg);
    }
    fn before_copy(&mut self, region: &str) -> Result<()> {
        self.job.record(RES_COPY_PENDING, region)
    }
    fn copied(&mut self, region: &str, image: &str) -> Result<()> {
        // Crash tests stop here: CopyImage answered, its AMI not yet in the journal (the rerun finds the copy by
        // its tag, else CopyImage's token returns it again).
        crate::journal::pause_point("copy-image-returned");
        self.job.record(RES_COPY, &format!("{region}/{image}"))
    }
}

/// Runs stage `stage` for the AMI in `home` (the job's region); returns its one-line summary.
pub fn run_stage(
    conn: &Conn,
    max_attempts: u32,
    s: &AfterSettings,
    job: &Job,
    stage: &str,
    ami: &AmiFacts<'_>,
) -> Result<String> {
    let home = AwsImages::connect(conn, max_attempts)?;
    match stage {
        STAGE_COPY => {
            let copies = home.copy_with(
                ami.image_id,
                &CopySettings {
                    regions: s.copy_to_regions.clone(),
                    encrypted: false,
                    kms_key_id: None,
                },
                &mut JobHooks { job },
            )?;
            Ok(format!(
                "{} cop{}: {}",
                copies.len(),
                if copies.len() == 1 { "y" } else { "ies" },
                copies
                    .iter()
                    .map(|c| format!("{} in {}", c.image_id, c.region))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
        STAGE_SHARE => {
            let mut targets = vec![(home.region().to_string(), ami.image_id.to_string())];
            targets.extend(copies_in(&resources(job)?));
            let who = Grantees::Accounts(s.share_with.clone());
            let mut snapshots = 0usize;
            for (region, image) in &targets {
                for a in &s.share_with {
                    job.record(RES_SHARE, &format!("{region}/{image}/{a}"))?;
                }
                let c = if region == home.region() {
                    None
                } else {
                    Some(in_region(conn, region, max_attempts)?)
                };
                let out = c
                    .as_ref()
                    .unwrap_or(&home)
                    .share(image, &who, true)
                    .with_context(|| format!("cannot share {image} in {region}"))?;
                for n in &out.notes {
                    job.say(n);
                }
                snapshots = snapshots.saturating_add(out.snapshot_ids.len());
            }
            Ok(format!(
                "{} AMI{} shared with {} ({snapshots} snapshot{} may be used to create volumes)",
                targets.len(),
                if targets.len() == 1 { "" } else { "s" },
                s.share_with.join(", "),
                if snapshots == 1 { "" } else { "s" }
            ))
        }
        STAGE_LAUNCH_TEMPLATE => {
            let Some(name) = &s.launch_template else {
                bail!("no --launch-template given");
            };
            let instance_type = match &s.instance_type {
                Some(t) => t.clone(),
                None => {
                    launch_template::instance_type_for(ami.architecture, ami.boot_mode, ami.ena)
                        .map_err(|m| anyhow::anyhow!("launch template '{name}': {m}"))?
                        .to_string()
                }
            };
            let spec = TemplateSpec {
                name: name.clone(),
                image_id: ami.image_id.to_string(),
                instance_type: instance_type.clone(),
                imds_v2_required: ami.imds_v2_required,
                job: job.id.clone(),
            };
            let out = home.ensure_launch_template(&spec, || {
                job.record(RES_TEMPLATE_PENDING, &format!("{}/{name}", job.id))
            })?;
            if out.created_template {
                job.record(RES_TEMPLATE, name)?;
            } else {
                job.record(RES_TEMPLATE_VERSION, &format!("{name}/{}", out.version))?;
            }
            Ok(format!(
                "launch template '{name}' ({}) version {} launches {} on {instance_type}{}",
                out.id,
                out.version,
                ami.image_id,
                if out.created_template {
                    ""
                } else {
                    " (a new version; the default version is unchanged)"
                }
            ))
        }
        other => bail!("no AWS stage named {other}"),
    }
}

/// What the stages made, for the job's report.
pub fn outputs(job: &Job) -> Result<Value> {
    let res = resources(job)?;
    let copies: Vec<Value> = copies_in(&res)
        .into_iter()
        .map(|(r, i)| json!({"region": r, "image_id": i}))
        .collect();
    let mut shared: Vec<String> = res
        .iter()
        .filter(|r| r.kind == RES_SHARE)
        .filter_map(|r| r.id.rsplit('/').next().map(str::to_string))
        .collect();
    shared.sort();
    shared.dedup();
    let template = res
        .iter()
        .find(|r| r.kind == RES_TEMPLATE_VERSION)
        .and_then(|r| r.id.rsplit_once('/'))
        .map(|(n, v)| json!({"name": n, "version": v.parse::<i64>().ok(), "created": false}))
        .or_else(|| {
            res.iter()
                .find(|r| r.kind == RES_TEMPLATE)
                .map(|r| json!({"name": r.id, "version": 1, "created": true}))
        });
    Ok(json!({"copies": copies, "shared_with": shared, "launch_template": template}))
}

/// Whether any resource is one of the stages'.
pub fn has_any(res: &[Resource]) -> bool {
    res.iter().any(|r| {
        [
            RES_COPY_PENDING,
            RES_COPY,
            RES_SHARE,
            RES_TEMPLATE_PENDING,
            RES_TEMPLATE,
            RES_TEMPLATE_VERSION,
        ]
        .contains(&r.kind.as_str())
    })
}

/// Undoes the stages for `jobs cancel`, before the AMI itself goes: removes the launch permissions, the template
/// or version, then deregisters each copy (found by its journal entry, or by its tag when the run stopped before
/// the copy's id was recorded) and deletes its snapshots. `images` are the job's AMIs in the home region.
pub fn cancel(
    conn: &Conn,
    max_attempts: u32,
    res: &[Resource],
    images: &[String],
) -> Result<Vec<String>> {
    if !has_any(res) {
        return Ok(Vec::new());
    }
    let home = AwsImages::connect(conn, max_attempts)?;
    let mut done = Vec::new();
    let conn_for = |region: &str| -> Result<Option<AwsImages>> {
        if region == home.region() {
            Ok(None)
        } else {
            in_region(conn, region, max_attempts).map(Some)
        }
    };

    // Launch permissions, per AMI.
    let mut shares: Vec<(String, String, Vec<String>)> = Vec::new();
    for r in res.iter().filter(|r| r.kind == RES_SHARE) {
        let mut parts = r.id.splitn(3, '/');
        let (Some(region), Some(image), Some(account)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        match shares
            .iter_mut()
            .find(|(rg, im, _)| rg == region && im == image)
        {
            Some((_, _, a)) => a.push(account.to_string()),
            None => shares.push((region.into(), image.into(), vec![account.to_string()])),
        }
    }
    for (region, image, accounts) in shares {
        let c = conn_for(&region)?;
        let c = c.as_ref().unwrap_or(&home);
        if !c.exists(&image)? {
            continue;
        }
        c.share(&image, &Grantees::Accounts(accounts.clone()), false)
            .with_context(|| format!("cannot unshare {image} in {region}"))?;
        done.push(format!(
            "removed the launch permission of {} on {image} ({region})",
            accounts.join(", ")
        ));
    }

    // The template, or the version the job added.
    let mut templates: Vec<(String, bool)> = Vec::new();
    for r in res {
        let t = match r.kind.as_str() {
            RES_TEMPLATE => Some((r.id.clone(), true)),
            RES_TEMPLATE_VERSION => r.id.rsplit_once('/').map(|(n, _)| (n.to_string(), false)),
            RES_TEMPLATE_PENDING => r.id.split_once('/').map(|(_, n)| (n.to_string(), false)),
            _ => None,
        };
        if let Some((name, whole)) = t {
            match templates.iter_mut().find(|(n, _)| *n == name) {
                Some((_, w)) => *w |= whole,
                None => templates.push((name, whole)),
            }
        }
    }
    let job = res
        .iter()
        .find(|r| r.kind == RES_TEMPLATE_PENDING)
        .and_then(|r| r.id.split_once('/'))
        .map(|(j, _)| j.to_string())
        .unwrap_or_default();
    for (name, whole) in templates {
        let image = images.first().map(String::as_str);
        if let Some(line) = home.remove_launch_template(&name, whole, image, &job)? {
            done.push(line);
        }
    }

    // Copies: recorded ones, and any a stopped run asked for before recording it.
    let mut copies = copies_in(res);
    for r in res.iter().filter(|r| r.kind == RES_COPY_PENDING) {
        if copies.iter().any(|(rg, _)| *rg == r.id) {
            continue;
        }
        let c = conn_for(&r.id)?;
        let c = c.as_ref().unwrap_or(&home);
        for src in images {
            for found in c.copies_of(src)? {
                copies.push((r.id.clone(), found));
            }
        }
    }
    for (region, image) in copies {
        let c = conn_for(&region)?;
        let c = c.as_ref().unwrap_or(&home);
        if !c.exists(&image)? {
            done.push(format!("copy {image} in {region} was already gone"));
            continue;
        }
        let plan = c.delete_plan(&image)?;
        done.extend(
            c.delete(&plan)?
                .into_iter()
                .map(|l| format!("{l} ({region})")),
        );
    }
    Ok(done)
}
