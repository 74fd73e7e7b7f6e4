//! The shared body of every fuzz target: open an in-memory image as one format (after probing it, with a
//! deny-all gate so nothing outside the input is ever opened), then map, read and check it within fixed
//! budgets, so a crafted virtual size of 2^62 bytes cannot make one input run for long.

use std::sync::Arc;

use imgshift_converters::{DiskSource, Format, MemStorage, OpenGate, Storage, formats};

/// Most guest bytes read per input (the brief: "cap total bytes read, e.g. <= 8 MiB per input").
pub const MAX_READ_BYTES: u64 = 8 << 20;
/// Largest single read; reads are split into chunks of at most this size.
pub const MAX_CHUNK: u64 = 1 << 20;
/// Ranges sampled per input: the start, the end and evenly spread points in between.
pub const SAMPLES: u64 = 16;

/// Runs one input as `format`. Errors are the expected outcome for most inputs; only panics, hangs and
/// out-of-memory count as findings.
pub fn run(format: Format, data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(data.to_vec(), "fuzz-input"));
    // Probing must never panic either, whatever it answers.
    let _ = formats::probe::probe(storage.as_ref());
    let gate = OpenGate::deny_all();
    let Ok(src) = formats::open(storage, Some(format), &gate) else {
        return;
    };
    exercise(src.as_ref());
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
        // Spread sample starts over the disk; the last one ends exactly at the end of the disk.
        let want = MAX_READ_BYTES / (SAMPLES + 1);
        let start = if i == SAMPLES {
            size.saturating_sub(want)
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
