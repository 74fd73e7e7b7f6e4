//! The Azure stand-ins shared by the Azure test files: a fake ARM + Entra token server
//! (`tests/standins/fake_arm.py`) over HTTPS with a certificate made here (trusted through `IMGSHIFT_CA_BUNDLE`),
//! Azurite behind it (started by `.ci/standins start`), optionally the recording proxy in front of Azurite, and
//! checks of what a disk's blob holds.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::*;

pub const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "imgshift-client-secret-DO-NOT-PRINT";
pub const TOKEN: &str = "imgshift-arm-token-DO-NOT-PRINT";
pub const SUB: &str = "6d3c5e4a-0000-4000-8000-000000000001";
pub const RG: &str = "imgshift-rg";
pub const MIB: u64 = 1 << 20;

/// Azurite's blob endpoint: `IMGSHIFT_AZURITE_URL`, else the one `.ci/standins start` recorded (see
/// `util::standin`); panics saying how to start it unless Azurite answers there as itself.
pub fn azurite_url() -> String {
    let url = standin("IMGSHIFT_AZURITE_URL", "http://127.0.0.1:10000");
    // Azurite names itself in the Server header of every blob answer (an error one included).
    let answer = http_get(&url, "/devstoreaccount1?comp=list");
    let is_azurite = answer.as_deref().is_some_and(|a| {
        a.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("server: azurite-blob/"))
    });
    assert!(
        is_azurite,
        "Azurite is not answering at {url} ({}): start the stand-ins with `bash .ci/standins start` (or set \
         IMGSHIFT_AZURITE_URL)",
        answer.map_or("no answer".into(), |a| format!(
            "the answer there is not Azurite's: {:?}",
            a.lines().next().unwrap_or("")
        ))
    );
    url
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/standins")
        .join(name)
}

/// A CA and a server certificate for 127.0.0.1 (openssl CLI).
pub fn certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
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
pub fn spawn_port(mut c: Command) -> (Child, u16) {
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

pub fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub arm: Child,
    pub arm_port: u16,
    pub arm_log: PathBuf,
    pub arm_state: PathBuf,
    pub proxy: Option<(Child, PathBuf)>,
    pub container: String,
    /// Azurite's blob endpoint.
    pub azurite: String,
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
    pub fn start(tag: &str, arm_args: &[&str], proxy_args: Option<&[&str]>) -> Env {
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
        let arm_state = dir.path().join("arm-state.json");
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
            "--state-file",
            s(&arm_state),
        ]);
        c.args(arm_args);
        let (arm, arm_port) = spawn_port(c);
        Env {
            dir,
            ca,
            arm,
            arm_port,
            arm_log,
            arm_state,
            proxy,
            container,
            azurite,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn arm_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.arm_port)
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.arm_log)
    }

    /// ARM calls that change things, as "METHOD last-path-parts".
    pub fn writes(&self) -> Vec<String> {
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

    pub fn bodies(&self, method: &str, path_part: &str) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["method"] == method && r["path"].as_str().unwrap().contains(path_part))
            .map(|r| r["body"].clone())
            .collect()
    }

    pub fn page_puts(&self) -> Vec<serde_json::Value> {
        let (_, log) = self.proxy.as_ref().expect("no proxy");
        read_jsonl(log)
            .into_iter()
            .filter(|r| r["method"] == "PUT" && r["query"].as_str().unwrap().contains("comp=page"))
            .collect()
    }

    pub fn cmd(&self) -> Command {
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

    pub fn upload_cmd(&self, src: &Path, disk: &str, extra: &[&str]) -> Command {
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

    pub fn upload(&self, src: &Path, disk: &str, extra: &[&str]) -> Run {
        run(self.upload_cmd(src, disk, extra))
    }

    pub fn blob(&self, disk: &str) -> String {
        format!("{}/{disk}.vhd", self.container)
    }

    pub fn download(&self, disk: &str) -> PathBuf {
        let out = self.path().join(format!("{disk}.vhd"));
        let o = Command::new("python3")
            .arg(script("fake_arm.py"))
            .args(["get", &self.blob(disk), s(&out), "--azurite", &self.azurite])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    }

    /// What the fake ARM holds: disk names and resource paths (e.g. `images/NAME`).
    pub fn held(&self) -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value = std::fs::read_to_string(&self.arm_state)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({"disks": [], "resources": []}));
        let names = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        (names("disks"), names("resources"))
    }

    /// The blobs in this environment's Azurite container (none when it does not exist).
    pub fn blobs(&self) -> Vec<String> {
        let o = Command::new("python3")
            .arg(script("fake_arm.py"))
            .args(["list", &self.container, "--azurite", &self.azurite])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Overwrites one 512-byte page of `disk`'s blob at `offset` with `byte` (behind the tool's back).
    pub fn damage(&self, disk: &str, offset: u64, byte: u8) {
        let o = Command::new("python3")
            .arg(script("fake_arm.py"))
            .args([
                "put-page",
                &self.blob(disk),
                &offset.to_string(),
                &byte.to_string(),
                "--azurite",
                &self.azurite,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    pub fn page_ranges(&self, disk: &str) -> Vec<(u64, u64)> {
        let o = Command::new("python3")
            .arg(script("fake_arm.py"))
            .args(["ranges", &self.blob(disk), "--azurite", &self.azurite])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Vec<(u64, u64)> = serde_json::from_slice(&o.stdout).unwrap();
        v
    }
}

pub fn run(mut c: Command) -> Run {
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {} / {}", r.stdout, r.stderr))
}

/// The page ranges a sparse upload must produce: the source's non-zero 4 KiB granules, merged, then the footer.
pub fn expected_ranges(raw: &Path, data_size: u64) -> Vec<(u64, u64)> {
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
pub fn check_blob(env: &Env, disk: &str, raw: &Path, data_size: u64) {
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
