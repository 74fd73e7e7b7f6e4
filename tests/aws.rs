#![allow(clippy::unwrap_used, clippy::expect_used)]
//! AWS target against moto's server (EC2 + EBS direct APIs), started by `.ci/standins start`, with a recording,
//! fault-injecting proxy in front of it.

mod util;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::aws::*;
use util::*;

fn upload(dir: &Path, endpoint: &str, src: &Path, extra: &[&str]) -> Run {
    let mut c = aws_cmd(dir);
    c.args([
        "upload",
        "aws",
        s(src),
        "--endpoint-url",
        endpoint,
        "--state-dir",
        s(&dir.join("state")),
    ]);
    c.args(["--output", "json"]).args(extra);
    if !extra.contains(&"--max-attempts") {
        c.args(["--max-attempts", "8"]);
    }
    run(c)
}

fn download(dir: &Path, snapshot: &str, out: &Path) {
    let mut c = aws_cmd(dir);
    c.args([
        "download",
        "aws",
        snapshot,
        s(out),
        "-O",
        "raw",
        "--endpoint-url",
        &moto_url(),
    ]);
    run(c).ok();
}

/// Non-zero 512 KiB blocks of a raw file.
fn nonzero_blocks(raw: &Path) -> usize {
    let data = std::fs::read(raw).unwrap();
    data.chunks(512 * 1024)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count()
}

fn test_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("source.raw");
    // 96 MiB virtual: data at the start, a block straddling piece, data near the end, an allocated zero range.
    make_raw(
        &raw,
        96 << 20,
        &[
            (0, 3 << 20),
            ((40 << 20) - 4096, 8192),
            ((96 << 20) - (1 << 20), 1 << 20),
        ],
        &[(10 << 20, 4 << 20)],
    );
    raw
}

fn describe_image_names(name: &str) -> usize {
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(format!(
            "import boto3;c=boto3.client('ec2',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t');\
             print(len(c.describe_images(Filters=[{{'Name':'name','Values':['{name}']}}])['Images']))",
            moto_url()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn uploads_formats_and_reads_back() {
    let d = tmpdir();
    let raw = test_raw(d.path());
    let want_blocks = nonzero_blocks(&raw);
    let proxy = Proxy::start(d.path(), &[]);
    for (i, fmt) in ["raw", "qcow2", "vmdk", "vhdx"].iter().enumerate() {
        let img = d.path().join(format!("disk.{fmt}"));
        if *fmt != "raw" {
            qemu_img(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&img)]);
        } else {
            std::fs::copy(&raw, &img).unwrap();
        }
        let before = proxy.block_puts().len();
        let name = format!("imgshift-test-{fmt}-{}", std::process::id());
        let r = upload(d.path(), &proxy.url, &img, &["--name", &name]).ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let snap = v["snapshot_id"].as_str().unwrap();
        assert!(v["image_id"].as_str().unwrap().starts_with("ami-"));
        assert_eq!(
            proxy.block_puts().len() - before,
            want_blocks,
            "{fmt}: PutSnapshotBlock calls"
        );
        assert_eq!(v["blocks_put"], want_blocks as u64);
        assert_eq!(describe_image_names(&name), 1);
        let back = d.path().join(format!("back{i}.raw"));
        download(d.path(), snap, &back);
        assert_eq!(
            std::fs::metadata(&back).unwrap().len(),
            1 << 30,
            "EBS volumes are whole GiB"
        );
        assert_same(&raw, "raw", &back, "raw");
    }
}

#[test]
fn register_image_sends_what_was_asked() {
    let d = tmpdir();
    let raw = test_raw(d.path());
    let proxy = Proxy::start(d.path(), &[]);
    let name = format!("imgshift-params-{}", std::process::id());
    let r = upload(
        d.path(),
        &proxy.url,
        &raw,
        &[
            "--name",
            &name,
            "--architecture",
            "arm64",
            "--boot-mode",
            "uefi",
            "--tpm-v2",
            "--imds-v2-required",
            "--volume-type",
            "io2",
            "--tag",
            "team=storage",
            "--tag",
            "env=test",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let snap = v["snapshot_id"].as_str().unwrap();
    let reg: Vec<String> = proxy
        .records()
        .iter()
        .filter_map(|r| {
            r["body"]
                .as_str()
                .filter(|b| b.contains("Action=RegisterImage"))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(reg.len(), 1);
    let body = &reg[0];
    for want in [
        "Architecture=arm64",
        "BootMode=uefi",
        "EnaSupport=true",
        "TpmSupport=v2.0",
        "ImdsSupport=v2.0",
        "VirtualizationType=hvm",
        "RootDeviceName=%2Fdev%2Fxvda",
        "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fxvda",
        "BlockDeviceMapping.1.Ebs.VolumeType=io2",
        "TagSpecification.1.ResourceType=image",
        "TagSpecification.1.Tag.1.Key=team",
    ] {
        assert!(body.contains(want), "RegisterImage lacks {want}: {body}");
    }
    assert!(
        body.contains(&format!("BlockDeviceMapping.1.Ebs.SnapshotId={snap}")),
        "{body}"
    );
    assert_eq!(proxy.count_action("CreateTags"), 1);
}

#[test]
fn resumes_after_kill() {
    let d = tmpdir();
    let raw = d.path().join("big.raw");
    make_raw(&raw, 128 << 20, &[(0, 64 << 20)], &[]);
    let want_blocks = nonzero_blocks(&raw);
    let proxy = Proxy::start(d.path(), &[]);
    let name = format!("imgshift-resume-{}", std::process::id());
    let mut c = aws_cmd(d.path());
    c.args([
        "upload",
        "aws",
        s(&raw),
        "--endpoint-url",
        &proxy.url,
        "--state-dir",
        s(&d.path().join("state")),
    ]);
    c.args(["--name", &name, "--concurrency", "1", "--output", "json"]);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while journal_done(&d.path().join("state")) < 10 {
        assert!(
            t0.elapsed().as_secs() < HANG_GUARD_SECS,
            "upload hung: no acknowledged block in {HANG_GUARD_SECS} s (a hang guard, not a speed limit)"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "upload finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first_run = proxy.block_puts().len();
    assert!(first_run < want_blocks);
    let r = upload(
        d.path(),
        &proxy.url,
        &raw,
        &["--name", &name, "--concurrency", "4"],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["resumed"], true);
    assert_eq!(
        proxy.count_action("StartSnapshot"),
        1,
        "a second snapshot was started"
    );
    assert!(
        proxy.block_puts().len() < want_blocks + first_run,
        "the resumed run re-sent blocks that were acknowledged"
    );
    let back = d.path().join("back.raw");
    download(d.path(), v["snapshot_id"].as_str().unwrap(), &back);
    assert_same(&raw, "raw", &back, "raw");
    assert!(
        std::fs::read_dir(d.path().join("state"))
            .unwrap()
            .next()
            .is_none(),
        "journal left after success"
    );
}

#[test]
fn survives_injected_faults() {
    for mode in [&["--fault-status", "503"][..], &["--fault-throttle"][..]] {
        let d = tmpdir();
        let raw = test_raw(d.path());
        let mut extra = vec!["--fault-rate", "0.1", "--fault-path", "/blocks/"];
        extra.extend_from_slice(mode);
        let proxy = Proxy::start(d.path(), &extra);
        let r = upload(d.path(), &proxy.url, &raw, &["--snapshot-only"]).ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert!(
            proxy.block_puts().iter().any(|r| r["injected"] == true),
            "no fault was injected"
        );
        assert!(v["retries"].as_u64().unwrap() > 0);
        let back = d.path().join("back.raw");
        download(d.path(), v["snapshot_id"].as_str().unwrap(), &back);
        assert_same(&raw, "raw", &back, "raw");
    }
}

#[test]
fn errors_are_one_line() {
    let d = tmpdir();
    let raw = test_raw(d.path());
    // No credentials at all.
    let mut c = aws_cmd(d.path());
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN");
    c.args([
        "upload",
        "aws",
        s(&raw),
        "--name",
        "x",
        "--endpoint-url",
        &moto_url(),
        "--max-attempts",
        "1",
    ]);
    c.args(["--state-dir", s(&d.path().join("state"))]);
    let r = run(c);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.to_lowercase().contains("credential"),
        "{}",
        r.stderr
    );
    // Nothing listening at the endpoint.
    let r = upload(
        d.path(),
        "http://127.0.0.1:9",
        &raw,
        &["--name", "x", "--max-attempts", "2"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot reach the endpoint") && r.stderr.contains("127.0.0.1:9"),
        "{}",
        r.stderr
    );
    // An unknown region: its EBS endpoint does not resolve; the error names the region and the endpoint.
    let mut c = aws_cmd(d.path());
    c.env("AWS_REGION", "xx-nowhere-9");
    c.args([
        "upload",
        "aws",
        s(&raw),
        "--name",
        "x",
        "--max-attempts",
        "1",
    ]);
    c.args(["--state-dir", s(&d.path().join("state"))]);
    let r = run(c);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("region xx-nowhere-9")
            && r.stderr.contains(".xx-nowhere-9.amazonaws.com"),
        "{}",
        r.stderr
    );
}

#[test]
fn source_failing_mid_read_names_the_leftover_snapshot() {
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let raw = test_raw(d.path());
    let img = d.path().join("bad.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    // Garble the compressed data of the cluster holding 40 MiB: the map still says data, the read fails.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    let idx = ((40u64 << 20) - 4096) / 65536;
    f.read_exact_at(&mut b, l2 + idx * 8).unwrap();
    let entry = u64::from_be_bytes(b);
    assert_ne!(entry & (1 << 62), 0, "cluster must be compressed");
    let host = entry & ((1u64 << 54) - 1);
    f.write_all_at(&[0xffu8; 64], host).unwrap();
    let r = upload(
        d.path(),
        &moto_url(),
        &img,
        &["--name", "x", "--snapshot-only"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("snap-") && r.stderr.contains("delete-snapshot"),
        "{}",
        r.stderr
    );
}

#[test]
fn secrets_never_printed_or_stored() {
    let d = tmpdir();
    let raw = test_raw(d.path());
    let proxy = Proxy::start(
        d.path(),
        &["--fault-rate", "0.05", "--fault-path", "/blocks/"],
    );
    let mut c = aws_cmd(d.path());
    c.args([
        "upload",
        "aws",
        s(&raw),
        "--name",
        &format!("secret-test-{}", std::process::id()),
        "--endpoint-url",
        &proxy.url,
        "--verbose",
    ]);
    c.args([
        "--state-dir",
        s(&d.path().join("state")),
        "--progress",
        "--output",
        "json",
    ]);
    let r = run(c).ok();
    let mut all = format!("{}{}", r.stdout, r.stderr);
    for e in walk(d.path()) {
        if e.extension().is_some_and(|x| x == "json" || x == "lock") {
            all.push_str(&std::fs::read_to_string(&e).unwrap_or_default());
        }
    }
    for secret in [ACCESS_KEY, SECRET_KEY, SESSION_TOKEN] {
        assert!(!all.contains(secret), "{secret} leaked");
    }
}

/// Blocks the (single) job journal in `dir` records as acknowledged.
fn journal_done(dir: &Path) -> u32 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let Ok(text) = std::fs::read_to_string(&p) else {
                return 0;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                return 0;
            };
            let Some(disks) = v["disks"].as_array() else {
                return 0;
            };
            return disks
                .iter()
                .map(|d| {
                    decode_b64(d["done"].as_str().unwrap_or(""))
                        .iter()
                        .map(|b| b.count_ones())
                        .sum::<u32>()
                })
                .sum();
        }
    }
    0
}

fn decode_b64(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = alphabet.iter().position(|&a| a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
