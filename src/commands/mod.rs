//! One function per subcommand. Each validates its arguments into library calls and returns the exit code.

mod check;
mod compare;
mod convert;
mod download;
mod generalize;
mod images;
mod info;
mod inspect;
mod jobs;
mod map;
mod measure;
mod migrate;
mod targets;
mod upload;
mod upload_libvirt;

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
        } => info::run(&image, format.as_deref(), backing_chain, output, &trust),
        Command::Map {
            image,
            format,
            output,
            trust,
        } => map::run(&image, format.as_deref(), output, &trust),
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
        } => compare::run(
            &a,
            &b,
            format_a.as_deref(),
            format_b.as_deref(),
            strict,
            progress && !quiet,
            &trust,
        ),
        Command::Inspect {
            image,
            format,
            target,
            boot_mode,
            output,
            stats,
            trust,
        } => inspect::run(
            &image,
            format.as_deref(),
            target.as_deref(),
            boot_mode.as_deref(),
            output,
            stats,
            &trust,
        ),
        Command::Measure(args) => measure::run(&args),
        Command::Convert(args) => convert::run(&args, quiet),
        Command::Generalize(args) => generalize::run(&args),
        Command::Upload {
            target: UploadTarget::Aws(args),
        } => upload::aws(&args, quiet),
        Command::Upload {
            target: UploadTarget::Azure(args),
        } => upload::azure(&args, quiet),
        Command::Upload {
            target: UploadTarget::Libvirt(args),
        } => upload_libvirt::run(&args, quiet),
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
        Command::Resume { job, state_dir } => jobs::resume(&job, state_dir.as_deref(), quiet),
        Command::Jobs {
            action,
            state_dir,
            output,
        } => match action {
            None => jobs::list(state_dir.as_deref(), output),
            Some(JobsAction::Cancel { job }) => jobs::cancel(&job, state_dir.as_deref(), output),
        },
    }
}

pub use crate::open::{naming, open_ova};

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
    crate::open::open_image(path, format, &trust.allow_dirs)
}

/// Formats a byte count like qemu-img ("16 GiB").
pub use crate::progress::human_size;
