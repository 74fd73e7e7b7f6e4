//! [`VolumeSink`]: the converter engine's output, in file order, sent into a volume over one libvirt upload
//! stream (`REMOTE_PROC_STORAGE_VOL_UPLOAD` with `VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM`).
//!
//! Holes are sent as holes: a gap of at least [`HOLE_MIN`] between two pieces of output (and at the end) goes
//! over the connection as one stream-hole message, whatever its length. The daemon makes it read as zeros: in
//! a file volume (dir, fs, netfs pools) it seeks past it and leaves it unallocated; on a block device (logical,
//! disk, iSCSI pools) it writes the zeros itself. Shorter gaps are sent as zeros.
//!
//! A fresh qcow2 volume starts as libvirt's own qcow2 header; output shorter than that header is followed by
//! zeros up to its end, so nothing of libvirt's header survives past the output.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imgshift_converters::{Error as ConvError, Sink};

use super::msg;
use super::rpc::api::SPARSE_STREAM;
use super::rpc::stream::Upload;
use super::rpc::{Error as RpcError, StorageVol};

/// A gap at least this long is sent as a hole; shorter ones as zeros (a hole message costs the daemon a seek,
/// and a filesystem allocates whole blocks anyway).
pub const HOLE_MIN: u64 = 64 * 1024;
/// Largest piece of zeros sent at once.
const ZERO_CHUNK: usize = 256 * 1024;

/// What a [`VolumeSink`] sent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SentCounts {
    /// Bytes sent as stream data (output and zero fill).
    pub bytes_sent: u64,
    /// Zero bytes sent to fill gaps shorter than [`HOLE_MIN`] (and the rest of libvirt's qcow2 header).
    pub zero_fill_bytes: u64,
    /// Bytes of the gaps sent as holes (never crossing the connection as data).
    pub skipped_bytes: u64,
    /// Hole messages sent.
    pub holes: u64,
    /// Upload streams opened (one per volume).
    pub streams: u64,
}

/// What to do with a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gap {
    Nothing,
    Zeros(u64),
    Hole(u64),
}

fn gap(n: u64) -> Gap {
    match n {
        0 => Gap::Nothing,
        n if n >= HOLE_MIN => Gap::Hole(n),
        n => Gap::Zeros(n),
    }
}

/// At the end, at `pos`, of output `len` long: the gap up to `len`, then zeros up to `min_end`.
fn finish_plan(pos: u64, len: u64, min_end: u64) -> (Gap, u64) {
    let tail = gap(len.saturating_sub(pos));
    let end = pos.max(len);
    (tail, min_end.saturating_sub(end))
}

/// Feeds a writer's output, in increasing offsets, into a freshly created volume.
pub struct VolumeSink {
    vol: StorageVol,
    stream: Option<Upload>,
    pos: u64,
    /// `finish` makes sure everything below this offset was written (zeros after the output's end).
    min_end: u64,
    /// Set from outside (Ctrl-C) to make the next write fail, so the caller's clean-up runs.
    cancel: Option<Arc<AtomicBool>>,
    /// What was sent.
    pub sent: SentCounts,
}

fn lv_err(what: &str, e: &RpcError) -> ConvError {
    ConvError::io_plain(what, std::io::Error::other(msg(e)))
}

impl VolumeSink {
    /// A sink writing `vol` from offset 0. `min_end`: bytes below this are overwritten even past the output's
    /// end (the length of libvirt's qcow2 header in a fresh qcow2 volume; 0 otherwise).
    pub fn new(vol: &StorageVol, min_end: u64) -> VolumeSink {
        VolumeSink {
            vol: vol.clone(),
            stream: None,
            pos: 0,
            min_end,
            cancel: None,
            sent: SentCounts::default(),
        }
    }

    /// Makes every write fail once `flag` is set.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> VolumeSink {
        self.cancel = Some(flag);
        self
    }

    fn check_cancel(&self) -> imgshift_converters::Result<()> {
        match &self.cancel {
            Some(f) if f.load(Ordering::Relaxed) => Err(ConvError::io_plain(
                "interrupted",
                std::io::Error::new(std::io::ErrorKind::Interrupted, "Ctrl-C or SIGTERM"),
            )),
            _ => Ok(()),
        }
    }

    fn stream(&mut self) -> imgshift_converters::Result<&mut Upload> {
        if self.stream.is_none() {
            // Length 0: up to the end of the volume.
            let s = self
                .vol
                .upload(0, 0, SPARSE_STREAM)
                .map_err(|e| lv_err("cannot start the upload", &e))?;
            self.sent.streams += 1;
            self.stream = Some(s);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| ConvError::input("internal error: no stream"))
    }

    fn send(&mut self, data: &[u8]) -> imgshift_converters::Result<()> {
        self.stream()?
            .send(data)
            .map_err(|e| lv_err("cannot send to the volume", &e))?;
        self.pos += data.len() as u64;
        self.sent.bytes_sent += data.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> imgshift_converters::Result<()> {
        static ZERO: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
        self.sent.zero_fill_bytes += n;
        while n > 0 {
            let k = usize::try_from(n).map_or(ZERO.len(), |n| n.min(ZERO.len()));
            self.send(ZERO.get(..k).unwrap_or_default())?;
            n -= k as u64;
        }
        Ok(())
    }

    fn hole(&mut self, n: u64) -> imgshift_converters::Result<()> {
        self.stream()?
            .send_hole(n)
            .map_err(|e| lv_err("cannot send a hole to the volume", &e))?;
        self.pos += n;
        self.sent.skipped_bytes += n;
        self.sent.holes += 1;
        Ok(())
    }

    fn fill(&mut self, g: Gap) -> imgshift_converters::Result<()> {
        match g {
            Gap::Nothing => Ok(()),
            Gap::Zeros(n) => self.zeros(n),
            Gap::Hole(n) => self.hole(n),
        }
    }

    /// Aborts the stream in progress (after a failure); the daemon stops writing.
    pub fn abort(&mut self) {
        if let Some(s) = self.stream.take() {
            s.abort();
        }
    }
}

impl Sink for VolumeSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> imgshift_converters::Result<()> {
        self.check_cancel()?;
        if offset < self.pos {
            return Err(ConvError::input(format!(
                "internal error: volume stream went back from {} to {offset}",
                self.pos
            )));
        }
        self.fill(gap(offset - self.pos))?;
        self.send(data)
    }

    fn can_seek_back(&self) -> bool {
        false
    }

    fn finish(&mut self, len: u64) -> imgshift_converters::Result<()> {
        self.check_cancel()?;
        let (tail, zeros) = finish_plan(self.pos, len, self.min_end);
        self.fill(tail)?;
        if zeros > 0 {
            self.zeros(zeros)?;
        }
        // Opened even for an empty output, so that the daemon writes (and confirms) the volume.
        self.stream()?;
        match self.stream.take() {
            Some(s) => s
                .finish()
                .map_err(|e| lv_err("the volume upload failed", &e)),
            None => Ok(()),
        }
    }
}

impl Drop for VolumeSink {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn long_gaps_are_holes_short_ones_zeros() {
        assert_eq!(gap(0), Gap::Nothing);
        assert_eq!(gap(HOLE_MIN - 1), Gap::Zeros(HOLE_MIN - 1));
        assert_eq!(gap(HOLE_MIN), Gap::Hole(HOLE_MIN));
        assert_eq!(gap(100 * M), Gap::Hole(100 * M));
    }

    #[test]
    fn finish_sends_the_tail_as_a_hole_and_zeros_the_rest_of_libvirts_header() {
        // Raw: the tail up to the disk's end is one hole.
        assert_eq!(finish_plan(3 * M, 24 * M, 0), (Gap::Hole(21 * M), 0));
        // Nothing after the last data.
        assert_eq!(finish_plan(24 * M, 24 * M, 0), (Gap::Nothing, 0));
        // qcow2 output shorter than libvirt's header: zeros up to the header's end.
        assert_eq!(
            finish_plan(100_000, 100_000, 196_608),
            (Gap::Nothing, 96_608)
        );
        // qcow2 output longer than the header: nothing more.
        assert_eq!(finish_plan(458_752, 458_752, 196_608), (Gap::Nothing, 0));
    }
}
