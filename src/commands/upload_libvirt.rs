//! `imgshift upload libvirt`: source image → converter engine → libvirt storage volume (streamed, no temporary
//! file) → optional domain definition and start.
//!
//! Order: everything that can refuse (arguments, source, daemon, pool, taken names) is checked before the volume
//! is created; from the volume's creation on, any failure deletes it again (and undefines a domain this run
//! defined), or names what was left behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use imgshift_converters::{
    ConvertOptions, ConvertStats, DiskSource, Format, FormatWriter, WriterOptions, convert,
    create_writer,
};
use serde_json::json;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;

use super::{gate, naming, open_image, open_ova};
use crate::cli::{
    DiskBusArg, DomainTypeArg, FirmwareArg, LibvirtUploadArgs, LibvirtVolFormat, OutputFormat,
};
use crate::progress::Bar;
use crate::targets::azure::hyperv;
use crate::targets::libvirt::sink::{SentCounts, VolumeSink};
use crate::targets::libvirt::xml::{DomainSpec, domain_xml};
use crate::targets::libvirt::{
    DiskBus, DomainType, Error as LvError, Firmware, VolFormat, caps, conn as lv, inuse, volume,
};

/// What to define, decided before anything is created.
struct DomainPlan {
    spec: DomainSpec,
    /// Why `auto` choices came out as they did (printed unless quiet).
    notes: Vec<String>,
}

/// Runs `upload libvirt`.
pub fn run(args: &LibvirtUploadArgs, quiet: bool) -> Result<u8> {
    let vol_format = match args.output_format {
        LibvirtVolFormat::Qcow2 => VolFormat::Qcow2,
        LibvirtVolFormat::Raw => VolFormat::Raw,
    };
    let out_format = Format::from_name(vol_format.name())?;
    let mut writer = create_writer(out_format, &mut WriterOptions::default())?;
    let src: std::sync::Arc<dyn DiskSource> = std::sync::Arc::from(open_source(args)?);
    let capacity = writer.output_virtual_size(src.virtual_size())?;

    let uri = args.connect.as_str();
    let (pool_name, vol_name) = (args.pool.as_str(), args.volume.as_str());
    let conn = lv::connect(uri)?;
    let pool = lv::running_pool(&conn, pool_name, uri)?;
    let plan = match &args.define {
        Some(name) => Some(plan_domain(args, name, vol_format, &src, &conn)?),
        None => None,
    };

    // Refuse before creating anything when a name is taken.
    let old_domain = clear_names(args, &conn, &pool)?;

    let created = volume::create(&pool, pool_name, vol_name, capacity, vol_format)?;
    // From here on, a failure removes the volume (and a domain this run defined), or names them.
    let rollback = |e: anyhow::Error, dom: Option<(&Domain, &str)>| -> anyhow::Error {
        let mut e = e;
        if let Some((d, name)) = dom
            && let Err(u) = lv::undefine(d, name)
        {
            e = e.context(format!("domain '{name}' was left defined ({u})"));
        }
        match volume::delete(&created.vol, pool_name, vol_name) {
            Ok(()) => e.context(format!(
                "volume '{vol_name}' was removed from pool '{pool_name}'"
            )),
            Err(d) => e.context(d.to_string()),
        }
    };

    let (sent, stats) = match upload(args, &conn, &created, src.as_ref(), writer.as_mut(), quiet) {
        Ok(v) => v,
        Err(e) => return Err(rollback(e, None)),
    };

    let mut started = false;
    if let Some(plan) = &plan {
        let name = plan.spec.name.as_str();
        match define_and_start(&conn, plan, old_domain.as_ref(), args.start) {
            Ok(s) => started = s,
            Err((e, dom)) => return Err(rollback(e, dom.as_ref().map(|d| (d, name)))),
        }
        if !quiet {
            for n in &plan.notes {
                eprintln!("imgshift: {n}");
            }
        }
    }

    print_result(
        args,
        &created.path,
        capacity,
        vol_format,
        plan.as_ref(),
        started,
        &sent,
        &stats,
    )?;
    Ok(0)
}

/// Checks the volume and domain names before anything is created: a taken name needs `--overwrite`; a running
/// domain, or a volume a running domain uses, is never replaced. With `--overwrite` the old volume is deleted
/// here. Returns the (stopped) domain to replace.
fn clear_names(
    args: &LibvirtUploadArgs,
    conn: &Connect,
    pool: &StoragePool,
) -> Result<Option<Domain>> {
    let (pool_name, vol_name) = (args.pool.as_str(), args.volume.as_str());
    let old_domain = match &args.define {
        Some(name) => match lv::find_domain(conn, name)? {
            Some(d) => {
                lv::check_replaceable(&d, name, args.overwrite)?;
                Some(d)
            }
            None => None,
        },
        None => None,
    };
    let Some(old) = lv::find_volume(pool, pool_name, vol_name)? else {
        return Ok(old_domain);
    };
    if !args.overwrite {
        return Err(LvError::VolumeExists {
            pool: pool_name.to_string(),
            volume: vol_name.to_string(),
        }
        .into());
    }
    let path = old
        .path()
        .map_err(|e| LvError::call(format!("cannot read the path of volume '{vol_name}'"), &e))?;
    let vref = inuse::VolumeRef {
        pool: pool_name,
        volume: vol_name,
        path: &path,
    };
    let users = inuse::running_users(conn, &vref)?;
    if !users.is_empty() {
        return Err(LvError::VolumeInUse {
            pool: pool_name.to_string(),
            volume: vol_name.to_string(),
            domains: users
                .iter()
                .map(|u| format!("'{u}'"))
                .collect::<Vec<_>>()
                .join(", "),
        }
        .into());
    }
    volume::replace(&old, pool_name, vol_name)?;
    Ok(old_domain)
}

/// Defines the planned domain (in place of `old`) and starts it when asked. Returns whether it was started; on
/// failure, the error and the domain this run defined (for the caller to undefine).
fn define_and_start(
    conn: &Connect,
    plan: &DomainPlan,
    old: Option<&Domain>,
    start: bool,
) -> std::result::Result<bool, (anyhow::Error, Option<Domain>)> {
    let name = plan.spec.name.as_str();
    let xml = domain_xml(&plan.spec).map_err(|e| (e.into(), None))?;
    if let Some(old) = old {
        lv::undefine(old, name).map_err(|e| (e.into(), None))?;
    }
    let dom = lv::define(conn, &xml, name).map_err(|e| {
        let e = anyhow::Error::new(e);
        let e = if old.is_some() {
            e.context(format!("the previous domain '{name}' was undefined"))
        } else {
            e
        };
        (e, None)
    })?;
    if start {
        if let Err(e) = lv::start(&dom, name) {
            return Err((e.into(), Some(dom)));
        }
        return Ok(true);
    }
    Ok(false)
}

/// Opens the source: an OVA's boot disk, or the image itself.
fn open_source(args: &LibvirtUploadArgs) -> Result<Box<dyn DiskSource>> {
    match open_ova(&args.src, args.format.as_deref())? {
        Some(pkg) => pkg
            .open_disk(0, &gate(&args.trust)?)
            .map_err(|e| naming(e, &args.src)),
        None => open_image(&args.src, args.format.as_deref(), &args.trust),
    }
}

/// Resolves `auto` choices and checks the domain options.
fn plan_domain(
    args: &LibvirtUploadArgs,
    name: &str,
    format: VolFormat,
    src: &std::sync::Arc<dyn DiskSource>,
    conn: &Connect,
) -> Result<DomainPlan> {
    if name.is_empty() {
        bail!("--define needs a domain name");
    }
    if args.vcpus == 0 || args.memory == 0 {
        bail!("--vcpus and --memory must be at least 1");
    }
    let serial_log = match &args.serial_log {
        Some(p) if !p.is_absolute() => bail!(
            "--serial-log {}: give an absolute path (it is opened on the daemon's host)",
            p.display()
        ),
        Some(p) => Some(
            p.to_str()
                .ok_or_else(|| anyhow!("--serial-log {}: not UTF-8", p.display()))?
                .to_string(),
        ),
        None => None,
    };
    let mut notes = Vec::new();
    // `auto` choices come from imgshift's own offline inspection of the guest (its libvirt preflight settings:
    // firmware from the boot mode, virtio only when the guest's initramfs has the virtio drivers).
    let guest =
        (args.firmware == FirmwareArg::Auto || args.disk_bus == DiskBusArg::Auto).then(|| {
            let disk = crate::guest::Window::whole(
                std::sync::Arc::clone(src),
                std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
            );
            let report = crate::guest::report::inspect(&disk);
            let facts = report.facts(None);
            let verdict = crate::guest::preflight::table("libvirt")
                .map(|rules| crate::guest::preflight::evaluate("libvirt", rules, &facts));
            (facts, verdict)
        });
    let setting = |key: &str| -> Option<String> {
        guest
            .as_ref()
            .and_then(|(_, v)| v.as_ref())
            .and_then(|v| v.settings.get(key).cloned())
    };
    let linux = guest.as_ref().is_some_and(|(f, _)| f.linux_root);
    let firmware = match args.firmware {
        FirmwareArg::Bios => Firmware::Bios,
        FirmwareArg::Uefi => Firmware::Uefi,
        FirmwareArg::Auto if linux => {
            let fw = if setting("firmware").as_deref() == Some("efi") {
                Firmware::Uefi
            } else {
                Firmware::Bios
            };
            notes.push(format!(
                "firmware {}: from the guest's boot mode (inspection)",
                fw_name(fw)
            ));
            fw
        }
        FirmwareArg::Auto => {
            // No Linux root to inspect: an ESP on a GPT is what UEFI firmware boots from (Azure's rule).
            let (generation, why) = hyperv::detect(src.as_ref());
            let fw = if generation == "V2" {
                Firmware::Uefi
            } else {
                Firmware::Bios
            };
            notes.push(format!("firmware {}: {why}", fw_name(fw)));
            fw
        }
    };
    let disk_bus = match args.disk_bus {
        DiskBusArg::Virtio => DiskBus::Virtio,
        DiskBusArg::Sata => DiskBus::Sata,
        DiskBusArg::Scsi => DiskBus::Scsi,
        DiskBusArg::Auto => {
            match setting("bus").as_deref() {
                Some("virtio") if linux => {
                    notes.push("disk bus virtio: the guest's initramfs has the virtio drivers (inspection)".into());
                    DiskBus::Virtio
                }
                Some("scsi") if linux => {
                    notes.push("disk bus scsi: inspection suggests it for this guest".into());
                    DiskBus::Scsi
                }
                _ => {
                    notes.push(
                    "disk bus sata: the guest's virtio drivers were not found by inspection (pass --disk-bus \
                     virtio for a guest that has them)"
                        .to_string(),
                );
                    DiskBus::Sata
                }
            }
        }
    };
    let domain_type = match args.domain_type {
        DomainTypeArg::Kvm => DomainType::Kvm,
        DomainTypeArg::Qemu => DomainType::Qemu,
        DomainTypeArg::Auto => {
            let t = caps::auto_domain_type(conn)?;
            notes.push(match t {
                DomainType::Kvm => {
                    "domain type kvm: the host offers KVM (pass --domain-type qemu for TCG \
                                    emulation where KVM does not work)"
                        .to_string()
                }
                DomainType::Qemu => {
                    "domain type qemu (TCG emulation): the host does not offer KVM".to_string()
                }
            });
            t
        }
    };
    Ok(DomainPlan {
        spec: DomainSpec {
            name: name.to_string(),
            domain_type,
            memory_mib: args.memory,
            vcpus: args.vcpus,
            firmware,
            disk_bus,
            pool: args.pool.clone(),
            volume: args.volume.clone(),
            format,
            network: args.network.clone(),
            serial_log,
        },
        notes,
    })
}

fn fw_name(f: Firmware) -> &'static str {
    match f {
        Firmware::Bios => "bios",
        Firmware::Uefi => "uefi",
    }
}

/// Converts `src` straight into the new volume.
fn upload(
    args: &LibvirtUploadArgs,
    conn: &Connect,
    created: &volume::Created,
    src: &dyn DiskSource,
    writer: &mut dyn FormatWriter,
    quiet: bool,
) -> Result<(SentCounts, ConvertStats)> {
    let (zero_from, min_end) = match (created.reads_zero, args.output_format) {
        // A fresh sparse file: zeros everywhere.
        (true, LibvirtVolFormat::Raw) => (0, 0),
        // A fresh qcow2 file: libvirt's header, then nothing.
        (true, LibvirtVolFormat::Qcow2) => (created.initial_len, created.initial_len),
        // A block device: old data everywhere.
        (false, _) => (u64::MAX, 0),
    };
    let mut sink =
        VolumeSink::new(conn, &created.vol, zero_from, min_end).with_cancel(interrupt_flag());
    let bar = Bar::new("upload", args.progress, quiet);
    let r = convert(src, writer, &mut sink, &ConvertOptions::default(), &bar);
    bar.finish();
    match r {
        Ok(stats) => Ok((sink.sent, stats)),
        Err(e) => {
            sink.abort();
            let sent = sink.sent.bytes_sent;
            Err(naming(e, &args.src)).with_context(|| {
                format!(
                    "cannot upload {} to volume '{}' ({sent} bytes had been sent)",
                    args.src.display(),
                    args.volume
                )
            })
        }
    }
}

/// A flag set by Ctrl-C (SIGINT) or SIGTERM from now on, instead of the process dying with the volume half
/// written: the sink then fails its next write and the volume is deleted like after any other failure.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let (set, ready) = (flag.clone(), std::sync::mpsc::channel::<()>());
    let (ready_tx, ready_rx) = ready;
    let spawned = std::thread::Builder::new()
        .name("imgshift-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                let _ = ready_tx.send(());
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                set.store(true, Ordering::Relaxed);
            });
        });
    if spawned.is_ok() {
        // Handlers are installed before the upload starts (or the thread gave up).
        let _ = ready_rx.recv();
    }
    flag
}

#[allow(clippy::too_many_arguments)]
fn print_result(
    args: &LibvirtUploadArgs,
    path: &str,
    capacity: u64,
    format: VolFormat,
    plan: Option<&DomainPlan>,
    started: bool,
    sent: &SentCounts,
    stats: &ConvertStats,
) -> Result<()> {
    match args.output {
        OutputFormat::Json => {
            let domain = plan.map(|p| {
                json!({
                    "name": p.spec.name,
                    "type": p.spec.domain_type,
                    "firmware": p.spec.firmware,
                    "disk_bus": p.spec.disk_bus,
                    "memory_mib": p.spec.memory_mib,
                    "vcpus": p.spec.vcpus,
                    "started": started,
                })
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "uri": args.connect,
                    "pool": args.pool,
                    "volume": args.volume,
                    "path": path,
                    "format": format,
                    "capacity": capacity,
                    "output_len": stats.output_len,
                    "data_bytes": stats.data_bytes,
                    "sent": sent,
                    "domain": domain,
                }))?
            );
        }
        OutputFormat::Human => {
            println!("{path}");
            if let Some(p) = plan {
                println!(
                    "domain {}{}",
                    p.spec.name,
                    if started { " (started)" } else { "" }
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use crate::cli::{Cli, Command, UploadTarget};

    use super::*;

    fn parse(extra: &[&str]) -> Result<LibvirtUploadArgs, clap::Error> {
        let mut argv = vec![
            "imgshift", "upload", "libvirt", "d.qcow2", "--pool", "p", "--volume", "v",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Upload {
                target: UploadTarget::Libvirt(a),
            } => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.output_format, LibvirtVolFormat::Qcow2);
        assert!(a.define.is_none() && !a.overwrite && !a.start);
        assert_eq!(a.firmware, FirmwareArg::Auto);
        assert_eq!(a.disk_bus, DiskBusArg::Auto);
        assert_eq!(a.domain_type, DomainTypeArg::Auto);
    }

    #[test]
    fn domain_flags_need_define() {
        for f in [
            &["--start"][..],
            &["--memory", "512"],
            &["--vcpus", "2"],
            &["--firmware", "uefi"],
            &["--disk-bus", "virtio"],
            &["--domain-type", "qemu"],
            &["--network", "default"],
            &["--serial-log", "/tmp/x"],
        ] {
            assert!(parse(f).is_err(), "{f:?} without --define");
        }
        let a = parse(&[
            "--define",
            "vm",
            "-O",
            "raw",
            "--overwrite",
            "--memory",
            "512",
            "--vcpus",
            "2",
            "--firmware",
            "uefi",
            "--disk-bus",
            "scsi",
            "--domain-type",
            "qemu",
            "--network",
            "default",
            "--serial-log",
            "/tmp/x",
            "--start",
            "--connect",
            "qemu:///session",
        ])
        .unwrap();
        assert_eq!(a.define.as_deref(), Some("vm"));
        assert_eq!(a.output_format, LibvirtVolFormat::Raw);
        assert_eq!((a.memory, a.vcpus), (512, 2));
        assert_eq!(a.firmware, FirmwareArg::Uefi);
        assert_eq!(a.disk_bus, DiskBusArg::Scsi);
        assert_eq!(a.domain_type, DomainTypeArg::Qemu);
        assert_eq!(a.connect, "qemu:///session");
        assert!(a.overwrite && a.start);
    }

    #[test]
    fn rejects_unknown_values() {
        assert!(parse(&["-O", "vmdk"]).is_err());
        assert!(parse(&["--define", "x", "--firmware", "coreboot"]).is_err());
        assert!(parse(&["--define", "x", "--disk-bus", "ide"]).is_err());
        assert!(parse(&["--define", "x", "--domain-type", "xen"]).is_err());
    }
}
