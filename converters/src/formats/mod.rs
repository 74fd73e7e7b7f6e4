//! One module per image format: a reader (`DiskSource`) and a planned writer (`FormatWriter`) each.
//! `open` probes (or takes the user's `-f`) and dispatches; `create_writer` maps `-O` and `-o` to a writer.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gate::OpenGate;
use crate::source::DiskSource;
use crate::storage::{FileStorage, Storage};
use crate::writer::{FormatWriter, OptionSpec, WriterOptions};

pub mod ova;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

/// The image formats imgshift knows, named as qemu-img names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[non_exhaustive]
pub enum Format {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (VHD), "vpc" in qemu.
    Vpc,
    /// Microsoft VHDX.
    Vhdx,
    /// VMware virtual disk.
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
    /// Open Virtualization Appliance (tar of an OVF descriptor and its disks); input only.
    Ova,
}

impl Format {
    /// qemu-img's name for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Ova => "ova",
        }
    }

    /// Parses a format name (`vhd` is accepted for `vpc`).
    pub fn from_name(name: &str) -> Result<Format> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "raw" | "img" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vpc" | "vhd" => Format::Vpc,
            "vhdx" => Format::Vhdx,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "ova" => Format::Ova,
            other => {
                return Err(Error::input(format!(
                    "unknown format '{other}' (known: raw, qcow2, vpc (vhd), vhdx, vmdk, vdi, ova)"
                )));
            }
        })
    }

    /// Every format, in the order the README lists them.
    pub const ALL: [Format; 7] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vpc,
        Format::Vhdx,
        Format::Vmdk,
        Format::Vdi,
        Format::Ova,
    ];
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Opens the image at `path` (a file the user named, so trusted as a path) with `format`, or probes it.
pub fn open_path(
    path: &Path,
    format: Option<Format>,
    gate: &OpenGate,
) -> Result<Box<dyn DiskSource>> {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path)?);
    let gate = gate.enter_top(path);
    open(storage, format, &gate)
}

/// Opens an image stored in `storage`. Files the image names are opened only through `gate`.
pub fn open(
    storage: Arc<dyn Storage>,
    format: Option<Format>,
    gate: &OpenGate,
) -> Result<Box<dyn DiskSource>> {
    let format = match format {
        Some(f) => f,
        None => probe::probe(storage.as_ref())?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawReader::open(storage)?)),
        Format::Vpc => Ok(Box::new(vhd::VhdReader::open(storage, gate)?)),
        Format::Vdi => Ok(Box::new(vdi::VdiReader::open(storage)?)),
        Format::Ova => ova::OvaPackage::open(storage)?.open_boot_disk(gate),
        Format::Vhdx => Ok(Box::new(vhdx::VhdxReader::open(storage, gate)?)),
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2Reader::open(storage, gate)?)),
        Format::Vmdk => Ok(Box::new(vmdk::VmdkReader::open(storage, gate)?)),
    }
}

/// The `-o` options the writer of `format` takes (empty for raw; `None` for an input-only format).
pub fn writer_options(format: Format) -> Option<&'static [OptionSpec]> {
    Some(match format {
        Format::Raw => raw::OPTIONS,
        Format::Qcow2 => qcow2::WRITER_OPTIONS,
        Format::Vpc => vhd::WRITER_OPTIONS,
        Format::Vhdx => vhdx::WRITER_OPTIONS,
        Format::Vmdk => vmdk::WRITER_OPTIONS,
        Format::Vdi => vdi::OPTIONS,
        Format::Ova => return None,
    })
}

/// Whether the writer of `format` takes `compress=on` (qemu-img's `-c`): qcow2 only. (VMDK output is
/// compressed by its subformat, `subformat=streamOptimized`.)
pub fn writer_compresses(format: Format) -> bool {
    format == Format::Qcow2
}

/// A writer for `format`, configured from `opts` (every option must be used). An unknown key is refused with
/// the list of the keys the format takes.
pub fn create_writer(format: Format, opts: &mut WriterOptions) -> Result<Box<dyn FormatWriter>> {
    if let Some(spec) = writer_options(format)
        && let Some(bad) = opts.keys().find(|k| {
            let known = spec.iter().any(|s| s.name == *k);
            let compress = *k == "compress" && writer_compresses(format);
            !(known || compress)
        })
    {
        let valid: Vec<&str> = spec.iter().map(|s| s.name).collect();
        return Err(Error::input(format!(
            "invalid option '{bad}' for format {}; valid options: {}",
            format.name(),
            if valid.is_empty() {
                "none".to_string()
            } else {
                valid.join(", ")
            }
        )));
    }
    let w: Box<dyn FormatWriter> = match format {
        Format::Raw => Box::new(raw::RawWriter::new(opts)?),
        Format::Vpc => Box::new(vhd::VhdWriter::new(opts)?),
        Format::Vdi => Box::new(vdi::VdiWriter::new(opts)?),
        Format::Vhdx => Box::new(vhdx::VhdxWriter::new(opts)?),
        Format::Qcow2 => Box::new(qcow2::Qcow2Writer::new(opts)?),
        Format::Vmdk => Box::new(vmdk::VmdkWriter::new(opts)?),
        Format::Ova => {
            return Err(Error::input(
                "ova is an input format only; write vmdk and package it",
            ));
        }
    };
    opts.finish(format.name())?;
    Ok(w)
}
