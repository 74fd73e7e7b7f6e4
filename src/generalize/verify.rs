//! imgshift's own before/after view of a guest for generalisation: which of the operations' paths exist (with
//! their sizes), and the hashes of a few files that must stay untouched. Read-only, through the same inspection
//! code as `imgshift inspect`; libguestfs's word alone is not the report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Result, bail};
use ext4_view::Ext4;
use imgshift_converters::DiskSource;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::guest::Window;
use crate::guest::partitions;
use crate::guest::report::{self, Report};

/// Most directory entries one glob may visit (a crafted guest cannot make the walk unbounded).
const MAX_VISITS: usize = 20_000;
/// Deepest folder nesting a `**` walks into.
const MAX_DEPTH: usize = 12;
/// Largest file hashed for the "kept intact" check.
const MAX_HASHED: u64 = 16 << 20;

/// Files that generalisation must leave intact, hashed before and after.
pub const KEPT: &[&str] = &[
    "/etc/os-release",
    "/etc/fstab",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
];

/// One file found by a glob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Found {
    /// Size in bytes.
    pub size: u64,
}

/// The guest as seen through one image (the source, or the overlay over it).
pub struct GuestView {
    /// Device of the root filesystem (`/dev/sda1`).
    pub root: String,
    /// The inspection report.
    pub report: Report,
    fs: Ext4,
}

/// Refuses guests generalisation cannot handle safely: Windows, encrypted volumes, roots imgshift cannot read.
pub fn refuse_unsupported(report: &Report) -> Result<()> {
    if let Some((dev, _)) = report
        .filesystems
        .iter()
        .find(|(_, f)| f.fs_type.eq_ignore_ascii_case("crypto_LUKS"))
    {
        bail!(
            "{dev} is an encrypted (LUKS) volume: imgshift does not generalise encrypted guests (nothing was changed)"
        );
    }
    refuse_bitlocker(report)?;
    if let Some(w) = report.windows.first() {
        bail!("{}", windows_refusal(w));
    }
    if report.operatingsystems.is_empty() {
        if let Some((dev, _)) = report.filesystems.iter().find(|(_, f)| f.fs_type == "ntfs") {
            bail!(
                "{dev} holds NTFS: a Windows guest cannot be generalised offline; run \
                 `C:\\Windows\\System32\\Sysprep\\sysprep.exe /generalize /oobe /shutdown` inside it before capturing"
            );
        }
        let kinds: Vec<String> = report
            .filesystems
            .iter()
            .map(|(d, f)| format!("{d} {}", f.fs_type))
            .collect();
        bail!(
            "no Linux root filesystem imgshift can read (it reads ext2/3/4; found: {}): generalisation needs \
             one to verify its result",
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            }
        );
    }
    Ok(())
}

fn refuse_bitlocker(report: &Report) -> Result<()> {
    if let Some((dev, _)) = report
        .filesystems
        .iter()
        .find(|(_, f)| f.fs_type == "BitLocker")
    {
        bail!(
            "{dev} is a BitLocker-encrypted volume: imgshift does not write to encrypted guests (nothing was changed)"
        );
    }
    Ok(())
}

/// Why a Windows guest is not generalised here: imgshift cannot run sysprep offline, and does not pretend to.
pub fn windows_refusal(w: &crate::guest::windows::WindowsInstall) -> String {
    let state = match (w.generalized, &w.image_state) {
        (Some(false), Some(s)) => format!("is not generalised (ImageState {s})"),
        (Some(false), None) => "is not generalised (SYSTEM\\Setup)".to_string(),
        _ => "has a sysprep state imgshift could not read".to_string(),
    };
    format!(
        "{} holds {} and {state}: Windows cannot be generalised offline (nothing was changed); run \
         `C:\\Windows\\System32\\Sysprep\\sysprep.exe /generalize /oobe /shutdown` inside the guest, then \
         capture the disk it leaves",
        w.root,
        w.product_name.as_deref().unwrap_or("Windows")
    )
}

/// For a Windows guest: `Ok(Some(message))` when it is already generalised (sysprep /generalize ran: nothing to
/// do), `Err` naming the sysprep command when it is not (or its state is unknown); `Ok(None)` when the disk holds
/// no Windows.
pub fn windows_state(src: Arc<dyn DiskSource>) -> Result<Option<String>> {
    let disk = Window::whole(src, Arc::new(AtomicU64::new(0)));
    let report = report::inspect(&disk);
    refuse_bitlocker(&report)?;
    let Some(w) = report.windows.first() else {
        return Ok(None);
    };
    if w.generalized == Some(true) {
        return Ok(Some(format!(
            "{} holds {} that is already generalised (ImageState {}): nothing to do, no overlay written",
            w.root,
            w.product_name.as_deref().unwrap_or("Windows"),
            w.image_state
                .as_deref()
                .unwrap_or("not set; SYSTEM\\Setup runs windeploy")
        )));
    }
    bail!("{}", windows_refusal(w))
}

/// Inspects `src` and opens its (first) Linux root filesystem.
pub fn open(src: Arc<dyn DiskSource>) -> Result<GuestView> {
    let disk = Window::whole(src, Arc::new(AtomicU64::new(0)));
    let report = report::inspect(&disk);
    refuse_unsupported(&report)?;
    let Some(os) = report.operatingsystems.first() else {
        bail!("no Linux root filesystem found");
    };
    let root = os.root.clone();
    let window = root_window(&disk, &root)?;
    let fs = match crate::guest::fs::open_ext4(&window) {
        Ok(fs) => fs,
        Err(e) => bail!("{root}: cannot read the root filesystem: {e}"),
    };
    Ok(GuestView { root, report, fs })
}

/// The window of the filesystem the report calls `device` (`/dev/sda` for a whole-disk filesystem).
fn root_window(disk: &Window, device: &str) -> Result<Window> {
    if device == "/dev/sda" {
        return Ok(disk.clone());
    }
    let number: u32 = device
        .strip_prefix("/dev/sda")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected root device name {device}"))?;
    let table = partitions::read(disk);
    let p = table
        .partitions
        .iter()
        .find(|p| p.number == number)
        .ok_or_else(|| anyhow::anyhow!("{device} is gone from the partition table"))?;
    disk.sub(p.start, p.size)
        .ok_or_else(|| anyhow::anyhow!("{device} lies outside the disk"))
}

impl GuestView {
    /// Every existing path matching any of `globs`, with its size.
    pub fn find(&self, globs: &[&str]) -> BTreeMap<String, Found> {
        let mut out = BTreeMap::new();
        for g in globs {
            let parts: Vec<&str> = g.split('/').filter(|p| !p.is_empty()).collect();
            let mut visits = 0usize;
            self.walk("", &parts, 0, &mut out, &mut visits);
        }
        out
    }

    fn walk(
        &self,
        dir: &str,
        parts: &[&str],
        depth: usize,
        out: &mut BTreeMap<String, Found>,
        visits: &mut usize,
    ) {
        let Some((first, rest)) = parts.split_first() else {
            return;
        };
        if *visits >= MAX_VISITS || depth > MAX_DEPTH {
            return;
        }
        if *first == "**" {
            // Zero folders deep, then every subfolder with the same pattern.
            self.walk(dir, rest, depth, out, visits);
            for (name, is_dir) in self.list(dir, visits) {
                if is_dir {
                    self.walk(&format!("{dir}/{name}"), parts, depth + 1, out, visits);
                }
            }
            return;
        }
        let names: Vec<(String, bool)> = if first.contains('*') {
            self.list(dir, visits)
                .into_iter()
                .filter(|(n, _)| wildcard(first, n))
                .collect()
        } else {
            let p = format!("{dir}/{first}");
            match self.fs.symlink_metadata(p.as_str()) {
                Ok(m) => vec![(first.to_string(), m.is_dir())],
                Err(_) => Vec::new(),
            }
        };
        for (name, is_dir) in names {
            let p = format!("{dir}/{name}");
            if rest.is_empty() {
                if let Ok(m) = self.fs.symlink_metadata(p.as_str()) {
                    out.insert(p, Found { size: m.len() });
                }
            } else if is_dir {
                self.walk(&p, rest, depth + 1, out, visits);
            }
        }
    }

    fn list(&self, dir: &str, visits: &mut usize) -> Vec<(String, bool)> {
        let path = if dir.is_empty() { "/" } else { dir };
        let Ok(rd) = self.fs.read_dir(path) else {
            return Vec::new();
        };
        let mut v = Vec::new();
        for e in rd {
            if *visits >= MAX_VISITS {
                break;
            }
            *visits += 1;
            let Ok(e) = e else { continue };
            let Ok(name) = e.file_name().as_str().map(str::to_string) else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            v.push((name, is_dir));
        }
        v
    }

    /// SHA-256 (hex) of each of `paths` that exists as a regular file of at most 16 MiB.
    pub fn hashes(&self, paths: &[&str]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for p in paths {
            let Ok(m) = self.fs.metadata(*p) else {
                continue;
            };
            if !m.file_type().is_regular_file() || m.len() > MAX_HASHED {
                continue;
            }
            if let Ok(data) = self.fs.read(*p) {
                out.insert((*p).to_string(), hex(&Sha256::digest(&data)));
            }
        }
        out
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Shell-style `*` matching within one name (no other metacharacters).
fn wildcard(pattern: &str, name: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return pattern == name;
    };
    if pieces.len() == 1 {
        return pattern == name;
    }
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut at = first.len();
    let end = name.len() - last.len();
    for mid in pieces.iter().skip(1).take(pieces.len().saturating_sub(2)) {
        match name.get(at..end).and_then(|s| s.find(mid)) {
            Some(i) => at += i + mid.len(),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::wildcard;

    #[test]
    fn wildcards_match_within_a_name() {
        assert!(wildcard("ssh_host_*", "ssh_host_rsa_key"));
        assert!(wildcard("*.log", "syslog.log"));
        assert!(!wildcard("*.log", "log"));
        assert!(wildcard("*", "anything"));
        assert!(wildcard("a*b*c", "axxbyyc"));
        assert!(!wildcard("a*b*c", "axxc"));
        assert!(wildcard("exact", "exact") && !wildcard("exact", "exactly"));
    }
}
