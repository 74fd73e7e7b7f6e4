#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile images at the CLI: for vpc, vhdx, vmdk and vdi, images qemu-img made and then broke by hand (bad
//! checksums, table entries past the end, block sizes out of range, extents and parents naming files outside
//! the image's folder, a million-extent descriptor, a VHDX log outside the file). Each
//! `imgshift convert -f FMT bad out.raw` must exit 1 with exactly one line on standard error, never panic,
//! leave no output, and stay under 1 s and 64 MiB of peak RSS.

mod util;

use std::path::PathBuf;

use imgshift_converters::formats::vhdx::checksum as crc32c_with_hole;
use util::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// One hostile image: its format, a name, and its files (the first is the image).
struct Case {
    fmt: &'static str,
    name: String,
    files: Vec<(String, Vec<u8>)>,
}

fn case(fmt: &'static str, name: &str, ext: &str, bytes: Vec<u8>) -> Case {
    Case {
        fmt,
        name: name.to_string(),
        files: vec![(format!("bad.{ext}"), bytes)],
    }
}

/// Makes an image with qemu-img from a raw disk of `size` bytes with `data`; returns its bytes.
fn qemu_image(fmt: &str, opts: &str, size: u64, data: &[(u64, u64)]) -> Vec<u8> {
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    make_raw(&raw, size, data, &[]);
    let img = d.path().join("img");
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&raw), s(&img)]);
    qemu_img(&args);
    std::fs::read(&img).unwrap()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

// ---- VHD (vpc): Virtual Hard Disk Image Format Specification 1.0 ----

/// The VHD checksum: one's complement of the byte sum.
fn vhd_sum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

/// Re-sums the footer at 0, copies it to the end, and re-sums the dynamic header.
fn vhd_reseal(b: &mut [u8]) {
    b[64..68].fill(0);
    let c = vhd_sum(&b[..512]);
    put(b, 64, &c.to_be_bytes());
    let n = b.len();
    let foot = b[..512].to_vec();
    b[n - 512..].copy_from_slice(&foot);
    let h = be64(b, 16) as usize;
    b[h + 36..h + 40].fill(0);
    let c = vhd_sum(&b[h..h + 1024]);
    put(b, h + 36, &c.to_be_bytes());
}

/// Turns a dynamic VHD into a differencing disk whose W2ru parent locator says `locator`.
fn vhd_differencing(mut b: Vec<u8>, locator: &str) -> Vec<u8> {
    let n = b.len();
    let footer = b[n - 512..].to_vec();
    let loc_off = n - 512;
    let mut loc = vec![0u8; 512];
    for (i, u) in locator.encode_utf16().enumerate() {
        put(&mut loc, 2 * i, &u.to_le_bytes());
    }
    b.truncate(loc_off);
    b.extend_from_slice(&loc);
    b.extend_from_slice(&footer);
    put(&mut b, 60, &4u32.to_be_bytes()); // disk type: differencing
    let h = be64(&b, 16) as usize;
    put(&mut b, h + 40, &[0x5a; 16]); // parent unique id
    let e = h + 576; // first parent locator entry
    put(&mut b, e, b"W2ru");
    put(&mut b, e + 4, &1u32.to_be_bytes());
    put(
        &mut b,
        e + 8,
        &((locator.encode_utf16().count() * 2) as u32).to_be_bytes(),
    );
    put(&mut b, e + 16, &(loc_off as u64).to_be_bytes());
    vhd_reseal(&mut b);
    b
}

fn vpc_cases() -> Vec<Case> {
    let base = qemu_image("vpc", "", 6 * MIB, &[(0, 6 * MIB)]);
    let fixed = qemu_image("vpc", "subformat=fixed", 6 * MIB, &[(0, 6 * MIB)]);
    let h = be64(&base, 16) as usize;
    let bat = be64(&base, h + 16) as usize;
    assert_eq!(&base[h..h + 8], b"cxsparse");
    let mut out = Vec::new();

    let mut b = base.clone();
    let n = b.len();
    b[40] ^= 1; // original size: both footer copies' checksums now wrong
    b[n - 512 + 40] ^= 1;
    out.push(case("vpc", "footer checksum", "vhd", b));
    let mut b = fixed.clone();
    let n = b.len();
    b[n - 512 + 40] ^= 1;
    out.push(case("vpc", "fixed footer checksum", "vhd", b));
    let mut b = base.clone();
    b[h + 600] ^= 1;
    out.push(case("vpc", "header checksum", "vhd", b));
    let mut b = base.clone();
    put(&mut b, bat, &0x7fff_fff0u32.to_be_bytes());
    out.push(case("vpc", "BAT entry past EOF", "vhd", b));
    for (name, bs) in [
        ("block size 3 MiB", 3 << 20),
        ("block size 512", 512),
        ("block size 1 GiB", 1 << 30),
    ] {
        let mut b = base.clone();
        put(&mut b, h + 32, &(bs as u32).to_be_bytes());
        vhd_reseal(&mut b);
        out.push(case("vpc", name, "vhd", b));
    }
    for (name, loc) in [
        ("parent /etc/passwd", "/etc/passwd"),
        ("parent ../../x", "../../x"),
    ] {
        let mut c = case("vpc", name, "vhd", vhd_differencing(base.clone(), loc));
        // A real file where ../../x points, so only the gate can refuse it.
        c.files.push(("../../x".into(), base.clone()));
        out.push(c);
    }
    out
}

// ---- VHDX: MS-VHDX 2.0 ----

const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
const FILE_PARAMS_GUID: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];

/// File offset of the region `guid` (first region table, at 192 KiB).
fn vhdx_region(b: &[u8], guid: &[u8; 16]) -> usize {
    let rt = 192 * KIB as usize;
    let n = le32(b, rt + 8) as usize;
    (0..n)
        .map(|i| rt + 16 + 32 * i)
        .find(|&e| &b[e..e + 16] == guid)
        .map(|e| le64(b, e + 16) as usize)
        .unwrap()
}

/// File offset of the metadata item `guid`.
fn vhdx_item(b: &[u8], guid: &[u8; 16]) -> usize {
    let md = vhdx_region(b, &METADATA_GUID);
    let n = u16::from_le_bytes([b[md + 10], b[md + 11]]) as usize;
    (0..n)
        .map(|i| md + 32 + 32 * i)
        .find(|&e| &b[e..e + 16] == guid)
        .map(|e| md + le32(b, e + 16) as usize)
        .unwrap()
}

/// Patches a field of both headers (at 64 and 128 KiB) and fixes their CRC-32C.
fn vhdx_patch_headers(b: &mut [u8], field: usize, bytes: &[u8]) {
    for h in [64 * KIB as usize, 128 * KIB as usize] {
        put(b, h + field, bytes);
        let crc = crc32c_with_hole(&b[h..h + 4096], 4);
        put(b, h + 4, &crc.to_le_bytes());
    }
}

fn vhdx_cases() -> Vec<Case> {
    let base = qemu_image(
        "vhdx",
        "block_size=1M",
        8 * MIB,
        &[(0, MIB), (2 * MIB, 2 * MIB)],
    );
    assert_eq!(&base[..8], b"vhdxfile");
    let mut out = Vec::new();

    let mut b = base.clone();
    b[64 * KIB as usize + 100] ^= 1;
    b[128 * KIB as usize + 100] ^= 1;
    out.push(case("vhdx", "both header checksums", "vhdx", b));
    let mut b = base.clone();
    let bat = vhdx_region(&b, &BAT_GUID);
    put(&mut b, bat, &((1u64 << 30) << 20 | 6).to_le_bytes()); // FULLY_PRESENT at 1 PiB
    out.push(case("vhdx", "BAT entry past EOF", "vhdx", b));
    for (name, bs) in [
        ("block size 3 MiB", 3 * MIB as u32),
        ("block size 512 MiB", 512 * MIB as u32),
        ("block size 0", 0),
    ] {
        let mut b = base.clone();
        let at = vhdx_item(&b, &FILE_PARAMS_GUID);
        put(&mut b, at, &bs.to_le_bytes());
        out.push(case("vhdx", name, "vhdx", b));
    }
    let mut b = base.clone();
    vhdx_patch_headers(&mut b, 48, &[0x11; 16]); // log GUID: a log to replay
    vhdx_patch_headers(&mut b, 72, &(1u64 << 40).to_le_bytes()); // log offset: 1 TiB
    out.push(case("vhdx", "log outside the file", "vhdx", b));
    out
}

// ---- VMDK: VMware Virtual Disk Format 5.0 ----

fn vmdk_descriptor(create_type: &str, extents: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n{extents}\n"
    )
}

fn vmdk_cases() -> Vec<Case> {
    let base = qemu_image(
        "vmdk",
        "subformat=monolithicSparse",
        64 * MIB,
        &[(0, MIB), (40 * MIB, MIB)],
    );
    assert_eq!(&base[..4], b"KDMV");
    let gd = le64(&base, 56) as usize * 512;
    let gt = le32(&base, gd) as usize * 512;
    let mut out = Vec::new();

    let mut b = base.clone();
    put(&mut b, gt, &0x00ff_ffffu32.to_le_bytes());
    out.push(case("vmdk", "grain table entry past EOF", "vmdk", b));
    let mut b = base.clone();
    put(&mut b, gd, &0x00ff_ffffu32.to_le_bytes());
    out.push(case("vmdk", "grain directory entry past EOF", "vmdk", b));
    for (name, grain) in [("grain size 0", 0u64), ("grain size 2^20 sectors", 1 << 20)] {
        let mut b = base.clone();
        put(&mut b, 20, &grain.to_le_bytes());
        out.push(case("vmdk", name, "vmdk", b));
    }
    for (name, target) in [
        ("extent /etc/passwd", "/etc/passwd"),
        ("extent ../../x", "../../x"),
    ] {
        let text = vmdk_descriptor("monolithicFlat", &format!("RW 8 FLAT \"{target}\" 0"));
        let mut c = case("vmdk", name, "vmdk", text.into_bytes());
        c.files.push(("../../x".into(), vec![0u8; 4096]));
        out.push(c);
    }
    let many = "RW 1 FLAT \"bad-flat.vmdk\" 0\n".repeat(1_000_000);
    let mut c = case(
        "vmdk",
        "10^6 extents",
        "vmdk",
        vmdk_descriptor("twoGbMaxExtentFlat", &many).into_bytes(),
    );
    c.files.push(("bad-flat.vmdk".into(), vec![0u8; 4096]));
    out.push(c);
    out
}

// ---- VDI: VirtualBox VDICore.h ----

fn vdi_cases() -> Vec<Case> {
    // 64 blocks of 1 MiB, two allocated.
    let base = qemu_image("vdi", "", 64 * MIB, &[(0, MIB), (10 * MIB, MIB)]);
    assert_eq!(le32(&base, 0x40), 0xbeda_107f);
    let bmap = le32(&base, 0x154) as usize;
    let mut out = Vec::new();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        b
    };
    out.push(case(
        "vdi",
        "block map past EOF",
        "vdi",
        edit(&|b| put(b, 0x154, &0x7fff_fe00u32.to_le_bytes())),
    ));
    out.push(case(
        "vdi",
        "block map entry past EOF",
        "vdi",
        edit(&|b| {
            put(b, 0x184, &64u32.to_le_bytes()); // blocks allocated: all of them
            put(b, bmap, &63u32.to_le_bytes()); // block 0's data: the 64th block, past the end
        }),
    ));
    out.push(case(
        "vdi",
        "block map entry above blocks allocated",
        "vdi",
        edit(&|b| put(b, bmap, &100u32.to_le_bytes())),
    ));
    for (name, bs) in [
        ("block size 3 MiB", 3u32 << 20),
        ("block size 512", 512),
        ("block size 0", 0),
    ] {
        out.push(case(
            "vdi",
            name,
            "vdi",
            edit(&|b| put(b, 0x178, &bs.to_le_bytes())),
        ));
    }
    out.push(case(
        "vdi",
        "blocks in image 2^32-1",
        "vdi",
        edit(&|b| put(b, 0x180, &u32::MAX.to_le_bytes())),
    ));
    out
}

/// What the CLI adds to a refusal of a file outside the trusted folders.
const ALLOW_DIR_HINT: &str = "(pass --allow-dir DIR to trust the folder that holds it)";

/// A refusal reads at most this many times its input (plus [`READ_SLACK`]).
const MAX_READ_FACTOR: u64 = 2;
/// Bytes every run reads besides its input: the loader, /proc and /sys files.
const READ_SLACK: u64 = 1 << 20;
/// Read calls a refusal may make.
const MAX_READ_CALLS: u64 = 10_000;

/// Writes the case's files under a fresh `root/a/b` (so `../../x` lands inside `root`), runs imgshift on the
/// image and checks the verdict; returns a description of what went wrong, if anything.
fn judge(c: &Case) -> Option<String> {
    let root = tmpdir();
    let dir = root.path().join("a/b");
    std::fs::create_dir_all(&dir).unwrap();
    let image: PathBuf = dir.join(&c.files[0].0);
    for (name, bytes) in &c.files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let before = files_in(&dir);
    let input = bytes_under(root.path());
    let out = dir.join("out.raw");
    let m = imgshift_measured(&["convert", "-f", c.fmt, s(&image), s(&out), "-O", "raw"]);
    let what = format!("{} {}", c.fmt, c.name);
    eprintln!(
        "{what}: exit {}, read {} B of {input} B in {} calls, {} KiB: {}",
        m.code,
        m.rchar,
        m.syscr,
        m.max_rss_kib,
        m.stderr.trim()
    );
    let mut bad = Vec::new();
    if m.code != 1 {
        bad.push(format!("exit code {} (want 1)", m.code));
    }
    if m.stderr.lines().count() != 1 || !m.stderr.starts_with("imgshift: ") {
        bad.push(format!("stderr is not one line: {:?}", m.stderr));
    }
    if m.stderr.contains("panicked") {
        bad.push("panicked".into());
    }
    if files_in(&dir) != before {
        bad.push(format!("left files: {:?}", files_in(&dir)));
    }
    // Bounded work: the refusal reads the case's files about once at most (plus the loader's and /proc reads),
    // whatever their fields claim, in a bounded number of read calls.
    if m.rchar > MAX_READ_FACTOR * input + READ_SLACK {
        bad.push(format!("read {} bytes of {input} bytes of input", m.rchar));
    }
    if m.syscr > MAX_READ_CALLS {
        bad.push(format!("{} read calls", m.syscr));
    }
    // A file refused for lying outside the trusted folders: the library says so, the CLI names the flag.
    if m.stderr.contains("outside the image's folder") && !m.stderr.contains(ALLOW_DIR_HINT) {
        bad.push("no --allow-dir hint".into());
    }
    if m.max_rss_kib >= 64 * 1024 {
        bad.push(format!("peak RSS {} KiB", m.max_rss_kib));
    }
    (!bad.is_empty()).then(|| format!("{what}: {}", bad.join("; ")))
}

fn run_all(cases: Vec<Case>) {
    assert!(!cases.is_empty());
    let n = cases.len();
    let failures: Vec<String> = cases.iter().filter_map(judge).collect();
    assert!(
        failures.is_empty(),
        "{} of {n} hostile images were mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The converters library says a named file is outside the trusted folders without naming a flag; the CLI's
/// one error line adds the `--allow-dir` hint, for a backing file and for a VMDK extent alike.
#[test]
fn untrusted_files_get_the_cli_hint() {
    let d = tmpdir();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(d.path().join("base.raw"), vec![0u8; 1 << 20]).unwrap();
    let top = sub.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    let vmdk = sub.join("desc.vmdk");
    std::fs::write(
        &vmdk,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 2048 FLAT \"../base.raw\" 0\nddb.virtualHWVersion = \"4\"\n",
    )
    .unwrap();
    for img in [&top, &vmdk] {
        let r = imgshift(&["info", s(img)]);
        assert_eq!(r.code, 1, "{img:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{img:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("outside the image's folder") && r.stderr.contains(ALLOW_DIR_HINT),
            "{img:?}: {}",
            r.stderr
        );
        let trusted = imgshift(&["info", "--allow-dir", s(d.path()), s(img)]);
        assert_eq!(
            trusted.code, 0,
            "{img:?} with --allow-dir: {}",
            trusted.stderr
        );
    }
}

#[test]
fn hostile_vpc() {
    run_all(vpc_cases());
}

#[test]
fn hostile_vhdx() {
    run_all(vhdx_cases());
}

#[test]
fn hostile_vmdk() {
    run_all(vmdk_cases());
}

#[test]
fn hostile_vdi() {
    run_all(vdi_cases());
}

/// The untouched images convert fine: the failures above come from the edits, not from the test's setup.
#[test]
fn unbroken_bases_convert() {
    let d = tmpdir();
    for (fmt, bytes) in [
        ("vpc", qemu_image("vpc", "", 6 * MIB, &[(0, 6 * MIB)])),
        (
            "vhdx",
            qemu_image(
                "vhdx",
                "block_size=1M",
                8 * MIB,
                &[(0, MIB), (2 * MIB, 2 * MIB)],
            ),
        ),
        (
            "vmdk",
            qemu_image(
                "vmdk",
                "subformat=monolithicSparse",
                64 * MIB,
                &[(0, MIB), (40 * MIB, MIB)],
            ),
        ),
        (
            "vdi",
            qemu_image("vdi", "", 64 * MIB, &[(0, MIB), (10 * MIB, MIB)]),
        ),
    ] {
        let img = d.path().join(format!("good.{fmt}"));
        std::fs::write(&img, bytes).unwrap();
        let out = d.path().join(format!("good-{fmt}.raw"));
        imgshift(&["convert", "-q", "-f", fmt, s(&img), s(&out)]).ok();
        assert_same(&img, fmt, &out, "raw");
    }
}
