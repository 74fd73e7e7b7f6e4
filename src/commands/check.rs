//! `imgshift check`: structural check with qemu-img's exit codes.

use std::path::Path;

use anyhow::Result;
use imgshift_converters::{CheckReport, ErrorKind};
use serde_json::json;

use super::open_image;
use crate::cli::{OutputFormat, TrustArgs};

/// Runs `check`: 0 clean, 2 corruptions, 3 leaks only, 63 format has no checks; errors exit 1.
pub fn run(
    image: &Path,
    format: Option<&str>,
    output: OutputFormat,
    trust: &TrustArgs,
) -> Result<u8> {
    // A structurally corrupt image (tables pointing past the end of the file, misaligned entries) is a check
    // result, as in qemu-img check: its problems are listed and the exit code is 2. Only an image that cannot be
    // recognised or opened at all (bad magic, unsupported feature, I/O error) is an error (exit 1).
    let (report, fmt_name) = match open_image(image, format, trust) {
        Ok(src) => match src.check() {
            Ok(r) => (r, src.format().name().to_string()),
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                (corrupt_report(&e), src.format().name().to_string())
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot check {}", image.display()))
                );
            }
        },
        Err(e) => match corrupt_kind(&e) {
            Some(msg) => (corrupt_report_msg(msg), probed_name(image, format)),
            None => return Err(e),
        },
    };
    let src_format = fmt_name;
    if !report.supported {
        eprintln!("imgshift: {src_format} images have no structural checks");
        return Ok(63);
    }
    match output {
        OutputFormat::Json => {
            let v = json!({
                "filename": image.display().to_string(),
                "format": src_format,
                "check-errors": 0,
                "corruptions": report.corruptions,
                "leaks": report.leaks,
                "allocated-clusters": report.allocated_clusters,
                "total-clusters": report.total_clusters,
                "messages": report.messages,
            });
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            for m in &report.messages {
                outln!("{m}");
            }
            if report.corruptions == 0 && report.leaks == 0 {
                outln!("No errors were found on the image.");
            }
            if report.corruptions > 0 {
                outln!("\n{} errors were found on the image.", report.corruptions);
                outln!("Data may be corrupted, or further writes to the image may corrupt it.");
            }
            if report.leaks > 0 {
                outln!(
                    "\n{} leaked clusters were found on the image.",
                    report.leaks
                );
                outln!("This means waste of disk space, but no harm to data.");
            }
            if report.total_clusters > 0 {
                let pct = report.allocated_clusters as f64 * 100.0 / report.total_clusters as f64;
                outln!(
                    "{}/{} = {pct:.2}% allocated",
                    report.allocated_clusters,
                    report.total_clusters
                );
            }
        }
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// The message of a library `Corrupt` error anywhere in the chain (the opener refused the image's tables).
fn corrupt_kind(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|c| {
        c.downcast_ref::<imgshift_converters::Error>()
            .filter(|le| le.kind() == ErrorKind::Corrupt)
            .map(|le| le.to_string())
    })
}

/// A check report holding one corruption: the one that stopped the reader.
fn corrupt_report_msg(msg: String) -> CheckReport {
    let mut r = CheckReport {
        supported: true,
        ..CheckReport::default()
    };
    r.corruption(msg);
    r
}

fn corrupt_report(e: &imgshift_converters::Error) -> CheckReport {
    corrupt_report_msg(e.to_string())
}

/// The format name of an image the reader refused: the user's `-f`, else what its magic says.
fn probed_name(image: &Path, format: Option<&str>) -> String {
    if let Some(f) = format {
        return f.to_string();
    }
    imgshift_converters::FileStorage::open(image)
        .and_then(|s| imgshift_converters::formats::probe::probe(&s))
        .map_or_else(|_| "image".to_string(), |f| f.name().to_string())
}

/// `check -r leaks`: repairs the leaked clusters of a qcow2 image, in a copy (`--into`, default
/// `NAME.repaired.EXT` beside the image) unless `--in-place`, then checks the result. Exit 0 when the repaired
/// image is clean, else as `check`.
pub fn repair(
    image: &Path,
    format: Option<&str>,
    in_place: bool,
    into: Option<&Path>,
    output: OutputFormat,
) -> Result<u8> {
    use imgshift_converters::Format;
    let fmt = match format {
        Some(f) => Format::from_name(f)?,
        None => {
            let s = imgshift_converters::FileStorage::open(image)
                .map_err(|e| super::naming(e, image))?;
            imgshift_converters::formats::probe::probe(&s).map_err(|e| super::naming(e, image))?
        }
    };
    if fmt != Format::Qcow2 {
        return Err(crate::UsageError(format!(
            "--repair: only qcow2 images are repaired ({} is {})",
            image.display(),
            fmt.name()
        ))
        .into());
    }
    let target = if in_place {
        image.to_path_buf()
    } else {
        let dst = match into {
            Some(p) => p.to_path_buf(),
            None => default_copy(image),
        };
        if dst.exists() {
            anyhow::bail!(
                "{} already exists: remove it, or choose the copy with --into",
                dst.display()
            );
        }
        copy_sparse(image, &dst)?;
        dst
    };
    let outcome = imgshift_converters::formats::qcow2::repair_leaks(&target)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot repair {}", target.display())));
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            if !in_place {
                // The copy is useless; the original was never touched.
                let _ = std::fs::remove_file(&target);
            }
            return Err(e);
        }
    };
    let r = &outcome.after;
    match output {
        OutputFormat::Json => {
            let v = json!({
                "filename": target.display().to_string(),
                "source": image.display().to_string(),
                "format": "qcow2",
                "leaks-fixed": outcome.repaired,
                "leaks": r.leaks,
                "corruptions": r.corruptions,
                "check-errors": 0,
            });
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            if outcome.repaired > 0 {
                outln!("Leaked clusters were repaired in {}.", target.display());
                outln!("The following inconsistencies were found and repaired:\n");
                outln!("    {} leaked clusters", outcome.repaired);
                outln!("    0 corruptions\n");
                outln!("Double checking the fixed image now...");
            } else {
                outln!("No leaked clusters to repair in {}.", target.display());
            }
            for m in &r.messages {
                outln!("{m}");
            }
            if r.corruptions == 0 && r.leaks == 0 {
                outln!("No errors were found on the image.");
            } else if r.leaks > 0 {
                outln!(
                    "\n{} leaked clusters remain (refcount blocks past the end of the file are not rewritten).",
                    r.leaks
                );
            }
        }
    }
    Ok(if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

/// `disk.qcow2` → `disk.repaired.qcow2` in the same folder.
fn default_copy(image: &Path) -> std::path::PathBuf {
    let stem = image
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let name = match image.extension() {
        Some(e) => format!("{stem}.repaired.{}", e.to_string_lossy()),
        None => format!("{stem}.repaired"),
    };
    image.with_file_name(name)
}

/// Copies `src` to `dst` keeping holes (only the ranges SEEK_DATA reports are copied), through a temporary
/// file renamed into place; removed on Ctrl-C.
fn copy_sparse(src: &Path, dst: &Path) -> Result<()> {
    use imgshift_converters::{Sink as _, Storage as _};
    let storage = imgshift_converters::FileStorage::open(src).map_err(|e| super::naming(e, src))?;
    let len = storage.len();
    let (set, mut sink) =
        crate::interrupt::output_set(dst, imgshift_converters::Durability::Writeback)?;
    let ranges = storage
        .data_ranges(0, len)?
        .unwrap_or_else(|| vec![(0, len)]);
    let mut buf = vec![0u8; 1 << 20];
    for (start, n) in ranges {
        let mut at = start;
        let end = start.saturating_add(n).min(len);
        while at < end {
            let k = (end - at).min(buf.len() as u64) as usize;
            let piece = &mut buf[..k];
            storage.read_exact_at(piece, at)?;
            sink.write_at(at, piece)?;
            at += k as u64;
        }
    }
    sink.finish(len)?;
    drop(sink);
    set.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    /// (repair, in_place, into) as parsed.
    fn parse(
        argv: &[&str],
    ) -> Result<(Option<String>, bool, Option<std::path::PathBuf>), clap::Error> {
        let mut a = vec!["imgshift", "check"];
        a.extend_from_slice(argv);
        match Cli::try_parse_from(a)?.command {
            Command::Check {
                repair,
                in_place,
                into,
                ..
            } => Ok((repair, in_place, into)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn repair_flags() {
        assert_eq!(parse(&["i"]).unwrap(), (None, false, None));
        assert_eq!(
            parse(&["-r", "leaks", "i"]).unwrap(),
            (Some("leaks".into()), false, None)
        );
        assert_eq!(
            parse(&["--repair", "leaks", "--in-place", "i"]).unwrap(),
            (Some("leaks".into()), true, None)
        );
        assert_eq!(
            parse(&["-r", "leaks", "--into", "c", "i"]).unwrap().2,
            Some("c".into())
        );
        // Only leaks are repaired; --in-place and --into need --repair and exclude each other.
        assert!(parse(&["-r", "all", "i"]).is_err());
        assert!(parse(&["--in-place", "i"]).is_err());
        assert!(parse(&["--into", "c", "i"]).is_err());
        assert!(parse(&["-r", "leaks", "--in-place", "--into", "c", "i"]).is_err());
    }

    #[test]
    fn default_copy_name() {
        assert_eq!(
            super::default_copy(std::path::Path::new("/d/disk.qcow2")),
            std::path::PathBuf::from("/d/disk.repaired.qcow2")
        );
        assert_eq!(
            super::default_copy(std::path::Path::new("disk")),
            std::path::PathBuf::from("disk.repaired")
        );
    }
}
