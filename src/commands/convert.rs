//! `imgshift convert`: any readable image to any writable format, to a local file (atomic, sparse) or stdout.

use std::path::Path;

use anyhow::{Context, Result, bail};
use imgshift_converters::{
    ConvertOptions, DiskSource, Format, OutputSet, StreamSink, WriterOptions, convert,
    create_writer,
};

use super::{gate, naming, open_image, open_ova};
use crate::cli::ConvertArgs;
use crate::progress::Bar;

/// Runs `convert`.
pub fn run(args: &ConvertArgs, quiet: bool) -> Result<u8> {
    let out_format = Format::from_name(&args.output_format)?;
    let mut opts = WriterOptions::default();
    for o in &args.options {
        opts.parse_into(o)?;
    }
    if args.compress {
        opts.set("compress", "on");
    }
    let mut writer = create_writer(out_format, &mut opts)?;
    let src = open_source(args)?;
    // --generalize: the guest is generalised into a temporary overlay (a few MiB) over the untouched source, and
    // the overlay with its backing chain is what gets converted; the folder goes when `_scratch` drops.
    let (src, _scratch) = match &args.generalize {
        None => (src, None),
        Some(spec) => {
            if open_ova(&args.src, args.format.as_deref())?.is_some() {
                bail!(
                    "--generalize cannot take a disk inside an OVA: convert the disk out of the OVA first"
                );
            }
            let scratch = tempfile::Builder::new()
                .prefix("imgshift-generalize.")
                .tempdir()
                .context("cannot create a folder for the generalisation overlay")?;
            let g = crate::generalize::prepare(
                &args.src,
                src,
                Some(spec),
                None,
                &scratch.path().join("overlay.qcow2"),
                false,
            )?;
            if let Some(o) = &g.outcome
                && !quiet
            {
                eprintln!("imgshift: {}", crate::generalize::summary(o));
            }
            (g.source, Some(scratch))
        }
    };

    let mut copts = ConvertOptions::default();
    if let Some(t) = args.threads {
        if t == 0 || t > 64 {
            bail!("-m must be between 1 and 64");
        }
        copts.threads = t;
        copts.in_flight = t * 2;
    }
    let bar = Bar::new("convert", args.progress, quiet);
    let stats = if args.dst == "-" {
        // A File on fd 1 avoids Stdout's line buffering (binary data is full of newlines).
        use std::os::fd::AsFd;
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot use standard output")?;
        let mut sink = StreamSink::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::from(fd),
        ));
        convert(src.as_ref(), writer.as_mut(), &mut sink, &copts, &bar)
            .with_context(|| format!("cannot convert {} to standard output", args.src.display()))?
    } else {
        let dst = Path::new(&args.dst);
        if same_file(&args.src, dst) {
            bail!("{} is both the source and the destination", dst.display());
        }
        let (set, mut sink) = OutputSet::with_durability(dst, args.cache.durability())?;
        let stats =
            convert(src.as_ref(), writer.as_mut(), &mut sink, &copts, &bar).with_context(|| {
                format!("cannot convert {} to {}", args.src.display(), dst.display())
            })?;
        drop(sink);
        set.commit()?;
        stats
    };
    bar.finish();
    if args.stats {
        let mut v = serde_json::to_value(&stats)?;
        // What this process really read and its peak memory, from the kernel's own counters.
        if let Some(io) = proc_field("/proc/self/io", "rchar:") {
            v["rchar"] = io.into();
        }
        if let Some(kib) = proc_field("/proc/self/status", "VmHWM:") {
            v["peak_rss_bytes"] = (kib * 1024).into();
        }
        eprintln!("{v}");
    }
    Ok(0)
}

/// Opens the source: disk `--disk` (default the boot disk) of an OVA, read in place from the archive, or the
/// image itself.
fn open_source(args: &ConvertArgs) -> Result<Box<dyn DiskSource>> {
    match open_ova(&args.src, args.format.as_deref())? {
        Some(pkg) => pkg
            .open_disk(args.disk.unwrap_or(0), &gate(&args.trust)?)
            .map_err(|e| naming(e, &args.src)),
        None => {
            if let Some(n) = args.disk {
                bail!(
                    "--disk {n}: {} is not an OVA (--disk picks a disk of an OVA package)",
                    args.src.display()
                );
            }
            open_image(&args.src, args.format.as_deref(), &args.trust)
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Reads a numeric field ("rchar:", "VmHWM:") from a /proc file.
fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}
