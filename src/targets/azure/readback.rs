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
