//! One function per subcommand. Each validates its arguments into library calls and returns the exit code.

mod check;
mod compare;
mod completions;
mod convert;
mod download;
mod failover;
mod generalize;
mod images;
mod info;
mod inspect;
mod jobs;
mod map;
mod measure;
mod migrate;
mod replicate;
mod targets;
mod upload;

pub(crate) use crate::targets::parse_tags;

use anyhow::Result;
use imgshift_converters::OpenGate;

use crate::cli::{Cli, Command, DownloadTarget, JobsAction, TrustArgs, UploadTarget};

/// Prints an error as imgshift's one line on standard error: `imgshift: what: why`.
pub fn report(e: &anyhow::Error) {
    let parts: Vec<String> = e
        .chain()
        .map(|c| c.to_string().replace('\n', " "))
        .collect();
    match crate::open::trust_hint(e) {
        Some(hint) => eprintln!("imgshift: {} ({hint})", parts.join(": ")),
        None => eprintln!("imgshift: {}", parts.join(": ")),
    }
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Info {
            image,
            format,
            backing_chain,
            output,
            trust,
            cloud,
        } => {
            set_source_conn(&cloud);
            info::run(&image, format.as_deref(), backing_chain, output, &trust)
        }
        Command::Map {
            image,
            format,
            output,
            trust,
            cloud,
        } => {
            set_source_conn(&cloud);
            map::run(&image, format.as_deref(), output, &trust)
        }
        Command::Check {
            image,
            format,
            repair,
            in_place,
            into,
            output,
            trust,
        } => match repair {
            Some(_) => check::repair(&image, format.as_deref(), in_place, into.as_deref(), output),
            None => check::run(&image, format.as_deref(), output, &trust),
        },
        Command::Compare {
            a,
            b,
            format_a,
            format_b,
            strict,
            progress,
            trust,
            cloud,
        } => {
            set_source_conn(&cloud);
            compare::run(
                &a,
                &b,
                format_a.as_deref(),
                format_b.as_deref(),
                strict,
                progress && !quiet,
                &trust,
            )
        }
        Command::Inspect {
            image,
            format,
            target,
            boot_mode,
            output,
            stats,
            trust,
            cloud,
        } => {
            set_source_conn(&cloud);
            inspect::run(
                &image,
                format.as_deref(),
                target.map(crate::target_kind::TargetKind::name),
                boot_mode.as_deref(),
                output,
                stats,
                &trust,
            )
        }
        Command::Measure(args) => measure::run(&args),
        Command::Convert(args) => {
            set_source_conn(&args.cloud);
            convert::run(&args, quiet)
        }
        Command::Generalize(args) => generalize::run(&args),
        Command::Upload {
            target: UploadTarget::Aws(args),
        } => upload::aws(&args, quiet),
        Command::Upload {
            target: UploadTarget::Azure(args),
        } => upload::azure(&args, quiet),
        Command::Upload {
            target: UploadTarget::Libvirt(args),
        } => upload::libvirt(&args, quiet),
        Command::Download {
            target: DownloadTarget::Aws(args),
        } => download::aws(&args, quiet),
        Command::Migrate(args) => {
            if let Some(msg) = migrate::foreign_options(args.to) {
                eprintln!("imgshift: {msg}");
                return Ok(2);
            }
            migrate::run(&args, quiet)
        }
        Command::Images { action } => images::run(&action),
        Command::Replicate(args) => replicate::run(&args, quiet),
        Command::Failover(args) => failover::run(&args),
        Command::Resume { job, state_dir } => jobs::resume(&job, state_dir.as_deref(), quiet),
        Command::Jobs {
            action,
            state_dir,
            output,
        } => match action {
            None => jobs::list(state_dir.as_deref(), output),
            Some(JobsAction::Cancel { job }) => jobs::cancel(&job, state_dir.as_deref(), output),
        },
        Command::Completions { shell } => completions::completions(shell),
        Command::Man => completions::man(),
    }
}

pub use crate::open::naming;

/// Where the cloud sources of a read-only command are read from (set once from its `CloudSourceArgs`).
static SOURCE_CONN: std::sync::OnceLock<crate::sources::SourceConn> = std::sync::OnceLock::new();

/// Keeps a read-only command's cloud source options for [`open_image`].
fn set_source_conn(c: &crate::cli::CloudSourceArgs) {
    let _ = SOURCE_CONN.set(crate::sources::SourceConn {
        aws: crate::targets::aws::config::AwsTarget {
            region: c.region.clone(),
            profile: c.profile.clone(),
            endpoint_url: c.endpoint_url.clone(),
        },
        max_attempts: 10,
        azure: crate::targets::azure::source::AzureReadConn {
            arm_endpoint: c.arm_endpoint.clone(),
            ca_bundle: c.ca_bundle.clone(),
            subscription: c.subscription.clone(),
            max_attempts: 10,
        },
        libvirt_uri: c.connect.clone(),
        allow_running: c.allow_running,
    });
}

/// The OVA package at `path` when it is one; `None` for a cloud source and every other format.
pub fn open_ova(
    path: &std::path::Path,
    format: Option<&str>,
) -> Result<Option<imgshift_converters::formats::ova::OvaPackage>> {
    if crate::sources::SourceRef::parse(path)?.is_cloud() {
        return Ok(None);
    }
    crate::open::open_ova(path, format)
}

/// The open gate the user's `--allow-dir` flags describe.
pub fn gate(trust: &TrustArgs) -> Result<OpenGate> {
    crate::open::gate(&trust.allow_dirs)
}

/// Opens an image the user named; errors name the file unless the library's message already does.
pub fn open_image(
    path: &std::path::Path,
    format: Option<&str>,
    trust: &TrustArgs,
) -> Result<Box<dyn imgshift_converters::DiskSource>> {
    let conn = SOURCE_CONN.get().cloned().unwrap_or_default();
    crate::sources::open_one(path, format, &trust.allow_dirs, &conn)
}

/// Formats a byte count like qemu-img ("16 GiB").
pub use crate::progress::human_size;
