//! A cloud disk to libvirt (issue 22): `migrate aws:snap-… --to libvirt --start` reads the EBS snapshot in place
//! from moto (corrected by tests/standins/moto_launcher.py) and the domain it defines on the private libvirtd boots
//! under TCG to the test guest's marker. Stand-ins: `bash .ci/standins start`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::time::Instant;

use util::aws::{aws_cmd, moto_url, run};
use util::libvirt::*;
use util::{s, tmpdir};

#[test]
fn an_ebs_snapshot_migrates_to_a_libvirt_domain_that_boots() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = d.path().join("guest.raw");
    mkguest("bios", &raw);

    // The guest into moto as an EBS snapshot (EBS direct APIs: StartSnapshot, PutSnapshotBlock, Complete).
    let mut c = aws_cmd(d.path());
    c.args([
        "upload",
        "aws",
        s(&raw),
        "--snapshot-only",
        "--endpoint-url",
        &moto_url(),
        "--state-dir",
        s(&d.path().join("state-up")),
        "--output",
        "json",
    ]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let snap = v["snapshot_id"].as_str().unwrap().to_string();

    // Snapshot → volume + domain, started; nothing of the guest is written locally on the way.
    let name = pool.domain();
    let log = pool.path("serial.log");
    let t0 = Instant::now();
    let mut c = aws_cmd(d.path());
    c.args([
        "migrate",
        &format!("aws:{snap}"),
        "--source-endpoint-url",
        &moto_url(),
        "--to",
        "libvirt",
        "--connect",
        &uri(),
        "--pool",
        &pool.name,
        "--name",
        &name,
        "--domain-type",
        "qemu",
        "--memory",
        "512",
        "--serial-log",
        s(&log),
        "--start",
        "--yes",
        "--state-dir",
        s(&d.path().join("state")),
        "--output",
        "json",
    ]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["outputs"]["started"], true, "{}", r.stdout);
    // Inspection of the snapshot in place picked what the guest needs.
    assert_eq!(j["outputs"]["firmware"], "bios", "{}", r.stdout);
    assert_eq!(j["outputs"]["disk_bus"], "virtio", "{}", r.stdout);
    assert_eq!(
        j["outputs"]["volumes"],
        serde_json::json!([format!("{name}.qcow2")]),
        "{}",
        r.stdout
    );

    wait_shut_off(&name, &log, 180);
    let text = tail(&log);
    assert!(
        text.contains(&boot_marker("bios")),
        "no marker after {:?}; serial log tail: {text}",
        t0.elapsed()
    );
    eprintln!(
        "snapshot → libvirt: booted to the marker and shut off in {:?}",
        t0.elapsed()
    );
}
