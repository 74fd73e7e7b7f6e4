//! Helpers for the library's integration tests: qemu-img as the oracle, images generated at test time.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use imgshift_converters::{
    ConvertOptions, Format, NoProgress, OpenGate, OutputSet, WriterOptions, convert, create_writer,
    open_path,
};

/// Runs qemu-img with `args`; panics with its stderr (and how to install it) on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils` (the tests' format oracle)")
    });
    if !out.status.success() {
        panic!(
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-img and returns (exit code, stdout+stderr) without judging it.
pub fn qemu_img_status(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils`")
        });
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

/// A fresh temporary folder.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgshift-test")
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

/// Writes a sparse raw file of `size` bytes with deterministic pseudo-random data in `(offset, len)` ranges,
/// explicit zero bytes in `zeros` ranges (allocated but zero), holes elsewhere.
pub fn make_raw(path: &Path, size: u64, data: &[(u64, u64)], zeros: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    for &(off, len) in data {
        let mut buf = vec![0u8; len as usize];
        for chunk in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let b = seed.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        f.write_all_at(&buf, off).unwrap();
    }
    for &(off, len) in zeros {
        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
    }
}

/// Converts `src` to `dst` in `fmt` with imgshift's library, as the CLI does (atomic output).
pub fn imgshift_convert(src: &Path, src_fmt: Option<Format>, dst: &Path, fmt: Format, opts: &str) {
    let source = open_path(src, src_fmt, &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut writer = create_writer(fmt, &mut o).unwrap();
    let (set, mut sink) = OutputSet::new(dst).unwrap();
    convert(
        source.as_ref(),
        writer.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
    set.commit().unwrap();
}

/// Asserts `qemu-img compare` says the two images hold the same content.
pub fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (code, out) = qemu_img_status(&[
        "compare",
        "-f",
        fa,
        "-F",
        fb,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}");
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_check_clean(img: &Path, fmt: &str) {
    let (code, out) = qemu_img_status(&["check", "-f", fmt, img.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {img:?}: {out}");
}

/// Path helper.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

// ---- bounding work, not time ------------------------------------------------------------------------------
//
// A hostile image must not make a reader do unbounded work. The tests prove that by the work done (bytes and
// read calls through the image's storage, or the kernel's count of bytes the reading thread read), never by a
// wall-clock limit: the machine is shared, and a slow run is not a wrong one. The only clock is a hang guard.

/// How long a bounded piece of work may go without an answer before the test fails as hung. A guard against a
/// test that never returns, not a speed claim: every piece of work guarded by it takes well under a second.
pub const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(300);

/// Work done: bytes read and read calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// Bytes read.
    pub bytes: u64,
    /// Read calls.
    pub reads: u64,
}

impl Work {
    /// Panics naming `what` unless at most `max_bytes` were read in at most `max_reads` calls.
    #[track_caller]
    pub fn assert_at_most(&self, what: &str, max_bytes: u64, max_reads: u64) {
        assert!(
            self.bytes <= max_bytes && self.reads <= max_reads,
            "{what}: read {} bytes in {} calls (at most {max_bytes} bytes in {max_reads} calls allowed)",
            self.bytes,
            self.reads
        );
    }
}

/// A [`Storage`] that counts the bytes and read calls made through it (every read of a format reader goes
/// through `read_exact_at`: `read_at_zero_fill` is the trait's default, which calls it).
pub struct CountingStorage {
    inner: std::sync::Arc<dyn imgshift_converters::Storage>,
    bytes: std::sync::atomic::AtomicU64,
    reads: std::sync::atomic::AtomicU64,
}

impl CountingStorage {
    /// Counts reads of `inner`.
    pub fn new(inner: std::sync::Arc<dyn imgshift_converters::Storage>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(CountingStorage {
            inner,
            bytes: 0.into(),
            reads: 0.into(),
        })
    }

    /// An in-memory image, counted.
    pub fn mem(bytes: Vec<u8>, name: &str) -> std::sync::Arc<Self> {
        Self::new(std::sync::Arc::new(imgshift_converters::MemStorage::new(
            bytes, name,
        )))
    }

    /// The work done through this storage so far.
    pub fn work(&self) -> Work {
        use std::sync::atomic::Ordering::Relaxed;
        Work {
            bytes: self.bytes.load(Relaxed),
            reads: self.reads.load(Relaxed),
        }
    }
}

impl imgshift_converters::Storage for CountingStorage {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.reads.fetch_add(1, Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Relaxed);
        self.inner.read_exact_at(buf, offset)
    }
    fn data_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> imgshift_converters::Result<Option<Vec<(u64, u64)>>> {
        self.inner.data_ranges(offset, len)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
}

/// Runs `f` on its own thread and returns its result; fails the test as hung when it gives no answer within
/// [`HANG_GUARD`]. A panic in `f` is the test's panic.
#[track_caller]
pub fn no_hang<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG_GUARD) {
        Ok(v) => {
            let _ = handle.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker ended without an answer or a panic"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "{what}: hung (no answer after {} s; a hang guard, not a speed limit)",
            HANG_GUARD.as_secs()
        ),
    }
}

/// The kernel's count of what the calling thread has read: (rchar, syscr) from /proc/thread-self/io. It
/// counts every read(2)/pread(2) of the thread, so it covers files a reader opens itself (extents, backing
/// files) as well as the image.
fn thread_io() -> Work {
    let text = std::fs::read_to_string("/proc/thread-self/io")
        .expect("/proc/thread-self/io (Linux >= 3.17 with task I/O accounting)");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/thread-self/io: {text}"))
    };
    Work {
        bytes: field("rchar:"),
        reads: field("syscr:"),
    }
}

/// Runs `f` on its own thread (under the hang guard) and returns its result with what that thread read from
/// files meanwhile (format readers do their opening, mapping and checking on the calling thread). The two
/// reads of /proc/thread-self/io that bracket `f` count too (a few hundred bytes, two calls).
#[track_caller]
pub fn file_work<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Work) {
    no_hang(what, move || {
        let before = thread_io();
        let v = f();
        let after = thread_io();
        (
            v,
            Work {
                bytes: after.bytes - before.bytes,
                reads: after.reads - before.reads,
            },
        )
    })
}
