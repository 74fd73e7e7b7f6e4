#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Azure target: the data path against Azurite (started by `.ci/standins start`), the control path against a
//! fake ARM + Entra token server (`tests/standins/fake_arm.py`) over HTTPS with a certificate made here, trusted
//! through `IMGSHIFT_CA_BUNDLE`. Faults on the data path come from the recording proxy in front of Azurite.

mod util;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use util::*;

const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "imgshift-client-secret-DO-NOT-PRINT";
const TOKEN: &str = "imgshift-arm-token-DO-NOT-PRINT";
const SUB: &str = "6d3c5e4a-0000-4000-8000-000000000001";
const RG: &str = "imgshift-rg";
const MIB: u64 = 1 << 20;

fn azurite_url() -> String {
    let url = "http://127.0.0.1:10000".to_string();
    if std::net::TcpStream::connect("127.0.0.1:10000").is_err() {
        panic!("Azurite is not reachable at {url}: start it with `bash .ci/standins start`");
    }
    url
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/standins")
        .join(name)
}

/// A CA and a server certificate for 127.0.0.1 (openssl CLI).
fn certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = dir.join("ca.pem");
    let cakey = dir.join("ca.key");
    let cert = dir.join("srv.pem");
    let key = dir.join("srv.key");
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ossl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl ({e}): install it with `apt-get install openssl`")
            });
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        s(&cakey),
        "-out",
        s(&ca),
        "-days",
        "2",
        "-subj",
        "/CN=imgshift test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    let csr = dir.join("srv.csr");
    ossl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        s(&key),
        "-out",
        s(&csr),
        "-subj",
        "/CN=127.0.0.1",
    ]);
    ossl(&[
        "x509",
        "-req",
        "-in",
        s(&csr),
        "-CA",
        s(&ca),
        "-CAkey",
        s(&cakey),
        "-CAcreateserial",
        "-out",
        s(&cert),
        "-days",
        "2",
        "-extfile",
        s(&ext),
    ]);
    (ca, cert, key)
}

/// A line-printing helper child (fake ARM or recording proxy) whose first output line is its port.
fn spawn_port(mut c: Command) -> (Child, u16) {
    let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("helper printed '{line}' instead of a port"));
    (child, port)
}

fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Env {
    dir: tempfile::TempDir,
    ca: PathBuf,
    arm: Child,
    arm_port: u16,
    arm_log: PathBuf,
    proxy: Option<(Child, PathBuf)>,
    container: String,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.arm.kill();
        let _ = self.arm.wait();
        if let Some((p, _)) = &mut self.proxy {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Env {
    /// Fake ARM (with `arm_args`), optionally with the recording proxy (with `proxy_args`) in front of Azurite.
    fn start(tag: &str, arm_args: &[&str], proxy_args: Option<&[&str]>) -> Env {
        let azurite = azurite_url();
        let dir = tmpdir();
        let (ca, cert, key) = certs(dir.path());
        let container = format!("t{}-{tag}", std::process::id());
        let mut proxy = None;
        let mut blob_base = azurite.clone();
        if let Some(pa) = proxy_args {
            let log = dir.path().join("blob.jsonl");
            let mut c = Command::new("python3");
            c.arg(script("recording_proxy.py"))
                .args(["--upstream", &azurite, "--log", s(&log)])
                .args(pa);
            let (child, port) = spawn_port(c);
            blob_base = format!("http://127.0.0.1:{port}");
            proxy = Some((child, log));
        }
        let arm_log = dir.path().join("arm.jsonl");
        let mut c = Command::new("python3");
        c.arg(script("fake_arm.py")).args([
            "serve",
            "--azurite",
            &azurite,
            "--blob-base",
            &blob_base,
            "--container",
            &container,
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "--log",
            s(&arm_log),
            "--token",
            TOKEN,
            "--client-secret",
            CLIENT_SECRET,
            "--subscription",
            SUB,
            "--resource-group",
            RG,
        ]);
        c.args(arm_args);
        let (arm, arm_port) = spawn_port(c);
        Env {
            dir,
            ca,
            arm,
            arm_port,
            arm_log,
            proxy,
            container,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn arm_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.arm_port)
    }

    fn records(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.arm_log)
    }

    /// ARM calls that change things, as "METHOD last-path-parts".
    fn writes(&self) -> Vec<String> {
        self.records()
            .iter()
            .filter(|r| r["method"] == "PUT" || r["method"] == "POST")
            .filter(|r| !r["path"].as_str().unwrap().ends_with("/token"))
            .map(|r| {
                let p = r["path"].as_str().unwrap();
                let tail: Vec<&str> = p.rsplit('/').take(2).collect();
                format!("{} {}/{}", r["method"].as_str().unwrap(), tail[1], tail[0])
            })
            .collect()
    }

    fn bodies(&self, method: &str, path_part: &str) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["method"] == method && r["path"].as_str().unwrap().contains(path_part))
            .map(|r| r["body"].clone())
            .collect()
    }

    fn page_puts(&self) -> Vec<serde_json::Value> {
        let (_, log) = self.proxy.as_ref().expect("no proxy");
        read_jsonl(log)
            .into_iter()
            .filter(|r| r["method"] == "PUT" && r["query"].as_str().unwrap().contains("comp=page"))
            .collect()
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(imgshift_bin());
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("AZURE_TENANT_ID", TENANT)
            .env("AZURE_CLIENT_ID", CLIENT_ID)
            .env("AZURE_CLIENT_SECRET", CLIENT_SECRET)
            .env("AZURE_AUTHORITY_HOST", self.arm_url())
            .env("IMGSHIFT_CA_BUNDLE", &self.ca);
        c
    }

    fn upload_cmd(&self, src: &Path, disk: &str, extra: &[&str]) -> Command {
        let mut c = self.cmd();
        c.args([
            "upload",
            "azure",
            s(src),
            "--subscription",
            SUB,
            "--resource-group",
            RG,
        ])
        .args([
            "--location",
            "westeurope",
            "--disk-name",
            disk,
            "--arm-endpoint",
            &self.arm_url(),
        ])
        .args([
            "--state-dir",
            s(&self.path().join("state")),
            "--output",
            "json",
        ])
        .args(extra);
        c
    }

    fn upload(&self, src: &Path, disk: &str, extra: &[&str]) -> Run {
        run(self.upload_cmd(src, disk, extra))
    }

    fn blob(&self, disk: &str) -> String {
        format!("{}/{disk}.vhd", self.container)
    }

    fn download(&self, disk: &str) -> PathBuf {
        let out = self.path().join(format!("{disk}.vhd"));
        let o = Command::new("python3")
            .arg(script("fake_arm.py"))
            .args(["get", &self.blob(disk), s(&out)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    }

    fn page_ranges(&self, disk: &str) -> Vec<(u64, u64)> {
        let o = Command::new("python3")
            .arg(script("fake_arm.py"))
            .args(["ranges", &self.blob(disk)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Vec<(u64, u64)> = serde_json::from_slice(&o.stdout).unwrap();
        v
    }
}

fn run(mut c: Command) -> Run {
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {} / {}", r.stdout, r.stderr))
}

/// The page ranges a sparse upload must produce: the source's non-zero 4 KiB granules, merged, then the footer.
fn expected_ranges(raw: &Path, data_size: u64) -> Vec<(u64, u64)> {
    let data = std::fs::read(raw).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, c) in data.chunks(4096).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let a = i as u64 * 4096;
        let b = a + (c.len() as u64).next_multiple_of(512) - 1;
        match out.last_mut() {
            Some(l) if l.1 + 1 == a => l.1 = b,
            _ => out.push((a, b)),
        }
    }
    out.push((data_size, data_size + 511));
    out
}

/// Checks the blob: source + zeros + a fixed-VHD footer that qemu-img reads as vpc with the same contents.
fn check_blob(env: &Env, disk: &str, raw: &Path, data_size: u64) {
    let vhd = env.download(disk);
    assert_eq!(std::fs::metadata(&vhd).unwrap().len(), data_size + 512);
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-f",
        "vpc",
        "--output",
        "json",
        s(&vhd),
    ]))
    .unwrap();
    assert_eq!(info["virtual-size"], data_size, "{info}");
    let bytes = std::fs::read(&vhd).unwrap();
    let footer = &bytes[data_size as usize..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed disk type"
    );
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        data_size
    );
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    assert_eq!(
        u32::from_be_bytes(footer[64..68].try_into().unwrap()),
        !sum,
        "footer checksum"
    );
    assert_same(&vhd, "vpc", raw, "raw");
    let src = std::fs::read(raw).unwrap();
    assert!(
        bytes[..src.len()] == src[..],
        "blob data differs from the source"
    );
    // Azurite lists the ranges of separate requests separately: merge adjacent ones before comparing.
    let mut got: Vec<(u64, u64)> = Vec::new();
    for (a, b) in env.page_ranges(disk) {
        match got.last_mut() {
            Some(l) if l.1 + 1 == a => l.1 = b,
            _ => got.push((a, b)),
        }
    }
    let mut want = expected_ranges(raw, data_size);
    // The footer page directly follows data that ends at the data part's end.
    if want.len() >= 2 && want[want.len() - 2].1 + 1 == data_size {
        let f = want.pop().unwrap();
        want.last_mut().unwrap().1 = f.1;
    }
    assert_eq!(got, want, "page ranges");
}

fn test_raw(dir: &Path, name: &str, size: u64) -> PathBuf {
    let raw = dir.join(name);
    make_raw(
        &raw,
        size,
        &[
            (0, 3 * MIB),
            (8 * MIB - 4096, 8192),
            (17 * MIB + 4096, 4096),
            (size - MIB, MIB),
        ],
        &[(10 * MIB, 4 * MIB)],
    );
    raw
}

#[test]
fn uploads_formats_to_a_page_blob_and_makes_an_image() {
    let env = Env::start("fmt", &[], None);
    // 33 MiB + 100 KiB: rounds up to 34 MiB.
    let size = 33 * MIB + 100 * 1024;
    let raw = test_raw(env.path(), "disk.raw", size);
    for fmt in ["raw", "qcow2", "vhdx", "vmdk"] {
        let img = env.path().join(format!("disk.{fmt}"));
        if fmt != "raw" {
            qemu_img(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&img)]);
        }
        let src = if fmt == "raw" { raw.clone() } else { img };
        let disk = format!("disk-{fmt}");
        let image = format!("img-{fmt}");
        let before = env.records().len();
        let r = env.upload(&src, &disk, &["--image-name", &image]);
        assert_eq!(r.code, 0, "{fmt}: {}", r.stderr);
        let v = json(&r);
        assert_eq!(v["upload_size_bytes"], 34 * MIB + 512);
        assert_eq!(v["hyper_v_generation"], "V1");
        assert!(
            v["image_id"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/images/{image}"))
        );
        check_blob(&env, &disk, &raw, 34 * MIB);

        let recs: Vec<_> = env.records().into_iter().skip(before).collect();
        assert!(
            recs.iter()
                .filter(|r| !r["path"].as_str().unwrap().ends_with("/token"))
                .all(|r| r["auth"] == true)
        );
        let order: Vec<String> = recs
            .iter()
            .filter(|r| r["method"] != "GET" && !r["path"].as_str().unwrap().ends_with("/token"))
            .map(|r| {
                format!(
                    "{} {}",
                    r["method"].as_str().unwrap(),
                    r["path"].as_str().unwrap().rsplit('/').next().unwrap()
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                format!("PUT {disk}"),
                "POST beginGetAccess".to_string(),
                "POST endGetAccess".to_string(),
                format!("PUT {image}"),
            ]
        );
        let disk_put = &env.bodies("PUT", &format!("/disks/{disk}"))[0];
        assert_eq!(
            disk_put["properties"]["creationData"]["createOption"],
            "Upload"
        );
        assert_eq!(
            disk_put["properties"]["creationData"]["uploadSizeBytes"],
            34 * MIB + 512
        );
        assert_eq!(disk_put["properties"]["hyperVGeneration"], "V1");
        assert_eq!(disk_put["properties"]["osType"], "Linux");
        assert_eq!(disk_put["sku"]["name"], "Standard_LRS");
        assert_eq!(disk_put["location"], "westeurope");
        let img_put = &env.bodies("PUT", &format!("/images/{image}"))[0];
        assert_eq!(img_put["properties"]["hyperVGeneration"], "V1");
        let os = &img_put["properties"]["storageProfile"]["osDisk"];
        assert_eq!(os["osType"], "Linux");
        assert_eq!(
            os["managedDisk"]["id"],
            format!(
                "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/disks/{disk}"
            )
        );
        let grant = &env.bodies("POST", &format!("/disks/{disk}/beginGetAccess"))[0];
        assert_eq!(grant["access"], "Write");
    }
    assert!(
        std::fs::read_dir(env.path().join("state"))
            .unwrap()
            .next()
            .is_none(),
        "journal left"
    );
}

#[test]
fn small_disks_are_padded_and_gpt_esp_gives_v2_and_a_gallery_version() {
    let env = Env::start("gen", &[], None);
    let raw = env.path().join("gpt.raw");
    // 5 MiB with a GPT whose second entry is an EFI system partition, and some data.
    make_raw(&raw, 5 * MIB, &[(MIB, 64 * 1024)], &[]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        let mut hdr = vec![0u8; 512];
        hdr[..8].copy_from_slice(b"EFI PART");
        hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
        hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        f.write_all_at(&hdr, 512).unwrap();
        let esp = [
            0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
            0xC9, 0x3B,
        ];
        f.write_all_at(&esp, 1024 + 128).unwrap();
    }
    let r = env.upload(
        &raw,
        "gpt-disk",
        &[
            "--gallery",
            "gal",
            "--gallery-image",
            "def",
            "--gallery-version",
            "1.2.3",
            "--os-type",
            "windows",
            "--sku",
            "Premium_LRS",
            "--tag",
            "team=storage",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("Hyper-V generation V2"), "{}", r.stderr);
    let v = json(&r);
    assert_eq!(v["upload_size_bytes"], 20 * MIB + 512);
    let d = &env.bodies("PUT", "/disks/gpt-disk")[0];
    assert_eq!(d["properties"]["hyperVGeneration"], "V2");
    assert_eq!(d["properties"]["osType"], "Windows");
    assert_eq!(
        d["properties"]["creationData"]["uploadSizeBytes"],
        20 * MIB + 512
    );
    assert_eq!(d["sku"]["name"], "Premium_LRS");
    assert_eq!(d["tags"]["team"], "storage");
    let g = &env.bodies("PUT", "/galleries/gal/images/def/versions/1.2.3")[0];
    assert!(
        g["properties"]["storageProfile"]["osDiskImage"]["source"]["id"]
            .as_str()
            .unwrap()
            .ends_with("/disks/gpt-disk")
    );
    assert!(
        v["gallery_image_version_id"]
            .as_str()
            .unwrap()
            .ends_with("/versions/1.2.3")
    );
    check_blob(&env, "gpt-disk", &raw, 20 * MIB);
}

#[test]
fn resumes_after_kill_with_a_fresh_sas() {
    // The first run's SAS lives 3 s; the resumed run must ask for a new one, not reuse it.
    let env = Env::start("resume", &["--sas-ttl", "3,3600"], Some(&[]));
    let raw = env.path().join("big.raw");
    make_raw(&raw, 160 * MIB, &[(0, 120 * MIB)], &[]);
    let want = 120 / 4 + 1;
    let mut child = env
        .upload_cmd(
            &raw,
            "resume-disk",
            &["--concurrency", "1", "--image-name", "resumed"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the journal has recorded acknowledged windows.
    let journal_progress = || {
        std::fs::read_dir(env.path().join("state"))
            .ok()
            .is_some_and(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .any(|e| {
                        let v: serde_json::Value = serde_json::from_str(
                            &std::fs::read_to_string(e.path()).unwrap_or_default(),
                        )
                        .unwrap_or_default();
                        v["done"]
                            .as_str()
                            .is_some_and(|d| d.chars().any(|c| c != 'A' && c != '='))
                    })
            })
    };
    let t0 = std::time::Instant::now();
    while !journal_progress() {
        assert!(t0.elapsed().as_secs() < 60, "upload made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "upload finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = env.page_puts().len();
    assert!(first < want);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let r = env.upload(
        &raw,
        "resume-disk",
        &["--concurrency", "4", "--image-name", "resumed"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("resuming job"), "{}", r.stderr);
    let v = json(&r);
    assert_eq!(v["resumed"], true);
    let w = env.writes();
    assert_eq!(
        w.iter().filter(|x| x.starts_with("PUT disks/")).count(),
        1,
        "{w:?}"
    );
    assert_eq!(
        w.iter().filter(|x| x.ends_with("/beginGetAccess")).count(),
        2,
        "{w:?}"
    );
    let total = env.page_puts().len();
    assert!(
        total < want + first,
        "acknowledged windows were sent again: {total} puts"
    );
    check_blob(&env, "resume-disk", &raw, 160 * MIB);
    assert!(
        std::fs::read_dir(env.path().join("state"))
            .unwrap()
            .next()
            .is_none(),
        "journal left"
    );
}

#[test]
fn retries_injected_503s_and_arm_429() {
    let env = Env::start(
        "faults",
        &["--throttle-once", "beginGetAccess"],
        Some(&[
            "--fault-rate",
            "0.2",
            "--fault-path",
            "/devstoreaccount1/",
            "--fault-status",
            "503",
        ]),
    );
    let raw = test_raw(env.path(), "disk.raw", 40 * MIB);
    let r = env.upload(&raw, "fault-disk", &["--max-attempts", "10"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    assert!(
        env.page_puts().iter().any(|p| p["injected"] == true),
        "no fault injected"
    );
    assert!(v["retries"].as_u64().unwrap() > 0, "{v}");
    let grants: Vec<_> = env
        .records()
        .into_iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/beginGetAccess"))
        .collect();
    assert_eq!(grants.len(), 2, "429 then a retry");
    assert_eq!(grants[0]["throttled"], true);
    check_blob(&env, "fault-disk", &raw, 40 * MIB);
}

#[test]
fn failed_operations_and_bad_input_are_one_line_errors() {
    let env = Env::start("errors", &["--fail-lro", "image"], None);
    let raw = test_raw(env.path(), "disk.raw", 24 * MIB);
    // The Hyper-V generation notice (printed before anything is created) is not part of the error.
    let one_line = |r: &Run| {
        assert_eq!(r.code, 1, "{}", r.stderr);
        let lines: Vec<&str> = r
            .stderr
            .trim()
            .lines()
            .filter(|l| !l.starts_with("imgshift: Hyper-V generation"))
            .collect();
        assert_eq!(lines.len(), 1, "{}", r.stderr);
        assert!(r.stderr.starts_with("imgshift: "), "{}", r.stderr);
    };
    // An image LRO that ends Failed: named, the uploaded disk kept.
    let r = env.upload(&raw, "lro-disk", &["--image-name", "bad"]);
    one_line(&r);
    assert!(
        r.stderr
            .contains("creating image bad failed: InternalOperationError"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("disk lro-disk is uploaded and kept"),
        "{}",
        r.stderr
    );
    // Wrong resource group.
    let mut c = env.upload_cmd(&raw, "x", &[]);
    let args: Vec<String> = c
        .get_args()
        .map(|a| a.to_string_lossy().replace(RG, "no-such-rg"))
        .collect();
    c = env.cmd();
    c.args(&args);
    let r = run(c);
    one_line(&r);
    assert!(
        r.stderr.contains("HTTP 404") && r.stderr.contains("ResourceGroupNotFound"),
        "{}",
        r.stderr
    );
    // The disk name is taken (another source, so another job).
    let other = test_raw(env.path(), "other.raw", 21 * MIB);
    let r = env.upload(&other, "lro-disk", &[]);
    one_line(&r);
    assert!(
        r.stderr.contains("disk lro-disk already exists"),
        "{}",
        r.stderr
    );
    // No credentials at all (no service principal, no `az` on PATH).
    let mut c = env.upload_cmd(&raw, "nocred", &[]);
    c.env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_CLIENT_ID")
        .env_remove("AZURE_CLIENT_SECRET")
        .env("PATH", "/nonexistent");
    let r = run(c);
    one_line(&r);
    assert!(r.stderr.contains("no Azure credentials"), "{}", r.stderr);
    // A wrong client secret.
    let mut c = env.upload_cmd(&raw, "badsecret", &[]);
    c.env("AZURE_CLIENT_SECRET", "wrong");
    let r = run(c);
    one_line(&r);
    assert!(r.stderr.contains("no Azure credentials"), "{}", r.stderr);
    // An untrusted server certificate: refused, not ignored.
    let mut c = env.upload_cmd(&raw, "untrusted", &[]);
    c.env_remove("IMGSHIFT_CA_BUNDLE");
    let r = run(c);
    one_line(&r);
    // Nothing was created by the failed runs.
    let puts = env.writes();
    assert!(
        !puts.iter().any(|w| w.contains("disks/x")
            || w.contains("nocred")
            || w.contains("badsecret")
            || w.contains("untrusted")),
        "{puts:?}"
    );
}

#[test]
fn secrets_never_printed_or_stored() {
    let env = Env::start(
        "secrets",
        &["--fail-lro", "image"],
        Some(&["--fault-rate", "0.1", "--fault-path", "/devstoreaccount1/"]),
    );
    let raw = test_raw(env.path(), "disk.raw", 24 * MIB);
    let r = env.upload(
        &raw,
        "secret-disk",
        &["--verbose", "--progress", "--image-name", "img"],
    );
    assert_eq!(r.code, 1, "the image LRO was set to fail: {}", r.stderr);
    // Data-path failure with the SAS in play: a blob that rejects everything (all 403s through the proxy).
    let env2 = Env::start(
        "secrets2",
        &[],
        Some(&[
            "--fault-rate",
            "1",
            "--fault-path",
            "/devstoreaccount1/",
            "--fault-status",
            "403",
        ]),
    );
    let r2 = env2.upload(&raw, "secret-disk2", &["--verbose"]);
    assert_eq!(r2.code, 1);
    assert!(r2.stderr.contains("HTTP 403"), "{}", r2.stderr);
    let mut all = format!("{}{}{}{}", r.stdout, r.stderr, r2.stdout, r2.stderr);
    for d in [env.path().join("state"), env2.path().join("state")] {
        for e in std::fs::read_dir(d).unwrap() {
            all.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
        }
    }
    assert!(
        all.contains("Put Page") || all.contains("ARM"),
        "verbose output expected: {all}"
    );
    for secret in [CLIENT_SECRET, TOKEN] {
        assert!(!all.contains(secret), "{secret} leaked");
    }
    for (i, _) in all.match_indices("sig=") {
        assert!(
            all[i..].starts_with("sig=REDACTED"),
            "a SAS signature leaked: {}",
            &all[i..(i + 40).min(all.len())]
        );
    }
}
