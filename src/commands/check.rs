//! `imgshift check`: structural check with qemu-img's exit codes.

use std::path::Path;

use anyhow::{Context, Result};
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
    let src = open_image(image, format, trust)?;
    let report = src
        .check()
        .with_context(|| format!("cannot check {}", image.display()))?;
    if !report.supported {
        eprintln!(
            "imgshift: {} images have no structural checks",
            src.format().name()
        );
        return Ok(63);
    }
    match output {
        OutputFormat::Json => {
            let v = json!({
                "filename": image.display().to_string(),
                "format": src.format().name(),
                "check-errors": 0,
                "corruptions": report.corruptions,
                "leaks": report.leaks,
                "allocated-clusters": report.allocated_clusters,
                "total-clusters": report.total_clusters,
                "messages": report.messages,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            for m in &report.messages {
                println!("{m}");
            }
            if report.corruptions == 0 && report.leaks == 0 {
                println!("No errors were found on the image.");
            }
            if report.corruptions > 0 {
                println!("\n{} errors were found on the image.", report.corruptions);
                println!("Data may be corrupted, or further writes to the image may corrupt it.");
            }
            if report.leaks > 0 {
                println!(
                    "\n{} leaked clusters were found on the image.",
                    report.leaks
                );
                println!("This means waste of disk space, but no harm to data.");
            }
            if report.total_clusters > 0 {
                let pct = report.allocated_clusters as f64 * 100.0 / report.total_clusters as f64;
                println!(
                    "{}/{} = {pct:.2}% allocated",
                    report.allocated_clusters, report.total_clusters
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
