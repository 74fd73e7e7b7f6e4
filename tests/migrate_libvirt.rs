//! `imgshift migrate --to libvirt` against the private libvirtd (`bash .ci/standins start`): a VMDK test guest
//! becomes a domain that boots under TCG; a two-disk OVA becomes two volumes on one domain; a job killed with
//! `kill -9` is finished by `resume` without resending a finished disk; `jobs cancel` removes exactly the job's
//! volumes and domain. Every test has its own transient pool and state folder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use util::libvirt::*;
use util::ova::*;
use util::*;

/// `imgshift migrate SRC --to libvirt` into `pool` under `name`, TCG, journals in `state`, JSON report.
fn migrate_args(pool: &Pool, src: &Path, name: &str, state: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "migrate",
        s(src),
        "--to",
        "libvirt",
        "--connect",
        &uri(),
        "--pool",
        &pool.name,
        "--name",
        name,
        "--domain-type",
        "qemu",
        "--yes",
        "--state-dir",
        s(state),
        "--output",
        "json",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn migrate(pool: &Pool, src: &Path, name: &str, state: &Path, extra: &[&str]) -> Run {
    let a = migrate_args(pool, src, name, state, extra);
    imgshift(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", r.stdout, r.stderr))
}

/// Runs the migration with `IMGSHIFT_TEST_PAUSE_AT=point`, waits for it to say it paused, and kills it with
/// SIGKILL. Returns the job id (the one journal in `state`).
fn migrate_and_kill(
    pool: &Pool,
    src: &Path,
    name: &str,
    state: &Path,
    extra: &[&str],
    point: &str,
) -> String {
    let mut child = Command::new(imgshift_bin())
        .args(migrate_args(pool, src, name, state, extra))
        .env("IMGSHIFT_TEST_PAUSE_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let want = format!("imgshift-test: paused at {point}");
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(&want) {
            break;
        }
    }
    // kill -9: no clean-up of any kind runs.
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(seen.contains(&want), "never paused at {point}: {seen}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{seen}"
    );
    job_in(state)
}

/// The id of the one job journal in `state`.
fn job_in(state: &Path) -> String {
    let jobs: Vec<String> = files_in(state)
        .into_iter()
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs[0].clone()
}

/// The defined domains called `name` (none or one).
fn domains_named(name: &str) -> Vec<String> {
    virsh_ok(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|d| *d == name)
        .map(str::to_string)
        .collect()
}

/// Downloads volume `vol` of `pool` and compares it with the raw `want` (qemu-img compare: same guest bytes).
fn assert_volume_is(pool: &Pool, vol: &str, fmt: &str, want: &Path, tmp: &Path) {
    let got = tmp.join(format!("back-{vol}"));
    pool.download(vol, &got);
    if fmt != "raw" {
        assert_check_clean(&got, fmt);
    }
    assert_same(want, "raw", &got, fmt);
}

/// (inode, mtime in ns) of a pool file: a volume deleted and made again gets a new inode.
fn identity(p: &PathBuf) -> (u64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec())
}

/// (a) A VMware export of the bootable BIOS test guest: inspection picks BIOS and virtio, the domain is defined
/// with the one volume, and started it boots under TCG to its marker.
#[test]
fn vmdk_guest_becomes_a_domain_that_boots() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = d.path().join("guest.raw");
    mkguest("bios", &raw);
    let vmdk = d.path().join("guest.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&raw), s(&vmdk)]);
    let state = d.path().join("state");
    let name = pool.domain();
    let log = pool.path("serial.log");
    let t0 = Instant::now();
    let r = migrate(
        &pool,
        &vmdk,
        &name,
        &state,
        &["--memory", "512", "--serial-log", s(&log), "--start"],
    )
    .ok();
    let j = json(&r);
    let vol = format!("{name}.qcow2");
    assert_eq!(j["target"], "libvirt", "{}", r.stdout);
    assert_eq!(j["outputs"]["domain"], name.as_str(), "{}", r.stdout);
    assert_eq!(
        j["outputs"]["volumes"],
        serde_json::json!([vol]),
        "{}",
        r.stdout
    );
    assert_eq!(j["outputs"]["firmware"], "bios", "{}", r.stdout);
    assert_eq!(j["outputs"]["disk_bus"], "virtio", "{}", r.stdout);
    assert_eq!(j["outputs"]["started"], true, "{}", r.stdout);
    let stages: Vec<&str> = j["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["inspect", "upload", "register", "verify"]);
    assert!(
        j["stages"][3]["result"]
            .as_str()
            .unwrap()
            .contains("identical"),
        "{}",
        r.stdout
    );
    // Only the data crossed the connection (the qcow2 output of a 64 MiB disk holding about 20 MB).
    let sent = j["bytes_sent"].as_u64().unwrap();
    assert!(
        sent > 0 && sent < j["virtual_size"].as_u64().unwrap(),
        "{sent}"
    );
    assert_eq!(pool.volumes(), vec![vol.clone()]);
    let x = virsh_ok(&["dumpxml", "--inactive", &name]);
    assert!(
        x.contains(&format!("<source pool='{}' volume='{vol}'/>", pool.name)),
        "{x}"
    );
    assert!(x.contains("<target dev='vda' bus='virtio'/>"), "{x}");
    // The journal is gone once the job is done.
    assert!(files_in(&state).iter().all(|f| !f.ends_with(".json")));

    wait_shut_off(&name, &log, 180);
    let text = tail(&log);
    assert!(
        text.contains(&boot_marker("bios")),
        "no marker after {:?}: {text}",
        t0.elapsed()
    );
    eprintln!("migrated guest booted to its marker in {:?}", t0.elapsed());
}

/// (b) A two-disk OVA (boot disk a streamOptimized VMDK, data disk a qcow2, listed data-first): two volumes,
/// both attached to one domain, boot disk first, each reading back equal to its source.
#[test]
fn two_disk_ova_becomes_two_volumes_on_one_domain() {
    let o = make_ova();
    let mut pool = Pool::new();
    let state = o.dir.join("state");
    let name = pool.domain();
    // The disks hold random data, not a guest: the preflight fails, --force goes on.
    let r = migrate(
        &pool,
        &o.ova,
        &name,
        &state,
        &["--force", "--disk-bus", "virtio"],
    )
    .ok();
    let j = json(&r);
    let (v0, v1) = (format!("{name}.qcow2"), format!("{name}-data1.qcow2"));
    assert_eq!(
        j["outputs"]["volumes"],
        serde_json::json!([v0, v1]),
        "{}",
        r.stdout
    );
    assert_eq!(j["disks"].as_array().unwrap().len(), 2);
    assert_eq!(pool.volumes(), {
        let mut v = vec![v0.clone(), v1.clone()];
        v.sort();
        v
    });
    assert_eq!(domains_named(&name), vec![name.clone()]);
    let x = virsh_ok(&["dumpxml", &name]);
    let a = x
        .find(&format!("volume='{v0}'"))
        .unwrap_or_else(|| panic!("{x}"));
    let b = x
        .find(&format!("volume='{v1}'"))
        .unwrap_or_else(|| panic!("{x}"));
    assert!(a < b, "boot disk first: {x}");
    assert!(
        x.contains("<target dev='vda' bus='virtio'/>")
            && x.contains("<target dev='vdb' bus='virtio'/>"),
        "{x}"
    );
    // Capacities: the disks' virtual sizes.
    for (v, size) in [(&v0, BOOT_SIZE), (&v1, DATA_SIZE)] {
        let vx = pool.vol_xml(v);
        assert!(
            vx.contains(&format!("<capacity unit='bytes'>{size}</capacity>")),
            "{vx}"
        );
    }
    assert_volume_is(&pool, &v0, "qcow2", &o.boot_raw, &o.dir);
    assert_volume_is(&pool, &v1, "qcow2", &o.data_raw, &o.dir);

    // The same command again is a new job that finds the names taken: refused before anything is created.
    let other = o.dir.join("state2");
    let r = migrate(&pool, &o.ova, &name, &other, &["--force"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("volume '{v0}' already exists")),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("libvirt: "), "{}", r.stderr);
    assert_eq!(pool.volumes().len(), 2);
}

/// (c) kill -9 after disk 0 was uploaded, and disk 1 left half made (as a kill in the middle of its stream
/// leaves it: on record and partly written): `resume` deletes and remakes disk 1's volume, never resends disk
/// 0, and the pool holds exactly two volumes and one domain, both reading back equal to the sources.
#[test]
fn resume_after_kill_finishes_without_resending_disk_0() {
    let o = make_ova();
    let mut pool = Pool::new();
    let state = o.dir.join("state");
    let name = pool.domain();
    let extra = ["--force", "--volume-format", "raw"];
    let job = migrate_and_kill(&pool, &o.ova, &name, &state, &extra, "after-upload-disk-0");
    let (v0, v1) = (format!("{name}.raw"), format!("{name}-data1.raw"));
    assert_eq!(pool.volumes(), vec![v0.clone()]);
    assert!(domains_named(&name).is_empty());
    let before = identity(&pool.path(&v0));

    // Make disk 1 look like a kill mid-stream: recorded by the job, its volume partly written with garbage.
    let jpath = state.join(format!("{job}.json"));
    let mut jv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jpath).unwrap()).unwrap();
    jv["resources"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"kind": "volume", "id": format!("{}/{v1}", pool.name)}));
    jv["disks"][1]["stage"] = "uploading".into();
    std::fs::write(&jpath, serde_json::to_vec_pretty(&jv).unwrap()).unwrap();
    virsh_ok(&["vol-create-as", &pool.name, &v1, "1M", "--format", "raw"]);
    std::fs::write(pool.path(&v1), vec![0xa5u8; 4096]).unwrap();

    let r = imgshift(&["resume", &job, "--state-dir", s(&state)]).ok();
    let j = json(&r);
    assert_eq!(j["resumed"], true, "{}", r.stdout);
    assert_eq!(j["job"], job.as_str());
    assert_eq!(
        identity(&pool.path(&v0)),
        before,
        "disk 0's volume was made again"
    );
    let upload = j["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "upload")
        .unwrap()["result"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(upload.contains("this run"), "{upload}");
    assert_eq!(pool.volumes(), {
        let mut v = vec![v0.clone(), v1.clone()];
        v.sort();
        v
    });
    assert_eq!(domains_named(&name), vec![name.clone()]);
    let x = virsh_ok(&["dumpxml", &name]);
    assert_eq!(x.matches("<disk type='volume'").count(), 2, "{x}");
    assert!(
        pool.vol_xml(&v1)
            .contains(&format!("<capacity unit='bytes'>{DATA_SIZE}</capacity>"))
    );
    assert_volume_is(&pool, &v0, "raw", &o.boot_raw, &o.dir);
    assert_volume_is(&pool, &v1, "raw", &o.data_raw, &o.dir);
    assert!(files_in(&state).iter().all(|f| !f.ends_with(".json")));
    // A second resume finds nothing to do.
    let r = imgshift(&["resume", &job, "--state-dir", s(&state)]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains(&format!("no job {job}")), "{}", r.stderr);
}

/// (d) kill -9 after the domain was defined and started, then `jobs cancel`: the job's domain (stopped first)
/// and both volumes go; an unrelated volume in the same pool and an unrelated domain stay; cancelling again
/// finds no job.
#[test]
fn jobs_cancel_removes_exactly_what_the_job_made() {
    let o = make_ova();
    let mut pool = Pool::new();
    let state = o.dir.join("state");
    let name = pool.domain();
    virsh_ok(&[
        "vol-create-as",
        &pool.name,
        "unrelated.qcow2",
        "1M",
        "--format",
        "qcow2",
    ]);
    // A stopped domain of another name, using the unrelated volume.
    let bystander = pool.domain();
    let dx = o.dir.join("bystander.xml");
    std::fs::write(
        &dx,
        format!(
            "<domain type='qemu'><name>{bystander}</name><memory unit='MiB'>64</memory><os><type arch='x86_64' \
             machine='q35'>hvm</type></os><devices><disk type='volume' device='disk'><driver name='qemu' \
             type='qcow2'/><source pool='{}' volume='unrelated.qcow2'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            pool.name
        ),
    )
    .unwrap();
    virsh_ok(&["define", s(&dx)]);

    // Started: the random "boot disk" keeps the firmware looking for a boot device, so it runs until stopped.
    let job = migrate_and_kill(
        &pool,
        &o.ova,
        &name,
        &state,
        &["--force", "--start", "--memory", "128"],
        "after-register",
    );
    assert_eq!(domains_named(&name), vec![name.clone()]);
    assert_eq!(virsh_ok(&["domstate", &name]).trim(), "running");
    assert_eq!(pool.volumes().len(), 3, "{:?}", pool.volumes());

    let listed = imgshift(&["jobs", "--state-dir", s(&state), "--output", "json"]).ok();
    let lj = json(&listed);
    assert_eq!(lj[0]["id"], job.as_str(), "{}", listed.stdout);
    assert_eq!(lj[0]["stage"], "register", "{}", listed.stdout);

    let r = imgshift(&["jobs", "cancel", &job, "--state-dir", s(&state)]).ok();
    assert!(
        r.stdout.contains(&format!("stopped domain '{name}'"))
            && r.stdout.contains(&format!("undefined domain '{name}'")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("deleted volume '{name}.qcow2'"))
            && r.stdout
                .contains(&format!("deleted volume '{name}-data1.qcow2'")),
        "{}",
        r.stdout
    );
    assert_eq!(pool.volumes(), vec!["unrelated.qcow2".to_string()]);
    assert!(domains_named(&name).is_empty());
    assert_eq!(domains_named(&bystander), vec![bystander.clone()]);
    assert!(
        virsh(&["dominfo", &name]).code != 0,
        "domain {name} is still defined"
    );
    assert!(files_in(&state).iter().all(|f| !f.ends_with(".json")));
    let r = imgshift(&["jobs", "cancel", &job, "--state-dir", s(&state)]);
    assert_eq!(r.code, 1, "{}", r.stdout);
}

/// Without --pool, or with a daemon that cannot be reached, nothing starts and the message says what to do.
#[test]
fn missing_pool_and_unreachable_daemon_are_one_line() {
    let d = tmpdir();
    let raw = d.path().join("d.raw");
    make_raw(&raw, 4 << 20, &[(0, 4096)], &[]);
    let state = d.path().join("state");
    let r = imgshift(&[
        "migrate",
        s(&raw),
        "--to",
        "libvirt",
        "--yes",
        "--state-dir",
        s(&state),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("--to libvirt needs --pool"),
        "{}",
        r.stderr
    );
    let r = imgshift(&[
        "migrate",
        s(&raw),
        "--to",
        "libvirt",
        "--pool",
        "p",
        "--connect",
        "qemu:///system?socket=/nonexistent/libvirt-sock",
        "--yes",
        "--force",
        "--state-dir",
        s(&state),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot connect to libvirt")
            && r.stderr.contains("start libvirtd")
            && !r.stderr.contains(".ci/"),
        "{}",
        r.stderr
    );
}

/// The verify stage really reads the volumes back: a byte changed in a volume between register and verify (kill
/// -9 after register, change, resume) stops the job in verify, naming the volume; `jobs cancel` then cleans up.
#[test]
fn verify_catches_a_changed_volume() {
    let o = make_ova();
    let mut pool = Pool::new();
    let state = o.dir.join("state");
    let name = pool.domain();
    let extra = ["--force", "--volume-format", "raw"];
    let job = migrate_and_kill(&pool, &o.ova, &name, &state, &extra, "after-register");
    let v1 = format!("{name}-data1.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options()
            .write(true)
            .open(pool.path(&v1))
            .unwrap();
        // Inside the data disk's first data range (64 KiB + 128 KiB), which verify always samples.
        f.write_all_at(b"not the source", 64 * 1024 + 100).unwrap();
    }
    let r = imgshift(&["resume", &job, "--state-dir", s(&state)]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("content differs") && r.stderr.contains(&v1),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("stopped in stage verify"), "{}", r.stderr);
    imgshift(&["jobs", "cancel", &job, "--state-dir", s(&state)]).ok();
    assert!(pool.volumes().is_empty(), "{:?}", pool.volumes());
    assert!(domains_named(&name).is_empty());
}
