//! The generalisation overlay: an empty qcow2 whose backing file is the untouched source, with the source's
//! format recorded (never probed), written by imgshift's own qcow2 writer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use imgshift_converters::formats::{self, Format};
use imgshift_converters::{Durability, FileStorage, OutputSet, Plan, WriterOptions};

/// An overlay being prepared: its temporary file exists until `commit` renames it or the value is dropped.
pub struct PendingOverlay {
    set: OutputSet,
    /// The temporary file libguestfs writes into.
    pub temp_path: PathBuf,
    /// The name recorded as the backing file (relative when the overlay sits beside the source).
    pub backing_name: String,
    /// Where the overlay ends up.
    pub final_path: PathBuf,
}

impl PendingOverlay {
    /// Renames the overlay into place.
    pub fn commit(self) -> Result<()> {
        self.set
            .commit()
            .with_context(|| format!("cannot create {}", self.final_path.display()))
    }
}

/// Refuses an OVA as the overlay's backing file. qemu opens the backing file itself, as the format the overlay
/// records; for a disk inside an OVA that is the member's format (VMDK), not the file's, so qemu would read the
/// tar archive as a VMDK descriptor and follow whatever extent names its bytes spell, past imgshift's open gate.
/// The file itself is probed, whatever format the caller opened it as.
pub fn refuse_ova(source: &Path, source_format: Format) -> Result<()> {
    let storage =
        FileStorage::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let probed = formats::probe::probe(&storage)
        .with_context(|| format!("cannot read {}", source.display()))?;
    if source_format == Format::Ova || probed == Format::Ova {
        bail!("an OVA cannot back an overlay: convert its disk out of the OVA first");
    }
    Ok(())
}

/// How the overlay names its backing file: the bare file name when both sit in the same folder (the overlay
/// then opens under imgshift's default trust rule), else the source's absolute path.
pub fn backing_name(source: &Path, overlay: &Path) -> Result<String> {
    let src = source
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", source.display()))?;
    let out_dir = match overlay.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out_dir = out_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve the folder of {}", overlay.display()))?;
    let name = match (src.parent(), src.file_name()) {
        (Some(dir), Some(file)) if dir == out_dir => file.to_string_lossy().into_owned(),
        _ => src.to_string_lossy().into_owned(),
    };
    if name.contains(':') {
        // qemu would read "proto:..." as a protocol name (CVE-2024-4467's class of confusion).
        bail!(
            "the source's path {name} contains ':', which qemu would take for a protocol; rename it"
        );
    }
    Ok(name)
}

/// Writes an empty qcow2 overlay of `virtual_size` over `source` (in `source_format`) at a temporary name
/// beside `out`.
pub fn create(
    source: &Path,
    source_format: Format,
    virtual_size: u64,
    out: &Path,
) -> Result<PendingOverlay> {
    refuse_ova(source, source_format)?;
    let backing = backing_name(source, out)?;
    let mut opts = WriterOptions::default();
    opts.set("backing_file", backing.clone());
    opts.set("backing_fmt", source_format.name());
    let mut writer = formats::create_writer(Format::Qcow2, &mut opts)
        .context("cannot prepare the qcow2 overlay")?;
    let size = writer.output_virtual_size(virtual_size)?;
    if size != virtual_size {
        bail!(
            "internal error: the overlay would change the virtual size from {virtual_size} to {size}"
        );
    }
    let (set, mut sink) = OutputSet::with_durability(out, Durability::Writeback)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let temp_path = sink.path().to_path_buf();
    writer.begin(
        &mut sink,
        &Plan {
            virtual_size,
            runs: &[],
        },
    )?;
    writer
        .finish(&mut sink)
        .with_context(|| format!("cannot write the overlay {}", temp_path.display()))?;
    drop(sink);
    Ok(PendingOverlay {
        set,
        temp_path,
        backing_name: backing,
        final_path: out.to_path_buf(),
    })
}
