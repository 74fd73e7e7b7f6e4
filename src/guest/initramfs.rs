//! Initramfs listing: which boot drivers an initramfs holds.
//!
//! Format (Linux `Documentation/driver-api/early-userspace/buffer-format.rst`): a sequence of newc cpio archives
//! ("070701"/"070702" headers, 4-byte aligned, ended by `TRAILER!!!`), each either uncompressed (the early
//! microcode archive comes first) or compressed as a whole (gzip, zstd, xz, lz4 legacy or frame), with zero
//! padding between them. Streamed: member data is skipped, never buffered (except `modules.builtin`, capped);
//! the decompressed total, name lengths, member count and archive count are bounded by [`Limits`].

use std::io::{self, BufRead, Read};

use serde::Serialize;

/// Boot drivers imgshift looks for (module names, `-` spelled `_`).
pub const DRIVERS: &[&str] = &[
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_pci",
    "nvme",
    "ena",
    "xen_blkfront",
    "xen_netfront",
    "hv_vmbus",
    "hv_storvsc",
    "hv_netvsc",
    "ahci",
    "ata_piix",
    "sd_mod",
];

/// What one initramfs may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes decompressed across all archives (real initramfs images unpack to well under 1 GiB).
    pub decompressed: u64,
    /// Members across all archives.
    pub members: usize,
    /// Bytes of one member name (the kernel's PATH_MAX).
    pub name: usize,
    /// Bytes of a `modules.builtin` member kept in memory.
    pub builtin: u64,
    /// Concatenated archives.
    pub archives: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            decompressed: 1 << 30,
            members: 200_000,
            name: 4096,
            builtin: 1 << 20,
            archives: 16,
        }
    }
}

/// What an initramfs holds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Listing {
    /// Compression of each archive, in order: "none", "gzip", "zstd", "xz", "lz4".
    pub archives: Vec<String>,
    /// Boot driver modules found as `.ko*` members, sorted.
    pub modules: Vec<String>,
    /// Members listed in all archives.
    pub members: usize,
    /// Contents of a `modules.builtin` member, when present.
    #[serde(skip)]
    pub builtin: Option<String>,
    /// What stopped the listing early (a truncated, malformed or oversized archive), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The driver name of a module path (`.../virtio-blk.ko.zst` → `virtio_blk`), if it is one.
pub fn module_name(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|s| base.strip_suffix(s))?;
    Some(stem.replace('-', "_"))
}

/// Driver names listed in a `modules.builtin` text.
pub fn builtin_drivers(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .take(100_000)
        .filter_map(|l| module_name(l.trim()))
        .filter(|m| DRIVERS.contains(&m.as_str()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Lists an initramfs read from `r`.
pub fn list(r: impl Read, limits: &Limits) -> Listing {
    let mut l = Listing::default();
    let mut st = State {
        limits: *limits,
        decompressed: 0,
    };
    // The raw input is bounded too: uncompressed archives are read through, not decompressed.
    let mut input = Buffered::new(Limited {
        inner: r,
        left: limits.decompressed,
        limit: limits.decompressed,
    });
    if let Err(e) = list_archives(&mut input, &mut l, &mut st) {
        l.problem = Some(e.to_string());
    }
    l.modules.sort();
    l.modules.dedup();
    l
}

struct State {
    limits: Limits,
    decompressed: u64,
}

/// Largest zstd window accepted, as a power of two: zstd's own default limit (`ZSTD_WINDOWLOG_LIMIT_DEFAULT`, 128
/// MiB), which `zstd -d` applies too; `zstd --ultra -22` stays within it. The decoder allocates the window the
/// frame header asks for, so this is the most one zstd initramfs costs.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Most memory the xz decoder may use: `xz -9` (a 64 MiB dictionary) needs 65 MiB to decompress. liblzma's
/// default is no limit, and the dictionary size comes from the stream header: up to 1.5 GiB allocated for a few
/// bytes of input.
const XZ_MEMLIMIT: u64 = 96 << 20;

/// Magic numbers of the compressions the kernel accepts for an initramfs (`lib/decompress.c`).
const MAGICS: &[(&[u8], &str)] = &[
    (&[0x1f, 0x8b], "gzip"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
    (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
    (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
    (&[0x42, 0x5a, 0x68], "bzip2"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (&[0x89, 0x4c, 0x5a, 0x4f], "lzo"),
];

fn list_archives(input: &mut impl Peek, l: &mut Listing, st: &mut State) -> io::Result<()> {
    let mut offset = 0u64;
    loop {
        offset = offset.saturating_add(skip_zeros(input)?);
        let head = peek(input, 6)?;
        if head.is_empty() {
            return Ok(());
        }
        if l.archives.len() >= st.limits.archives {
            return Err(bad(format!(
                "more than {} concatenated archives",
                st.limits.archives
            )));
        }
        let mut counted = Counted {
            inner: &mut *input,
            n: 0,
        };
        if head.starts_with(b"07070") {
            l.archives.push("none".into());
            parse_cpio(&mut counted, l, st)
                .map_err(|e| bad(format!("cpio archive at byte {offset}: {e}")))?;
        } else {
            let Some((_, name)) = MAGICS.iter().find(|(m, _)| head.starts_with(m)) else {
                return Err(bad(format!("unrecognised data at byte {offset}")));
            };
            l.archives.push((*name).into());
            decompress_and_parse(name, &mut counted, l, st)
                .map_err(|e| bad(format!("{name} archive at byte {offset}: {e}")))?;
        }
        offset = offset.saturating_add(counted.n);
    }
}

/// Decompresses one compressed stream and parses the cpio archives inside it.
fn decompress_and_parse(
    name: &str,
    input: &mut impl Peek,
    l: &mut Listing,
    st: &mut State,
) -> io::Result<()> {
    match name {
        "gzip" => parse_stream(flate2::bufread::GzDecoder::new(input), l, st),
        "zstd" => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            parse_stream(d, l, st)
        }
        "xz" => {
            let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
                .map_err(io::Error::other)?;
            parse_stream(xz2::bufread::XzDecoder::new_stream(input, stream), l, st)
        }
        "lz4" => {
            if peek(input, 4)? == [0x04, 0x22, 0x4d, 0x18] {
                parse_stream(lz4_flex::frame::FrameDecoder::new(input), l, st)
            } else {
                parse_stream(Lz4Legacy::new(input), l, st)
            }
        }
        other => Err(bad(format!(
            "{other} compression is not supported by imgshift"
        ))),
    }
}

/// Parses every cpio archive in a decompressed stream, counting decompressed bytes against the limit.
fn parse_stream(r: impl Read, l: &mut Listing, st: &mut State) -> io::Result<()> {
    let budget = st.limits.decompressed.saturating_sub(st.decompressed);
    let mut r = Buffered::new(Limited {
        inner: r,
        left: budget,
        limit: st.limits.decompressed,
    });
    let res = (|| {
        loop {
            skip_zeros(&mut r)?;
            if peek(&mut r, 1)?.is_empty() {
                return Ok(());
            }
            parse_cpio(&mut r, l, st)?;
        }
    })();
    let left = r.inner.left;
    st.decompressed = st.decompressed.saturating_add(budget.saturating_sub(left));
    res
}

/// Parses one newc archive up to and including its `TRAILER!!!` member.
fn parse_cpio(r: &mut impl Read, l: &mut Listing, st: &State) -> io::Result<()> {
    loop {
        let mut hdr = [0u8; 110];
        r.read_exact(&mut hdr)
            .map_err(|e| eof_as(e, "the archive ends inside a member header"))?;
        if !(hdr.starts_with(b"070701") || hdr.starts_with(b"070702")) {
            return Err(bad("not a newc cpio header".into()));
        }
        let field = |i: usize| hex(hdr.get(6 + 8 * i..14 + 8 * i).unwrap_or_default());
        let mode = field(1)?;
        let filesize = field(6)?;
        let namesize = field(11)?;
        let namesize = usize::try_from(namesize).unwrap_or(usize::MAX);
        if namesize == 0 || namesize > st.limits.name {
            return Err(bad(format!(
                "a member name declares {namesize} bytes (at most {} accepted)",
                st.limits.name
            )));
        }
        let mut name = vec![0u8; namesize];
        r.read_exact(&mut name)
            .map_err(|e| eof_as(e, "the archive ends inside a member name"))?;
        skip(r, pad4(110u64.saturating_add(namesize as u64)), "padding")?;
        let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(&name)).into_owned();
        if name == "TRAILER!!!" {
            return Ok(());
        }
        l.members = l.members.saturating_add(1);
        if l.members > st.limits.members {
            return Err(bad(format!("more than {} members", st.limits.members)));
        }
        let is_file = mode & 0o170000 == 0o100000;
        if is_file && name.ends_with("modules.builtin") && filesize <= st.limits.builtin {
            let mut buf = Vec::new();
            r.take(filesize).read_to_end(&mut buf)?;
            if buf.len() as u64 != filesize {
                return Err(bad(format!("{name} is truncated")));
            }
            l.builtin = Some(String::from_utf8_lossy(&buf).into_owned());
        } else {
            skip(r, filesize, &name)?;
        }
        skip(r, pad4(filesize), "padding")?;
        if let Some(m) = module_name(&name).filter(|m| DRIVERS.contains(&m.as_str())) {
            l.modules.push(m);
        }
    }
}

fn hex(field: &[u8]) -> io::Result<u64> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| bad("a header field is not hexadecimal".into()))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn eof_as(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        bad(what.into())
    } else {
        e
    }
}

fn skip(r: &mut impl Read, n: u64, what: &str) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got != n {
        return Err(bad(format!(
            "member {what} declares {n} bytes but the archive ends after {got}"
        )));
    }
    Ok(())
}

fn pad4(n: u64) -> u64 {
    (4 - n % 4) % 4
}

/// A buffered reader that can look `n` bytes ahead (std's BufReader refills only when empty, so a magic number
/// split across its buffer edge would be missed).
struct Buffered<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
}

const BUF: usize = 64 << 10;

impl<R: Read> Buffered<R> {
    fn new(inner: R) -> Self {
        Buffered {
            inner,
            buf: Vec::with_capacity(BUF),
            start: 0,
        }
    }
}

/// Looking ahead without consuming.
trait Peek: BufRead {
    /// Up to `n` bytes (fewer only at the end of the input), not consumed.
    fn peek(&mut self, n: usize) -> io::Result<&[u8]>;
}

impl<R: Read> Peek for Buffered<R> {
    fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.buf.len().saturating_sub(self.start) < n {
            self.buf.drain(..self.start.min(self.buf.len()));
            self.start = 0;
            let mut chunk = [0u8; 4096];
            while self.buf.len() < n {
                let k = self.inner.read(&mut chunk)?;
                if k == 0 {
                    break;
                }
                self.buf
                    .extend_from_slice(chunk.get(..k).unwrap_or_default());
            }
        }
        let end = self.buf.len().min(self.start.saturating_add(n));
        Ok(self.buf.get(self.start..end).unwrap_or_default())
    }
}

impl<R: Read> Read for Buffered<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        if let (Some(d), Some(s)) = (out.get_mut(..n), avail.get(..n)) {
            d.copy_from_slice(s);
        }
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Buffered<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start >= self.buf.len() {
            self.buf.resize(BUF, 0);
            let k = self.inner.read(&mut self.buf)?;
            self.buf.truncate(k);
            self.start = 0;
        }
        Ok(self.buf.get(self.start..).unwrap_or_default())
    }
    fn consume(&mut self, amt: usize) {
        self.start = self.start.saturating_add(amt).min(self.buf.len());
    }
}

impl<T: Peek + ?Sized> Peek for &mut T {
    fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        (**self).peek(n)
    }
}

fn peek(r: &mut impl Peek, n: usize) -> io::Result<Vec<u8>> {
    Ok(r.peek(n)?.to_vec())
}

/// Consumes zero bytes (padding between archives); returns how many.
fn skip_zeros(r: &mut impl BufRead) -> io::Result<u64> {
    let mut n = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        let z = buf.iter().take_while(|&&b| b == 0).count();
        let done = z < buf.len();
        r.consume(z);
        n = n.saturating_add(z as u64);
        if done {
            return Ok(n);
        }
    }
}

/// Counts bytes consumed from a BufRead.
struct Counted<'a, R> {
    inner: &'a mut R,
    n: u64,
}

impl<R: BufRead> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n = self.n.saturating_add(k as u64);
        Ok(k)
    }
}

impl<R: Peek> Peek for Counted<'_, R> {
    fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        self.inner.peek(n)
    }
}

impl<R: BufRead> BufRead for Counted<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.n = self.n.saturating_add(amt as u64);
        self.inner.consume(amt);
    }
}

/// Fails (instead of ending quietly) once more than the decompression budget has been read.
struct Limited<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(bad(format!(
                    "decompresses to more than {} bytes: stopped",
                    self.limit
                ))),
            };
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(buf.get_mut(..max).unwrap_or_default())?;
        self.left = self.left.saturating_sub(n as u64);
        Ok(n)
    }
}

/// The LZ4 legacy format the kernel uses for initramfs (`lz4 -l`): magic 0x184C2102, then blocks of a u32 LE
/// compressed length and an LZ4 block decompressing to at most 8 MiB; ends at end of input or at the next magic.
struct Lz4Legacy<R> {
    inner: R,
    started: bool,
    done: bool,
    /// The decoded block: `LZ4_LEGACY_BLOCK` bytes allocated once, valid up to `end`. (Resizing it per block
    /// zero-filled 8 MiB for every block however small: a crafted stream of one-byte blocks cost hours.)
    out: Vec<u8>,
    end: usize,
    pos: usize,
}

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

impl<R: Peek> Lz4Legacy<R> {
    fn new(inner: R) -> Self {
        Lz4Legacy {
            inner,
            started: false,
            done: false,
            out: Vec::new(),
            end: 0,
            pos: 0,
        }
    }

    fn next_block(&mut self) -> io::Result<()> {
        if !self.started {
            let mut m = [0u8; 4];
            self.inner.read_exact(&mut m)?;
            self.started = true;
        }
        let head = peek(&mut self.inner, 4)?;
        let Ok(len) = <[u8; 4]>::try_from(head.as_slice()).map(u32::from_le_bytes) else {
            self.done = true;
            return Ok(());
        };
        if len == LZ4_LEGACY_MAGIC || len == 0 {
            self.done = true;
            return Ok(());
        }
        self.inner.consume(4);
        let clen = usize::try_from(len).unwrap_or(usize::MAX);
        if clen > lz4_flex::block::get_maximum_output_size(LZ4_LEGACY_BLOCK) {
            return Err(bad(format!("an lz4 block declares {clen} bytes")));
        }
        let mut block = Vec::new();
        (&mut self.inner).take(len.into()).read_to_end(&mut block)?;
        if block.len() != clen {
            return Err(bad("the lz4 stream ends inside a block".into()));
        }
        if self.out.len() != LZ4_LEGACY_BLOCK {
            self.out = vec![0; LZ4_LEGACY_BLOCK];
        }
        let n = lz4_flex::block::decompress_into(&block, &mut self.out)
            .map_err(|e| bad(format!("lz4 block: {e}")))?;
        if n == 0 {
            // `lz4 -l` never writes an empty block; a stream of them would loop here without output.
            return Err(bad("an lz4 block decodes to nothing".into()));
        }
        self.end = n;
        self.pos = 0;
        Ok(())
    }
}

impl<R: Peek> Read for Lz4Legacy<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.end {
            if self.done {
                return Ok(0);
            }
            self.next_block()?;
        }
        let avail = self.out.get(self.pos..self.end).unwrap_or_default();
        let n = avail.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos = self.pos.saturating_add(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    /// A zstd frame asking for a 1 GiB window (windowLog 30) is refused, not allocated.
    #[test]
    fn rejects_zstd_window_over_the_limit() {
        // Magic, frame header descriptor (no content size, not single segment), window descriptor 20 << 3.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 20 << 3, 0x01, 0x00, 0x00];
        let l = list(&frame[..], &Limits::default());
        assert_eq!(l.archives, ["zstd"]);
        assert!(l.problem.is_some(), "{l:?}");
    }

    /// The `initramfs` fuzz target's out-of-memory input: a zstd frame with a 128 MiB window (windowLog 27, the
    /// limit) and a truncated lz4 frame: bounded, read as far as it goes.
    #[test]
    fn zstd_window_at_the_limit_is_read() {
        let input = include_bytes!(
            "../../fuzz/regressions/initramfs/oom-7d434fbd54803366ae73da35f441878c3b6cb1b5"
        );
        let l = list(&input[..], &Limits::default());
        assert_eq!(l.archives.first().map(String::as_str), Some("zstd"));
    }

    /// An xz stream whose LZMA2 dictionary would need more than [`XZ_MEMLIMIT`] is refused.
    #[test]
    fn rejects_xz_dictionary_over_the_limit() {
        let mut enc = xz2::stream::LzmaOptions::new_preset(6).unwrap();
        enc.dict_size(1 << 30);
        let mut filters = xz2::stream::Filters::new();
        filters.lzma2(&enc);
        let stream =
            xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32).unwrap();
        let mut w = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
        w.write_all(b"07070100").unwrap();
        let xz = w.finish().unwrap();
        let l = list(&xz[..], &Limits::default());
        assert_eq!(l.archives, ["xz"]);
        let p = l.problem.unwrap_or_default();
        assert!(p.to_lowercase().contains("memory"), "{p}");
    }

    fn member(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8], declared: Option<u64>) {
        let ns = name.len() + 1;
        let size = declared.unwrap_or(data.len() as u64);
        write!(
            out,
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            1, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, ns, 0
        )
        .unwrap();
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len() + ((4 - (110 + ns) % 4) % 4), 0);
        out.extend_from_slice(data);
        out.resize(out.len() + ((4 - data.len() % 4) % 4), 0);
    }

    fn archive(files: &[&str]) -> Vec<u8> {
        let mut a = Vec::new();
        for f in files {
            member(&mut a, f, 0o100644, b"x", None);
        }
        member(&mut a, "TRAILER!!!", 0, b"", None);
        a
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    const KO: &str = "lib/modules/6.1.0-56-amd64/kernel/drivers";

    #[test]
    fn microcode_then_every_compression() {
        let mc = archive(&["kernel/x86/microcode/GenuineIntel.bin"]);
        let main = archive(&[
            &format!("{KO}/block/virtio_blk.ko"),
            &format!("{KO}/nvme/host/nvme.ko.xz"),
        ]);
        let xz = {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(&main).unwrap();
            e.finish().unwrap()
        };
        let lz4f = {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(&main).unwrap();
            e.finish().unwrap()
        };
        let lz4l = {
            let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
            let c = lz4_flex::block::compress(&main);
            v.extend_from_slice(&(c.len() as u32).to_le_bytes());
            v.extend_from_slice(&c);
            v
        };
        let zst = zstd::encode_all(&main[..], 3).unwrap();
        for (body, name) in [
            (gzip(&main), "gzip"),
            (zst, "zstd"),
            (xz, "xz"),
            (lz4f, "lz4"),
            (lz4l, "lz4"),
        ] {
            let mut img = mc.clone();
            img.extend_from_slice(&[0; 512]);
            img.extend_from_slice(&body);
            let l = list(&img[..], &Limits::default());
            assert_eq!(l.problem, None, "{name}");
            assert_eq!(l.archives, ["none", name]);
            assert_eq!(l.modules, ["nvme", "virtio_blk"]);
            assert_eq!(l.members, 3);
        }
    }

    #[test]
    fn builtin_member_is_read() {
        let mut a = Vec::new();
        member(
            &mut a,
            "lib/modules/x/modules.builtin",
            0o100644,
            b"kernel/drivers/block/virtio_blk.ko\n",
            None,
        );
        member(&mut a, "TRAILER!!!", 0, b"", None);
        let l = list(&gzip(&a)[..], &Limits::default());
        assert_eq!(
            builtin_drivers(l.builtin.as_deref().unwrap()),
            ["virtio_blk"]
        );
    }

    #[test]
    fn rejects_member_larger_than_archive() {
        let mut a = Vec::new();
        member(&mut a, "huge.bin", 0o100644, &[0; 4096], Some(0xFFFF_FFFF));
        let l = list(&gzip(&a)[..], &Limits::default());
        let p = l.problem.unwrap();
        assert!(p.contains("huge.bin declares 4294967295 bytes"), "{p}");
        assert!(p.starts_with("gzip archive at byte 0"), "{p}");
    }

    #[test]
    fn rejects_long_name() {
        let mut a = Vec::new();
        member(&mut a, &"d/".repeat(3000), 0o40755, b"", None);
        let l = list(&a[..], &Limits::default());
        assert!(
            l.problem
                .unwrap()
                .contains("declares 6001 bytes (at most 4096")
        );
    }

    #[test]
    fn rejects_decompression_bomb() {
        let mut a = Vec::new();
        member(&mut a, "zeros", 0o100644, &vec![0; 4 << 20], None);
        member(&mut a, "TRAILER!!!", 0, b"", None);
        let limits = Limits {
            decompressed: 1 << 20,
            ..Limits::default()
        };
        let l = list(&gzip(&a)[..], &limits);
        assert!(
            l.problem
                .unwrap()
                .contains("decompresses to more than 1048576 bytes")
        );
    }

    #[test]
    fn rejects_too_many_members_and_archives() {
        let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let limits = Limits {
            members: 10,
            archives: 3,
            ..Limits::default()
        };
        let l = list(&archive(&refs)[..], &limits);
        assert!(l.problem.unwrap().contains("more than 10 members"));
        let many: Vec<u8> = (0..5).flat_map(|_| archive(&["a"])).collect();
        let l = list(&many[..], &limits);
        assert!(
            l.problem
                .unwrap()
                .contains("more than 3 concatenated archives")
        );
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let l = list(&b"hello world"[..], &Limits::default());
        assert_eq!(l.problem.unwrap(), "unrecognised data at byte 0");
        let a = archive(&["a", "b"]);
        let l = list(&a[..50], &Limits::default());
        assert!(l.problem.unwrap().contains("ends inside a member header"));
        let l = list(&b"\x42\x5a\x68rest"[..], &Limits::default());
        assert!(
            l.problem
                .unwrap()
                .contains("bzip2 compression is not supported")
        );
    }

    /// `lz4 -l` framing of `body` cut into blocks of `block` bytes.
    fn lz4_legacy(body: &[u8], block: usize) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in body.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            v.extend_from_slice(&(c.len() as u32).to_le_bytes());
            v.extend_from_slice(&c);
        }
        v
    }

    #[test]
    fn lz4_legacy_small_blocks_cost_their_size() {
        // 300,000 one-byte blocks: each used to zero-fill an 8 MiB buffer (2.4 TB of memset in all).
        let mut a = Vec::new();
        member(
            &mut a,
            &format!("{KO}/block/virtio_blk.ko"),
            0o100644,
            &[7; 300_000],
            None,
        );
        member(&mut a, "TRAILER!!!", 0, b"", None);
        let l = list(&lz4_legacy(&a, 1)[..], &Limits::default());
        assert_eq!(l.problem, None);
        assert_eq!(l.modules, ["virtio_blk"]);
        // A block that decodes to nothing is refused (a stream of them would never yield a byte).
        let mut empty = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let c = lz4_flex::block::compress(&[]);
        for _ in 0..3 {
            empty.extend_from_slice(&(c.len() as u32).to_le_bytes());
            empty.extend_from_slice(&c);
        }
        let p = list(&empty[..], &Limits::default()).problem.unwrap();
        assert!(p.contains("an lz4 block decodes to nothing"), "{p}");
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("a/b/virtio-blk.ko.zst").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("a/b/file.txt"), None);
    }
}
