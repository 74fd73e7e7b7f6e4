//! Filling a freshly created volume from a source disk: the converter engine writes the volume's format (qcow2
//! or raw) straight into a [`VolumeSink`], no temporary file. Used by `upload libvirt` and
//! `migrate --to libvirt`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use imgshift_converters::{
    ConvertOptions, ConvertStats, DiskSource, ExtentMap, Format, FormatWriter, Progress,
    WriterOptions, create_writer,
    engine::{convert_with_map, source_map},
};

use super::VolFormat;
use super::sink::{SentCounts, VolumeSink};
use super::volume::Created;

/// The writer of `format`'s files.
pub fn writer(format: VolFormat) -> imgshift_converters::Result<Box<dyn FormatWriter>> {
    create_writer(
        Format::from_name(format.name())?,
        &mut WriterOptions::default(),
    )
}

/// The capacity a volume of `format` gets for a disk of `virtual_size` bytes (qcow2 rounds up to 512 bytes).
pub fn capacity(format: VolFormat, virtual_size: u64) -> imgshift_converters::Result<u64> {
    writer(format)?.output_virtual_size(virtual_size)
}

/// A failed fill: the converter's error and what had been sent.
pub struct FillError {
    /// What went wrong.
    pub error: imgshift_converters::Error,
    /// What had been sent before.
    pub sent: SentCounts,
}

/// Converts `src` (its extent map when already known) into the volume `created`, whose format `format` is. Gaps
/// in the output travel as holes. `cancel`, when set from outside, fails the next
/// write. On failure the stream is aborted; deleting the volume is the caller's business.
pub fn fill(
    created: &Created,
    format: VolFormat,
    src: &dyn DiskSource,
    map: Option<&ExtentMap>,
    progress: &dyn Progress,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<(SentCounts, ConvertStats), FillError> {
    let fail = |error| FillError {
        error,
        sent: SentCounts::default(),
    };
    let mut writer = writer(format).map_err(fail)?;
    let owned;
    let map = match map {
        Some(m) => m,
        None => {
            owned = source_map(src).map_err(fail)?;
            &owned
        }
    };
    // A fresh qcow2 volume holds libvirt's header: whatever of it the output does not cover is zeroed.
    let min_end = match format {
        VolFormat::Qcow2 => created.initial_len,
        VolFormat::Raw => 0,
    };
    let mut sink = VolumeSink::new(&created.vol, min_end);
    if let Some(flag) = cancel {
        sink = sink.with_cancel(flag);
    }
    match convert_with_map(
        src,
        map,
        writer.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        progress,
    ) {
        Ok(stats) => Ok((sink.sent, stats)),
        Err(error) => {
            sink.abort();
            Err(FillError {
                error,
                sent: sink.sent,
            })
        }
    }
}
