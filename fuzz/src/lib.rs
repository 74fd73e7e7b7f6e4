//! The shared body of every fuzz target: open an in-memory image as one format (after probing it, with a
//! deny-all gate so nothing outside the input is ever opened), then map, read and check it within fixed
//! budgets, so a crafted virtual size of 2^62 bytes cannot make one input run for long.
//!
//! The guest-parser targets use [`guest`] (imgshift's `src/guest/`, compiled in) and [`guest_input`].

use std::cell::RefCell;

/// imgshift's guest inspection (`src/guest/`), compiled into the fuzz crate: it lives in the binary crate,
/// which a fuzz target cannot link. The same source files, not a copy.
#[path = "../../src/guest/mod.rs"]
#[allow(dead_code, clippy::all)]
pub mod guest;
pub mod guest_input;
use std::sync::Arc;

use imgshift_converters::{DiskSource, Format, MemStorage, OpenGate, Storage, formats};

/// Most guest bytes read per input. Small on purpose: the reads only need to reach every mapping path
/// (allocated, zero, compressed, backing, past-EOF pieces and piece boundaries), not to move much data, and
/// each executed input costs time proportional to what it reads (an 8 MiB budget made qcow2 ~30x slower).
pub const MAX_READ_BYTES: u64 = 256 << 10;
/// Largest single read; reads are split into chunks of at most this size (kept under ASan's 128 KiB
/// large-allocation threshold so the read buffer is not an mmap/munmap per input).
pub const MAX_CHUNK: u64 = 64 << 10;
/// Ranges sampled per input: the start, the end and evenly spread points in between.
pub const SAMPLES: u64 = 16;

/// Largest file a sparse input ([`run_sparse`]) describes.
pub const SPARSE_MAX_FILE: usize = 16 << 20;

/// Runs one input as `format`. Errors are the expected outcome for most inputs; only panics, hangs and
/// out-of-memory count as findings.
pub fn run(format: Format, data: &[u8]) {
    // The input's copy reuses one buffer across executions: a fresh multi-MiB allocation per input (VHDX
    // inputs are at least 3 MiB) is an mmap, page faults and munmap under ASan, most of an execution's time.
    let bytes = BUFFER.with_borrow_mut(|b| {
        let mut v = std::mem::take(b);
        v.clear();
        v.extend_from_slice(data);
        v
    });
    run_bytes(format, bytes);
}

/// Runs one input in the sparse encoding, for formats whose smallest valid file is megabytes of mostly zeros
/// (a VHDX is at least 3 MiB): `[u32 LE file length]` then records `[u32 LE offset][u16 LE length][bytes]`; the
/// file is zeros except where records put bytes (later records win; the length is capped at
/// [`SPARSE_MAX_FILE`], bytes past it are dropped). libFuzzer then copies and mutates kilobytes per execution
/// instead of megabytes (the plain 3-4 MiB VHDX inputs ran at ~240 executions/s), and a mutated offset moves a
/// structure. `fuzz/sparse-seed.py` encodes a real image this way.
pub fn run_sparse(format: Format, data: &[u8]) {
    let Some((len, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let file_len = usize::try_from(u32::from_le_bytes(*len))
        .unwrap_or(usize::MAX)
        .min(SPARSE_MAX_FILE);
    let mut bytes = BUFFER.with_borrow_mut(std::mem::take);
    bytes.clear();
    bytes.resize(file_len, 0);
    while let Some((head, tail)) = rest.split_first_chunk::<6>() {
        let [o0, o1, o2, o3, n0, n1] = *head;
        let off = usize::try_from(u32::from_le_bytes([o0, o1, o2, o3])).unwrap_or(usize::MAX);
        let n = usize::from(u16::from_le_bytes([n0, n1])).min(tail.len());
        let (chunk, after) = tail.split_at(n);
        if off < file_len {
            let m = n.min(file_len - off);
            bytes[off..off + m].copy_from_slice(&chunk[..m]);
        }
        rest = after;
    }
    run_bytes(format, bytes);
}

fn run_bytes(format: Format, bytes: Vec<u8>) {
    let mem = Arc::new(MemStorage::new(bytes, "fuzz-input"));
    let storage: Arc<dyn Storage> = mem.clone();
    // Probing must never panic either, whatever it answers.
    let _ = formats::probe::probe(storage.as_ref());
    if format == Format::Qcow2 {
        qcow2_bitmaps(storage.as_ref());
    }
    let gate = OpenGate::deny_all();
    if let Ok(src) = formats::open(storage, Some(format), &gate) {
        exercise(src.as_ref());
    }
    // Every reader is dropped by now; take the buffer back for the next input.
    if let Some(v) = Arc::into_inner(mem).and_then(MemStorage::into_inner) {
        BUFFER.set(v);
    }
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Maps the whole disk, reads a bounded sample and runs the check.
pub fn exercise(src: &dyn DiskSource) {
    let _ = src.info();
    let size = src.virtual_size();
    let _ = src.extents(0, size);
    let mut budget = MAX_READ_BYTES;
    let mut buf = Vec::new();
    for i in 0..=SAMPLES {
        if budget == 0 || size == 0 {
            break;
        }
        // Spread sample starts over the disk; the last one ends exactly at the end of the disk. Odd samples
        // start half a sample before their point, so a read straddles the cluster/block boundary that a
        // power-of-two disk size puts there.
        let want = MAX_READ_BYTES / (SAMPLES + 1);
        let start = if i == SAMPLES {
            size.saturating_sub(want)
        } else if i % 2 == 1 {
            (size / SAMPLES).saturating_mul(i).saturating_sub(want / 2)
        } else {
            (size / SAMPLES).saturating_mul(i)
        };
        let len = want.min(size - start).min(budget);
        read_range(src, start, len, &mut buf);
        // A small unaligned read too: odd offsets find split-piece bugs.
        if start.saturating_add(len) < size {
            let odd = (start + 511).min(size - 1);
            let n = 1023u64.min(size - odd);
            read_range(src, odd, n, &mut buf);
        }
        budget = budget.saturating_sub(len);
    }
    let _ = src.check();
}

/// Most dirty ranges taken from one bitmap per input (the walk stops there with an error).
const MAX_DIRTY_RANGES: u32 = 1 << 16;

/// The qcow2 bitmaps extension: the directory, then every bitmap's table and data as dirty ranges.
fn qcow2_bitmaps(storage: &dyn Storage) {
    use formats::qcow2::bitmaps;
    let Ok(h) = bitmaps::read_header(storage) else {
        return;
    };
    let Ok(list) = bitmaps::list(storage, &h) else {
        return;
    };
    for b in list {
        let mut n = 0u32;
        let _ = bitmaps::for_each_dirty(storage, &h, &b.name, &mut |_, _| {
            n += 1;
            if n > MAX_DIRTY_RANGES {
                return Err(imgshift_converters::Error::input("enough ranges"));
            }
            Ok(())
        });
    }
}

fn read_range(src: &dyn DiskSource, start: u64, len: u64, buf: &mut Vec<u8>) {
    let mut pos = start;
    let end = start + len;
    while pos < end {
        let n = (end - pos).min(MAX_CHUNK);
        buf.resize(n as usize, 0);
        let _ = src.extents(pos, n);
        if src.read_at(buf, pos).is_err() {
            return;
        }
        pos += n;
    }
}
