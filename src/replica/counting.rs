//! A source that counts the bytes read from it (what a replication run reports, and what the tests bound).

use std::sync::atomic::{AtomicU64, Ordering};

use imgshift_converters::{DiskSource, ExtentMap, Format, HostExtent, ImageInfo};

/// `inner`, counting every byte read through [`DiskSource::read_at`].
pub struct CountingSource<'a> {
    inner: &'a dyn DiskSource,
    read: AtomicU64,
}

impl<'a> CountingSource<'a> {
    /// Counts reads of `inner`.
    pub fn new(inner: &'a dyn DiskSource) -> Self {
        CountingSource {
            inner,
            read: AtomicU64::new(0),
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl DiskSource for CountingSource<'_> {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn extents(&self, offset: u64, len: u64) -> imgshift_converters::Result<ExtentMap> {
        self.inner.extents(offset, len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        self.inner.read_at(buf, offset)?;
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn backing(&self) -> Option<&dyn DiskSource> {
        self.inner.backing()
    }
    fn host_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> imgshift_converters::Result<Option<Vec<HostExtent>>> {
        self.inner.host_extents(offset, len)
    }
    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
}
