//! `imgshift inspect`: read a guest offline through its DiskSource (any format, read-only, no mount) and, with
//! `--target`, give a preflight verdict. Exit 0 for ok/warn, 1 for fail (or an error).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use serde::Serialize;

use super::open_image;
use crate::cli::{OutputFormat, TrustArgs};
use crate::guest::Window;
use crate::guest::preflight::{self, Level, Verdict};
use crate::guest::report::{self, Report};

/// The JSON document printed.
#[derive(Serialize)]
struct Output<'a> {
    filename: String,
    format: &'a str,
    #[serde(flatten)]
    report: &'a Report,
    /// Set when no operating system was found: what was found instead, and why any root was not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    no_operating_system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    preflight: Option<Verdict>,
}

/// Filesystem types recognised from their superblocks but not read (so a root on them cannot be inspected).
const NOT_READ: [&str; 4] = ["xfs", "btrfs", "LVM2_member", "crypto_LUKS"];

/// When the report holds no operating system: one line saying so, with what was found (partitions,
/// filesystems) and why a possible root was not inspectable.
fn no_os_explanation(r: &Report) -> Option<String> {
    if !r.operatingsystems.is_empty() || !r.windows.is_empty() {
        return None;
    }
    let mut t = format!(
        "no operating system found; partition table {} with {} partition(s)",
        r.partition_table.scheme,
        r.partition_table.partitions.len()
    );
    if r.filesystems.is_empty() {
        t.push_str(", no filesystem");
    } else {
        let fs: Vec<String> = r
            .filesystems
            .iter()
            .map(|(dev, f)| format!("{dev} {}", f.fs_type))
            .collect();
        t.push_str(&format!(", filesystems: {}", fs.join(", ")));
    }
    let unread: Vec<String> = r
        .filesystems
        .iter()
        .filter(|(_, f)| NOT_READ.contains(&f.fs_type.as_str()))
        .map(|(dev, f)| format!("{dev} ({})", f.fs_type))
        .collect();
    if !unread.is_empty() {
        t.push_str(&format!(
            "; a root on {} is not inspectable: imgshift recognises XFS, btrfs, LVM and LUKS but does not read them",
            unread.join(", ")
        ));
    } else if r.filesystems.values().any(|f| f.fs_type.starts_with("ext")) {
        t.push_str(
            "; no readable ext2/3/4 filesystem holds /etc/os-release (see the problems, if any)",
        );
    }
    Some(t)
}

/// Runs `inspect`.
pub fn run(
    image: &Path,
    format: Option<&str>,
    target: Option<&str>,
    boot_mode: Option<&str>,
    output: OutputFormat,
    stats: bool,
    trust: &TrustArgs,
) -> Result<u8> {
    let rules = match target {
        Some(t) => match preflight::table(t) {
            Some(r) => Some((t, r)),
            None => bail!("unknown target {t:?} (aws, azure, libvirt)"),
        },
        None => None,
    };
    let src: Arc<dyn imgshift_converters::DiskSource> =
        Arc::from(open_image(image, format, trust)?);
    let counter = Arc::new(AtomicU64::new(0));
    let disk = Window::whole(Arc::clone(&src), Arc::clone(&counter));
    let report = report::inspect(&disk);
    let no_os = no_os_explanation(&report);
    let mut preflight = rules.map(|(t, r)| preflight::evaluate(t, r, &report.facts(boot_mode)));
    if no_os.is_some()
        && let Some(v) = preflight.as_mut()
    {
        // Without a guest there are no drivers to choose a disk bus from: claim none.
        v.settings.remove("bus");
    }
    let code = u8::from(preflight.as_ref().is_some_and(|v| v.verdict == Level::Fail));
    let out = Output {
        filename: image.display().to_string(),
        format: src.format().name(),
        report: &report,
        no_operating_system: no_os,
        preflight,
    };
    let text = match output {
        OutputFormat::Json => serde_json::to_string_pretty(&out)? + "\n",
        OutputFormat::Human => human(&out),
    };
    // A closed pipe (`inspect ... | head`) comes back as an io::Error that main treats as quiet.
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    if stats {
        // rchar is the kernel's count of bytes this process read through read(2)/pread(2) — the image file
        // included, whatever its format — read at the very end so it covers the whole inspection.
        let s = serde_json::json!({
            "guest_bytes_read": counter.load(Ordering::Relaxed),
            "rchar": proc_field("/proc/self/io", "rchar:"),
            "peak_rss_bytes": proc_field("/proc/self/status", "VmHWM:").map(|k| k.saturating_mul(1024)),
        });
        eprintln!("{s}");
    }
    Ok(code)
}

fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.get(key.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

/// The readable form.
fn human(o: &Output<'_>) -> String {
    use std::fmt::Write;
    let r = o.report;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "image: {} ({}, {} bytes)",
        o.filename, o.format, r.virtual_size
    );
    let _ = writeln!(t, "partition table: {}", r.partition_table.scheme);
    for p in &r.partition_table.partitions {
        let fs = r.filesystems.get(&format!("/dev/sda{}", p.number));
        let _ = writeln!(
            t,
            "  /dev/sda{}: {} at {} size {}, {} label={} uuid={}",
            p.number,
            p.type_name,
            p.start,
            p.size,
            fs.map_or("-", |f| f.fs_type.as_str()),
            fs.map_or("-", |f| opt(&f.label)),
            fs.map_or("-", |f| opt(&f.uuid)),
        );
    }
    let b = &r.boot;
    let _ = write!(t, "boot mode: {}", b.mode);
    if let Some(l) = &b.bios_loader {
        let _ = write!(t, " (BIOS: {l}");
        if let Some(lba) = b.grub_core_lba {
            let _ = write!(t, ", core at sector {lba}");
        }
        t.push(')');
    }
    if let Some(f) = &b.efi_fallback {
        let _ = write!(t, " (UEFI: {f})");
    }
    t.push('\n');
    for w in &r.windows {
        let _ = writeln!(
            t,
            "os: {} [windows {}], root {}, system root {}, arch {}, hostname {}",
            w.product_name.as_deref().unwrap_or("Windows"),
            w.version()
                .map_or_else(|| "?".to_string(), |(a, b)| format!("{a}.{b}")),
            w.root,
            w.windows_systemroot,
            opt(&w.arch),
            opt(&w.hostname)
        );
        if !w.registry_read {
            let _ = writeln!(t, "  registry: not read (see the problems)");
            continue;
        }
        let _ = writeln!(
            t,
            "  edition {}, build {}{}, control set {}",
            opt(&w.edition),
            opt(&w.build),
            w.display_version
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            opt(&w.current_control_set)
        );
        let _ = writeln!(
            t,
            "  boot loader: {}{}",
            opt(&w.boot_loader),
            w.boot_store
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            t,
            "  generalised: {} (ImageState {})",
            match w.generalized {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            },
            opt(&w.image_state)
        );
        if w.drivers.is_empty() {
            let _ = writeln!(t, "  boot-critical drivers: none of the known ones");
        }
        for d in &w.drivers {
            let _ = writeln!(
                t,
                "  driver {}: start {}{}",
                d.name,
                d.start_type,
                if d.file_present {
                    ""
                } else {
                    " (file missing)"
                }
            );
        }
    }
    for os in &r.operatingsystems {
        let f = &os.facts;
        let _ = writeln!(
            t,
            "os: {} [{} {}], root {}, arch {}, hostname {}",
            opt(&f.product_name),
            opt(&f.distro),
            opt(&f.version),
            os.root,
            opt(&f.arch),
            opt(&f.hostname)
        );
        if let Some(k) = f.kernels.first() {
            let _ = writeln!(
                t,
                "  kernel {} initramfs {} ({})",
                k.version,
                opt(&k.initramfs),
                k.initramfs_listing
                    .as_ref()
                    .map_or("not read".to_string(), |l| l.archives.join("+"))
            );
            if let Some(c) = &k.cmdline {
                let _ = writeln!(t, "  cmdline: {c}");
            }
        }
        let drivers = f.drivers.as_ref().map_or("unknown".into(), |d| d.join(" "));
        let _ = writeln!(t, "  boot drivers: {drivers}");
        for e in &f.fstab {
            let _ = writeln!(
                t,
                "  fstab: {} on {} ({}, by {})",
                e.spec, e.mountpoint, e.vfstype, e.by
            );
        }
        let _ = writeln!(t, "  agents: {}", f.agents.join(" "));
        let m = &f.machine_state;
        let _ = writeln!(
            t,
            "  machine state: machine-id {}, {} ssh host keys, {} log files, {} shell histories, {} DHCP leases, cloud-init instance {}",
            opt(&m.machine_id),
            m.ssh_host_keys.len(),
            m.log_files.len(),
            m.shell_history.len(),
            m.dhcp_leases.len(),
            if m.cloud_init_instance { "yes" } else { "no" },
        );
    }
    if let Some(n) = &o.no_operating_system {
        let _ = writeln!(t, "os: {n}");
    }
    for p in &r.problems {
        let _ = writeln!(t, "problem: {p}");
    }
    if let Some(v) = &o.preflight {
        let verdict = match v.verdict {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        let _ = writeln!(t, "preflight {}: {verdict}", v.target);
        for f in &v.findings {
            let level = serde_json::to_value(f.level).ok();
            let level = level.as_ref().and_then(|l| l.as_str()).unwrap_or("?");
            let _ = writeln!(t, "  [{level}] {}: {}", f.id, f.reason);
            let _ = writeln!(t, "         fix: {}", f.fix);
        }
        let settings: Vec<String> = v.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(t, "  settings: {}", settings.join(" "));
    }
    t
}
