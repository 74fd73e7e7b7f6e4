//! `imgshift measure`: how large an output file a conversion needs, as `qemu-img measure` answers it.
//!
//! raw and qcow2 are computed as qemu computes them (`raw_measure`, `qcow2_measure` and
//! `qcow2_calc_prealloc_size` in qemu's `block/`), so the numbers agree with `qemu-img measure`. qemu measures no
//! other format; for vpc, vhdx, vmdk and vdi imgshift lays the output out for a stream without writing it (the
//! layout an upload or `convert ... -` produces, where every planned block is stored) and reports its length:
//! `required` from the source's allocation map, `fully allocated` as if every block held data. Only
//! VMDK streamOptimized depends on the data itself (it is compressed): its required size comes from compressing
//! the data, and it has no fully allocated size.

use anyhow::{Context, Result, bail};
use imgshift_converters::{
    ConvertOptions, DiskSource, ExtentKind, ExtentMap, Format, ImageInfo, NoProgress, Sink,
    create_writer, resolved_extents,
};
use serde_json::json;

use super::convert::{output_format, writer_opts};
use super::{human_size, open_image};
use crate::cli::{MeasureArgs, OutputFormat};

/// EBS volumes are sized in whole GiB (StartSnapshot's VolumeSize), at least 1.
const GIB: u64 = 1 << 30;
/// Azure managed-disk uploads are a fixed VHD: the disk rounded up to a whole MiB plus the 512-byte footer.
const MIB: u64 = 1 << 20;

/// What `measure` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the output file needs for this source.
    pub required: u64,
    /// Bytes the output file needs when every block of the virtual disk holds data; `None` when that depends on
    /// the data (compressed output).
    pub fully_allocated: Option<u64>,
}

/// Runs `measure`.
pub fn run(args: &MeasureArgs) -> Result<u8> {
    let fmt = output_format(&args.output_format)?;
    if super::convert::wants_help(&args.options) {
        outln!("{}", super::convert::options_help(fmt).trim_end());
        return Ok(0);
    }
    let src = open_image(&args.image, args.format.as_deref(), &args.trust)?;
    let m = measure(src.as_ref(), fmt, &args.options)
        .with_context(|| format!("cannot measure {} as {}", args.image.display(), fmt.name()))?;
    let size = src.virtual_size();
    let ebs_gib = size.div_ceil(GIB).max(1);
    let azure = size.div_ceil(MIB).saturating_mul(MIB).saturating_add(512);
    match args.output {
        OutputFormat::Json => {
            let mut v = json!({
                "required": m.required,
                "fully-allocated": m.fully_allocated,
            });
            if fmt == Format::Qcow2 {
                // qemu-img prints it for qcow2 outputs; imgshift writes no bitmaps.
                v["bitmaps"] = 0.into();
            }
            match args.target.as_deref() {
                Some("aws") => v["ebs-volume-gib"] = ebs_gib.into(),
                Some("azure") => v["azure-upload-bytes"] = azure.into(),
                _ => {}
            }
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            outln!("required size: {}", m.required);
            match m.fully_allocated {
                Some(f) => outln!("fully allocated size: {f}"),
                None => outln!("fully allocated size: depends on the data (compressed output)"),
            }
            if fmt == Format::Qcow2 {
                outln!("bitmaps size: 0");
            }
            match args.target.as_deref() {
                Some("aws") => outln!(
                    "EBS volume: {ebs_gib} GiB (the virtual size {} rounded up to whole GiB)",
                    human_size(size)
                ),
                Some("azure") => outln!(
                    "Azure upload size: {azure} bytes (a fixed VHD: {} rounded up to whole MiB, plus the 512-byte footer)",
                    human_size(size)
                ),
                _ => {}
            }
        }
    }
    Ok(0)
}

/// Measures the output of converting `src` to `fmt` with `-o` options.
pub fn measure(src: &dyn DiskSource, fmt: Format, options: &[String]) -> Result<Measure> {
    let mut opts = writer_opts(fmt, options, false)?;
    match fmt {
        Format::Raw => {
            // qemu's raw_measure: the virtual size rounded up to a sector, allocated or not.
            let n = src.virtual_size().div_ceil(512) * 512;
            create_writer(fmt, &mut opts)?;
            Ok(Measure {
                required: n,
                fully_allocated: Some(n),
            })
        }
        Format::Qcow2 => {
            if opts.get("backing_file").is_some() {
                bail!(
                    "-o backing_file: measuring an overlay is not supported (the whole disk is counted)"
                );
            }
            let cluster = opts.take_size("cluster_size")?.unwrap_or(64 << 10);
            // Validates the rest of the options as convert would.
            opts.set("cluster_size", cluster.to_string());
            create_writer(fmt, &mut opts)?;
            let map = resolved_extents(src, 0, src.virtual_size())?;
            Ok(qcow2_measure(src.virtual_size(), cluster, &map))
        }
        _ => {
            let streamed = opts.get("subformat") == Some("streamOptimized");
            let map = resolved_extents(src, 0, src.virtual_size())?;
            let required = if streamed {
                // Compressed: the size is the data's.
                stream_len(src, fmt, options, &map)?
            } else {
                stream_len(&Zeros(src.virtual_size()), fmt, options, &map)?
            };
            let fully_allocated = if streamed {
                None
            } else {
                let mut all = ExtentMap::new();
                if src.virtual_size() > 0 {
                    all.push(0, src.virtual_size(), ExtentKind::Data)?;
                }
                Some(stream_len(&Zeros(src.virtual_size()), fmt, options, &all)?)
            };
            Ok(Measure {
                required,
                fully_allocated,
            })
        }
    }
}

/// qemu's `qcow2_measure` for a new image without backing file, encryption or extended L2 (16-bit refcounts):
/// the metadata of a fully allocated image, plus the clusters the source's data touches.
pub fn qcow2_measure(virtual_size: u64, cluster: u64, map: &ExtentMap) -> Measure {
    let mut data = 0u64;
    let mut last_counted: Option<u64> = None;
    for e in map.iter().filter(|e| e.kind == ExtentKind::Data) {
        let first = e.start / cluster;
        let last = (e.start + e.len - 1) / cluster;
        let first = match last_counted {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if last >= first {
            data = data.saturating_add((last - first + 1).saturating_mul(cluster));
            last_counted = Some(last);
        }
    }
    let fully = qcow2_prealloc_size(virtual_size, cluster, 4);
    let aligned = virtual_size.div_ceil(cluster).saturating_mul(cluster);
    Measure {
        required: fully.saturating_sub(aligned).saturating_add(data),
        fully_allocated: Some(fully),
    }
}

/// qemu's `qcow2_calc_prealloc_size` (normal 8-byte L2 entries). Saturating: a size near 2^64 gives a huge
/// answer, never a wrapped one.
fn qcow2_prealloc_size(total: u64, cluster: u64, refcount_order: u32) -> u64 {
    let aligned = total.div_ceil(cluster).saturating_mul(cluster);
    let per_table = cluster / 8;
    let nl2e = (aligned / cluster)
        .div_ceil(per_table)
        .saturating_mul(per_table);
    let nl1e = (nl2e.saturating_mul(8) / cluster)
        .div_ceil(per_table)
        .saturating_mul(per_table);
    // The header cluster, the L2 tables, the L1 table.
    let meta = cluster
        .saturating_add(nl2e.saturating_mul(8))
        .saturating_add(nl1e.saturating_mul(8));
    let refcounts = refcount_metadata_size(
        meta.saturating_add(aligned) / cluster,
        cluster,
        refcount_order,
    );
    meta.saturating_add(refcounts).saturating_add(aligned)
}

/// qemu's `qcow2_refcount_metadata_size` (no generous increase): the fixed point of refcount blocks and table
/// clusters needed to count every cluster, themselves included.
fn refcount_metadata_size(clusters: u64, cluster: u64, refcount_order: u32) -> u64 {
    let per_table = cluster / 8;
    let per_block = cluster * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters
            .saturating_add(table)
            .saturating_add(blocks)
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table);
        n = clusters.saturating_add(blocks).saturating_add(table);
        if n == last {
            return blocks.saturating_add(table).saturating_mul(cluster);
        }
    }
}

/// The length of `fmt`'s streamed output for `src` with the allocation `map`; nothing is written.
fn stream_len(
    src: &dyn DiskSource,
    fmt: Format,
    options: &[String],
    map: &ExtentMap,
) -> Result<u64> {
    let mut opts = writer_opts(fmt, options, false)?;
    let mut writer = create_writer(fmt, &mut opts)?;
    let mut sink = Nowhere::default();
    let stats = imgshift_converters::engine::convert_with_map(
        src,
        map,
        writer.as_mut(),
        &mut sink,
        &ConvertOptions::default(),
        &NoProgress,
    )?;
    Ok(stats.output_len.max(sink.len))
}

/// A stream that keeps only its length.
#[derive(Default)]
struct Nowhere {
    len: u64,
}

impl Sink for Nowhere {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> imgshift_converters::Result<()> {
        self.len = self.len.max(offset.saturating_add(data.len() as u64));
        Ok(())
    }
    fn can_seek_back(&self) -> bool {
        false
    }
    fn finish(&mut self, len: u64) -> imgshift_converters::Result<()> {
        self.len = self.len.max(len);
        Ok(())
    }
}

/// A disk of `0.0` bytes that reads as zeros: the layout of a streamed output depends only on the allocation map
/// handed to the engine, not on the bytes.
struct Zeros(u64);

impl DiskSource for Zeros {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.0
    }
    fn extents(&self, offset: u64, len: u64) -> imgshift_converters::Result<ExtentMap> {
        let mut m = ExtentMap::new();
        if len > 0 {
            m.push(offset, len, ExtentKind::Data)?;
        }
        Ok(m)
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> imgshift_converters::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.0,
            ..ImageInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers `qemu-img measure -O qcow2` printed for a 64 MiB image holding 1 MiB at 0 and 3 MiB at
    /// 10 MiB (qemu-img 10.0.2).
    #[test]
    fn qcow2_matches_qemu() {
        let mut map = ExtentMap::new();
        map.push(0, 1 << 20, ExtentKind::Data).unwrap();
        map.push(1 << 20, 9 << 20, ExtentKind::Zero).unwrap();
        map.push(10 << 20, 3 << 20, ExtentKind::Data).unwrap();
        map.push(13 << 20, 51 << 20, ExtentKind::Zero).unwrap();
        let m = qcow2_measure(64 << 20, 64 << 10, &map);
        assert_eq!(m.required, 4521984);
        assert_eq!(m.fully_allocated, Some(67436544));
        let m = qcow2_measure(64 << 20, 2 << 20, &map);
        assert_eq!(m.required, 16777216);
        assert_eq!(m.fully_allocated, Some(77594624));
    }

    #[test]
    fn parses_like_qemu_img_measure() {
        use clap::Parser as _;
        let c = crate::cli::Cli::try_parse_from([
            "imgshift",
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "--target",
            "aws",
            "d.vmdk",
        ])
        .unwrap();
        match c.command {
            crate::cli::Command::Measure(a) => {
                assert_eq!(a.output_format, "qcow2");
                assert_eq!(a.options, ["cluster_size=2M"]);
                assert_eq!(a.target.as_deref(), Some("aws"));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(
            crate::cli::Cli::try_parse_from(["imgshift", "measure", "--target", "libvirt", "d"])
                .is_err()
        );
    }
}
