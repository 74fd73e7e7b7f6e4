//! The conversion engine: resolve the source's allocation map, plan the writer, then read the planned data in
//! parallel through a bounded pool of buffers (zero detection and compression on the workers) and hand it to
//! the writer in guest order.
//!
//! Memory is `in_flight × unit_size` for data plus the allocation map: it does not grow with the virtual size.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, ExtentMap};
use crate::sink::Sink;
use crate::source::{DiskSource, resolved_extents};
use crate::writer::{ChunkCompressor, FormatWriter, Plan, Run};

/// Zero detection step for writers that leave holes inside allocated blocks (VHD, VHDX, VDI): zero runs of
/// 4 KiB or more stay holes in the output file, as with qemu-img's default `-S 4k`.
pub const BLOCK_ZERO_GRANULE: u64 = 4096;

/// Reports progress; called from the engine's coordinating thread.
pub trait Progress: Sync {
    /// Total bytes that will be processed.
    fn set_total(&self, total: u64);
    /// `n` more bytes processed.
    fn inc(&self, n: u64);
}

/// Progress that reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn inc(&self, _: u64) {}
}

/// Tuning for one conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Worker threads reading (and compressing).
    pub threads: usize,
    /// Bytes read per work unit (rounded to the writer's granularity).
    pub unit_size: u64,
    /// Work units allowed in flight (bounds memory).
    pub in_flight: usize,
    /// Detect zeros inside data ranges (`false` copies data ranges as they are).
    pub detect_zeros: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        // One worker per core: more workers than cores only adds contention and memory (each thread gets its
        // own allocator arena; on 2 cores, 4 workers used twice the peak RSS for no speed-up, measured with
        // bench/bench.py). The coordinating thread, which writes, mostly waits on the workers.
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = cpus.clamp(2, 16);
        ConvertOptions {
            threads,
            unit_size: 2 << 20,
            in_flight: threads * 2,
            detect_zeros: true,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConvertStats {
    /// Virtual size of the output.
    pub virtual_size: u64,
    /// Bytes the source's allocation map called data (after backing resolution).
    pub data_bytes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Guest bytes handed to the writer as data (non-zero).
    pub bytes_written: u64,
    /// Guest bytes of data ranges that turned out to be zeros.
    pub zero_bytes_detected: u64,
    /// Length of the output file.
    pub output_len: u64,
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    static ZERO: [u8; 4096] = [0; 4096];
    buf.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// The resolved (Data/Zero) allocation of the whole source.
pub fn source_map(src: &dyn DiskSource) -> Result<ExtentMap> {
    resolved_extents(src, 0, src.virtual_size())
}

/// Page alignment of the I/O buffers. The kernel copies between the page cache and a user buffer with
/// `rep movsb`, which on AMD Zen runs several times slower when the user address is not congruent with the
/// page's (a plain `Vec` from malloc starts 16 bytes past a page): measured as 3.7x the `pread` copy time of
/// qemu-img, whose buffers are `qemu_blockalign`ed.
const IO_ALIGN: usize = 4096;

/// A buffer whose contents start on an [`IO_ALIGN`] boundary, in safe code: the `Vec` is over-allocated by
/// one alignment and the slice starts at the first aligned byte.
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer that can hold up to `capacity` bytes. Every buffer of a conversion is made at the largest
    /// unit size and reused as is: growing buffers one by one left freed holes in the heap that stayed
    /// resident (peak RSS 62 MiB with 4 workers, against 16 MiB of buffers).
    fn with_capacity(capacity: usize) -> Result<Self> {
        let raw_len = capacity
            .checked_add(IO_ALIGN)
            .ok_or_else(|| Error::input("unit too large"))?;
        let raw = vec![0u8; raw_len];
        let off = raw.as_ptr().align_offset(IO_ALIGN).min(IO_ALIGN);
        Ok(AlignedBuf { raw, off, len: 0 })
    }

    /// Makes the buffer `len` bytes long (contents unspecified).
    fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.raw.len().saturating_sub(IO_ALIGN) {
            return Err(Error::input("internal error: unit larger than its buffer"));
        }
        self.len = len;
        Ok(())
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

struct Job {
    seq: u64,
    start: u64,
    buf: AlignedBuf,
}

enum Piece {
    Zero(u64),
    Data { from: usize, to: usize },
    Compressed { data: Vec<u8>, len: u64 },
}

struct Done {
    seq: u64,
    start: u64,
    buf: AlignedBuf,
    pieces: Vec<Piece>,
}

/// Converts `src` through `writer` into `sink`.
pub fn convert(
    src: &dyn DiskSource,
    writer: &mut dyn FormatWriter,
    sink: &mut dyn Sink,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertStats> {
    let map = source_map(src)?;
    convert_with_map(src, &map, writer, sink, opts, progress)
}

/// Like [`convert`], with the source's resolved map already computed.
pub fn convert_with_map(
    src: &dyn DiskSource,
    map: &ExtentMap,
    writer: &mut dyn FormatWriter,
    sink: &mut dyn Sink,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertStats> {
    let source_size = src.virtual_size();
    let virtual_size = writer.output_virtual_size(source_size)?;
    if virtual_size < source_size {
        return Err(Error::input(
            "internal error: a writer shrank the virtual size",
        ));
    }
    let g = writer.granularity();
    if g == 0 || !g.is_power_of_two() {
        return Err(Error::input(format!(
            "internal error: writer granularity {g} is not a power of two"
        )));
    }
    let runs = map.data_runs(g);
    let plan = Plan {
        virtual_size,
        runs: &runs,
    };
    let mut stats = ConvertStats {
        virtual_size,
        data_bytes: map.bytes(ExtentKind::Data),
        ..ConvertStats::default()
    };
    progress.set_total(plan.data_bytes());
    writer.begin(sink, &plan)?;

    // Work units: pieces of the runs, aligned to the granularity, at most unit_size long.
    let unit = (opts.unit_size.max(g) / g) * g;
    let zero_granule = writer.zero_granule();
    if zero_granule == 0 || !zero_granule.is_power_of_two() || zero_granule > g {
        return Err(Error::input(format!(
            "internal error: writer zero granule {zero_granule} is not a power of two up to {g}"
        )));
    }
    let compressor = writer.compressor();
    let mut units = runs.iter().flat_map(|&(s, t)| {
        let mut out = Vec::new();
        let mut a = s;
        while a < t {
            let b = (a + unit).min(t);
            out.push((a, b));
            a = b;
        }
        out
    });

    let unit_len = usize::try_from(unit).map_err(|_| Error::input("unit too large"))?;
    let threads = opts.threads.max(1);
    let in_flight = opts.in_flight.max(threads);
    let detect = opts.detect_zeros;

    std::thread::scope(|scope| -> Result<()> {
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(in_flight);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Result<Done>>();
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let compressor = compressor.clone();
            scope.spawn(move || {
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let r = process(src, job, zero_granule, g, detect, compressor.as_deref());
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);

        let mut pool: Vec<AlignedBuf> = Vec::new();
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut sent = 0u64;
        let mut outstanding = 0usize;
        let mut exhausted = false;
        let result = (|| -> Result<()> {
            loop {
                while !exhausted && outstanding < in_flight {
                    match units.next() {
                        Some((a, b)) => {
                            let len = usize::try_from(b - a)
                                .map_err(|_| Error::input("unit too large"))?;
                            let mut buf = match pool.pop() {
                                Some(b) => b,
                                None => AlignedBuf::with_capacity(unit_len)?,
                            };
                            buf.set_len(len)?;
                            job_tx
                                .send(Job {
                                    seq: sent,
                                    start: a,
                                    buf,
                                })
                                .map_err(|_| Error::input("internal error: worker pool stopped"))?;
                            sent += 1;
                            outstanding += 1;
                        }
                        None => exhausted = true,
                    }
                }
                if outstanding == 0 {
                    return Ok(());
                }
                let done = done_rx
                    .recv()
                    .map_err(|_| Error::input("internal error: worker pool stopped"))??;
                pending.insert(done.seq, done);
                while let Some(d) = pending.remove(&next_seq) {
                    let mut at = d.start;
                    let data = d.buf.as_slice();
                    stats.bytes_read += data.len() as u64;
                    for p in &d.pieces {
                        let run = match p {
                            Piece::Zero(n) => {
                                stats.zero_bytes_detected += n;
                                Run::Zero(*n)
                            }
                            Piece::Data { from, to } => {
                                stats.bytes_written += (to - from) as u64;
                                Run::Data(&data[*from..*to])
                            }
                            Piece::Compressed { data, len } => {
                                stats.bytes_written += len;
                                Run::Compressed { data, len: *len }
                            }
                        };
                        let n = run.guest_len();
                        writer.write_run(sink, at, run)?;
                        at += n;
                    }
                    progress.inc(data.len() as u64);
                    pool.push(d.buf);
                    next_seq += 1;
                    // A unit stops counting only once written: units done out of order wait in
                    // `pending` with their buffers, so they count against `in_flight` too.
                    outstanding -= 1;
                }
            }
        })();
        drop(job_tx);
        result
    })?;

    stats.output_len = writer.finish(sink)?;
    Ok(stats)
}

fn process(
    src: &dyn DiskSource,
    job: Job,
    zero_granule: u64,
    granule: u64,
    detect: bool,
    compressor: Option<&dyn ChunkCompressor>,
) -> Result<Done> {
    let Job {
        seq,
        start,
        buf: mut aligned,
    } = job;
    src.read_at(aligned.as_mut_slice(), start)?;
    let buf = aligned.as_slice();
    let mut pieces: Vec<Piece> = Vec::new();
    if let Some(c) = compressor {
        // One piece per granule: zero, compressed, or stored.
        let g = granule as usize;
        let mut from = 0usize;
        while from < buf.len() {
            let to = (from + g).min(buf.len());
            let chunk = &buf[from..to];
            if detect && is_zero(chunk) {
                push_zero(&mut pieces, (to - from) as u64);
            } else {
                match c.compress(chunk)? {
                    Some(data) => pieces.push(Piece::Compressed {
                        data,
                        len: (to - from) as u64,
                    }),
                    None => push_data(&mut pieces, from, to),
                }
            }
            from = to;
        }
    } else if detect {
        let z = zero_granule as usize;
        let mut from = 0usize;
        while from < buf.len() {
            let to = (from + z).min(buf.len());
            if is_zero(&buf[from..to]) {
                push_zero(&mut pieces, (to - from) as u64);
            } else {
                push_data(&mut pieces, from, to);
            }
            from = to;
        }
    } else {
        pieces.push(Piece::Data {
            from: 0,
            to: buf.len(),
        });
    }
    Ok(Done {
        seq,
        start,
        buf: aligned,
        pieces,
    })
}

fn push_zero(pieces: &mut Vec<Piece>, n: u64) {
    if let Some(Piece::Zero(m)) = pieces.last_mut() {
        *m += n;
    } else {
        pieces.push(Piece::Zero(n));
    }
}

fn push_data(pieces: &mut Vec<Piece>, from: usize, to: usize) {
    if let Some(Piece::Data { to: t, .. }) = pieces.last_mut()
        && *t == from
    {
        *t = to;
        return;
    }
    pieces.push(Piece::Data { from, to });
}

/// Compares two disks' contents. Returns the first differing guest offset, or `None` when identical. Where
/// one disk is longer, the extra part must read as zeros (qemu-img compare's non-strict rule).
pub fn compare(
    a: &dyn DiskSource,
    b: &dyn DiskSource,
    progress: &dyn Progress,
) -> Result<Option<u64>> {
    let common = a.virtual_size().min(b.virtual_size());
    let ma = resolved_extents(a, 0, a.virtual_size())?;
    let mb = resolved_extents(b, 0, b.virtual_size())?;
    progress.set_total(a.virtual_size().max(b.virtual_size()));
    const CHUNK: u64 = 1 << 20;
    let mut bufa = vec![0u8; CHUNK as usize];
    let mut bufb = vec![0u8; CHUNK as usize];
    // Walk the union of boundaries; ranges that are zero in both are skipped without reading.
    let mut pos = 0u64;
    while pos < common {
        let ea = ma
            .lookup(pos)
            .ok_or_else(|| Error::input("internal error: map gap"))?;
        let eb = mb
            .lookup(pos)
            .ok_or_else(|| Error::input("internal error: map gap"))?;
        let end = ea.end().min(eb.end()).min(common);
        if ea.kind == ExtentKind::Zero && eb.kind == ExtentKind::Zero {
            progress.inc(end - pos);
            pos = end;
            continue;
        }
        let mut p = pos;
        while p < end {
            let n = (end - p).min(CHUNK) as usize;
            let za = ea.kind == ExtentKind::Zero;
            let zb = eb.kind == ExtentKind::Zero;
            if za {
                bufa[..n].fill(0);
            } else {
                a.read_at(&mut bufa[..n], p)?;
            }
            if zb {
                bufb[..n].fill(0);
            } else {
                b.read_at(&mut bufb[..n], p)?;
            }
            if bufa[..n] != bufb[..n] {
                let i = bufa[..n]
                    .iter()
                    .zip(&bufb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok(Some(p + i as u64));
            }
            progress.inc(n as u64);
            p += n as u64;
        }
        pos = end;
    }
    // The longer disk's tail must be zeros.
    let (longer, lmap) = if a.virtual_size() > common {
        (a, &ma)
    } else {
        (b, &mb)
    };
    for e in lmap.clip(common, longer.virtual_size()).iter() {
        if e.kind == ExtentKind::Zero {
            continue;
        }
        let mut p = e.start;
        while p < e.end() {
            let n = (e.end() - p).min(CHUNK) as usize;
            longer.read_at(&mut bufa[..n], p)?;
            if let Some(i) = bufa[..n].iter().position(|&x| x != 0) {
                return Ok(Some(p + i as u64));
            }
            p += n as u64;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;
    use crate::formats::raw::RawWriter;
    use crate::sink::MemSink;
    use crate::source::ImageInfo;
    use crate::writer::WriterOptions;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    const UNIT: u64 = 64 << 10;

    /// A disk whose first unit reads slowly, counting the reads that start while it is still being read.
    struct SlowFirstUnit {
        size: u64,
        first_done: AtomicBool,
        reads_while_first_pending: AtomicUsize,
    }

    impl DiskSource for SlowFirstUnit {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn extents(&self, offset: u64, len: u64) -> Result<ExtentMap> {
            Ok(ExtentMap::single(offset, len, ExtentKind::Data))
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset == 0 {
                std::thread::sleep(Duration::from_millis(300));
                self.first_done.store(true, Ordering::SeqCst);
            } else if !self.first_done.load(Ordering::SeqCst) {
                self.reads_while_first_pending
                    .fetch_add(1, Ordering::SeqCst);
            }
            buf.fill((offset / UNIT) as u8 | 1);
            Ok(())
        }
        fn info(&self) -> ImageInfo {
            ImageInfo::default()
        }
    }

    #[test]
    fn units_done_out_of_order_count_against_the_in_flight_bound() {
        let src = SlowFirstUnit {
            size: 64 * UNIT,
            first_done: AtomicBool::new(false),
            reads_while_first_pending: AtomicUsize::new(0),
        };
        let mut writer = RawWriter::new(&mut WriterOptions::default()).unwrap();
        let mut sink = MemSink::default();
        let opts = ConvertOptions {
            threads: 2,
            in_flight: 4,
            unit_size: UNIT,
            ..ConvertOptions::default()
        };
        convert(&src, &mut writer, &mut sink, &opts, &NoProgress).unwrap();
        // While unit 0 is read, only the other 3 buffers of the window may be filled (the whole disk was
        // read ahead before units waiting for an earlier one were counted).
        assert!(src.reads_while_first_pending.load(Ordering::SeqCst) <= 3);
        assert_eq!(sink.data.len() as u64, 64 * UNIT);
        for (i, chunk) in sink.data.chunks(UNIT as usize).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i as u8 | 1)), "unit {i}");
        }
    }

    #[test]
    fn io_buffers_start_on_a_page() {
        for cap in [1usize, 4096, 65536, 2 << 20] {
            let mut b = AlignedBuf::with_capacity(cap).unwrap();
            b.set_len(cap).unwrap();
            assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(b.as_slice().len(), cap);
            assert!(b.set_len(cap + 1).is_err());
        }
    }
}
