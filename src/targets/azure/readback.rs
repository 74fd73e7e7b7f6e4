//! Reading a managed disk back through a read SAS (`beginGetAccess` with access Read), for `migrate`'s verify
//! stage: the blob's size, its page ranges (Get Page Ranges), and [`PageBlobSource`], the blob's data part as a
//! read-only `DiskSource` whose reads are ranged GETs of at most [`MAX_READ`] bytes each.

use anyhow::{Context, Result, bail};
use azure_core::http::{Transport, Url};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders, HttpRange,
};
use azure_storage_blob::{BlobClient, BlobClientOptions};
use futures::StreamExt as _;
use imgshift_converters::{DiskSource, ExtentKind, ExtentMap, Format, ImageInfo};
use tokio::runtime::Handle;

use super::redact::{redact, url_without_query};
use super::retry::{self, Policy};
use super::{MAX_PUT_PAGE, PAGE};

/// Largest ranged GET: one Put Page window (a read never holds more than this in memory).
pub const MAX_READ: u64 = MAX_PUT_PAGE;
/// Most Get Page Ranges pages followed (a 32 TiB blob of single scattered pages would list in far fewer).
const MAX_LIST_PAGES: usize = 100_000;

/// A page blob behind a read SAS.
pub struct PageBlob {
    rt: Handle,
    /// The client and how many times its SAS was renewed.
    client: std::sync::Mutex<(std::sync::Arc<BlobClient>, u64)>,
    policy: Policy,
    size: u64,
    transport: Transport,
    renew: Option<Renew>,
}

/// Asks for a new read SAS of the same disk (for a copy that outlives its SAS).
pub type Renew = Box<dyn Fn() -> Result<String> + Send + Sync>;

/// A blob client for `sas_url`.
fn blob_client(sas_url: &str, transport: &Transport) -> Result<BlobClient> {
    let url = Url::parse(sas_url).map_err(|_| {
        anyhow::anyhow!(
            "the disk's read SAS URL is not a URL ({})",
            redact(&url_without_query(sas_url))
        )
    })?;
    let opts = BlobClientOptions {
        client_options: super::http::options_no_retry(transport),
        ..BlobClientOptions::default()
    };
    BlobClient::new(url, None, Some(opts)).map_err(|e| {
        anyhow::anyhow!(
            "cannot use the disk's read SAS URL: {}",
            retry::describe(&e)
        )
    })
}

impl PageBlob {
    /// Opens the blob behind `sas_url` and reads its size (Get Blob Properties). Call from outside `rt`.
    pub fn open(
        rt: Handle,
        sas_url: &str,
        transport: &Transport,
        policy: Policy,
    ) -> Result<PageBlob> {
        let client = blob_client(sas_url, transport)?;
        let props = rt.block_on(retry::with_retry(
            &policy,
            "Get Blob Properties",
            |_| {},
            || client.get_properties(None),
        ))?;
        let size = props
            .content_length()
            .map_err(|e| anyhow::anyhow!("bad blob properties: {}", retry::describe(&e)))?
            .context("the blob's properties hold no Content-Length")?;
        Ok(PageBlob {
            rt,
            client: std::sync::Mutex::new((std::sync::Arc::new(client), 0)),
            policy,
            size,
            transport: transport.clone(),
            renew: None,
        })
    }

    /// With `renew`: a read refused because the SAS expired (HTTP 403) asks for a new SAS and is tried again.
    pub fn renewing(mut self, renew: Renew) -> PageBlob {
        self.renew = Some(renew);
        self
    }

    fn client(&self) -> Result<std::sync::Arc<BlobClient>> {
        Ok(self.versioned_client()?.0)
    }

    /// The client and its SAS generation.
    fn versioned_client(&self) -> Result<(std::sync::Arc<BlobClient>, u64)> {
        self.client
            .lock()
            .map(|c| (std::sync::Arc::clone(&c.0), c.1))
            .map_err(|_| anyhow::anyhow!("blob client lock poisoned"))
    }

    /// Replaces the client of SAS generation `seen` with one on a fresh SAS (a reader that finds it already
    /// replaced by another just uses the new one); false when there is no way to renew.
    fn renew(&self, seen: u64) -> Result<bool> {
        let Some(renew) = &self.renew else {
            return Ok(false);
        };
        let mut c = self
            .client
            .lock()
            .map_err(|_| anyhow::anyhow!("blob client lock poisoned"))?;
        if c.1 == seen {
            let sas = renew().context("cannot renew the disk's read SAS")?;
            *c = (
                std::sync::Arc::new(blob_client(&sas, &self.transport)?),
                seen + 1,
            );
        }
        Ok(true)
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The written page ranges, as `[start, end)` byte ranges, sorted and merged where adjacent.
    pub fn page_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let (_, seen) = self.versioned_client()?;
        match self.page_ranges_once() {
            // The SAS expired: a new one, and the listing again (once).
            Err(e) if retry::has_status(&e, 403) && self.renew(seen)? => self.page_ranges_once(),
            r => r,
        }
    }

    fn page_ranges_once(&self) -> Result<Vec<(u64, u64)>> {
        let pbc = self.client()?.page_blob_client();
        self.rt.block_on(async {
            let mut out: Vec<(u64, u64)> = Vec::new();
            let mut pages = pbc
                .list_page_ranges(None)
                .map_err(|e| retry::CallError::new("Get Page Ranges", &e, 1))?;
            let mut n = 0usize;
            while let Some(page) = pages.next().await {
                n += 1;
                if n > MAX_LIST_PAGES {
                    bail!("Get Page Ranges returned more than {MAX_LIST_PAGES} pages");
                }
                let list = page
                    .and_then(|p| p.into_model())
                    .map_err(|e| retry::CallError::new("Get Page Ranges", &e, 1))?;
                for r in list.page_ranges {
                    let (Some(s), Some(e)) = (r.start, r.end) else {
                        bail!("Get Page Ranges returned a range without a start or an end");
                    };
                    let (s, e) = (
                        u64::try_from(s).context("negative page range start")?,
                        u64::try_from(e).context("negative page range end")?,
                    );
                    // `End` is inclusive and the range whole pages.
                    let end = e.checked_add(1).context("page range end overflows")?;
                    if end <= s || !s.is_multiple_of(PAGE) || !end.is_multiple_of(PAGE) {
                        bail!("Get Page Ranges returned a malformed range {s}-{e}");
                    }
                    out.push((s, end));
                }
            }
            out.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
            for (s, e) in out {
                match merged.last_mut() {
                    Some(l) if l.1 >= s => l.1 = l.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            Ok(merged)
        })
    }

    /// Reads `buf.len()` bytes at `offset`, in ranged GETs of at most [`MAX_READ`] bytes.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .with_context(|| {
                format!(
                    "read at {offset} of {} bytes passes the blob's end {}",
                    buf.len(),
                    self.size
                )
            })?;
        let mut at = offset;
        for chunk in buf.chunks_mut(MAX_READ as usize) {
            let len = chunk.len() as u64;
            let what = format!("reading the blob at {at} ({len} bytes)");
            let opts = BlobClientDownloadOptions {
                range: Some(HttpRange::new(at, len)),
                parallel: std::num::NonZero::new(1),
                ..BlobClientDownloadOptions::default()
            };
            let attempt = |client: std::sync::Arc<BlobClient>| {
                self.rt.block_on(retry::with_retry(
                    &self.policy,
                    &what,
                    |_| {},
                    || async {
                        let r = client.download(Some(opts.clone())).await?;
                        r.body.collect().await
                    },
                ))
            };
            let (client, seen) = self.versioned_client()?;
            let data = match attempt(client) {
                // The SAS expired during a long copy: a new one, and the same read again (once).
                Err(e) if retry::has_status(&e, 403) && self.renew(seen)? => {
                    attempt(self.client()?)?
                }
                r => r?,
            };
            if data.len() as u64 != len {
                bail!("{what}: got {} bytes", data.len());
            }
            chunk.copy_from_slice(&data);
            at += len;
        }
        debug_assert_eq!(at, end);
        Ok(())
    }
}

/// The first `data_size` bytes of a page blob as a read-only disk (the fixed VHD's data part, footer excluded).
/// Reads go to the blob; the map is the written page ranges.
pub struct PageBlobSource {
    blob: PageBlob,
    data_size: u64,
    ranges: Vec<(u64, u64)>,
}

impl PageBlobSource {
    /// The data part of `blob`: its first `data_size` bytes, with `ranges` from [`PageBlob::page_ranges`].
    pub fn new(blob: PageBlob, data_size: u64, ranges: Vec<(u64, u64)>) -> Result<PageBlobSource> {
        if data_size > blob.size() {
            bail!(
                "the blob holds {} bytes, less than the disk's {data_size}",
                blob.size()
            );
        }
        Ok(PageBlobSource {
            blob,
            data_size,
            ranges,
        })
    }
}

impl DiskSource for PageBlobSource {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.data_size
    }

    fn extents(&self, offset: u64, len: u64) -> imgshift_converters::Result<ExtentMap> {
        imgshift_converters::source::check_range(self.data_size, offset, len)?;
        let first = self.ranges.partition_point(|r| r.1 <= offset);
        crate::targets::extents_from_ranges(self.ranges[first..].iter().copied(), offset, len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        imgshift_converters::source::check_range(self.data_size, offset, buf.len() as u64)?;
        self.blob
            .read(buf, offset)
            .map_err(crate::targets::read_back_error)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.data_size,
            ..ImageInfo::default()
        }
    }
}

/// Checks that every written range lies in a window of `map` that holds data, or is the footer page at
/// `data_size`; returns the bytes listed before the footer. `ranges` are `[start, end)`, sorted.
pub fn check_ranges(ranges: &[(u64, u64)], map: &ExtentMap, data_size: u64) -> Result<u64> {
    let windows = data_windows(map);
    let has_data = |w: u64| {
        let i = windows.partition_point(|r| r.1 <= w);
        windows.get(i).is_some_and(|r| r.0 <= w)
    };
    let footer = (data_size, data_size + super::FOOTER);
    let mut listed = 0u64;
    let mut saw_footer = false;
    for &(s, e) in ranges {
        // The footer page may be listed merged with data that ends at the data part's end.
        let (s, e, with_footer) = if e == footer.1 && s <= footer.0 {
            (s, footer.0, true)
        } else {
            (s, e, false)
        };
        saw_footer |= with_footer;
        if e > data_size {
            bail!(
                "a page range {s}-{} lies past the disk's data part ({data_size} bytes)",
                e - 1
            );
        }
        if s < e {
            for w in s / MAX_PUT_PAGE..=(e - 1) / MAX_PUT_PAGE {
                if !has_data(w) {
                    bail!(
                        "page range {s}-{} writes window {w} (bytes {}-{}), where the source has no data",
                        e - 1,
                        w * MAX_PUT_PAGE,
                        (w + 1) * MAX_PUT_PAGE - 1
                    );
                }
            }
            listed += e - s;
        }
    }
    if !saw_footer {
        bail!("the footer page at {data_size} is not written");
    }
    Ok(listed)
}

/// The 4 MiB windows that hold some of `map`'s data, as sorted `[first, last+1)` window ranges.
fn data_windows(map: &ExtentMap) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map
        .iter()
        .filter(|e| e.kind == ExtentKind::Data && e.len > 0)
    {
        let (a, b) = (
            e.start / MAX_PUT_PAGE,
            (e.start + e.len - 1) / MAX_PUT_PAGE + 1,
        );
        match out.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = MAX_PUT_PAGE;

    fn map(pieces: &[(u64, u64, ExtentKind)]) -> ExtentMap {
        let mut m = ExtentMap::new();
        for &(s, l, k) in pieces {
            m.push(s, l, k).unwrap();
        }
        m
    }

    #[test]
    fn ranges_inside_data_windows_pass() {
        let size = 5 * W;
        let m = map(&[
            (0, 4096, ExtentKind::Data),
            (4096, 2 * W - 4096, ExtentKind::Zero),
            (2 * W, W + 512, ExtentKind::Data),
            (3 * W + 512, 2 * W - 512, ExtentKind::Zero),
        ]);
        let r = [(0, 4096), (2 * W, 3 * W + 512), (size, size + 512)];
        assert_eq!(check_ranges(&r, &m, size).unwrap(), 4096 + W + 512);
        // Merged with the footer when the data reaches the end.
        let m2 = map(&[(0, size, ExtentKind::Data)]);
        assert_eq!(check_ranges(&[(0, size + 512)], &m2, size).unwrap(), size);
    }

    #[test]
    fn rejects_ranges_outside_data_windows() {
        let size = 5 * W;
        let m = map(&[
            (0, 4096, ExtentKind::Data),
            (4096, size - 4096, ExtentKind::Zero),
        ]);
        let e = check_ranges(&[(0, 4096), (W, W + 512), (size, size + 512)], &m, size)
            .unwrap_err()
            .to_string();
        assert!(e.contains("window 1"), "{e}");
    }

    #[test]
    fn rejects_a_missing_footer_and_ranges_past_the_end() {
        let size = 5 * W;
        let m = map(&[(0, size, ExtentKind::Data)]);
        assert!(check_ranges(&[(0, 4096)], &m, size).is_err());
        assert!(check_ranges(&[(0, 4096), (size, size + 1024)], &m, size).is_err());
    }
}

// ---- the managed-disk page-range diff (replicate, issue 23) ----
//
// Get Page Ranges with the header `x-ms-previous-snapshot-url` ("GetManagedDiskPageRangesDiff", REST reference:
// https://learn.microsoft.com/rest/api/storageservices/get-page-ranges): on a managed disk's incremental snapshot,
// the pages that differ from an earlier snapshot of the same disk — `PageRange` for pages written since, `ClearRange`
// for pages cleared since (`Start`/`End` inclusive byte offsets, whole 512-byte pages), paged by `NextMarker`. The
// SDK offers no call for it, so it is one GET per page here. Azurite does not implement it (Azure/Azurite#812): it
// is tested against tests/standins/fake_blob_diff.py, which follows the reference.

/// Service version sent with the diff (the header exists since 2019-07-07; paging since 2020-10-02).
const DIFF_VERSION: &str = "2025-01-05";
/// Largest diff page accepted (a page lists at most a few thousand ranges).
const MAX_DIFF_PAGE_BYTES: usize = 16 << 20;

/// What changed between two snapshots of one managed disk, as byte ranges of the newer one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageDiff {
    /// Pages written since the previous snapshot (`PageRange`): read them from the newer snapshot.
    pub changed: Vec<(u64, u64)>,
    /// Pages cleared since (`ClearRange`): they read as zeros now.
    pub cleared: Vec<(u64, u64)>,
}

impl PageDiff {
    /// Changed and cleared ranges together, sorted and merged: every byte a replica must rewrite.
    #[allow(dead_code)] // called by `replicate` (issue 23)
    pub fn all(&self) -> Vec<(u64, u64)> {
        merge_ranges(self.changed.iter().chain(&self.cleared).copied().collect())
    }
}

/// Why the diff gave no answer. [`PageDiffError::can_hash_instead`] says when a caller may compare hashes
/// instead.
#[derive(Debug, thiserror::Error)]
pub enum PageDiffError {
    /// The service will not diff against that snapshot (not of the same disk, deleted, newer, not incremental:
    /// codes PreviousSnapshotNotFound, PreviousSnapshotCannotBeNewer, PreviousSnapshotOperationNotSupported,
    /// BlobOverwritten...).
    #[error("the page-range diff against the previous snapshot is refused: {code} (HTTP {status})")]
    NoDiff {
        /// The service's error code (`x-ms-error-code`).
        code: String,
        /// The HTTP status.
        status: u16,
    },
    /// Anything else: a fault to report (access, network, a reply that makes no sense).
    #[error("cannot list the pages changed since the previous snapshot")]
    Failed(#[source] anyhow::Error),
}

impl PageDiffError {
    /// Whether the service cannot diff these snapshots, so hashing may replace the diff.
    #[allow(dead_code)] // called by `replicate` (issue 23)
    pub fn can_hash_instead(&self) -> bool {
        matches!(self, PageDiffError::NoDiff { .. })
    }
}

/// The pages of `snapshot_sas` (a read SAS URL of a managed disk's snapshot) that differ from
/// `previous_snapshot_url` (a read SAS URL of an earlier snapshot of the same disk), every page of the listing
/// followed. `client` is [`super::http::client`]'s.
#[allow(dead_code)] // called by `replicate` (issue 23)
pub async fn changed_ranges(
    client: &reqwest::Client,
    policy: &Policy,
    snapshot_sas: &str,
    previous_snapshot_url: &str,
) -> std::result::Result<PageDiff, PageDiffError> {
    let fail = |e: anyhow::Error| PageDiffError::Failed(e);
    let base = reqwest::Url::parse(snapshot_sas).map_err(|_| {
        fail(anyhow::anyhow!(
            "the snapshot's SAS URL is not a URL ({})",
            redact(&url_without_query(snapshot_sas))
        ))
    })?;
    let mut diff = PageDiff::default();
    let mut marker: Option<String> = None;
    for _ in 0..MAX_LIST_PAGES {
        let mut url = base.clone();
        url.query_pairs_mut().append_pair("comp", "pagelist");
        if let Some(m) = &marker {
            url.query_pairs_mut().append_pair("marker", m);
        }
        let mut attempt = 0u32;
        let body = loop {
            attempt += 1;
            let r = client
                .get(url.clone())
                .header("x-ms-version", DIFF_VERSION)
                .header("x-ms-previous-snapshot-url", previous_snapshot_url)
                .send()
                .await;
            let resp = match r {
                Ok(resp) => resp,
                Err(e) if attempt < policy.max_attempts => {
                    let _ = e;
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(fail(anyhow::anyhow!(
                        "Get Page Ranges (diff) failed after {attempt} attempts: {}",
                        redact(&e.without_url().to_string())
                    )));
                }
            };
            let status = resp.status().as_u16();
            if status == 200 {
                break read_capped(resp).await.map_err(fail)?;
            }
            let code = resp
                .headers()
                .get("x-ms-error-code")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            match retry::classify_status(status) {
                retry::Class::Retry | retry::Class::Throttle if attempt < policy.max_attempts => {
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    continue;
                }
                _ => {}
            }
            if code.starts_with("PreviousSnapshot") || code == "BlobOverwritten" {
                return Err(PageDiffError::NoDiff { code, status });
            }
            return Err(fail(anyhow::anyhow!(
                "Get Page Ranges (diff) answered HTTP {status} {}",
                if code.is_empty() {
                    "without an error code".to_string()
                } else {
                    code
                }
            )));
        };
        let next = parse_page_list(&body, &mut diff).map_err(fail)?;
        match next {
            Some(m) if Some(&m) != marker.as_ref() => marker = Some(m),
            Some(_) => {
                return Err(fail(anyhow::anyhow!(
                    "Get Page Ranges (diff) repeated its continuation marker"
                )));
            }
            None => {
                diff.changed = merge_ranges(std::mem::take(&mut diff.changed));
                diff.cleared = merge_ranges(std::mem::take(&mut diff.cleared));
                return Ok(diff);
            }
        }
    }
    Err(fail(anyhow::anyhow!(
        "Get Page Ranges (diff) returned more than {MAX_LIST_PAGES} pages"
    )))
}

/// The body, refused beyond [`MAX_DIFF_PAGE_BYTES`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| anyhow::anyhow!("reading the page-range diff: {}", e.without_url()))?
    {
        if out.len() + chunk.len() > MAX_DIFF_PAGE_BYTES {
            bail!("the page-range diff reply is larger than {MAX_DIFF_PAGE_BYTES} bytes");
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Adds one `PageList` page's `PageRange`/`ClearRange` elements to `diff`; returns its `NextMarker`, if any.
fn parse_page_list(xml: &[u8], diff: &mut PageDiff) -> Result<Option<String>> {
    use quick_xml::events::Event;
    let text = std::str::from_utf8(xml).context("the page-range diff is not UTF-8")?;
    let mut r = quick_xml::Reader::from_str(text);
    // (element: PageRange or ClearRange, start, end) being read; the text element open.
    let mut range: Option<(bool, Option<u64>, Option<u64>)> = None;
    let mut field: Option<&'static str> = None;
    let mut marker = None;
    loop {
        match r
            .read_event()
            .map_err(|e| anyhow::anyhow!("the page-range diff is not XML: {e}"))?
        {
            Event::Start(e) => match e.name().as_ref() {
                b"PageRange" => range = Some((false, None, None)),
                b"ClearRange" => range = Some((true, None, None)),
                b"Start" => field = Some("start"),
                b"End" => field = Some("end"),
                b"NextMarker" => field = Some("marker"),
                _ => field = None,
            },
            Event::Text(t) => {
                let v = t
                    .decode()
                    .map_err(|e| anyhow::anyhow!("bad text in the page-range diff: {e}"))?;
                let v = v.trim();
                match (field, range.as_mut()) {
                    (Some("marker"), _) if !v.is_empty() => marker = Some(v.to_string()),
                    (Some("start"), Some(rg)) => {
                        rg.1 = Some(v.parse().context("a range Start is not a number")?)
                    }
                    (Some("end"), Some(rg)) => {
                        rg.2 = Some(v.parse().context("a range End is not a number")?)
                    }
                    _ => {}
                }
            }
            Event::End(e) => match e.name().as_ref() {
                b"PageRange" | b"ClearRange" => {
                    let Some((clear, Some(s), Some(end))) = range.take() else {
                        bail!("the page-range diff has a range without Start or End");
                    };
                    // `End` is inclusive and ranges are whole pages.
                    let end = end.checked_add(1).context("a diff range end overflows")?;
                    if end <= s || !s.is_multiple_of(PAGE) || !end.is_multiple_of(PAGE) {
                        bail!(
                            "the page-range diff holds a malformed range {s}-{}",
                            end - 1
                        );
                    }
                    if clear {
                        diff.cleared.push((s, end));
                    } else {
                        diff.changed.push((s, end));
                    }
                }
                _ => field = None,
            },
            Event::Eof => break,
            _ => {}
        }
        if diff.changed.len() + diff.cleared.len() > MAX_DIFF_RANGES {
            bail!("the page-range diff lists more than {MAX_DIFF_RANGES} ranges");
        }
    }
    Ok(marker)
}

/// Most ranges accepted in one diff (a 32 TiB disk changed in every other page would list far more, but no
/// replica run is that; beyond this, hashing is the cheaper way).
const MAX_DIFF_RANGES: usize = 16_000_000;

/// Sorts and merges overlapping or adjacent ranges.
fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod diff_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_diff_page_parses_into_changed_and_cleared_ranges() {
        let xml = br#"<?xml version="1.0" encoding="utf-8"?><PageList><PageRange><Start>0</Start><End>511</End></PageRange><ClearRange><Start>1024</Start><End>2047</End></ClearRange><PageRange><Start>512</Start><End>1023</End></PageRange><NextMarker>abc</NextMarker></PageList>"#;
        let mut d = PageDiff::default();
        assert_eq!(parse_page_list(xml, &mut d).unwrap(), Some("abc".into()));
        assert_eq!(d.changed, vec![(0, 512), (512, 1024)]);
        assert_eq!(d.cleared, vec![(1024, 2048)]);
        assert_eq!(d.all(), vec![(0, 2048)]);
        let mut d = PageDiff::default();
        assert_eq!(
            parse_page_list(b"<PageList><NextMarker/></PageList>", &mut d).unwrap(),
            None
        );
    }

    #[test]
    fn malformed_diff_ranges_are_refused() {
        for bad in [
            &b"<PageList><PageRange><Start>1</Start><End>511</End></PageRange></PageList>"[..],
            b"<PageList><PageRange><Start>512</Start><End>511</End></PageRange></PageList>",
            b"<PageList><ClearRange><Start>0</Start></ClearRange></PageList>",
            b"<PageList><PageRange><Start>x</Start><End>511</End></PageRange></PageList>",
            b"<PageList><PageRange><Start>0</Start><End>18446744073709551615</End></PageRange></PageList>",
        ] {
            assert!(parse_page_list(bad, &mut PageDiff::default()).is_err());
        }
    }
}

/// [`changed_ranges`] against Azurite behind tests/standins/fake_blob_diff.py (Azurite does not implement the
/// diff, Azure/Azurite#812; the fake follows the Get Page Ranges REST reference). Fails, saying how to start it,
/// when Azurite is not reachable.
#[cfg(test)]
mod diff_standin_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::io::BufRead as _;
    use std::path::Path;
    use std::process::{Command, Stdio};

    use super::*;

    fn azurite_url() -> String {
        let url = std::env::var("IMGSHIFT_AZURITE_URL").ok().or_else(|| {
            let dir = std::env::var("IMGSHIFT_STANDIN_DIR")
                .unwrap_or_else(|_| "/var/tmp/imgshift-standins".into());
            let env = std::fs::read_to_string(Path::new(&dir).join("standins.env")).ok()?;
            env.lines()
                .find_map(|l| l.strip_prefix("IMGSHIFT_AZURITE_URL=").map(str::to_string))
        });
        let url = url.expect(
            "Azurite's address is unknown: start the stand-ins with `bash .ci/standins start` (or set IMGSHIFT_AZURITE_URL)",
        );
        let host = url.trim_start_matches("http://").trim_end_matches('/');
        assert!(
            std::net::TcpStream::connect(host).is_ok(),
            "Azurite is not answering at {url}: start the stand-ins with `bash .ci/standins start`"
        );
        url
    }

    fn standin(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/standins")
            .join(name)
    }

    fn fake_arm(args: &[&str]) -> String {
        let o = Command::new("python3")
            .arg(standin("fake_arm.py"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    struct Front(std::process::Child, u16);
    impl Drop for Front {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn front(azurite: &str, log: &Path, extra: &[&str]) -> Front {
        let mut c = Command::new("python3")
            .arg(standin("fake_blob_diff.py"))
            .args(["--upstream", azurite, "--log", log.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap();
        Front(c, port)
    }

    #[test]
    fn the_diff_lists_written_and_cleared_pages_across_pages_and_refuses_another_disks_snapshot() {
        let az = azurite_url();
        let dir = tempfile::tempdir().unwrap();
        let c = format!("diff{}x{}", std::process::id(), rand::random::<u32>());
        let size = (64 << 10).to_string();
        let blob = |n: &str, lineage: &str, pages: &[(u64, u8)]| {
            let b = format!("{c}/{n}.vhd");
            fake_arm(&[
                "create-blob",
                &b,
                &size,
                "--lineage",
                lineage,
                "--azurite",
                &az,
            ]);
            for (off, byte) in pages {
                fake_arm(&[
                    "put-page",
                    &b,
                    &off.to_string(),
                    &byte.to_string(),
                    "--azurite",
                    &az,
                ]);
            }
            b
        };
        // Previous: pages 0, 512, 4096, 8192. Now: 0 the same, 512 rewritten, 4096 cleared, 8192 the same,
        // 12288 new.
        let prev = blob("prev", "disk1", &[(0, 1), (512, 2), (4096, 3), (8192, 4)]);
        let cur = blob("cur", "disk1", &[(0, 1), (512, 9), (8192, 4), (12288, 5)]);
        let other = blob("other", "disk2", &[(0, 1)]);
        let log = dir.path().join("diff.jsonl");
        // One range per response: the listing takes three pages, followed by NextMarker.
        let f = front(&az, &log, &["--page-items", "1"]);
        let base = format!("http://127.0.0.1:{}", f.1);
        let sas = |b: &str| fake_arm(&["sas", b, "--base", &base]);
        let rt = crate::targets::runtime().unwrap();
        let client = reqwest::Client::new();
        let policy = Policy::default();
        let d = rt
            .block_on(changed_ranges(&client, &policy, &sas(&cur), &sas(&prev)))
            .unwrap();
        assert_eq!(d.changed, vec![(512, 1024), (12288, 12800)]);
        assert_eq!(d.cleared, vec![(4096, 4608)]);
        assert_eq!(d.all(), vec![(512, 1024), (4096, 4608), (12288, 12800)]);
        let answered = std::fs::read_to_string(&log).unwrap().lines().count();
        assert_eq!(answered, 3, "one request per page");

        // A snapshot of another disk: a typed refusal that lets the caller hash instead.
        let e = rt
            .block_on(changed_ranges(&client, &policy, &sas(&cur), &sas(&other)))
            .unwrap_err();
        assert!(
            matches!(&e, PageDiffError::NoDiff { code, status: 409 } if code == "PreviousSnapshotNotFound"),
            "{e:?}"
        );
        assert!(e.can_hash_instead());
    }
}
