#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use imgshift_converters::formats::vhd::meta::checksum;
use imgshift_converters::{
    ConvertOptions, ErrorKind, ExtentKind, FileStorage, Format, NoProgress, OpenGate, StreamSink,
    WriterOptions, convert, create_writer, open, open_path, resolved_extents,
};
use util::*;

const MIB: u64 = 1 << 20;

/// A raw image with data, explicit zeros and holes; size not a multiple of the 2 MiB block.
fn sample_raw(path: &Path, size: u64) {
    make_raw(
        path,
        size,
        &[
            (0, MIB),
            (5 * MIB + 4096, 3 * MIB),
            (size - 3 * 512, 3 * 512),
        ],
        &[(12 * MIB, 2 * MIB)],
    );
}

fn virtual_size(img: &Path, fmt: &str) -> u64 {
    let out = qemu_img(&["info", "-f", fmt, "--output", "json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn stream_convert(src: &Path, src_fmt: Option<Format>, dst: &Path, fmt: Format, opts: &str) {
    let source = open_path(src, src_fmt, &OpenGate::new()).unwrap();
    let mut o = WriterOptions::default();
    o.parse_into(opts).unwrap();
    let mut writer = create_writer(fmt, &mut o).unwrap();
    let mut sink = StreamSink::new(std::fs::File::create(dst).unwrap());
    convert(
        source.as_ref(),
        writer.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
}

const QEMU_OPTS: [&str; 4] = [
    "subformat=dynamic",
    "subformat=fixed",
    "subformat=dynamic,force_size=on",
    "subformat=fixed,force_size=on",
];

#[test]
fn reads_every_qemu_subformat() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    let size = 17 * MIB + 3 * 512;
    sample_raw(&src, size);
    for (i, o) in QEMU_OPTS.iter().enumerate() {
        let img = p(d.path(), &format!("q{i}.vhd"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            o,
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        // probed (a fixed VHD only by its last sector) and opened with qemu's size rules
        let r = open_path(&img, None, &OpenGate::new()).unwrap();
        assert_eq!(r.format(), Format::Vpc, "{o}");
        assert_eq!(r.virtual_size(), virtual_size(&img, "vpc"), "{o}");
        assert!(r.virtual_size() >= size);
        let out = p(d.path(), &format!("q{i}.raw"));
        imgshift_convert(&img, Some(Format::Vpc), &out, Format::Raw, "");
        assert_same(&src, "raw", &out, "raw");
        // allocation: holes are zeros, cost follows data
        let map = resolved_extents(r.as_ref(), 0, r.virtual_size()).unwrap();
        let data = map.bytes(ExtentKind::Data);
        assert!(data <= 12 * MIB, "{o}: {data} bytes of data: {map:?}");
    }
}

#[test]
fn reads_a_sparse_disk_above_4_gib() {
    let d = tmpdir();
    let src = p(d.path(), "big.raw");
    let size = 5 * (1 << 30) + 7 * 512;
    make_raw(
        &src,
        size,
        &[
            (MIB, MIB),
            ((4 << 30) + 12345 * 512, 2 * MIB),
            (size - 4096, 4096),
        ],
        &[],
    );
    for (i, o) in ["subformat=dynamic", "subformat=fixed,force_size=on"]
        .iter()
        .enumerate()
    {
        let img = p(d.path(), &format!("big{i}.vhd"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            o,
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let out = p(d.path(), &format!("big{i}.raw"));
        imgshift_convert(&img, Some(Format::Vpc), &out, Format::Raw, "");
        assert_same(&src, "raw", &out, "raw");
        // and imgshift writes the same options back (a local file: holes stay holes)
        let w = p(d.path(), &format!("big{i}.w.vhd"));
        imgshift_convert(&src, Some(Format::Raw), &w, Format::Vpc, o);
        assert_eq!(virtual_size(&w, "vpc"), virtual_size(&img, "vpc"), "{o}");
        assert_same(&w, "vpc", &src, "raw");
    }
}

#[test]
fn writes_vhd_that_qemu_reads() {
    let d = tmpdir();
    let src = p(d.path(), "src.raw");
    let size = 23 * MIB + 5 * 512;
    sample_raw(&src, size);
    for (i, o) in [
        "",
        "subformat=fixed",
        "force_size=on",
        "subformat=fixed,force_size=on",
        "subformat=fixed,round_to_mib=on",
        "subformat=dynamic,round_to_mib=on",
    ]
    .iter()
    .enumerate()
    {
        for streaming in [false, true] {
            let img = p(d.path(), &format!("w{i}{streaming}.vhd"));
            if streaming {
                stream_convert(&src, Some(Format::Raw), &img, Format::Vpc, o);
            } else {
                imgshift_convert(&src, Some(Format::Raw), &img, Format::Vpc, o);
            }
            let vs = virtual_size(&img, "vpc");
            assert!(vs >= size, "{o}");
            assert_same(&img, "vpc", &src, "raw");
            // our own reader agrees
            let out = p(d.path(), &format!("w{i}{streaming}.raw"));
            imgshift_convert(&img, Some(Format::Vpc), &out, Format::Raw, "");
            assert_same(&src, "raw", &out, "raw");
            let file_len = std::fs::metadata(&img).unwrap().len();
            if o.contains("round_to_mib") {
                assert_eq!(vs % MIB, 0, "{o}");
                if o.contains("fixed") {
                    assert_eq!(file_len, vs + 512, "Azure wants N MiB + 512");
                }
            } else {
                // the same size qemu-img gives for the same options
                let q = p(d.path(), &format!("q{i}.vhd"));
                let mut args = vec!["convert", "-f", "raw", "-O", "vpc"];
                if !o.is_empty() {
                    args.extend(["-o", o]);
                }
                args.extend([src.to_str().unwrap(), q.to_str().unwrap()]);
                qemu_img(&args);
                assert_eq!(vs, virtual_size(&q, "vpc"), "{o}");
            }
            if o.contains("fixed") {
                assert_eq!(file_len, vs + 512, "{o}");
            } else if !streaming {
                // dynamic: only blocks with data are stored (3 blocks of 2 MiB + 1 at the end)
                assert!(file_len < 12 * MIB, "{o}: {file_len}");
            }
        }
    }
}

/// Byte offsets into a dynamic VHD we patch by hand.
#[derive(Clone)]
struct Dyn {
    bytes: Vec<u8>,
}

impl Dyn {
    fn load(path: &Path) -> Self {
        Dyn {
            bytes: std::fs::read(path).unwrap(),
        }
    }
    fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }
    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn header_off(&self) -> usize {
        u64::from_be_bytes(self.bytes[16..24].try_into().unwrap()) as usize
    }
    fn bat_off(&self) -> usize {
        let h = self.header_off();
        u64::from_be_bytes(self.bytes[h + 16..h + 24].try_into().unwrap()) as usize
    }
    fn uuid(&self) -> [u8; 16] {
        self.bytes[68..84].try_into().unwrap()
    }
    /// Rewrites the footer copy at 0 from the (edited) copy at 0 and re-sums both footers and the header.
    fn reseal(&mut self) {
        self.reseal_footer();
        let h = self.header_off();
        self.bytes[h + 36..h + 40].fill(0);
        let c = checksum(&self.bytes[h..h + 1024]);
        self.put32(h + 36, c);
    }
    /// Re-sums the footer copy at 0 and copies it to the end.
    fn reseal_footer(&mut self) {
        self.bytes[64..68].fill(0);
        let c = checksum(&self.bytes[..512]);
        self.put32(64, c);
        let n = self.bytes.len();
        let foot: Vec<u8> = self.bytes[..512].to_vec();
        self.bytes[n - 512..].copy_from_slice(&foot);
    }
    fn save(&self, path: &Path) {
        std::fs::write(path, &self.bytes).unwrap();
    }
}

/// Makes `child` (a dynamic VHD) a differencing disk of `parent_uuid` whose W2ru locator says `locator`.
fn make_differencing(child: &mut Dyn, parent_uuid: [u8; 16], locator: &str) {
    let n = child.bytes.len();
    let footer = child.bytes[n - 512..].to_vec();
    let loc_off = n - 512;
    let mut loc = vec![0u8; 512];
    for (i, u) in locator.encode_utf16().enumerate() {
        loc[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    child.bytes.truncate(loc_off);
    child.bytes.extend_from_slice(&loc);
    child.bytes.extend_from_slice(&footer);
    child.put32(60, 4); // disk type: differencing
    let h = child.header_off();
    child.bytes[h + 40..h + 56].copy_from_slice(&parent_uuid);
    let e = h + 576;
    child.bytes[e..e + 4].copy_from_slice(b"W2ru");
    child.put32(e + 4, 1);
    child.put32(e + 8, (locator.encode_utf16().count() * 2) as u32);
    child.bytes[e + 16..e + 24].copy_from_slice(&(loc_off as u64).to_be_bytes());
    child.reseal();
}

#[test]
fn reads_a_differencing_disk_through_its_parent() {
    let d = tmpdir();
    let size = 8 * MIB;
    let praw = p(d.path(), "parent.raw");
    let craw = p(d.path(), "child.raw");
    make_raw(&praw, size, &[(0, size)], &[]);
    // child data: block 0 and block 2 (different seed: different size)
    make_raw(&craw, size, &[(0, 2 * MIB), (4 * MIB, 512)], &[]);
    let pvhd = p(d.path(), "parent.vhd");
    let cvhd = p(d.path(), "child.vhd");
    imgshift_convert(
        &praw,
        Some(Format::Raw),
        &pvhd,
        Format::Vpc,
        "force_size=on",
    );
    imgshift_convert(
        &craw,
        Some(Format::Raw),
        &cvhd,
        Format::Vpc,
        "force_size=on",
    );
    let parent = Dyn::load(&pvhd);
    let mut child = Dyn::load(&cvhd);
    // Clear the bitmap bits of the second half of block 0: those sectors come from the parent.
    let bat = child.bat_off();
    let b0 = child.be32(bat) as usize * 512;
    child.bytes[b0 + 256..b0 + 512].fill(0);
    // and one odd sector (sector 3) too
    child.bytes[b0] &= !(0x80 >> 3);
    make_differencing(&mut child, parent.uuid(), ".\\parent.vhd");
    child.save(&cvhd);

    // expected: parent everywhere, child where the child's bitmap says so
    let pdata = std::fs::read(&praw).unwrap();
    let cdata = std::fs::read(&craw).unwrap();
    let mut want = pdata.clone();
    let half = (MIB) as usize;
    for s in 0..half / 512 {
        if s != 3 {
            want[s * 512..(s + 1) * 512].copy_from_slice(&cdata[s * 512..(s + 1) * 512]);
        }
    }
    // block 2 (4 MiB..6 MiB) is allocated in the child and fully present
    let b2 = (4 * MIB) as usize;
    want[b2..b2 + 2 * MIB as usize].copy_from_slice(&cdata[b2..b2 + 2 * MIB as usize]);
    let want_path = p(d.path(), "want.raw");
    std::fs::write(&want_path, &want).unwrap();

    let img = open_path(&cvhd, Some(Format::Vpc), &OpenGate::new()).unwrap();
    assert_eq!(img.info().backing_filename.as_deref(), Some("./parent.vhd"));
    let map = img.extents(0, size).unwrap();
    assert!(map.bytes(ExtentKind::Unallocated) > 0, "{map:?}");
    let out = p(d.path(), "out.raw");
    imgshift_convert(&cvhd, Some(Format::Vpc), &out, Format::Raw, "");
    assert_same(&want_path, "raw", &out, "raw");

    // a parent with another unique id is refused
    let mut wrong = Dyn::load(&pvhd);
    wrong.bytes[68] ^= 0xFF;
    wrong.reseal();
    wrong.save(&pvhd);
    let e = open_path(&cvhd, Some(Format::Vpc), &OpenGate::new())
        .err()
        .expect("uuid mismatch must fail");
    assert!(e.to_string().contains("unique id"), "{e}");
}

#[test]
fn refuses_parent_locators_outside_the_folder() {
    let d = tmpdir();
    let sub = d.path().join("img");
    std::fs::create_dir(&sub).unwrap();
    let raw = p(d.path(), "x.raw");
    make_raw(&raw, 4 * MIB, &[(0, MIB)], &[]);
    // a real VHD outside the child's folder, and /etc/passwd
    let outside = p(d.path(), "x.vhd");
    imgshift_convert(&raw, Some(Format::Raw), &outside, Format::Vpc, "");
    let uuid = Dyn::load(&outside).uuid();
    for loc in [
        "../x.vhd",
        "..\\x.vhd",
        "/etc/passwd",
        "../../../../../../etc/passwd",
    ] {
        let child = sub.join("child.vhd");
        imgshift_convert(&raw, Some(Format::Raw), &child, Format::Vpc, "");
        let mut c = Dyn::load(&child);
        make_differencing(&mut c, uuid, loc);
        c.save(&child);
        let e = open_path(&child, Some(Format::Vpc), &OpenGate::new())
            .err()
            .expect("must be refused");
        assert_eq!(e.kind(), ErrorKind::Denied, "{loc}: {e}");
        // and with every named file refused
        let e = open_path(&child, Some(Format::Vpc), &OpenGate::deny_all())
            .err()
            .expect("must be refused");
        assert_eq!(e.kind(), ErrorKind::Denied, "{loc}: {e}");
    }
}

fn open_bytes(
    bytes: Vec<u8>,
) -> imgshift_converters::Result<Box<dyn imgshift_converters::DiskSource>> {
    let d = tmpdir();
    let path = p(d.path(), "bad.vhd");
    std::fs::write(&path, bytes).unwrap();
    let st = Arc::new(FileStorage::open(&path).unwrap());
    let r = open(st, Some(Format::Vpc), &OpenGate::new().enter_top(&path));
    // read everything when it opened, to prove reads fail cleanly too
    r.and_then(|img| {
        let mut buf = vec![0u8; MIB as usize];
        let mut at = 0;
        while at < img.virtual_size() {
            let n = (img.virtual_size() - at).min(MIB) as usize;
            img.read_at(&mut buf[..n], at)?;
            at += n as u64;
        }
        Ok(img)
    })
}

#[test]
fn refuses_mutated_images_quickly() {
    let d = tmpdir();
    let raw = p(d.path(), "x.raw");
    make_raw(&raw, 6 * MIB, &[(0, 6 * MIB)], &[]);
    let dynv = p(d.path(), "d.vhd");
    let fixv = p(d.path(), "f.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        raw.to_str().unwrap(),
        dynv.to_str().unwrap(),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        raw.to_str().unwrap(),
        fixv.to_str().unwrap(),
    ]);
    let base = Dyn::load(&dynv);
    let fixed = std::fs::read(&fixv).unwrap();
    let h = base.header_off();
    let bat = base.bat_off();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut b = base.bytes.clone();
    b[40] ^= 1; // original size, footer checksum now wrong
    cases.push(("footer checksum", b));
    let mut b = fixed.clone();
    let n = b.len();
    b[n - 512 + 40] ^= 1;
    cases.push(("fixed footer checksum", b));
    let mut b = base.bytes.clone();
    b[h + 600] ^= 1;
    cases.push(("header checksum", b));
    let mut b = base.clone();
    b.put32(bat, 0x7FFF_FFF0);
    cases.push(("BAT entry past EOF", b.bytes));
    for bs in [3 << 20, 512, 1 << 30] {
        let mut b = base.clone();
        b.put32(h + 32, bs);
        b.reseal();
        cases.push(("block size", b.bytes));
    }
    let mut b = base.clone();
    b.put32(h + 28, u32::MAX);
    b.reseal();
    cases.push(("max table entries", b.bytes));
    let mut b = base.clone();
    b.bytes[h + 16..h + 24].copy_from_slice(&u64::MAX.to_be_bytes());
    b.reseal();
    cases.push(("BAT offset", b.bytes));
    let mut b = base.clone();
    b.bytes[28..32].copy_from_slice(b"qem2");
    b.bytes[48..56].copy_from_slice(&(u64::MAX - 511).to_be_bytes());
    b.reseal();
    cases.push(("absurd current size", b.bytes));
    let mut b = base.clone();
    b.bytes[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    b.reseal_footer();
    cases.push(("header offset past EOF", b.bytes));
    let mut b = fixed.clone();
    let n = b.len();
    b[n - 512 + 28..n - 512 + 32].copy_from_slice(b"qem2");
    b[n - 512 + 48..n - 512 + 56].copy_from_slice(&(1u64 << 50).to_be_bytes());
    b[n - 512 + 64..n - 512 + 68].fill(0);
    let c = checksum(&b[n - 512..]);
    b[n - 512 + 64..n - 512 + 68].copy_from_slice(&c.to_be_bytes());
    cases.push(("fixed larger than its file", b));
    cases.push((
        "truncated",
        base.bytes[..base.bytes.len() - 4 * MIB as usize].to_vec(),
    ));
    cases.push(("tiny", b"conectix".to_vec()));

    for (what, bytes) in cases {
        let t = Instant::now();
        let r = open_bytes(bytes);
        assert!(r.is_err(), "{what} must be refused");
        eprintln!("{what}: {}", r.err().unwrap());
        assert!(t.elapsed().as_secs() < 2, "{what} took {:?}", t.elapsed());
    }
}
