//! `imgshift map`: the allocation map, with the layer providing each range (like qemu-img map).

use std::path::Path;

use anyhow::{Context, Result};
use imgshift_converters::{DiskSource, ExtentKind};
use serde_json::json;

use super::open_image;
use crate::cli::{OutputFormat, TrustArgs};

/// One row of the map.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
}

/// Runs `map`.
pub fn run(
    image: &Path,
    format: Option<&str>,
    output: OutputFormat,
    trust: &TrustArgs,
) -> Result<u8> {
    let src = open_image(image, format, trust)?;
    let mut entries = Vec::new();
    walk(src.as_ref(), 0, src.virtual_size(), 0, &mut entries)
        .with_context(|| format!("cannot map {}", image.display()))?;
    match output {
        OutputFormat::Json => {
            let rows: Vec<_> = entries
                .iter()
                .map(|e| {
                    json!({"start": e.start, "length": e.length, "depth": e.depth,
                           "present": e.present, "zero": e.zero, "data": e.data})
                })
                .collect();
            // qemu-img prints one object per line inside the array.
            println!("[");
            for (i, r) in rows.iter().enumerate() {
                let comma = if i + 1 < rows.len() { "," } else { "" };
                println!("{r}{comma}");
            }
            println!("]");
        }
        OutputFormat::Human => {
            println!("{:<20}{:<20}{:<8}Contents", "Offset", "Length", "Depth");
            for e in entries.iter().filter(|e| e.present) {
                let what = if e.data { "data" } else { "zero" };
                println!("{:<#20x}{:<#20x}{:<8}{what}", e.start, e.length, e.depth);
            }
        }
    }
    Ok(0)
}

fn push(entries: &mut Vec<Entry>, e: Entry) {
    if let Some(last) = entries.last_mut()
        && last.start + last.length == e.start
        && (last.depth, last.present, last.zero, last.data) == (e.depth, e.present, e.zero, e.data)
    {
        last.length += e.length;
        return;
    }
    entries.push(e);
}

fn walk(
    src: &dyn DiskSource,
    offset: u64,
    len: u64,
    depth: u32,
    out: &mut Vec<Entry>,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    for e in &src.extents(offset, len)? {
        match e.kind {
            ExtentKind::Data => push(
                out,
                Entry {
                    start: e.start,
                    length: e.len,
                    depth,
                    present: true,
                    zero: false,
                    data: true,
                },
            ),
            ExtentKind::Zero => push(
                out,
                Entry {
                    start: e.start,
                    length: e.len,
                    depth,
                    present: true,
                    zero: true,
                    data: false,
                },
            ),
            ExtentKind::Unallocated => match src.backing() {
                Some(b) if e.start < b.virtual_size() => {
                    let inside = e.end().min(b.virtual_size());
                    walk(b, e.start, inside - e.start, depth + 1, out)?;
                    if e.end() > inside {
                        push(
                            out,
                            Entry {
                                start: inside,
                                length: e.end() - inside,
                                depth: depth + 1,
                                present: false,
                                zero: true,
                                data: false,
                            },
                        );
                    }
                }
                _ => push(
                    out,
                    Entry {
                        start: e.start,
                        length: e.len,
                        depth: depth + u32::from(src.backing().is_some()),
                        present: false,
                        zero: true,
                        data: false,
                    },
                ),
            },
        }
    }
    Ok(())
}
