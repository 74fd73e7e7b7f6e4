//! The job's source disks: every disk of an OVA (boot disk first, read in place from the archive), or the one
//! image.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use imgshift_converters::DiskSource;

use crate::cli::TrustArgs;
use crate::open::{gate, naming, open_image, open_ova};

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
pub fn open(path: &Path, format: Option<&str>, trust: &TrustArgs) -> Result<SourceDisks> {
    if let Some(pkg) = open_ova(path, format)? {
        let g = gate(&trust.allow_dirs)?;
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
    let src = open_image(path, format, &trust.allow_dirs)?;
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
