//! Helpers for tests against the private libvirtd (`bash .ci/standins start`): virsh, transient dir pools that
//! clean up after themselves, serial-log waits, and the bootable test guests of `tests/guests/mkguest.sh`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;

pub const DEFAULT_URI: &str =
    "qemu:///system?socket=/var/tmp/imgshift-standins/libvirt/run/libvirt-sock";

pub fn uri() -> String {
    std::env::var("IMGSHIFT_LIBVIRT_URI").unwrap_or_else(|_| DEFAULT_URI.to_string())
}

pub fn virsh(args: &[&str]) -> Run {
    let out = Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(uri())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run virsh ({e}): install libvirt-clients (`bash .ci/install-deps`)")
        });
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn virsh_ok(args: &[&str]) -> String {
    let r = virsh(args);
    assert_eq!(r.code, 0, "virsh {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "imgshift-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A transient dir pool; destroyed (its domains destroyed and undefined first) when dropped.
pub struct Pool {
    pub name: String,
    /// Under /var/tmp and world-traversable: QEMU runs as libvirt-qemu and must reach the volumes.
    pub dir: tempfile::TempDir,
    pub domains: Vec<String>,
}

impl Pool {
    pub fn new() -> Pool {
        let r = virsh(&["uri"]);
        assert_eq!(
            r.code,
            0,
            "libvirtd is not reachable at {}: start it with `bash .ci/standins start` ({})",
            uri(),
            r.stderr.trim()
        );
        let dir = tempfile::Builder::new()
            .prefix("imgshift-lvpool")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let name = unique("pool");
        virsh_ok(&["pool-create-as", &name, "dir", "--target", s(dir.path())]);
        Pool {
            name,
            dir,
            domains: Vec::new(),
        }
    }

    pub fn upload(&self, src: &Path, vol: &str, extra: &[&str]) -> Run {
        let u = uri();
        let mut args = vec![
            "upload",
            "libvirt",
            s(src),
            "--connect",
            &u,
            "--pool",
            &self.name,
            "--volume",
            vol,
        ];
        args.extend_from_slice(extra);
        imgshift(&args)
    }

    /// A domain name that is cleaned up with the pool.
    pub fn domain(&mut self) -> String {
        let d = unique("dom");
        self.domains.push(d.clone());
        d
    }

    pub fn download(&self, vol: &str, dst: &Path) {
        virsh_ok(&["vol-download", "--pool", &self.name, vol, s(dst)]);
    }

    pub fn vol_xml(&self, vol: &str) -> String {
        virsh_ok(&["vol-dumpxml", "--pool", &self.name, vol])
    }

    pub fn volumes(&self) -> Vec<String> {
        let mut v: Vec<String> = virsh_ok(&["vol-list", "--pool", &self.name])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    pub fn path(&self, vol: &str) -> PathBuf {
        self.dir.path().join(vol)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d, "--nvram"]);
        }
        let _ = virsh(&["pool-destroy", &self.name]);
    }
}

/// The last 2000 characters of a (serial log) file.
pub fn tail(path: &Path) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let skip = text.chars().count().saturating_sub(2000);
    text.chars().skip(skip).collect()
}

/// Waits until `dom` is shut off (the guest powered itself off); panics with the serial log's tail after
/// `secs`.
pub fn wait_shut_off(dom: &str, log: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let state = virsh_ok(&["domstate", dom]);
        if state.trim() == "shut off" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{dom} still '{}' after {secs} s; serial log tail: {}",
            state.trim(),
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until the serial log holds `text`; panics with its tail after `secs`.
pub fn wait_for_text(log: &Path, text: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !tail(log).contains(text) {
        assert!(
            Instant::now() < deadline,
            "no '{text}' after {secs} s; serial log tail: {}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// md5 through coreutils' md5sum (the guests' machine-id is md5("imgshift-VARIANT")).
pub fn md5_hex(data: &[u8]) -> u128 {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    u128::from_str_radix(hex.split_whitespace().next().unwrap(), 16).unwrap()
}

/// Builds the bootable tiny guest `variant` as raw `out` with `tests/guests/mkguest.sh` (contract: `mkguest.sh
/// VARIANT OUT.raw`; the guest prints `IMGSHIFT-BOOT-OK machine-id=md5("imgshift-VARIANT")` on ttyS0 and powers
/// off).
pub fn mkguest(variant: &str, out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/mkguest.sh");
    assert!(
        script.exists(),
        "{} is missing: the bootable test guests come from the inspection work (branch work-inspect)",
        script.display()
    );
    let r = Command::new("bash")
        .arg(&script)
        .arg(variant)
        .arg(out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "mkguest.sh {variant}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// The marker line the guest `variant` prints when it booted.
pub fn boot_marker(variant: &str) -> String {
    format!(
        "IMGSHIFT-BOOT-OK machine-id={:x}",
        md5_hex(format!("imgshift-{variant}").as_bytes())
    )
}
