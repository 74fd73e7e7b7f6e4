//! The one place that maps command-line options to targets ([`crate::target_kind::TargetKind`] names them): their
//! settings from `migrate`'s and `upload`'s flags, and the target a saved job's command line names (for `resume`
//! and `jobs cancel`).

use anyhow::{Result, bail};

use crate::cli::{
    AwsAfterArgs, AwsConnArgs, AwsUploadArgs, AzureUploadArgs, Command, DiskBusArg, DomainTypeArg,
    FirmwareArg, LibvirtUploadArgs, LibvirtVolFormat, MigrateArgs, UploadTarget,
};
use crate::job::Target;
use crate::target_kind::TargetKind;
use crate::targets::aws::after::AfterSettings;
use crate::targets::aws::config::AwsTarget as AwsConn;
use crate::targets::aws::lifecycle::{self as aws, AwsSettings, AwsTarget};
use crate::targets::aws::register::ImageSpec;
use crate::targets::azure::lifecycle::{self as azure, AzureSettings, AzureTarget};
use crate::targets::libvirt::VolFormat;
use crate::targets::libvirt::lifecycle::{LibvirtSettings, LibvirtTarget};
use crate::targets::libvirt::plan::{BusChoice, DomainChoices, FirmwareChoice, TypeChoice};

fn aws_conn(
    region: &Option<String>,
    profile: &Option<String>,
    endpoint: &Option<String>,
) -> AwsConn {
    AwsConn {
        region: region.clone(),
        profile: profile.clone(),
        endpoint_url: endpoint.clone(),
    }
}

/// `migrate --to aws`.
pub fn aws_for_migrate(args: &MigrateArgs, name: &str) -> Result<AwsTarget> {
    let a = &args.aws;
    let concurrency = args.concurrency.unwrap_or(aws::DEFAULT_CONCURRENCY);
    check_concurrency(concurrency, aws::MAX_CONCURRENCY)?;
    AwsTarget::new(AwsSettings {
        conn: aws_conn(&a.region, &a.profile, &a.endpoint_url),
        max_attempts: args.max_attempts,
        concurrency,
        encrypted: a.encrypted,
        kms_key_id: a.kms_key_id.clone(),
        image: Some(ImageSpec {
            name: name.to_string(),
            description: a.description.clone(),
            architecture: a.architecture.clone(),
            boot_mode: a.boot_mode.clone(),
            ena: !a.no_ena,
            tpm_v2: a.tpm_v2,
            imds_v2_required: a.imds_v2_required,
            volume_type: a.volume_type.clone(),
            root_device: "/dev/xvda".into(),
            tags: super::parse_tags(&args.tags)?,
        }),
        snapshot_description: None,
        after: aws_after(&a.after)?,
        verbose: args.verbose,
    })
}

/// `--copy-to-regions`, `--share-with`, `--launch-template`, `--instance-type`.
fn aws_after(a: &AwsAfterArgs) -> Result<AfterSettings> {
    let copy_to_regions = super::images::region_names("--copy-to-regions", &a.copy_to_regions)
        .map_err(|m| anyhow::anyhow!(m))?;
    let share_with = if a.share_with.is_empty() {
        Vec::new()
    } else {
        super::images::account_ids("--share-with", &a.share_with).map_err(|m| anyhow::anyhow!(m))?
    };
    Ok(AfterSettings {
        copy_to_regions,
        share_with,
        launch_template: a.launch_template.clone(),
        instance_type: a.instance_type.clone(),
    })
}

/// `upload aws`.
pub fn aws_for_upload(args: &AwsUploadArgs) -> Result<AwsTarget> {
    let image = if args.snapshot_only {
        None
    } else {
        let Some(name) = args.name.clone() else {
            bail!("--name is required unless --snapshot-only");
        };
        Some(ImageSpec {
            name,
            description: args.description.clone(),
            architecture: args.architecture.clone(),
            boot_mode: args.boot_mode.clone(),
            ena: !args.no_ena,
            tpm_v2: args.tpm_v2,
            imds_v2_required: args.imds_v2_required,
            volume_type: args.volume_type.clone(),
            root_device: args.root_device.clone(),
            tags: super::parse_tags(&args.tags)?,
        })
    };
    check_concurrency(args.concurrency, aws::MAX_CONCURRENCY)?;
    AwsTarget::new(AwsSettings {
        conn: aws_conn_args(&args.conn),
        max_attempts: args.conn.max_attempts,
        concurrency: args.concurrency,
        encrypted: args.encrypted,
        kms_key_id: args.kms_key_id.clone(),
        image,
        snapshot_description: args.description.clone(),
        after: aws_after(&args.after)?,
        verbose: args.verbose,
    })
}

/// Region, profile and endpoint of an AWS command.
pub fn aws_conn_args(c: &AwsConnArgs) -> AwsConn {
    aws_conn(&c.region, &c.profile, &c.endpoint_url)
}

/// `migrate --to azure`.
pub fn azure_for_migrate(args: &MigrateArgs, name: &str) -> Result<AzureTarget> {
    let a = &args.azure;
    let concurrency = args.concurrency.unwrap_or(azure::DEFAULT_CONCURRENCY);
    check_concurrency(concurrency, azure::MAX_CONCURRENCY)?;
    check_access_duration(a.access_duration)?;
    AzureTarget::new(AzureSettings {
        arm_endpoint: a.arm_endpoint.clone(),
        ca_bundle: a.ca_bundle.clone(),
        subscription: a.subscription.clone(),
        resource_group: a.resource_group.clone(),
        location: a.location.clone(),
        max_attempts: args.max_attempts,
        verbose: args.verbose,
        concurrency,
        access_duration: a.access_duration,
        sku: a.sku.clone(),
        os_type: a.os_type.clone(),
        generation: a.hyper_v_generation.clone(),
        gallery: gallery(&a.gallery, &a.gallery_image, &a.gallery_version)?,
        disk_names: None,
        image_name: Some(name.to_string()),
        image_explicit: false,
    })
}

/// `upload azure`.
pub fn azure_for_upload(args: &AzureUploadArgs) -> Result<AzureTarget> {
    check_concurrency(args.concurrency, azure::MAX_CONCURRENCY)?;
    check_access_duration(args.access_duration)?;
    AzureTarget::new(AzureSettings {
        arm_endpoint: args.arm_endpoint.clone(),
        ca_bundle: args.ca_bundle.clone(),
        subscription: Some(args.subscription.clone()),
        resource_group: Some(args.resource_group.clone()),
        location: Some(args.location.clone()),
        max_attempts: args.max_attempts,
        verbose: args.verbose,
        concurrency: args.concurrency,
        access_duration: args.access_duration,
        sku: args.sku.clone(),
        os_type: args.os_type.clone(),
        generation: args.hyper_v_generation.clone(),
        gallery: gallery(&args.gallery, &args.gallery_image, &args.gallery_version)?,
        disk_names: Some(vec![args.disk_name.clone()]),
        image_name: args.image_name.clone(),
        image_explicit: args.image_name.is_some(),
    })
}

fn gallery(
    g: &Option<String>,
    d: &Option<String>,
    v: &Option<String>,
) -> Result<Option<(String, String, String)>> {
    match (g, d, v) {
        (Some(g), Some(d), Some(v)) => Ok(Some((g.clone(), d.clone(), v.clone()))),
        (None, None, None) => Ok(None),
        _ => bail!("--gallery, --gallery-image and --gallery-version go together"),
    }
}

/// The target a saved job's command names, for `jobs cancel` (connection only: cancelling needs no more).
pub fn for_saved_command(cmd: Command) -> Result<Box<dyn Target>> {
    match cmd {
        Command::Migrate(args) => for_migrate(&args),
        Command::Upload {
            target: UploadTarget::Aws(a),
        } => Ok(Box::new(AwsTarget::connection(
            aws_conn_args(&a.conn),
            a.conn.max_attempts,
        ))),
        Command::Upload {
            target: UploadTarget::Azure(a),
        } => Ok(Box::new(azure_for_upload(&a)?)),
        Command::Upload {
            target: UploadTarget::Libvirt(a),
        } => Ok(Box::new(libvirt_for_upload(&a)?)),
        _ => bail!("its saved command is not a migration or an upload"),
    }
}

/// `migrate --to libvirt`: volumes named after the job, a domain of its name.
pub fn libvirt_for_migrate(args: &MigrateArgs) -> Result<LibvirtTarget> {
    let a = &args.libvirt;
    let Some(pool) = a.pool.clone().filter(|p| !p.is_empty()) else {
        bail!(
            "--to libvirt needs --pool: the running storage pool that receives the volumes (`virsh pool-list` \
             lists them)"
        );
    };
    LibvirtTarget::new(LibvirtSettings {
        uri: a.connect.clone(),
        pool,
        format: vol_format(a.volume_format),
        choices: DomainChoices {
            firmware: firmware_choice(a.firmware),
            disk_bus: bus_choice(a.disk_bus),
            domain_type: type_choice(a.domain_type),
            memory_mib: a.memory,
            vcpus: a.vcpus,
            network: a.network.clone(),
            serial_log: a.serial_log.clone(),
        },
        start: a.start,
        volume_names: None,
        define: true,
        overwrite: false,
        // A disk's upload runs to its end; the job stops at the next disk and keeps what is finished.
        stop: None,
    })
}

/// `upload libvirt`: the volume `--volume`, a domain only with `--define`, `--overwrite` as given; Ctrl-C stops
/// the stream at once (the upload is rolled back anyway).
pub fn libvirt_for_upload(args: &LibvirtUploadArgs) -> Result<LibvirtTarget> {
    if args.define.as_deref() == Some("") {
        bail!("--define needs a domain name");
    }
    LibvirtTarget::new(LibvirtSettings {
        uri: args.connect.clone(),
        pool: args.pool.clone(),
        format: vol_format(args.output_format),
        choices: DomainChoices {
            firmware: firmware_choice(args.firmware),
            disk_bus: bus_choice(args.disk_bus),
            domain_type: type_choice(args.domain_type),
            memory_mib: args.memory,
            vcpus: args.vcpus,
            network: args.network.clone(),
            serial_log: args.serial_log.clone(),
        },
        start: args.start,
        volume_names: Some(vec![args.volume.clone()]),
        define: args.define.is_some(),
        overwrite: args.overwrite,
        stop: Some(crate::interrupt::stop_flag()),
    })
}

fn vol_format(f: LibvirtVolFormat) -> VolFormat {
    match f {
        LibvirtVolFormat::Qcow2 => VolFormat::Qcow2,
        LibvirtVolFormat::Raw => VolFormat::Raw,
    }
}

/// `--firmware` as the libvirt target's choice.
fn firmware_choice(a: FirmwareArg) -> FirmwareChoice {
    match a {
        FirmwareArg::Auto => FirmwareChoice::Auto,
        FirmwareArg::Bios => FirmwareChoice::Bios,
        FirmwareArg::Uefi => FirmwareChoice::Uefi,
    }
}

/// `--disk-bus` as the libvirt target's choice.
fn bus_choice(a: DiskBusArg) -> BusChoice {
    match a {
        DiskBusArg::Auto => BusChoice::Auto,
        DiskBusArg::Virtio => BusChoice::Virtio,
        DiskBusArg::Sata => BusChoice::Sata,
        DiskBusArg::Scsi => BusChoice::Scsi,
    }
}

/// `--domain-type` as the libvirt target's choice.
fn type_choice(a: DomainTypeArg) -> TypeChoice {
    match a {
        DomainTypeArg::Auto => TypeChoice::Auto,
        DomainTypeArg::Kvm => TypeChoice::Kvm,
        DomainTypeArg::Qemu => TypeChoice::Qemu,
    }
}

/// The target of a `migrate` command whose source's cloud says `facts` about the guest: what the target's
/// flags leave open (`auto`, unset) follows them — an AMI's boot mode picks the Azure Hyper-V generation
/// (legacy-bios → V1, uefi → V2) and the AWS boot mode; its ENA flag and architecture carry over to an AMI.
pub fn for_migrate_from(
    args: &MigrateArgs,
    facts: &crate::sources::SourceFacts,
) -> Result<Box<dyn Target>> {
    let mut args = args.clone();
    if args.aws.boot_mode.is_none() {
        args.aws.boot_mode = facts.boot_mode.clone();
    }
    if facts.ena == Some(false) {
        args.aws.no_ena = true;
    }
    if let Some(a) = &facts.architecture
        && a == "arm64"
    {
        args.aws.architecture = a.clone();
    }
    if args.azure.hyper_v_generation == "auto" {
        match facts.boot_mode.as_deref() {
            Some("uefi") => args.azure.hyper_v_generation = "V2".into(),
            Some("legacy-bios") => args.azure.hyper_v_generation = "V1".into(),
            _ => {}
        }
    }
    for_migrate(&args)
}

/// The target of a `migrate` command.
pub fn for_migrate(args: &MigrateArgs) -> Result<Box<dyn Target>> {
    let name = super::migrate::job_name(args)?;
    Ok(match args.to {
        TargetKind::Aws => Box::new(aws_for_migrate(args, &name)?),
        TargetKind::Azure => Box::new(azure_for_migrate(args, &name)?),
        TargetKind::Libvirt => Box::new(libvirt_for_migrate(args)?),
    })
}

/// Refuses `--concurrency` outside what the target takes, naming the flag.
fn check_concurrency(n: usize, max: usize) -> Result<()> {
    if n == 0 || n > max {
        bail!("--concurrency must be between 1 and {max}");
    }
    Ok(())
}

/// Refuses an Azure `--access-duration` outside 5 minutes .. 7 days.
fn check_access_duration(secs: u64) -> Result<()> {
    if !(300..=7 * 86400).contains(&secs) {
        bail!("--access-duration must be between 300 and 604800 seconds");
    }
    Ok(())
}
