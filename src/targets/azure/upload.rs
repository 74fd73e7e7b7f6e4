//! The page uploader: Put Page requests for the pieces `PageSink` produces, many windows in flight, each request
//! retried with capped, jittered backoff (throttling halves the windows in flight), acknowledged windows recorded
//! in the job journal. The footer goes last, after every window was acknowledged. [`stream_disk`] is one disk's
//! whole transfer (engine → fixed VHD → pieces → Put Page), shared by `upload azure` and `migrate --to azure`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use azure_core::http::{Transport, Url};
use azure_storage_blob::models::HttpRange;
use azure_storage_blob::{PageBlobClient, PageBlobClientOptions};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::targets::limiter::Limiter;
use imgshift_converters::{ConvertOptions, DiskSource, ExtentMap, NoProgress, engine};

use super::pages::{Page, PageSink, Piece, slot_count};
use super::redact::{redact, url_without_query};
use super::retry::{self, Class, Policy};
use super::vhd::AzureVhdWriter;
use crate::journal::Ledger;

/// How often acknowledged windows are written to the journal (a kill loses at most this much work).
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Fewest windows in flight after throttling.
const MIN_IN_FLIGHT: usize = 2;
/// Successes needed before one more window may be in flight again.
const RAMP_UP_EVERY: u64 = 32;

/// Counters of one upload run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counts {
    /// Put Page requests that succeeded.
    pub requests: u64,
    /// Bytes sent in successful requests (footer included).
    pub bytes_sent: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Of those, throttling replies (429, 503).
    pub throttled: u64,
}

/// The page blob client for a SAS URL (the SAS is the credential; azure_core's retries are off, we retry).
pub fn blob_client(sas_url: &str, transport: &Transport) -> Result<PageBlobClient> {
    let url = Url::parse(sas_url).map_err(|_| {
        anyhow::anyhow!(
            "the disk's SAS URL is not a URL ({})",
            redact(&url_without_query(sas_url))
        )
    })?;
    let opts = PageBlobClientOptions {
        client_options: super::http::options_no_retry(transport),
        ..PageBlobClientOptions::default()
    };
    PageBlobClient::new(url, None, Some(opts))
        .map_err(|e| anyhow::anyhow!("cannot use the disk's SAS URL: {}", retry::describe(&e)))
}

/// Shared state of the running tasks.
struct Shared {
    client: PageBlobClient,
    policy: Policy,
    limiter: Arc<Limiter>,
    retries: AtomicU64,
    throttled: AtomicU64,
}

impl Shared {
    fn on_class(&self, c: Class) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if c == Class::Throttle {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            self.limiter.throttled();
        }
    }

    fn on_success(&self) {
        self.limiter.succeeded();
    }

    /// One Put Page, retried.
    async fn put(&self, page: Page) -> Result<u64> {
        let len = page.data.len() as u64;
        let data = bytes::Bytes::from(page.data);
        let what = format!("Put Page at {} ({len} bytes)", page.offset);
        retry::with_retry(
            &self.policy,
            &what,
            |c| self.on_class(c),
            || {
                self.client.upload_pages(
                    data.clone().into(),
                    len,
                    HttpRange::new(page.offset, len),
                    None,
                )
            },
        )
        .await?;
        self.on_success();
        Ok(len)
    }
}

/// Uploads every piece from `rx`, recording acknowledged windows in `journal`.
pub async fn put_pages(
    client: PageBlobClient,
    mut rx: mpsc::Receiver<Piece>,
    concurrency: usize,
    policy: Policy,
    ledger: Ledger,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Counts> {
    let sh = Arc::new(Shared {
        client,
        policy,
        limiter: Limiter::new(concurrency, MIN_IN_FLIGHT, RAMP_UP_EVERY),
        retries: AtomicU64::new(0),
        throttled: AtomicU64::new(0),
    });
    let mut tasks: JoinSet<Result<(u64, u64, u64)>> = JoinSet::new();
    let mut counts = Counts::default();
    let mut last_save = std::time::Instant::now();
    let mut done = |r: Result<Result<(u64, u64, u64)>, tokio::task::JoinError>,
                    counts: &mut Counts,
                    force_save: bool|
     -> Result<()> {
        let (slot, reqs, bytes) = r.context("an upload task failed")??;
        counts.requests += reqs;
        counts.bytes_sent += bytes;
        progress(bytes);
        let save = force_save || last_save.elapsed() >= SAVE_EVERY;
        ledger.mark(slot, save)?;
        if save {
            last_save = std::time::Instant::now();
            crate::journal::pause_point("upload-saved");
        }
        Ok(())
    };

    let result: Result<()> = async {
        while let Some(piece) = rx.recv().await {
            // Ctrl-C or SIGTERM: send nothing more; what is in flight finishes and is kept.
            if let Err(i) = crate::interrupt::check() {
                while let Some(r) = tasks.join_next().await {
                    done(r, &mut counts, false)?;
                }
                return Err(i.into());
            }
            match piece {
                Piece::Window { slot, pages } => {
                    let permit = sh.limiter.acquire().await?;
                    let sh2 = sh.clone();
                    tasks.spawn(async move {
                        let mut reqs = 0;
                        let mut bytes = 0;
                        for p in pages {
                            bytes += sh2.put(p).await?;
                            reqs += 1;
                        }
                        drop(permit);
                        Ok((slot, reqs, bytes))
                    });
                }
                Piece::Footer { slot, page } => {
                    // Footer last: only once every window is acknowledged.
                    while let Some(r) = tasks.join_next().await {
                        done(r, &mut counts, false)?;
                    }
                    let n = sh.put(page).await?;
                    done(Ok(Ok((slot, 1, n))), &mut counts, true)?;
                }
            }
            while let Some(r) = tasks.try_join_next() {
                done(r, &mut counts, false)?;
            }
        }
        while let Some(r) = tasks.join_next().await {
            done(r, &mut counts, false)?;
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        tasks.abort_all();
    }
    // Whatever happened, keep what was acknowledged.
    ledger.save()?;
    result?;
    counts.retries = sh.retries.load(Ordering::Relaxed);
    counts.throttled = sh.throttled.load(Ordering::Relaxed);
    Ok(counts)
}

/// The `se=` (expiry) field of a SAS URL: not a secret, fit for a journal or a resume message.
pub fn sas_expiry(sas: &str) -> Option<String> {
    let url = Url::parse(sas).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == "se")
        .map(|(_, v)| v.into_owned())
}

/// One disk's data transfer: the source, its map and where the pieces go.
pub struct DiskStream<'a> {
    /// The source disk.
    pub src: &'a dyn DiskSource,
    /// Its extent map.
    pub map: &'a ExtentMap,
    /// What the source is called in errors.
    pub src_name: &'a str,
    /// The fixed VHD's data part ([`super::disk_data_size`]).
    pub data_size: u64,
    /// Windows in flight.
    pub concurrency: usize,
    /// Retry policy per Put Page.
    pub policy: Policy,
    /// Acknowledged windows: those set are not sent again; new ones are recorded.
    pub ledger: Ledger,
    /// Called with the bytes of every acknowledged request.
    pub progress: Arc<dyn Fn(u64) + Send + Sync>,
}

/// Streams `d.src` as a fixed VHD into the page blob behind `client` (a write SAS): the engine feeds a
/// [`PageSink`] on a reader thread while [`put_pages`] sends its pieces on `rt`. On success every slot of the
/// ledger is set (windows without data are never sent, yet are done) and saved. The caller revokes the SAS.
pub fn stream_disk(
    rt: &tokio::runtime::Runtime,
    client: PageBlobClient,
    d: DiskStream<'_>,
) -> Result<Counts> {
    let slots = slot_count(d.data_size);
    let skip = d.ledger.bitmap()?;
    let (tx, rx) = mpsc::channel(d.concurrency.max(2));
    let mut sink = PageSink::new(tx, d.data_size, skip);
    let mut writer = AzureVhdWriter::new().context("cannot set up the fixed-VHD writer")?;
    let (feed, up) = std::thread::scope(|s| {
        let feeder = s.spawn(|| {
            let r = engine::convert_with_map(
                d.src,
                d.map,
                &mut writer,
                &mut sink,
                &ConvertOptions::default(),
                &NoProgress,
            );
            drop(sink);
            r
        });
        let up = rt.block_on(put_pages(
            client,
            rx,
            d.concurrency,
            d.policy,
            d.ledger.clone(),
            d.progress.clone(),
        ));
        (feeder.join(), up)
    });
    let counts = match (up, feed) {
        (Err(e), _) => return Err(e),
        (Ok(_), Ok(Err(e))) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read {}", d.src_name)));
        }
        (Ok(_), Err(_)) => bail!("the reader thread of {} failed", d.src_name),
        (Ok(c), Ok(Ok(_))) => c,
    };
    // Windows with no data are never sent; mark them done now that the footer is acknowledged.
    if d.ledger.bitmap()?.count() != slots {
        for i in 0..slots {
            d.ledger.mark(i, false)?;
        }
        d.ledger.save()?;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_expiry_is_read_without_the_signature() {
        assert_eq!(
            sas_expiry("https://a/b/c?sv=1&se=2026-11-23T05%3A00%3A00Z&sig=secret").as_deref(),
            Some("2026-11-23T05:00:00Z")
        );
        assert_eq!(sas_expiry("https://a/b"), None);
        // Every percent-escape is decoded, and a signature holding %2F and %2B does not disturb the parse.
        assert_eq!(
            sas_expiry("https://a/b/c?sig=ab%2Fcd%2Bef%3D&se=2026-11-23T05%3a00%3A00Z&sp=rw")
                .as_deref(),
            Some("2026-11-23T05:00:00Z")
        );
        assert_eq!(
            sas_expiry("https://a/b/c?se=2026-01-01T00%3A00%3A00%2B01%3A00&sig=x").as_deref(),
            Some("2026-01-01T00:00:00+01:00")
        );
    }
}
