#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::path::Path;
use std::sync::Arc;

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
    make_differencing_named(child, parent_uuid, &[locator], "");
}

/// Makes `child` (a dynamic VHD) a differencing disk of `parent_uuid` with one W2ru locator per name in
/// `locators` (at most 8, each given 512 bytes before the trailing footer) and the parent name `parent_name`.
fn make_differencing_named(
    child: &mut Dyn,
    parent_uuid: [u8; 16],
    locators: &[&str],
    parent_name: &str,
) {
    assert!(locators.len() <= 8);
    let n = child.bytes.len();
    let footer = child.bytes[n - 512..].to_vec();
    child.bytes.truncate(n - 512);
    let h = child.header_off();
    for (i, locator) in locators.iter().enumerate() {
        let loc_off = child.bytes.len();
        let mut loc = vec![0u8; 512];
        for (j, u) in locator.encode_utf16().enumerate() {
            loc[2 * j..2 * j + 2].copy_from_slice(&u.to_le_bytes());
        }
        child.bytes.extend_from_slice(&loc);
        let e = h + 576 + 24 * i;
        child.bytes[e..e + 4].copy_from_slice(b"W2ru");
        child.put32(e + 4, 1);
        child.put32(e + 8, (locator.encode_utf16().count() * 2) as u32);
        child.bytes[e + 16..e + 24].copy_from_slice(&(loc_off as u64).to_be_bytes());
    }
    child.bytes.extend_from_slice(&footer);
    child.put32(60, 4); // disk type: differencing
    child.bytes[h + 40..h + 56].copy_from_slice(&parent_uuid);
    // parent name: UTF-16BE
    for (j, u) in parent_name.encode_utf16().enumerate() {
        child.bytes[h + 64 + 2 * j..h + 66 + 2 * j].copy_from_slice(&u.to_be_bytes());
    }
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
    // Host offsets (map --output json): exactly the child's present sectors, each pointing at the child's bytes.
    let hosts = img.host_extents(0, size).unwrap().unwrap();
    let file = std::fs::read(&cvhd).unwrap();
    let mut covered = 0;
    for h in &hosts {
        let (g, n, o) = (h.guest as usize, h.len as usize, h.host.unwrap() as usize);
        assert_eq!(&file[o..o + n], &want[g..g + n], "{h:?}");
        covered += h.len;
    }
    assert_eq!(covered, map.bytes(ExtentKind::Data), "{hosts:?}");

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
fn refuses_mutated_images_cheaply() {
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
        // Refused, or reading fails, after reading at most the file about once: never the disk or table a
        // mutated field claims (up to 2^50 bytes).
        let len = bytes.len() as u64;
        let (r, work) = file_work(what, move || open_bytes(bytes).map(|_| ()));
        assert!(r.is_err(), "{what} must be refused");
        eprintln!("{what}: {work:?}: {}", r.err().unwrap());
        work.assert_at_most(what, 2 * len + MIB, 4096);
    }
}

/// A dynamic VHD of 4 MiB made by qemu-img.
fn small_dynamic(dir: &Path, name: &str) -> Dyn {
    let path = p(dir, name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        path.to_str().unwrap(),
        "4M",
    ]);
    Dyn::load(&path)
}

/// Gives `d` the unique id `id` (footer copies re-summed).
fn set_unique_id(d: &mut Dyn, id: [u8; 16]) {
    d.bytes[68..84].copy_from_slice(&id);
    d.reseal();
}

#[test]
fn parent_candidates_are_chosen_by_footer_without_backtracking() {
    let d = tmpdir();
    let id = [0x5a; 16];
    // 20 differencing disks, all with the unique id each names as its parent, each naming the next 8 by locator
    // and the 9th after by parent name. The reader that opened every candidate's whole chain before comparing
    // ids, and tried the next candidate after any deeper failure, walked every loop-free path through this set
    // (far more than 10^9 opens). Choosing by footer and committing gives one path r00 -> r01 -> ... -> r19,
    // whose 9 candidates all make loops: one error, after 20 opens and 9 refusals by the gate.
    let n = 20;
    let name = |i: usize| format!("r{:02}.vhd", i % n);
    for i in 0..n {
        let mut r = small_dynamic(d.path(), &name(i));
        set_unique_id(&mut r, id);
        let locators: Vec<String> = (1..=8).map(|k| name(i + k)).collect();
        let locators: Vec<&str> = locators.iter().map(String::as_str).collect();
        make_differencing_named(&mut r, id, &locators, &name(i + 9));
        r.save(&p(d.path(), &name(i)));
    }
    let e = open_path(&p(d.path(), &name(0)), Some(Format::Vpc), &OpenGate::new())
        .err()
        .expect("a ring of differencing disks has no base");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{msg}");
    assert!(
        msg.contains("cannot open the parent of differencing VHD")
            && msg.contains("r19.vhd")
            && msg.contains("'r08.vhd' makes a loop in the backing chain"),
        "{msg}"
    );
    // the path is named once per level, never nested per candidate
    assert!(msg.len() < 4000, "{} bytes: {msg}", msg.len());

    // Candidates that are missing or carry another unique id are passed over by their footer alone...
    let parent = small_dynamic(d.path(), "parent.vhd");
    let mut other = small_dynamic(d.path(), "other.vhd");
    set_unique_id(&mut other, [0x11; 16]);
    other.save(&p(d.path(), "other.vhd"));
    let child = p(d.path(), "child.vhd");
    let mut c = small_dynamic(d.path(), "child.vhd");
    make_differencing_named(
        &mut c,
        parent.uuid(),
        &["missing.vhd", "other.vhd", "parent.vhd"],
        "",
    );
    c.save(&child);
    let img = open_path(&child, Some(Format::Vpc), &OpenGate::new()).unwrap();
    assert_eq!(img.info().backing_filename.as_deref(), Some("parent.vhd"));
    // ...but the first one that matches is the parent: its own failure is the error, no other is tried.
    let mut broken = small_dynamic(d.path(), "broken.vhd");
    set_unique_id(&mut broken, parent.uuid());
    make_differencing_named(&mut broken, [0x22; 16], &["gone.vhd"], "");
    broken.save(&p(d.path(), "broken.vhd"));
    let mut c = small_dynamic(d.path(), "child.vhd");
    make_differencing_named(&mut c, parent.uuid(), &["broken.vhd", "parent.vhd"], "");
    c.save(&child);
    let e = open_path(&child, Some(Format::Vpc), &OpenGate::new())
        .err()
        .expect("the matching candidate's parent is missing");
    let msg = e.to_string();
    assert!(
        msg.starts_with("VHD parent 'broken.vhd': cannot open the parent of differencing VHD")
            && msg.contains("gone.vhd"),
        "{msg}"
    );
}

#[test]
fn refuses_blocks_that_share_bytes() {
    let d = tmpdir();
    let raw = p(d.path(), "x.raw");
    make_raw(&raw, 6 * MIB, &[(0, MIB), (2 * MIB, MIB)], &[]);
    let img = p(d.path(), "d.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let base = Dyn::load(&img);
    let bat = base.bat_off();
    let (b0, b1) = (base.be32(bat), base.be32(bat + 4));
    assert!(b0 != u32::MAX && b1 != u32::MAX && base.be32(bat + 8) == u32::MAX);

    // BAT entry 0 copied onto entry 2: two guest blocks read one stored block.
    let mut shared = base.clone();
    shared.put32(bat + 8, b0);
    let e = open_bytes(shared.bytes).err().expect("shared block");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "BAT entries 0 and 2 share the block at sector {b0}"
        )),
        "{e}"
    );

    // entry 1 moved one sector into block 0: its bitmap would be block 0's bytes
    let mut overlapping = base.clone();
    overlapping.put32(bat + 4, b0 + 1);
    let e = open_bytes(overlapping.bytes)
        .err()
        .expect("overlapping blocks");
    assert!(
        e.to_string().contains(&format!(
            "BAT entries 0 and 1 overlap: their blocks at sectors {b0} and {}",
            b0 + 1
        )),
        "{e}"
    );

    // every entry of a 2040 GiB disk on one block whose bitmap alternates bit by bit: as a differencing disk,
    // 2^32 extents from a file of 6 MiB; refused when opened, before anything is mapped
    let mut flood = base.clone();
    flood.bytes[28..32].copy_from_slice(b"qem2");
    flood.bytes[48..56].copy_from_slice(&(2040u64 << 30).to_be_bytes());
    let h = flood.header_off();
    let entries = (2040u64 << 30) / (2 * MIB);
    flood.put32(h + 28, entries as u32);
    let table = h + 1024;
    flood.bytes[h + 16..h + 24].copy_from_slice(&(table as u64).to_be_bytes());
    let mut bytes = flood.bytes[..table].to_vec();
    for _ in 0..entries {
        bytes.extend_from_slice(&0u32.to_be_bytes());
    }
    let block = bytes.len().div_ceil(512);
    bytes.resize(block * 512, 0);
    for i in 0..entries as usize {
        bytes[table + 4 * i..table + 4 * i + 4].copy_from_slice(&(block as u32).to_be_bytes());
    }
    bytes.extend_from_slice(&vec![0x55; 512]);
    bytes.extend_from_slice(&vec![0u8; 2 * MIB as usize]);
    bytes.extend_from_slice(&[0u8; 512]);
    let mut flood = Dyn { bytes };
    flood.reseal();
    let e = open_bytes(flood.bytes)
        .err()
        .expect("one block for every entry");
    assert!(
        e.to_string().contains(&format!(
            "BAT entries 0 and 1 share the block at sector {block}"
        )),
        "{e}"
    );
}
