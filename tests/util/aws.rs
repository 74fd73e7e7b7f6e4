//! AWS test helpers: moto's URL, the recording proxy in front of it (tests/standins/recording_proxy.py), and
//! an imgshift command with test credentials and nothing else from the environment.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{Run, imgshift_bin, s};

pub const ACCESS_KEY: &str = "AKIAIMGSHIFTTESTKEY1";
pub const SECRET_KEY: &str = "imgshift/secret/DO-NOT-PRINT-1234567890";
pub const SESSION_TOKEN: &str = "imgshift-session-token-DO-NOT-PRINT";

/// moto's endpoint: `IMGSHIFT_MOTO_URL`, else the one `.ci/standins start` recorded (see `util::standin`);
/// panics saying how to start it unless moto answers there as itself.
pub fn moto_url() -> String {
    let url = super::standin("IMGSHIFT_MOTO_URL", "http://127.0.0.1:5000");
    let url = url.trim_end_matches('/').to_string();
    // moto's own API: its dashboard page, titled Moto.
    let answer = super::http_get(&url, "/moto-api/");
    assert!(
        answer.as_deref().is_some_and(|a| a.starts_with("HTTP/1.")
            && a.lines().next().is_some_and(|l| l.contains(" 200"))
            && a.contains("<title>Moto</title>")),
        "moto is not answering at {url} ({}): start the stand-ins with `bash .ci/standins start` (or set \
         IMGSHIFT_MOTO_URL)",
        answer.map_or("no answer".into(), |a| format!(
            "the answer there is not moto's: {:?}",
            a.lines().next().unwrap_or("")
        ))
    );
    url
}

pub fn venv_python() -> PathBuf {
    let v = std::env::var("IMGSHIFT_VENV").unwrap_or_else(|_| "/var/tmp/imgshift-venv".into());
    let p = PathBuf::from(v).join("bin/python");
    assert!(
        p.exists(),
        "{p:?} missing: run `bash .ci/standins start` (it installs moto and boto3 there)"
    );
    p
}

/// The recording proxy in front of moto.
pub struct Proxy {
    child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Proxy {
    pub fn start(dir: &Path, extra: &[&str]) -> Proxy {
        let log = dir.join("proxy.jsonl");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standins/recording_proxy.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--upstream", &moto_url(), "--log", s(&log)])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        Proxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn block_puts(&self) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["method"] == "PUT" && r["path"].as_str().unwrap().contains("/blocks/"))
            .collect()
    }

    pub fn count_action(&self, action: &str) -> usize {
        self.records()
            .iter()
            .filter(|r| {
                r["body"]
                    .as_str()
                    .is_some_and(|b| b.contains(&format!("Action={action}")))
                    || (action == "StartSnapshot"
                        && r["method"] == "POST"
                        && r["path"] == "/snapshots")
            })
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn aws_cmd(dir: &Path) -> Command {
    let mut c = Command::new(imgshift_bin());
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_SESSION_TOKEN", SESSION_TOKEN)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"));
    c
}

pub fn run(mut c: Command) -> Run {
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs Python `code` with `c` bound to a boto3 EC2 client on moto; returns its standard output.
pub fn ec2_py(code: &str) -> String {
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(format!(
            "import boto3,json\nc=boto3.client('ec2',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n{code}",
            moto_url()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
