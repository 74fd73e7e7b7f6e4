//! `imgshift failover NAME`: a replica's recovery point started on its target (so far: a libvirt domain over an
//! overlay of the point's volume), after the point's recorded preflight verdict.

use std::io::Write;

use anyhow::{Context, Result, bail};

use crate::cli::{DiskBusArg, DomainTypeArg, FailoverArgs, FirmwareArg, OutputFormat};
use crate::journal::state_dir;
use crate::target_kind::ReplicaKind;
use crate::targets::libvirt::plan::{
    BusChoice, DomainChoices, FirmwareChoice, GuestHints, TypeChoice,
};
use crate::targets::libvirt::{Firmware, replica::LibvirtStore};

/// `imgshift failover …`.
pub fn run(args: &FailoverArgs) -> Result<u8> {
    crate::replicate::check_name(&args.name)?;
    let cache_dir = state_dir(args.state_dir.as_deref())?.join("replicas");
    let (to, t) = super::replicate::resolve_target(&cache_dir, &args.name, args.to, &args.target)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut store = super::replicate::store(to, &t, &cache_dir, stop.clone())?;
    let points = store.points(&args.name)?;
    let point = match args.point {
        Some(n) => points.iter().find(|p| p.number == n).with_context(|| {
            format!(
                "replica {} has no point {n} in {}",
                args.name,
                store.describe()
            )
        })?,
        None => points.last().with_context(|| {
            format!(
                "replica {} has no points in {}",
                args.name,
                store.describe()
            )
        })?,
    };
    let guest = point.guest.clone().unwrap_or_default();
    let target = match to {
        ReplicaKind::Aws => "aws",
        _ => "libvirt",
    };
    let verdict = guest.targets.get(target).cloned().unwrap_or_default();
    match to {
        ReplicaKind::File => bail!(
            "replica {}'s points are qcow2 files already: point {} is {} in {} (its backing chain is the history); \
             start it with `imgshift upload libvirt` or any hypervisor",
            args.name,
            point.number,
            point.target_id,
            store.describe()
        ),
        ReplicaKind::Libvirt | ReplicaKind::Aws => {}
    }
    for f in &verdict.findings {
        eprintln!("imgshift: preflight ({target}): {f}");
    }
    if verdict.verdict == "fail" && !args.force {
        bail!(
            "point {}'s guest ({}) will not boot on {target} as inspected when the point was made (imgshift inspect \
             --target {target} on the source says why); --force to go on anyway",
            point.number,
            guest.os
        );
    }
    if to == ReplicaKind::Aws {
        let image_name = args
            .image_name
            .clone()
            .unwrap_or_else(|| format!("{}-point-{}", args.name, point.number));
        drop(store);
        let aws = super::replicate::aws_store(&t, &cache_dir, stop)?;
        let ami = aws.failover(
            point,
            &image_name,
            args.boot_mode.clone(),
            &args.architecture,
        )?;
        let mut out = std::io::stdout().lock();
        match args.output {
            OutputFormat::Json => {
                serde_json::to_writer_pretty(
                    &mut out,
                    &serde_json::json!({
                        "image": ami,
                        "name": image_name,
                        "point": point.number,
                        "snapshot": point.target_id,
                        "region": aws.region(),
                    }),
                )?;
                writeln!(out)?;
            }
            OutputFormat::Human => writeln!(
                out,
                "AMI {ami} ({image_name}) registered in {} over point {} of replica {} (snapshot {})",
                aws.region(),
                point.number,
                args.name,
                point.target_id
            )?,
        }
        return Ok(0);
    }
    let choices = DomainChoices {
        firmware: match args.firmware {
            FirmwareArg::Auto => FirmwareChoice::Auto,
            FirmwareArg::Bios => FirmwareChoice::Bios,
            FirmwareArg::Uefi => FirmwareChoice::Uefi,
        },
        disk_bus: match args.disk_bus {
            DiskBusArg::Auto => BusChoice::Auto,
            DiskBusArg::Virtio => BusChoice::Virtio,
            DiskBusArg::Sata => BusChoice::Sata,
            DiskBusArg::Scsi => BusChoice::Scsi,
        },
        domain_type: match args.domain_type {
            DomainTypeArg::Auto => TypeChoice::Auto,
            DomainTypeArg::Kvm => TypeChoice::Kvm,
            DomainTypeArg::Qemu => TypeChoice::Qemu,
        },
        memory_mib: args.memory,
        vcpus: args.vcpus,
        network: args.network.clone(),
        serial_log: args.serial_log.clone(),
    };
    let hints = GuestHints {
        os_read: guest.os_read,
        settings: verdict.settings.clone(),
        partition_firmware: guest.partition_firmware.as_ref().map(|(fw, why)| {
            (
                if fw == "uefi" {
                    Firmware::Uefi
                } else {
                    Firmware::Bios
                },
                why.clone(),
            )
        }),
    };
    let domain = args
        .domain
        .clone()
        .unwrap_or_else(|| format!("{}-failover", args.name));
    drop(store);
    let uri = super::replicate::libvirt_uri(&t);
    let pool = t.pool.clone().context("--to libvirt needs --pool POOL")?;
    let lv = LibvirtStore::new(&uri, &pool, stop)?;
    let done = lv.failover(point, &domain, &choices, &hints, args.start)?;
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &done)?;
            writeln!(out)?;
        }
        OutputFormat::Human => {
            for n in &done.notes {
                writeln!(out, "note: {n}")?;
            }
            writeln!(
                out,
                "domain '{}' defined from point {} of replica {} (disk '{}', an overlay over '{}'; {} firmware, {} bus){}",
                done.domain,
                done.point,
                args.name,
                done.volume,
                point.target_id,
                done.firmware,
                done.disk_bus,
                if done.started { "; started" } else { "" }
            )?;
        }
    }
    Ok(0)
}
