//! Opening the images the user names, for every command and for the job runner alike: the format named or
//! probed, the open gate the trusted folders describe, an OVA package recognised as one, and errors named by the
//! image's path. Below both `commands` and `runner` (neither imports the other for this).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use imgshift_converters::formats::ova::OvaPackage;
use imgshift_converters::{DiskSource, FileStorage, Format, OpenGate, Storage};

/// Parses an optional `-f` value.
pub fn parse_format(name: Option<&str>) -> Result<Option<Format>> {
    Ok(match name {
        Some(n) => Some(Format::from_name(n)?),
        None => None,
    })
}

/// The open gate that also trusts the folders in `allow_dirs` (the user's `--allow-dir` flags).
pub fn gate(allow_dirs: &[PathBuf]) -> Result<OpenGate> {
    let mut g = OpenGate::new();
    for d in allow_dirs {
        g = g.allow_dir(d)?;
    }
    Ok(g)
}

/// Opens an image the user named; errors name the file unless the library's message already does.
pub fn open_image(
    path: &Path,
    format: Option<&str>,
    allow_dirs: &[PathBuf],
) -> Result<Box<dyn DiskSource>> {
    let fmt = parse_format(format)?;
    imgshift_converters::open_path(path, fmt, &gate(allow_dirs)?).map_err(|e| naming(e, path))
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

/// The hint the CLI adds to an error whose cause is a file the open gate refused for lying outside the folders
/// it trusts (the library says what is wrong; which flag fixes it is the CLI's to say).
pub fn trust_hint(e: &anyhow::Error) -> Option<&'static str> {
    e.chain()
        .any(|c| {
            c.downcast_ref::<imgshift_converters::Error>()
                .is_some_and(imgshift_converters::Error::is_untrusted)
        })
        .then_some("pass --allow-dir DIR to trust the folder that holds it")
}

/// The opened source disks.
pub struct SourceDisks {
    /// Name of each disk (the OVA member, or the file name).
    pub names: Vec<String>,
    /// The disks, boot disk first.
    pub disks: Vec<Arc<dyn DiskSource>>,
    /// Whether the source is an OVA.
    pub ova: bool,
}

/// Opens `path`: each disk of an OVA, or the image.
pub fn open_disks(
    path: &Path,
    format: Option<&str>,
    allow_dirs: &[PathBuf],
) -> Result<SourceDisks> {
    if let Some(pkg) = open_ova(path, format)? {
        let g = gate(allow_dirs)?;
        let mut names = Vec::new();
        let mut disks = Vec::new();
        for d in pkg.disks() {
            let src = pkg.open_disk(d.index, &g).map_err(|e| naming(e, path))?;
            names.push(d.file_name.clone());
            disks.push(Arc::from(src));
        }
        if disks.is_empty() {
            anyhow::bail!("{}: the OVA holds no disk", path.display());
        }
        return Ok(SourceDisks {
            names,
            disks,
            ova: true,
        });
    }
    let src = open_image(path, format, allow_dirs)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(SourceDisks {
        names: vec![name],
        disks: vec![Arc::from(src)],
        ova: false,
    })
}
