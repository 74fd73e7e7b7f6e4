//! [`VolumeSink`]: the converter engine's output, in file order, sent into a volume over libvirt Streams
//! (`virStorageVolUpload` + `virStreamSend`).
//!
//! What is sent for holes. libvirt's sparse streams (`VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM` with
//! `virStreamSendHole`) have no safe binding in `virt` 0.5, so holes are kept another way:
//! - A freshly created *file* volume (dir, fs, netfs pools) reads as zeros wherever nothing was written (a
//!   sparse file; for qcow2, beyond the header libvirt wrote). A gap of at least [`HOLE_MIN`] there is skipped:
//!   the stream is finished and a new upload starts at the next data offset, so the gap stays a hole.
//! - Shorter gaps, gaps below the end of libvirt's own qcow2 header, and every gap in a *block* volume (logical,
//!   disk, iSCSI pools: the device holds old data) are sent as zeros.
//!
//! For raw output of a sparse source this means only the data (and gaps under 1 MiB) crosses the connection;
//! qcow2 output is compact (only data clusters) and has no large gaps to skip.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imgshift_converters::{Error as ConvError, Sink};
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::msg;

/// A gap at least this long, where the volume already reads as zeros, starts a new stream instead of being sent
/// as zeros. Measured against a local libvirtd: a new stream (upload call, finish) took about 1.5 ms, sending
/// 1 MiB about 3.3 ms (256 streams for a 512 MiB disk with 4 KiB of data every 2 MiB: 0.38 s; 512 MiB dense:
/// 1.7 s).
pub const HOLE_MIN: u64 = 1 << 20;
/// Largest piece handed to `virStreamSend` at once: the packet size libvirt's own `virStreamSendAll` uses
/// (`VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX`), which every daemon version accepts.
const SEND_CHUNK: usize = 256 * 1024;

/// What a [`VolumeSink`] sent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SentCounts {
    /// Bytes sent over streams (data and zero fill).
    pub bytes_sent: u64,
    /// Zero bytes sent to fill gaps that could not be skipped.
    pub zero_fill_bytes: u64,
    /// Bytes of gaps skipped (left as holes).
    pub skipped_bytes: u64,
    /// Upload streams opened (one, plus one per skipped gap).
    pub streams: u64,
}

/// Feeds a writer's output, in increasing offsets, into a freshly created volume.
pub struct VolumeSink {
    conn: Connect,
    vol: StorageVol,
    stream: Option<Stream>,
    pos: u64,
    /// From this offset on the volume reads as zeros without being written (`u64::MAX`: nowhere).
    zero_from: u64,
    /// `finish` makes sure everything below this offset was written (zeros after the output's end).
    min_end: u64,
    /// Set from outside (Ctrl-C) to make the next write fail, so the caller's clean-up runs.
    cancel: Option<Arc<AtomicBool>>,
    /// What was sent.
    pub sent: SentCounts,
}

fn lv_err(what: &str, e: &virt::error::Error) -> ConvError {
    ConvError::io_plain(what, std::io::Error::other(msg(e)))
}

impl VolumeSink {
    /// A sink writing `vol` from offset 0. `zero_from`: the volume reads as zeros from there on (0 for a fresh
    /// sparse raw file, the header's length for a fresh qcow2 file, `u64::MAX` for a block device).
    /// `min_end`: bytes below this are overwritten even past the output's end (libvirt's qcow2 header).
    pub fn new(conn: &Connect, vol: &StorageVol, zero_from: u64, min_end: u64) -> VolumeSink {
        VolumeSink {
            conn: conn.clone(),
            vol: vol.clone(),
            stream: None,
            pos: 0,
            zero_from,
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

    fn stream_at(&mut self, offset: u64) -> imgshift_converters::Result<&Stream> {
        if self.stream.is_none() {
            let s = Stream::new(&self.conn, 0).map_err(|e| lv_err("cannot open a stream", &e))?;
            // Length 0: up to the end of the volume.
            self.vol
                .upload(&s, offset, 0, 0)
                .map_err(|e| lv_err(&format!("cannot start the upload at offset {offset}"), &e))?;
            self.sent.streams += 1;
            self.stream = Some(s);
        }
        self.stream
            .as_ref()
            .ok_or_else(|| ConvError::input("internal error: no stream"))
    }

    fn send(&mut self, data: &[u8]) -> imgshift_converters::Result<()> {
        let at = self.pos;
        let s = self.stream_at(at)?;
        for piece in data.chunks(SEND_CHUNK) {
            let mut rest = piece;
            while !rest.is_empty() {
                let n = s
                    .send(rest)
                    .map_err(|e| lv_err("cannot send to the volume", &e))?;
                // A blocking stream sends everything or fails; anything else is a bug worth stopping on.
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n > 0 && n <= rest.len())
                    .ok_or_else(|| {
                        ConvError::input(format!("the libvirt stream accepted {n} bytes"))
                    })?;
                rest = rest.get(n..).unwrap_or_default();
            }
        }
        self.pos += data.len() as u64;
        self.sent.bytes_sent += data.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> imgshift_converters::Result<()> {
        static ZERO: [u8; SEND_CHUNK] = [0; SEND_CHUNK];
        self.sent.zero_fill_bytes += n;
        while n > 0 {
            let k = usize::try_from(n).map_or(ZERO.len(), |n| n.min(ZERO.len()));
            self.send(ZERO.get(..k).unwrap_or_default())?;
            n -= k as u64;
        }
        Ok(())
    }

    fn end_stream(&mut self) -> imgshift_converters::Result<()> {
        if let Some(s) = self.stream.take() {
            s.finish()
                .map_err(|e| lv_err("the volume upload failed", &e))?;
        }
        Ok(())
    }

    /// Aborts the stream in progress (after a failure); the daemon stops writing.
    pub fn abort(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.abort();
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
        let gap = offset - self.pos;
        if can_skip(self.pos, gap, self.zero_from) {
            self.end_stream()?;
            self.sent.skipped_bytes += gap;
            self.pos = offset;
        } else {
            self.zeros(gap)?;
        }
        self.send(data)
    }

    fn can_seek_back(&self) -> bool {
        false
    }

    fn finish(&mut self, len: u64) -> imgshift_converters::Result<()> {
        self.check_cancel()?;
        let fill_to = fill_to(self.pos, len, self.min_end, self.zero_from);
        if fill_to > self.pos {
            self.zeros(fill_to - self.pos)?;
        }
        self.sent.skipped_bytes += len.saturating_sub(self.pos);
        self.end_stream()
    }
}

/// A gap of `gap` bytes at `pos` is left unwritten when it is long enough and the volume reads as zeros there.
fn can_skip(pos: u64, gap: u64, zero_from: u64) -> bool {
    gap >= HOLE_MIN && pos >= zero_from
}

/// Where `finish` must send zeros up to: everything below max(`len`, `min_end`) must read as the output or as
/// zeros, and what lies beyond `zero_from` already does.
fn fill_to(pos: u64, len: u64, min_end: u64, zero_from: u64) -> u64 {
    len.max(min_end).min(zero_from.max(pos))
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
    fn gaps_are_skipped_only_where_the_volume_reads_zero() {
        // Fresh sparse raw file: zeros everywhere.
        assert!(can_skip(0, M, 0));
        assert!(!can_skip(0, M - 1, 0), "short gaps are sent as zeros");
        // Fresh qcow2 file: libvirt's header up to 192 KiB must be overwritten.
        assert!(!can_skip(64 * 1024, 4 * M, 192 * 1024));
        assert!(can_skip(192 * 1024, 4 * M, 192 * 1024));
        // Block device: never.
        assert!(!can_skip(10 * M, 100 * M, u64::MAX));
    }

    #[test]
    fn finish_fills_what_does_not_read_zero() {
        // Raw file: nothing to fill after the last data.
        assert_eq!(fill_to(3 * M, 24 * M, 0, 0), 3 * M);
        // qcow2 output shorter than libvirt's header: zero the rest of the header.
        assert_eq!(fill_to(100_000, 100_000, 196_608, 196_608), 196_608);
        // qcow2 output longer than the header: nothing to fill.
        assert_eq!(fill_to(458_752, 458_752, 196_608, 196_608), 458_752);
        // Raw block device: zeros up to the end of the disk.
        assert_eq!(fill_to(3 * M, 24 * M, 0, u64::MAX), 24 * M);
    }
}
