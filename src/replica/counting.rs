//! A source that counts the bytes read from it (what a replication run reports, and what the tests bound) and,
//! when asked, hashes every whole block read through it, so a point written by the engine yields its blocks'
//! hashes without a second read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use imgshift_converters::{DiskSource, ExtentMap, Format, HostExtent, ImageInfo};

use super::BLOCK;
use super::hashes::hash_block;

/// `inner`, counting every byte read through [`DiskSource::read_at`].
pub struct CountingSource<'a> {
    inner: &'a dyn DiskSource,
    read: AtomicU64,
    record: AtomicBool,
    seen: Mutex<BTreeMap<u64, [u8; 32]>>,
}

impl<'a> CountingSource<'a> {
    /// Counts reads of `inner`.
    pub fn new(inner: &'a dyn DiskSource) -> Self {
        CountingSource {
            inner,
            read: AtomicU64::new(0),
            record: AtomicBool::new(false),
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// From now on, hashes every whole, block-aligned [`BLOCK`] read (blocks read in pieces are not recorded).
    pub fn record_hashes(&self) {
        self.record.store(true, Ordering::Relaxed);
    }

    /// The hashes recorded, by block index.
    pub fn take_hashes(&self) -> BTreeMap<u64, [u8; 32]> {
        self.seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    fn hash_blocks(&self, buf: &[u8], offset: u64) {
        let size = self.inner.virtual_size();
        let end = offset.saturating_add(buf.len() as u64);
        let mut at = offset.div_ceil(BLOCK).saturating_mul(BLOCK);
        let mut found = Vec::new();
        while at < end {
            let block_end = at.saturating_add(BLOCK).min(size);
            if block_end > end || block_end <= at {
                break;
            }
            if let Some(b) = buf.get((at - offset) as usize..(block_end - offset) as usize) {
                found.push((at / BLOCK, hash_block(b)));
            }
            at = block_end;
        }
        if !found.is_empty()
            && let Ok(mut s) = self.seen.lock()
        {
            s.extend(found);
        }
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
        if self.record.load(Ordering::Relaxed) {
            self.hash_blocks(buf, offset);
        }
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
