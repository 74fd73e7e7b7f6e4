#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `migrate --to aws` and `upload aws` with `--copy-to-regions`, `--share-with` and `--launch-template`: the
//! job's after-stages against moto (started by `.ci/standins start`, corrected by `tests/standins/
//! moto_launcher.py`: CopyImage's token and tags, other accounts' view of a shared AMI), with what imgshift
//! sent read through the recording proxy. A killed job resumed makes no second copy; `jobs cancel` leaves none
//! of what the stages made.

mod util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use util::aws::*;
use util::*;

const ACCOUNT_B: &str = "222233334444";
const REGIONS: [&str; 2] = ["eu-west-1", "us-west-2"];

fn unique(what: &str) -> String {
    format!(
        "st-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// A small raw disk (8 MiB, 1 MiB of data).
fn source(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("vm.raw");
    make_raw(&raw, 8 << 20, &[(0, 1 << 20)], &[]);
    raw
}

fn migrate(dir: &Path, endpoint: &str, src: &Path, name: &str, template: &str) -> Command {
    let mut c = aws_cmd(dir);
    c.args(["migrate", s(src), "--to", "aws", "--endpoint-url", endpoint])
        .args(["--name", name, "--state-dir", s(&dir.join("state"))])
        .args([
            "--yes",
            "--force",
            "--output",
            "json",
            "--max-attempts",
            "2",
        ])
        .args(["--copy-to-regions", &REGIONS.join(",")])
        .args(["--share-with", ACCOUNT_B, "--launch-template", template]);
    c
}

/// Starts `c` with `IMGSHIFT_TEST_PAUSE_AT=point`, waits until it pauses there, kills it (SIGKILL); returns
/// the job id it printed.
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
            if let Some(rest) = line
                .strip_prefix("imgshift: job ")
                .or_else(|| line.strip_prefix("imgshift: resuming job "))
            {
                job = rest.split([' ', ',']).next().map(str::to_string);
            }
            if line.starts_with("imgshift-test: paused at ") {
                let _ = tx.send(Ok(job.clone().unwrap_or_default()));
                return;
            }
        }
        let _ = tx.send(Err(seen));
    });
    let got = rx.recv_timeout(Duration::from_secs(300));
    child.kill().unwrap();
    child.wait().unwrap();
    match got {
        Ok(Ok(job)) => {
            assert!(job.starts_with("migrate-"), "no job id seen before {point}");
            job
        }
        Ok(Err(stderr)) => panic!("the job never paused at {point}:\n{stderr}"),
        Err(_) => panic!("the job did not reach {point} (hang guard)"),
    }
}

/// Runs Python with `r(region)` (an EC2 client of account A in that region) and `b(region)` (account B's).
fn py(code: &str) -> Value {
    let out = ec2_py(&format!(
        "def r(region):\n    return boto3.client('ec2',endpoint_url=c.meta.endpoint_url,region_name=region,aws_access_key_id='t',aws_secret_access_key='t')\n\
         def b(region):\n    x=r(region)\n    x.meta.events.register('before-sign.ec2.*',lambda request,**kw: request.headers.__setitem__('x-moto-account-id','{ACCOUNT_B}'))\n    return x\n\
         def err(f):\n    try:\n        f(); return None\n    except Exception as e:\n        return e.response['Error']['Code']\n\
         {code}"
    ));
    serde_json::from_str(out.trim()).unwrap()
}

/// Everything of one AMI name: per region, the AMIs named `name` and their snapshots.
fn made(name: &str) -> Value {
    let regions: Vec<String> = std::iter::once("us-east-1")
        .chain(REGIONS)
        .map(|r| format!("'{r}'"))
        .collect();
    py(&format!(
        "o={{}}\n\
         for g in [{}]:\n    imgs=r(g).describe_images(Owners=['self'],Filters=[{{'Name':'name','Values':['{name}']}}])['Images']\n    o[g]=[[i['ImageId'],[m['Ebs']['SnapshotId'] for m in i['BlockDeviceMappings'] if 'Ebs' in m]] for i in imgs]\n\
         print(json.dumps(o))",
        regions.join(",")
    ))
}

fn snapshot_exists(region: &str, id: &str) -> bool {
    py(&format!(
        "print(json.dumps(err(lambda: r('{region}').describe_snapshots(SnapshotIds=['{id}'])) is None))"
    )) == Value::Bool(true)
}

/// The versions of template `name`: (number, image id, instance type); `null` when it does not exist.
fn template(name: &str) -> Value {
    py(&format!(
        "e=err(lambda: c.describe_launch_templates(LaunchTemplateNames=['{name}']))\n\
         print(json.dumps(None if e else [[v['VersionNumber'],v['LaunchTemplateData'].get('ImageId'),v['LaunchTemplateData'].get('InstanceType')] \
           for v in c.describe_launch_template_versions(LaunchTemplateName='{name}')['LaunchTemplateVersions']]))"
    ))
}

/// What account B sees of `image` in `region` (its id, or the error code), and whether A's launch
/// permissions name B.
fn seen_by_b(region: &str, image: &str) -> (Value, bool) {
    let v = py(&format!(
        "e=err(lambda: b('{region}').describe_images(ImageIds=['{image}']))\n\
         seen=e or b('{region}').describe_images(ImageIds=['{image}'])['Images'][0]['ImageId']\n\
         p=[x.get('UserId') for x in r('{region}').describe_image_attribute(ImageId='{image}',Attribute='launchPermission')['LaunchPermissions']]\n\
         print(json.dumps([seen,'{ACCOUNT_B}' in p]))"
    ));
    (v[0].clone(), v[1].as_bool().unwrap())
}

/// What account B gets asking for `image` in `region`: its id, or the error code.
fn b_sees(region: &str, image: &str) -> Value {
    py(&format!(
        "e=err(lambda: b('{region}').describe_images(ImageIds=['{image}']))\n\
         print(json.dumps(e or b('{region}').describe_images(ImageIds=['{image}'])['Images'][0]['ImageId']))"
    ))
}

fn sent(proxy: &Proxy, action: &str) -> Vec<String> {
    proxy
        .records()
        .iter()
        .filter_map(|r| r["body"].as_str().map(str::to_string))
        .filter(|b| {
            b.contains(&format!("Action={action}&")) || b.ends_with(&format!("Action={action}"))
        })
        .collect()
}

#[test]
fn migrate_copies_shares_and_points_a_launch_template_at_the_ami() {
    let d = tmpdir();
    let src = source(d.path());
    let name = unique("all");
    let lt = unique("lt");
    let proxy = Proxy::start(d.path(), &[]);
    let r = run(migrate(d.path(), &proxy.url, &src, &name, &lt)).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let o = &v["outputs"];
    let ami = o["image_id"].as_str().unwrap().to_string();
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        stages.ends_with(&["copy", "share", "launch-template"]),
        "{stages:?}"
    );

    // One copy per region, found there, each with its snapshot; B sees the AMI and every copy.
    let m = made(&name);
    assert_eq!(m["us-east-1"][0][0], ami.as_str());
    let copies = o["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 2);
    for (c, region) in copies.iter().zip(REGIONS) {
        assert_eq!(c["region"], region);
        assert_eq!(m[region].as_array().unwrap().len(), 1, "{region}: {m}");
        assert_eq!(m[region][0][0], c["image_id"]);
        let (seen, permitted) = seen_by_b(region, c["image_id"].as_str().unwrap());
        assert_eq!(seen, c["image_id"]);
        assert!(permitted);
    }
    let (seen, permitted) = seen_by_b("us-east-1", &ami);
    assert_eq!(seen, ami.as_str());
    assert!(permitted);
    assert_eq!(o["shared_with"], serde_json::json!([ACCOUNT_B]));
    // The snapshot may be used by B to create volumes.
    let snap = o["snapshot_ids"][0].as_str().unwrap();
    let perms = py(&format!(
        "print(json.dumps([p.get('UserId') for p in c.describe_snapshot_attribute(SnapshotId='{snap}',Attribute='createVolumePermission')['CreateVolumePermissions']]))"
    ));
    assert_eq!(perms, serde_json::json!([ACCOUNT_B]));

    // The template was made (version 1) and launches the AMI on a type that boots it.
    assert_eq!(
        template(&lt),
        serde_json::json!([[1, ami.as_str(), "t3.micro"]])
    );
    assert_eq!(o["launch_template"]["name"], lt.as_str());
    assert_eq!(o["launch_template"]["created"], true);
    let create = sent(&proxy, "CreateLaunchTemplate");
    assert_eq!(create.len(), 1);
    let job = v["job"].as_str().unwrap();
    for want in [
        format!("LaunchTemplateName={lt}"),
        format!("LaunchTemplateData.ImageId={ami}"),
        "LaunchTemplateData.InstanceType=t3.micro".to_string(),
        format!("ClientToken=imgshift-lt-{job}"),
        "TagSpecification.1.ResourceType=launch-template".to_string(),
    ] {
        assert!(create[0].contains(&want), "{want} not in {}", create[0]);
    }
    // Each copy was asked for once, with the AMI's token for its region.
    let copies_sent = sent(&proxy, "CopyImage");
    assert_eq!(copies_sent.len(), 2);
    for (b, region) in copies_sent.iter().zip(REGIONS) {
        assert!(
            b.contains(&format!("ClientToken=imgshift-copy-{ami}-{region}")),
            "{b}"
        );
    }
    assert!(files_in(&d.path().join("state")).is_empty());
}

#[test]
fn killed_mid_copy_resumes_without_a_second_copy_and_cancel_leaves_nothing() {
    let d = tmpdir();
    let src = source(d.path());
    let name = unique("kill");
    let lt = unique("lt");
    // The template exists already (someone else's): the job adds a version and cancel removes only that.
    let first = py(&format!(
        "print(json.dumps(c.create_launch_template(LaunchTemplateName='{lt}',LaunchTemplateData={{'InstanceType':'t3.small'}})['LaunchTemplate']['LaunchTemplateId']))"
    ));
    let proxy = Proxy::start(d.path(), &[]);

    // Killed after CopyImage answered for the first region, before its AMI reached the journal.
    let job = kill_at(
        migrate(d.path(), &proxy.url, &src, &name, &lt),
        "copy-image-returned",
    );
    assert_eq!(sent(&proxy, "CopyImage").len(), 1);
    // As on an endpoint that does not apply CopyImage's tags: the rerun cannot find the copy by its tag, so only
    // CopyImage's token keeps it from making a second one.
    let first_copy = made(&name)[REGIONS[0]][0][0].clone();
    py(&format!(
        "r('{}').delete_tags(Resources=['{}'],Tags=[{{'Key':'imgshift:copy-of'}}])\nprint('null')",
        REGIONS[0],
        first_copy.as_str().unwrap()
    ));
    // Resumed, and killed again once every stage is done (before the journal is removed).
    let job2 = kill_at(
        migrate(d.path(), &proxy.url, &src, &name, &lt),
        "after-launch-template",
    );
    assert_eq!(job2, job);
    let m = made(&name);
    for region in REGIONS {
        assert_eq!(m[region].as_array().unwrap().len(), 1, "{region}: {m}");
    }
    // Never two copies: the first region was asked twice with the same token and answered with the same copy.
    assert_eq!(m[REGIONS[0]][0][0], first_copy);
    let copies_sent = sent(&proxy, "CopyImage");
    let ami = m["us-east-1"][0][0].as_str().unwrap().to_string();
    for (region, times) in REGIONS.iter().zip([2, 1]) {
        let n = copies_sent
            .iter()
            .filter(|b| b.contains(&format!("ClientToken=imgshift-copy-{ami}-{region}")))
            .count();
        assert_eq!(n, times, "{region}: {copies_sent:?}");
    }
    assert_eq!(copies_sent.len(), 3);
    let versions = template(&lt);
    assert_eq!(versions.as_array().unwrap().len(), 2, "{versions}");
    assert_eq!(versions[1][1], ami.as_str());
    assert_eq!(sent(&proxy, "CreateLaunchTemplateVersion").len(), 1);
    let (seen, _) = seen_by_b(REGIONS[0], m[REGIONS[0]][0][0].as_str().unwrap());
    assert_eq!(seen, m[REGIONS[0]][0][0]);

    // jobs cancel: B sees nothing, the copies and their snapshots, the AMI and its snapshot are gone, the
    // template keeps only its first version.
    let mut c = aws_cmd(d.path());
    c.args([
        "jobs",
        "cancel",
        &job,
        "--state-dir",
        s(&d.path().join("state")),
    ]);
    let r = run(c).ok();
    assert!(
        r.stdout.contains("removed the launch permission"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("deleted version 2 of launch template '{lt}'")),
        "{}",
        r.stdout
    );
    let after = made(&name);
    for region in std::iter::once("us-east-1").chain(REGIONS) {
        assert!(
            after[region].as_array().unwrap().is_empty(),
            "{region}: {after}"
        );
        for img in m[region].as_array().unwrap() {
            for snap in img[1].as_array().unwrap() {
                assert!(
                    !snapshot_exists(region, snap.as_str().unwrap()),
                    "{region}: snapshot {snap} left"
                );
            }
            assert_eq!(
                b_sees(region, img[0].as_str().unwrap()),
                "InvalidAMIID.NotFound"
            );
        }
    }
    assert_eq!(template(&lt), serde_json::json!([[1, null, "t3.small"]]));
    assert!(first.is_string());
    assert!(files_in(&d.path().join("state")).is_empty());
}

#[test]
fn upload_aws_shares_and_makes_a_launch_template_too() {
    let d = tmpdir();
    let src = source(d.path());
    let name = unique("up");
    let lt = unique("lt");
    let mut c = aws_cmd(d.path());
    c.args([
        "upload",
        "aws",
        s(&src),
        "--name",
        &name,
        "--boot-mode",
        "uefi",
    ])
    .args(["--endpoint-url", &moto_url(), "--output", "json"])
    .args(["--state-dir", s(&d.path().join("state"))])
    .args(["--share-with", ACCOUNT_B, "--launch-template", &lt]);
    let r = run(c).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let ami = v["image_id"].as_str().unwrap();
    assert_eq!(v["shared_with"], serde_json::json!([ACCOUNT_B]));
    assert_eq!(v["launch_template"]["name"], lt.as_str());
    assert_eq!(b_sees("us-east-1", ami), ami);
    // A UEFI AMI with ENA: a Nitro type.
    assert_eq!(template(&lt), serde_json::json!([[1, ami, "t3.micro"]]));

    // --snapshot-only cannot take them (usage error, nothing sent).
    let mut c = aws_cmd(d.path());
    c.args([
        "upload",
        "aws",
        s(&src),
        "--snapshot-only",
        "--share-with",
        ACCOUNT_B,
    ])
    .args(["--endpoint-url", "http://127.0.0.1:9"]);
    assert_eq!(run(c).code, 2);
    // A malformed account id is refused before any request.
    let mut c = aws_cmd(d.path());
    c.args([
        "upload",
        "aws",
        s(&src),
        "--name",
        &name,
        "--share-with",
        "12345",
    ])
    .args(["--endpoint-url", "http://127.0.0.1:9"]);
    let r = run(c);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("--share-with wants 12-digit AWS account ids, not '12345'"),
        "{}",
        r.stderr
    );
}

#[test]
fn cancel_after_copy_image_answered_finds_the_unrecorded_copy_by_its_tag() {
    let d = tmpdir();
    let src = source(d.path());
    let name = unique("cancel");
    let lt = unique("lt");
    // Killed after CopyImage answered for the first region: the copy exists, only its region is on record.
    let job = kill_at(
        migrate(d.path(), &moto_url(), &src, &name, &lt),
        "copy-image-returned",
    );
    let m = made(&name);
    assert_eq!(m[REGIONS[0]].as_array().unwrap().len(), 1, "{m}");
    let copy = m[REGIONS[0]][0].clone();
    let mut c = aws_cmd(d.path());
    c.args([
        "jobs",
        "cancel",
        &job,
        "--state-dir",
        s(&d.path().join("state")),
    ]);
    let r = run(c).ok();
    let id = copy[0].as_str().unwrap();
    assert!(
        r.stdout
            .contains(&format!("deregistered AMI {id} ({})", REGIONS[0])),
        "{}",
        r.stdout
    );
    let after = made(&name);
    for region in std::iter::once("us-east-1").chain(REGIONS) {
        assert!(
            after[region].as_array().unwrap().is_empty(),
            "{region}: {after}"
        );
    }
    for snap in copy[1].as_array().unwrap() {
        assert!(!snapshot_exists(REGIONS[0], snap.as_str().unwrap()));
    }
    assert_eq!(template(&lt), Value::Null, "no template was asked for");
}
