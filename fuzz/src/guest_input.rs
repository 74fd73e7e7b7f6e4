//! Guest inputs for the guest-parser targets: imgshift's whole `src/guest/` tree is compiled into this crate
//! (it lives in the binary crate, which a fuzz target cannot link), and a disk or filesystem input comes in the
//! sparse encoding of [`crate::run_sparse`], served by [`SparseStorage`] without materialising the zeros: a
//! filesystem is megabytes of mostly zeros (an NTFS volume holding a registry hive is tens of MiB), and its
//! size is one of the fields a mutation should move freely.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use imgshift_converters::formats::raw::RawReader;
use imgshift_converters::{DiskSource, MemStorage, Storage};

use crate::guest::Window;

/// Most records of one sparse input: real seeds have a few hundred; the cap keeps a read's overlay loop short.
pub const MAX_RECORDS: usize = 4096;

/// A file that is zeros except where records put bytes: `[u32 LE file length]`, then records
/// `[u32 LE offset][u16 LE length][bytes]` (later records win; bytes past the end are dropped).
pub struct SparseStorage {
    len: u64,
    bytes: Vec<u8>,
    /// (file offset, start in `bytes`, length), in input order.
    records: Vec<(u64, usize, usize)>,
}

impl SparseStorage {
    /// Decodes an input; `None` when it is shorter than the length field.
    pub fn decode(data: &[u8]) -> Option<SparseStorage> {
        let (len, mut rest) = data.split_first_chunk::<4>()?;
        let len = u64::from(u32::from_le_bytes(*len));
        let mut bytes = Vec::with_capacity(rest.len());
        let mut records = Vec::new();
        while let Some((head, tail)) = rest.split_first_chunk::<6>() {
            if records.len() >= MAX_RECORDS {
                break;
            }
            let [o0, o1, o2, o3, n0, n1] = *head;
            let off = u64::from(u32::from_le_bytes([o0, o1, o2, o3]));
            let n = usize::from(u16::from_le_bytes([n0, n1])).min(tail.len());
            let (chunk, after) = tail.split_at(n);
            let keep = usize::try_from(len.saturating_sub(off))
                .unwrap_or(usize::MAX)
                .min(n);
            if keep > 0 {
                records.push((off, bytes.len(), keep));
                bytes.extend_from_slice(&chunk[..keep]);
            }
            rest = after;
        }
        Some(SparseStorage {
            len,
            bytes,
            records,
        })
    }
}

impl Storage for SparseStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(imgshift_converters::Error::io_plain(
                "read",
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        let end = offset + buf.len() as u64;
        buf.fill(0);
        for &(at, from, n) in &self.records {
            let rec_end = at + n as u64;
            if rec_end <= offset || at >= end {
                continue;
            }
            let s = at.max(offset);
            let e = rec_end.min(end);
            let dst = (s - offset) as usize;
            let src = from + (s - at) as usize;
            let m = (e - s) as usize;
            buf[dst..dst + m].copy_from_slice(&self.bytes[src..src + m]);
        }
        Ok(())
    }

    fn name(&self) -> String {
        "fuzz-input".into()
    }
}

/// A guest window over a sparse input, as inspection makes one over a raw disk.
pub fn sparse_window(data: &[u8]) -> Option<Window> {
    let storage: Arc<dyn Storage> = Arc::new(SparseStorage::decode(data)?);
    window(storage)
}

/// A guest window over plain bytes.
pub fn plain_window(data: &[u8]) -> Option<Window> {
    window(Arc::new(MemStorage::new(data.to_vec(), "fuzz-input")))
}

fn window(storage: Arc<dyn Storage>) -> Option<Window> {
    let src: Arc<dyn DiskSource> = Arc::new(RawReader::open(storage).ok()?);
    Some(Window::whole(src, Arc::new(AtomicU64::new(0))))
}

/// Makes a panic inside a third-party crate (`.cargo/registry` sources: ext4-view, fatfs, ntfs, gpt, ...) behave
/// as in inspection, which runs those crates under `guest::no_panic` (`catch_unwind`): it unwinds to the nearest
/// `catch_unwind` instead of aborting at once. libfuzzer-sys's own hook aborts on every panic, caught or not. A
/// panic in imgshift's code still aborts here, and a crate panic that nothing catches still reaches the
/// `fuzz_target!` wrapper, which aborts: both stay findings. Targets call their parser the way inspection does
/// (inside `catch_unwind` where inspection has `no_panic`).
pub fn contain_crate_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if file.contains("/.cargo/registry/") {
                return;
            }
            eprintln!("{info}");
            std::process::abort();
        }));
    });
}

/// Runs `f` as `guest::no_panic` does in inspection: a panic becomes `None`.
pub fn no_panic<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}
