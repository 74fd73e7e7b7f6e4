//! `imgshift upload libvirt`: source image → converter engine → libvirt storage volume (streamed, no temporary
//! file) → optional domain definition and start.

use anyhow::{Context, Result, anyhow, bail};
use imgshift_converters::{ConvertOptions, Format, WriterOptions, convert, create_writer};
use serde_json::json;
use virt::domain::Domain;
use virt::storage_vol::StorageVol;

use super::open_image;
use crate::cli::{LibvirtUploadArgs, OutputFormat};
use crate::progress::Bar;
use crate::targets::libvirt::{self as lv, DomainSpec, VolumeSink, msg};

/// Runs `upload libvirt`.
pub fn run(args: &LibvirtUploadArgs, quiet: bool) -> Result<u8> {
    let out_format = Format::from_name(&args.output_format)?;
    let mut wopts = WriterOptions::default();
    let mut writer = create_writer(out_format, &mut wopts)?;
    let src = open_image(&args.src, args.format.as_deref(), &args.trust)?;
    let capacity = writer.output_virtual_size(src.virtual_size())?;
    if let Some(d) = &args.define {
        if args.vcpus == 0 || args.memory == 0 {
            bail!("--vcpus and --memory must be at least 1");
        }
        if d.is_empty() {
            bail!("--define needs a domain name");
        }
    }

    let uri = args.connect.as_str();
    let conn = lv::connect(uri)?;
    let pool = lv::pool(&conn, &args.pool, uri)?;
    let (pool_name, vol_name) = (args.pool.as_str(), args.volume.as_str());

    // Refuse before creating anything when a name is taken.
    let old_domain = match &args.define {
        Some(name) => match conn.lookup_domain_by_name(name) {
            Ok(d) => {
                if !args.overwrite {
                    bail!("domain '{name}' already exists at {uri} (pass --overwrite to replace it)");
                }
                if d.is_active().unwrap_or(true) {
                    bail!(
                        "domain '{name}' is running; stop it first (`virsh -c '{uri}' destroy {name}`) to replace it"
                    );
                }
                Some(d)
            }
            Err(_) => None,
        },
        None => None,
    };
    if let Ok(old) = pool.lookup_storage_vol_by_name(vol_name) {
        if !args.overwrite {
            bail!(
                "volume '{vol_name}' already exists in pool '{pool_name}' (pass --overwrite to replace it)"
            );
        }
        old.delete(0).map_err(|e| {
            anyhow!(
                "cannot delete the existing volume '{vol_name}' in pool '{pool_name}': {}",
                msg(&e)
            )
        })?;
    }

    let xml = lv::volume_xml(vol_name, capacity, &args.output_format)?;
    let vol = StorageVol::create_xml(&pool, &xml, 0).map_err(|e| {
        anyhow!(
            "cannot create volume '{vol_name}' ({capacity} bytes, {}) in pool '{pool_name}': {}",
            args.output_format,
            msg(&e)
        )
    })?;
    // From here on, a failure removes the volume (or names it when that fails too).
    let rollback = |e: anyhow::Error, dom: Option<&Domain>| -> anyhow::Error {
        if let Some(d) = dom {
            if let Err(u) = d.undefine_flags(lv::UNDEFINE_NVRAM) {
                return e.context(format!(
                    "domain '{}' was left defined ({}); volume '{vol_name}' was left in pool '{pool_name}'",
                    args.define.as_deref().unwrap_or_default(),
                    msg(&u)
                ));
            }
        }
        match lv::delete_volume(&vol, pool_name, vol_name) {
            Ok(()) => e.context(format!(
                "volume '{vol_name}' was removed from pool '{pool_name}'"
            )),
            Err(d) => e.context(d.to_string()),
        }
    };

    let (sent, stats) = match upload(args, &conn, &vol, src.as_ref(), writer.as_mut(), quiet) {
        Ok(v) => v,
        Err(e) => return Err(rollback(e, None)),
    };
    let path = vol.path().unwrap_or_default();

    let mut domain = None;
    let mut started = false;
    if let Some(name) = &args.define {
        let spec = DomainSpec {
            name: name.clone(),
            domain_type: args.domain_type.clone(),
            memory_mib: args.memory,
            vcpus: args.vcpus,
            uefi: args.firmware == "uefi",
            disk_bus: match args.disk_bus.as_str() {
                "auto" => "virtio".to_string(),
                b => b.to_string(),
            },
            pool: pool_name.to_string(),
            volume: vol_name.to_string(),
            format: args.output_format.clone(),
            network: args.network.clone(),
        };
        let dxml = match lv::domain_xml(&spec) {
            Ok(x) => x,
            Err(e) => return Err(rollback(e, None)),
        };
        if let Some(old) = &old_domain {
            if let Err(e) = old.undefine_flags(lv::UNDEFINE_NVRAM) {
                return Err(rollback(
                    anyhow!("cannot undefine the existing domain '{name}': {}", msg(&e)),
                    None,
                ));
            }
        }
        let dom = match conn.define_domain_xml(&dxml) {
            Ok(d) => d,
            Err(e) => {
                return Err(rollback(
                    anyhow!("cannot define domain '{name}': {}", msg(&e)),
                    None,
                ));
            }
        };
        if args.start {
            if let Err(e) = dom.create() {
                return Err(rollback(
                    anyhow!("cannot start domain '{name}': {}", msg(&e)),
                    Some(&dom),
                ));
            }
            started = true;
        }
        domain = Some(name.clone());
    }

    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "uri": uri,
                "pool": pool_name,
                "volume": vol_name,
                "path": path,
                "format": args.output_format,
                "capacity": capacity,
                "output_len": stats.output_len,
                "data_bytes": stats.data_bytes,
                "bytes_sent": sent.bytes_sent,
                "zero_fill_bytes": sent.zero_fill,
                "streams": sent.streams,
                "domain": domain,
                "started": started,
            }))?
        ),
        OutputFormat::Human => {
            println!("{path}");
            if let Some(d) = &domain {
                println!("{d}");
            }
        }
    }
    Ok(0)
}

/// Converts `src` straight into `vol`.
fn upload(
    args: &LibvirtUploadArgs,
    conn: &virt::connect::Connect,
    vol: &StorageVol,
    src: &dyn imgshift_converters::DiskSource,
    writer: &mut dyn imgshift_converters::FormatWriter,
    quiet: bool,
) -> Result<(lv::SentCounts, imgshift_converters::ConvertStats)> {
    let min_len = lv::physical_len(vol)?;
    let mut sink = VolumeSink::new(conn, vol, args.output_format == "raw", min_len);
    let bar = Bar::new("upload", args.progress, quiet);
    let r = convert(src, writer, &mut sink, &ConvertOptions::default(), &bar);
    bar.finish();
    match r {
        Ok(stats) => Ok((sink.sent, stats)),
        Err(e) => {
            sink.abort();
            Err(anyhow::Error::new(e)).with_context(|| {
                format!(
                    "cannot upload {} to volume '{}'",
                    args.src.display(),
                    args.volume
                )
            })
        }
    }
}
