//! `imgshift upload libvirt`: source image → converter engine → libvirt storage volume (streamed, no temporary
//! file) → optional domain definition and start.
//!
//! Order: everything that can refuse (arguments, source, daemon, pool, taken names) is checked before the volume
//! is created; from the volume's creation on, any failure deletes it again (and undefines a domain this run
//! defined), or names what was left behind.

use std::sync::Arc;

use anyhow::Result;
use imgshift_converters::{ConvertStats, DiskSource};
use serde_json::json;

use super::{gate, naming, open_image, open_ova};
use crate::cli::{
    DiskBusArg, DomainTypeArg, FirmwareArg, LibvirtUploadArgs, LibvirtVolFormat, OutputFormat,
};
use crate::progress::Bar;
use crate::targets::libvirt::Firmware;
use crate::targets::libvirt::plan::{
    BusChoice, DomainChoices, DomainPlan, FirmwareChoice, GuestHints, TypeChoice,
};
use crate::targets::libvirt::rpc::{Connect, Domain, StoragePool};
use crate::targets::libvirt::sink::SentCounts;
use crate::targets::libvirt::xml::{DomainDisk, domain_xml};
use crate::targets::libvirt::{Error as LvError, VolFormat, conn as lv, fill, inuse, volume};

/// Runs `upload libvirt`.
pub fn run(args: &LibvirtUploadArgs, quiet: bool) -> Result<u8> {
    let vol_format = match args.output_format {
        LibvirtVolFormat::Qcow2 => VolFormat::Qcow2,
        LibvirtVolFormat::Raw => VolFormat::Raw,
    };
    let src: std::sync::Arc<dyn DiskSource> = std::sync::Arc::from(open_source(args)?);
    let capacity = fill::capacity(vol_format, src.virtual_size())?;

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

    let (sent, stats) = match upload(args, &created, vol_format, src.as_ref(), quiet) {
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

/// Resolves `auto` choices (from imgshift's own inspection of the guest when firmware or bus is `auto`) and
/// checks the domain options.
fn plan_domain(
    args: &LibvirtUploadArgs,
    name: &str,
    format: VolFormat,
    src: &std::sync::Arc<dyn DiskSource>,
    conn: &Connect,
) -> Result<DomainPlan> {
    if name.is_empty() {
        anyhow::bail!("--define needs a domain name");
    }
    let choices = DomainChoices {
        firmware: firmware_choice(args.firmware),
        disk_bus: bus_choice(args.disk_bus),
        domain_type: type_choice(args.domain_type),
        memory_mib: args.memory,
        vcpus: args.vcpus,
        network: args.network.clone(),
        serial_log: args.serial_log.clone(),
    };
    let guest = choices.needs_guest().then(|| inspect_guest(src));
    let disks = vec![DomainDisk {
        pool: args.pool.clone(),
        volume: args.volume.clone(),
        format,
    }];
    crate::targets::libvirt::plan::plan_domain(name, &choices, disks, guest.as_ref(), conn)
}

/// `--firmware` as the libvirt target's choice.
pub(crate) fn firmware_choice(a: FirmwareArg) -> FirmwareChoice {
    match a {
        FirmwareArg::Auto => FirmwareChoice::Auto,
        FirmwareArg::Bios => FirmwareChoice::Bios,
        FirmwareArg::Uefi => FirmwareChoice::Uefi,
    }
}

/// `--disk-bus` as the libvirt target's choice.
pub(crate) fn bus_choice(a: DiskBusArg) -> BusChoice {
    match a {
        DiskBusArg::Auto => BusChoice::Auto,
        DiskBusArg::Virtio => BusChoice::Virtio,
        DiskBusArg::Sata => BusChoice::Sata,
        DiskBusArg::Scsi => BusChoice::Scsi,
    }
}

/// `--domain-type` as the libvirt target's choice.
pub(crate) fn type_choice(a: DomainTypeArg) -> TypeChoice {
    match a {
        DomainTypeArg::Auto => TypeChoice::Auto,
        DomainTypeArg::Kvm => TypeChoice::Kvm,
        DomainTypeArg::Qemu => TypeChoice::Qemu,
    }
}

/// What imgshift's own offline inspection of `src` tells the `auto` choices: the libvirt preflight rules'
/// settings, whether a Linux root was read, and the firmware the partition table suggests.
pub(crate) fn inspect_guest(src: &Arc<dyn DiskSource>) -> GuestHints {
    let disk = crate::guest::Window::whole(
        Arc::clone(src),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let report = crate::guest::report::inspect(&disk);
    let facts = report.facts(None);
    let settings = crate::guest::preflight::table("libvirt")
        .map(|rules| crate::guest::preflight::evaluate("libvirt", rules, &facts).settings)
        .unwrap_or_default();
    let (fw, why) = partition_firmware(src.as_ref());
    GuestHints {
        os_read: facts.linux_root || facts.windows.as_ref().is_some_and(|w| w.registry_read),
        settings,
        partition_firmware: Some((fw, why.to_string())),
    }
}

/// The firmware a disk's partition table suggests: UEFI for a GPT with an EFI system partition (Azure's rule for
/// Hyper-V generation 2), else BIOS; and why.
pub(crate) fn partition_firmware(src: &dyn DiskSource) -> (Firmware, &'static str) {
    let (generation, why) = crate::targets::azure::hyperv::detect(src);
    let fw = if generation == "V2" {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    (fw, why)
}

/// Converts `src` straight into the new volume.
fn upload(
    args: &LibvirtUploadArgs,
    created: &volume::Created,
    format: VolFormat,
    src: &dyn DiskSource,
    quiet: bool,
) -> Result<(SentCounts, ConvertStats)> {
    let bar = Bar::new("upload", args.progress, quiet);
    // Ctrl-C or SIGTERM: the sink fails its next write and the volume is deleted like after any other failure
    // (a second signal ends the process at once).
    crate::interrupt::install()?;
    let r = fill::fill(
        created,
        format,
        src,
        None,
        &bar,
        Some(crate::interrupt::stop_flag()),
    );
    bar.finish();
    r.map_err(|f| {
        let sent = f.sent.bytes_sent;
        naming(f.error, &args.src).context(format!(
            "cannot upload {} to volume '{}' ({sent} bytes had been sent)",
            args.src.display(),
            args.volume
        ))
    })
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

    use crate::cli::{Cli, Command, DiskBusArg, DomainTypeArg, FirmwareArg, UploadTarget};

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
