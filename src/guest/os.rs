//! Facts read from a Linux root filesystem (ext2/3/4 through `ext4-view`): os-release, hostname, fstab,
//! machine-specific state, agents, kernels with their initramfs drivers, architecture. Every file read is capped.

use std::collections::BTreeMap;

use ext4_view::Ext4;
use serde::Serialize;

use super::initramfs;

const MAX_SMALL: u64 = 256 << 10;
const MAX_INITRAMFS: u64 = 128 << 20;
const MAX_DIR: usize = 4096;

/// One fstab line.
#[derive(Debug, Clone, Serialize)]
pub struct FstabEntry {
    /// First field as written.
    pub spec: String,
    /// Mount point.
    pub mountpoint: String,
    /// Filesystem type.
    pub vfstype: String,
    /// "uuid", "label", "partuuid", "partlabel", "device" (a /dev/ name that depends on the bus) or "other".
    pub by: String,
}

/// A kernel under /boot.
#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    /// Version from the file name.
    pub version: String,
    /// The initramfs file, if one matches.
    pub initramfs: Option<String>,
    /// Compression of its archives.
    pub initramfs_archives: Vec<String>,
    /// Driver modules in the initramfs.
    pub initramfs_modules: Vec<String>,
    /// Drivers built into the kernel (modules.builtin).
    pub builtin: Vec<String>,
}

/// What the root filesystem says.
#[derive(Debug, Clone, Serialize, Default)]
pub struct OsFacts {
    pub distro: Option<String>,
    pub product_name: Option<String>,
    pub version_id: Option<String>,
    pub major_version: Option<u32>,
    pub minor_version: Option<u32>,
    pub hostname: Option<String>,
    pub arch: Option<String>,
    pub fstab: Vec<FstabEntry>,
    pub machine_id: bool,
    pub ssh_host_keys: Vec<String>,
    pub agents: Vec<String>,
    pub kernels: Vec<Kernel>,
    /// Drivers available at boot across the newest kernel's initramfs and builtins.
    pub drivers: Vec<String>,
    pub problems: Vec<String>,
}

/// Reads a file of at most `cap` bytes; `None` when absent, too large or unreadable.
fn read_capped(fs: &Ext4, path: &str, cap: u64) -> Option<Vec<u8>> {
    let mut f = fs.open(path).ok()?;
    let len = f.metadata().len();
    if len > cap {
        return None;
    }
    let mut out = vec![0u8; usize::try_from(len).ok()?];
    let mut filled = 0;
    while filled < out.len() {
        let n = f.read_bytes(out.get_mut(filled..)?).ok()?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    out.truncate(filled);
    Some(out)
}

fn read_text(fs: &Ext4, path: &str) -> Option<String> {
    read_capped(fs, path, MAX_SMALL).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn list_dir(fs: &Ext4, path: &str) -> Vec<String> {
    let Ok(rd) = fs.read_dir(path) else {
        return Vec::new();
    };
    rd.take(MAX_DIR)
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect()
}

fn exists(fs: &Ext4, path: &str) -> bool {
    fs.exists(path).unwrap_or(false)
}

/// Parses os-release `KEY=value` lines.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .take(1000)
        .filter_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'');
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn classify(spec: &str) -> &'static str {
    let up = spec.to_ascii_uppercase();
    if up.starts_with("UUID=") || spec.starts_with("/dev/disk/by-uuid/") {
        "uuid"
    } else if up.starts_with("PARTUUID=") || spec.starts_with("/dev/disk/by-partuuid/") {
        "partuuid"
    } else if up.starts_with("LABEL=") || spec.starts_with("/dev/disk/by-label/") {
        "label"
    } else if up.starts_with("PARTLABEL=") {
        "partlabel"
    } else if spec.starts_with("/dev/mapper/") || spec.starts_with("/dev/disk/") {
        "other"
    } else if spec.starts_with("/dev/") {
        "device"
    } else {
        "other"
    }
}

/// Parses fstab (non-comment lines with at least 3 fields).
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .take(1000)
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let mut f = l.split_whitespace();
            let (spec, mp, t) = (f.next()?, f.next()?, f.next()?);
            Some(FstabEntry {
                by: classify(spec).into(),
                spec: spec.into(),
                mountpoint: mp.into(),
                vfstype: t.into(),
            })
        })
        .collect()
}

/// Architecture from an ELF header (or a bzImage's boot-sector signature).
pub fn elf_arch(h: &[u8]) -> Option<&'static str> {
    if h.get(0..4) == Some(b"\x7fELF") {
        let m = super::le_u16(h, 18)?;
        return Some(match m {
            0x3e => "x86_64",
            0x03 => "i386",
            0xb7 => "aarch64",
            0x28 => "arm",
            0xf3 => "riscv64",
            0x15 => "ppc64",
            0x16 => "s390x",
            _ => return None,
        });
    }
    None
}

fn arch(fs: &Ext4) -> Option<String> {
    for p in ["/bin/sh", "/usr/bin/sh", "/bin/busybox", "/sbin/init", "/usr/lib/systemd/systemd"] {
        if let Ok(mut f) = fs.open(p) {
            let mut h = [0u8; 64];
            if f.read_bytes(&mut h).is_ok() {
                if let Some(a) = elf_arch(&h) {
                    return Some(a.into());
                }
            }
        }
    }
    None
}

/// Agents: (name, paths that show it installed).
const AGENTS: &[(&str, &[&str])] = &[
    ("cloud-init", &["/usr/bin/cloud-init", "/etc/cloud/cloud.cfg"]),
    ("waagent", &["/usr/sbin/waagent", "/etc/waagent.conf"]),
    ("amazon-ssm-agent", &["/usr/bin/amazon-ssm-agent", "/snap/amazon-ssm-agent"]),
    ("qemu-guest-agent", &["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]),
];

/// Inspects an ext2/3/4 root (`/etc/os-release` or `/usr/lib/os-release` present) or `/boot` filesystem.
pub fn inspect(fs: &Ext4, boot: Option<&Ext4>) -> OsFacts {
    let mut o = OsFacts::default();
    let rel = read_text(fs, "/etc/os-release").or_else(|| read_text(fs, "/usr/lib/os-release"));
    if let Some(rel) = rel {
        let m = parse_os_release(&rel);
        o.distro = m.get("ID").cloned();
        o.product_name = m.get("PRETTY_NAME").or(m.get("NAME")).cloned();
        o.version_id = m.get("VERSION_ID").cloned();
        if let Some(v) = &o.version_id {
            let mut it = v.split('.');
            o.major_version = it.next().and_then(|s| s.parse().ok());
            o.minor_version = Some(it.next().and_then(|s| s.parse().ok()).unwrap_or(0));
        }
    }
    o.hostname = read_text(fs, "/etc/hostname")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    o.fstab = read_text(fs, "/etc/fstab").map(|t| parse_fstab(&t)).unwrap_or_default();
    o.machine_id = read_text(fs, "/etc/machine-id").is_some_and(|s| !s.trim().is_empty());
    let mut keys: Vec<String> = list_dir(fs, "/etc/ssh")
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_") && !n.ends_with(".pub"))
        .collect();
    keys.sort();
    o.ssh_host_keys = keys;
    o.agents = AGENTS
        .iter()
        .filter(|(_, paths)| paths.iter().any(|p| exists(fs, p)))
        .map(|(n, _)| n.to_string())
        .collect();
    o.arch = arch(fs);
    // Kernels live in /boot of the root, or at the top of a separate /boot filesystem.
    let (bfs, prefix) = match boot {
        Some(b) => (b, ""),
        None => (fs, "/boot"),
    };
    let dir = if prefix.is_empty() { "/" } else { prefix };
    let names = list_dir(bfs, dir);
    let mut versions: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-").or_else(|| n.strip_prefix("vmlinux-")))
        .map(str::to_string)
        .collect();
    versions.sort_by(|a, b| version_cmp(b, a));
    for (i, v) in versions.iter().enumerate().take(8) {
        let rd = [format!("initrd.img-{v}"), format!("initramfs-{v}.img"), format!("initrd-{v}")]
            .into_iter()
            .find(|n| names.contains(n));
        let mut k = Kernel {
            version: v.clone(),
            initramfs: rd.clone(),
            initramfs_archives: Vec::new(),
            initramfs_modules: Vec::new(),
            builtin: Vec::new(),
        };
        if let Some(t) = read_text(fs, &format!("/lib/modules/{v}/modules.builtin"))
            .or_else(|| read_text(fs, &format!("/usr/lib/modules/{v}/modules.builtin")))
        {
            k.builtin = initramfs::builtin_drivers(&t);
        }
        // Only the newest kernel's initramfs is read (it is what boots by default).
        if let (0, Some(rd)) = (i, rd) {
            let path = format!("{prefix}/{rd}");
            match read_capped(bfs, &path, MAX_INITRAMFS) {
                Some(data) => {
                    let l = initramfs::list(&data);
                    k.initramfs_archives = l.archives;
                    k.initramfs_modules = l.modules;
                    if let Some(b) = l.builtin {
                        for d in initramfs::builtin_drivers(&b) {
                            if !k.builtin.contains(&d) {
                                k.builtin.push(d);
                            }
                        }
                    }
                    o.problems.extend(l.problems.into_iter().map(|p| format!("{path}: {p}")));
                }
                None => o.problems.push(format!("{path}: unreadable or larger than {MAX_INITRAMFS} bytes")),
            }
        }
        o.kernels.push(k);
    }
    if let Some(k) = o.kernels.first() {
        let mut d: Vec<String> = k.initramfs_modules.iter().chain(&k.builtin).cloned().collect();
        d.sort();
        d.dedup();
        o.drivers = d;
    }
    if o.arch.is_none() {
        o.problems.push("architecture unknown: no ELF /bin/sh or init found".into());
    }
    o
}

/// Compares kernel versions numerically where they are numbers ("6.1.0-10" > "6.1.0-9").
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .map(|p| (p.parse().unwrap_or(0), p.to_string()))
            .collect()
    };
    parts(a).cmp(&parts(b))
}
