//! raw: the disk's bytes as they are. Allocation comes from the filesystem (SEEK_DATA/SEEK_HOLE); writes
//! leave holes for zeros.

use std::sync::Arc;

use crate::error::Result;
use crate::extent::{ExtentKind, ExtentMap};
use crate::formats::Format;
use crate::sink::Sink;
use crate::source::{DiskSource, HostExtent, ImageInfo, check_range};
use crate::storage::Storage;
use crate::writer::{FormatWriter, OptionSpec, Plan, Run, WriterOptions};

/// Reads a raw image.
pub struct RawReader {
    storage: Arc<dyn Storage>,
}

impl RawReader {
    /// Opens `storage` as a raw image.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self> {
        Ok(RawReader { storage })
    }
}

impl DiskSource for RawReader {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.storage.len()
    }

    fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
        check_range(self.virtual_size(), offset, len)?;
        let end = offset + len;
        let mut map = ExtentMap::new();
        match self.storage.data_ranges(offset, len)? {
            None => map.push(offset, len, ExtentKind::Data)?,
            Some(ranges) => {
                let mut at = offset;
                for (s, l) in ranges {
                    let s = s.max(at);
                    let t = (s + l).min(end);
                    if t <= s {
                        continue;
                    }
                    map.push(at, s - at, ExtentKind::Zero)?;
                    map.push(s, t - s, ExtentKind::Data)?;
                    at = t;
                }
                map.push(at, end - at, ExtentKind::Zero)?;
            }
        }
        Ok(map)
    }

    fn host_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<HostExtent>>> {
        // A raw image stores guest byte N at file offset N.
        check_range(self.virtual_size(), offset, len)?;
        Ok(Some(vec![HostExtent {
            guest: offset,
            len,
            host: Some(offset),
        }]))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len() as u64)?;
        self.storage.read_exact_at(buf, offset)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.virtual_size(),
            ..ImageInfo::default()
        }
    }
}

/// Writes a raw image: data at its guest offset, zeros as holes (or as zero bytes on a stream).
pub struct RawWriter {
    virtual_size: u64,
}

/// The raw writer takes no `-o` options.
pub const OPTIONS: &[OptionSpec] = &[];

impl RawWriter {
    /// raw takes no `-o` options.
    pub fn new(_opts: &mut WriterOptions) -> Result<Self> {
        Ok(RawWriter { virtual_size: 0 })
    }
}

impl FormatWriter for RawWriter {
    fn granularity(&self) -> u64 {
        // qemu-img's default -S: zero runs of 4 KiB or more become holes.
        4096
    }

    fn begin(&mut self, _sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()> {
        self.virtual_size = plan.virtual_size;
        Ok(())
    }

    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()> {
        match run {
            Run::Zero(_) => Ok(()),
            Run::Data(d) => sink.write_at(offset, d),
            Run::Compressed { .. } => Err(crate::Error::input(
                "raw output cannot hold compressed data",
            )),
        }
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64> {
        sink.finish(self.virtual_size)?;
        Ok(self.virtual_size)
    }
}
