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
