//! `imgshift inspect`: read a guest offline (partitions, filesystems, OS, boot mode, boot drivers) and, with
//! `--target`, give a preflight verdict. Exit 0 for ok/warn, 1 for fail (or an error).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use ext4_view::Ext4;
use serde_json::{Value, json};

use super::open_image;
use crate::cli::{OutputFormat, TrustArgs};
use crate::guest::fs::{self, FsInfo};
use crate::guest::os::{self, OsFacts};
use crate::guest::partitions::{self, PartitionTable};
use crate::guest::preflight::{self, Facts, Level};
use crate::guest::Window;

/// Runs `inspect`.
pub fn run(
    image: &Path,
    format: Option<&str>,
    target: Option<&str>,
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
    let src: Arc<dyn imgshift_converters::DiskSource> = Arc::from(open_image(image, format, trust)?);
    let counter = Arc::new(AtomicU64::new(0));
    let disk = Window::whole(Arc::clone(&src), Arc::clone(&counter));
    let report = inspect(&disk);
    let mut v = report.json;
    v["filename"] = json!(image.display().to_string());
    v["format"] = json!(src.format().name());
    let mut code = 0;
    if let Some((t, r)) = rules {
        let verdict = preflight::evaluate(t, r, &report.facts);
        if verdict.verdict == Level::Fail {
            code = 1;
        }
        v["preflight"] = serde_json::to_value(&verdict)?;
    }
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Human => print_human(&v),
    }
    if stats {
        let mut s = json!({"guest_bytes_read": counter.load(Ordering::Relaxed)});
        if let Some(io) = proc_field("/proc/self/io", "rchar:") {
            s["rchar"] = io.into();
        }
        if let Some(kib) = proc_field("/proc/self/status", "VmHWM:") {
            s["peak_rss_bytes"] = (kib * 1024).into();
        }
        eprintln!("{s}");
    }
    Ok(code)
}

fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.get(key.len()..)?.split_whitespace().next()?.parse().ok()
}

/// The inspection result: the JSON document and the facts preflight rules use.
pub struct Report {
    pub json: Value,
    pub facts: Facts,
}

struct Found {
    device: String,
    window: Window,
    info: FsInfo,
    type_name: String,
}

/// Inspects a whole disk.
pub fn inspect(disk: &Window) -> Report {
    let table: PartitionTable = partitions::read(disk);
    let mut problems = table.problems.clone();
    let mut found = Vec::new();
    if table.scheme == "none" {
        let info = fs::probe(disk);
        if info.fs_type != "unknown" {
            found.push(Found {
                device: "/dev/sda".into(),
                window: disk.clone(),
                info,
                type_name: String::new(),
            });
        }
    }
    for p in &table.partitions {
        let Some(w) = disk.sub(p.start, p.size) else {
            continue;
        };
        found.push(Found {
            device: format!("/dev/sda{}", p.number),
            info: fs::probe(&w),
            window: w,
            type_name: p.type_name.clone(),
        });
    }
    // EFI loaders on FAT filesystems of ESPs.
    let mut efi_loaders = Vec::new();
    for f in &found {
        if f.info.fs_type == "vfat" && (f.type_name == "efi-system" || table.scheme == "mbr") {
            match fs::efi_loaders(&f.window) {
                Ok(l) => efi_loaders.extend(l.into_iter().map(|x| format!("{}:{x}", f.device))),
                Err(e) => problems.push(format!("{}: {e}", f.device)),
            }
        }
    }
    // Linux roots: ext filesystems holding os-release.
    let mut exts: Vec<(String, Ext4)> = Vec::new();
    for f in &found {
        if f.info.fs_type.starts_with("ext") {
            match Ext4::load(Box::new(f.window.clone())) {
                Ok(e) => exts.push((f.device.clone(), e)),
                Err(e) => problems.push(format!("{}: {} filesystem unreadable: {e}", f.device, f.info.fs_type)),
            }
        }
    }
    let resolve = |spec: &str| -> Option<String> {
        let (k, v) = spec.split_once('=').unwrap_or(("", spec));
        found
            .iter()
            .find(|f| match k.to_ascii_uppercase().as_str() {
                "UUID" => f.info.uuid.as_deref().is_some_and(|u| u.eq_ignore_ascii_case(v)),
                "LABEL" => f.info.label.as_deref() == Some(v),
                _ => f.device == spec,
            })
            .map(|f| f.device.clone())
    };
    let mut oses = Vec::new();
    let mut facts_os: Option<OsFacts> = None;
    for (dev, e) in &exts {
        let is_root = e.exists("/etc/os-release").unwrap_or(false) || e.exists("/usr/lib/os-release").unwrap_or(false);
        if !is_root {
            continue;
        }
        let fstab = os::parse_fstab(&String::from_utf8_lossy(
            &e.open("/etc/fstab")
                .ok()
                .and_then(|mut f| {
                    let mut b = vec![0u8; 65536];
                    let n = f.read_bytes(&mut b).ok()?;
                    b.truncate(n);
                    Some(b)
                })
                .unwrap_or_default(),
        ));
        let boot_dev = fstab
            .iter()
            .find(|x| x.mountpoint == "/boot")
            .and_then(|x| resolve(&x.spec));
        let boot = boot_dev
            .as_ref()
            .and_then(|b| exts.iter().find(|(d, _)| d == b))
            .map(|(_, e)| e);
        let o = os::inspect(e, boot);
        let mut mountpoints = BTreeMap::new();
        mountpoints.insert("/".to_string(), dev.clone());
        for x in &o.fstab {
            if x.mountpoint.starts_with('/') && x.mountpoint != "/" {
                if let Some(d) = resolve(&x.spec) {
                    mountpoints.insert(x.mountpoint.clone(), d);
                }
            }
        }
        problems.extend(o.problems.iter().map(|p| format!("{dev}: {p}")));
        oses.push(json!({
            "root": dev,
            "type": "linux",
            "distro": o.distro,
            "product_name": o.product_name,
            "version": o.version_id,
            "major_version": o.major_version,
            "minor_version": o.minor_version,
            "arch": o.arch,
            "hostname": o.hostname,
            "mountpoints": mountpoints,
            "fstab": o.fstab,
            "agents": o.agents,
            "kernels": o.kernels,
            "drivers": o.drivers,
            "machine_specific": {
                "machine_id": o.machine_id,
                "ssh_host_keys": o.ssh_host_keys,
            },
        }));
        if facts_os.is_none() {
            facts_os = Some(o);
        }
    }
    for f in &found {
        if !f.info.inspectable && f.info.fs_type != "swap" && f.info.fs_type != "unknown" {
            problems.push(format!(
                "{}: {} is present but not inspectable (files on it are not read)",
                f.device, f.info.fs_type
            ));
        }
    }
    let has_bios_boot = table.partitions.iter().any(|p| p.type_name == "bios-boot");
    let bios = table.mbr_boot_code && (table.scheme == "mbr" || has_bios_boot || table.scheme == "none");
    let uefi = !efi_loaders.is_empty();
    let boot_mode = match (bios, uefi) {
        (true, true) => "bios+uefi",
        (true, false) => "bios",
        (false, true) => "uefi",
        (false, false) => "unknown",
    };
    let filesystems: BTreeMap<String, &FsInfo> = found.iter().map(|f| (f.device.clone(), &f.info)).collect();
    let facts = Facts {
        boot_mode: boot_mode.into(),
        drivers: facts_os.as_ref().map(|o| o.drivers.clone()),
        fstab_devices: facts_os
            .as_ref()
            .map(|o| o.fstab.iter().filter(|x| x.by == "device").map(|x| x.spec.clone()).collect())
            .unwrap_or_default(),
        agents: facts_os.as_ref().map(|o| o.agents.clone()).unwrap_or_default(),
        size: disk.len(),
    };
    let json = json!({
        "virtual_size": disk.len(),
        "partition_table": table,
        "filesystems": filesystems,
        "operatingsystems": oses,
        "boot_mode": boot_mode,
        "efi_loaders": efi_loaders,
        "problems": problems,
    });
    Report { json, facts }
}

fn print_human(v: &Value) {
    let s = |x: &Value| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string());
    println!("image: {}", s(&v["filename"]));
    println!("partition table: {}", s(&v["partition_table"]["scheme"]));
    if let Some(fss) = v["filesystems"].as_object() {
        for (d, f) in fss {
            println!("  {d}: {} label={} uuid={}", s(&f["type"]), s(&f["label"]), s(&f["uuid"]));
        }
    }
    println!("boot mode: {}", s(&v["boot_mode"]));
    for o in v["operatingsystems"].as_array().into_iter().flatten() {
        println!(
            "os: {} ({} {}), root {}, arch {}, hostname {}",
            s(&o["product_name"]),
            s(&o["distro"]),
            s(&o["version"]),
            s(&o["root"]),
            s(&o["arch"]),
            s(&o["hostname"])
        );
        println!("  boot drivers: {}", s(&o["drivers"]));
        println!("  agents: {}", s(&o["agents"]));
        println!(
            "  machine-specific: machine-id={} ssh host keys={}",
            s(&o["machine_specific"]["machine_id"]),
            o["machine_specific"]["ssh_host_keys"].as_array().map_or(0, Vec::len)
        );
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        println!("problem: {}", s(p));
    }
    if let Some(pf) = v.get("preflight") {
        println!("preflight {}: {}", s(&pf["target"]), s(&pf["verdict"]).to_uppercase());
        for f in pf["findings"].as_array().into_iter().flatten() {
            println!("  [{}] {}: {}", s(&f["level"]), s(&f["id"]), s(&f["reason"]));
            println!("      fix: {}", s(&f["fix"]));
        }
    }
}
