//! Regression tests of the one job runner (issue 19), against moto through the recording, fault-injecting proxy:
//! `upload aws` resumes after a kill between RegisterImage and the journal save (one AMI), `jobs cancel` keeps
//! the journal and the resource on an EC2 503 `Unavailable`, the adaptive limiter never has more than
//! `--concurrency` requests in flight under throttling, and missing credentials fail at once with where they
//! are looked for, before any request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use util::aws::{Proxy, aws_cmd, run};
use util::{make_raw, s, tmpdir};

const MIB: u64 = 1 << 20;

fn upload_cmd(dir: &Path, endpoint: &str, src: &Path, extra: &[&str]) -> Command {
    let mut c = aws_cmd(dir);
    c.args(["upload", "aws", s(src), "--endpoint-url", endpoint])
        .args(["--state-dir", s(&dir.join("state")), "--output", "json"])
        .args(extra);
    if !extra.contains(&"--max-attempts") {
        c.args(["--max-attempts", "2"]);
    }
    c
}

/// Runs `c` until it says it paused at `point`, then kills it with SIGKILL. The generous limit is a hang guard.
fn kill_at(mut c: Command, point: &str) {
    let mut child = c
        .env("IMGSHIFT_TEST_PAUSE_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let want = format!("imgshift-test: paused at {point}");
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(l) if l.trim() == want => break,
            Ok(l) => seen.push(l),
            Err(e) => {
                let _ = child.kill();
                panic!("never paused at {point} ({e}): {}", seen.join("\n"));
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn journals(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("state"))
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

fn job_of(dir: &Path) -> String {
    let j = journals(dir);
    assert_eq!(j.len(), 1, "{j:?}");
    j[0].file_stem().unwrap().to_string_lossy().into_owned()
}

fn data_image(dir: &Path, mib: u64) -> PathBuf {
    let raw = dir.join("disk.raw");
    make_raw(&raw, mib * MIB, &[(0, mib * MIB)], &[]);
    raw
}

/// Snapshots and AMIs moto holds whose tag or name carries `marker`.
fn moto_count(what: &str, marker: &str) -> usize {
    let code = match what {
        "images" => format!(
            "print(len([i for i in c.describe_images(Owners=['self'])['Images'] if i['Name']=='{marker}']))"
        ),
        _ => format!(
            "print(len([x for x in c.describe_snapshots(OwnerIds=['self'])['Snapshots'] if x['SnapshotId']=='{marker}']))"
        ),
    };
    let out = util::aws::ec2_py(&code);
    out.trim().parse().unwrap()
}

#[test]
fn upload_aws_resumes_after_a_kill_between_register_image_and_the_journal() {
    let d = tmpdir();
    let raw = data_image(d.path(), 4);
    let proxy = Proxy::start(d.path(), &[]);
    let name = format!("runner-reg-{}", std::process::id());
    kill_at(
        upload_cmd(d.path(), &proxy.url, &raw, &["--name", &name]),
        "after-register-image",
    );
    assert_eq!(proxy.count_action("RegisterImage"), 1);
    // The rerun finds the AMI it registered by name: no second RegisterImage (which moto, like EC2, would
    // refuse for the taken name), one AMI, done.
    let r = run(upload_cmd(d.path(), &proxy.url, &raw, &["--name", &name]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["image_id"].as_str().unwrap().starts_with("ami-"), "{v}");
    assert_eq!(v["resumed"], true);
    assert_eq!(proxy.count_action("RegisterImage"), 1);
    assert_eq!(proxy.count_action("StartSnapshot"), 1);
    assert_eq!(moto_count("images", &name), 1);
    assert!(journals(d.path()).is_empty());
}

#[test]
fn jobs_cancel_keeps_the_journal_and_the_snapshot_on_an_ec2_503() {
    let d = tmpdir();
    let raw = data_image(d.path(), 2);
    // Every DeleteSnapshot is answered as an overloaded EC2 does: HTTP 503, code `Unavailable`.
    let proxy = Proxy::start(
        d.path(),
        &[
            "--fault-rate",
            "1",
            "--fault-path",
            ".*",
            "--fault-action",
            "DeleteSnapshot",
            "--fault-status",
            "503",
            "--fault-ec2-code",
            "Unavailable",
        ],
    );
    kill_at(
        upload_cmd(d.path(), &proxy.url, &raw, &["--snapshot-only"]),
        "after-upload-disk-0",
    );
    let job = job_of(d.path());
    let journal = std::fs::read_to_string(&journals(d.path())[0]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&journal).unwrap();
    let snap = v["disks"][0]["ids"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = aws_cmd(d.path());
    c.args([
        "jobs",
        "cancel",
        &job,
        "--state-dir",
        s(&d.path().join("state")),
    ]);
    let r = run(c);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("HTTP 503"), "{}", r.stderr);
    assert!(
        proxy.count_action("DeleteSnapshot") >= 1,
        "cancel sent no DeleteSnapshot"
    );
    // Not forgotten: the journal and the snapshot are both still there.
    assert_eq!(journals(d.path()).len(), 1);
    assert_eq!(moto_count("snapshots", &snap), 1);
}

#[test]
fn in_flight_requests_never_exceed_concurrency_and_drop_after_throttling() {
    let d = tmpdir();
    let raw = data_image(d.path(), 96);
    let proxy = Proxy::start(
        d.path(),
        &[
            "--fault-rate",
            "0.25",
            "--fault-path",
            "/blocks/",
            "--fault-throttle",
            "--delay-ms",
            "40",
        ],
    );
    let r = run(upload_cmd(
        d.path(),
        &proxy.url,
        &raw,
        &[
            "--snapshot-only",
            "--concurrency",
            "16",
            "--max-attempts",
            "20",
        ],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let puts = proxy.block_puts();
    assert!(puts.len() >= 192, "{} block puts", puts.len());
    let peak = |rs: &[serde_json::Value]| {
        rs.iter()
            .map(|r| r["inflight"].as_u64().unwrap())
            .max()
            .unwrap()
    };
    assert!(peak(&puts) <= 16, "peak {} > --concurrency 16", peak(&puts));
    // After a quarter of the requests were throttled, the limit is halved again and again: the second half of
    // the upload never reaches the first half's peak.
    let half = &puts[puts.len() / 2..];
    assert!(
        peak(half) < 16,
        "still {} in flight after throttling",
        peak(half)
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["throttled"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn missing_credentials_fail_at_once_naming_the_chain_before_any_request() {
    let d = tmpdir();
    let raw = data_image(d.path(), 1);
    let proxy = Proxy::start(d.path(), &[]);
    let mut c = upload_cmd(
        d.path(),
        &proxy.url,
        &raw,
        &["--name", "x", "--max-attempts", "10"],
    );
    // An empty environment and HOME: no keys, no profile, no instance metadata (disabled: this is no EC2).
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN");
    let r = run(c);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("no usable AWS credentials") && r.stderr.contains("AWS_ACCESS_KEY_ID"),
        "{}",
        r.stderr
    );
    assert!(proxy.records().is_empty(), "{:?}", proxy.records());
    assert!(journals(d.path()).is_empty());
}

#[test]
fn sigint_mid_upload_stops_at_a_safe_point_and_resume_finishes() {
    let d = tmpdir();
    let raw = data_image(d.path(), 64);
    let proxy = Proxy::start(d.path(), &["--fault-path", "/blocks/", "--delay-ms", "50"]);
    let args = ["--snapshot-only", "--concurrency", "2"];
    let child = upload_cmd(d.path(), &proxy.url, &raw, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Hang guard only: wait for the first blocks to be acknowledged.
    let mut waited = 0;
    while proxy.block_puts().len() < 10 {
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
        assert!(waited < 6000, "the upload never started");
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("interrupted by SIGINT")
            && last.contains("journal saved")
            && last.contains("imgshift resume"),
        "{stderr}"
    );
    let before = proxy.block_puts().len();
    assert!(before < 128, "the upload was not stopped: {before} blocks");
    let journal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&journals(d.path())[0]).unwrap()).unwrap();
    assert!(!journal["disks"][0]["done"].as_str().unwrap().is_empty());
    // The rerun sends only what was not acknowledged, into the same snapshot.
    let r = run(upload_cmd(d.path(), &proxy.url, &raw, &args));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["resumed"], true);
    assert_eq!(proxy.count_action("StartSnapshot"), 1);
    assert_eq!(v["blocks_in_snapshot"], 128);
    assert!(
        proxy.block_puts().len() <= 128 + 2,
        "{} block puts for 128 blocks",
        proxy.block_puts().len()
    );
}

#[test]
fn jobs_in_a_missing_state_dir_is_an_error_and_other_layouts_are_named() {
    let d = tmpdir();
    let r = util::imgshift(&["jobs", "--state-dir", "/nonexistent-imgshift-state"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("/nonexistent-imgshift-state: no such folder"),
        "{}",
        r.stderr
    );
    // A journal of another layout version is named with its version, not silently skipped or misread.
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("migrate-0123.json"),
        r#"{"version": 99, "id": "migrate-0123", "kind": "migrate-aws"}"#,
    )
    .unwrap();
    let r = util::imgshift(&["jobs", "--state-dir", s(&state)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("layout version 99") && r.stderr.contains("newer"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_dry_run_with_a_target_option_missing_fails_with_one_line() {
    let d = tmpdir();
    let raw = data_image(d.path(), 1);
    // Azure needs a subscription, a resource group and a location even for a dry run (it checks them there).
    let mut c = Command::new(util::imgshift_bin());
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", d.path())
        .args([
            "migrate",
            s(&raw),
            "--to",
            "azure",
            "--dry-run",
            "-g",
            "rg",
            "-l",
            "westeurope",
        ]);
    let r = run(c);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("--subscription"), "{}", r.stderr);
    // libvirt needs a pool.
    let r = util::imgshift(&["migrate", s(&raw), "--to", "libvirt", "--dry-run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("--pool"), "{}", r.stderr);
}
