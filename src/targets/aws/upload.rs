//! `EbsSnapshotUploader`: the engine's stream of 512 KiB blocks into PutSnapshotBlock calls, many in flight,
//! with per-block retries, throttling feedback, and a journal of acknowledged blocks for resume.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::ChecksumAlgorithm;
use imgshift_converters::{FormatWriter, Plan, Run, Sink};
use tokio::sync::mpsc;

use crate::targets::limiter::Limiter;
use tokio::task::JoinSet;

use super::retry::{self, Class, Policy};
use super::{EBS_BLOCK_SIZE, block_checksum};
use crate::journal::Ledger;

/// One block on its way to EBS.
pub struct Block {
    /// Block index (512 KiB units).
    pub index: u64,
    /// Exactly 512 KiB.
    pub data: Vec<u8>,
}

/// Feeds the engine's runs to the uploader as whole 512 KiB blocks. Zero blocks are skipped for an unencrypted
/// snapshot; for an encrypted one every block is sent, because EBS returns random bytes for blocks never
/// written to an encrypted snapshot.
pub struct EbsBlockWriter {
    tx: mpsc::Sender<Block>,
    skip: crate::journal::Bitmap,
    encrypted: bool,
    next_index: u64,
    block_count: u64,
    /// Blocks handed to the uploader.
    pub sent: Arc<AtomicU64>,
}

impl EbsBlockWriter {
    /// A writer sending to `tx`; blocks set in `skip` were acknowledged in an earlier run.
    pub fn new(
        tx: mpsc::Sender<Block>,
        skip: crate::journal::Bitmap,
        encrypted: bool,
        block_count: u64,
    ) -> Self {
        EbsBlockWriter {
            tx,
            skip,
            encrypted,
            next_index: 0,
            block_count,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    fn send(&mut self, index: u64, data: Vec<u8>) -> imgshift_converters::Result<()> {
        if self.skip.get(index) {
            return Ok(());
        }
        self.tx
            .blocking_send(Block { index, data })
            .map_err(|_| imgshift_converters::Error::input("the upload stopped"))?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends zero blocks for every index below `upto` not yet sent (encrypted snapshots only).
    fn fill_zeros(&mut self, upto: u64) -> imgshift_converters::Result<()> {
        if self.encrypted {
            while self.next_index < upto {
                let i = self.next_index;
                self.send(i, vec![0u8; EBS_BLOCK_SIZE as usize])?;
                self.next_index += 1;
            }
        }
        self.next_index = self.next_index.max(upto);
        Ok(())
    }
}

impl FormatWriter for EbsBlockWriter {
    fn granularity(&self) -> u64 {
        EBS_BLOCK_SIZE
    }

    fn begin(&mut self, _sink: &mut dyn Sink, _plan: &Plan<'_>) -> imgshift_converters::Result<()> {
        Ok(())
    }

    fn write_run(
        &mut self,
        _sink: &mut dyn Sink,
        offset: u64,
        run: Run<'_>,
    ) -> imgshift_converters::Result<()> {
        let Run::Data(data) = run else {
            // Zero runs: nothing to send (encrypted: filled in before the next data block or at the end).
            return Ok(());
        };
        // Runs start on block boundaries (granularity) and hold whole blocks, except at the disk's end.
        let mut at = 0usize;
        while at < data.len() {
            let index = (offset + at as u64) / EBS_BLOCK_SIZE;
            let n = (EBS_BLOCK_SIZE as usize).min(data.len() - at);
            self.fill_zeros(index)?;
            let mut block = vec![0u8; EBS_BLOCK_SIZE as usize];
            block[..n].copy_from_slice(&data[at..at + n]);
            self.send(index, block)?;
            self.next_index = index + 1;
            at += n;
        }
        Ok(())
    }

    fn finish(&mut self, _sink: &mut dyn Sink) -> imgshift_converters::Result<u64> {
        self.fill_zeros(self.block_count)?;
        Ok(self.block_count * EBS_BLOCK_SIZE)
    }
}

/// A sink that takes nothing: the EBS writer sends its blocks itself.
pub struct NullSink;

impl Sink for NullSink {
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> imgshift_converters::Result<()> {
        Ok(())
    }
    fn can_seek_back(&self) -> bool {
        false
    }
    fn finish(&mut self, _len: u64) -> imgshift_converters::Result<()> {
        Ok(())
    }
}

/// Counters of one upload run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UploadCounts {
    /// PutSnapshotBlock calls that succeeded in this run.
    pub blocks_put: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Of those, throttling replies.
    pub throttled: u64,
    /// Bytes of block data sent successfully.
    pub bytes_sent: u64,
}

/// Tuning of the uploader.
#[derive(Debug, Clone, Copy)]
pub struct UploaderOptions {
    /// Most PutSnapshotBlock requests in flight (one snapshot tops out near 1000 requests/s).
    pub concurrency: usize,
    /// Retry policy per block.
    pub policy: Policy,
}

/// Adaptive limit: throttling halves the requests in flight (down to `MIN_IN_FLIGHT`), successes add one back.
const MIN_IN_FLIGHT: usize = 4;
/// Successes needed before one more request may be in flight again.
const RAMP_UP_EVERY: u64 = 64;

/// Acknowledged blocks between two journal saves (8 MiB of data).
const JOURNAL_EVERY_BLOCKS: u64 = 16;
/// Shortest time between two journal saves.
const JOURNAL_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Uploads every block from `rx` to `snapshot_id`, recording acknowledged blocks in `journal`.
pub async fn put_blocks(
    client: aws_sdk_ebs::Client,
    snapshot_id: String,
    mut rx: mpsc::Receiver<Block>,
    opts: UploaderOptions,
    ledger: Ledger,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
    verbose: bool,
) -> Result<UploadCounts> {
    let limiter = Limiter::new(opts.concurrency, MIN_IN_FLIGHT, RAMP_UP_EVERY);
    let retries = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let mut tasks: JoinSet<Result<u64>> = JoinSet::new();
    let mut counts = UploadCounts::default();
    let mut last_save = std::time::Instant::now();
    let mut since_save = 0u64;

    let mut handle = |res: Result<Result<u64>, tokio::task::JoinError>,
                      counts: &mut UploadCounts|
     -> Result<()> {
        let index = res.context("an upload task failed")??;
        counts.blocks_put += 1;
        counts.bytes_sent += EBS_BLOCK_SIZE;
        progress(EBS_BLOCK_SIZE);
        since_save += 1;
        // Journal often enough that a crash loses little, rarely enough to stay cheap (at most 4 saves/s).
        let save =
            since_save >= JOURNAL_EVERY_BLOCKS && last_save.elapsed() >= JOURNAL_MIN_INTERVAL;
        ledger.mark(index, save)?;
        if save {
            last_save = std::time::Instant::now();
            since_save = 0;
            crate::journal::pause_point("upload-saved");
        }
        Ok(())
    };

    let mut interrupted = None;
    while let Some(block) = rx.recv().await {
        // Ctrl-C or SIGTERM: send nothing more; what is in flight finishes and is kept.
        if let Err(i) = crate::interrupt::check() {
            interrupted = Some(i);
            break;
        }
        let permit = limiter.acquire().await?;
        let client = client.clone();
        let snapshot_id = snapshot_id.clone();
        let (lim2, retries2, thr2) = (limiter.clone(), retries.clone(), throttled.clone());
        let policy = opts.policy;
        tasks.spawn(async move {
            let checksum = block_checksum(&block.data);
            let index = i32::try_from(block.index).context("block index out of range for EBS")?;
            let data = bytes::Bytes::from(block.data);
            let what = format!("PutSnapshotBlock {index} of {snapshot_id}");
            let on_class = |c: Class| {
                retries2.fetch_add(1, Ordering::Relaxed);
                if c == Class::Throttle {
                    thr2.fetch_add(1, Ordering::Relaxed);
                    lim2.throttled();
                }
            };
            let r = retry::with_retry(&policy, &what, on_class, || {
                client
                    .put_snapshot_block()
                    .snapshot_id(&snapshot_id)
                    .block_index(index)
                    .block_data(ByteStream::from(data.clone()))
                    .data_length(EBS_BLOCK_SIZE as i32)
                    .checksum(&checksum)
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .send()
            })
            .await;
            drop(permit);
            if r.is_ok() {
                lim2.succeeded();
            }
            r.map(|_| block.index)
        });
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = handle(res, &mut counts) {
                tasks.abort_all();
                return Err(e);
            }
        }
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = handle(res, &mut counts) {
            tasks.abort_all();
            return Err(e);
        }
    }
    if let Some(i) = interrupted {
        ledger.save()?;
        return Err(i.into());
    }
    counts.retries = retries.load(Ordering::Relaxed);
    counts.throttled = throttled.load(Ordering::Relaxed);
    if verbose && counts.retries > 0 {
        eprintln!(
            "imgshift: {} retried requests ({} throttled)",
            counts.retries, counts.throttled
        );
    }
    ledger.save()?;
    Ok(counts)
}

/// Streams `src` (mapped as `map`) into the pending snapshot `snapshot_id`: the engine runs on a thread of its
/// own and feeds 512 KiB blocks through a short queue to the uploader, which sends them concurrently; blocks
/// already in `ledger` are skipped. Returns the uploader's counts.
#[allow(clippy::too_many_arguments)]
pub fn stream_snapshot(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_ebs::Client,
    snapshot_id: &str,
    src: &dyn imgshift_converters::DiskSource,
    map: &imgshift_converters::ExtentMap,
    encrypted: bool,
    block_count: u64,
    ledger: Ledger,
    opts: UploaderOptions,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
    verbose: bool,
) -> Result<UploadCounts> {
    let skip = ledger.bitmap()?;
    // A short queue: the converter is faster than the network, so a deep one would only hold memory (each
    // block is 512 KiB; the requests in flight hold `concurrency` more).
    let (tx, rx) = mpsc::channel(BLOCK_QUEUE);
    let mut writer = EbsBlockWriter::new(tx, skip, encrypted, block_count);
    let (feed, upload) = std::thread::scope(|s| {
        let feeder = s.spawn(|| {
            let r = imgshift_converters::engine::convert_with_map(
                src,
                map,
                &mut writer,
                &mut NullSink,
                &imgshift_converters::ConvertOptions::default(),
                &imgshift_converters::NoProgress,
            );
            drop(writer);
            r
        });
        let upload = rt.block_on(put_blocks(
            client.clone(),
            snapshot_id.to_string(),
            rx,
            opts,
            ledger,
            progress,
            verbose,
        ));
        (feeder.join(), upload)
    });
    let counts = upload?;
    match feed {
        Ok(Ok(_)) => Ok(counts),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("cannot read the source")),
        Err(_) => Err(anyhow::anyhow!("the reader thread failed")),
    }
}

/// The 512 KiB blocks that `ranges` (sorted `[start, end)` byte ranges) touch on a disk of `block_count`
/// blocks, in order, each once; an error if a range is unsorted, empty or beyond the disk.
pub fn blocks_of_ranges(ranges: &[(u64, u64)], block_count: u64) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = Vec::new();
    let mut prev_end = 0u64;
    for &(start, end) in ranges {
        if end <= start || start < prev_end {
            bail!("changed ranges must be sorted, non-empty and non-overlapping ({start}..{end})");
        }
        let last = end.div_ceil(EBS_BLOCK_SIZE);
        if last > block_count {
            bail!("changed range {start}..{end} lies beyond the {block_count}-block snapshot");
        }
        for i in start / EBS_BLOCK_SIZE..last {
            if out.last() != Some(&i) {
                out.push(i);
            }
        }
        prev_end = end;
    }
    Ok(out)
}

/// Puts only the blocks touching `ranges` (sorted byte ranges of `src`, e.g. what changed since the parent
/// snapshot) into the pending snapshot `snapshot_id`, each as read from `src` — a block that reads as zeros is
/// put as zeros, since the snapshot would otherwise keep its parent's block. Blocks already in `ledger` are
/// skipped (resume). The same uploader as [`stream_snapshot`]; `block_count` is the snapshot's size in blocks.
/// Complete the snapshot afterwards with [`complete_snapshot`] and the ledger's count.
#[allow(clippy::too_many_arguments)]
pub fn stream_ranges(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_ebs::Client,
    snapshot_id: &str,
    src: &dyn imgshift_converters::DiskSource,
    ranges: &[(u64, u64)],
    block_count: u64,
    ledger: Ledger,
    opts: UploaderOptions,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
    verbose: bool,
) -> Result<UploadCounts> {
    let skip = ledger.bitmap()?;
    let blocks = blocks_of_ranges(ranges, block_count)?;
    let size = src.virtual_size();
    let (tx, rx) = mpsc::channel(BLOCK_QUEUE);
    let (feed, upload) = std::thread::scope(|s| {
        let feeder = s.spawn(move || -> Result<()> {
            for index in blocks {
                if skip.get(index) {
                    continue;
                }
                let mut data = vec![0u8; EBS_BLOCK_SIZE as usize];
                let at = index * EBS_BLOCK_SIZE;
                // The snapshot may be larger than the disk (whole GiB): past the disk's end reads as zeros.
                let n = size.saturating_sub(at).min(EBS_BLOCK_SIZE) as usize;
                if let Some(buf) = data.get_mut(..n)
                    && n > 0
                {
                    src.read_at(buf, at)
                        .with_context(|| format!("cannot read block {index} of the source"))?;
                }
                if tx.blocking_send(Block { index, data }).is_err() {
                    // The uploader stopped; its error is the one to report.
                    break;
                }
            }
            Ok(())
        });
        let upload = rt.block_on(put_blocks(
            client.clone(),
            snapshot_id.to_string(),
            rx,
            opts,
            ledger,
            progress,
            verbose,
        ));
        (feeder.join(), upload)
    });
    let counts = upload?;
    match feed {
        Ok(Ok(())) => Ok(counts),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("the reader thread failed")),
    }
}

/// Blocks queued between the converter and the uploader.
const BLOCK_QUEUE: usize = 8;

/// What StartSnapshot is asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotRequest<'a> {
    /// Volume size in GiB.
    pub volume_gib: u64,
    /// Idempotency token (the job id).
    pub client_token: &'a str,
    /// Snapshot description.
    pub description: Option<&'a str>,
    /// Ask for encryption.
    pub encrypted: bool,
    /// KMS key (implies encryption).
    pub kms_key_arn: Option<&'a str>,
    /// Tags.
    pub tags: &'a [(String, String)],
    /// The snapshot this one is an increment of (StartSnapshot `ParentSnapshotId`): the new snapshot holds
    /// the parent's blocks plus what is put. The parent decides encryption (the API refuses `Encrypted` with a
    /// parent), so `encrypted` must be false.
    pub parent_snapshot_id: Option<&'a str>,
}

/// Starts (or, with the same client token, finds again) a snapshot. Returns its id and whether it is encrypted.
pub async fn start_snapshot(
    client: &aws_sdk_ebs::Client,
    policy: &Policy,
    r: &SnapshotRequest<'_>,
) -> Result<(String, bool)> {
    let SnapshotRequest {
        volume_gib,
        client_token,
        description,
        encrypted,
        kms_key_arn,
        tags,
        parent_snapshot_id,
    } = *r;
    if parent_snapshot_id.is_some() && encrypted {
        bail!(
            "an incremental snapshot takes its encryption from its parent: EBS refuses Encrypted together with \
             ParentSnapshotId"
        );
    }
    if volume_gib > super::EBS_MAX_VOLUME_GIB {
        bail!(
            "the disk needs {volume_gib} GiB; EBS snapshots hold at most {} GiB",
            super::EBS_MAX_VOLUME_GIB
        );
    }
    // An unknown parent is ResourceNotFoundException (DEPENDENCY_RESOURCE_NOT_FOUND): gone, not "not visible yet".
    let policy = &Policy {
        not_found_grace: if parent_snapshot_id.is_some() {
            std::time::Duration::ZERO
        } else {
            policy.not_found_grace
        },
        ..*policy
    };
    let out = retry::with_retry(
        policy,
        "StartSnapshot",
        |_| {},
        || {
            let mut req = client
                .start_snapshot()
                .volume_size(volume_gib as i64)
                .client_token(client_token)
                .timeout(60);
            if let Some(d) = description {
                req = req.description(d);
            }
            if let Some(p) = parent_snapshot_id {
                req = req.parent_snapshot_id(p);
            } else if encrypted || kms_key_arn.is_some() {
                req = req.encrypted(true);
            }
            if let Some(k) = kms_key_arn {
                req = req.kms_key_arn(k);
            }
            for (k, v) in tags {
                req = req.tags(aws_sdk_ebs::types::Tag::builder().key(k).value(v).build());
            }
            req.send()
        },
    )
    .await?;
    let id = out
        .snapshot_id()
        .context("StartSnapshot returned no snapshot id")?
        .to_string();
    // Encryption by default shows up as a KMS key in the reply even when we did not ask for it.
    let enc =
        encrypted || kms_key_arn.is_some() || out.kms_key_arn().is_some_and(|k| !k.is_empty());
    Ok((id, enc))
}

/// Completes the snapshot.
pub async fn complete_snapshot(
    client: &aws_sdk_ebs::Client,
    policy: &Policy,
    snapshot_id: &str,
    changed_blocks: u64,
) -> Result<()> {
    let n = i32::try_from(changed_blocks).context("too many blocks for CompleteSnapshot")?;
    retry::with_retry(
        policy,
        "CompleteSnapshot",
        |_| {},
        || {
            client
                .complete_snapshot()
                .snapshot_id(snapshot_id)
                .changed_blocks_count(n)
                .send()
        },
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Bitmap;

    const B: usize = EBS_BLOCK_SIZE as usize;

    /// Runs `runs` through a writer for a disk of `blocks` blocks and returns the (index, first byte) of every
    /// block handed to the uploader, in order.
    fn feed(
        encrypted: bool,
        blocks: u64,
        skip: Bitmap,
        runs: &[(u64, Option<Vec<u8>>)],
    ) -> Vec<(u64, u8)> {
        let (tx, mut rx) = mpsc::channel(64);
        let mut w = EbsBlockWriter::new(tx, skip, encrypted, blocks);
        for (offset, data) in runs {
            match data {
                Some(d) => w.write_run(&mut NullSink, *offset, Run::Data(d)).unwrap(),
                None => w
                    .write_run(&mut NullSink, *offset, Run::Zero(EBS_BLOCK_SIZE))
                    .unwrap(),
            }
        }
        assert_eq!(w.finish(&mut NullSink).unwrap(), blocks * EBS_BLOCK_SIZE);
        drop(w);
        let mut got = Vec::new();
        while let Ok(b) = rx.try_recv() {
            assert_eq!(b.data.len(), B, "every block is exactly 512 KiB");
            got.push((b.index, b.data[0]));
        }
        got
    }

    #[test]
    fn unencrypted_snapshot_gets_only_data_blocks() {
        let runs = [
            (EBS_BLOCK_SIZE, Some(vec![7u8; B])),
            (2 * EBS_BLOCK_SIZE, None),
            (4 * EBS_BLOCK_SIZE, Some(vec![9u8; 2 * B])),
        ];
        let got = feed(false, 8, Bitmap::new(8), &runs);
        assert_eq!(got, vec![(1, 7), (4, 9), (5, 9)]);
    }

    #[test]
    fn encrypted_snapshot_gets_every_block_zeros_included() {
        // EBS returns random bytes for never-written blocks of an encrypted snapshot: all 8 must be sent,
        // holes and zero runs as zero blocks, in order.
        let runs = [
            (EBS_BLOCK_SIZE, Some(vec![7u8; B])),
            (2 * EBS_BLOCK_SIZE, None),
            (4 * EBS_BLOCK_SIZE, Some(vec![9u8; 2 * B])),
        ];
        let got = feed(true, 8, Bitmap::new(8), &runs);
        assert_eq!(
            got,
            vec![
                (0, 0),
                (1, 7),
                (2, 0),
                (3, 0),
                (4, 9),
                (5, 9),
                (6, 0),
                (7, 0)
            ]
        );
    }

    #[test]
    fn resume_skips_acknowledged_blocks_even_when_encrypted() {
        let mut done = Bitmap::new(4);
        done.set(0);
        done.set(2);
        let got = feed(true, 4, done, &[(2 * EBS_BLOCK_SIZE, Some(vec![5u8; B]))]);
        assert_eq!(got, vec![(1, 0), (3, 0)]);
    }

    #[test]
    fn ranges_become_each_touched_block_once() {
        let b = EBS_BLOCK_SIZE;
        assert_eq!(
            blocks_of_ranges(&[(0, 1), (b - 1, b + 1), (3 * b, 5 * b)], 8).unwrap(),
            vec![0, 1, 3, 4]
        );
        assert!(blocks_of_ranges(&[(2 * b, 3 * b), (0, b)], 8).is_err());
        assert!(blocks_of_ranges(&[(0, 0)], 8).is_err());
        assert!(blocks_of_ranges(&[(7 * b, 8 * b + 1)], 8).is_err());
    }

    #[test]
    fn short_last_block_is_padded_to_512_kib() {
        let got = feed(false, 1, Bitmap::new(1), &[(0, Some(vec![3u8; 4096]))]);
        assert_eq!(got, vec![(0, 3)]);
    }
}
