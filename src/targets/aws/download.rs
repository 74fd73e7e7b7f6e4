//! `EbsSnapshotSource`: an EBS snapshot as a `DiskSource` (ListSnapshotBlocks for the allocation map,
//! GetSnapshotBlock for reads, each block's SHA-256 verified), so `download` writes any output format through
//! the same engine and writers as `convert`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, ExtentMap, Format, ImageInfo};
use tokio::runtime::Handle;

use super::retry::{self, Policy};
use super::{EBS_BLOCK_SIZE, block_checksum};

/// Tokens cached at most (a window of the snapshot's blocks).
const TOKEN_CACHE_MAX: usize = 20_000;
/// Blocks asked for per ListSnapshotBlocks page (API maximum 10000).
const LIST_PAGE: i32 = 10_000;

/// A completed EBS snapshot read through the EBS direct APIs.
pub struct EbsSnapshotSource {
    rt: Handle,
    /// The runtime `rt` belongs to, when this source owns it (a source opened on its own, not by a target).
    _owner: Option<std::sync::Arc<tokio::runtime::Runtime>>,
    client: aws_sdk_ebs::Client,
    policy: Policy,
    snapshot_id: String,
    size: u64,
    /// Allocated block indices (sorted, merged into ranges of block indices `[start, end)`).
    blocks: Vec<(u64, u64)>,
    tokens: Mutex<BTreeMap<u64, String>>,
}

impl EbsSnapshotSource {
    /// Lists the snapshot's blocks. Runs on `rt` (call from outside the runtime).
    pub fn open(
        rt: Handle,
        client: aws_sdk_ebs::Client,
        policy: Policy,
        snapshot_id: &str,
    ) -> Result<Self> {
        let (size, indices) = rt.block_on(list_all(&client, &policy, snapshot_id))?;
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for i in indices {
            match blocks.last_mut() {
                Some(last) if last.1 == i => last.1 = i + 1,
                _ => blocks.push((i, i + 1)),
            }
        }
        Ok(EbsSnapshotSource {
            rt,
            _owner: None,
            client,
            policy,
            snapshot_id: snapshot_id.to_string(),
            size,
            blocks,
            tokens: Mutex::new(BTreeMap::new()),
        })
    }

    /// This source, keeping `rt` (the runtime its handle belongs to) alive as long as it lives.
    pub fn owning(mut self, rt: std::sync::Arc<tokio::runtime::Runtime>) -> Self {
        self._owner = Some(rt);
        self
    }

    /// Blocks the snapshot lists (ListSnapshotBlocks).
    pub fn block_count(&self) -> u64 {
        self.blocks.iter().map(|r| r.1 - r.0).sum()
    }

    fn allocated(&self, index: u64) -> bool {
        let i = self.blocks.partition_point(|r| r.1 <= index);
        self.blocks.get(i).is_some_and(|r| r.0 <= index)
    }

    fn token(&self, index: u64) -> Result<String> {
        if let Some(t) = self
            .tokens
            .lock()
            .map_err(|_| anyhow::anyhow!("token cache poisoned"))?
            .get(&index)
        {
            return Ok(t.clone());
        }
        let page = self.rt.block_on(list_page(
            &self.client,
            &self.policy,
            &self.snapshot_id,
            index,
        ))?;
        let mut cache = self
            .tokens
            .lock()
            .map_err(|_| anyhow::anyhow!("token cache poisoned"))?;
        if cache.len() > TOKEN_CACHE_MAX {
            cache.clear();
        }
        cache.extend(page);
        cache
            .get(&index)
            .cloned()
            .with_context(|| format!("block {index} of {} has no token", self.snapshot_id))
    }

    fn fetch(&self, index: u64) -> Result<Vec<u8>> {
        let token = self.token(index)?;
        let idx = i32::try_from(index).context("block index out of range")?;
        let what = format!("GetSnapshotBlock {index} of {}", self.snapshot_id);
        self.rt.block_on(async {
            let out = retry::with_retry(
                &self.policy,
                &what,
                |_| {},
                || {
                    self.client
                        .get_snapshot_block()
                        .snapshot_id(&self.snapshot_id)
                        .block_index(idx)
                        .block_token(&token)
                        .send()
                },
            )
            .await?;
            let want = out.checksum().map(str::to_string);
            let data = out
                .block_data
                .collect()
                .await
                .context("cannot read a snapshot block")?
                .into_bytes();
            if data.len() as u64 != EBS_BLOCK_SIZE {
                bail!(
                    "block {index} of {} has {} bytes, not {EBS_BLOCK_SIZE}",
                    self.snapshot_id,
                    data.len()
                );
            }
            if let Some(w) = want
                && w != block_checksum(&data)
            {
                bail!(
                    "block {index} of {} fails its SHA-256 checksum",
                    self.snapshot_id
                );
            }
            Ok(data.to_vec())
        })
    }
}

async fn list_all(
    client: &aws_sdk_ebs::Client,
    policy: &Policy,
    id: &str,
) -> Result<(u64, Vec<u64>)> {
    let mut indices = Vec::new();
    let mut token: Option<String> = None;
    let mut size = None;
    // Bounded: a snapshot holds at most 64 TiB / 512 KiB blocks; stop on a repeated page token.
    let max_pages = (super::EBS_MAX_VOLUME_GIB * (1 << 30) / EBS_BLOCK_SIZE) / LIST_PAGE as u64 + 2;
    for _ in 0..max_pages {
        let out = retry::with_retry(
            policy,
            "ListSnapshotBlocks",
            |_| {},
            || {
                client
                    .list_snapshot_blocks()
                    .snapshot_id(id)
                    .max_results(LIST_PAGE)
                    .set_next_token(token.clone())
                    .send()
            },
        )
        .await?;
        size = size.or(out.volume_size());
        for b in out.blocks() {
            if let Some(i) = b.block_index().and_then(|i| u64::try_from(i).ok()) {
                indices.push(i);
            }
        }
        match out.next_token() {
            Some(t) if Some(t) != token.as_deref() && !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    let gib = size
        .and_then(|s| u64::try_from(s).ok())
        .context("ListSnapshotBlocks returned no volume size")?;
    if gib == 0 || gib > super::EBS_MAX_VOLUME_GIB {
        bail!("snapshot {id} reports an impossible volume size of {gib} GiB");
    }
    let bytes = gib << 30;
    indices.retain(|&i| i < bytes / EBS_BLOCK_SIZE);
    indices.sort_unstable();
    indices.dedup();
    Ok((bytes, indices))
}

async fn list_page(
    client: &aws_sdk_ebs::Client,
    policy: &Policy,
    id: &str,
    from: u64,
) -> Result<BTreeMap<u64, String>> {
    let start = i32::try_from(from).context("block index out of range")?;
    let out = retry::with_retry(
        policy,
        "ListSnapshotBlocks",
        |_| {},
        || {
            client
                .list_snapshot_blocks()
                .snapshot_id(id)
                .starting_block_index(start)
                .max_results(LIST_PAGE)
                .send()
        },
    )
    .await?;
    let mut m = BTreeMap::new();
    for b in out.blocks() {
        if let (Some(i), Some(t)) = (
            b.block_index().and_then(|i| u64::try_from(i).ok()),
            b.block_token(),
        ) {
            // Some servers ignore StartingBlockIndex; keep a window from `from` only.
            if i >= from && i < from + LIST_PAGE as u64 {
                m.insert(i, t.to_string());
            }
        }
    }
    Ok(m)
}

impl DiskSource for EbsSnapshotSource {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extents(&self, offset: u64, len: u64) -> imgshift_converters::Result<ExtentMap> {
        imgshift_converters::source::check_range(self.size, offset, len)?;
        let first = self
            .blocks
            .partition_point(|r| r.1 * EBS_BLOCK_SIZE <= offset);
        crate::targets::extents_from_ranges(
            self.blocks[first..]
                .iter()
                .map(|&(s, t)| (s * EBS_BLOCK_SIZE, t * EBS_BLOCK_SIZE)),
            offset,
            len,
        )
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        imgshift_converters::source::check_range(self.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / EBS_BLOCK_SIZE;
            let within = (pos % EBS_BLOCK_SIZE) as usize;
            let n = (EBS_BLOCK_SIZE as usize - within).min(buf.len() - done);
            if self.allocated(index) {
                let block = self.fetch(index).map_err(crate::targets::read_back_error)?;
                buf[done..done + n].copy_from_slice(&block[within..within + n]);
            } else {
                buf[done..done + n].fill(0);
            }
            done += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.size,
            cluster_size: Some(EBS_BLOCK_SIZE),
            ..ImageInfo::default()
        }
    }
}
