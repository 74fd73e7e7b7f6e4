#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `imgshift images list|share|unshare|copy|delete --on aws` against moto's server (started by `.ci/standins
//! start`), through the recording proxy where what imgshift *sent* matters (moto ignores CopyImage's token,
//! encryption and tag parameters).

mod azure_util;
mod util;
use std::path::Path;

use serde_json::Value;
use util::aws::*;
use util::*;

const ACCOUNT_B: &str = "222233334444";

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        rand_suffix(prefix.len() as u64)
    )
}

fn rand_suffix(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.finish() % 1_000_000
}

/// `imgshift images ARGS --on aws --endpoint-url ENDPOINT --max-attempts 1`.
fn images(dir: &Path, endpoint: &str, args: &[&str]) -> Run {
    let mut c = aws_cmd(dir);
    c.arg("images").args(args).args([
        "--on",
        "aws",
        "--endpoint-url",
        endpoint,
        "--max-attempts",
        "1",
    ]);
    run(c)
}

/// An AMI made by `imgshift upload aws` from a small raw image: (job, AMI, snapshots).
fn uploaded_ami(dir: &Path, name: &str) -> (String, String, Vec<String>) {
    let raw = dir.join(format!("{name}.raw"));
    make_raw(&raw, 4 << 20, &[(0, 1 << 20)], &[]);
    let mut c = aws_cmd(dir);
    c.args([
        "upload",
        "aws",
        s(&raw),
        "--name",
        name,
        "--tag",
        "team=images",
        "--endpoint-url",
        &moto_url(),
        "--state-dir",
        s(&dir.join("state")),
        "--output",
        "json",
    ]);
    let r = run(c).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let job = v["job"].as_str().unwrap().to_string();
    let ami = v["image_id"].as_str().unwrap().to_string();
    let snaps = vec![v["snapshot_id"].as_str().unwrap().to_string()];
    (job, ami, snaps)
}

/// A completed snapshot made with boto3 (a 1 GiB volume's), optionally encrypted with the default key.
fn py_snapshot(encrypted: bool) -> String {
    ec2_py(&format!(
        "v=c.create_volume(Size=1,AvailabilityZone='us-east-1a',Encrypted={})\nprint(c.create_snapshot(VolumeId=v['VolumeId'])['SnapshotId'])",
        if encrypted { "True" } else { "False" }
    ))
    .trim()
    .to_string()
}

/// An AMI registered with boto3 over `snaps` (root first, then /dev/sdb...).
fn py_ami(name: &str, snaps: &[&str]) -> String {
    let maps: Vec<String> = snaps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let dev = if i == 0 {
                "/dev/xvda".to_string()
            } else {
                format!("/dev/sd{}", (b'a' + i as u8) as char)
            };
            format!("{{'DeviceName':'{dev}','Ebs':{{'SnapshotId':'{s}'}}}}")
        })
        .collect();
    ec2_py(&format!(
        "print(c.register_image(Name='{name}',RootDeviceName='/dev/xvda',BlockDeviceMappings=[{}])['ImageId'])",
        maps.join(",")
    ))
    .trim()
    .to_string()
}

fn snapshot_exists(id: &str) -> bool {
    ec2_py(&format!(
        "print(any(s['SnapshotId']=='{id}' for s in c.describe_snapshots(OwnerIds=['self'])['Snapshots']))"
    ))
    .trim()
        == "True"
}

fn image_exists(id: &str) -> bool {
    ec2_py(&format!(
        "print(any(i['ImageId']=='{id}' for i in c.describe_images(Owners=['self'])['Images']))"
    ))
    .trim()
        == "True"
}

fn launch_permissions(ami: &str) -> Value {
    serde_json::from_str(&ec2_py(&format!(
        "print(json.dumps(c.describe_image_attribute(ImageId='{ami}',Attribute='launchPermission')['LaunchPermissions']))"
    )))
    .unwrap()
}

fn volume_permissions(snap: &str) -> Value {
    serde_json::from_str(&ec2_py(&format!(
        "print(json.dumps(c.describe_snapshot_attribute(SnapshotId='{snap}',Attribute='createVolumePermission')['CreateVolumePermissions']))"
    )))
    .unwrap()
}

fn one_line_error(r: &Run) {
    assert_eq!(r.code, 1, "stdout={} stderr={}", r.stdout, r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.starts_with("imgshift: "), "{}", r.stderr);
}

#[test]
fn list_finds_what_upload_made_and_delete_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let name = unique("list");
    let (job, ami, snaps) = uploaded_ami(d.path(), &name);
    assert_eq!(snaps.len(), 1);
    // An AMI imgshift did not make: only in --all.
    let other_snap = py_snapshot(false);
    let other = py_ami(&unique("foreign"), &[&other_snap]);

    let r = images(d.path(), &moto_url(), &["list", "--output", "json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["region"], "us-east-1");
    let list = v["images"].as_array().unwrap();
    let mine = list
        .iter()
        .find(|i| i["image_id"] == ami.as_str())
        .unwrap_or_else(|| panic!("{ami} not listed: {v}"));
    assert_eq!(mine["name"], name.as_str());
    assert_eq!(mine["job"], job.as_str());
    assert_eq!(mine["tags"]["imgshift:job"], job.as_str());
    assert_eq!(mine["tags"]["imgshift:source"], format!("{name}.raw"));
    assert_eq!(mine["tags"]["team"], "images");
    assert_eq!(mine["snapshot_ids"], serde_json::json!(snaps));
    assert_eq!(mine["public"], false);
    assert_eq!(mine["launch_permissions"], serde_json::json!([]));
    assert!(!list.iter().any(|i| i["image_id"] == other.as_str()));

    let all = images(
        d.path(),
        &moto_url(),
        &["list", "--all", "--output", "json"],
    )
    .ok();
    let v: Value = serde_json::from_str(&all.stdout).unwrap();
    assert!(
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["image_id"] == other.as_str())
    );

    let text = images(d.path(), &moto_url(), &["list"]).ok();
    let line = text.stdout.lines().find(|l| l.starts_with(&ami)).unwrap();
    assert!(line.contains(&name) && line.contains(&snaps[0]) && line.contains("private"));

    // Deleting it removes the AMI and its snapshot: nothing billable is left.
    let del = images(d.path(), &moto_url(), &["delete", &ami]).ok();
    assert!(
        del.stdout.contains(&format!("deregistered AMI {ami}")),
        "{}",
        del.stdout
    );
    assert!(
        del.stdout
            .contains(&format!("deleted snapshot {}", snaps[0]))
    );
    assert!(!image_exists(&ami));
    assert!(!snapshot_exists(&snaps[0]));
    assert!(image_exists(&other) && snapshot_exists(&other_snap));
}

#[test]
fn delete_keeps_a_snapshot_another_ami_uses() {
    let d = tempfile::tempdir().unwrap();
    let own = py_snapshot(false);
    let common = py_snapshot(false);
    let a = py_ami(&unique("del-a"), &[&own, &common]);
    let b = py_ami(&unique("del-b"), &[&common]);

    let dry = images(
        d.path(),
        &moto_url(),
        &["delete", &a, "--dry-run", "--output", "json"],
    )
    .ok();
    let v: Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["plan"]["image_id"], a.as_str());
    assert_eq!(v["plan"]["delete_snapshots"], serde_json::json!([own]));
    assert_eq!(
        v["plan"]["kept_snapshots"],
        serde_json::json!([{"snapshot_id": common, "used_by": [b]}])
    );
    // A dry run changes nothing.
    assert!(image_exists(&a) && snapshot_exists(&own) && snapshot_exists(&common));
    let dry_text = images(d.path(), &moto_url(), &["delete", &a, "--dry-run"]).ok();
    assert!(
        dry_text
            .stdout
            .contains(&format!("would deregister AMI {a}"))
    );
    assert!(
        dry_text
            .stdout
            .contains(&format!("would delete snapshot {own}"))
    );
    assert!(
        dry_text
            .stdout
            .contains(&format!("would keep snapshot {common}: still used by {b}"))
    );

    let r = images(d.path(), &moto_url(), &["delete", &a, "--output", "json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["deregistered_image_id"], a.as_str());
    assert_eq!(v["deleted_snapshot_ids"], serde_json::json!([own]));
    assert!(!image_exists(&a));
    assert!(!snapshot_exists(&own));
    assert!(snapshot_exists(&common) && image_exists(&b));

    // Now unused, it goes with B.
    let r = images(d.path(), &moto_url(), &["delete", &b]).ok();
    assert!(
        r.stdout.contains(&format!("deleted snapshot {common}")),
        "{}",
        r.stdout
    );
    assert!(!snapshot_exists(&common) && !image_exists(&b));

    // A missing AMI: one line, exit 1.
    let gone = images(d.path(), &moto_url(), &["delete", &a]);
    one_line_error(&gone);
    assert!(gone.stderr.contains(&a), "{}", gone.stderr);
}

#[test]
fn share_with_an_account_and_unshare() {
    let d = tempfile::tempdir().unwrap();
    let (_, ami, snaps) = uploaded_ami(d.path(), &unique("share"));
    let proxy = Proxy::start(d.path(), &[]);

    let r = images(
        d.path(),
        &proxy.url,
        &["share", &ami, "--accounts", ACCOUNT_B],
    )
    .ok();
    assert!(
        r.stdout
            .contains(&format!("shared AMI {ami} with account(s) {ACCOUNT_B}")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(&format!(
        "create-volume permission on snapshot {}",
        snaps[0]
    )));
    assert_eq!(
        launch_permissions(&ami),
        serde_json::json!([{"UserId": ACCOUNT_B}])
    );
    assert_eq!(
        volume_permissions(&snaps[0]),
        serde_json::json!([{"UserId": ACCOUNT_B}])
    );
    // What was sent: the launch permission and the snapshot attribute.
    let bodies: Vec<String> = proxy
        .records()
        .iter()
        .filter_map(|r| r["body"].as_str().map(str::to_string))
        .collect();
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("Action=ModifyImageAttribute")
                && b.contains(&format!("LaunchPermission.Add.1.UserId={ACCOUNT_B}")))
    );
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("Action=ModifySnapshotAttribute")
                && b.contains("Attribute=createVolumePermission")
                && b.contains("OperationType=add")
                && b.contains(&format!("UserId.1={ACCOUNT_B}")))
    );

    // Listed as shared.
    let l = images(d.path(), &moto_url(), &["list", "--output", "json"]).ok();
    let v: Value = serde_json::from_str(&l.stdout).unwrap();
    let mine = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_id"] == ami.as_str())
        .unwrap();
    assert_eq!(mine["launch_permissions"], serde_json::json!([ACCOUNT_B]));
    // Account B describes it (moto keeps accounts apart; the launcher's correction is tested in
    // standin_moto.rs), and no longer once it is unshared.
    assert_eq!(described_by_b(&ami), ami.as_str());

    let u = images(
        d.path(),
        &moto_url(),
        &["unshare", &ami, "--accounts", ACCOUNT_B, "--output", "json"],
    )
    .ok();
    let v: Value = serde_json::from_str(&u.stdout).unwrap();
    assert_eq!(v["launch_permissions"], serde_json::json!([]));
    assert_eq!(launch_permissions(&ami), serde_json::json!([]));
    assert_eq!(volume_permissions(&snaps[0]), serde_json::json!([]));
    assert_eq!(described_by_b(&ami), "InvalidAMIID.NotFound");
}

/// DescribeImages of `ami` as account B (header `x-moto-account-id`): its id, or the error code.
fn described_by_b(ami: &str) -> Value {
    let out = ec2_py(&format!(
        "c.meta.events.register('before-sign.ec2.*',lambda request,**kw: request.headers.__setitem__('x-moto-account-id','{ACCOUNT_B}'))\n\
         try:\n    print(json.dumps(c.describe_images(ImageIds=['{ami}'])['Images'][0]['ImageId']))\n\
         except Exception as e:\n    print(json.dumps(e.response['Error']['Code']))"
    ));
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn share_refuses_an_ami_encrypted_with_the_default_key() {
    let d = tempfile::tempdir().unwrap();
    let snap = py_snapshot(true);
    let ami = py_ami(&unique("enc"), &[&snap]);
    let r = images(
        d.path(),
        &moto_url(),
        &["share", &ami, "--accounts", ACCOUNT_B],
    );
    one_line_error(&r);
    assert!(r.stderr.contains("default EBS key"), "{}", r.stderr);
    assert!(r.stderr.contains("kms:Decrypt") && r.stderr.contains("customer managed key"));
    assert_eq!(launch_permissions(&ami), serde_json::json!([]));
    assert_eq!(volume_permissions(&snap), serde_json::json!([]));
}

#[test]
fn public_checks_image_block_public_access_first() {
    let d = tempfile::tempdir().unwrap();
    let snap = py_snapshot(false);
    let ami = py_ami(&unique("pub"), &[&snap]);
    let proxy = Proxy::start(d.path(), &[]);
    // moto does not implement GetImageBlockPublicAccessState: an unanswered check refuses, changing nothing.
    let r = images(d.path(), &proxy.url, &["share", &ami, "--public"]);
    one_line_error(&r);
    assert!(r.stderr.contains("block public access"), "{}", r.stderr);
    assert_eq!(proxy.count_action("GetImageBlockPublicAccessState"), 1);
    assert_eq!(proxy.count_action("ModifyImageAttribute"), 0);
    assert_eq!(launch_permissions(&ami), serde_json::json!([]));
}

#[test]
fn copy_to_two_regions_makes_one_copy_each() {
    let d = tempfile::tempdir().unwrap();
    let (_, ami, _) = uploaded_ami(d.path(), &unique("copy"));
    let proxy = Proxy::start(d.path(), &[]);
    let regions = ["eu-west-1", "us-west-2"];
    let args = [
        "copy",
        &ami,
        "--to-regions",
        "eu-west-1,us-west-2",
        "--kms-key-id",
        "alias/imgshift-test",
        "--output",
        "json",
    ];
    let r = images(d.path(), &proxy.url, &args).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let copies = v["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 2);
    let find = |region: &str| -> Value {
        serde_json::from_str(&ec2_py(&format!(
            "r=boto3.client('ec2',endpoint_url='{}',region_name='{region}',aws_access_key_id='t',aws_secret_access_key='t')\nprint(json.dumps([{{'id':i['ImageId'],'tags':{{t['Key']:t['Value'] for t in i.get('Tags',[])}}}} for i in r.describe_images(Owners=['self'],Filters=[{{'Name':'tag:imgshift:copy-of','Values':['{ami}']}}])['Images']]))",
            moto_url()
        )))
        .unwrap()
    };
    for (c, region) in copies.iter().zip(regions) {
        assert_eq!(c["region"], region);
        assert_eq!(c["created"], true);
        let found = find(region);
        assert_eq!(found.as_array().unwrap().len(), 1, "{region}: {found}");
        assert_eq!(found[0]["id"], c["image_id"]);
        // The source's tags came along, and where it came from.
        assert_eq!(found[0]["tags"]["team"], "images");
        assert_eq!(found[0]["tags"]["imgshift:copied-from-region"], "us-east-1");
        assert!(found[0]["tags"]["imgshift:job"].is_string());
    }
    // What was sent (moto ignores the token, the encryption and the tag parameters).
    let sent: Vec<String> = proxy
        .records()
        .iter()
        .filter_map(|r| r["body"].as_str().map(str::to_string))
        .filter(|b| b.contains("Action=CopyImage"))
        .collect();
    assert_eq!(sent.len(), 2);
    for (b, region) in sent.iter().zip(regions) {
        assert!(
            b.contains(&format!("ClientToken=imgshift-copy-{ami}-{region}")),
            "{b}"
        );
        assert!(
            b.contains(&format!("SourceImageId={ami}")) && b.contains("SourceRegion=us-east-1")
        );
        assert!(
            b.contains("Encrypted=true") && b.contains("KmsKeyId=alias%2Fimgshift-test"),
            "{b}"
        );
        assert!(b.contains("CopyImageTags=true"), "{b}");
    }

    // A rerun finds both copies: no third.
    let again = images(d.path(), &proxy.url, &args).ok();
    let v: Value = serde_json::from_str(&again.stdout).unwrap();
    for (c, first) in v["copies"].as_array().unwrap().iter().zip(copies) {
        assert_eq!(c["created"], false);
        assert_eq!(c["image_id"], first["image_id"]);
    }
    assert_eq!(proxy.count_action("CopyImage"), 2);
    for region in regions {
        assert_eq!(find(region).as_array().unwrap().len(), 1);
    }

    // A copy is deleted in its own region.
    for c in copies {
        let (region, id) = (
            c["region"].as_str().unwrap(),
            c["image_id"].as_str().unwrap(),
        );
        let mut cmd = aws_cmd(d.path());
        cmd.args([
            "images",
            "delete",
            id,
            "--on",
            "aws",
            "--region",
            region,
            "--endpoint-url",
            &moto_url(),
        ]);
        let r = run(cmd).ok();
        assert!(
            r.stdout.contains(&format!("deregistered AMI {id}")),
            "{}",
            r.stdout
        );
        assert_eq!(find(region).as_array().unwrap().len(), 0);
    }
}

#[test]
fn usage_errors_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let url = "http://127.0.0.1:9"; // never reached: usage is checked first
    for args in [
        vec!["share", "ami-0123456789abcdef0"],
        vec!["share", "ami-0123456789abcdef0", "--accounts", "12345"],
        vec!["share", "ami-0123456789abcdef0", "--org", "o-123"],
        vec![
            "share",
            "ami-0123456789abcdef0",
            "--public",
            "--accounts",
            "123456789012",
        ],
        vec!["delete", "web01"],
        vec!["copy", "ami-0123456789abcdef0"],
        vec!["copy", "ami-0123456789abcdef0", "--to-regions", "EU WEST"],
    ] {
        let r = images(d.path(), url, &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
    }
}

#[test]
fn share_with_an_organization_leaves_the_snapshots_private() {
    let d = tempfile::tempdir().unwrap();
    let snap = py_snapshot(false);
    let ami = py_ami(&unique("org"), &[&snap]);
    let org = "arn:aws:organizations::123456789012:organization/o-abcde12345";
    let r = images(
        d.path(),
        &moto_url(),
        &["share", &ami, "--org", org, "--output", "json"],
    )
    .ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["launch_permissions"], serde_json::json!([org]));
    assert_eq!(v["snapshot_ids"], serde_json::json!([]));
    assert_eq!(
        launch_permissions(&ami),
        serde_json::json!([{"OrganizationArn": org}])
    );
    assert_eq!(volume_permissions(&snap), serde_json::json!([]));
    images(d.path(), &moto_url(), &["unshare", &ami, "--org", org]).ok();
    assert_eq!(launch_permissions(&ami), serde_json::json!([]));
    images(d.path(), &moto_url(), &["delete", &ami]).ok();
    assert!(!image_exists(&ami) && !snapshot_exists(&snap));
}

/// An Azure image (and, with `gallery`, a gallery image version) made by `imgshift migrate --to azure` from a
/// small VHDX, in a fresh fake ARM.
fn azure_migrated(tag: &str, name: &str, gallery: bool) -> azure_util::Env {
    let env = azure_util::Env::start(tag, &[], None);
    let vhdx = env.path().join("guest.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&vhdx), "32M"]);
    let mut c = env.cmd();
    c.args([
        "migrate",
        s(&vhdx),
        "--to",
        "azure",
        "--subscription",
        azure_util::SUB,
    ])
    .args([
        "--resource-group",
        azure_util::RG,
        "--location",
        "westeurope",
    ])
    .args([
        "--arm-endpoint",
        &env.arm_url(),
        "--name",
        name,
        "--force",
        "--yes",
    ])
    .args(["--state-dir", s(&env.path().join("state"))]);
    if gallery {
        c.args([
            "--gallery",
            "gal",
            "--gallery-image",
            "def",
            "--gallery-version",
            "1.0.0",
        ]);
    }
    run(c).ok();
    env
}

fn azure_images(env: &azure_util::Env, args: &[&str]) -> Run {
    let mut c = env.cmd();
    c.arg("images").args(args).args([
        "--on",
        "azure",
        "--subscription",
        azure_util::SUB,
        "-g",
        azure_util::RG,
        "--arm-endpoint",
        &env.arm_url(),
        "--max-attempts",
        "1",
    ]);
    run(c)
}

#[test]
fn azure_delete_removes_the_image_and_its_disk() {
    let env = azure_migrated("imgdel", "img-a", false);
    assert_eq!(
        env.held(),
        (
            vec!["img-a-os".to_string()],
            vec!["images/img-a".to_string()]
        )
    );

    let dry = azure_images(&env, &["delete", "img-a", "--dry-run", "--output", "json"]).ok();
    let v: Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(v["plan"]["kind"], "image");
    assert!(
        v["plan"]["id"]
            .as_str()
            .unwrap()
            .ends_with("/providers/Microsoft.Compute/images/img-a")
    );
    assert_eq!(v["plan"]["delete_disks"], serde_json::json!(["img-a-os"]));
    assert_eq!(
        env.held().0.len() + env.held().1.len(),
        2,
        "a dry run deleted something"
    );
    assert!(!env.records().iter().any(|r| r["method"] == "DELETE"));

    let r = azure_images(&env, &["delete", "img-a"]).ok();
    assert!(
        r.stdout.contains("deleted image /subscriptions/"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("deleted disk img-a-os"), "{}", r.stdout);
    assert_eq!(env.held(), (vec![], vec![]));
    assert!(env.blobs().is_empty(), "{:?}", env.blobs());
    // The image went before its disk.
    let deletes: Vec<String> = env
        .records()
        .iter()
        .filter(|r| r["method"] == "DELETE")
        .map(|r| {
            r["path"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(deletes, ["img-a", "img-a-os"]);

    let gone = azure_images(&env, &["delete", "img-a"]);
    one_line_error(&gone);
    assert!(gone.stderr.contains("no image img-a"), "{}", gone.stderr);
}

#[test]
fn azure_delete_of_a_gallery_version_then_its_image_leaves_nothing() {
    let env = azure_migrated("imggal", "img-g", true);
    let (disks, resources) = env.held();
    assert_eq!(disks, ["img-g-os"]);
    assert_eq!(
        resources,
        ["galleries/gal/images/def/versions/1.0.0", "images/img-g"]
    );

    let r = azure_images(
        &env,
        &[
            "delete",
            "1.0.0",
            "--gallery",
            "gal",
            "--gallery-image",
            "def",
            "--output",
            "json",
        ],
    )
    .ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        v["deleted_id"]
            .as_str()
            .unwrap()
            .ends_with("/galleries/gal/images/def/versions/1.0.0")
    );
    assert_eq!(v["deleted_disks"], serde_json::json!(["img-g-os"]));
    assert_eq!(env.held(), (vec![], vec!["images/img-g".to_string()]));

    let r = azure_images(&env, &["delete", "img-g"]).ok();
    assert!(
        r.stdout.contains("disk img-g-os was already gone"),
        "{}",
        r.stdout
    );
    assert_eq!(env.held(), (vec![], vec![]));
}

#[test]
fn libvirt_takes_list_and_delete_only() {
    let d = tempfile::tempdir().unwrap();
    let mut c = aws_cmd(d.path());
    c.args([
        "images",
        "share",
        "dom",
        "--on",
        "libvirt",
        "--accounts",
        ACCOUNT_B,
    ]);
    let r = run(c);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("works --on aws and --on azure"),
        "{}",
        r.stderr
    );
}

fn libvirt_images(args: &[&str]) -> Run {
    let u = util::libvirt::uri();
    let mut a = vec!["images"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--on", "libvirt", "--connect", &u]);
    imgshift(&a)
}

fn domains() -> Vec<String> {
    util::libvirt::virsh_ok(&["list", "--all", "--name"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn libvirt_delete_removes_what_migrate_made() {
    let mut pool = util::libvirt::Pool::new();
    let dom = pool.domain();
    let state = tempfile::tempdir().unwrap();
    let raw = state.path().join("src.raw");
    make_raw(&raw, 16 << 20, &[(0, 1 << 20)], &[]);
    let u = util::libvirt::uri();
    imgshift(&[
        "migrate",
        s(&raw),
        "--to",
        "libvirt",
        "--connect",
        &u,
        "--pool",
        &pool.name,
        "--name",
        &dom,
        "--domain-type",
        "qemu",
        "--force",
        "--yes",
        "--state-dir",
        s(state.path()),
    ])
    .ok();
    let vol = format!("{dom}.qcow2");
    assert_eq!(pool.volumes(), std::slice::from_ref(&vol));

    // Listed as imgshift's (its metadata mark), with its volume; a domain defined by hand is listed only
    // with --all.
    let other = pool.domain();
    let xml = format!(
        "<domain type='qemu'><name>{other}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
    );
    let f = state.path().join("other.xml");
    std::fs::write(&f, xml).unwrap();
    util::libvirt::virsh_ok(&["define", s(&f)]);
    let find = |all: bool| -> Vec<Value> {
        let mut a = vec!["list", "--output", "json"];
        if all {
            a.push("--all");
        }
        let r = libvirt_images(&a).ok();
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        v["domains"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["domain"] == dom.as_str() || d["domain"] == other.as_str())
            .cloned()
            .collect()
    };
    let mine = find(false);
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["domain"], dom.as_str());
    assert_eq!(
        mine[0]["volumes"],
        serde_json::json!([{"pool": pool.name, "volume": vol}])
    );
    assert_eq!(mine[0]["made_by_imgshift"], true);
    assert_eq!(mine[0]["active"], false);
    let every = find(true);
    assert_eq!(every.len(), 2, "{every:?}");
    assert!(
        every
            .iter()
            .any(|d| d["domain"] == other.as_str() && d["made_by_imgshift"] == false)
    );
    util::libvirt::virsh_ok(&["undefine", &other]);

    let dry = libvirt_images(&["delete", &dom, "--dry-run", "--output", "json"]).ok();
    let v: Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(
        v["plan"]["delete_volumes"],
        serde_json::json!([{"pool": pool.name, "volume": vol}])
    );
    assert!(domains().contains(&dom) && pool.volumes() == [vol.clone()]);

    let r = libvirt_images(&["delete", &dom]).ok();
    assert!(
        r.stdout.contains(&format!("undefined domain '{dom}'")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("deleted volume '{vol}'")),
        "{}",
        r.stdout
    );
    assert!(!domains().contains(&dom));
    assert!(pool.volumes().is_empty(), "{:?}", pool.volumes());

    let gone = libvirt_images(&["delete", &dom]);
    one_line_error(&gone);
}

#[test]
fn libvirt_delete_keeps_a_volume_another_domain_uses() {
    let mut pool = util::libvirt::Pool::new();
    for v in ["own.qcow2", "shared.qcow2"] {
        util::libvirt::virsh_ok(&["vol-create-as", &pool.name, v, "16M", "--format", "qcow2"]);
    }
    let (a, b) = (pool.domain(), pool.domain());
    let tmp = tempfile::tempdir().unwrap();
    let define = |name: &str, vols: &[&str]| {
        let disks: String = vols
            .iter()
            .zip(["vda", "vdb"])
            .map(|(v, dev)| {
                format!(
                    "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='{}' volume='{v}'/><target dev='{dev}' bus='virtio'/></disk>",
                    pool.name
                )
            })
            .collect();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>"
        );
        let f = tmp.path().join(format!("{name}.xml"));
        std::fs::write(&f, xml).unwrap();
        util::libvirt::virsh_ok(&["define", s(&f)]);
    };
    define(&a, &["own.qcow2", "shared.qcow2"]);
    define(&b, &["shared.qcow2"]);

    let r = libvirt_images(&["delete", &a, "--output", "json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["deleted_volumes"],
        serde_json::json!([{"pool": pool.name, "volume": "own.qcow2"}])
    );
    assert_eq!(
        v["kept_volumes"],
        serde_json::json!([{"pool": pool.name, "volume": "shared.qcow2", "used_by": [b]}])
    );
    assert_eq!(pool.volumes(), ["shared.qcow2"]);
    let all = domains();
    assert!(!all.contains(&a) && all.contains(&b));
}
