#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::os::unix::fs::FileExt;
use std::path::Path;

use imgshift_converters::formats::vhdx::{Guid, checksum};
use imgshift_converters::{
    ConvertOptions, DiskSource, ExtentKind, Format, NoProgress, OpenGate, StreamSink,
    WriterOptions, convert, create_writer, open_path, resolved_extents,
};
use util::*;

const MIB: u64 = 1 << 20;
/// Metadata region GUID as stored on disk.
const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
const FILE_PARAMS_GUID: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VSIZE_GUID: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const PARENT_LOCATOR_GUID: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];
const VHDX_PARENT_TYPE: [u8; 16] = [
    0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13,
];

/// A raw source with data, explicit zeros and holes, of `size` bytes.
fn source_raw(path: &Path, size: u64) {
    make_raw(
        path,
        size,
        &[
            (0, 64 * 1024),
            (3 * MIB + 4096, 2 * MIB),
            (9 * MIB, 512 * 1024),
            (size - 8192, 8192),
        ],
        &[(12 * MIB, 2 * MIB)],
    );
}

fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn put(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Recomputes the CRC-32C of the structure of `len` bytes at `off` (checksum field at +4).
fn fix_crc(path: &Path, off: u64, len: usize) {
    let mut b = read(path, off, len);
    let crc = checksum(&b, 4);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    put(path, off + 4, &b[4..8]);
}

/// File offset of the region with `guid` (from the first region table).
fn region_offset(path: &Path, guid: &[u8; 16]) -> u64 {
    let rt = read(path, 192 * 1024, 64 * 1024);
    let n = u32_at(&rt, 8) as usize;
    (0..n)
        .map(|i| &rt[16 + 32 * i..48 + 32 * i])
        .find(|e| &e[..16] == guid)
        .map(|e| u64_at(e, 16))
        .unwrap()
}

/// File offset of the metadata item `guid`.
fn item_offset(path: &Path, guid: &[u8; 16]) -> u64 {
    let md = region_offset(path, &METADATA_GUID);
    let t = read(path, md, 64 * 1024);
    let n = u16::from_le_bytes([t[10], t[11]]) as usize;
    (0..n)
        .map(|i| &t[32 + 32 * i..64 + 32 * i])
        .find(|e| &e[..16] == guid)
        .map(|e| md + u64::from(u32_at(e, 16)))
        .unwrap()
}

/// Patches a field of both headers and fixes their checksums.
fn patch_headers(path: &Path, field: u64, bytes: &[u8]) {
    for h in [64 * 1024u64, 128 * 1024] {
        put(path, h + field, bytes);
        fix_crc(path, h, 4096);
    }
}

fn to_raw_with_imgshift(img: &Path, out: &Path) {
    imgshift_convert(img, Some(Format::Vhdx), out, Format::Raw, "");
}

/// qemu-img's VHDX of the raw image `raw`, with creation options `opts`.
fn raw_to_vhdx(raw: &Path, out: &Path, opts: &str) {
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        opts,
        raw.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
}

fn open_vhdx(path: &Path) -> imgshift_converters::Result<Box<dyn DiskSource>> {
    open_path(path, Some(Format::Vhdx), &OpenGate::new())
}

/// Opens and maps the whole disk and reads it all; the first error wins.
fn open_and_read_all(path: &Path) -> imgshift_converters::Result<()> {
    let img = open_vhdx(path)?;
    let size = img.virtual_size();
    resolved_extents(img.as_ref(), 0, size)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size.min(64 * MIB) {
        let n = (size - at).min(MIB) as usize;
        img.read_at(&mut buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn assert_refused(path: &Path, what: &str) {
    let owned = path.to_path_buf();
    let (r, work) = file_work(what, move || open_and_read_all(&owned));
    assert!(
        r.is_err(),
        "{what}: expected an error, the image opened and read fine"
    );
    eprintln!("{what}: {work:?}: {}", r.err().unwrap());
    // open_and_read_all reads at most 64 MiB of disk; a refusal reads the headers, the metadata and at most a
    // BAT the file really holds, never a BAT or log a field claims.
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    work.assert_at_most(what, 2 * len + 4 * MIB, 4096);
}

#[test]
fn reads_qemu_images() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    // not a multiple of any block size
    let size = 37 * MIB + 3 * 4096;
    source_raw(&raw, size);
    for (i, opts) in [
        "",
        "block_size=1M",
        "block_size=256M",
        "subformat=fixed",
        "subformat=fixed,block_size=1M",
        "block_state_zero=off",
        "log_size=3M",
    ]
    .iter()
    .enumerate()
    {
        let img = p(d.path(), &format!("q{i}.vhdx"));
        let out = p(d.path(), &format!("q{i}.raw"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(&args);
        to_raw_with_imgshift(&img, &out);
        assert_same(&raw, "raw", &out, "raw");
        let info = open_vhdx(&img).unwrap().info();
        assert!(info.cluster_size.is_some(), "{opts}");
        assert!(!info.dirty);
    }
}

#[test]
fn reads_large_sparse_image() {
    let d = tmpdir();
    let raw = p(d.path(), "big.raw");
    let size = 5 * (1 << 30) + 7 * MIB + 512;
    make_raw(
        &raw,
        size,
        &[(MIB, 4096), ((4 << 30) + 3 * MIB, MIB), (size - 4096, 4096)],
        &[],
    );
    let img = p(d.path(), "big.vhdx");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vhdx",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let src = open_vhdx(&img).unwrap();
    assert_eq!(src.virtual_size(), size);
    // Allocation follows the data: holes are Zero, only the touched blocks (16 MiB each) are Data.
    let map = resolved_extents(src.as_ref(), 0, size).unwrap();
    assert!(map.bytes(ExtentKind::Data) <= 3 * 16 * MIB, "{map:?}");
    assert!(map.bytes(ExtentKind::Zero) >= size - 3 * 16 * MIB);
    let out = p(d.path(), "big.out.raw");
    to_raw_with_imgshift(&img, &out);
    assert_same(&raw, "raw", &out, "raw");
}

#[test]
fn writes_vhdx_qemu_accepts() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    let size = 37 * MIB + 3 * 4096;
    source_raw(&raw, size);
    for (i, opts) in [
        "",
        "block_size=1M",
        "block_size=2M,subformat=fixed",
        "block_size=256M",
        "subformat=fixed",
        "block_state_zero=off,log_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let img = p(d.path(), &format!("w{i}.vhdx"));
        imgshift_convert(&raw, Some(Format::Raw), &img, Format::Vhdx, opts);
        assert_check_clean(&img, "vhdx");
        assert_same(&raw, "raw", &img, "vhdx");
        // and imgshift reads its own output
        let back = p(d.path(), &format!("w{i}.raw"));
        to_raw_with_imgshift(&img, &back);
        assert_same(&raw, "raw", &back, "raw");
    }
    // 4096-byte logical sectors (Azure Ultra / Premium v2 accept 4K VHDX): qemu 10 refuses to open any VHDX
    // whose logical sector is not 512 ("Operation not supported"), so only imgshift's reader checks this one.
    for (i, opts) in [
        "logical_sector_size=4096,block_size=4M",
        "logical_sector_size=4096,subformat=fixed,block_size=1M",
    ]
    .iter()
    .enumerate()
    {
        let img = p(d.path(), &format!("k{i}.vhdx"));
        imgshift_convert(&raw, Some(Format::Raw), &img, Format::Vhdx, opts);
        let back = p(d.path(), &format!("k{i}.raw"));
        to_raw_with_imgshift(&img, &back);
        assert_same(&raw, "raw", &back, "raw");
        let src = open_vhdx(&img).unwrap();
        assert_eq!(src.check().unwrap().corruptions, 0);
    }
    // dynamic output allocates only blocks with data (the explicit zeros are not stored)
    let img = p(d.path(), "w1.vhdx");
    let src = open_vhdx(&img).unwrap();
    let map = resolved_extents(src.as_ref(), 0, size).unwrap();
    assert!(map.bytes(ExtentKind::Data) <= 6 * MIB, "{map:?}");
}

fn convert_streaming(src: &Path, dst: &Path, opts: &str) {
    let source = open_path(src, None, &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut w = create_writer(Format::Vhdx, &mut o).unwrap();
    let mut sink = StreamSink::new(std::fs::File::create(dst).unwrap());
    convert(
        source.as_ref(),
        w.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
}

#[test]
fn writes_streaming_layout() {
    let d = tmpdir();
    let raw = p(d.path(), "src.raw");
    let size = 37 * MIB + 3 * 4096;
    source_raw(&raw, size);
    for (i, opts) in [
        "",
        "block_size=1M",
        "subformat=fixed,block_size=4M",
        "block_size=32M",
    ]
    .iter()
    .enumerate()
    {
        let img = p(d.path(), &format!("s{i}.vhdx"));
        convert_streaming(&raw, &img, opts);
        assert_check_clean(&img, "vhdx");
        assert_same(&raw, "raw", &img, "vhdx");
    }
}

/// Builds a log entry (MS-VHDX 2.3.1) with data and zero descriptors, at log sector 0.
fn log_entry(
    guid: &[u8; 16],
    seq: u64,
    file_len: u64,
    data: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let count = data.len() + zeros.len();
    let desc_sectors = (64 + 32 * count).div_ceil(4096);
    let len = (desc_sectors + data.len()) * 4096;
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&0u32.to_le_bytes()); // tail: this entry
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    let mut di = 64;
    for (i, (off, sector)) in data.iter().enumerate() {
        let dd = &mut e[di..di + 32];
        dd[0..4].copy_from_slice(b"desc");
        dd[4..8].copy_from_slice(&sector[4092..4096]);
        dd[8..16].copy_from_slice(&sector[0..8]);
        dd[16..24].copy_from_slice(&off.to_le_bytes());
        dd[24..32].copy_from_slice(&seq.to_le_bytes());
        di += 32;
        let s = (desc_sectors + i) * 4096;
        let ds = &mut e[s..s + 4096];
        ds[0..4].copy_from_slice(b"data");
        ds[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        ds[8..4092].copy_from_slice(&sector[8..4092]);
        ds[4092..4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    for (off, n) in zeros {
        let dd = &mut e[di..di + 32];
        dd[0..4].copy_from_slice(b"zero");
        dd[8..16].copy_from_slice(&n.to_le_bytes());
        dd[16..24].copy_from_slice(&off.to_le_bytes());
        dd[24..32].copy_from_slice(&seq.to_le_bytes());
        di += 32;
    }
    let crc = checksum(&e, 4);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    e
}

/// A qemu image with 1 MiB blocks and data in blocks 0, 2 and 3.
fn small_qemu_image(dir: &Path, name: &str, extra: &str) -> std::path::PathBuf {
    let raw = p(dir, &format!("{name}.raw"));
    make_raw(&raw, 8 * MIB, &[(0, MIB), (2 * MIB, 2 * MIB)], &[]);
    let img = p(dir, name);
    let opts = format!("block_size=1M{extra}");
    raw_to_vhdx(&raw, &img, &opts);
    img
}

#[test]
fn replays_a_dirty_log_in_memory() {
    let d = tmpdir();
    let img = small_qemu_image(d.path(), "dirty.vhdx", "");
    let bat = region_offset(&img, &BAT_GUID);
    let file_len = std::fs::metadata(&img).unwrap().len();
    let mut sector = read(&img, bat, 4096);
    let block0 = u64_at(&sector, 0);
    let block2 = u64_at(&sector, 16);
    assert_eq!(block2 & 7, 6);
    // block 0 becomes ZERO, block 5 takes over block 0's data; the first 4 KiB of block 2's data are zeroed.
    sector[0..8].copy_from_slice(&2u64.to_le_bytes());
    sector[40..48].copy_from_slice(&block0.to_le_bytes());
    let guid = Guid::random().0;
    let entry = log_entry(
        &guid,
        7,
        file_len,
        &[(bat, sector)],
        &[(block2 & !0xfffff, 4096)],
    );
    let log_off = u64_at(&read(&img, 64 * 1024, 80), 72);
    put(&img, log_off, &entry);
    patch_headers(&img, 48, &guid);
    let before = std::fs::read(&img).unwrap();

    // qemu replays a copy (qemu-img check -r all); imgshift must read the same guest bytes without writing.
    let copy = p(d.path(), "replayed.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let _ = qemu_img_status(&["check", "-r", "all", "-f", "vhdx", copy.to_str().unwrap()]);
    let out = p(d.path(), "dirty.raw");
    to_raw_with_imgshift(&img, &out);
    assert_same(&out, "raw", &copy, "vhdx");
    assert!(open_vhdx(&img).unwrap().info().dirty);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the source was modified"
    );
    // sanity: the replay changed something
    let clean = small_qemu_image(d.path(), "clean.vhdx", "");
    let (code, _) = qemu_img_status(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        clean.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
}

/// Turns `child` (1 MiB blocks, 8 MiB) into a differencing disk whose parent locator holds `pairs`.
fn make_differencing(child: &Path, pairs: &[(&str, String)]) {
    let params = item_offset(child, &FILE_PARAMS_GUID);
    put(child, params + 4, &2u32.to_le_bytes());
    let md = region_offset(child, &METADATA_GUID);
    let table = read(child, md, 64 * 1024);
    let n = u16::from_le_bytes([table[10], table[11]]) as usize;
    // locator item: header, entries, UTF-16 strings
    let mut item = Vec::new();
    item.extend_from_slice(&VHDX_PARENT_TYPE);
    item.extend_from_slice(&0u16.to_le_bytes());
    item.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
    let mut strings = Vec::new();
    let base = 20 + 12 * pairs.len();
    for (k, v) in pairs {
        let k16: Vec<u8> = k.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        let v16: Vec<u8> = v.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        let ko = base + strings.len();
        strings.extend_from_slice(&k16);
        let vo = base + strings.len();
        strings.extend_from_slice(&v16);
        item.extend_from_slice(&(ko as u32).to_le_bytes());
        item.extend_from_slice(&(vo as u32).to_le_bytes());
        item.extend_from_slice(&(k16.len() as u16).to_le_bytes());
        item.extend_from_slice(&(v16.len() as u16).to_le_bytes());
    }
    item.extend_from_slice(&strings);
    let item_off = 128 * 1024u32;
    put(child, md + u64::from(item_off), &item);
    let mut e = Vec::new();
    e.extend_from_slice(&PARENT_LOCATOR_GUID);
    e.extend_from_slice(&item_off.to_le_bytes());
    e.extend_from_slice(&(item.len() as u32).to_le_bytes());
    e.extend_from_slice(&4u32.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    put(child, md + 32 + 32 * n as u64, &e);
    put(child, md + 10, &((n + 1) as u16).to_le_bytes());
}

fn parent_guid(parent: &Path) -> String {
    let h1 = read(parent, 64 * 1024, 80);
    let h2 = read(parent, 128 * 1024, 80);
    let cur = if u64_at(&h2, 8) > u64_at(&h1, 8) {
        h2
    } else {
        h1
    };
    Guid(cur[32..48].try_into().unwrap()).to_string()
}

#[test]
fn reads_differencing_chain() {
    let d = tmpdir();
    let parent_raw = p(d.path(), "parent.raw");
    make_raw(&parent_raw, 8 * MIB, &[(0, 8 * MIB)], &[]);
    let parent = p(d.path(), "parent.vhdx");
    raw_to_vhdx(&parent_raw, &parent, "block_size=1M");
    let child_raw = p(d.path(), "child.raw");
    make_raw(&child_raw, 8 * MIB, &[(MIB, MIB), (3 * MIB, MIB)], &[]);
    let child = p(d.path(), "child.vhdx");
    raw_to_vhdx(&child_raw, &child, "block_size=1M");
    make_differencing(
        &child,
        &[
            ("parent_linkage", parent_guid(&parent)),
            ("relative_path", ".\\parent.vhdx".to_string()),
            ("absolute_win32_path", "C:\\vms\\parent.vhdx".to_string()),
        ],
    );
    // BAT: ZERO blocks become NOT_PRESENT (the parent shows through); block 3 becomes PARTIALLY_PRESENT with
    // the first half of its sectors in the child.
    let bat = region_offset(&child, &BAT_GUID);
    let mut entries = read(&child, bat, 8 * 8);
    for i in 0..8 {
        let e = u64_at(&entries, i * 8);
        if e & 7 == 2 {
            entries[i * 8..i * 8 + 8].copy_from_slice(&0u64.to_le_bytes());
        }
    }
    let b3 = u64_at(&entries, 24);
    entries[24..32].copy_from_slice(&((b3 & !7) | 7).to_le_bytes());
    put(&child, bat, &entries);
    let len = std::fs::metadata(&child).unwrap().len();
    let sb_off = len.div_ceil(MIB) * MIB;
    // chunk ratio 4096 for 1 MiB blocks of 512-byte sectors: block 3's bits start at bit 3*2048
    let mut bitmap = vec![0u8; MIB as usize];
    for byte in &mut bitmap[3 * 256..3 * 256 + 128] {
        *byte = 0xff;
    }
    put(&child, sb_off, &bitmap);
    put(
        &child,
        bat + 4096 * 8,
        &((sb_off / MIB) << 20 | 6).to_le_bytes(),
    );

    let mut expected = std::fs::read(&parent_raw).unwrap();
    let c = std::fs::read(&child_raw).unwrap();
    let m = MIB as usize;
    expected[m..2 * m].copy_from_slice(&c[m..2 * m]);
    expected[3 * m..3 * m + m / 2].copy_from_slice(&c[3 * m..3 * m + m / 2]);
    let exp = p(d.path(), "expected.raw");
    std::fs::write(&exp, &expected).unwrap();

    let src = open_vhdx(&child).unwrap();
    let info = src.info();
    assert_eq!(info.backing_filename.as_deref(), Some(".\\parent.vhdx"));
    assert_eq!(info.backing_format.as_deref(), Some("vhdx"));
    let top = src.extents(0, 8 * MIB).unwrap();
    assert_eq!(top.bytes(ExtentKind::Data), MIB + MIB / 2, "{top:?}");
    let out = p(d.path(), "chain.raw");
    to_raw_with_imgshift(&child, &out);
    assert_same(&exp, "raw", &out, "raw");

    // a parent that changed since (another DataWriteGuid) is refused
    let other = p(d.path(), "other.vhdx");
    std::fs::copy(&child, &other).unwrap();
    let loc = region_offset(&other, &METADATA_GUID) + 128 * 1024;
    let mut item = read(&other, loc, 200);
    let pos = item.windows(2).position(|w| w == [b'{', 0]).unwrap();
    item[pos + 2] = if item[pos + 2] == b'0' { b'1' } else { b'0' };
    put(&other, loc, &item);
    assert_refused(&other, "parent_linkage mismatch");
}

#[test]
fn rejects_bad_images() {
    let d = tmpdir();
    let base = small_qemu_image(d.path(), "base.vhdx", "");
    let case = |name: &str| {
        let f = p(d.path(), name);
        std::fs::copy(&base, &f).unwrap();
        f
    };
    assert!(open_and_read_all(&base).is_ok());

    let f = case("bad-sig.vhdx");
    put(&f, 0, b"vhdxfilx");
    assert_refused(&f, "bad file identifier");

    let f = case("bad-crc.vhdx");
    put(&f, 64 * 1024 + 100, b"x");
    put(&f, 128 * 1024 + 100, b"x");
    assert_refused(&f, "both header CRCs broken");

    let f = case("overlap.vhdx");
    for rt in [192 * 1024u64, 256 * 1024] {
        put(&f, rt + 16 + 16, &(0u64).to_le_bytes());
        fix_crc(&f, rt, 64 * 1024);
    }
    assert_refused(&f, "region overlapping the header section");

    let f = case("region-past-eof.vhdx");
    for rt in [192 * 1024u64, 256 * 1024] {
        put(&f, rt + 16 + 16, &(1u64 << 40).to_le_bytes());
        fix_crc(&f, rt, 64 * 1024);
    }
    assert_refused(&f, "region past the end of the file");

    let f = case("required-region.vhdx");
    for rt in [192 * 1024u64, 256 * 1024] {
        put(&f, rt + 8, &3u32.to_le_bytes());
        let mut e = vec![0xabu8; 16];
        e.extend_from_slice(&(6 * MIB).to_le_bytes());
        e.extend_from_slice(&(MIB as u32).to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        put(&f, rt + 16 + 64, &e);
        fix_crc(&f, rt, 64 * 1024);
    }
    assert_refused(&f, "unknown required region");

    let f = case("bat-past-eof.vhdx");
    let bat = region_offset(&f, &BAT_GUID);
    put(&f, bat, &((1u64 << 30) << 20 | 6).to_le_bytes());
    assert_refused(&f, "BAT entry past the end of the file");

    let f = case("bat-state.vhdx");
    put(&f, bat + 8, &4u64.to_le_bytes());
    assert_refused(&f, "reserved BAT state");

    let f = case("partial-in-dynamic.vhdx");
    let e0 = u64_at(&read(&f, bat, 8), 0);
    put(&f, bat, &((e0 & !7) | 7).to_le_bytes());
    assert_refused(&f, "PARTIALLY_PRESENT in a dynamic disk");

    for (name, bs) in [
        ("bs3m.vhdx", 3 * MIB as u32),
        ("bs512m.vhdx", 512 * MIB as u32),
        ("bs0.vhdx", 0),
    ] {
        let f = case(name);
        put(&f, item_offset(&f, &FILE_PARAMS_GUID), &bs.to_le_bytes());
        assert_refused(&f, name);
    }

    let f = case("huge-bat.vhdx");
    // 64 TiB of 1 MiB blocks: 2^26 BAT entries in a 1 MiB region
    put(
        &f,
        item_offset(&f, &VSIZE_GUID),
        &(64u64 << 40).to_le_bytes(),
    );
    assert_refused(&f, "BAT larger than its region");

    let f = case("2pow40-blocks.vhdx");
    put(
        &f,
        item_offset(&f, &VSIZE_GUID),
        &(1u64 << 60).to_le_bytes(),
    );
    assert_refused(&f, "virtual size of 2^40 blocks");

    let f = case("required-item.vhdx");
    let md = region_offset(&f, &METADATA_GUID);
    let mut e = vec![0xcdu8; 16];
    e.extend_from_slice(&(64u32 * 1024 + 512).to_le_bytes());
    e.extend_from_slice(&8u32.to_le_bytes());
    e.extend_from_slice(&4u32.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    put(&f, md + 32 + 5 * 32, &e);
    put(&f, md + 10, &6u16.to_le_bytes());
    assert_refused(&f, "unknown required metadata item");

    let f = case("metadata-count.vhdx");
    put(&f, md + 10, &u16::MAX.to_le_bytes());
    assert_refused(&f, "metadata entry count above 2047");

    let f = case("log-outside.vhdx");
    patch_headers(&f, 48, &[0x11; 16]);
    patch_headers(&f, 72, &(1u64 << 40).to_le_bytes());
    assert_refused(&f, "log outside the file");

    let f = case("log-writes-header.vhdx");
    let guid = [0x22u8; 16];
    let len = std::fs::metadata(&f).unwrap().len();
    let entry = log_entry(&guid, 1, len, &[(64 * 1024, vec![0u8; 4096])], &[]);
    put(&f, MIB, &entry);
    patch_headers(&f, 48, &guid);
    assert_refused(&f, "log entry writing into the header section");

    let f = case("log-truncated.vhdx");
    let entry = log_entry(&guid, 1, len + 100 * MIB, &[], &[(4 * MIB, 4096)]);
    put(&f, MIB, &entry);
    patch_headers(&f, 48, &guid);
    assert_refused(&f, "log says the file was longer");

    // differencing disks naming their parent outside the folder
    let sub = p(d.path(), "a/b");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(&base, p(d.path(), "x")).unwrap();
    for (name, pairs) in [
        (
            "a/b/dotdot.vhdx",
            vec![
                (
                    "parent_linkage",
                    "{00000000-0000-0000-0000-000000000000}".to_string(),
                ),
                ("relative_path", "..\\..\\x".to_string()),
            ],
        ),
        (
            "abs-only.vhdx",
            vec![
                (
                    "parent_linkage",
                    "{00000000-0000-0000-0000-000000000000}".to_string(),
                ),
                ("absolute_win32_path", "/etc/passwd".to_string()),
            ],
        ),
        (
            "abs-rel.vhdx",
            vec![
                (
                    "parent_linkage",
                    "{00000000-0000-0000-0000-000000000000}".to_string(),
                ),
                ("relative_path", "/etc/passwd".to_string()),
            ],
        ),
        ("no-locator-pairs.vhdx", vec![]),
    ] {
        let f = case(name);
        make_differencing(&f, &pairs);
        assert_refused(&f, name);
    }
}

/// `entry` (from `log_entry`) with LastFileOffset set to `last` and its checksum redone.
fn with_last_file_offset(mut entry: Vec<u8>, last: u64) -> Vec<u8> {
    entry[56..64].copy_from_slice(&last.to_le_bytes());
    entry[4..8].fill(0);
    let crc = checksum(&entry, 4);
    entry[4..8].copy_from_slice(&crc.to_le_bytes());
    entry
}

#[test]
fn log_last_file_offset_does_not_lengthen_the_file() {
    let d = tmpdir();
    let guid = Guid::random().0;
    let far = 1u64 << 30;
    // A log whose LastFileOffset says 2 GiB and whose BAT update points block 5 at 1 GiB: nothing is stored
    // there, so the block lies outside the file whatever LastFileOffset claims (it used to read as zeros, and
    // a BAT or metadata region could sit out there as well).
    let img = small_qemu_image(d.path(), "far.vhdx", "");
    let bat = region_offset(&img, &BAT_GUID);
    let file_len = std::fs::metadata(&img).unwrap().len();
    let log_off = u64_at(&read(&img, 64 * 1024, 80), 72);
    let mut sector = read(&img, bat, 4096);
    sector[40..48].copy_from_slice(&((far / MIB) << 20 | 6).to_le_bytes());
    let entry = log_entry(&guid, 3, file_len, &[(bat, sector.clone())], &[]);
    put(&img, log_off, &with_last_file_offset(entry, 2 * far));
    patch_headers(&img, 48, &guid);
    let e = open_and_read_all(&img).expect_err("block 5 is past the end");
    assert!(
        e.to_string().contains(&format!(
            "block 5 at file offset {far} is outside the file ({file_len} bytes)"
        )),
        "{e}"
    );

    // The same with a zero descriptor over block 5's megabyte: the log writes there, so the replayed file
    // reaches it (as qemu's replay would extend the file) and block 5 reads as zeros.
    let img = small_qemu_image(d.path(), "zeroed.vhdx", "");
    let entry = log_entry(&guid, 3, file_len, &[(bat, sector)], &[(far, MIB)]);
    put(&img, log_off, &with_last_file_offset(entry, 2 * far));
    patch_headers(&img, 48, &guid);
    open_and_read_all(&img).unwrap();
    let copy = p(d.path(), "zeroed-qemu.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let _ = qemu_img_status(&["check", "-r", "all", "-f", "vhdx", copy.to_str().unwrap()]);
    let out = p(d.path(), "zeroed.raw");
    to_raw_with_imgshift(&img, &out);
    assert_same(&out, "raw", &copy, "vhdx");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), file_len);

    // A descriptor past LastFileOffset (and the file) is refused, as before.
    let img = small_qemu_image(d.path(), "beyond.vhdx", "");
    let entry = log_entry(&guid, 3, file_len, &[], &[(far, MIB)]);
    put(&img, log_off, &with_last_file_offset(entry, far));
    patch_headers(&img, 48, &guid);
    let e = open_and_read_all(&img).expect_err("write past LastFileOffset");
    assert!(
        e.to_string().contains(&format!(
            "log entry 3 writes {MIB} bytes at {far}, outside the file's metadata and data"
        )),
        "{e}"
    );
}

#[test]
fn refuses_bat_entries_that_share_a_block() {
    let d = tmpdir();
    // payload: qemu's image has data in blocks 0, 2 and 3; block 0's entry copied onto block 2's
    let img = small_qemu_image(d.path(), "shared.vhdx", "");
    let bat = region_offset(&img, &BAT_GUID);
    let e0 = read(&img, bat, 8);
    let block0 = u64_at(&e0, 0);
    assert_eq!(block0 & 7, 6);
    put(&img, bat + 16, &e0);
    let e = open_vhdx(&img).err().expect("shared payload block");
    assert!(
        e.to_string().contains(&format!(
            "BAT entries 0 (payload block 0) and 2 (payload block 2) both point at file offset {}",
            (block0 >> 20) * MIB
        )),
        "{e}"
    );

    // sector bitmaps: a differencing disk of 8 GiB has two chunks (4 GiB of 512-byte sectors each); both bitmap
    // entries name one 1 MiB bitmap block, which would map 2^23 sectors of each chunk from the same bits.
    let child = p(d.path(), "child.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        child.to_str().unwrap(),
        "8G",
    ]);
    make_differencing(
        &child,
        &[
            (
                "parent_linkage",
                "{00000000-0000-0000-0000-000000000000}".to_string(),
            ),
            ("relative_path", "parent.vhdx".to_string()),
        ],
    );
    let bat = region_offset(&child, &BAT_GUID);
    let len = std::fs::metadata(&child).unwrap().len();
    let sb_off = len.div_ceil(MIB) * MIB;
    put(&child, sb_off, &vec![0x55u8; MIB as usize]);
    let sb_entry = ((sb_off / MIB) << 20 | 6).to_le_bytes();
    // chunk ratio 4096: the bitmap entries are BAT entries 4096 and 8193
    put(&child, bat + 4096 * 8, &sb_entry);
    let e = open_vhdx(&child).err().expect("no parent.vhdx");
    assert!(e.to_string().contains("parent.vhdx"), "{e}");
    put(&child, bat + 8193 * 8, &sb_entry);
    let e = open_vhdx(&child).err().expect("shared bitmap block");
    assert!(
        e.to_string().contains(&format!(
            "BAT entries 4096 (sector bitmap of chunk 0) and 8193 (sector bitmap of chunk 1) both point at file offset {sb_off}"
        )),
        "{e}"
    );
}

#[test]
fn check_reports_overlapping_blocks() {
    let d = tmpdir();
    // qemu's image of 2 MiB blocks with data in blocks 0 and 1; block 1's entry moved 1 MiB into block 0
    let raw = p(d.path(), "overlap.raw");
    make_raw(&raw, 8 * MIB, &[(0, 4 * MIB)], &[]);
    let img = p(d.path(), "overlap.vhdx");
    raw_to_vhdx(&raw, &img, "block_size=2M");
    assert_eq!(open_vhdx(&img).unwrap().check().unwrap().corruptions, 0);
    let bat = region_offset(&img, &BAT_GUID);
    let e0 = u64_at(&read(&img, bat, 8), 0);
    assert_eq!(e0 & 7, 6);
    let block0 = (e0 >> 20) * MIB;
    put(&img, bat + 8, &(e0 + (1 << 20)).to_le_bytes());
    // distinct starts: open accepts it, check reports it
    let rep = open_vhdx(&img).unwrap().check().unwrap();
    assert_eq!((rep.allocated_clusters, rep.corruptions), (2, 1));
    assert_eq!(
        rep.messages,
        [format!(
            "ERROR blocks 0 and 1 overlap in the file (offsets {block0} and {})",
            block0 + MIB
        )]
    );
}
