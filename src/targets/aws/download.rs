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

/// What changed between two snapshots of one lineage (ListChangedBlocks), as byte ranges of the second.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedRanges {
    /// The second snapshot's volume size in bytes.
    pub volume_bytes: u64,
    /// Sorted, non-overlapping, merged `[start, end)` byte ranges, each a whole number of 512 KiB blocks.
    pub ranges: Vec<(u64, u64)>,
    /// Blocks listed (the ranges' total length / 512 KiB).
    pub blocks: u64,
}

/// Why ListChangedBlocks gave no answer. [`ChangedBlocksError::can_hash_instead`] says whether a caller may
/// fall back to comparing hashes (the snapshots cannot be compared by the service) rather than stop.
#[derive(Debug, thiserror::Error)]
pub enum ChangedBlocksError {
    /// The two snapshots are not of one volume/snapshot lineage (ValidationException, Reason
    /// UNRELATED_SNAPSHOTS).
    #[error(
        "snapshots {first} and {second} are not of one volume lineage: EBS cannot list what changed between them"
    )]
    Unrelated {
        /// The earlier snapshot.
        first: String,
        /// The later snapshot.
        second: String,
    },
    /// Another validation error (ValidationException with another reason, e.g. an archived snapshot).
    #[error("EBS refused to compare {first} and {second}: {detail}")]
    Invalid {
        /// The earlier snapshot.
        first: String,
        /// The later snapshot.
        second: String,
        /// The ValidationException's Reason, when given (`INVALID_SNAPSHOT_ID`...).
        reason: Option<String>,
        /// Code, status and message.
        detail: String,
    },
    /// One of the snapshots does not exist (ResourceNotFoundException), e.g. the earlier one was deleted.
    #[error("cannot compare {first} and {second}: {detail}")]
    NotFound {
        /// The earlier snapshot.
        first: String,
        /// The later snapshot.
        second: String,
        /// Code, status and message.
        detail: String,
    },
    /// Anything else (access denied, throttled after every retry, unreachable, a reply that makes no sense):
    /// a fault to report, not a reason to hash.
    #[error("cannot list the blocks changed between {first} and {second}")]
    Failed {
        /// The earlier snapshot.
        first: String,
        /// The later snapshot.
        second: String,
        /// What went wrong.
        #[source]
        source: anyhow::Error,
    },
}

impl ChangedBlocksError {
    /// Whether the service cannot compare these snapshots (unrelated, refused, one missing), so a caller may
    /// compare hashes instead; `false` for faults (access, network, throttling) that hashing would not fix.
    pub fn can_hash_instead(&self) -> bool {
        !matches!(self, ChangedBlocksError::Failed { .. })
    }
}

/// ListChangedBlocks between `first` and `second` (same lineage), every page, as merged byte ranges of
/// `second`. Each page waits for a permit of `limiter` (shared with the caller's other EBS calls; throttling
/// lowers it). The blocks listed are those whose data differs, including blocks present in only one snapshot.
pub async fn list_changed(
    client: &aws_sdk_ebs::Client,
    policy: &Policy,
    limiter: &std::sync::Arc<crate::targets::limiter::Limiter>,
    first: &str,
    second: &str,
) -> std::result::Result<ChangedRanges, ChangedBlocksError> {
    list_changed_paged(client, policy, limiter, first, second, LIST_PAGE).await
}

/// [`list_changed`] asking for pages of `page` blocks (100..=10000).
pub(crate) async fn list_changed_paged(
    client: &aws_sdk_ebs::Client,
    policy: &Policy,
    limiter: &std::sync::Arc<crate::targets::limiter::Limiter>,
    first: &str,
    second: &str,
    page: i32,
) -> std::result::Result<ChangedRanges, ChangedBlocksError> {
    use aws_sdk_ebs::operation::list_changed_blocks::ListChangedBlocksError as Sdk;
    let failed = |source: anyhow::Error| ChangedBlocksError::Failed {
        first: first.to_string(),
        second: second.to_string(),
        source,
    };
    // A completed snapshot that is not found is gone, not "not visible yet".
    let policy = Policy {
        not_found_grace: std::time::Duration::ZERO,
        ..*policy
    };
    let max_blocks = super::EBS_MAX_VOLUME_GIB * (1 << 30) / EBS_BLOCK_SIZE;
    let page = page.clamp(100, LIST_PAGE);
    let max_pages = max_blocks / page as u64 + 2;
    let mut indices: Vec<u64> = Vec::new();
    let mut token: Option<String> = None;
    let mut volume_blocks: Option<u64> = None;
    for _ in 0..max_pages {
        let reason: Mutex<Option<String>> = Mutex::new(None);
        let permit = limiter.acquire().await.map_err(failed)?;
        let out = retry::with_retry(
            &policy,
            "ListChangedBlocks",
            |c| {
                if c == retry::Class::Throttle {
                    limiter.throttled();
                }
            },
            || {
                let req = client
                    .list_changed_blocks()
                    .first_snapshot_id(first)
                    .second_snapshot_id(second)
                    .max_results(page)
                    .set_next_token(token.clone());
                let reason = &reason;
                async move {
                    let r = req.send().await;
                    if let Err(aws_sdk_ebs::error::SdkError::ServiceError(se)) = &r
                        && let Sdk::ValidationException(v) = se.err()
                        && let Ok(mut slot) = reason.lock()
                    {
                        *slot = v.reason().map(|r| r.as_str().to_string());
                    }
                    r
                }
            },
        )
        .await;
        drop(permit);
        let out = match out {
            Ok(o) => {
                limiter.succeeded();
                o
            }
            Err(e) => {
                let Some(call) = e.downcast_ref::<retry::CallError>() else {
                    return Err(failed(e));
                };
                let reason = reason.lock().ok().and_then(|r| r.clone());
                return Err(match call.code.as_deref() {
                    Some("ValidationException")
                        if reason.as_deref() == Some("UNRELATED_SNAPSHOTS") =>
                    {
                        ChangedBlocksError::Unrelated {
                            first: first.to_string(),
                            second: second.to_string(),
                        }
                    }
                    Some("ValidationException") => ChangedBlocksError::Invalid {
                        first: first.to_string(),
                        second: second.to_string(),
                        reason,
                        detail: call.detail.clone(),
                    },
                    Some("ResourceNotFoundException") => ChangedBlocksError::NotFound {
                        first: first.to_string(),
                        second: second.to_string(),
                        detail: call.detail.clone(),
                    },
                    _ => failed(e),
                });
            }
        };
        if volume_blocks.is_none() {
            let gib = out
                .volume_size()
                .and_then(|s| u64::try_from(s).ok())
                .filter(|&g| g > 0 && g <= super::EBS_MAX_VOLUME_GIB)
                .ok_or_else(|| {
                    failed(anyhow::anyhow!(
                        "ListChangedBlocks reported no or an impossible volume size ({:?} GiB)",
                        out.volume_size()
                    ))
                })?;
            volume_blocks = Some(gib * ((1 << 30) / EBS_BLOCK_SIZE));
        }
        let limit = volume_blocks.unwrap_or(0);
        for b in out.changed_blocks() {
            let i = b
                .block_index()
                .and_then(|i| u64::try_from(i).ok())
                .filter(|&i| i < limit)
                .ok_or_else(|| {
                    failed(anyhow::anyhow!(
                        "ListChangedBlocks listed block {:?}, outside the {limit}-block volume",
                        b.block_index()
                    ))
                })?;
            indices.push(i);
        }
        if indices.len() as u64 > max_blocks {
            return Err(failed(anyhow::anyhow!(
                "ListChangedBlocks listed more blocks than a volume holds"
            )));
        }
        match out.next_token() {
            Some(t) if !t.is_empty() && Some(t) != token.as_deref() => token = Some(t.to_string()),
            _ => {
                token = None;
                break;
            }
        }
    }
    if token.is_some() {
        return Err(failed(anyhow::anyhow!(
            "ListChangedBlocks did not finish paging within {max_pages} pages"
        )));
    }
    indices.sort_unstable();
    indices.dedup();
    let blocks = indices.len() as u64;
    Ok(ChangedRanges {
        volume_bytes: volume_blocks.unwrap_or(0) * EBS_BLOCK_SIZE,
        ranges: merge_blocks(&indices),
        blocks,
    })
}

/// Sorted, deduplicated block indices as merged byte ranges.
fn merge_blocks(indices: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in indices {
        let (s, e) = (i * EBS_BLOCK_SIZE, (i + 1) * EBS_BLOCK_SIZE);
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_merge_into_sorted_byte_ranges() {
        const B: u64 = EBS_BLOCK_SIZE;
        assert_eq!(merge_blocks(&[]), vec![]);
        assert_eq!(
            merge_blocks(&[0, 1, 2, 5, 7, 8]),
            vec![(0, 3 * B), (5 * B, 6 * B), (7 * B, 9 * B)]
        );
    }
}
