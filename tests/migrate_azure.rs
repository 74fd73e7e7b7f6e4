#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `imgshift migrate --to azure` against Azurite (`bash .ci/standins start`) and the fake ARM
//! (`tests/standins/fake_arm.py`, see `tests/azure_util`): a VHDX made by qemu-img becomes a managed disk whose
//! blob is the source plus a fixed-VHD footer and an image of it; a failing preflight makes no ARM call at all;
//! `jobs cancel` and `resume` after a kill -9 leave exactly one job's resources.

mod azure_util;
mod util;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use azure_util::*;
use util::ova::{MIB, make_ova};
use util::*;

/// Virtual size of the test disk.
const SIZE: u64 = 64 * MIB;

/// A 64 MiB VHDX with a few MiB of scattered data (qemu-io), and its raw conversion (qemu-img) as the oracle.
fn vhdx_source(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let vhdx = dir.join(format!("{stem}.vhdx"));
    qemu_img(&["create", "-q", "-f", "vhdx", s(&vhdx), "64M"]);
    qemu_io(
        "vhdx",
        &vhdx,
        &[
            "write -q -P 0x5a 0 1M",
            "write -q -P 0xa5 5M 64k",
            "write -q -P 0x33 17M 2M",
            "write -q -P 0x77 40000k 4k",
            "write -q -P 0x11 63M 1M",
        ],
    );
    let raw = dir.join(format!("{stem}.raw"));
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&vhdx), s(&raw)]);
    (vhdx, raw)
}

fn state_dir(env: &Env) -> PathBuf {
    env.path().join("state")
}

fn migrate_cmd(env: &Env, src: &Path, name: &str, extra: &[&str]) -> Command {
    let mut c = env.cmd();
    c.args(["migrate", s(src), "--to", "azure", "--subscription", SUB])
        .args(["--resource-group", RG, "--location", "westeurope"])
        .args(["--arm-endpoint", &env.arm_url(), "--name", name])
        .args(["--state-dir", s(&state_dir(env)), "--yes"])
        .args(extra);
    c
}

/// `imgshift jobs --output json` in the environment's state folder.
fn jobs(env: &Env) -> Vec<serde_json::Value> {
    // No job ever made the folder: no jobs (`imgshift jobs` refuses a --state-dir that does not exist).
    if !state_dir(env).is_dir() {
        return Vec::new();
    }
    let mut c = env.cmd();
    c.args([
        "jobs",
        "--output",
        "json",
        "--state-dir",
        s(&state_dir(env)),
    ]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// Starts `c` with the test pause point `point`, waits until it says it paused there, and kills it with SIGKILL.
fn kill_at(mut c: Command, point: &str) {
    let mut child: Child = c
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
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.trim() == want => break,
            Ok(l) => seen.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                panic!(
                    "migrate ended before pausing at {point}: {}",
                    seen.join("\n")
                );
            }
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!(
                "migrate did not reach {point} in 300 s: {}",
                seen.join("\n")
            );
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Put Page requests that reached (through the recording proxy) the blob of job `name`'s OS disk.
fn page_puts(env: &Env, name: &str) -> usize {
    let blob = format!("/{name}-os.vhd");
    env.page_puts()
        .iter()
        .filter(|p| p["path"].as_str().unwrap().ends_with(&blob))
        .count()
}

fn count(v: &[String], what: &str) -> usize {
    v.iter().filter(|w| w.as_str() == what).count()
}

#[test]
fn vhdx_becomes_an_image_whose_disk_blob_is_the_source_plus_a_footer() {
    let env = Env::start("mig", &[], None);
    let (vhdx, raw) = vhdx_source(env.path(), "guest");
    let r = run(migrate_cmd(
        &env,
        &vhdx,
        "mig-a",
        &["--force", "--output", "json", "--tag", "team=storage"],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    assert_eq!(v["target"], "azure");
    let out = &v["outputs"];
    assert!(
        out["image_id"].as_str().unwrap().ends_with(&format!(
            "/resourceGroups/{RG}/providers/Microsoft.Compute/images/mig-a"
        )),
        "{v}"
    );
    assert!(
        out["disk_ids"][0]
            .as_str()
            .unwrap()
            .ends_with("/disks/mig-a-os"),
        "{v}"
    );
    assert_eq!(out["hyper_v_generation"], "V1");
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["inspect", "upload", "register", "verify"]);
    let verify = v["stages"][3]["result"].as_str().unwrap();
    assert!(
        verify.contains("read back") && verify.contains("footers valid"),
        "{verify}"
    );
    // What the sources had, not more, was sent: the data plus the footer.
    assert!(v["bytes_sent"].as_u64().unwrap() < 6 * MIB, "{v}");

    // Exactly one disk and one image exist.
    let (disks, resources) = env.held();
    assert_eq!(disks, ["mig-a-os"]);
    assert_eq!(resources, ["images/mig-a"]);
    let d = &env.bodies("PUT", "/disks/mig-a-os")[0];
    assert_eq!(d["properties"]["creationData"]["createOption"], "Upload");
    assert_eq!(
        d["properties"]["creationData"]["uploadSizeBytes"],
        SIZE + 512
    );
    assert_eq!(d["properties"]["hyperVGeneration"], "V1");
    assert_eq!(d["properties"]["osType"], "Linux");
    assert_eq!(d["tags"]["team"], "storage");
    let img = &env.bodies("PUT", "/images/mig-a")[0];
    assert_eq!(img["properties"]["hyperVGeneration"], "V1");
    assert!(
        img["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
            .as_str()
            .unwrap()
            .ends_with("/disks/mig-a-os")
    );
    // Verify asked for read access, and every grant was revoked.
    let grants: Vec<String> = env
        .bodies("POST", "/disks/mig-a-os/beginGetAccess")
        .iter()
        .map(|b| b["access"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(grants, ["Write", "Read"]);
    let w = env.writes();
    assert_eq!(count(&w, "POST mig-a-os/endGetAccess"), 2, "{w:?}");

    // The blob: the source's bytes (qemu-img's raw), zeros, then a valid fixed-VHD footer; pages only where the
    // source has data.
    check_blob(&env, "mig-a-os", &raw, SIZE);
    assert!(
        files_in(&state_dir(&env)).is_empty(),
        "journal left: {:?}",
        files_in(&state_dir(&env))
    );
}

#[test]
fn two_disk_ova_gives_an_os_disk_a_data_disk_and_an_image() {
    let env = Env::start("ova", &[], None);
    let o = make_ova();
    let r = run(migrate_cmd(
        &env,
        &o.ova,
        "mig-o",
        &["--force", "--output", "json"],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    assert_eq!(v["disks"].as_array().unwrap().len(), 2, "{v}");
    let (disks, resources) = env.held();
    assert_eq!(disks, ["mig-o-data1", "mig-o-os"]);
    assert_eq!(resources, ["images/mig-o"]);
    let os = &env.bodies("PUT", "/disks/mig-o-os")[0];
    assert_eq!(os["properties"]["osType"], "Linux");
    // A data disk has no OS type or generation, and stays out of the image.
    let data = &env.bodies("PUT", "/disks/mig-o-data1")[0];
    assert!(data["properties"].get("osType").is_none(), "{data}");
    assert!(
        data["properties"].get("hyperVGeneration").is_none(),
        "{data}"
    );
    let img = &env.bodies("PUT", "/images/mig-o")[0];
    assert!(
        img["properties"]["storageProfile"]
            .get("dataDisks")
            .is_none()
    );
    assert!(
        v["stages"][2]["result"]
            .as_str()
            .unwrap()
            .contains("data disk mig-o-data1"),
        "{v}"
    );
    assert!(
        v["stages"][3]["result"]
            .as_str()
            .unwrap()
            .starts_with("2 disks read back"),
        "{v}"
    );
    // Both disks are padded to Azure's 20 MiB minimum.
    check_blob(&env, "mig-o-os", &o.boot_raw, 20 * MIB);
    check_blob(&env, "mig-o-data1", &o.data_raw, 20 * MIB);
}

#[test]
fn a_taken_disk_name_is_refused_before_anything_is_created() {
    let env = Env::start("taken", &[], None);
    let other = env.path().join("other.raw");
    make_raw(&other, 21 * MIB, &[(0, MIB)], &[]);
    assert_eq!(env.upload(&other, "mig-t-os", &[]).code, 0);
    let before = env.writes();
    let (vhdx, _) = vhdx_source(env.path(), "guest");
    let r = run(migrate_cmd(&env, &vhdx, "mig-t", &["--force"]));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(
            "disk 'mig-t-os' already exists in resource group imgshift-rg and is not this job's"
        ),
        "{}",
        r.stderr
    );
    assert_eq!(env.writes(), before, "something was created or changed");
    // The job made nothing, so it leaves no journal behind.
    assert!(jobs(&env).is_empty());
    assert_eq!(env.held().0, ["mig-t-os"]);
}

#[test]
fn failing_preflight_stops_before_any_arm_call() {
    let env = Env::start("pf", &[], None);
    let (vhdx, _) = vhdx_source(env.path(), "dataonly");
    let r = run(migrate_cmd(&env, &vhdx, "mig-b", &[]));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("preflight fails") && r.stderr.contains("nothing was sent"),
        "{}",
        r.stderr
    );
    // Not even a token was asked for, and nothing reached Azurite.
    assert!(env.records().is_empty(), "{:?}", env.records());
    assert!(env.blobs().is_empty(), "{:?}", env.blobs());
    assert!(jobs(&env).is_empty());
}

#[test]
fn jobs_cancel_removes_exactly_the_jobs_disk() {
    let env = Env::start("cancel", &[], None);
    // A disk made beforehand by someone else: it must survive.
    let other = env.path().join("other.raw");
    make_raw(&other, 21 * MIB, &[(0, MIB)], &[]);
    assert_eq!(env.upload(&other, "bystander", &[]).code, 0);
    let (vhdx, _) = vhdx_source(env.path(), "guest");
    kill_at(
        migrate_cmd(&env, &vhdx, "mig-c", &["--force"]),
        "after-upload",
    );
    let listed = jobs(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let job = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["kind"], "migrate-azure");
    assert_eq!(
        listed[0]["resources"],
        serde_json::json!([{"kind": "disk", "id": "mig-c-os"}])
    );
    let (disks, _) = env.held();
    assert_eq!(disks, ["bystander", "mig-c-os"]);

    let mut c = env.cmd();
    c.args(["jobs", "cancel", &job, "--state-dir", s(&state_dir(&env))]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("deleted disk mig-c-os"), "{}", r.stdout);
    let (disks, resources) = env.held();
    assert_eq!(disks, ["bystander"]);
    assert!(resources.is_empty(), "{resources:?}");
    assert_eq!(env.blobs(), ["bystander.vhd"]);
    let deletes: Vec<String> = env
        .records()
        .iter()
        .filter(|r| r["method"] == "DELETE")
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !deletes.is_empty() && deletes.iter().all(|p| p.ends_with("/disks/mig-c-os")),
        "{deletes:?}"
    );
    assert!(jobs(&env).is_empty());
    // Cancelling again: the job is gone.
    let mut c = env.cmd();
    c.args(["jobs", "cancel", &job, "--state-dir", s(&state_dir(&env))]);
    assert_ne!(run(c).code, 0);
}

#[test]
fn resume_after_kill_finishes_with_one_disk_and_one_image() {
    let env = Env::start("resume", &[], Some(&[]));
    // After the upload stage; and inside it, after the footer was acknowledged but before the disk's stage was
    // saved (its write SAS still active: the resumed run asks for a new one and sends nothing again).
    for (name, point) in [("mig-d", "after-upload"), ("mig-e", "upload-saved")] {
        let (vhdx, raw) = vhdx_source(env.path(), name);
        kill_at(migrate_cmd(&env, &vhdx, name, &["--force"]), point);
        let listed = jobs(&env);
        assert_eq!(listed.len(), 1, "{point}: {listed:?}");
        let job = listed[0]["id"].as_str().unwrap().to_string();
        let puts_before = page_puts(&env, name);
        let mut c = env.cmd();
        c.args(["resume", &job, "--state-dir", s(&state_dir(&env))]);
        let r = run(c);
        assert_eq!(r.code, 0, "{point}: {}", r.stderr);
        assert!(r.stdout.contains("done"), "{point}: {}", r.stdout);

        let os = format!("{name}-os");
        let (disks, resources) = env.held();
        assert_eq!(count(&disks, &os), 1, "{point}: {disks:?}");
        assert_eq!(
            count(&resources, &format!("images/{name}")),
            1,
            "{point}: {resources:?}"
        );
        let w = env.writes();
        assert_eq!(count(&w, &format!("PUT disks/{os}")), 1, "{point}: {w:?}");
        assert_eq!(
            count(&w, &format!("PUT images/{name}")),
            1,
            "{point}: {w:?}"
        );
        let writes_granted = env
            .bodies("POST", &format!("/disks/{os}/beginGetAccess"))
            .iter()
            .filter(|b| b["access"] == "Write")
            .count();
        assert_eq!(
            writes_granted,
            if point == "after-upload" { 1 } else { 2 },
            "{point}"
        );
        let puts = page_puts(&env, name);
        if point == "after-upload" {
            assert_eq!(puts, puts_before, "{point}: pages sent again");
        } else {
            // The pause came right after a journal save that recorded at least one window: that one is not sent
            // again (windows acknowledged after the save may be).
            assert!(
                puts < 2 * puts_before,
                "{point}: everything was sent again ({puts_before} then {puts})"
            );
        }
        check_blob(&env, &os, &raw, SIZE);
        assert!(jobs(&env).is_empty(), "{point}");
    }
    let (disks, resources) = env.held();
    assert_eq!(disks, ["mig-d-os", "mig-e-os"]);
    assert_eq!(resources, ["images/mig-d", "images/mig-e"]);
}

#[test]
fn jobs_cancel_removes_an_upload_azure_jobs_disk() {
    let env = Env::start("upcancel", &[], None);
    let raw = env.path().join("up.raw");
    make_raw(&raw, 40 * MIB, &[(0, 24 * MIB)], &[]);
    kill_at(
        env.upload_cmd(&raw, "up-disk", &["--concurrency", "1"]),
        "upload-saved",
    );
    let listed = jobs(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["kind"], "azure-upload");
    let job = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(env.held().0, ["up-disk"]);
    let mut c = env.cmd();
    c.args(["jobs", "cancel", &job, "--state-dir", s(&state_dir(&env))]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Its write SAS was still active: revoked, then the disk deleted.
    assert!(r.stdout.contains("deleted disk up-disk"), "{}", r.stdout);
    assert!(env.held().0.is_empty());
    assert!(env.blobs().is_empty(), "{:?}", env.blobs());
    assert!(jobs(&env).is_empty());
}

#[test]
fn verify_finds_a_damaged_blob() {
    let env = Env::start("damage", &[], None);
    // Changed data inside a window the source writes; a page written where the source has no data.
    for (name, offset, want) in [
        ("mig-x", 512, "content differs at byte 512"),
        ("mig-y", 30 * MIB, "window 7"),
    ] {
        let (vhdx, _) = vhdx_source(env.path(), name);
        kill_at(
            migrate_cmd(&env, &vhdx, name, &["--force"]),
            "after-register",
        );
        env.damage(&format!("{name}-os"), offset, 0xee);
        let job = jobs(&env)[0]["id"].as_str().unwrap().to_string();
        let mut c = env.cmd();
        c.args(["resume", &job, "--state-dir", s(&state_dir(&env))]);
        let r = run(c);
        assert_ne!(r.code, 0, "{name}: {}", r.stdout);
        assert!(
            r.stderr.contains("stopped in stage verify") && r.stderr.contains(want),
            "{name}: {}",
            r.stderr
        );
        // The read SAS was revoked even so.
        let w = env.writes();
        let os = format!("{name}-os");
        assert_eq!(
            count(&w, &format!("POST {os}/beginGetAccess")),
            count(&w, &format!("POST {os}/endGetAccess")),
            "{w:?}"
        );
        let mut c = env.cmd();
        c.args(["jobs", "cancel", &job, "--state-dir", s(&state_dir(&env))]);
        assert_eq!(run(c).code, 0);
    }
}

#[test]
fn jobs_cancel_removes_gallery_version_image_and_disk_in_that_order() {
    let env = Env::start("gcancel", &[], None);
    let (vhdx, _) = vhdx_source(env.path(), "guest");
    kill_at(
        migrate_cmd(
            &env,
            &vhdx,
            "mig-g",
            &[
                "--force",
                "--gallery",
                "gal",
                "--gallery-image",
                "def",
                "--gallery-version",
                "1.0.0",
            ],
        ),
        "after-register",
    );
    let (disks, resources) = env.held();
    assert_eq!(disks, ["mig-g-os"]);
    assert_eq!(
        resources,
        ["galleries/gal/images/def/versions/1.0.0", "images/mig-g"]
    );
    let job = jobs(&env)[0]["id"].as_str().unwrap().to_string();
    let mut c = env.cmd();
    c.args(["jobs", "cancel", &job, "--state-dir", s(&state_dir(&env))]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.held(), (vec![], vec![]));
    assert!(env.blobs().is_empty());
    let deletes: Vec<String> = env
        .records()
        .iter()
        .filter(|r| r["method"] == "DELETE")
        .map(|r| {
            r["path"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .take(2)
                .collect::<Vec<_>>()
                .join("<")
        })
        .collect();
    assert_eq!(
        deletes,
        ["1.0.0<versions", "mig-g<images", "mig-g-os<disks"]
    );
}

#[test]
fn jobs_cancel_removes_an_upload_azure_jobs_gallery_version_and_image() {
    // `upload azure` used to create the gallery version without recording it: `jobs cancel` left it behind.
    let env = Env::start("upgal", &[], None);
    let raw = env.path().join("up.raw");
    make_raw(&raw, 40 * MIB, &[(0, 4 * MIB)], &[]);
    kill_at(
        env.upload_cmd(
            &raw,
            "upg-disk",
            &[
                "--image-name",
                "upg-img",
                "--gallery",
                "gal",
                "--gallery-image",
                "def",
                "--gallery-version",
                "2.0.0",
            ],
        ),
        "after-register",
    );
    let (disks, resources) = env.held();
    assert_eq!(disks, ["upg-disk"]);
    assert_eq!(
        resources,
        ["galleries/gal/images/def/versions/2.0.0", "images/upg-img"]
    );
    let job = jobs(&env)[0]["id"].as_str().unwrap().to_string();
    let mut c = env.cmd();
    c.args(["jobs", "cancel", &job, "--state-dir", s(&state_dir(&env))]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("deleted gallery image version gal/def/2.0.0"),
        "{}",
        r.stdout
    );
    assert_eq!(env.held(), (vec![], vec![]));
    assert!(jobs(&env).is_empty());
}
