//! Runs virt-sysprep (libguestfs) on the overlay: libguestfs's appliance does every guest filesystem write
//! (ext4, XFS, btrfs, LVM alike); imgshift never writes a guest filesystem itself.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::operations::Operation;

/// The program, looked up on PATH.
pub const VIRT_SYSPREP: &str = "virt-sysprep";

/// Why libguestfs is needed and how to get it, for the one-line error.
pub const INSTALL_HINT: &str = "generalisation needs libguestfs's virt-sysprep: install it with `apt-get install \
     libguestfs-tools` (Debian/Ubuntu) or `dnf install guestfs-tools` (Fedora/RHEL)";

/// Finds virt-sysprep on PATH.
pub fn find() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(VIRT_SYSPREP);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{INSTALL_HINT}")
}

/// The virt-sysprep arguments for `ops` on a qcow2 overlay.
pub fn args(overlay: &Path, ops: &[&Operation], hostname: Option<&str>) -> Vec<String> {
    let mut names: Vec<&str> = ops.iter().flat_map(|o| o.sysprep.iter().copied()).collect();
    let deletes: Vec<&str> = ops.iter().flat_map(|o| o.delete.iter().copied()).collect();
    // `--delete` and `--hostname` belong to the customize operation.
    let customize = !deletes.is_empty() || hostname.is_some();
    if customize {
        names.push("customize");
    }
    let mut a = vec![
        "--quiet".to_string(),
        "--format".into(),
        "qcow2".into(),
        "-a".into(),
        overlay.to_string_lossy().into_owned(),
        "--operations".into(),
        names.join(","),
    ];
    for d in deletes {
        a.push("--delete".into());
        a.push(d.into());
    }
    if let Some(h) = hostname {
        a.push("--hostname".into());
        a.push(h.into());
    }
    // virt-customize gives a guest with an empty machine-id a new random one before its own steps (measured with
    // guestfs-tools 1.48): every copy of the image would then share it. Emptying it again as customize's last
    // step leaves it empty for systemd to generate at first boot.
    if customize && ops.iter().any(|o| o.name == "machine-id") {
        a.push("--truncate".into());
        a.push("/etc/machine-id".into());
    }
    a
}

/// Runs virt-sysprep; returns how long it took. Its own messages are folded into the one-line error.
pub fn run(overlay: &Path, ops: &[&Operation], hostname: Option<&str>) -> Result<Duration> {
    let program = find()?;
    let started = Instant::now();
    let out = Command::new(&program)
        .args(args(overlay, ops, hostname))
        // No network in the appliance; libguestfs's own defaults otherwise (LIBGUESTFS_* from the environment).
        .arg("--no-network")
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "virt-sysprep failed ({}): {}",
            out.status,
            error_line(&stderr)
        );
    }
    Ok(started.elapsed())
}

/// The line of virt-sysprep's messages that says what went wrong (its `error:` line; not the "run with -v -x"
/// advice that follows it).
fn error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.contains("error:"))
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|l| !l.contains("-v -x") && !l.starts_with("If reporting bugs"))
        })
        .map_or_else(|| "no message".to_string(), |l| l.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::operations::{find as op, select};
    use super::*;

    #[test]
    fn arguments_name_every_operation_and_deletion() {
        let ops = select(Some("machine-id,cloud-init,shell-history"), None).unwrap();
        let a = args(Path::new("/x/o.qcow2"), &ops, Some("web1"));
        let ops_arg = &a[a.iter().position(|s| s == "--operations").unwrap() + 1];
        assert_eq!(ops_arg, "machine-id,bash-history,customize");
        assert!(
            a.windows(2)
                .any(|w| w[0] == "--delete" && w[1] == "/var/lib/cloud/instance")
        );
        assert!(a.windows(2).any(|w| w[0] == "--hostname" && w[1] == "web1"));
        assert!(a.windows(2).any(|w| w[0] == "--format" && w[1] == "qcow2"));
        assert_eq!(a[a.len() - 2..], ["--truncate", "/etc/machine-id"]);
        let plain = args(Path::new("o.qcow2"), &[op("logs").unwrap()], None);
        assert!(!plain.iter().any(|s| s.contains("customize")));
    }

    #[test]
    fn error_line_skips_the_debugging_advice() {
        let e = "virt-sysprep: error: libguestfs error: could not create appliance\n\nIf reporting bugs, run \
                 virt-sysprep with debugging enabled and include the complete output:\n\n  virt-sysprep -v -x [...]\n";
        assert_eq!(
            error_line(e),
            "virt-sysprep: error: libguestfs error: could not create appliance"
        );
    }
}
