//! `imgshift replicate` (issue 23): recovery points that hold only what changed, checked against qemu-img.
//!
//! A bootable test guest is replicated, 1 % of its blocks are changed with qemu-io (some written, some zeroed),
//! and the next run must read the source once, send at most one replication block (512 KiB) per changed range,
//! and make a point that reads back equal to the changed guest while point 1 still equals the original. Then:
//! a run with nothing changed makes no point; the local state deleted, the next run continues from the hashes
//! kept with the replica; kill -9 while a point is written, the rerun completes that same point (no duplicate,
//! nothing left behind); `--keep` drops the oldest point and the next one keeps its content.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use util::libvirt::mkguest;
use util::{assert_check_clean, imgshift, imgshift_bin, qemu_img, qemu_io, s, tmpdir};

const BLOCK: u64 = 512 * 1024;
const MIB: u64 = 1 << 20;

fn replicate(src: &Path, dir: &Path, state: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "replicate",
        s(src),
        "--to",
        "file",
        "--dir",
        s(dir),
        "--name",
        "web",
        "--state-dir",
        s(state),
        "--output",
        "json",
        "-f",
        "raw",
    ];
    args.extend_from_slice(extra);
    let r = imgshift(&args).ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn points(dir: &Path) -> Vec<serde_json::Value> {
    let r = imgshift(&[
        "replicate",
        "points",
        "web",
        "--to",
        "file",
        "--dir",
        s(dir),
        "--output",
        "json",
    ])
    .ok();
    serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout).unwrap()
}

fn same(a: &Path, fa: &str, b: &Path) {
    let out = qemu_img(&["compare", "-f", fa, "-F", "qcow2", s(a), s(b)]);
    assert!(
        out.contains("identical"),
        "{} vs {}: {out}",
        a.display(),
        b.display()
    );
}

fn copy(a: &Path, b: &Path) {
    assert!(
        Command::new("cp")
            .args(["--sparse=always", s(a), s(b)])
            .status()
            .unwrap()
            .success()
    );
}

/// Bytes of the replication blocks that hold data (what hashing the source reads).
fn data_bytes(img: &Path) -> u64 {
    let map: Vec<serde_json::Value> =
        serde_json::from_str(&qemu_img(&["map", "--output", "json", "-f", "raw", s(img)])).unwrap();
    let blocks: std::collections::BTreeSet<u64> = map
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .flat_map(|e| {
            let (a, n) = (u(e, "start"), u(e, "length"));
            (a / BLOCK)..(a + n).div_ceil(BLOCK)
        })
        .collect();
    blocks.len() as u64 * BLOCK
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn file_replica_points_hold_only_what_changed() {
    let t = tmpdir();
    let g = t.path().join("guest.raw");
    mkguest("bios", &g);
    qemu_img(&["resize", "-f", "raw", s(&g), "256M"]);
    // Two ranges of data that the next change zeroes again.
    qemu_io(
        "raw",
        &g,
        &["write -P 0x11 100M 128k", "write -P 0x12 180M 64k"],
    );
    let dir = t.path().join("dr");
    let state = t.path().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    let orig = t.path().join("orig.raw");
    copy(&g, &orig);

    let first = replicate(&g, &dir, &state, &[]);
    assert_eq!(first["point"]["number"], 1);
    assert_eq!(first["detection"], "full");
    let p1 = dir.join("web.1.qcow2");
    assert_check_clean(&p1, "qcow2");
    same(&orig, "raw", &p1);
    assert!(u(&first, "bytes_read") <= data_bytes(&g), "{first}");

    // 1 % of the blocks: five written ranges and two zeroed ones, each inside one block.
    let changes = [
        "write -P 0x5a 1M 64k",
        "write -P 0x5b 30M 4k",
        "write -P 0x5c 64M 64k",
        "write -P 0x5d 150M 128k",
        "write -P 0x5e 250M 64k",
        "write -z 100M 128k",
        "write -z 180M 64k",
    ];
    qemu_io("raw", &g, &changes);
    let changed = t.path().join("changed.raw");
    copy(&g, &changed);
    let second = replicate(&g, &dir, &state, &[]);
    assert_eq!(second["point"]["number"], 2);
    assert_eq!(second["detection"], "hashes");
    let ranges = changes.len() as u64;
    assert!(u(&second, "changed_bytes") <= ranges * BLOCK, "{second}");
    assert!(u(&second, "sent_bytes") <= ranges * BLOCK, "{second}");
    // The source is read once to hash it, plus the changed blocks to write them.
    assert!(
        u(&second, "bytes_read") <= data_bytes(&g) + ranges * BLOCK + 2 * BLOCK,
        "{second}"
    );
    let p2 = dir.join("web.2.qcow2");
    assert_check_clean(&p2, "qcow2");
    same(&changed, "raw", &p2);
    same(&orig, "raw", &p1);
    let info = qemu_img(&["info", "--output", "json", s(&p2)]);
    assert!(
        info.contains("\"backing-filename\": \"web.1.qcow2\""),
        "{info}"
    );

    // Nothing changed: no point.
    let third = replicate(&g, &dir, &state, &[]);
    assert!(third["point"].is_null(), "{third}");
    assert_eq!(points(&dir).len(), 2);

    // The local state lost: the hashes kept beside the points serve, nothing is sent again in full.
    std::fs::remove_dir_all(&state).unwrap();
    qemu_io("raw", &g, &["write -P 0x61 40M 64k"]);
    let fourth = replicate(&g, &dir, &state, &[]);
    assert_eq!(fourth["point"]["number"], 3);
    assert_eq!(fourth["detection"], "hashes");
    assert!(u(&fourth, "sent_bytes") <= BLOCK, "{fourth}");
    let at3 = t.path().join("at3.raw");
    copy(&g, &at3);

    // kill -9 while point 4 is written; the rerun completes point 4 and leaves no temporary file.
    qemu_io("raw", &g, &["write -P 0x62 41M 64k"]);
    let mut c = Command::new(imgshift_bin());
    c.args([
        "replicate",
        s(&g),
        "-f",
        "raw",
        "--to",
        "file",
        "--dir",
        s(&dir),
    ])
    .args(["--name", "web", "--state-dir", s(&state)]);
    kill_at_pause(c, "replicate-point-written");
    let fifth = replicate(&g, &dir, &state, &[]);
    assert_eq!(fifth["point"]["number"], 4);
    let list = points(&dir);
    let numbers: Vec<u64> = list.iter().map(|p| u(p, "number")).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4]);
    let leftovers: Vec<String> = util::files_in(&dir)
        .into_iter()
        .filter(|f| f.ends_with(".imgshift-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    same(&g, "raw", &dir.join("web.4.qcow2"));
    let at4 = t.path().join("at4.raw");
    copy(&g, &at4);

    // --keep 2: points 1..3 go, point 4 becomes self-contained with its content, point 5 builds on it.
    qemu_io("raw", &g, &["write -P 0x63 42M 64k"]);
    let sixth = replicate(&g, &dir, &state, &["--keep", "2"]);
    assert_eq!(sixth["point"]["number"], 5);
    assert_eq!(sixth["deleted"], serde_json::json!([1, 2, 3]));
    let numbers: Vec<u64> = points(&dir).iter().map(|p| u(p, "number")).collect();
    assert_eq!(numbers, vec![4, 5]);
    for gone in ["web.1.qcow2", "web.2.qcow2", "web.3.qcow2"] {
        assert!(!dir.join(gone).exists(), "{gone} kept");
    }
    let p4 = dir.join("web.4.qcow2");
    assert!(!qemu_img(&["info", s(&p4)]).contains("backing file"));
    assert_check_clean(&p4, "qcow2");
    same(&at4, "raw", &p4);
    same(&g, "raw", &dir.join("web.5.qcow2"));
    let _ = at3;
    let _ = MIB;
}

#[test]
fn replicate_refuses_bad_names_and_missing_folders() {
    let t = tmpdir();
    let g = t.path().join("g.raw");
    std::fs::write(&g, vec![1u8; 1 << 20]).unwrap();
    let r = imgshift(&[
        "replicate",
        s(&g),
        "--to",
        "file",
        "--dir",
        s(t.path()),
        "--name",
        "../x",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("replica name '../x'"), "{}", r.stderr);
    let r = imgshift(&[
        "replicate",
        s(&g),
        "--to",
        "file",
        "--dir",
        s(&t.path().join("nope")),
        "--name",
        "x",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);
    let r = imgshift(&["replicate", s(&g), "--to", "file", "--name", "x"]);
    assert!(r.stderr.contains("--to file needs --dir"), "{}", r.stderr);
}

/// libvirt: points are qcow2 volumes in a pool, each over the previous; the state and hashes live in the pool
/// too, so a lost state folder costs nothing; failover defines a domain over an overlay of a point, which boots.
#[test]
fn libvirt_replica_points_and_failover_boot() {
    use util::libvirt::{Pool, boot_marker, tail, uri, virsh_ok, wait_shut_off};
    let t = tmpdir();
    let mut pool = Pool::new();
    let conn = uri();
    let g = t.path().join("guest.raw");
    mkguest("bios", &g);
    // Room past the guest's partitions to change without touching its file systems.
    qemu_img(&["resize", "-f", "raw", s(&g), "96M"]);
    let orig = t.path().join("orig.raw");
    copy(&g, &orig);
    let state = t.path().join("state");
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "replicate",
            s(&g),
            "-f",
            "raw",
            "--to",
            "libvirt",
            "-c",
            &conn,
            "--pool",
            &pool.name,
            "--name",
            "lv",
            "--state-dir",
            s(&state),
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let r = imgshift(&args).ok();
        serde_json::from_str(&r.stdout).unwrap()
    };
    let first = run(&[]);
    assert_eq!(first["point"]["number"], 1);
    assert_eq!(
        first["point"]["guest"]["targets"]["libvirt"]["settings"]["bus"], "virtio",
        "{first}"
    );
    same(&orig, "raw", &pool.path("lv.1.qcow2"));

    qemu_io(
        "raw",
        &g,
        &["write -P 0x71 70M 64k", "write -P 0x72 90M 64k"],
    );
    let second = run(&[]);
    assert_eq!(second["point"]["number"], 2);
    assert!(u(&second, "sent_bytes") <= 2 * BLOCK, "{second}");
    same(&g, "raw", &pool.path("lv.2.qcow2"));
    same(&orig, "raw", &pool.path("lv.1.qcow2"));

    // The state folder lost: the pool's state and hashes serve (no full re-send), and `points` finds the
    // replica from the options.
    std::fs::remove_dir_all(&state).unwrap();
    qemu_io("raw", &g, &["write -P 0x73 80M 64k"]);
    let third = run(&[]);
    assert_eq!(third["point"]["number"], 3);
    assert_eq!(third["detection"], "hashes");
    assert!(u(&third, "sent_bytes") <= BLOCK, "{third}");

    // kill -9 while point 4 is written: the rerun makes point 4 once.
    qemu_io("raw", &g, &["write -P 0x74 81M 64k"]);
    let mut c = Command::new(imgshift_bin());
    c.args([
        "replicate",
        s(&g),
        "-f",
        "raw",
        "--to",
        "libvirt",
        "-c",
        &conn,
        "--pool",
        &pool.name,
    ])
    .args(["--name", "lv", "--state-dir", s(&state)]);
    kill_at_pause(c, "replicate-point-written");
    let fourth = run(&[]);
    assert_eq!(fourth["point"]["number"], 4);
    let pts = imgshift(&[
        "replicate",
        "points",
        "lv",
        "--state-dir",
        s(&state),
        "--output",
        "json",
    ])
    .ok();
    let pts: Vec<serde_json::Value> = serde_json::from_str(&pts.stdout).unwrap();
    assert_eq!(
        pts.iter().map(|p| u(p, "number")).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let vols = pool.volumes();
    assert_eq!(
        vols.iter().filter(|v| v.ends_with(".qcow2")).count(),
        4,
        "{vols:?}"
    );
    same(&g, "raw", &pool.path("lv.4.qcow2"));

    // --keep is refused for a chain of volumes.
    let r = imgshift(&[
        "replicate",
        s(&g),
        "-f",
        "raw",
        "--to",
        "libvirt",
        "-c",
        &conn,
        "--pool",
        &pool.name,
        "--name",
        "lv",
        "--keep",
        "2",
    ]);
    assert_eq!(r.code, 2, "{r:?}");

    // Failover from point 1 (not started): the domain's disk reads as point 1 and the point is untouched.
    let d1 = pool.domain();
    let r = imgshift(&[
        "failover",
        "lv",
        "--point",
        "1",
        "--domain",
        &d1,
        "--state-dir",
        s(&state),
        "--output",
        "json",
    ])
    .ok();
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["point"], 1);
    assert_eq!(j["disk_bus"], "virtio", "{j}");
    let overlay = pool.path(&format!("{d1}.qcow2"));
    same(&orig, "raw", &overlay);
    let x = virsh_ok(&["dumpxml", "--inactive", &d1]);
    assert!(x.contains(&format!("volume='{d1}.qcow2'")), "{x}");

    // Failover from the newest point, started: it boots under TCG to its marker.
    let d2 = pool.domain();
    let log = pool.path("serial.log");
    imgshift(&[
        "failover",
        "lv",
        "--domain",
        &d2,
        "--state-dir",
        s(&state),
        "--domain-type",
        "qemu",
        "--memory",
        "512",
        "--serial-log",
        s(&log),
        "--start",
    ])
    .ok();
    wait_shut_off(&d2, &log, 240);
    let text = tail(&log);
    assert!(text.contains(&boot_marker("bios")), "{text}");
    same(&g, "raw", &pool.path("lv.4.qcow2"));
}

mod aws {
    use super::*;
    use util::aws::{aws_cmd, moto_url, run, venv_python};

    fn cmd(dir: &Path, args: &[&str]) -> util::Run {
        let mut c = aws_cmd(dir);
        c.args(args).args(["--endpoint-url", &moto_url()]);
        run(c)
    }

    fn ok_json(r: util::Run) -> serde_json::Value {
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }

    /// Reads snapshot (or AMI) `id` back into a raw file.
    fn read_back(dir: &Path, id: &str, out: &Path) {
        let r = cmd(dir, &["convert", "-O", "raw", &format!("aws:{id}"), s(out)]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }

    /// The replica's snapshots in moto: (id, state, point tag).
    fn snapshots(name: &str) -> Vec<(String, String, String)> {
        let out = util::aws::ec2_py(&format!(
            "r=c.describe_snapshots(OwnerIds=['self'],Filters=[{{'Name':'tag:imgshift:replica','Values':['{name}']}}])\n\
             for s in r['Snapshots']:\n\
             \x20 t={{x['Key']:x['Value'] for x in s.get('Tags',[])}}\n\
             \x20 print(s['SnapshotId'],s['State'],t.get('imgshift:point','-'))"
        ));
        out.lines()
            .map(|l| {
                let v: Vec<&str> = l.split_whitespace().collect();
                (v[0].to_string(), v[1].to_string(), v[2].to_string())
            })
            .collect()
    }

    #[test]
    fn a_guest_replicated_to_ebs_snapshots_sends_only_changes_and_fails_over_to_an_ami() {
        let t = tmpdir();
        let d = t.path();
        let name = util::libvirt::unique("awsrep");
        let g = d.join("guest.raw");
        mkguest("bios", &g);
        qemu_img(&["resize", "-f", "raw", s(&g), "96M"]);
        let orig = d.join("orig.raw");
        copy(&g, &orig);
        let state = d.join("state");
        let rep = |extra: &[&str]| -> serde_json::Value {
            let mut a = vec![
                "replicate",
                s(&g),
                "-f",
                "raw",
                "--to",
                "aws",
                "--name",
                &name,
                "--state-dir",
                s(&state),
                "--output",
                "json",
            ];
            a.extend_from_slice(extra);
            ok_json(cmd(d, &a))
        };
        let first = rep(&[]);
        assert_eq!(first["point"]["number"], 1, "{first}");
        let snap1 = first["point"]["target_id"].as_str().unwrap().to_string();
        let back1 = d.join("back1.raw");
        read_back(d, &snap1, &back1);
        same_raw(&orig, &back1);

        qemu_io(
            "raw",
            &g,
            &["write -P 0x71 70M 64k", "write -P 0x72 90M 4k"],
        );
        let changed = d.join("changed.raw");
        copy(&g, &changed);
        let second = rep(&[]);
        assert_eq!(second["point"]["number"], 2);
        assert_eq!(second["detection"], "hashes");
        assert!(u(&second, "sent_bytes") <= 2 * BLOCK, "{second}");
        let snap2 = second["point"]["target_id"].as_str().unwrap().to_string();
        let back2 = d.join("back2.raw");
        read_back(d, &snap2, &back2);
        same_raw(&changed, &back2);
        // Point 1 still holds the original.
        read_back(d, &snap1, &back1);
        same_raw(&orig, &back1);

        // kill -9 after the blocks of point 3 are put, before CompleteSnapshot: the rerun completes point 3,
        // and no snapshot of the replica is left pending.
        qemu_io("raw", &g, &["write -P 0x73 80M 64k"]);
        let mut c = aws_cmd(d);
        c.args([
            "replicate",
            s(&g),
            "-f",
            "raw",
            "--to",
            "aws",
            "--name",
            &name,
        ])
        .args(["--state-dir", s(&state), "--endpoint-url", &moto_url()]);
        kill_at_pause(c, "replicate-point-written");
        let third = rep(&[]);
        assert_eq!(third["point"]["number"], 3);
        let snaps = snapshots(&name);
        assert_eq!(snaps.len(), 3, "{snaps:?}");
        assert!(
            snaps.iter().all(|(_, st, _)| st == "completed"),
            "{snaps:?}"
        );
        // A completed point leaves no journal behind.
        let left: Vec<String> = util::files_in(&state.join("replicas"))
            .into_iter()
            .filter(|f| f.contains("aws-point"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let snap3 = third["point"]["target_id"].as_str().unwrap().to_string();
        let back3 = d.join("back3.raw");
        read_back(d, &snap3, &back3);
        same_raw(&g, &back3);

        // The state folder lost: the points come from the snapshots' tags, the last one is read back to hash
        // (reading, not sending), and only the change is sent.
        std::fs::remove_dir_all(&state).unwrap();
        qemu_io("raw", &g, &["write -P 0x74 81M 64k"]);
        let fourth = rep(&[]);
        assert_eq!(fourth["point"]["number"], 4, "{fourth}");
        assert_eq!(fourth["detection"], "hashes");
        assert!(u(&fourth, "sent_bytes") <= BLOCK, "{fourth}");

        // --keep 2: the oldest snapshots go (each snapshot is complete on its own).
        qemu_io("raw", &g, &["write -P 0x75 82M 64k"]);
        let fifth = rep(&["--keep", "2"]);
        assert_eq!(fifth["deleted"], serde_json::json!([1, 2, 3]), "{fifth}");
        let left: Vec<String> = snapshots(&name).into_iter().map(|s| s.2).collect();
        let mut left = left;
        left.sort();
        assert_eq!(left, vec!["4", "5"]);
        let pts = ok_json(cmd(
            d,
            &[
                "replicate",
                "points",
                &name,
                "--state-dir",
                s(&state),
                "--output",
                "json",
            ],
        ));
        assert_eq!(pts.as_array().unwrap().len(), 2, "{pts}");

        // Failover from point 4: an AMI whose root snapshot is the point's, boot mode from inspection.
        let fo = ok_json(cmd(
            d,
            &[
                "failover",
                &name,
                "--point",
                "4",
                "--state-dir",
                s(&state),
                "--output",
                "json",
            ],
        ));
        let ami = fo["image"].as_str().unwrap().to_string();
        let img = util::aws::ec2_py(&format!(
            "i=c.describe_images(ImageIds=['{ami}'])['Images'][0]\n\
             print(i['BlockDeviceMappings'][0]['Ebs']['SnapshotId'], i.get('BootMode','-'))"
        ));
        let want4 = fourth["point"]["target_id"].as_str().unwrap();
        assert_eq!(
            img.split_whitespace().collect::<Vec<_>>(),
            vec![want4, "legacy-bios"],
            "{img}"
        );
        // A rerun adopts the AMI of that name instead of registering a second.
        let again = ok_json(cmd(
            d,
            &[
                "failover",
                &name,
                "--point",
                "4",
                "--state-dir",
                s(&state),
                "--output",
                "json",
            ],
        ));
        assert_eq!(again["image"], fo["image"]);
        let _ = venv_python;
    }

    /// EBS → EBS: a snapshot series of one volume (made with boto3 through the corrected stand-in); the second
    /// run reads only the blocks ListChangedBlocks lists.
    #[test]
    fn a_snapshot_series_replicates_reading_only_the_changed_blocks() {
        let t = tmpdir();
        let d = t.path();
        let name = util::libvirt::unique("ebs2ebs");
        let out = Command::new(venv_python())
            .arg("-c")
            .arg(format!(
                "import boto3,hashlib,base64\n\
                 e=boto3.client('ebs',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
                 B=524288\n\
                 def put(s,i,b):\n\
                 \x20 d=bytes([b])*B\n\
                 \x20 e.put_snapshot_block(SnapshotId=s,BlockIndex=i,BlockData=d,DataLength=B,ChecksumAlgorithm='SHA256',Checksum=base64.b64encode(hashlib.sha256(d).digest()).decode())\n\
                 p=e.start_snapshot(VolumeSize=1)['SnapshotId']\n\
                 for i in range(0,40,2): put(p,i,1+i)\n\
                 e.complete_snapshot(SnapshotId=p,ChangedBlocksCount=20)\n\
                 k=e.start_snapshot(VolumeSize=1,ParentSnapshotId=p)['SnapshotId']; put(k,2,200); put(k,41,201)\n\
                 e.complete_snapshot(SnapshotId=k,ChangedBlocksCount=2)\n\
                 print(p,k)",
                moto_url()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids = String::from_utf8_lossy(&out.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        let (p, k) = (ids[0], ids[1]);
        let state = d.join("state");
        let rep = |src: &str| -> serde_json::Value {
            ok_json(cmd(
                d,
                &[
                    "replicate",
                    &format!("aws:{src}"),
                    "--to",
                    "aws",
                    "--name",
                    &name,
                    "--state-dir",
                    s(&state),
                    "--output",
                    "json",
                    "--source-endpoint-url",
                    &moto_url(),
                ],
            ))
        };
        let first = rep(p);
        assert_eq!(first["point"]["number"], 1);
        assert_eq!(first["point"]["source_snapshot"], p);
        let second = rep(k);
        assert_eq!(second["detection"], "ebs-changed-blocks", "{second}");
        assert_eq!(u(&second, "changed_bytes"), 2 * BLOCK, "{second}");
        assert_eq!(u(&second, "bytes_read"), 2 * BLOCK, "{second}");
        assert_eq!(u(&second, "sent_bytes"), 2 * BLOCK, "{second}");
        let (a, b) = (d.join("k.raw"), d.join("p2.raw"));
        read_back(d, k, &a);
        read_back(d, second["point"]["target_id"].as_str().unwrap(), &b);
        same_raw(&a, &b);
        // The same snapshot again: nothing changed, no point.
        let third = rep(k);
        assert!(third["point"].is_null(), "{third}");
    }
}

/// Runs `c` until it pauses at `point` (the debug build's test hook), then kills it with SIGKILL.
fn kill_at_pause(mut c: Command, point: &str) {
    c.env("IMGSHIFT_TEST_PAUSE_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains(&format!("paused at {point}")) {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the run ended before pausing at {point}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn same_raw(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(a), s(b)]);
    assert!(
        out.contains("identical"),
        "{} vs {}: {out}",
        a.display(),
        b.display()
    );
}

/// A local qcow2 with a persistent dirty bitmap: once a point was made with `--bitmap`, the next run reads only
/// the clusters the bitmap marks (no hashing pass over the source).
#[test]
fn a_qcow2_dirty_bitmap_is_read_instead_of_hashing() {
    let t = tmpdir();
    let d = t.path();
    let raw = d.join("g.raw");
    mkguest("bios", &raw);
    let g = d.join("g.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&g)]);
    qemu_img(&["resize", "-f", "qcow2", s(&g), "96M"]);
    qemu_img(&["bitmap", "--add", s(&g), "b0"]);
    let dir = d.join("dr");
    std::fs::create_dir_all(&dir).unwrap();
    let state = d.join("state");
    let rep = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec![
            "replicate",
            s(&g),
            "--to",
            "file",
            "--dir",
            s(&dir),
            "--name",
            "bm",
            "--state-dir",
            s(&state),
            "--output",
            "json",
        ];
        a.extend_from_slice(extra);
        let r = imgshift(&a).ok();
        serde_json::from_str(&r.stdout).unwrap()
    };
    // Without --bitmap on the first point, the next run cannot trust the bitmap yet and hashes.
    let first = rep(&[]);
    assert_eq!(first["point"]["number"], 1);
    qemu_io("qcow2", &g, &["write -P 0x41 70M 64k"]);
    let second = rep(&["--bitmap", "b0"]);
    assert_eq!(second["detection"], "hashes", "{second}");
    assert!(
        second["warnings"][0]
            .as_str()
            .unwrap()
            .contains("--bitmap b0"),
        "{second}"
    );
    // Now the previous point was made with the bitmap: only what it marks is read (the bitmap, never cleared,
    // still marks 70M too: a superset of the changes is always safe).
    qemu_io(
        "qcow2",
        &g,
        &["write -P 0x42 80M 64k", "write -P 0x43 90M 4k"],
    );
    let third = rep(&["--bitmap", "b0"]);
    assert_eq!(third["detection"], "qcow2-bitmap", "{third}");
    assert!(u(&third, "bytes_read") <= 3 * BLOCK, "{third}");
    assert!(u(&third, "changed_bytes") <= 3 * BLOCK, "{third}");
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&g),
        s(&dir.join("bm.3.qcow2")),
    ]);
    assert!(out.contains("identical"), "{out}");
    // A bitmap that does not exist is named with the ones that do.
    let r = imgshift(&[
        "replicate",
        s(&g),
        "--to",
        "file",
        "--dir",
        s(&dir),
        "--name",
        "bm",
        "--state-dir",
        s(&state),
        "--bitmap",
        "nope",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("b0"), "{}", r.stderr);
}
