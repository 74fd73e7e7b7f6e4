//! Resource bounds: headers that claim enormous tables or disks are refused (or, when the claim is legal but
//! the allocation tiny, opened and mapped) after reading a few of the image's bytes, never what the header
//! claims. Work is counted (bytes and read calls through the image's storage), not timed; the only clock is
//! the hang guard in `util::no_hang`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::sync::Arc;

use imgshift_converters::{DiskSource, ErrorKind, ExtentKind, FileStorage, Format, OpenGate, open};
use util::*;

/// What a refusal may read: the headers and small tables (a qcow2 header is one cluster, up to 2 MiB here),
/// never the table or disk the header claims (the smallest claim below is a 64 MiB table).
const REFUSAL_BYTES: u64 = 4 << 20;
/// Read calls a refusal may make.
const REFUSAL_READS: u64 = 64;

/// A qemu-img image as bytes.
fn image(fmt: &str, opts: &str, size: &str) -> Vec<u8> {
    let dir = tmpdir();
    let path = p(dir.path(), "img");
    let path_s = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", fmt, "-o", opts, path_s, size]);
    std::fs::read(&path).unwrap()
}

/// Opens `bytes` as `format` with a deny-all gate; returns the outcome and the work done through the storage.
fn counted_open(
    bytes: Vec<u8>,
    format: Format,
) -> (imgshift_converters::Result<Box<dyn DiskSource>>, Work) {
    no_hang("open", move || {
        let storage = CountingStorage::mem(bytes, "test image");
        let r = open(storage.clone(), Some(format), &OpenGate::deny_all());
        (r, storage.work())
    })
}

fn expect_cheap_refusal(bytes: Vec<u8>, format: Format, kind: ErrorKind, text: &str) {
    let (r, work) = counted_open(bytes, format);
    let e = r.err().expect("the image must be refused");
    eprintln!("{text}: refused after {work:?}");
    work.assert_at_most("the refusal", REFUSAL_BYTES, REFUSAL_READS);
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(text), "{e}");
}

#[test]
fn qcow2_with_a_2_62_byte_virtual_size_is_refused_cheaply() {
    let mut b = image("qcow2", "cluster_size=2M", "1M");
    // size (offset 24): 2^62 bytes needs an L1 of 2^23 entries (64 MiB) even with 2 MiB clusters.
    b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes());
    expect_cheap_refusal(
        b,
        Format::Qcow2,
        ErrorKind::Limit,
        "needs an L1 table above qemu's 32 MiB limit",
    );
}

#[test]
fn qcow2_with_an_l1_of_2_31_entries_is_refused_before_reading_it() {
    let mut b = image("qcow2", "cluster_size=64k", "1M");
    // l1_size (offset 36): 2^31 entries = 16 GiB of table.
    b[36..40].copy_from_slice(&(1u32 << 31).to_be_bytes());
    expect_cheap_refusal(
        b,
        Format::Qcow2,
        ErrorKind::Limit,
        "above qemu's 32 MiB L1 limit",
    );
}

#[test]
fn qcow2_of_2_eib_with_one_cluster_allocated_opens_and_maps_cheaply() {
    // The largest disk qemu's 32 MiB L1 can describe with 2 MiB clusters: 2^22 L2 tables of 2^39 bytes each.
    let dir = tmpdir();
    let path = p(dir.path(), "big.qcow2");
    let s = path.to_str().unwrap();
    let size: u64 = 1 << 61;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s,
        &size.to_string(),
    ]);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 4M 64k", s])
        .output()
        .expect("qemu-io (apt-get install qemu-utils)");
    assert!(out.status.success());
    let file_len = std::fs::metadata(&path).unwrap().len();
    let (map, buf, tail, work) = no_hang("open + map + reads", move || {
        let storage = CountingStorage::new(Arc::new(FileStorage::open(&path).unwrap()));
        let src = open(storage.clone(), Some(Format::Qcow2), &OpenGate::deny_all()).unwrap();
        assert_eq!(src.virtual_size(), size);
        let map = src.extents(0, size).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        src.read_at(&mut buf, 4 << 20).unwrap();
        let mut tail = vec![1u8; 1 << 20];
        src.read_at(&mut tail, size - (1 << 20)).unwrap();
        (map, buf, tail, storage.work())
    });
    eprintln!("2 EiB qcow2 of {file_len} bytes: open + map + reads did {work:?}");
    // The whole file at most (header, the 32 MiB L1, one L2 table, one data cluster), read about once: mapping
    // 2 EiB walks the L1 in memory and reads no L2 table for an empty entry, and the unallocated tail is not read.
    work.assert_at_most("open + map + reads", file_len, 64);
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.start, e.len))
        .collect();
    assert_eq!(data, vec![(4 << 20, 2 << 20)]);
    assert!(buf.iter().all(|&x| x == 0x5a));
    assert!(tail.iter().all(|&x| x == 0));
}

#[test]
fn vmdk_claiming_10_9_grain_tables_is_refused_before_reading_the_directory() {
    let mut b = image("vmdk", "subformat=monolithicSparse", "1M");
    // capacity (12) = 8e9 sectors, grainSize (20) = 8 sectors, numGTEsPerGT (44) = 1: 10^9 grain tables.
    b[12..20].copy_from_slice(&8_000_000_000u64.to_le_bytes());
    b[20..28].copy_from_slice(&8u64.to_le_bytes());
    b[44..48].copy_from_slice(&1u32.to_le_bytes());
    expect_cheap_refusal(
        b,
        Format::Vmdk,
        ErrorKind::Limit,
        "grain directory of 1000000000 entries",
    );
}

/// The metadata item value offset of `item` (a GUID as stored) in a VHDX image.
fn vhdx_item(b: &[u8], item: &[u8; 16]) -> usize {
    let rt = 192 << 10;
    let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let le64 = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    // Metadata region GUID 8B7CA206-4790-4B9A-B8FE-575F050F886E, as stored.
    let meta_guid = [
        0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88,
        0x6e,
    ];
    let meta = (0..le32(rt + 8))
        .map(|i| rt + 16 + 32 * i)
        .find(|&e| b[e..e + 16] == meta_guid)
        .map(|e| le64(e + 16))
        .unwrap();
    let count = u16::from_le_bytes([b[meta + 10], b[meta + 11]]) as usize;
    (0..count)
        .map(|i| meta + 32 + 32 * i)
        .find(|&e| &b[e..e + 16] == item)
        .map(|e| meta + le32(e + 16))
        .unwrap()
}

#[test]
fn vhdx_claiming_a_2_40_entry_bat_is_refused_cheaply() {
    let mut b = image("vhdx", "block_size=1M,log_size=1M", "8M");
    // Virtual disk size item 2FA54224-CD1B-4876-B211-5DBED83BF4B8: 2^40 blocks of 1 MiB.
    let vsize = vhdx_item(
        &b,
        &[
            0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b,
            0xf4, 0xb8,
        ],
    );
    b[vsize..vsize + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let (r, work) = counted_open(b.clone(), Format::Vhdx);
    let e = r.err().expect("refused");
    work.assert_at_most("the refusal", REFUSAL_BYTES, REFUSAL_READS);
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
    // Within the 64 TiB limit, a BAT larger than its region is refused before any of it is read.
    b[vsize..vsize + 8].copy_from_slice(&(60u64 << 40).to_le_bytes());
    expect_cheap_refusal(b, Format::Vhdx, ErrorKind::Corrupt, "the BAT needs");
}
