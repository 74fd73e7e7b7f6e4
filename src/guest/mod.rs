//! Offline, read-only guest inspection through a `DiskSource`: partitions, filesystems, OS facts, boot drivers,
//! and per-target preflight rules. Every read is bounded: a crafted guest yields findings, never a panic.

pub mod boot;
pub mod fs;
pub mod hive;
pub mod initramfs;
pub mod os;
pub mod partitions;
pub mod preflight;
pub mod report;
pub mod windows;

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imgshift_converters::DiskSource;

/// A byte window `[base, base+len)` of a virtual disk, read-only. Implements `Read + Seek` (for partition-table
/// crates), a `Write` that always fails (the `gpt` crate demands one even read-only) and ext4-view's `Ext4Read`.
///
/// A window owns its disk (`Window`, what inspection keeps and hands to ext4-view) or borrows it
/// (`WindowOf<'a>` from [`WindowOf::borrowed`], for a caller that holds only a `&dyn DiskSource`).
#[derive(Clone)]
pub struct WindowOf<'a> {
    src: Src<'a>,
    base: u64,
    len: u64,
    pos: u64,
    counter: Arc<AtomicU64>,
}

/// A window over a disk it owns.
pub type Window = WindowOf<'static>;

#[derive(Clone)]
enum Src<'a> {
    Shared(Arc<dyn DiskSource>),
    Borrowed(&'a dyn DiskSource),
}

impl Src<'_> {
    fn get(&self) -> &dyn DiskSource {
        match self {
            Src::Shared(s) => s.as_ref(),
            Src::Borrowed(s) => *s,
        }
    }
}

impl Window {
    /// The whole disk.
    pub fn whole(src: Arc<dyn DiskSource>, counter: Arc<AtomicU64>) -> Window {
        let len = src.virtual_size();
        WindowOf {
            src: Src::Shared(src),
            base: 0,
            len,
            pos: 0,
            counter,
        }
    }
}

impl<'a> WindowOf<'a> {
    /// The whole of a borrowed disk.
    pub fn borrowed(src: &'a dyn DiskSource, counter: Arc<AtomicU64>) -> WindowOf<'a> {
        WindowOf {
            src: Src::Borrowed(src),
            base: 0,
            len: src.virtual_size(),
            pos: 0,
            counter,
        }
    }

    /// A sub-window; `None` when it does not lie inside this one.
    pub fn sub(&self, offset: u64, len: u64) -> Option<WindowOf<'a>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(WindowOf {
            src: self.src.clone(),
            base: self.base.checked_add(offset)?,
            len,
            pos: 0,
            counter: Arc::clone(&self.counter),
        })
    }

    /// Size of the window in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Fills `buf` from `offset` inside the window; fails when the range leaves it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = buf.len() as u64;
        match offset.checked_add(n) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {n} bytes at {offset} leaves the {} byte region",
                        self.len
                    ),
                ));
            }
        }
        let abs = self
            .base
            .checked_add(offset)
            .ok_or_else(|| io::Error::other("offset overflow"))?;
        self.counter.fetch_add(n, Ordering::Relaxed);
        self.src.get().read_at(buf, abs).map_err(io::Error::other)
    }

    /// Reads up to `n` bytes at `offset`, truncated at the window's end.
    pub fn read_vec(&self, offset: u64, n: usize) -> io::Result<Vec<u8>> {
        let avail = usize::try_from(self.len.saturating_sub(offset)).unwrap_or(usize::MAX);
        let mut v = vec![0u8; n.min(avail)];
        self.read_at(&mut v, offset)?;
        Ok(v)
    }
}

impl std::fmt::Debug for WindowOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Window({}+{})", self.base, self.len)
    }
}

impl Read for WindowOf<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = usize::try_from(self.len.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let n = buf.len().min(avail);
        if n == 0 {
            return Ok(0);
        }
        let (head, _) = buf.split_at_mut(n);
        self.read_at(head, self.pos)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

impl Seek for WindowOf<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the disk",
            )),
        }
    }
}

impl Write for WindowOf<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "inspection is read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for WindowOf<'_> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_at(dst, start_byte).map_err(Into::into)
    }
}

/// Runs a third-party parser on guest data; a panic inside it (a crate bug on crafted input) becomes `None`
/// instead of ending the inspection, and the caller names it in one problem line. The checks done before
/// calling such crates are the first line of defence.
///
/// Such a panic prints nothing: the panic hook (installed once, wrapping the previous one) stays quiet for a
/// panic raised inside `no_panic` from a dependency's source (`.cargo/registry` or a `vendor` folder), and hands
/// every other panic to the previous hook (found by the guest fuzz targets: ntfs 0.4 indexes a slice out of
/// range on a crafted index entry, and the default hook printed its message and backtrace although inspection
/// went on).
pub(crate) fn no_panic<T>(f: impl FnOnce() -> T) -> Option<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            let dependency = file.contains("/.cargo/registry/") || file.contains("/vendor/");
            if !(dependency && CONTAINED.get()) {
                previous(info);
            }
        }));
    });
    let outer = CONTAINED.replace(true);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.set(outer);
    r.ok()
}

thread_local! {
    /// Inside [`no_panic`] on this thread.
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Little-endian field readers that return `None` instead of panicking when out of range.
pub(crate) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A window over bytes in memory, for unit tests.
#[cfg(test)]
pub(crate) fn mem_window(bytes: Vec<u8>) -> Window {
    use imgshift_converters::MemStorage;
    use imgshift_converters::formats::raw::RawReader;
    let reader = RawReader::open(Arc::new(MemStorage::new(bytes, "mem")));
    let src: Arc<dyn DiskSource> = match reader {
        Ok(r) => Arc::new(r),
        Err(e) => panic!("raw reader: {e}"),
    };
    Window::whole(src, Arc::new(AtomicU64::new(0)))
}
