#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `imgshift migrate --to aws` end to end against moto (started by `.ci/standins start`): a two-disk OVA becomes
//! an AMI with two block device mappings; kill -9 at every stage boundary and mid-upload, then `resume`, leaves
//! exactly one AMI and one snapshot per disk with the right bytes; a failing preflight sends no request;
//! `jobs cancel` removes exactly what the job made.

mod util;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use util::aws::*;
use util::ova::{OvaDisk, QCOW2, VMDK_STREAM, build_ova};
use util::*;

const MIB: u64 = 1 << 20;

/// The test's images: a single-disk qcow2 with 40 MiB of data (enough blocks for a journal save mid-upload)
/// and a two-disk OVA (streamOptimized boot disk + qcow2 data disk), with the raw files they were made from.
struct Images {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    single: PathBuf,
    single_raw: PathBuf,
    ova: PathBuf,
    ova_raws: [PathBuf; 2],
}

fn images() -> Images {
    let d = tmpdir();
    let dir = d.path().to_path_buf();
    let single_raw = dir.join("single.raw");
    make_raw(
        &single_raw,
        128 * MIB,
        &[
            (0, 24 * MIB),
            (64 * MIB + 4096, 16 * MIB),
            (128 * MIB - 512, 512),
        ],
        &[(100 * MIB, MIB)],
    );
    let single = dir.join("single.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&single_raw),
        s(&single),
    ]);
    let boot_raw = dir.join("boot.raw");
    let data_raw = dir.join("data.raw");
    make_raw(
        &boot_raw,
        32 * MIB,
        &[(0, 2 * MIB), (20 * MIB, 3 * MIB + 512)],
        &[],
    );
    make_raw(&data_raw, 16 * MIB + 3 * 512, &[(MIB, MIB)], &[]);
    let vmdk = dir.join("boot.vmdk");
    let qcow = dir.join("data.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&boot_raw),
        s(&vmdk),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&data_raw),
        s(&qcow),
    ]);
    let ova = dir.join("vm.ova");
    build_ova(
        &ova,
        &[
            OvaDisk {
                member: "vm-disk1.vmdk",
                image: &vmdk,
                format: VMDK_STREAM,
                capacity: 32 * MIB,
            },
            OvaDisk {
                member: "vm-disk2.qcow2",
                image: &qcow,
                format: QCOW2,
                capacity: 16 * MIB + 3 * 512,
            },
        ],
    );
    Images {
        _dir: d,
        dir,
        single,
        single_raw,
        ova,
        ova_raws: [boot_raw, data_raw],
    }
}

/// `imgshift migrate SRC --to aws` with the test credentials, moto (or `endpoint`) and a state folder.
fn migrate(dir: &Path, endpoint: &str, src: &Path, name: &str, extra: &[&str]) -> Command {
    let mut c = aws_cmd(dir);
    c.args(["migrate", s(src), "--to", "aws", "--endpoint-url", endpoint])
        .args(["--name", name, "--state-dir", s(&dir.join("state"))])
        .args(extra);
    c
}

/// Another imgshift command with the same environment and state folder.
fn imgshift_in(dir: &Path, args: &[&str]) -> Run {
    let mut c = aws_cmd(dir);
    c.args(args).args(["--state-dir", s(&dir.join("state"))]);
    run(c)
}

/// A unique AMI name for this test process.
fn unique(what: &str) -> String {
    format!(
        "mig-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// Starts `c` with `IMGSHIFT_TEST_PAUSE_AT=point`, waits until it says it paused there, and kills it with
/// SIGKILL. Returns the job id it printed.
fn kill_at(mut c: Command, point: &str) -> String {
    c.env("IMGSHIFT_TEST_PAUSE_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child: Child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut job = None;
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.strip_prefix("imgshift: job ") {
                job = rest.split([' ', ',']).next().map(str::to_string);
            }
            if line.starts_with("imgshift-test: paused at ") {
                let _ = tx.send(Ok(job.clone().unwrap_or_default()));
                return;
            }
        }
        let _ = tx.send(Err(seen));
    });
    let got = rx.recv_timeout(Duration::from_secs(180));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    match got {
        Ok(Ok(job)) => {
            assert!(job.starts_with("migrate-"), "no job id seen before {point}");
            job
        }
        Ok(Err(stderr)) => panic!("the job never paused at {point}:\n{stderr}"),
        Err(_) => panic!("the job did not reach {point} in 180 s"),
    }
}

/// Snapshots moto holds for job `job` (by the description imgshift gives them).
fn job_snapshots(job: &str) -> Vec<String> {
    let out = ec2_py(&format!(
        "print(json.dumps(sorted(s['SnapshotId'] for s in c.describe_snapshots()['Snapshots'] \
         if s.get('Description','').startswith('imgshift job {job} '))))"
    ));
    serde_json::from_str(out.trim()).unwrap()
}

/// Ids of the AMIs moto holds under `name`.
fn images_named(name: &str) -> Vec<String> {
    let out = ec2_py(&format!(
        "print(json.dumps([i['ImageId'] for i in c.describe_images(Filters=[{{'Name':'name','Values':['{name}']}}])['Images']]))"
    ));
    serde_json::from_str(out.trim()).unwrap()
}

/// The block device mappings of every RegisterImage request the proxy saw, as (device, snapshot id) lists
/// (moto does not keep them, so they are read from what imgshift sent).
fn registered_mappings(proxy: &Proxy) -> Vec<Vec<(String, String)>> {
    proxy
        .records()
        .iter()
        .filter_map(|r| {
            r["body"]
                .as_str()
                .filter(|b| b.contains("Action=RegisterImage"))
                .map(str::to_string)
        })
        .map(|body| {
            let field = |k: String| -> Option<String> {
                body.split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .map(|v| v.replace("%2F", "/"))
            };
            (1..)
                .map_while(|n| {
                    Some((
                        field(format!("BlockDeviceMapping.{n}.DeviceName"))?,
                        field(format!("BlockDeviceMapping.{n}.Ebs.SnapshotId"))?,
                    ))
                })
                .collect()
        })
        .collect()
}

/// Reads snapshot `snap` back with `imgshift download aws` and compares it with `want` (raw).
fn assert_snapshot_holds(dir: &Path, snap: &str, want: &Path) {
    let back = dir.join(format!("{snap}.raw"));
    let mut c = aws_cmd(dir);
    c.args([
        "download",
        "aws",
        snap,
        s(&back),
        "--endpoint-url",
        &moto_url(),
    ]);
    run(c).ok();
    assert_same(want, "raw", &back, "raw");
    std::fs::remove_file(&back).unwrap();
}

fn report(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not a JSON report ({e}): {stdout}"))
}

#[test]
fn two_disk_ova_becomes_an_ami_with_two_mappings() {
    let im = images();
    let proxy = Proxy::start(&im.dir, &[]);
    let name = unique("ova");
    let r = run(migrate(
        &im.dir,
        &proxy.url,
        &im.ova,
        &name,
        &["--yes", "--force", "--output", "json"],
    ))
    .ok();
    let v = report(&r.stdout);
    let ami = v["outputs"]["image_id"].as_str().unwrap().to_string();
    let snaps: Vec<String> = v["outputs"]["snapshot_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(snaps.len(), 2);
    assert_eq!(images_named(&name), vec![ami]);
    assert_eq!(
        registered_mappings(&proxy),
        vec![vec![
            ("/dev/xvda".to_string(), snaps[0].clone()),
            ("/dev/sdb".to_string(), snaps[1].clone())
        ]]
    );
    for (snap, raw) in snaps.iter().zip(&im.ova_raws) {
        assert_snapshot_holds(&im.dir, snap, raw);
    }
    // The report: every stage, data sent = data in the disks (not their virtual size).
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["inspect", "upload", "register", "verify"]);
    assert!(
        v["stages"][3]["result"]
            .as_str()
            .unwrap()
            .contains("identical"),
        "{v}"
    );
    assert!(v["bytes_sent"].as_u64().unwrap() < 8 * MIB, "{v}");
    assert!(
        files_in(&im.dir.join("state")).is_empty(),
        "journal left after success"
    );
}

/// Kills the job at `point`, resumes it, and checks the result is whole and made once.
fn crash_and_resume(point: &str, ova: bool) {
    let im = images();
    let name = unique(&point.replace('-', ""));
    let (src, raws): (&Path, Vec<&PathBuf>) = if ova {
        (&im.ova, im.ova_raws.iter().collect())
    } else {
        (&im.single, vec![&im.single_raw])
    };
    let proxy = Proxy::start(&im.dir, &[]);
    let job = kill_at(
        migrate(
            &im.dir,
            &proxy.url,
            src,
            &name,
            &["--yes", "--force", "--concurrency", "1"],
        ),
        point,
    );
    // While stopped, the job is listed with its stage.
    let listed = imgshift_in(&im.dir, &["jobs", "--output", "json"]).ok();
    let jobs: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let me = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job.as_str())
        .unwrap_or_else(|| panic!("job {job} not listed: {jobs}"));
    assert_eq!(me["running"], false);
    assert_eq!(me["kind"], "migrate-aws");

    let r = imgshift_in(&im.dir, &["resume", &job]).ok();
    assert!(
        r.stdout.contains(&format!("job {job} → aws: done")),
        "{}",
        r.stdout
    );
    let snaps = job_snapshots(&job);
    assert_eq!(
        snaps.len(),
        raws.len(),
        "one snapshot per disk after a kill at {point}: {snaps:?}"
    );
    assert_eq!(
        images_named(&name).len(),
        1,
        "one AMI after a kill at {point}"
    );
    let regs = registered_mappings(&proxy);
    assert_eq!(regs.len(), 1, "one RegisterImage after a kill at {point}");
    assert_eq!(
        proxy.count_action("StartSnapshot"),
        raws.len(),
        "one StartSnapshot per disk after a kill at {point}"
    );
    let mapped: Vec<String> = regs[0].iter().map(|m| m.1.clone()).collect();
    assert_eq!(mapped.len(), raws.len());
    for (snap, raw) in mapped.iter().zip(raws) {
        assert!(snaps.contains(snap));
        assert_snapshot_holds(&im.dir, snap, raw);
    }
    assert!(
        files_in(&im.dir.join("state")).is_empty(),
        "journal left after the resumed job finished"
    );
}

#[test]
fn resume_after_kill_after_inspect() {
    crash_and_resume("after-inspect", false);
}

#[test]
fn resume_after_kill_mid_upload() {
    crash_and_resume("upload-saved", false);
}

#[test]
fn resume_after_kill_between_disks() {
    crash_and_resume("after-upload-disk-0", true);
}

#[test]
fn resume_after_kill_after_upload() {
    crash_and_resume("after-upload", true);
}

#[test]
fn resume_after_kill_after_register() {
    crash_and_resume("after-register", false);
}

#[test]
fn resume_after_kill_after_verify() {
    crash_and_resume("after-verify", false);
}

#[test]
fn failing_preflight_sends_no_request() {
    let im = images();
    let proxy = Proxy::start(&im.dir, &[]);
    let name = unique("refused");
    let r = run(migrate(&im.dir, &proxy.url, &im.single, &name, &["--yes"]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap();
    assert!(
        last.contains("preflight fails") && last.contains("nothing was sent"),
        "{last}"
    );
    // Dry run: the plan, checked against the endpoint without creating anything.
    let d = run(migrate(
        &im.dir,
        &proxy.url,
        &im.ova,
        &name,
        &["--dry-run", "--force"],
    ))
    .ok();
    assert!(d.stdout.contains("plan: 2 disks to aws"), "{}", d.stdout);
    assert!(
        d.stdout.contains(&format!(
            "will create AMI '{name}' mapping /dev/xvda, /dev/sdb"
        )),
        "{}",
        d.stdout
    );
    // The dry run checks what it can without creating anything (credentials, region, the AMI name): only
    // read-only calls reach the endpoint.
    let records = proxy.records();
    assert!(
        !records.is_empty()
            && records.iter().all(|r| r["body"]
                .as_str()
                .is_some_and(|b| b.contains("Action=DescribeImages"))),
        "a dry run sent more than DescribeImages: {records:?}"
    );
    let state = im.dir.join("state");
    assert!(!state.exists() || files_in(&state).is_empty());
    assert!(images_named(&name).is_empty());
}

#[test]
fn jobs_cancel_removes_exactly_what_the_job_made() {
    let im = images();
    let other = ec2_py(
        "v=c.create_volume(Size=1,AvailabilityZone='us-east-1a')['VolumeId']\n\
         print(c.create_snapshot(VolumeId=v,Description='not imgshift')['SnapshotId'])",
    )
    .trim()
    .to_string();
    let name = unique("cancel");
    let job = kill_at(
        migrate(&im.dir, &moto_url(), &im.ova, &name, &["--yes", "--force"]),
        "after-register",
    );
    assert_eq!(job_snapshots(&job).len(), 2);
    assert_eq!(images_named(&name).len(), 1);
    let r = imgshift_in(&im.dir, &["jobs", "cancel", &job]).ok();
    assert!(r.stdout.contains("deregistered AMI"), "{}", r.stdout);
    assert_eq!(
        r.stdout.matches("deleted snapshot").count(),
        2,
        "{}",
        r.stdout
    );
    assert!(job_snapshots(&job).is_empty());
    assert!(images_named(&name).is_empty());
    let still = ec2_py(&format!(
        "print(len(c.describe_snapshots(SnapshotIds=['{other}'])['Snapshots']))"
    ));
    assert_eq!(still.trim(), "1", "an unrelated snapshot was deleted");
    assert!(files_in(&im.dir.join("state")).is_empty());
    let listed = imgshift_in(&im.dir, &["jobs"]).ok();
    assert!(!listed.stdout.contains(&job), "{}", listed.stdout);
    // A second cancel: the job is gone.
    let again = imgshift_in(&im.dir, &["jobs", "cancel", &job]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("no job"), "{}", again.stderr);
}

#[test]
fn guest_without_nvme_and_ena_drivers_is_stopped_before_any_request() {
    // A real bootable guest whose initramfs has only SATA drivers: Nitro instances give it NVMe disks it
    // cannot see, so the AWS preflight fails, and migrate must stop before its first request.
    let d = tmpdir();
    let raw = d.path().join("novirtio.raw");
    util::libvirt::mkguest("novirtio", &raw);
    let proxy = Proxy::start(d.path(), &[]);
    let name = unique("nonvme");
    let r = run(migrate(d.path(), &proxy.url, &raw, &name, &["--yes"]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("aws-nvme"), "{}", r.stderr);
    assert!(
        r.stderr
            .lines()
            .last()
            .unwrap()
            .contains("nothing was sent"),
        "{}",
        r.stderr
    );
    assert!(
        proxy.records().is_empty(),
        "requests reached the endpoint: {:?}",
        proxy.records()
    );
    let state = d.path().join("state");
    assert!(!state.exists() || files_in(&state).is_empty());
    assert!(images_named(&name).is_empty());
}

#[test]
fn dry_run_refuses_options_of_another_target_and_a_taken_name() {
    let im = images();
    let proxy = Proxy::start(&im.dir, &[]);
    // `--pool` is a libvirt option: a usage error naming it, before anything is read.
    let r = run(migrate(
        &im.dir,
        &proxy.url,
        &im.single,
        &unique("foreign"),
        &["--dry-run", "--pool", "default"],
    ));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("--pool (--to libvirt)"), "{}", r.stderr);
    assert!(proxy.records().is_empty());
    // A name an AMI already has is found by the dry run, as it would be by the real run.
    let taken = unique("taken");
    ec2_py(&format!(
        "c.register_image(Name='{taken}',RootDeviceName='/dev/xvda',BlockDeviceMappings=[])"
    ));
    let r = run(migrate(
        &im.dir,
        &proxy.url,
        &im.single,
        &taken,
        &["--dry-run", "--force"],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
}

/// A raw disk whose data ranges hold whole 512 KiB blocks of zeros: the uploader skips those blocks, and verify
/// accepts the snapshot's shorter block list once each block it lacks reads as zeros in the source (it used to
/// fail with "lists N blocks; the source has M").
#[test]
fn verify_accepts_blocks_of_zeros_the_upload_skipped() {
    let d = tmpdir();
    let raw = d.path().join("zeros.raw");
    // 4 MiB of data, then 3 MiB of written zeros (allocated, so the map calls them data), then 1 MiB of data.
    make_raw(
        &raw,
        16 << 20,
        &[(0, 4 << 20), (7 << 20, 1 << 20)],
        &[(4 << 20, 3 << 20)],
    );
    let name = unique("zeros");
    let r = run(migrate(
        d.path(),
        &moto_url(),
        &raw,
        &name,
        &["--yes", "--force", "--output", "json"],
    ));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j = report(&r.stdout);
    let verify = j["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "verify")
        .unwrap()
        .clone();
    assert!(
        verify["result"].as_str().unwrap().contains("identical"),
        "{verify}"
    );
    let snap = j["outputs"]["snapshots"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !snap.is_empty() {
        assert_snapshot_holds(d.path(), &snap, &raw);
    }
}
