//! One function per subcommand. Each validates its arguments into library calls and returns the exit code.

mod check;
mod compare;
mod completions;
mod convert;
mod download;
mod generalize;
mod info;
mod inspect;
mod jobs;
mod map;
mod migrate;
mod upload;
mod upload_azure;
pub(crate) mod upload_libvirt;

pub(crate) use upload::{parse_tags, runtime};

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use imgshift_converters::formats::ova::OvaPackage;
use imgshift_converters::{FileStorage, Format, OpenGate, Storage};

use crate::cli::{Cli, Command, DownloadTarget, JobsAction, TrustArgs, UploadTarget};

/// Prints an error as imgshift's one line on standard error: `imgshift: what: why`.
pub fn report(e: &anyhow::Error) {
    let parts: Vec<String> = e
        .chain()
        .map(|c| c.to_string().replace('\n', " "))
        .collect();
    eprintln!("imgshift: {}", parts.join(": "));
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Info {
            image,
            format,
            output,
            trust,
        } => info::run(&image, format.as_deref(), output, &trust),
        Command::Map {
            image,
            format,
            output,
            trust,
        } => map::run(&image, format.as_deref(), output, &trust),
        Command::Check {
            image,
            format,
            output,
            trust,
        } => check::run(&image, format.as_deref(), output, &trust),
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
        Command::Convert(args) => convert::run(&args, quiet),
        Command::Generalize(args) => generalize::run(&args),
        Command::Upload {
            target: UploadTarget::Aws(args),
        } => upload::aws(&args, quiet),
        Command::Upload {
            target: UploadTarget::Azure(args),
        } => upload_azure::run(&args, quiet),
        Command::Upload {
            target: UploadTarget::Libvirt(args),
        } => upload_libvirt::run(&args, quiet),
        Command::Download {
            target: DownloadTarget::Aws(args),
        } => download::aws(&args, quiet),
        Command::Migrate(args) => migrate::run(&args, quiet),
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

/// Parses an optional `-f` value.
pub fn parse_format(name: Option<&str>) -> Result<Option<Format>> {
    Ok(match name {
        Some(n) => Some(Format::from_name(n)?),
        None => None,
    })
}

/// The open gate the user's `--allow-dir` flags describe.
pub fn gate(trust: &TrustArgs) -> Result<OpenGate> {
    let mut g = OpenGate::new();
    for d in &trust.allow_dirs {
        g = g.allow_dir(d)?;
    }
    Ok(g)
}

/// Opens an image the user named; errors name the file unless the library's message already does.
pub fn open_image(
    path: &std::path::Path,
    format: Option<&str>,
    trust: &TrustArgs,
) -> Result<Box<dyn imgshift_converters::DiskSource>> {
    let fmt = parse_format(format)?;
    imgshift_converters::open_path(path, fmt, &gate(trust)?).map_err(|e| naming(e, path))
}

/// A library error about the image at `path`, named by its path unless the message already names it.
pub fn naming(e: imgshift_converters::Error, path: &Path) -> anyhow::Error {
    if e.kind() == imgshift_converters::ErrorKind::Io {
        anyhow::Error::new(e)
    } else {
        anyhow::Error::new(e).context(path.display().to_string())
    }
}

/// The OVA package at `path` when it is one (`-f ova`, or probed as one); `None` for every other format.
pub fn open_ova(path: &Path, format: Option<&str>) -> Result<Option<OvaPackage>> {
    let fmt = parse_format(format)?;
    if fmt.is_some_and(|f| f != Format::Ova) {
        return Ok(None);
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path).map_err(|e| naming(e, path))?);
    if fmt.is_none()
        && imgshift_converters::formats::probe::probe(storage.as_ref())
            .map_err(|e| naming(e, path))?
            != Format::Ova
    {
        return Ok(None);
    }
    OvaPackage::open(storage)
        .map(Some)
        .map_err(|e| naming(e, path))
}

/// Formats a byte count like qemu-img ("16 GiB").
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

/// `--generalize` on an upload: the job's overlay (made now, or reused from the interrupted run of the same job)
/// opened over the source. Returns the source to upload and the overlay to remove once the job completes.
pub fn generalize_for_upload(
    path: &Path,
    src: Box<dyn imgshift_converters::DiskSource>,
    spec: Option<&str>,
    target: crate::generalize::operations::Target,
    state_dir: &Path,
    job: &str,
    quiet: bool,
) -> Result<(
    Box<dyn imgshift_converters::DiskSource>,
    Option<std::path::PathBuf>,
)> {
    use anyhow::Context as _;
    let Some(spec) = spec else {
        return Ok((src, None));
    };
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let overlay = state_dir.join(format!("{job}.overlay.qcow2"));
    let g = crate::generalize::prepare(path, src, Some(spec), Some(target), &overlay, true)?;
    if !quiet {
        match &g.outcome {
            Some(o) => eprintln!("imgshift: {}", crate::generalize::summary(o)),
            None => eprintln!(
                "imgshift: reusing the generalisation overlay {} of the interrupted run",
                overlay.display()
            ),
        }
    }
    Ok((g.source, Some(g.overlay)))
}

/// Removes a finished job's generalisation overlay.
pub fn remove_overlay(overlay: Option<&Path>) -> Result<()> {
    use anyhow::Context as _;
    if let Some(o) = overlay {
        std::fs::remove_file(o)
            .with_context(|| format!("cannot remove the overlay {}", o.display()))?;
    }
    Ok(())
}
