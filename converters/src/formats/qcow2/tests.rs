//! Round trips through the writer and reader in memory, and hand-mutated images.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use super::header::Compression;
use super::mapping::{Desc, decode, decompress};
use super::*;
use crate::sink::{MemSink, StreamSink};
use crate::storage::MemStorage;
use crate::writer::{ChunkCompressor, FormatWriter, Plan, Run, WriterOptions};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Writes `disk` (granules that are all zero become Zero runs) with `opts`.
fn write(disk: &[u8], opts: &str, stream: bool) -> Vec<u8> {
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut w = Qcow2Writer::new(&mut o).unwrap();
    o.finish("qcow2").unwrap();
    let g = w.granularity() as usize;
    let size = disk.len() as u64;
    let runs = vec![(0, size)];
    let plan = Plan {
        virtual_size: w.output_virtual_size(size).unwrap(),
        runs: &runs,
    };
    let comp = w.compressor();
    let feed = |w: &mut Qcow2Writer, sink: &mut dyn crate::sink::Sink| {
        w.begin(sink, &plan).unwrap();
        for (i, chunk) in disk.chunks(g).enumerate() {
            let off = (i * g) as u64;
            if chunk.iter().all(|&b| b == 0) {
                w.write_run(sink, off, Run::Zero(chunk.len() as u64))
                    .unwrap();
            } else if let Some(c) = comp.as_ref().and_then(|c| c.compress(chunk).unwrap()) {
                w.write_run(
                    sink,
                    off,
                    Run::Compressed {
                        data: &c,
                        len: chunk.len() as u64,
                    },
                )
                .unwrap();
            } else {
                w.write_run(sink, off, Run::Data(chunk)).unwrap();
            }
        }
        w.finish(sink).unwrap();
    };
    if stream {
        let mut out = Vec::new();
        {
            let mut sink = StreamSink::new(&mut out);
            feed(&mut w, &mut sink);
        }
        out
    } else {
        let mut sink = MemSink::default();
        feed(&mut w, &mut sink);
        sink.data
    }
}

fn open_mem(img: Vec<u8>) -> Result<Qcow2Reader> {
    Qcow2Reader::open(
        Arc::new(MemStorage::new(img, "test.qcow2")),
        &OpenGate::deny_all(),
    )
}

fn read_all(r: &Qcow2Reader) -> Vec<u8> {
    let mut buf = vec![0u8; r.virtual_size() as usize];
    r.read_at(&mut buf, 0).unwrap();
    buf
}

fn sample_disk(size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..100_000].copy_from_slice(&pattern(100_000, 1));
    let mid = size / 2;
    d[mid..mid + 5000].copy_from_slice(&pattern(5000, 7));
    // compressible run
    d[size - 70_000..size - 1].fill(0x5a);
    d
}

#[test]
fn round_trips() {
    let disk = sample_disk(3 << 20 | 1536);
    for opts in [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "compress=on",
        "compress=on,compression_type=zstd",
        "compress=on,cluster_size=4k",
    ] {
        for stream in [false, true] {
            if stream && opts.contains("compress") {
                continue;
            }
            let img = write(&disk, opts, stream);
            let r = open_mem(img).unwrap();
            assert_eq!(
                read_all(&r)[..disk.len()],
                disk[..],
                "{opts} stream={stream}"
            );
            let rep = r.check().unwrap();
            assert_eq!(
                (rep.corruptions, rep.leaks),
                (0, 0),
                "{opts} stream={stream}: {:?}",
                rep.messages
            );
        }
    }
}

#[test]
fn compressed_write_is_smaller_and_maps_data() {
    let disk = sample_disk(2 << 20);
    let plain = write(&disk, "", false);
    let packed = write(&disk, "compress=on", false);
    assert!(packed.len() < plain.len());
    let r = open_mem(packed).unwrap();
    let m = r.extents(0, r.virtual_size()).unwrap();
    assert!(m.bytes(crate::ExtentKind::Data) < (1 << 20));
}

#[test]
fn streaming_refuses_compression() {
    let mut o = WriterOptions::default();
    o.parse_into("compress=on").unwrap();
    let mut w = Qcow2Writer::new(&mut o).unwrap();
    let runs = vec![(0, 65536)];
    let plan = Plan {
        virtual_size: 65536,
        runs: &runs,
    };
    let mut out = Vec::new();
    let mut sink = StreamSink::new(&mut out);
    let e = w.begin(&mut sink, &plan).unwrap_err().to_string();
    assert!(e.contains("seekable"), "{e}");
}

#[test]
fn rejects_bad_options() {
    for bad in [
        "cluster_size=1000",
        "cluster_size=4M",
        "cluster_size=256",
        "compat=0.10",
        "preallocation=full",
        "extended_l2=on",
        "compression_type=lz4",
        "backing_file=x",
        "refcount_bits=64",
    ] {
        let mut o = WriterOptions::default();
        o.parse_into(bad).unwrap();
        assert!(Qcow2Writer::new(&mut o).is_err(), "{bad}");
    }
}

#[test]
fn decompress_rejects_garbage() {
    let mut out = vec![0u8; 65536];
    assert!(decompress(Compression::Zlib, &[0xff; 100], &mut out).is_err());
    assert!(decompress(Compression::Zstd, &[0xff; 100], &mut out).is_err());
    assert!(decompress(Compression::Zlib, &[], &mut out).is_err());
    // a valid stream that is too short
    let c = Qcow2Compressor::new(4096, Compression::Zlib);
    let z = c.compress(&[7u8; 4096]).unwrap().unwrap();
    assert!(decompress(Compression::Zlib, &z, &mut out).is_err());
    let mut ok = vec![0u8; 4096];
    decompress(Compression::Zlib, &z, &mut ok).unwrap();
    assert_eq!(ok, vec![7u8; 4096]);
}

#[test]
fn decode_rules() {
    let flen = 1 << 20;
    // v2 zero flag is corrupt; v3 zero flag is Zero
    assert!(decode(&[1], 0, 0, 16, 2, false, flen).is_err());
    assert_eq!(decode(&[1], 0, 0, 16, 3, false, flen).unwrap(), Desc::Zero);
    // unaligned and past EOF
    assert!(decode(&[0x10200], 0, 0, 16, 3, false, flen).is_err());
    assert!(decode(&[1 << 40], 0, 0, 16, 3, false, flen).is_err());
    // extended: alloc and zero both set; alloc without host
    assert!(decode(&[0x10000, 0x1_0000_0001], 0, 0, 16, 3, true, flen).is_err());
    assert!(decode(&[0, 1], 0, 0, 16, 3, true, flen).is_err());
    assert!(matches!(
        decode(&[0x10000, 0xffff_0000_0000_ffff], 0, 0, 16, 3, true, flen).unwrap(),
        Desc::Sub { .. }
    ));
    // compressed past EOF
    assert!(decode(&[COMPRESSED | (1 << 30)], 0, 0, 16, 3, false, flen).is_err());
}

fn set64(v: &mut [u8], off: usize, x: u64) {
    v[off..off + 8].copy_from_slice(&x.to_be_bytes());
}

#[test]
fn l2_entry_past_eof_fails_on_read() {
    let disk = sample_disk(1 << 20);
    let mut img = write(&disk, "", false);
    let r = open_mem(img.clone()).unwrap();
    let l1_off = r.header().l1_table_offset as usize;
    let l2_off =
        (u64::from_be_bytes(img[l1_off..l1_off + 8].try_into().unwrap()) & OFFSET_MASK) as usize;
    set64(&mut img, l2_off, (1 << 40) | COPIED);
    let r = open_mem(img).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = r.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("past the end"), "{e}");
    assert!(r.check().unwrap().corruptions > 0);
}

#[test]
fn rejects_l1_entries_sharing_an_l2_table() {
    // 2 MiB clusters, a 1 TiB disk: if L1 entry 1 may reuse entry 0's table, each such entry maps 2^39 more
    // bytes from the same 2 MiB of file, and a full L1 would make `extents` walk 2^40 clusters.
    let disk = sample_disk(1 << 20);
    let mut img = write(&disk, "cluster_size=2M", false);
    let r = open_mem(img.clone()).unwrap();
    let l1_off = r.header().l1_table_offset as usize;
    assert!(r.header().l1_size >= 1);
    let e0 = u64::from_be_bytes(img[l1_off..l1_off + 8].try_into().unwrap());
    // grow the disk to two L2 spans and point the second L1 entry at the first entry's table
    set64(&mut img, 24, 2 << 39);
    img[36..40].copy_from_slice(&2u32.to_be_bytes());
    set64(&mut img, l1_off + 8, e0);
    let e = open_mem(img).err().unwrap().to_string();
    assert!(e.contains("two L1 entries share the L2 table"), "{e}");
}

#[test]
fn check_counts_a_shared_refcount_block_past_the_end_once() {
    // Fuzzer finding (qcow2 target, timeout-744125a5): every refcount table entry named one non-zero refcount
    // block, so the check walked table entries x block entries, formatting a leak message for each.
    let disk = sample_disk(1 << 20);
    let mut img = write(&disk, "", false);
    let h = open_mem(img.clone()).unwrap().header().clone();
    let rt = h.refcount_table_offset as usize;
    let first = img[rt..rt + 8].to_vec();
    let entries = (h.refcount_table_clusters * h.cluster_size() / 8) as usize;
    for i in 1..entries {
        img[rt + 8 * i..rt + 8 * i + 8].copy_from_slice(&first);
    }
    let r = open_mem(img).unwrap();
    let t = std::time::Instant::now();
    let rep = r.check().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    // Block 0 holds the refcounts of the file's own clusters; each of the other entries repeats them past the end.
    let nonzero = (h.cluster_size() * 8 / 16).min(1 + r.storage.len() / h.cluster_size());
    assert!(rep.leaks >= (entries as u64 - 1) * 2, "{rep:?}");
    assert!(rep.leaks <= (entries as u64 - 1) * nonzero, "{rep:?}");
    assert!(rep.messages.len() <= CheckReport::MAX_MESSAGES);
}

#[test]
fn check_finds_leaks_and_corruption() {
    let disk = sample_disk(1 << 20);
    let img = write(&disk, "", false);
    let r = open_mem(img.clone()).unwrap();
    let h = r.header().clone();
    let rt = h.refcount_table_offset as usize;
    let rb = (u64::from_be_bytes(img[rt..rt + 8].try_into().unwrap())) as usize;
    // cluster 1 is the first data cluster: drop its refcount to 0 → corruption (and OFLAG_COPIED)
    let mut bad = img.clone();
    bad[rb + 2..rb + 4].copy_from_slice(&0u16.to_be_bytes());
    let rep = open_mem(bad).unwrap().check().unwrap();
    assert!(rep.corruptions > 0, "{:?}", rep.messages);
    // a refcount for a cluster nothing uses → leak (append an unused cluster)
    let mut leak = img.clone();
    let n = leak.len() / 65536;
    leak.resize(leak.len() + 65536, 0);
    leak[rb + 2 * n..rb + 2 * n + 2].copy_from_slice(&1u16.to_be_bytes());
    let rep = open_mem(leak).unwrap().check().unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 1), "{:?}", rep.messages);
}

#[test]
fn refuses_backing_without_format_or_folder() {
    let disk = sample_disk(1 << 20);
    let img = write(&disk, "backing_file=base.raw,backing_fmt=raw", false);
    let e = open_mem(img.clone()).err().unwrap().to_string();
    assert!(e.contains("not a local file"), "{e}");
    // drop the backing format extension: type at byte 112 → unknown type, so the format is lost
    let mut nofmt = img;
    nofmt[112..116].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    let e = open_mem(nofmt).err().unwrap().to_string();
    assert!(e.contains("does not probe"), "{e}");
}

#[test]
fn truncated_and_empty_fail() {
    assert!(open_mem(Vec::new()).is_err());
    let img = write(&sample_disk(1 << 20), "", false);
    assert!(open_mem(img[..100].to_vec()).is_err());
    assert!(open_mem(img[..70_000].to_vec()).is_err());
}

#[test]
fn compresses_big_clusters() {
    let mut chunk = vec![0u8; 2 << 20];
    chunk[..300_000].copy_from_slice(&pattern(300_000, 3));
    for kind in [Compression::Zlib, Compression::Zstd] {
        let c = Qcow2Compressor::new(2 << 20, kind);
        let z = c.compress(&chunk).unwrap().expect("compressible");
        let mut out = vec![0u8; 2 << 20];
        decompress(kind, &z, &mut out).unwrap();
        assert_eq!(out, chunk);
    }
}
