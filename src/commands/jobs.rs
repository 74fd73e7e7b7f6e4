//! `imgshift jobs`, `imgshift jobs cancel JOB` and `imgshift resume JOB`: the unfinished jobs in the journal
//! folder (migrations and uploads alike).

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;

use crate::cli::{Cli, Command, OutputFormat, UploadTarget};
use crate::journal::{JobState, Journal, SavedCommand, is_running, peek, state_dir};
use crate::target_kind::TargetKind;

/// Units done and in total over the job's disks.
fn progress(s: &JobState) -> (u64, u64) {
    s.disks.iter().fold((0, 0), |(d, t), p| {
        let done = if p.stage == "uploaded" {
            p.block_count
        } else {
            count_bits(&p.done).min(p.block_count)
        };
        (d + done, t + p.block_count)
    })
}

fn count_bits(b64: &str) -> u64 {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map(|b| b.iter().map(|x| u64::from(x.count_ones())).sum())
        .unwrap_or(0)
}

/// `imgshift jobs`: one line per unfinished job.
pub fn list(dir: Option<&Path>, output: OutputFormat) -> Result<u8> {
    let explicit = dir.is_some();
    let dir = state_dir(dir)?;
    // A folder named with --state-dir that does not exist is a mistake, not "no jobs" (the default folder is
    // made by the first job).
    if explicit && !dir.is_dir() {
        anyhow::bail!("--state-dir {}: no such folder", dir.display());
    }
    let mut jobs: Vec<JobState> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| {
                let j = peek(&p);
                if j.is_none()
                    && let Ok(text) = std::fs::read_to_string(&p)
                    && let Err(e) = crate::journal::check_version(&text, &p)
                {
                    // Written by another imgshift: listed as a warning, never misread.
                    eprintln!("imgshift: {e:#}");
                }
                j
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    jobs.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    match output {
        OutputFormat::Json => {
            let v: Vec<_> = jobs
                .iter()
                .map(|j| {
                    let (done, total) = progress(j);
                    json!({
                        "id": j.id,
                        "kind": j.kind,
                        "stage": j.stage,
                        "source": j.source,
                        "running": is_running(&dir, &j.id),
                        "units_done": done,
                        "units_total": total,
                        "stages_done": j.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                        "resources": j.resources,
                        "created": j.created,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            if jobs.is_empty() {
                println!("no unfinished jobs in {}", dir.display());
                return Ok(0);
            }
            println!(
                "{:<34} {:<16} {:<10} {:>9}  {:<8}  SOURCE",
                "JOB", "KIND", "STAGE", "PROGRESS", "STATE"
            );
            for j in &jobs {
                let (done, total) = progress(j);
                let pct = done.saturating_mul(100).checked_div(total).unwrap_or(0);
                println!(
                    "{:<34} {:<16} {:<10} {:>8}%  {:<8}  {}",
                    j.id,
                    j.kind,
                    j.stage,
                    pct,
                    if is_running(&dir, &j.id) {
                        "running"
                    } else {
                        "stopped"
                    },
                    j.source
                );
            }
        }
    }
    Ok(0)
}

/// Re-parses a job's saved command line in its folder, with the environment that chose its endpoint, region
/// or connection turned into the equivalent flags (explicit flags on the saved line win).
fn saved_cli(state: &JobState) -> Result<Cli> {
    let Some(cmd) = &state.command else {
        bail!(
            "job {} has no saved command line (made by an older imgshift): rerun its command",
            state.id
        );
    };
    if !cmd.cwd.is_empty() {
        std::env::set_current_dir(&cmd.cwd)
            .with_context(|| format!("cannot enter the job's folder {}", cmd.cwd))?;
    }
    let mut argv: Vec<String> = std::iter::once("imgshift".to_string())
        .chain(cmd.args.iter().cloned())
        .collect();
    argv.extend(env_flags(&state.kind, cmd));
    Cli::try_parse_from(argv).map_err(|e| {
        anyhow::anyhow!(
            "job {}: its saved command line no longer parses: {}",
            state.id,
            e.to_string().lines().next().unwrap_or_default()
        )
    })
}

/// The saved environment as flags of the job's command, for variables its flags did not already override.
fn env_flags(kind: &str, cmd: &SavedCommand) -> Vec<String> {
    let target = kind
        .strip_prefix("migrate-")
        .or_else(|| kind.strip_suffix("-upload"))
        .and_then(TargetKind::from_name);
    let aws = target == Some(TargetKind::Aws);
    let azure = target == Some(TargetKind::Azure);
    let libvirt = target == Some(TargetKind::Libvirt);
    let table: [(&str, &str, bool); 7] = [
        ("AWS_REGION", "--region", aws),
        ("AWS_DEFAULT_REGION", "--region", aws),
        ("AWS_PROFILE", "--profile", aws),
        ("AWS_ENDPOINT_URL", "--endpoint-url", aws),
        ("AZURE_SUBSCRIPTION_ID", "--subscription", azure),
        ("IMGSHIFT_CA_BUNDLE", "--ca-bundle", azure),
        ("LIBVIRT_DEFAULT_URI", "--connect", libvirt),
    ];
    let mut out: Vec<String> = Vec::new();
    for (var, flag, applies) in table {
        let given = cmd
            .args
            .iter()
            .chain(out.iter())
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if let (true, false, Some(v)) = (applies, given, cmd.env.get(var)) {
            out.push(format!("{flag}={v}"));
        }
    }
    out
}

/// `imgshift resume JOB`: runs the job's command again; its journal makes it continue where it stopped.
pub fn resume(job: &str, dir: Option<&Path>, quiet: bool) -> Result<u8> {
    let dir = state_dir(dir)?;
    let state = find(&dir, job)?;
    if is_running(&dir, job) {
        bail!("job {job} is running in another imgshift process");
    }
    let cli = saved_cli(&state)?;
    let quiet = quiet || cli.quiet;
    match cli.command {
        Command::Migrate(mut args) => {
            if args.state_dir.is_none() {
                args.state_dir = Some(dir.clone());
            }
            args.yes = true;
            let id = super::migrate::job_id(&args)?;
            if id != job {
                bail!(
                    "job {job}: its source or target changed since it started (the same command now makes job {id}); \
                     `imgshift jobs cancel {job}` removes what it created"
                );
            }
            super::migrate::run(&args, quiet)
        }
        Command::Upload {
            target: UploadTarget::Aws(mut args),
        } => {
            if args.state_dir.is_none() {
                args.state_dir = Some(dir.clone());
            }
            super::upload::aws(&args, quiet)
        }
        Command::Upload {
            target: UploadTarget::Azure(mut args),
        } => {
            if args.state_dir.is_none() {
                args.state_dir = Some(dir.clone());
            }
            super::upload::azure(&args, quiet)
        }
        Command::Upload {
            target: UploadTarget::Libvirt(mut args),
        } => {
            if args.state_dir.is_none() {
                args.state_dir = Some(dir.clone());
            }
            super::upload::libvirt(&args, quiet)
        }
        _ => bail!("job {job}: its saved command is not a migration or an upload"),
    }
}

fn find(dir: &Path, job: &str) -> Result<JobState> {
    if job.is_empty() || !job.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("'{job}' is not a job id (`imgshift jobs` lists them)");
    }
    peek(&dir.join(format!("{job}.json"))).with_context(|| {
        format!(
            "no job {job} in {} (`imgshift jobs` lists them)",
            dir.display()
        )
    })
}

/// `imgshift jobs cancel JOB`: deletes what the job recorded as created, then forgets the job.
pub fn cancel(job: &str, dir: Option<&Path>, output: OutputFormat) -> Result<u8> {
    let dir = state_dir(dir)?;
    let journal = Journal::open_existing(&dir, job)?;
    let state = journal.state.clone();
    let mut target = super::targets::for_saved_command(saved_cli(&state)?.command)
        .with_context(|| format!("job {job} ({})", state.kind))?;
    let mut removed = target.cancel(&state.resources)?;
    // Read grants a killed run left open on its source (issue 22): ended through the source's connection.
    let grants: Vec<&str> = state
        .resources
        .iter()
        .filter(|r| r.kind == crate::targets::azure::source::READ_GRANT_KIND)
        .map(|r| r.id.as_str())
        .collect();
    if !grants.is_empty() {
        let Command::Migrate(args) = saved_cli(&state)?.command else {
            bail!("job {job} records a source read grant but is not a migrate job");
        };
        let conn = super::migrate::source_conn(&args);
        for g in grants {
            removed.push(crate::targets::azure::source::end_read_grant(
                &conn.azure,
                g,
            )?);
        }
    }
    let overlay = dir.join(format!("{job}.overlay.qcow2"));
    if overlay.exists() {
        std::fs::remove_file(&overlay)
            .with_context(|| format!("cannot remove {}", overlay.display()))?;
    }
    journal.remove()?;
    match output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"job": job, "removed": removed}))?
        ),
        OutputFormat::Human => {
            for r in &removed {
                println!("{r}");
            }
            println!("job {job} cancelled");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(args: &[&str], env: &[(&str, &str)]) -> SavedCommand {
        SavedCommand {
            args: args.iter().map(|a| a.to_string()).collect(),
            cwd: String::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn saved_environment_becomes_flags_of_the_jobs_target_only() {
        let env = [
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://x"),
            ("LIBVIRT_DEFAULT_URI", "qemu:///session"),
        ];
        let c = saved(&["migrate", "a.qcow2", "--to", "aws"], &env);
        assert_eq!(
            env_flags("migrate-aws", &c),
            ["--region=eu-west-1", "--endpoint-url=http://x"]
        );
        assert_eq!(
            env_flags("migrate-libvirt", &c),
            ["--connect=qemu:///session"]
        );
        // A flag given on the saved line wins over the saved environment.
        let c = saved(&["upload", "aws", "a", "--region", "us-east-2"], &env);
        assert_eq!(env_flags("aws-upload", &c), ["--endpoint-url=http://x"]);
    }
}
