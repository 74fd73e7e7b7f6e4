//! `imgshift upload libvirt` against a real libvirtd (started by `bash .ci/standins start`, private socket).
//! Each test makes its own transient dir pool (unique name, folder under /var/tmp) and removes it, its volumes
//! and its domains afterwards. A daemon that cannot be reached fails the test, saying how to start it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::libvirt::*;
use util::*;

const MIB: u64 = 1 << 20;

/// A 24 MiB raw disk: data at the start, a piece straddling 12 MiB, data at the end, an allocated zero range.
fn test_raw(dir: &Path, name: &str, seed_len: u64) -> PathBuf {
    let raw = dir.join(name);
    make_raw(
        &raw,
        24 * MIB,
        &[(0, seed_len), (12 * MIB - 4096, 8192), (23 * MIB, MIB)],
        &[(4 * MIB, 2 * MIB)],
    );
    raw
}

fn source_in(dir: &Path, raw: &Path, fmt: &str) -> PathBuf {
    let img = dir.join(format!("src.{fmt}"));
    qemu_img(&["convert", "-f", "raw", "-O", fmt, s(raw), s(&img)]);
    img
}

/// A 64 MiB disk whose partition table is `table` (sfdisk script).
fn partitioned(dir: &Path, name: &str, table: &str) -> PathBuf {
    use std::io::Write;
    let raw = test_raw(dir, name, 4096);
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut c = Command::new("sfdisk")
        .args(["-q", s(&raw)])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sfdisk ({e}): install fdisk"));
    c.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk {table}");
    raw
}

fn capacity_and_format(xml: &str) -> (u64, String) {
    let cap = xml
        .split("<capacity unit='bytes'>")
        .nth(1)
        .and_then(|t| t.split('<').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no capacity in {xml}"));
    let fmt = xml
        .split("<format type='")
        .nth(1)
        .and_then(|t| t.split('\'').next())
        .unwrap_or_else(|| panic!("no format in {xml}"))
        .to_string();
    (cap, fmt)
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn one_line_error(r: &Run) {
    assert_eq!(r.code, 1, "stdout={} stderr={}", r.stdout, r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        !r.stderr.contains("libvirt: "),
        "libvirt printed: {}",
        r.stderr
    );
}

#[test]
fn uploads_three_source_formats_as_qcow2_and_raw() {
    let d = tmpdir();
    let pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", 3 * MIB);
    for src_fmt in ["vmdk", "vhdx", "vdi", "vpc"] {
        let src = source_in(d.path(), &raw, src_fmt);
        for out in ["qcow2", "raw"] {
            let vol = format!("{src_fmt}-{out}.img");
            let r = pool
                .upload(&src, &vol, &["-O", out, "--output", "json"])
                .ok();
            let j = json(&r);
            // vpc rounds the size to its CHS geometry; every other format keeps 24 MiB.
            let want = if src_fmt == "vpc" {
                let info = qemu_img(&["info", "--output", "json", "-f", "vpc", s(&src)]);
                serde_json::from_str::<serde_json::Value>(&info).unwrap()["virtual-size"]
                    .as_u64()
                    .unwrap()
            } else {
                24 * MIB
            };
            assert_eq!(j["capacity"], want, "{}", r.stdout);
            assert_eq!(j["format"], out, "{}", r.stdout);
            assert_eq!(j["path"].as_str().unwrap(), s(&pool.path(&vol)));
            let (cap, fmt) = capacity_and_format(&pool.vol_xml(&vol));
            assert_eq!(cap, want, "{src_fmt} -> {out}");
            assert_eq!(fmt, out, "{src_fmt} -> {out}");
            let back = d.path().join(format!("back-{vol}"));
            pool.download(&vol, &back);
            assert_same(&src, src_fmt, &back, out);
            let sent = &j["sent"];
            if out == "qcow2" {
                assert_check_clean(&back, "qcow2");
            } else {
                // Holes stay holes: the gaps went over one sparse stream as hole messages, not as data, and are
                // not allocated in the volume's file.
                let blocks = std::fs::metadata(pool.path(&vol)).unwrap().blocks() * 512;
                assert!(
                    blocks < 10 * MIB,
                    "{vol}: {blocks} bytes allocated of 24 MiB ({})",
                    r.stdout
                );
                assert_eq!(sent["streams"], 1, "{}", r.stdout);
                assert!(sent["holes"].as_u64().unwrap() >= 2, "{}", r.stdout);
                assert!(
                    sent["skipped_bytes"].as_u64().unwrap() >= 15 * MIB,
                    "{}",
                    r.stdout
                );
                assert!(
                    sent["bytes_sent"].as_u64().unwrap() < 8 * MIB,
                    "{}",
                    r.stdout
                );
            }
        }
    }
}

/// An OVA (a VMware export): its boot disk, a streamOptimized VMDK, is read in place from the tar.
#[test]
fn uploads_the_boot_disk_of_an_ova() {
    let d = tmpdir();
    let pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", 2 * MIB);
    let pkg = d.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&pkg.join("disk1.vmdk")),
    ]);
    std::fs::write(
        pkg.join("vm.ovf"),
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="disk1.vmdk"/></References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="24" ovf:capacityAllocationUnits="byte * 2^20"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A virtual machine</Info></VirtualSystem>
</Envelope>
"#,
    )
    .unwrap();
    let ova = d.path().join("vm.ova");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&ova)
        .arg("-C")
        .arg(&pkg)
        .args(["vm.ovf", "disk1.vmdk"])
        .status()
        .unwrap();
    assert!(st.success());
    for out in ["qcow2", "raw"] {
        let vol = format!("ova.{out}");
        pool.upload(&ova, &vol, &["-O", out]).ok();
        assert_eq!(
            capacity_and_format(&pool.vol_xml(&vol)),
            (24 * MIB, out.to_string())
        );
        assert_same(&raw, "raw", &pool.path(&vol), out);
    }
}

#[test]
fn define_writes_firmware_bus_disk_and_features() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let src = source_in(d.path(), &test_raw(d.path(), "source.raw", MIB), "qcow2");
    let esp = partitioned(
        d.path(),
        "esp.raw",
        "label: gpt\nstart=2048, size=32768, type=U\nstart=34816, type=L\n",
    );
    let mbr = partitioned(
        d.path(),
        "mbr.raw",
        "label: dos\nstart=2048, type=83, bootable\n",
    );

    // Explicit choices.
    let dom = pool.domain();
    let vol = format!("{dom}.qcow2");
    let r = pool
        .upload(
            &src,
            &vol,
            &[
                "--define",
                &dom,
                "--memory",
                "256",
                "--vcpus",
                "2",
                "--firmware",
                "bios",
                "--disk-bus",
                "scsi",
                "--domain-type",
                "qemu",
                "--network",
                "default",
            ],
        )
        .ok();
    assert_eq!(
        r.stdout.trim(),
        format!("{}\ndomain {dom}", s(&pool.path(&vol)))
    );
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains("<domain type='qemu'"), "{x}");
    assert!(x.contains("machine='pc-q35-"), "{x}");
    assert!(!x.contains("firmware='efi'"), "{x}");
    assert!(
        x.contains(&format!("<source pool='{}' volume='{vol}'/>", pool.name)),
        "{x}"
    );
    assert!(x.contains("<driver name='qemu' type='qcow2'/>"), "{x}");
    assert!(x.contains("<target dev='sda' bus='scsi'/>"), "{x}");
    assert!(
        x.contains("<controller type='scsi' index='0' model='virtio-scsi'>"),
        "{x}"
    );
    assert!(x.contains("<acpi/>") && x.contains("<apic/>"), "{x}");
    assert!(x.contains("<serial type='pty'>"), "{x}");
    assert!(x.contains("<console type='pty'>"), "{x}");
    assert!(x.contains("<source network='default'/>"), "{x}");
    assert!(x.contains("<memory unit='KiB'>262144</memory>"), "{x}");
    assert!(x.contains(">2</vcpu>"), "{x}");

    // auto firmware: a GPT with an EFI system partition boots with UEFI (Secure Boot off); explicit virtio.
    let dom = pool.domain();
    let vol = format!("{dom}.raw");
    let r = pool
        .upload(
            &esp,
            &vol,
            &[
                "-O",
                "raw",
                "--define",
                &dom,
                "--disk-bus",
                "virtio",
                "--domain-type",
                "qemu",
                "--serial-log",
                s(&pool.path("serial.log")),
                "--output",
                "json",
            ],
        )
        .ok();
    let j = json(&r);
    assert_eq!(j["domain"]["firmware"], "uefi", "{}", r.stdout);
    assert_eq!(j["domain"]["disk_bus"], "virtio", "{}", r.stdout);
    assert_eq!(j["domain"]["started"], false, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("firmware uefi: the disk has a GPT with an EFI system partition"),
        "{}",
        r.stderr
    );
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains("<os firmware='efi'>"), "{x}");
    assert!(
        x.contains("<feature enabled='no' name='secure-boot'/>"),
        "{x}"
    );
    assert!(x.contains("<target dev='vda' bus='virtio'/>"), "{x}");
    assert!(x.contains("<driver name='qemu' type='raw'/>"), "{x}");
    assert!(
        x.contains(&format!(
            "<log file='{}' append='off'/>",
            s(&pool.path("serial.log"))
        )),
        "{x}"
    );

    // All auto on an MBR disk: BIOS, sata, and kvm exactly when the host's capabilities offer it.
    let dom = pool.domain();
    let vol = format!("{dom}.qcow2");
    let r = pool
        .upload(&mbr, &vol, &["--define", &dom, "--output", "json"])
        .ok();
    let j = json(&r);
    assert_eq!(j["domain"]["firmware"], "bios", "{}", r.stdout);
    assert_eq!(j["domain"]["disk_bus"], "sata", "{}", r.stdout);
    let caps = virsh_ok(&["capabilities"]);
    let x86 = caps
        .split("<arch name='x86_64'>")
        .nth(1)
        .and_then(|t| t.split("</arch>").next())
        .unwrap();
    let want = if x86.contains("<domain type='kvm'") {
        "kvm"
    } else {
        "qemu"
    };
    assert_eq!(j["domain"]["type"], want, "{}", r.stdout);
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains(&format!("<domain type='{want}'")), "{x}");
    assert!(!x.contains("firmware='efi'"), "{x}");
    assert!(x.contains("<target dev='sda' bus='sata'/>"), "{x}");
}

/// A per-user session daemon: `libvirtd` auto-spawned by `virsh -c qemu:///session` as the unprivileged user
/// `nobody`, its state under a temporary XDG folder; imgshift reaches it through `qemu:///session?socket=`.
struct SessionDaemon {
    dir: tempfile::TempDir,
}

impl SessionDaemon {
    /// The folders of a session daemon (owned by `nobody`), none started yet.
    fn folders() -> SessionDaemon {
        let dir = tempfile::Builder::new()
            .prefix("imgshift-session")
            .tempdir_in("/var/tmp")
            .unwrap();
        for sub in ["run", "config", "cache", "pool"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let st = Command::new("chown")
            .args(["-R", "nobody:nogroup", s(dir.path())])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "chown nobody (the test runs as root, like CI)"
        );
        SessionDaemon { dir }
    }

    /// `runuser -u nobody -- env HOME=… XDG_…=… PROGRAM`: a command run as the session's user.
    fn as_user(&self, program: &str) -> Command {
        let p = self.dir.path();
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--", "env"])
            .arg(format!("HOME={}", s(p)))
            .arg(format!("XDG_RUNTIME_DIR={}", s(&p.join("run"))))
            .arg(format!("XDG_CONFIG_HOME={}", s(&p.join("config"))))
            .arg(format!("XDG_CACHE_HOME={}", s(&p.join("cache"))))
            .arg(program);
        c
    }

    fn start() -> SessionDaemon {
        let daemon = SessionDaemon::folders();
        let dir = &daemon.dir;
        let p = dir.path();
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--", "env"])
            .arg(format!("HOME={}", s(p)))
            .arg(format!("XDG_RUNTIME_DIR={}", s(&p.join("run"))))
            .arg(format!("XDG_CONFIG_HOME={}", s(&p.join("config"))))
            .arg(format!("XDG_CACHE_HOME={}", s(&p.join("cache"))))
            .args(["virsh", "-c", "qemu:///session", "uri"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run runuser ({e})"));
        assert!(
            out.status.success(),
            "session libvirtd did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        daemon
    }

    fn uri(&self) -> String {
        format!(
            "qemu:///session?socket={}",
            s(&self.dir.path().join("run/libvirt/libvirt-sock"))
        )
    }
}

impl Drop for SessionDaemon {
    fn drop(&mut self) {
        // The daemon this test spawned (it would also exit by itself after 120 s idle).
        let pid = std::fs::read_to_string(self.dir.path().join("run/libvirt/libvirtd.pid"));
        if let Ok(pid) = pid {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[test]
fn uploads_to_a_session_daemon() {
    let d = tmpdir();
    let daemon = SessionDaemon::start();
    let u = daemon.uri();
    let pool_dir = daemon.dir.path().join("pool");
    let run = |args: &[&str]| {
        let out = Command::new("virsh")
            .args(["-q", "-c", &u])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["pool-create-as", "sp", "dir", "--target", s(&pool_dir)]);
    let raw = test_raw(d.path(), "source.raw", MIB);
    let src = source_in(d.path(), &raw, "vhdx");
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&src),
        "--connect",
        &u,
        "--pool",
        "sp",
        "--volume",
        "s.qcow2",
    ]);
    let listed = run(&["vol-list", "sp"]);
    run(&["pool-destroy", "sp"]);
    let r = r.ok();
    assert_eq!(r.stdout.trim(), s(&pool_dir.join("s.qcow2")));
    assert!(listed.contains("s.qcow2"), "{listed}");
    // Written by the unprivileged daemon, into its own pool.
    let meta = std::fs::metadata(pool_dir.join("s.qcow2")).unwrap();
    assert_ne!(meta.uid(), 0);
    assert_same(&src, "vhdx", &pool_dir.join("s.qcow2"), "qcow2");
}

#[test]
fn missing_or_stopped_pool_is_one_line() {
    let d = tmpdir();
    let _pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let u = uri();
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&raw),
        "--connect",
        &u,
        "--pool",
        "imgshift-no-such-pool",
        "--volume",
        "x.img",
    ]);
    one_line_error(&r);
    assert!(
        r.stderr
            .contains("storage pool 'imgshift-no-such-pool' not found"),
        "{}",
        r.stderr
    );

    // A defined pool that is not running.
    let name = unique("stopped");
    virsh_ok(&["pool-define-as", &name, "dir", "--target", s(d.path())]);
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&raw),
        "--connect",
        &u,
        "--pool",
        &name,
        "--volume",
        "x.img",
    ]);
    virsh_ok(&["pool-undefine", &name]);
    one_line_error(&r);
    assert!(
        r.stderr
            .contains(&format!("storage pool '{name}' is not running")),
        "{}",
        r.stderr
    );
}

#[test]
fn existing_volume_and_domain_need_overwrite() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let first = test_raw(d.path(), "first.raw", MIB);
    let second = test_raw(d.path(), "second.raw", 5 * MIB);
    pool.upload(&first, "v.img", &["-O", "raw"]).ok();

    let r = pool.upload(&second, "v.img", &["-O", "raw"]);
    one_line_error(&r);
    assert!(
        r.stderr.contains(&format!(
            "volume 'v.img' already exists in pool '{}'",
            pool.name
        )),
        "{}",
        r.stderr
    );
    let back = d.path().join("back.raw");
    pool.download("v.img", &back);
    assert_same(&first, "raw", &back, "raw");

    pool.upload(&second, "v.img", &["-O", "qcow2", "--overwrite"])
        .ok();
    std::fs::remove_file(&back).unwrap();
    pool.download("v.img", &back);
    assert_same(&second, "raw", &back, "qcow2");
    assert_eq!(capacity_and_format(&pool.vol_xml("v.img")).1, "qcow2");

    // A taken domain name is refused before any volume is created.
    let dom = pool.domain();
    let q = ["--domain-type", "qemu"];
    pool.upload(&first, "d1.img", &[&["--define", &dom][..], &q].concat())
        .ok();
    let r = pool.upload(&first, "d2.img", &[&["--define", &dom][..], &q].concat());
    one_line_error(&r);
    assert!(
        r.stderr.contains(&format!("domain '{dom}' already exists")),
        "{}",
        r.stderr
    );
    assert_eq!(pool.volumes(), ["d1.img", "v.img"]);
    // With --overwrite the domain now uses the new volume.
    pool.upload(
        &first,
        "d2.img",
        &[&["--define", &dom, "--overwrite"][..], &q].concat(),
    )
    .ok();
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains("volume='d2.img'"), "{x}");
    // The same volume and domain again, with --overwrite: both replaced (the domain with the new settings).
    pool.upload(
        &second,
        "d2.img",
        &[
            "--define",
            &dom,
            "--overwrite",
            "--memory",
            "256",
            "--domain-type",
            "qemu",
        ],
    )
    .ok();
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains("volume='d2.img'"), "{x}");
    assert!(x.contains("<memory unit='KiB'>262144</memory>"), "{x}");
    std::fs::remove_file(&back).unwrap();
    pool.download("d2.img", &back);
    assert_same(&second, "raw", &back, "qcow2");
    assert_eq!(pool.volumes(), ["d1.img", "d2.img", "v.img"]);
}

#[test]
fn unreachable_daemon_says_how_to_start_one() {
    let d = tmpdir();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let sock = d.path().join("no-such-sock");
    let u = format!("qemu:///system?socket={}", s(&sock));
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&raw),
        "--connect",
        &u,
        "--pool",
        "p",
        "--volume",
        "v",
    ]);
    one_line_error(&r);
    assert!(
        r.stderr
            .contains(&format!("cannot connect to libvirt at '{u}'"))
            && r.stderr.contains("start libvirtd")
            && r.stderr.contains("--connect"),
        "{}",
        r.stderr
    );
}

#[test]
fn source_failing_mid_stream_leaves_no_volume() {
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let pool = Pool::new();
    // 16 MiB of data first, so the engine has sent several MiB when it reaches the bad cluster at 20 MiB.
    let raw = d.path().join("source.raw");
    make_raw(&raw, 24 * MIB, &[(0, 16 * MIB)], &[]);
    // Compressible data at 20 MiB (the random data above is stored uncompressed by `qemu-img convert -c`).
    let text: Vec<u8> = b"imgshift "
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&text, 20 * MIB)
        .unwrap();
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
    // Garble the compressed data of the cluster at 20 MiB: the map still says data, reading it fails.
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
    let idx = 20 * MIB / 65536;
    f.read_exact_at(&mut b, l2 + idx * 8).unwrap();
    let entry = u64::from_be_bytes(b);
    assert_ne!(entry & (1 << 62), 0, "cluster must be compressed");
    let host = entry & ((1u64 << 54) - 1);
    f.write_all_at(&[0xffu8; 64], host).unwrap();
    drop(f);
    for out in ["qcow2", "raw"] {
        let r = pool.upload(&img, "bad.img", &["-O", out]);
        one_line_error(&r);
        assert!(
            r.stderr.contains(&format!(
                "volume 'bad.img' was removed from pool '{}'",
                pool.name
            )),
            "{}",
            r.stderr
        );
        // It failed mid-stream: megabytes had been sent when the bad cluster was reached.
        let sent: u64 = r
            .stderr
            .split(" bytes had been sent")
            .next()
            .and_then(|t| t.rsplit('(').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in {}", r.stderr));
        assert!(sent >= 4 * MIB, "{sent} bytes sent: {}", r.stderr);
        assert!(pool.volumes().is_empty(), "{:?}", pool.volumes());
        assert!(files_in(pool.dir.path()).is_empty());
    }
}

/// Ctrl-C (SIGINT) halfway through an upload: the stream is aborted and the volume deleted, as after any other
/// failure.
#[test]
fn interrupted_upload_leaves_no_volume() {
    let d = tmpdir();
    let pool = Pool::new();
    // 1 GiB of data: several seconds of upload, time enough to interrupt it.
    let raw = d.path().join("big.raw");
    make_raw(&raw, 1024 * MIB, &[(0, 1024 * MIB)], &[]);
    let u = uri();
    let mut child = Command::new(imgshift_bin())
        .args([
            "upload",
            "libvirt",
            s(&raw),
            "--connect",
            &u,
            "--pool",
            &pool.name,
            "--volume",
            "big.raw",
            "-O",
            "raw",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the volume exists and some data has arrived.
    let path = pool.path("big.raw");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&path).map_or(0, |m| m.blocks() * 512) < 8 * MIB {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "imgshift ended ({st}) before it could be interrupted: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // Exits as the shell expects after SIGINT (128 + 2), in one line.
    assert_eq!(r.code, 130, "stdout={} stderr={}", r.stdout, r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("interrupted") && r.stderr.contains("volume 'big.raw' was removed"),
        "{}",
        r.stderr
    );
    assert!(pool.volumes().is_empty(), "{:?}", pool.volumes());
    assert!(files_in(pool.dir.path()).is_empty());
}

#[test]
fn failed_define_removes_the_volume() {
    let d = tmpdir();
    let pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let state = d.path().join("state");
    // libvirt refuses domain names with '/'; the volume was already uploaded by then.
    let r = pool.upload(
        &raw,
        "v.qcow2",
        &[
            "--define",
            "bad/name",
            "--domain-type",
            "qemu",
            "--state-dir",
            s(&state),
        ],
    );
    one_line_error(&r);
    assert!(
        r.stderr.contains("cannot define domain 'bad/name'")
            && r.stderr.contains("rolled back")
            && r.stderr.contains("deleted volume 'v.qcow2'"),
        "{}",
        r.stderr
    );
    assert!(pool.volumes().is_empty(), "{:?}", pool.volumes());
    // One-shot: the job is rolled back, not kept for `resume`.
    assert!(files_in(&state).is_empty(), "{:?}", files_in(&state));
}

/// A 4 MiB BIOS disk whose boot sector writes `IMGSHIFT-BOOT-OK machine-id=bootsector` to COM1 and powers the
/// machine off through the q35 ACPI PM1a control port (0x604). 16-bit code:
/// `cli; xor ax,ax; mov ds,ax; cld; mov si,msg; l: lodsb; test al,al; jz d; mov dx,0x3f8; out dx,al; jmp l;
/// d: mov dx,0x604; mov ax,0x2000; out dx,ax; h: hlt; jmp h`.
fn boot_sector_disk(path: &Path) {
    let mut sector = vec![
        0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0xfc, 0xbe, 0x1e, 0x7c, 0xac, 0x84, 0xc0, 0x74, 0x06, 0xba,
        0xf8, 0x03, 0xee, 0xeb, 0xf5, 0xba, 0x04, 0x06, 0xb8, 0x00, 0x20, 0xef, 0xf4, 0xeb, 0xfd,
    ];
    assert_eq!(
        sector.len(),
        0x1e,
        "the message must start where `mov si` points"
    );
    sector.extend_from_slice(b"IMGSHIFT-BOOT-OK machine-id=bootsector\r\n\0");
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xaa]);
    std::fs::write(path, &sector).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
}

/// `--define --start` end to end with a guest that needs nothing but BIOS: uploaded from a VMDK as qcow2,
/// automatic firmware (BIOS: no GPT) and disk bus (sata), TCG. The guest prints its marker and powers off.
#[test]
fn started_domain_boots_a_bios_disk_under_tcg() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = d.path().join("bootsector.raw");
    boot_sector_disk(&raw);
    let vmdk = source_in(d.path(), &raw, "vmdk");
    let dom = pool.domain();
    let log = pool.path("serial.log");
    let t0 = Instant::now();
    let r = pool
        .upload(
            &vmdk,
            &format!("{dom}.qcow2"),
            &[
                "--define",
                &dom,
                "--memory",
                "128",
                "--domain-type",
                "qemu",
                "--serial-log",
                s(&log),
                "--start",
                "--output",
                "json",
            ],
        )
        .ok();
    let j = json(&r);
    assert_eq!(j["domain"]["firmware"], "bios", "{}", r.stdout);
    assert_eq!(j["domain"]["disk_bus"], "sata", "{}", r.stdout);
    assert_eq!(j["domain"]["started"], true, "{}", r.stdout);
    wait_shut_off(&dom, &log, 120);
    assert!(
        tail(&log).contains("IMGSHIFT-BOOT-OK machine-id=bootsector"),
        "{}",
        tail(&log)
    );
    eprintln!(
        "boot sector guest: marker and power-off after {:?}",
        t0.elapsed()
    );

    // A running domain is never replaced, even with --overwrite.
    let dom2 = pool.domain();
    let r = pool.upload(
        &vmdk,
        &format!("{dom2}.qcow2"),
        &[
            "--define",
            &dom2,
            "--domain-type",
            "qemu",
            "--firmware",
            "uefi",
            "--start",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(virsh_ok(&["domstate", &dom2]).trim(), "running");
    let r = pool.upload(
        &vmdk,
        "other.qcow2",
        &["--define", &dom2, "--overwrite", "--domain-type", "qemu"],
    );
    one_line_error(&r);
    assert!(
        r.stderr.contains(&format!("domain '{dom2}' is running")),
        "{}",
        r.stderr
    );
    assert!(!pool.volumes().contains(&"other.qcow2".to_string()));
    // Nor is the disk of a running domain deleted by --overwrite.
    let r = pool.upload(&vmdk, &format!("{dom2}.qcow2"), &["--overwrite"]);
    one_line_error(&r);
    assert!(
        r.stderr.contains(&format!(
            "volume '{dom2}.qcow2' in pool '{}' is in use by running domain(s) '{dom2}'",
            pool.name
        )),
        "{}",
        r.stderr
    );
    assert!(pool.volumes().contains(&format!("{dom2}.qcow2")));
}

/// `--firmware uefi --start`: libvirt's firmware auto-selection finds OVMF (without Secure Boot) and the
/// firmware comes up on the serial console.
#[test]
fn started_uefi_domain_runs_ovmf() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = test_raw(d.path(), "blank.raw", MIB);
    let dom = pool.domain();
    let log = pool.path("serial.log");
    pool.upload(
        &raw,
        &format!("{dom}.raw"),
        &[
            "-O",
            "raw",
            "--define",
            &dom,
            "--firmware",
            "uefi",
            "--domain-type",
            "qemu",
            "--memory",
            "256",
            "--serial-log",
            s(&log),
            "--start",
        ],
    )
    .ok();
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains("<loader readonly='yes' type='pflash'"), "{x}");
    assert!(
        !x.contains("secboot") && !x.contains("secure-enrolled"),
        "{x}"
    );
    wait_for_text(&log, "BdsDxe", 90);
}

/// Builds the bootable tiny guest `variant` with `tests/guests/mkguest.sh` (contract: `mkguest.sh VARIANT
/// OUT.raw`; the guest prints `IMGSHIFT-BOOT-OK machine-id=…` on ttyS0 and powers off), converts it to VMDK with
/// qemu-img (a VMware export), uploads it as qcow2 with `--define … --start` under TCG and the automatic
/// firmware, plus `extra`, and waits for the guest to print its marker and shut itself off. Returns the JSON
/// output.
fn boot_contract_guest(variant: &str, extra: &[&str]) -> serde_json::Value {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = d.path().join("guest.raw");
    mkguest(variant, &raw);
    let vmdk = d.path().join("guest.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&raw), s(&vmdk)]);

    let dom = pool.domain();
    let log = pool.path("serial.log");
    let t0 = Instant::now();
    let vol = format!("{dom}.qcow2");
    let mut args = vec![
        "--define",
        &dom,
        "--memory",
        "512",
        "--domain-type",
        "qemu",
        "--serial-log",
        s(&log),
        "--start",
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    let r = pool.upload(&vmdk, &vol, &args).ok();
    let j = json(&r);
    assert_eq!(j["domain"]["started"], true, "{}", r.stdout);
    // 14 s alone under TCG; about 50 s with both guests and the other tests sharing 2 busy cores.
    wait_shut_off(&dom, &log, 180);
    let text = tail(&log);
    let want = boot_marker(variant);
    assert!(
        text.contains("IMGSHIFT-BOOT-OK machine-id="),
        "no marker after {:?}; serial log tail: {text}",
        t0.elapsed()
    );
    assert!(text.contains(&want), "{want} not in {text}");
    eprintln!(
        "{variant} guest booted to the marker and shut off in {:?}",
        t0.elapsed()
    );
    j
}

/// The BIOS guest (MBR + GRUB, virtio drivers in its initramfs) with every automatic choice: inspection picks
/// BIOS firmware and a virtio disk, and it boots on them.
#[test]
fn defined_bios_guest_boots_under_tcg() {
    let j = boot_contract_guest("bios", &[]);
    assert_eq!(j["domain"]["firmware"], "bios");
    assert_eq!(j["domain"]["disk_bus"], "virtio");
}

/// The UEFI guest (GPT + ESP + GRUB EFI): `--firmware auto` finds the ESP and its loader and picks UEFI; virtio.
#[test]
fn defined_uefi_guest_boots_under_tcg() {
    let j = boot_contract_guest("uefi", &[]);
    assert_eq!(j["domain"]["firmware"], "uefi");
    assert_eq!(j["domain"]["disk_bus"], "virtio");
}

/// A guest without virtio drivers: `--disk-bus auto` falls back to sata, on which it boots.
#[test]
fn defined_guest_without_virtio_gets_sata_and_boots() {
    let j = boot_contract_guest("novirtio", &[]);
    assert_eq!(j["domain"]["disk_bus"], "sata");
}

/// Capacity and allocation of a volume, from `virsh vol-info --bytes`.
fn vol_info(pool: &Pool, vol: &str) -> (u64, u64) {
    let out = virsh_ok(&["vol-info", "--bytes", "--pool", &pool.name, vol]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in vol-info: {out}"))
    };
    (field("Capacity:"), field("Allocation:"))
}

/// Holes reach the volume as holes: a 1 GiB disk with 3 MiB of data becomes a raw volume whose allocation is
/// about the data, not the virtual size; only the data crossed the connection, over one sparse stream.
#[test]
fn raw_volume_allocation_is_the_data_not_the_virtual_size() {
    const GIB: u64 = 1 << 30;
    let d = tmpdir();
    let pool = Pool::new();
    let raw = d.path().join("sparse.raw");
    make_raw(
        &raw,
        GIB,
        &[(0, MIB), (GIB / 2 + 4096, MIB), (GIB - MIB, MIB)],
        &[],
    );
    let src = source_in(d.path(), &raw, "qcow2");
    let r = pool
        .upload(&src, "sparse.raw", &["-O", "raw", "--output", "json"])
        .ok();
    let j = json(&r);
    let (capacity, allocation) = vol_info(&pool, "sparse.raw");
    assert_eq!(capacity, GIB, "{}", r.stdout);
    assert!(
        allocation <= 8 * MIB,
        "allocation {allocation} of a 1 GiB volume holding 3 MiB of data ({})",
        r.stdout
    );
    let sent = &j["sent"];
    assert_eq!(sent["streams"], 1, "{}", r.stdout);
    assert!(sent["holes"].as_u64().unwrap() >= 2, "{}", r.stdout);
    assert!(
        sent["bytes_sent"].as_u64().unwrap() <= 4 * MIB,
        "{}",
        r.stdout
    );
    assert_eq!(
        sent["bytes_sent"].as_u64().unwrap() + sent["skipped_bytes"].as_u64().unwrap(),
        GIB,
        "data and holes cover the disk: {}",
        r.stdout
    );
    let back = d.path().join("back.raw");
    virsh_ok(&[
        "vol-download",
        "--sparse",
        "--pool",
        &pool.name,
        "sparse.raw",
        s(&back),
    ]);
    assert_same(&raw, "raw", &back, "raw");
}

/// The daemon's socket, from the test URI's `socket=` (the system socket without one).
fn daemon_socket() -> String {
    let u = uri();
    u.split_once("socket=")
        .map(|(_, p)| p.split('&').next().unwrap_or(p).to_string())
        .unwrap_or_else(|| "/run/libvirt/libvirt-sock".into())
}

/// An `ssh` stand-in: records its arguments, then carries stdin/stdout to the daemon's socket as
/// `virt-ssh-helper` on the far host would.
fn fake_ssh(dir: &Path) -> (PathBuf, PathBuf) {
    let args_log = dir.join("ssh-args");
    let script = dir.join("fake-ssh");
    std::fs::write(
        &script,
        format!(
            r#"#!/usr/bin/env python3
import os, socket, sys, threading
open({log:?}, "w").write("\n".join(sys.argv[1:]))
s = socket.socket(socket.AF_UNIX)
s.connect({sock:?})
def up():
    while True:
        b = os.read(0, 65536)
        if not b:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(b)
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    sys.stdout.buffer.write(b)
    sys.stdout.buffer.flush()
"#,
            log = s(&args_log),
            sock = daemon_socket()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, args_log)
}

/// `qemu+ssh://`: the protocol goes over `ssh HOST virt-ssh-helper qemu:///system`'s stdin and stdout.
#[test]
fn uploads_over_the_ssh_transport() {
    let d = tmpdir();
    let pool = Pool::new();
    let (ssh, args_log) = fake_ssh(d.path());
    let raw = test_raw(d.path(), "source.raw", MIB);
    let u = format!(
        "qemu+ssh://tester@imgshift-test-host:2222/system?command={}",
        s(&ssh)
    );
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&raw),
        "--connect",
        &u,
        "--pool",
        &pool.name,
        "--volume",
        "over-ssh.raw",
        "-O",
        "raw",
    ])
    .ok();
    assert_eq!(r.stdout.trim(), s(&pool.path("over-ssh.raw")));
    let args = std::fs::read_to_string(&args_log).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        args,
        [
            "-p",
            "2222",
            "-l",
            "tester",
            "-T",
            "-e",
            "none",
            "--",
            "imgshift-test-host",
            "virt-ssh-helper",
            "qemu:///system"
        ]
    );
    assert_same(&raw, "raw", &pool.path("over-ssh.raw"), "raw");
}

/// A failing `ssh` is named, with what it said, on one line.
#[test]
fn ssh_failure_names_ssh_and_what_it_said() {
    let d = tmpdir();
    let ssh = d.path().join("failing-ssh");
    std::fs::write(
        &ssh,
        "#!/bin/sh\necho 'ssh: Could not resolve hostname nohost.invalid: Name or service not known' >&2\nexit 255\n",
    )
    .unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let raw = test_raw(d.path(), "source.raw", MIB);
    let u = format!("qemu+ssh://nohost.invalid/system?command={}", s(&ssh));
    let r = imgshift(&[
        "upload",
        "libvirt",
        s(&raw),
        "--connect",
        &u,
        "--pool",
        "p",
        "--volume",
        "v",
    ]);
    one_line_error(&r);
    assert!(
        r.stderr.contains("ssh to nohost.invalid")
            && r.stderr
                .contains("Could not resolve hostname nohost.invalid"),
        "{}",
        r.stderr
    );
}

/// `qemu:///session` with no session daemon running: imgshift starts one (`libvirtd --timeout=120`, as
/// libvirt's own client does) under the user's runtime folder, and reaches it.
#[test]
fn starts_a_session_daemon_when_none_runs() {
    let daemon = SessionDaemon::folders();
    let sock = daemon.dir.path().join("run/libvirt/libvirt-sock");
    assert!(!sock.exists());
    let raw = daemon.dir.path().join("source.raw");
    make_raw(&raw, 4 * MIB, &[(0, MIB)], &[]);
    let out = daemon
        .as_user(s(&imgshift_bin()))
        .args([
            "upload",
            "libvirt",
            s(&raw),
            "--connect",
            "qemu:///session",
            "--pool",
            "imgshift-no-such-pool",
            "--volume",
            "v.raw",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The daemon answered: the pool lookup is what failed.
    assert!(
        stderr.contains("storage pool 'imgshift-no-such-pool' not found at qemu:///session"),
        "{stderr}"
    );
    assert!(sock.exists(), "no session socket at {}", sock.display());
    assert!(
        daemon.dir.path().join("run/libvirt/libvirtd.pid").exists(),
        "the daemon's pid file (for the clean-up)"
    );
}

/// Runs `upload libvirt` with `IMGSHIFT_TEST_PAUSE_AT=point` and kills it with SIGKILL once it paused there
/// (no clean-up of any kind runs). Returns the id of the one job journal in `state`.
fn upload_and_kill(
    pool: &Pool,
    src: &Path,
    vol: &str,
    extra: &[&str],
    state: &Path,
    point: &str,
) -> String {
    use std::io::{BufRead, BufReader};
    let u = uri();
    let mut child = Command::new(imgshift_bin())
        .args([
            "upload",
            "libvirt",
            s(src),
            "--connect",
            &u,
            "--pool",
            &pool.name,
            "--volume",
            vol,
            "--state-dir",
            s(state),
        ])
        .args(extra)
        .env("IMGSHIFT_TEST_PAUSE_AT", point)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
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
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains(&want), "never paused at {point}: {seen}");
    let jobs: Vec<String> = files_in(state)
        .into_iter()
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs[0].clone()
}

/// `upload libvirt` is a job of the runner: killed with -9 after its upload, `resume` defines the domain without
/// sending the volume again, and `jobs cancel` removes the volume of another killed upload.
#[test]
fn killed_upload_is_resumed_or_cancelled_as_a_job() {
    let d = tmpdir();
    let mut pool = Pool::new();
    let raw = test_raw(d.path(), "source.raw", 2 * MIB);
    let state = d.path().join("state");
    let dom = pool.domain();
    let vol = format!("{dom}.qcow2");
    let choices = [
        "--define",
        &dom,
        "--domain-type",
        "qemu",
        "--firmware",
        "bios",
        "--disk-bus",
        "virtio",
    ];
    let job = upload_and_kill(&pool, &raw, &vol, &choices, &state, "after-upload");
    assert_eq!(pool.volumes(), std::slice::from_ref(&vol));
    assert!(
        virsh(&["dominfo", &dom]).code != 0,
        "{dom} defined too early"
    );
    let inode = std::fs::metadata(pool.path(&vol)).unwrap().ino();

    let r = imgshift(&["resume", &job, "--state-dir", s(&state)]).ok();
    assert_eq!(
        r.stdout.trim(),
        format!("{}\ndomain {dom}", s(&pool.path(&vol)))
    );
    assert_eq!(
        std::fs::metadata(pool.path(&vol)).unwrap().ino(),
        inode,
        "the volume was made again"
    );
    let x = virsh_ok(&["dumpxml", &dom]);
    assert!(x.contains(&format!("volume='{vol}'")), "{x}");
    assert_same(&raw, "raw", &pool.path(&vol), "qcow2");
    assert!(files_in(&state).iter().all(|f| !f.ends_with(".json")));

    let job = upload_and_kill(
        &pool,
        &raw,
        "other.raw",
        &["-O", "raw"],
        &state,
        "after-upload",
    );
    assert!(pool.volumes().contains(&"other.raw".to_string()));
    let r = imgshift(&["jobs", "cancel", &job, "--state-dir", s(&state)]).ok();
    assert!(
        r.stdout.contains("deleted volume 'other.raw'"),
        "{}",
        r.stdout
    );
    assert_eq!(pool.volumes(), [vol]);
    assert!(files_in(&state).iter().all(|f| !f.ends_with(".json")));
}
