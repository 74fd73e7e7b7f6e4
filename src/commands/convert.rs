//! `imgshift convert`: any readable image to any writable format, to a local file (atomic, sparse) or stdout.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use imgshift_converters::{
    ConvertOptions, DiskSource, FileSink, Format, StreamSink, WriterOptions, convert,
    create_writer, writer_compresses, writer_options,
};

use super::{gate, human_size, naming, open_image, open_ova};
use crate::UsageError;
use crate::cli::ConvertArgs;
use crate::progress::Bar;

/// The output format named by `-O`; an unknown name is a usage error (exit 2).
pub fn output_format(name: &str) -> Result<Format> {
    match Format::from_name(name) {
        Ok(Format::Ova) => Err(UsageError(
            "-O ova: ova is an input format only; write vmdk and package it".into(),
        )
        .into()),
        Ok(f) => Ok(f),
        Err(e) => Err(UsageError(format!("-O {name}: {e}")).into()),
    }
}

/// True when one of the `-o` strings asks for help (`-o help`, `-o ?`, as qemu-img).
pub fn wants_help(options: &[String]) -> bool {
    options
        .iter()
        .any(|o| o.split(',').any(|i| matches!(i.trim(), "help" | "?")))
}

/// The `-o help` text for `format`: each option with its kind, default and description.
pub fn options_help(format: Format) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let spec = writer_options(format).unwrap_or(&[]);
    if spec.is_empty() {
        let _ = writeln!(t, "The {} format takes no -o options.", format.name());
    } else {
        let _ = writeln!(t, "Supported {} options:", format.name());
        for s in spec {
            let _ = writeln!(
                t,
                "  {:<22} - {} (default: {})",
                format!("{}=<{}>", s.name, s.kind.name()),
                s.help,
                s.default
            );
        }
    }
    if writer_compresses(format) {
        let _ = writeln!(t, "\n-c compresses every data cluster.");
    } else if format == Format::Vmdk {
        let _ = writeln!(
            t,
            "\nCompressed VMDK output is -o subformat=streamOptimized (-c is not needed)."
        );
    }
    t
}

/// The writer options from `-o` and `-c`, checked against `format` (an unknown key lists the valid ones).
pub fn writer_opts(format: Format, options: &[String], compress: bool) -> Result<WriterOptions> {
    let mut opts = WriterOptions::default();
    for o in options {
        opts.parse_into(o)?;
    }
    if compress {
        if writer_compresses(format) {
            opts.set("compress", "on");
        } else if format == Format::Vmdk {
            // VMDK has no compression flag: its compressed layout is a subformat.
            if opts.get("subformat") != Some("streamOptimized") {
                return Err(UsageError(
                    "-c with -O vmdk: compressed VMDK output is -o subformat=streamOptimized; use that instead of -c"
                        .into(),
                )
                .into());
            }
        } else {
            return Err(UsageError(format!(
                "-c: {} output cannot be compressed (qcow2 can; VMDK with -o subformat=streamOptimized)",
                format.name()
            ))
            .into());
        }
    }
    Ok(opts)
}

/// Runs `convert`.
pub fn run(args: &ConvertArgs, quiet: bool) -> Result<u8> {
    let out_format = output_format(&args.output_format)?;
    if wants_help(&args.options) {
        outln!("{}", options_help(out_format).trim_end());
        return Ok(0);
    }
    let (Some(src_path), Some(dst_name)) = (args.src.as_deref(), args.dst.as_deref()) else {
        return Err(UsageError("convert needs SRC and DST".into()).into());
    };
    if args.no_create && !matches!(out_format, Format::Raw | Format::Qcow2 | Format::Vpc) {
        return Err(UsageError(format!(
            "-n writes into an existing raw file or block device, qcow2 image or fixed VHD (-O raw, qcow2 or vpc); an existing {} image is not rewritten in place (drop -n)",
            out_format.name()
        ))
        .into());
    }
    if args.no_create && out_format != Format::Raw && (args.compress || !args.options.is_empty()) {
        return Err(UsageError(format!(
            "-n keeps the existing {} image's layout: -o and -c do not apply (drop them, or drop -n)",
            out_format.name()
        ))
        .into());
    }
    if args.no_create && dst_name == "-" {
        return Err(UsageError("-n needs a destination file, not standard output".into()).into());
    }
    // -n writes the guest's raw bytes; the in-place sink stores them through the target's own format.
    let writer_format = if args.no_create {
        Format::Raw
    } else {
        out_format
    };
    let mut opts = writer_opts(writer_format, &args.options, args.compress)?;
    let mut writer = create_writer(writer_format, &mut opts)?;
    let src = open_source(args, src_path)?;
    // --generalize: the guest is generalised into a temporary overlay (a few MiB) over the untouched source, and
    // the overlay with its backing chain is what gets converted; the folder goes when `_scratch` drops.
    let (src, _scratch) = match &args.generalize {
        None => (src, None),
        Some(spec) => {
            if open_ova(src_path, args.format.as_deref())?.is_some() {
                bail!(
                    "--generalize cannot take a disk inside an OVA: convert the disk out of the OVA first"
                );
            }
            let scratch = tempfile::Builder::new()
                .prefix("imgshift-generalize.")
                .tempdir()
                .context("cannot create a folder for the generalisation overlay")?;
            let dir = scratch.path().to_path_buf();
            crate::interrupt::on_signal(move || {
                let _ = std::fs::remove_dir_all(&dir);
            });
            let g = crate::generalize::prepare(
                src_path,
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
            if let Some(n) = &g.note
                && !quiet
            {
                eprintln!("imgshift: {n}");
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
    let started = std::time::Instant::now();
    let bar = Bar::new("convert", args.progress, quiet);
    let (stats, shown_dst) = if dst_name == "-" {
        // A File on fd 1 avoids Stdout's line buffering (binary data is full of newlines).
        use std::os::fd::AsFd;
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot use standard output")?;
        let out = std::fs::File::from(fd);
        let stats = if stdout_is_fresh_file(&out) {
            // `convert ... - > FILE`: an empty regular file opened without O_APPEND takes positional writes,
            // so zero ranges stay holes as they do in a named output.
            let mut sink = FileSink::new(out, PathBuf::from("standard output"));
            convert(src.as_ref(), writer.as_mut(), &mut sink, &copts, &bar)
        } else {
            let mut sink = StreamSink::new(std::io::BufWriter::with_capacity(1 << 20, out));
            convert(src.as_ref(), writer.as_mut(), &mut sink, &copts, &bar)
        };
        let stats = stats.map_err(|e| {
            if e.is_broken_pipe() {
                // Said once, without the io error in the chain (main ends printing commands quietly on it).
                anyhow!(
                    "cannot convert {} to standard output: the reader went away before the end of the image (broken pipe)",
                    src_path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!(
                    "cannot convert {} to standard output",
                    src_path.display()
                ))
            }
        })?;
        (stats, "standard output".to_string())
    } else if args.no_create {
        let dst = Path::new(dst_name);
        if same_file(src_path, dst) || chain_member(src_path, src.as_ref(), dst).is_some() {
            bail!("{} is also an input of the conversion", dst.display());
        }
        let stats = match out_format {
            Format::Qcow2 => {
                write_into_qcow2(src.as_ref(), writer.as_mut(), dst, args, &copts, &bar)?
            }
            Format::Vpc => {
                write_into_fixed_vhd(src.as_ref(), writer.as_mut(), dst, args, &copts, &bar)?
            }
            _ => write_in_place(src.as_ref(), writer.as_mut(), dst, args, &copts, &bar)?,
        };
        (stats, dst.display().to_string())
    } else {
        let dst = Path::new(dst_name);
        if same_file(src_path, dst) {
            bail!("{} is both the source and the destination", dst.display());
        }
        if let Some(b) = chain_member(src_path, src.as_ref(), dst) {
            bail!(
                "{} is the backing file of {}: the output would overwrite what the conversion reads",
                b.display(),
                src_path.display()
            );
        }
        let (set, mut sink) = crate::interrupt::output_set(dst, args.cache.durability())?;
        let stats =
            convert(src.as_ref(), writer.as_mut(), &mut sink, &copts, &bar).with_context(|| {
                format!("cannot convert {} to {}", src_path.display(), dst.display())
            })?;
        drop(sink);
        set.commit()?;
        (stats, dst.display().to_string())
    };
    bar.finish();
    if !quiet && (args.progress || std::io::stderr().is_terminal()) {
        eprintln!(
            "imgshift: converted {} to {shown_dst} ({}): {} virtual, {} of data, output {} in {:.1} s",
            src_path.display(),
            out_format.name(),
            human_size(stats.virtual_size),
            human_size(stats.bytes_written),
            human_size(stats.output_len),
            started.elapsed().as_secs_f64()
        );
    }
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

/// `convert -n`: the raw data written into the existing `dst` (a file or block device), zeros written over
/// the source's zero ranges unless `--target-is-zero`; `dst` keeps its size.
fn write_in_place(
    src: &dyn DiskSource,
    writer: &mut dyn imgshift_converters::FormatWriter,
    dst: &Path,
    args: &ConvertArgs,
    copts: &ConvertOptions,
    bar: &Bar,
) -> Result<imgshift_converters::ConvertStats> {
    use std::io::Seek as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dst)
        .with_context(|| format!("-n: cannot open {} for writing", dst.display()))?;
    // A block device's size comes from seeking to its end; a file's too.
    let size = file
        .seek(std::io::SeekFrom::End(0))
        .with_context(|| format!("cannot size {}", dst.display()))?;
    if size < src.virtual_size() {
        bail!(
            "-n: {} is {size} bytes, smaller than the source's {} bytes",
            dst.display(),
            src.virtual_size()
        );
    }
    let mut sink = InPlace {
        file,
        path: dst.to_path_buf(),
        pos: 0,
        zero_gaps: !args.target_is_zero,
    };
    let stats = convert(src, writer, &mut sink, copts, bar)
        .with_context(|| format!("cannot convert into {}", dst.display()))?;
    if args.cache == crate::cli::CacheMode::Writeback {
        sink.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", dst.display()))?;
    }
    Ok(stats)
}

/// `convert -n -O qcow2`: the guest data written through the existing qcow2's tables (see
/// [`imgshift_converters::formats::qcow2::Qcow2InPlace`]).
fn write_into_qcow2(
    src: &dyn DiskSource,
    writer: &mut dyn imgshift_converters::FormatWriter,
    dst: &Path,
    args: &ConvertArgs,
    copts: &ConvertOptions,
    bar: &Bar,
) -> Result<imgshift_converters::ConvertStats> {
    use imgshift_converters::formats::qcow2::Qcow2InPlace;
    let mut sink = Qcow2InPlace::open(dst, src.virtual_size(), !args.target_is_zero)
        .with_context(|| format!("cannot convert into {}", dst.display()))?;
    let stats = convert(src, writer, &mut sink, copts, bar)
        .with_context(|| format!("cannot convert into {}", dst.display()))?;
    if args.cache == crate::cli::CacheMode::Writeback {
        sink.sync()?;
    }
    Ok(stats)
}

/// `convert -n -O vpc`: a fixed VHD's data region is the raw disk, so the data is written in place and the
/// footer after it is kept; dynamic and differencing VHDs are refused.
fn write_into_fixed_vhd(
    src: &dyn DiskSource,
    writer: &mut dyn imgshift_converters::FormatWriter,
    dst: &Path,
    args: &ConvertArgs,
    copts: &ConvertOptions,
    bar: &Bar,
) -> Result<imgshift_converters::ConvertStats> {
    use imgshift_converters::formats::vhd::{VhdReader, meta::DiskType};
    let storage = std::sync::Arc::new(
        imgshift_converters::FileStorage::open(dst)
            .with_context(|| format!("-n: cannot open {}", dst.display()))?,
    );
    let vhd = VhdReader::open(storage, &imgshift_converters::OpenGate::deny_all())
        .with_context(|| format!("-n: {} is not a VHD", dst.display()))?;
    if vhd.disk_type() != DiskType::Fixed {
        bail!(
            "-n into a VHD writes fixed disks only; {} is a {} VHD (convert without -n)",
            dst.display(),
            vhd.disk_type().name()
        );
    }
    let size = vhd.virtual_size();
    drop(vhd);
    if size < src.virtual_size() {
        bail!(
            "-n: {} is {size} bytes, smaller than the source's {} bytes",
            dst.display(),
            src.virtual_size()
        );
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dst)
        .with_context(|| format!("-n: cannot open {} for writing", dst.display()))?;
    let mut sink = InPlace {
        file,
        path: dst.to_path_buf(),
        pos: 0,
        zero_gaps: !args.target_is_zero,
    };
    let stats = convert(src, writer, &mut sink, copts, bar)
        .with_context(|| format!("cannot convert into {}", dst.display()))?;
    if args.cache == crate::cli::CacheMode::Writeback {
        sink.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", dst.display()))?;
    }
    Ok(stats)
}

/// The sink of `convert -n`: positional writes into an existing file or device, in increasing order; the gaps
/// between them (zero ranges of the source) are written as zeros unless the target is known to be zero.
/// `finish` never changes the target's size.
struct InPlace {
    file: std::fs::File,
    path: PathBuf,
    pos: u64,
    zero_gaps: bool,
}

impl InPlace {
    fn zeros(&mut self, from: u64, to: u64) -> imgshift_converters::Result<()> {
        use std::os::unix::fs::FileExt as _;
        static ZERO: [u8; 1 << 16] = [0; 1 << 16];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZERO.len() as u64) as usize;
            self.file
                .write_all_at(&ZERO[..n], at)
                .map_err(|e| imgshift_converters::Error::io("cannot write", &self.path, e))?;
            at += n as u64;
        }
        Ok(())
    }
}

impl imgshift_converters::Sink for InPlace {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> imgshift_converters::Result<()> {
        use std::os::unix::fs::FileExt as _;
        if offset < self.pos {
            return Err(imgshift_converters::Error::input(
                "internal error: -n received an out-of-order write",
            ));
        }
        if self.zero_gaps {
            self.zeros(self.pos, offset)?;
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| imgshift_converters::Error::io("cannot write", &self.path, e))?;
        self.pos = offset + data.len() as u64;
        Ok(())
    }
    fn can_seek_back(&self) -> bool {
        false
    }
    fn finish(&mut self, len: u64) -> imgshift_converters::Result<()> {
        if self.zero_gaps && len > self.pos {
            self.zeros(self.pos, len)?;
            self.pos = len;
        }
        Ok(())
    }
}

/// Opens the source: disk `--disk` (default the boot disk) of an OVA, read in place from the archive, or the
/// image itself.
fn open_source(args: &ConvertArgs, src: &Path) -> Result<Box<dyn DiskSource>> {
    match open_ova(src, args.format.as_deref())? {
        Some(pkg) => pkg
            .open_disk(args.disk.unwrap_or(0), &gate(&args.trust)?)
            .map_err(|e| naming(e, src)),
        None => {
            if let Some(n) = args.disk {
                bail!(
                    "--disk {n}: {} is not an OVA (--disk picks a disk of an OVA package)",
                    src.display()
                );
            }
            open_image(src, args.format.as_deref(), &args.trust)
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The backing file of `src` (at any depth) that `dst` names, if any. Backing names are resolved as the open
/// gate resolves them: relative to the folder of the image that names them.
fn chain_member(path: &Path, src: &dyn DiskSource, dst: &Path) -> Option<PathBuf> {
    let mut cur_path = path.to_path_buf();
    let mut cur: &dyn DiskSource = src;
    while let Some(name) = cur.info().backing_filename {
        let dir = cur_path.parent().unwrap_or(Path::new("."));
        let p = dir.join(&name);
        if same_file(&p, dst) {
            return Some(p);
        }
        cur = cur.backing()?;
        cur_path = p;
    }
    None
}

/// True when standard output is an empty regular file opened without O_APPEND at offset 0 (`> FILE`): it can
/// take positional writes and holes.
fn stdout_is_fresh_file(out: &std::fs::File) -> bool {
    use std::io::Seek as _;
    let Ok(meta) = out.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() != 0 {
        return false;
    }
    let mut f = out;
    if f.stream_position().ok() != Some(0) {
        return false;
    }
    // O_APPEND (octal 02000) from the kernel's view of fd 1: positional writes would append.
    let Some(flags) = std::fs::read_to_string("/proc/self/fdinfo/1")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
        })
    else {
        return false;
    };
    flags & 0o2000 == 0
}

/// Reads a numeric field ("rchar:", "VmHWM:") from a /proc file.
fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser as _;

    use crate::cli::{Cli, Command, ConvertArgs};

    fn parse(argv: &[&str]) -> Result<ConvertArgs, clap::Error> {
        let mut a = vec!["imgshift", "convert"];
        a.extend_from_slice(argv);
        match Cli::try_parse_from(a)?.command {
            Command::Convert(c) => Ok(c),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn o_help_needs_no_files() {
        let a = parse(&["-O", "qcow2", "-o", "help"]).unwrap();
        assert!(super::wants_help(&a.options));
        assert!(a.src.is_none());
        assert!(parse(&["-O", "qcow2"]).is_err());
        assert!(super::wants_help(&["cluster_size=1M,?".to_string()]));
        assert!(!super::wants_help(&["cluster_size=1M".to_string()]));
    }

    #[test]
    fn n_and_target_is_zero() {
        let a = parse(&["-n", "--target-is-zero", "-O", "raw", "a", "b"]).unwrap();
        assert!(a.no_create && a.target_is_zero);
        let a = parse(&["-n", "a", "b"]).unwrap();
        assert!(a.no_create && !a.target_is_zero);
        // qemu-img: --target-is-zero requires -n.
        assert!(parse(&["--target-is-zero", "a", "b"]).is_err());
    }

    #[test]
    fn unknown_output_format_is_a_usage_error() {
        let e = super::output_format("qcow3").unwrap_err();
        assert!(e.downcast_ref::<crate::UsageError>().is_some());
        assert!(super::output_format("ova").is_err());
        assert_eq!(
            super::output_format("vhd").unwrap(),
            imgshift_converters::Format::Vpc
        );
    }
}
