//! The generalisation overlay: an empty qcow2 whose backing file is the untouched source, with the source's
//! format recorded (never probed), written by imgshift's own qcow2 writer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use imgshift_converters::formats::{self, Format};
use imgshift_converters::{DiskSource, Durability, FileStorage, OutputSet, Plan, WriterOptions};

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

/// Refuses a source whose backing chain qemu would read differently from imgshift. qemu's vpc driver does not
/// follow a differencing VHD's parent (it reads the child alone: unallocated blocks as zeros, allocated blocks
/// whole, sector bitmaps ignored), and its vhdx driver refuses differencing VHDX; virt-sysprep would then edit a
/// disk other than the one imgshift inspected, and its copy-on-write clusters would carry that view's bytes
/// into the overlay. qcow2 backing files and VMDK parents qemu follows as imgshift does.
pub fn refuse_chain_qemu_reads_differently(src: &dyn DiskSource) -> Result<()> {
    let mut layer = Some(src);
    while let Some(l) = layer {
        if matches!(l.format(), Format::Vpc | Format::Vhdx) && l.backing().is_some() {
            bail!(
                "a differencing {} cannot back an overlay (qemu, which virt-sysprep runs, does not read it through its parent): convert the disk to a standalone image first",
                if l.format() == Format::Vpc {
                    "VHD"
                } else {
                    "VHDX"
                }
            );
        }
        layer = l.backing();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use imgshift_converters::{ExtentMap, ImageInfo};

    /// One layer of a chain: only its format and backing matter to the rule.
    struct Layer {
        format: Format,
        backing: Option<Box<Layer>>,
    }

    impl DiskSource for Layer {
        fn format(&self) -> Format {
            self.format
        }
        fn virtual_size(&self) -> u64 {
            1 << 20
        }
        fn extents(&self, _offset: u64, _len: u64) -> imgshift_converters::Result<ExtentMap> {
            Ok(ExtentMap::new())
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> imgshift_converters::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn backing(&self) -> Option<&dyn DiskSource> {
            self.backing.as_deref().map(|b| b as &dyn DiskSource)
        }
        fn info(&self) -> ImageInfo {
            ImageInfo::default()
        }
    }

    fn chain(formats: &[Format]) -> Layer {
        let mut layer: Option<Box<Layer>> = None;
        for f in formats.iter().rev() {
            layer = Some(Box::new(Layer {
                format: *f,
                backing: layer,
            }));
        }
        *layer.unwrap()
    }

    #[test]
    fn differencing_vhd_and_vhdx_anywhere_in_the_chain_are_refused() {
        use Format::*;
        for ok in [
            &[Vpc][..],
            &[Vhdx],
            &[Qcow2, Vpc],
            &[Qcow2, Qcow2, Raw],
            &[Vmdk, Vmdk],
        ] {
            refuse_chain_qemu_reads_differently(&chain(ok)).unwrap();
        }
        for (bad, what) in [
            (&[Vpc, Vpc][..], "differencing VHD "),
            (&[Vhdx, Vhdx], "differencing VHDX "),
            (&[Qcow2, Vpc, Raw], "differencing VHD "),
        ] {
            let e = refuse_chain_qemu_reads_differently(&chain(bad)).unwrap_err();
            assert!(e.to_string().contains(what), "{bad:?}: {e}");
        }
    }
}
