//! Facts read from a Linux root filesystem (ext2/3/4 through `ext4-view`): os-release, hostname, fstab,
//! machine-specific state, agents, kernels with their initramfs drivers, architecture. Every file read is capped.

use std::collections::BTreeMap;

use ext4_view::Ext4;
use serde::Serialize;

use super::initramfs;

/// Most bytes read of a small text file (os-release, fstab, grub.cfg, ...).
const MAX_SMALL: u64 = 1 << 20;
/// Most bytes read of modules.builtin.
const MAX_BUILTIN: u64 = 4 << 20;
/// Most bytes read of modules.dep (Debian's is about 500 KB).
const MAX_MODULES_DEP: u64 = 8 << 20;
/// Most directory entries listed.
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
    /// "uuid", "label", "partuuid", "partlabel", "device" (a /dev name that depends on the bus) or "other".
    pub by: String,
}

/// A kernel under /boot.
#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    /// Version from the file name.
    pub version: String,
    /// The initramfs file, if one matches.
    pub initramfs: Option<String>,
    /// What the initramfs holds (only the newest kernel's is read: it is what boots by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs_listing: Option<initramfs::Listing>,
    /// Boot drivers built into the kernel (modules.builtin).
    pub builtin: Vec<String>,
    /// Boot drivers installed as modules on the root (listed in modules.dep and present): what udev can load
    /// once the root is mounted, which is enough for network drivers but not for the root's own storage driver.
    pub installed: Vec<String>,
    /// Kernel command line from the boot loader configuration, if found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Machine-specific state: what generalisation would remove.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MachineState {
    /// Contents of /etc/machine-id (absent or empty: `None`).
    pub machine_id: Option<String>,
    /// /etc/ssh/ssh_host_*_key files.
    pub ssh_host_keys: Vec<String>,
    /// Files under /var/log (two levels, at most 64 listed).
    pub log_files: Vec<String>,
    /// Shell histories (/root and /home/*).
    pub shell_history: Vec<String>,
    /// DHCP client leases.
    pub dhcp_leases: Vec<String>,
    /// cloud-init's per-instance state (/var/lib/cloud/instance) is present.
    pub cloud_init_instance: bool,
}

/// What the root filesystem says.
#[derive(Debug, Clone, Serialize, Default)]
pub struct OsFacts {
    /// os-release ID.
    pub distro: Option<String>,
    /// os-release PRETTY_NAME (or NAME).
    pub product_name: Option<String>,
    /// os-release VERSION_ID.
    pub version: Option<String>,
    /// First number of VERSION_ID.
    pub major_version: Option<u32>,
    /// Second number of VERSION_ID (0 when absent).
    pub minor_version: Option<u32>,
    /// "deb" or "rpm" for known distributions.
    pub package_format: Option<String>,
    /// /etc/hostname.
    pub hostname: Option<String>,
    /// From the ELF header of /bin/sh or init.
    pub arch: Option<String>,
    /// /etc/fstab.
    pub fstab: Vec<FstabEntry>,
    /// Cloud and guest agents installed.
    pub agents: Vec<String>,
    /// Kernels, newest first.
    pub kernels: Vec<Kernel>,
    /// Drivers of the newest kernel available before the root is mounted: its initramfs modules and builtins.
    /// `None` when they could not be read.
    pub drivers: Option<Vec<String>>,
    /// Generalisation candidates.
    pub machine_state: MachineState,
    /// What could not be read.
    #[serde(skip)]
    pub problems: Vec<String>,
}

const MAX_LISTED: usize = 64;

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
        filled = filled.saturating_add(n);
    }
    out.truncate(filled);
    Some(out)
}

/// A small text file (at most 1 MiB), lossily decoded; `None` when absent, larger or unreadable.
pub fn read_text(fs: &Ext4, path: &str) -> Option<String> {
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
    for p in [
        "/bin/sh",
        "/usr/bin/sh",
        "/bin/busybox",
        "/sbin/init",
        "/usr/lib/systemd/systemd",
    ] {
        if let Ok(mut f) = fs.open(p) {
            let mut h = [0u8; 64];
            if f.read_bytes(&mut h).is_ok()
                && let Some(a) = elf_arch(&h)
            {
                return Some(a.into());
            }
        }
    }
    None
}

/// Agents: (name, paths that show it installed).
const AGENTS: &[(&str, &[&str])] = &[
    (
        "cloud-init",
        &["/usr/bin/cloud-init", "/etc/cloud/cloud.cfg"],
    ),
    ("waagent", &["/usr/sbin/waagent", "/etc/waagent.conf"]),
    (
        "amazon-ssm-agent",
        &["/usr/bin/amazon-ssm-agent", "/snap/amazon-ssm-agent"],
    ),
    (
        "qemu-guest-agent",
        &["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"],
    ),
];

/// Package formats of known distributions (os-release ID).
const PACKAGE_FORMATS: &[(&str, &str)] = &[
    ("debian", "deb"),
    ("ubuntu", "deb"),
    ("rhel", "rpm"),
    ("centos", "rpm"),
    ("fedora", "rpm"),
    ("rocky", "rpm"),
    ("almalinux", "rpm"),
    ("amzn", "rpm"),
    ("ol", "rpm"),
    ("sles", "rpm"),
    ("opensuse-leap", "rpm"),
];

/// Boot loader configurations searched for kernel command lines, relative to the root (or /boot).
const BOOT_CONFIGS: &[&str] = &["/grub/grub.cfg", "/grub2/grub.cfg"];

/// Inspects an ext2/3/4 Linux root; `boot` is a separate /boot filesystem when fstab names one.
pub fn inspect(fs: &Ext4, boot: Option<&Ext4>) -> OsFacts {
    let mut o = OsFacts::default();
    let rel = read_text(fs, "/etc/os-release").or_else(|| read_text(fs, "/usr/lib/os-release"));
    if let Some(rel) = rel {
        let m = parse_os_release(&rel);
        o.distro = m.get("ID").cloned();
        o.product_name = m.get("PRETTY_NAME").or(m.get("NAME")).cloned();
        o.version = m.get("VERSION_ID").cloned();
        if let Some(v) = &o.version {
            let mut it = v.split('.');
            o.major_version = it.next().and_then(|s| s.parse().ok());
            o.minor_version = Some(it.next().and_then(|s| s.parse().ok()).unwrap_or(0));
        }
        o.package_format = o.distro.as_deref().and_then(|d| {
            PACKAGE_FORMATS
                .iter()
                .find(|(id, _)| *id == d)
                .map(|(_, f)| f.to_string())
        });
    }
    o.hostname = read_text(fs, "/etc/hostname")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    o.fstab = read_text(fs, "/etc/fstab")
        .map(|t| parse_fstab(&t))
        .unwrap_or_default();
    o.agents = AGENTS
        .iter()
        .filter(|(_, paths)| paths.iter().any(|p| exists(fs, p)))
        .map(|(n, _)| n.to_string())
        .collect();
    o.arch = arch(fs);
    o.machine_state = machine_state(fs);
    kernels(fs, boot, &mut o);
    if o.arch.is_none() {
        o.problems
            .push("architecture unknown: no ELF /bin/sh or init found".into());
    }
    o
}

fn machine_state(fs: &Ext4) -> MachineState {
    let mut m = MachineState {
        machine_id: read_text(fs, "/etc/machine-id")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        ..Default::default()
    };
    let mut keys: Vec<String> = list_dir(fs, "/etc/ssh")
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
        .map(|n| format!("/etc/ssh/{n}"))
        .collect();
    keys.sort();
    m.ssh_host_keys = keys;
    let mut logs = Vec::new();
    for n in list_dir(fs, "/var/log") {
        let p = format!("/var/log/{n}");
        if is_dir(fs, &p) {
            logs.extend(
                list_dir(fs, &p)
                    .into_iter()
                    .map(|c| format!("{p}/{c}"))
                    .filter(|c| !is_dir(fs, c)),
            );
        } else {
            logs.push(p);
        }
        if logs.len() >= MAX_LISTED {
            break;
        }
    }
    logs.sort();
    logs.truncate(MAX_LISTED);
    m.log_files = logs;
    let mut hist: Vec<String> = ["/root/.bash_history".to_string()]
        .into_iter()
        .chain(
            list_dir(fs, "/home")
                .into_iter()
                .take(MAX_LISTED)
                .map(|u| format!("/home/{u}/.bash_history")),
        )
        .filter(|p| exists(fs, p))
        .collect();
    hist.sort();
    m.shell_history = hist;
    let mut leases = Vec::new();
    for d in [
        "/var/lib/dhcp",
        "/var/lib/dhclient",
        "/var/lib/NetworkManager",
    ] {
        leases.extend(
            list_dir(fs, d)
                .into_iter()
                .filter(|n| n.ends_with(".leases") || n.ends_with(".lease"))
                .map(|n| format!("{d}/{n}")),
        );
    }
    leases.sort();
    leases.truncate(MAX_LISTED);
    m.dhcp_leases = leases;
    m.cloud_init_instance = fs.symlink_metadata("/var/lib/cloud/instance").is_ok();
    m
}

fn is_dir(fs: &Ext4, path: &str) -> bool {
    fs.symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Boot drivers listed in the root's modules.dep for kernel `v` whose module file exists.
fn installed_modules(fs: &Ext4, v: &str) -> Vec<String> {
    let dir = format!("/lib/modules/{v}");
    let Some(dep) = read_capped(fs, &format!("{dir}/modules.dep"), MAX_MODULES_DEP) else {
        return Vec::new();
    };
    let mut out: Vec<String> = String::from_utf8_lossy(&dep)
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter_map(|path| {
            let m = initramfs::module_name(path)?;
            (initramfs::DRIVERS.contains(&m.as_str()) && exists(fs, &format!("{dir}/{path}")))
                .then_some(m)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Kernel command lines from GRUB configurations: `linux[efi] /boot/vmlinuz-VERSION ARGS` → (VERSION, ARGS).
pub fn grub_cmdlines(cfg: &str) -> Vec<(String, String)> {
    cfg.lines()
        .take(100_000)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let cmd = w.next()?;
            if cmd != "linux" && cmd != "linuxefi" && cmd != "linux16" {
                return None;
            }
            let image = w.next()?;
            let version = image
                .rsplit('/')
                .next()?
                .strip_prefix("vmlinuz-")?
                .to_string();
            Some((version, w.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// The `root=` argument of a kernel command line.
pub fn cmdline_root(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("root="))
}

fn kernels(fs: &Ext4, boot: Option<&Ext4>, o: &mut OsFacts) {
    // Kernels live in /boot of the root, or at the top of a separate /boot filesystem.
    let (bfs, prefix) = match boot {
        Some(b) => (b, ""),
        None => (fs, "/boot"),
    };
    let names = list_dir(bfs, if prefix.is_empty() { "/" } else { prefix });
    let mut cmdlines = Vec::new();
    for c in BOOT_CONFIGS {
        if let Some(t) = read_text(bfs, &format!("{prefix}{c}")) {
            cmdlines.extend(grub_cmdlines(&t));
        }
    }
    let mut versions: Vec<String> = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("vmlinuz-")
                .or_else(|| n.strip_prefix("vmlinux-"))
        })
        .map(str::to_string)
        .collect();
    versions.sort_by(|a, b| version_cmp(b, a));
    for (i, v) in versions.iter().enumerate().take(8) {
        let rd = [
            format!("initrd.img-{v}"),
            format!("initramfs-{v}.img"),
            format!("initrd-{v}"),
        ]
        .into_iter()
        .find(|n| names.contains(n));
        let mut k = Kernel {
            version: v.clone(),
            initramfs: rd.clone(),
            initramfs_listing: None,
            builtin: Vec::new(),
            installed: installed_modules(fs, v),
            cmdline: cmdlines
                .iter()
                .find(|(kv, _)| kv == v)
                .map(|(_, c)| c.clone()),
        };
        if let Some(t) = read_capped(
            fs,
            &format!("/lib/modules/{v}/modules.builtin"),
            MAX_BUILTIN,
        )
        .or_else(|| {
            read_capped(
                fs,
                &format!("/usr/lib/modules/{v}/modules.builtin"),
                MAX_BUILTIN,
            )
        }) {
            k.builtin = initramfs::builtin_drivers(&String::from_utf8_lossy(&t));
        }
        if let (0, Some(rd)) = (i, &rd) {
            let path = format!("{prefix}/{rd}");
            match bfs.open(path.as_str()) {
                Ok(file) => {
                    let l = initramfs::list(file, &initramfs::Limits::default());
                    if let Some(b) = &l.builtin {
                        k.builtin.extend(initramfs::builtin_drivers(b));
                        k.builtin.sort();
                        k.builtin.dedup();
                    }
                    if let Some(p) = &l.problem {
                        o.problems.push(format!("initramfs {path}: {p}"));
                    }
                    k.initramfs_listing = Some(l);
                }
                Err(e) => o
                    .problems
                    .push(format!("initramfs {path}: unreadable: {e}")),
            }
        }
        o.kernels.push(k);
    }
    if let Some(k) = o.kernels.first() {
        // Drivers are known only from a fully listed initramfs: a truncated listing may miss modules that come
        // later, and a kernel that cannot unpack its initramfs boots with none of them.
        o.drivers = match &k.initramfs_listing {
            Some(l) if l.problem.is_none() => {
                let mut d: Vec<String> = l.modules.iter().chain(&k.builtin).cloned().collect();
                d.sort();
                d.dedup();
                Some(d)
            }
            Some(_) => None,
            None if k.initramfs.is_none() => Some(k.builtin.clone()),
            None => None,
        };
    } else {
        o.problems.push("no kernel found under /boot".into());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_kinds() {
        let f = parse_fstab(
            "# c\nUUID=ab / ext4 defaults 0 1\nLABEL=x /srv ext4 d 0 2\n/dev/sda2 /data xfs d 0 0\n\
             /dev/mapper/vg-lv /var ext4 d 0 0\nPARTUUID=1 /boot ext4 d 0 0\nproc /proc proc d 0 0\nbad\n",
        );
        let by: Vec<&str> = f.iter().map(|e| e.by.as_str()).collect();
        assert_eq!(
            by,
            ["uuid", "label", "device", "other", "partuuid", "other"]
        );
    }

    #[test]
    fn grub_cmdlines_and_root() {
        let cfg = "menuentry 'x' {\n\tlinux\t/boot/vmlinuz-6.1.0-9-amd64 root=UUID=ab ro quiet\n}\n\
                   \tlinuxefi /vmlinuz-5.14.0 root=/dev/sda2\n\tlinux /boot/bzImage\n";
        let c = grub_cmdlines(cfg);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            (
                "6.1.0-9-amd64".to_string(),
                "root=UUID=ab ro quiet".to_string()
            )
        );
        assert_eq!(cmdline_root(&c[1].1), Some("/dev/sda2"));
        assert_eq!(cmdline_root("ro quiet"), None);
    }

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"];
        v.sort_by(|a, b| version_cmp(b, a));
        assert_eq!(v, ["6.1.0-10-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"]);
    }

    #[test]
    fn elf_arches() {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[18] = 0xb7;
        assert_eq!(elf_arch(&h), Some("aarch64"));
        assert_eq!(elf_arch(&h[..10]), None);
    }
}
