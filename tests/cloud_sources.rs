//! Cloud disks as sources (issue 22), against moto (its RegisterImage corrected by tests/standins/moto_launcher.py,
//! tested in tests/standin_moto.rs) and, for AMI → Azure, Azurite + the fake ARM: an EBS snapshot read by `info`,
//! `map`, `compare` and `convert` (only its data blocks fetched), and a two-disk UEFI AMI migrated to Azure as an
//! OS disk and a data disk of Hyper-V generation V2 whose blobs equal the source disks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod azure_util;
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::aws::{ACCESS_KEY, Proxy, SECRET_KEY, SESSION_TOKEN, aws_cmd, ec2_py, moto_url, run};
use util::{make_raw, qemu_img, s, tmpdir};

const MIB: u64 = 1 << 20;

/// Uploads `raw` with `upload aws --snapshot-only`; returns the snapshot id.
fn snapshot_of(dir: &Path, raw: &Path) -> String {
    let mut c = aws_cmd(dir);
    c.args([
        "upload",
        "aws",
        s(raw),
        "--snapshot-only",
        "--endpoint-url",
        &moto_url(),
    ])
    .args(["--state-dir", s(&dir.join("state")), "--output", "json"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["snapshot_id"].as_str().unwrap().to_string()
}

/// `c` (an Azure test command) with the AWS test credentials and moto's region, and nothing else of AWS.
fn with_aws(c: &mut Command, d: &Path) {
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_SESSION_TOKEN", SESSION_TOKEN)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", d.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", d.join("no-credentials"));
}

fn imgshift_aws(dir: &Path, args: &[&str]) -> util::Run {
    let mut c = aws_cmd(dir);
    c.args(args);
    run(c)
}

/// Runs `c` under GNU time: its result, peak RSS (KiB) and the 512-byte blocks it wrote to local storage
/// (rusage's block outputs, counted by the kernel as pages are dirtied).
fn timed(c: &Command, dir: &Path) -> (util::Run, u64, u64) {
    let out = dir.join("time.out");
    let mut t = Command::new("/usr/bin/time");
    t.env_clear()
        .args(["-f", "%M %O", "-o", s(&out)])
        .arg(c.get_program())
        .args(c.get_args());
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            t.env(k, v);
        }
    }
    let r = run(t);
    let text = std::fs::read_to_string(&out).unwrap();
    let nums: Vec<u64> = text
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    (r, nums[0], nums[1])
}

fn disk(dir: &Path, name: &str, size: u64, data: &[(u64, u64)]) -> PathBuf {
    let raw = dir.join(name);
    make_raw(&raw, size, data, &[]);
    raw
}

#[test]
fn a_snapshot_is_read_in_place_by_info_map_compare_and_convert() {
    let d = tmpdir();
    let raw = disk(
        d.path(),
        "src.raw",
        24 * MIB,
        &[(0, MIB), (5 * MIB, 64 << 10), (20 * MIB, 2 * MIB)],
    );
    let snap = snapshot_of(d.path(), &raw);
    let proxy = Proxy::start(d.path(), &[]);
    let src = format!("aws:{snap}");
    let ep = ["--endpoint-url", proxy.url.as_str()];

    // info: a raw disk of the snapshot's size (EBS sizes are whole GiB).
    let r = imgshift_aws(
        d.path(),
        &[&["info", &src, "--output", "json"][..], &ep].concat(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["virtual-size"], 1u64 << 30, "{v}");

    // compare: the local image and the snapshot hold the same bytes (the snapshot's tail reads as zeros).
    let r = imgshift_aws(d.path(), &[&["compare", s(&raw), &src][..], &ep].concat());
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // convert: straight from EBS into a qcow2 that qemu-img finds equal to the source.
    let out = d.path().join("back.qcow2");
    let r = imgshift_aws(
        d.path(),
        &[&["convert", "-O", "qcow2", &src, s(&out)][..], &ep].concat(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    qemu_img(&["check", "-f", "qcow2", s(&out)]);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&out)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // Only blocks with data were fetched, not the snapshot's 2048 blocks: 3 MiB + 64 KiB of data lie in 7 blocks
    // of 512 KiB, read by compare and by convert (the first one once more, to probe), and not by info.
    let gets = proxy
        .records()
        .iter()
        .filter(|r| r["method"] == "GET" && r["path"].as_str().unwrap().contains("/blocks/"))
        .count();
    assert!(gets <= 16, "{gets} blocks fetched");
    assert!(gets >= 7, "{gets} blocks fetched");

    // A name that is neither a snapshot nor an AMI is refused, naming the forms; ./aws:x is a file.
    let r = imgshift_aws(d.path(), &["info", "aws:vpc-0123"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("aws:snap-ID"), "{}", r.stderr);
    assert!(r.stderr.contains("aws:vol-ID"), "{}", r.stderr);
    let r = imgshift_aws(d.path(), &["info", "./aws:snap-0123"]);
    assert_eq!(r.code, 1);
    assert!(!r.stderr.contains("EBS"), "{}", r.stderr);
}

/// A snapshot series of one volume made through the EBS direct APIs with boto3 (the stand-in's incremental
/// snapshots, tests/standin_moto.rs): block `i` of each snapshot is filled with the byte given. moto reports
/// StartTime in whole seconds (EC2 gives milliseconds), so the snapshots start a second apart to be ordered. Writes the
/// expected disk of the newest completed snapshot to `expect` (4 blocks); returns the volume id and the id of a
/// newer snapshot left pending.
fn volume_series(expect: &Path) -> (String, String) {
    let out = Command::new(util::aws::venv_python())
        .arg("-c")
        .arg(format!(
            "import boto3,hashlib,base64\n\
             e=boto3.client('ebs',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
             c=boto3.client('ec2',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
             B=524288\n\
             def put(s,i,b):\n\
             \x20 d=bytes([b])*B\n\
             \x20 e.put_snapshot_block(SnapshotId=s,BlockIndex=i,BlockData=d,DataLength=B,ChecksumAlgorithm='SHA256',Checksum=base64.b64encode(hashlib.sha256(d).digest()).decode())\n\
             p=e.start_snapshot(VolumeSize=1)['SnapshotId']; put(p,0,1); put(p,2,2); e.complete_snapshot(SnapshotId=p,ChangedBlocksCount=2)\n\
             import time; time.sleep(1.1)\n\
             k=e.start_snapshot(VolumeSize=1,ParentSnapshotId=p)['SnapshotId']; put(k,2,5); put(k,3,6); e.complete_snapshot(SnapshotId=k,ChangedBlocksCount=2)\n\
             time.sleep(1.1)\n\
             n=e.start_snapshot(VolumeSize=1,ParentSnapshotId=k)['SnapshotId']; put(n,0,9)\n\
             open('{}','wb').write(bytes([1])*B+bytes(B)+bytes([5])*B+bytes([6])*B)\n\
             print(c.describe_snapshots(SnapshotIds=[n])['Snapshots'][0]['VolumeId'], n)",
            moto_url(),
            moto_url(),
            s(expect)
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut w = text.split_whitespace();
    (w.next().unwrap().to_string(), w.next().unwrap().to_string())
}

#[test]
fn a_volume_is_read_as_its_newest_completed_snapshot() {
    let d = tmpdir();
    let expect = d.path().join("expect.raw");
    // Three snapshots of one volume: the newest is still pending, so the one before it is read.
    let (vol, pending) = volume_series(&expect);
    let out = d.path().join("vol.qcow2");
    let src = format!("aws:{vol}");
    let r = imgshift_aws(
        d.path(),
        &[
            "convert",
            "-O",
            "qcow2",
            &src,
            s(&out),
            "--endpoint-url",
            &moto_url(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    qemu_img(&["check", "-f", "qcow2", s(&out)]);
    // The snapshot is 1 GiB; the expected file its first 2 MiB (the rest must read as zeros).
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(&expect), s(&out)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // A volume with no snapshot is refused in one line saying so.
    let r = imgshift_aws(
        d.path(),
        &[
            "info",
            "aws:vol-0123456789abcdef0",
            "--endpoint-url",
            &moto_url(),
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("has no snapshot"), "{}", r.stderr);

    // A migrate of the volume killed after it started, then a newer snapshot completes: the rerun does not mix
    // the two snapshots into one job, it stops saying so.
    let state = d.path().join("state");
    let cmd = || {
        let mut c = aws_cmd(d.path());
        c.args([
            "migrate",
            &src,
            "--to",
            "aws",
            "--endpoint-url",
            &moto_url(),
        ])
        .args(["--source-endpoint-url", &moto_url()])
        .args([
            "--name",
            "fromvol",
            "--state-dir",
            s(&state),
            "--yes",
            "--force",
        ]);
        c
    };
    let mut c = cmd();
    c.env("IMGSHIFT_TEST_PAUSE_AT", "after-inspect")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("imgshift-test: paused at after-inspect") => break,
            Some(Ok(l)) => seen.push(l),
            _ => panic!("the migrate ended before pausing after inspect: {seen:?}"),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = Command::new(util::aws::venv_python())
        .arg("-c")
        .arg(format!(
            "import boto3\n\
             boto3.client('ebs',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\
             .complete_snapshot(SnapshotId='{pending}',ChangedBlocksCount=1)",
            moto_url()
        ))
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let r = run(cmd());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("is now {vol} ({pending})")) && r.stderr.contains("jobs cancel"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_two_disk_uefi_ami_becomes_azure_v2_os_and_data_disks_equal_to_the_source() {
    let env = azure_util::Env::start("amisrc", &[], None);
    let d = env.path();
    // The fixed-VHD data part of a 1 GiB snapshot is 1 GiB: the blob holds the whole snapshot plus a footer.
    let boot = disk(d, "boot.raw", 1 << 30, &[(0, MIB), (300 * MIB, 64 << 10)]);
    let data = disk(d, "data.raw", 1 << 30, &[(7 * MIB, 3 * MIB)]);
    let s1 = snapshot_of(d, &boot);
    let s2 = snapshot_of(d, &data);
    let name = format!("amisrc-{}", std::process::id());
    let ami = ec2_py(&format!(
        "print(c.register_image(Name='{name}',RootDeviceName='/dev/xvda',Architecture='x86_64',BootMode='uefi',\
         EnaSupport=True,BlockDeviceMappings=[{{'DeviceName':'/dev/sdb','Ebs':{{'SnapshotId':'{s2}'}}}},\
         {{'DeviceName':'/dev/xvda','Ebs':{{'SnapshotId':'{s1}'}}}}])['ImageId'])"
    ))
    .trim()
    .to_string();
    let mut c = env.cmd();
    with_aws(&mut c, d);
    c.args(["migrate", &format!("aws:{ami}"), "--to", "azure"])
        .args(["--source-endpoint-url", &moto_url()])
        .args([
            "--subscription",
            azure_util::SUB,
            "--resource-group",
            azure_util::RG,
        ])
        .args(["--location", "westeurope", "--arm-endpoint", &env.arm_url()])
        .args([
            "--name",
            "fromami",
            "--state-dir",
            s(&d.join("state")),
            "--yes",
        ])
        .args(["--force", "--output", "json"]);
    let (r, rss_kib, written_blocks) = timed(&c, d);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["outputs"]["hyper_v_generation"], "V2", "{v}");
    // Cloud to cloud with no local disk: under 1 MiB written to local storage (the journal) for two 1 GiB disks;
    // bounded memory.
    assert!(
        written_blocks * 512 < MIB,
        "{} bytes written locally",
        written_blocks * 512
    );
    assert!(rss_kib < 128 * 1024, "peak RSS {rss_kib} KiB");
    // The root mapping is the OS disk whatever its order in the AMI; the other is a data disk.
    let os = &env.bodies("PUT", "/disks/fromami-os")[0];
    assert_eq!(os["properties"]["hyperVGeneration"], "V2");
    assert!(!env.bodies("PUT", "/disks/fromami-data1").is_empty());
    azure_util::check_blob(&env, "fromami-os", &boot, 1 << 30);
    azure_util::check_blob(&env, "fromami-data1", &data, 1 << 30);
    // Nothing was written locally but the job's journal (removed at the end).
    assert!(util::files_in(&d.join("state")).is_empty());
}

#[test]
fn an_azure_disk_converts_in_place_and_migrates_to_aws_with_its_generation() {
    let env = azure_util::Env::start("azsrc", &[], None);
    let d = env.path();
    let raw = disk(
        d,
        "az.raw",
        40 * MIB,
        &[(0, MIB), (30 * MIB, 2 * MIB + 4096)],
    );
    let r = env.upload(&raw, "azsrc-disk", &["--hyper-v-generation", "V2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let src = format!("azure:disk/{}/azsrc-disk", azure_util::RG);

    // convert: read through a read SAS straight into a VMDK.
    let out = d.join("back.vmdk");
    let mut c = env.cmd();
    c.args(["convert", "-O", "vmdk", &src, s(&out)]).args([
        "--subscription",
        azure_util::SUB,
        "--arm-endpoint",
        &env.arm_url(),
    ]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&out)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // migrate to AWS: a snapshot holding the same bytes, an AMI registered for UEFI (the disk is Hyper-V V2).
    let name = format!("fromazure-{}", std::process::id());
    let mut c = env.cmd();
    with_aws(&mut c, d);
    c.args([
        "migrate",
        &src,
        "--to",
        "aws",
        "--endpoint-url",
        &moto_url(),
    ])
    .args(["--source-subscription", azure_util::SUB])
    .args(["--source-arm-endpoint", &env.arm_url()])
    .args(["--name", &name, "--state-dir", s(&d.join("state")), "--yes"])
    .args(["--force", "--output", "json"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let snap = v["outputs"]["snapshot_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let ami = v["outputs"]["image_id"].as_str().unwrap().to_string();
    let boot = ec2_py(&format!(
        "print(c.describe_images(ImageIds=['{ami}'])['Images'][0].get('BootMode'))"
    ));
    assert_eq!(boot.trim(), "uefi");
    let back = d.join("snap.raw");
    let r = imgshift_aws(
        d,
        &[
            "convert",
            "-O",
            "raw",
            &format!("aws:{snap}"),
            s(&back),
            "--endpoint-url",
            &moto_url(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", s(&raw), s(&back)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // Every read grant was ended (convert, migrate's inspect/upload/verify all read the disk).
    let posts = |action: &str| {
        env.records()
            .iter()
            .filter(|r| {
                r["method"] == "POST"
                    && r["path"].as_str().unwrap().contains("/disks/azsrc-disk/")
                    && r["path"].as_str().unwrap().ends_with(action)
            })
            .count()
    };
    assert!(posts("beginGetAccess") >= 3, "{}", posts("beginGetAccess"));
    assert_eq!(posts("beginGetAccess"), posts("endGetAccess"));
}

/// Takes snapshot `snap` of managed disk `disk` through the fake ARM (PUT snapshots/NAME, createOption Copy,
/// incremental), as `az snapshot create --incremental` does.
fn take_snapshot(env: &azure_util::Env, disk: &str, snap: &str) {
    let url = format!(
        "{}/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/snapshots/{snap}?api-version=2023-04-02",
        env.arm_url(),
        sub = azure_util::SUB,
        rg = azure_util::RG
    );
    let body = serde_json::json!({"location": "westeurope", "properties": {"incremental": true, "creationData": {
        "createOption": "Copy",
        "sourceResourceId": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/{disk}",
            azure_util::SUB, azure_util::RG)}}});
    let o = Command::new("curl")
        .args(["-sS", "-f", "-X", "PUT", "--cacert", s(&env.ca)])
        .args([
            "-H",
            &format!("Authorization: Bearer {}", azure_util::TOKEN),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Grants the fake ARM holds open (disks/NAME, snapshots/NAME with an active SAS).
fn open_grants(env: &azure_util::Env) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&env.arm_state).unwrap()).unwrap();
    v["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect()
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` against the fake ARM with its token and CA: the JSON body and the Location header of the reply.
fn arm_call(env: &azure_util::Env, method: &str, url: &str) -> (serde_json::Value, Option<String>) {
    let o = Command::new("curl")
        .args(["-sS", "-f", "-i", "-X", method, "--cacert", s(&env.ca)])
        .args([
            "-H",
            &format!("Authorization: Bearer {}", azure_util::TOKEN),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"access":"Read","durationInSeconds":3600}"#,
        ])
        .arg(url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .map(|l| l.trim().to_string());
    (
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        location,
    )
}

/// A read SAS of snapshot `snap` from the fake ARM (beginGetAccess, its operation polled to the result).
fn snapshot_sas(env: &azure_util::Env, snap: &str) -> String {
    let url = format!(
        "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/{snap}/beginGetAccess?api-version=2023-04-02",
        env.arm_url(),
        azure_util::SUB,
        azure_util::RG
    );
    let (_, mut location) = arm_call(env, "POST", &url);
    for _ in 0..10 {
        let (v, next) = arm_call(env, "GET", &location.clone().unwrap());
        if let Some(sas) = v["accessSAS"].as_str() {
            return sas.to_string();
        }
        // A relative Location is on the fake ARM.
        location = next
            .map(|l| {
                if l.starts_with('/') {
                    format!("{}{l}", env.arm_url())
                } else {
                    l
                }
            })
            .or(location);
    }
    panic!("no SAS for snapshot {snap}");
}

#[test]
fn an_azure_snapshot_converts_in_place_as_the_disk_was_when_it_was_taken() {
    // The fake ARM's SAS URLs point at tests/standins/fake_blob_diff.py in front of Azurite: every blob call
    // passes through it, and it answers the page-range diff Azurite lacks (Azure/Azurite#812).
    let front_dir = util::tmpdir();
    let mut fc = Command::new("python3");
    fc.arg(azure_util::script("fake_blob_diff.py")).args([
        "--upstream",
        &azure_util::azurite_url(),
        "--log",
        s(&front_dir.path().join("diff.jsonl")),
    ]);
    let (front, port) = azure_util::spawn_port(fc);
    let _front = Killed(front);
    let base = format!("http://127.0.0.1:{port}");
    let env = azure_util::Env::start("azsnap", &["--blob-base", &base], None);
    let d = env.path();
    let raw = disk(
        d,
        "az.raw",
        24 * MIB,
        &[(0, MIB), (17 * MIB, 3 * MIB + 4096)],
    );
    let r = env.upload(&raw, "snapsrc", &["--hyper-v-generation", "V2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    take_snapshot(&env, "snapsrc", "snapsrc-1");
    // The disk changes after the snapshot: the snapshot keeps what the disk held when it was taken.
    env.damage("snapsrc", 512, 0x5a);
    let out = d.join("snap.qcow2");
    let mut c = env.cmd();
    c.args([
        "convert",
        "-O",
        "qcow2",
        &format!("azure:snapshot/{}/snapsrc-1", azure_util::RG),
        s(&out),
    ])
    .args([
        "--subscription",
        azure_util::SUB,
        "--arm-endpoint",
        &env.arm_url(),
    ]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    qemu_img(&["check", "-f", "qcow2", s(&out)]);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&out)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // The snapshot's read grant was asked for and ended; none is left open.
    let posts = |action: &str| {
        env.records()
            .iter()
            .filter(|r| {
                r["method"] == "POST"
                    && r["path"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!("/snapshots/snapsrc-1/{action}"))
            })
            .count()
    };
    assert_eq!(posts("beginGetAccess"), 1);
    assert_eq!(posts("endGetAccess"), 1);
    assert!(open_grants(&env).is_empty(), "{:?}", open_grants(&env));

    // A snapshot that does not exist: one line naming it.
    let mut c = env.cmd();
    c.args([
        "info",
        &format!("azure:snapshot/{}/nosuch", azure_util::RG),
        "--subscription",
        azure_util::SUB,
        "--arm-endpoint",
        &env.arm_url(),
    ]);
    let r = run(c);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("no snapshot nosuch"), "{}", r.stderr);

    // The chain replicate uses (issue 23): a second incremental snapshot after the change, the two snapshots'
    // read SAS from the fake ARM, and Get Page Ranges with x-ms-previous-snapshot-url lists exactly the page
    // that changed; a snapshot of another disk is refused (409 PreviousSnapshotNotFound).
    take_snapshot(&env, "snapsrc", "snapsrc-2");
    let (s1, s2) = (
        snapshot_sas(&env, "snapsrc-1"),
        snapshot_sas(&env, "snapsrc-2"),
    );
    let diff = |prev: &str| {
        let o = Command::new("curl")
            .args(["-sS", "-H", "x-ms-version: 2025-01-05"])
            .args(["-H", &format!("x-ms-previous-snapshot-url: {prev}")])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("{s2}&comp=pagelist"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let listed = diff(&s1);
    assert!(listed.ends_with("\n200"), "{listed}");
    assert!(
        listed.contains(
            "<PageList><PageRange><Start>512</Start><End>1023</End></PageRange><NextMarker"
        ),
        "{listed}"
    );
    let raw2 = disk(d, "other.raw", 20 * MIB, &[(0, MIB)]);
    let r = env.upload(&raw2, "otherdisk", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    take_snapshot(&env, "otherdisk", "other-1");
    let refused = diff(&snapshot_sas(&env, "other-1"));
    assert!(
        refused.ends_with("\n409") && refused.contains("PreviousSnapshotNotFound"),
        "{refused}"
    );
}

#[test]
fn jobs_cancel_ends_the_read_grant_a_killed_migrate_left_open() {
    // Issue 22: "endGetAccess always called ... on `jobs cancel` (the grant is recorded in the journal like any
    // resource)". A migrate from an Azure disk to AWS is killed (SIGKILL: no destructor runs) while it reads
    // and sends; the fake ARM still holds the disk's read grant; `jobs cancel` ends it.
    let env = azure_util::Env::start("grantcancel", &[], None);
    let d = env.path();
    let raw = disk(d, "g.raw", 64 * MIB, &[(0, 8 * MIB), (40 * MIB, 12 * MIB)]);
    let r = env.upload(&raw, "grant-src", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state = d.join("mstate");
    let mut c = env.cmd();
    with_aws(&mut c, d);
    c.args([
        "migrate",
        &format!("azure:disk/{}/grant-src", azure_util::RG),
        "--to",
        "aws",
        "--endpoint-url",
        &moto_url(),
    ])
    .args(["--source-subscription", azure_util::SUB])
    .args(["--source-arm-endpoint", &env.arm_url()])
    .args(["--name", "grantcancel", "--state-dir", s(&state), "--yes"])
    .args(["--force", "--concurrency", "1", "--output", "json"])
    .env("IMGSHIFT_TEST_PAUSE_AT", "upload-saved")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("imgshift-test: paused at upload-saved") => break,
            Some(Ok(_)) => {}
            _ => panic!("the migrate ended before pausing mid-copy"),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        open_grants(&env),
        ["disks/grant-src"],
        "the killed run's grant is open"
    );

    let mut c = env.cmd();
    with_aws(&mut c, d);
    c.args(["jobs", "--output", "json", "--state-dir", s(&state)]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let job = listed[0]["id"].as_str().unwrap().to_string();
    let grant_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/grant-src",
        azure_util::SUB,
        azure_util::RG
    );
    assert!(
        listed[0]["resources"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"kind": "azure-read-grant", "id": grant_id})),
        "{listed}"
    );

    let mut c = env.cmd();
    with_aws(&mut c, d);
    c.args(["jobs", "cancel", &job, "--state-dir", s(&state)]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("ended read access to disk grant-src"),
        "{}",
        r.stdout
    );
    assert!(open_grants(&env).is_empty(), "{:?}", open_grants(&env));
}

#[test]
fn a_cloud_to_cloud_migrate_killed_mid_copy_resumes_into_one_disk() {
    let env = azure_util::Env::start("c2cresume", &[], None);
    let d = env.path();
    let raw = disk(
        d,
        "src.raw",
        64 * MIB,
        &[(0, 8 * MIB), (40 * MIB, 12 * MIB)],
    );
    let snap = snapshot_of(d, &raw);
    let cmd = || {
        let mut c = env.cmd();
        with_aws(&mut c, d);
        c.args(["migrate", &format!("aws:{snap}"), "--to", "azure"])
            .args(["--source-endpoint-url", &moto_url()])
            .args([
                "--subscription",
                azure_util::SUB,
                "--resource-group",
                azure_util::RG,
            ])
            .args(["--location", "westeurope", "--arm-endpoint", &env.arm_url()])
            .args(["--name", "c2c", "--state-dir", s(&d.join("state")), "--yes"])
            .args(["--force", "--concurrency", "1", "--output", "json"]);
        c
    };
    // Killed (SIGKILL) after the first windows were acknowledged and saved.
    let mut child = cmd()
        .env("IMGSHIFT_TEST_PAUSE_AT", "upload-saved")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("imgshift-test: paused at upload-saved") => break,
            Some(Ok(_)) => {}
            _ => panic!("the migrate ended before pausing mid-copy"),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The rerun continues the same job into the same disk, and finishes.
    let r = run(cmd());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["resumed"], true, "{v}");
    let (disks, resources) = env.held();
    assert_eq!(disks, ["c2c-os"]);
    assert_eq!(resources, ["images/c2c"]);
    azure_util::check_blob(&env, "c2c-os", &raw_padded(d, &raw, 1 << 30), 1 << 30);
}

/// `raw` padded with zeros to `size` (an EBS snapshot is whole GiB).
fn raw_padded(dir: &Path, raw: &Path, size: u64) -> PathBuf {
    let out = dir.join("padded.raw");
    std::fs::copy(raw, &out).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .unwrap()
        .set_len(size)
        .unwrap();
    out
}

#[test]
fn a_read_sas_that_expires_mid_copy_is_renewed() {
    // The fake ARM's second grant (the convert's read SAS) lasts 1 s; every blob request of this disk is held
    // 400 ms by the proxy in front of Azurite, so the copy (properties, footer, page ranges, then the data)
    // always outlives its SAS, and exactly one renewal follows.
    let env = azure_util::Env::start(
        "sasrenew",
        &["--sas-ttl", "3600,1,3600"],
        Some(&["--fault-path", "renew-disk", "--delay-ms", "400"]),
    );
    let d = env.path();
    let raw = disk(d, "r.raw", 24 * MIB, &[(0, 4 * MIB), (16 * MIB, 8 * MIB)]);
    let r = env.upload(&raw, "renew-disk", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = d.join("back.qcow2");
    let mut c = env.cmd();
    c.args([
        "convert",
        "-O",
        "qcow2",
        &format!("azure:disk/{}/renew-disk", azure_util::RG),
    ])
    .arg(s(&out))
    .args([
        "--subscription",
        azure_util::SUB,
        "--arm-endpoint",
        &env.arm_url(),
    ]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&out)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let posts = |action: &str| {
        env.records()
            .iter()
            .filter(|r| {
                r["method"] == "POST"
                    && r["path"].as_str().unwrap().contains("/disks/renew-disk/")
                    && r["path"].as_str().unwrap().ends_with(action)
            })
            .count()
    };
    // The upload's write grant, the convert's read grant and its renewal; endGetAccess ends every grant of the
    // disk at once (the upload's, and the convert's at the end).
    assert_eq!(posts("beginGetAccess"), 3);
    assert_eq!(posts("endGetAccess"), 2);
}

/// The README's cloud-to-cloud example, against the stand-ins: a UEFI test guest's AMI to an Azure image, human
/// report on standard output. Run by hand (`cargo test --test cloud_sources readme -- --ignored --nocapture`).
#[test]
#[ignore]
fn readme_example_ami_to_azure() {
    let env = azure_util::Env::start("readme", &[], None);
    let d = env.path();
    let guest = d.join("web01.raw");
    let mk = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/mkguest.sh"))
        .args(["uefi", s(&guest), "1024"])
        .output()
        .unwrap();
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let snap = snapshot_of(d, &guest);
    let ami = ec2_py(&format!(
        "print(c.register_image(Name='web01-{}',RootDeviceName='/dev/xvda',Architecture='x86_64',BootMode='uefi',\
         EnaSupport=True,BlockDeviceMappings=[{{'DeviceName':'/dev/xvda','Ebs':{{'SnapshotId':'{snap}'}}}}])['ImageId'])",
        std::process::id()
    ))
    .trim()
    .to_string();
    let mut c = env.cmd();
    with_aws(&mut c, d);
    c.args(["migrate", &format!("aws:{ami}"), "--to", "azure"])
        .args(["--source-endpoint-url", &moto_url()])
        .args([
            "--subscription",
            azure_util::SUB,
            "-g",
            azure_util::RG,
            "-l",
            "westeurope",
        ])
        .args(["--arm-endpoint", &env.arm_url(), "--name", "web01"])
        .args(["--state-dir", s(&d.join("state")), "--yes"]);
    let r = run(c);
    println!("{}", r.stdout);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_libvirt_volume_is_read_in_place_and_migrates_to_aws() {
    let d = tmpdir();
    let pool = util::libvirt::Pool::new();
    let raw = disk(
        d.path(),
        "lv.raw",
        48 * MIB,
        &[(0, 2 * MIB), (33 * MIB, 5 * MIB)],
    );
    let r = pool.upload(&raw, "lvsrc.qcow2", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let src = format!("libvirt:{}/lvsrc.qcow2", pool.name);
    let uri = util::libvirt::uri();

    // convert: the qcow2 volume read over download streams under imgshift's own qcow2 reader.
    let out = d.path().join("back.vmdk");
    let r = imgshift_aws(
        d.path(),
        &["convert", "-O", "vmdk", &src, s(&out), "--connect", &uri],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&out)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // migrate to AWS: the snapshot holds the same bytes.
    let name = format!("fromlibvirt-{}", std::process::id());
    let r = imgshift_aws(
        d.path(),
        &[
            "migrate",
            &src,
            "--to",
            "aws",
            "--source-connect",
            &uri,
            "--endpoint-url",
            &moto_url(),
            "--name",
            &name,
            "--state-dir",
            s(&d.path().join("state")),
            "--yes",
            "--force",
            "--output",
            "json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let snap = v["outputs"]["snapshot_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let back = d.path().join("snap.raw");
    let r = imgshift_aws(
        d.path(),
        &[
            "convert",
            "-O",
            "raw",
            &format!("aws:{snap}"),
            s(&back),
            "--endpoint-url",
            &moto_url(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", s(&raw), s(&back)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // A volume that is not there, and a malformed name, are one-line errors.
    let r = imgshift_aws(
        d.path(),
        &[
            "info",
            &format!("libvirt:{}/nope.qcow2", pool.name),
            "--connect",
            &uri,
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("no volume 'nope.qcow2'"), "{}", r.stderr);
    let r = imgshift_aws(d.path(), &["info", "libvirt:justapool"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("libvirt:POOL/VOLUME"), "{}", r.stderr);
}
