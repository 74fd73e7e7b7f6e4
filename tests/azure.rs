#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Azure target: the data path against Azurite (started by `.ci/standins start`), the control path against a
//! fake ARM + Entra token server (`tests/standins/fake_arm.py`) over HTTPS with a certificate made here, trusted
//! through `IMGSHIFT_CA_BUNDLE`. Faults on the data path come from the recording proxy in front of Azurite.

mod azure_util;
mod util;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use azure_util::*;
use util::*;

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
    // 5 MiB with a GPT (made by sfdisk: protective MBR, checksums, backup) whose second entry is an EFI system
    // partition, and some data.
    make_raw(&raw, 5 * MIB, &[(MIB, 64 * 1024)], &[]);
    let mut sfdisk = std::process::Command::new("sfdisk")
        .args(["--quiet", s(&raw)])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sfdisk ({e}): run .ci/install-deps (fdisk)"));
    {
        use std::io::Write;
        sfdisk
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"label: gpt\nstart=2048, size=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
                  start=4096, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n",
            )
            .unwrap();
    }
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
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
                        v["disks"][0]["done"]
                            .as_str()
                            .is_some_and(|d| d.chars().any(|c| c != 'A' && c != '='))
                    })
            })
    };
    let t0 = std::time::Instant::now();
    while !journal_progress() {
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
        r.stderr.contains("the disks are uploaded and kept"),
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
        r.stderr.contains("disk 'lro-disk' already exists"),
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
