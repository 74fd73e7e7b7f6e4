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
    /// Stored compressed (no byte-for-byte host offset).
    compressed: bool,
    /// Offset of the first byte in the file of the layer at `depth` (qemu-img map's `offset`), when known.
    offset: Option<u64>,
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
    let entries = with_host_offsets(src.as_ref(), entries)
        .with_context(|| format!("cannot map {}", image.display()))?;
    match output {
        OutputFormat::Json => {
            let rows: Vec<_> = entries
                .iter()
                .map(|e| {
                    let mut r = json!({"start": e.start, "length": e.length, "depth": e.depth,
                           "present": e.present, "zero": e.zero, "data": e.data,
                           "compressed": e.compressed});
                    if let Some(o) = e.offset {
                        r["offset"] = o.into();
                    }
                    r
                })
                .collect();
            // qemu-img prints one object per line inside the array.
            outln!("[");
            for (i, r) in rows.iter().enumerate() {
                let comma = if i + 1 < rows.len() { "," } else { "" };
                outln!("{r}{comma}");
            }
            outln!("]");
        }
        OutputFormat::Human => {
            outln!("{:<20}{:<20}{:<8}Contents", "Offset", "Length", "Depth");
            for e in entries.iter().filter(|e| e.present) {
                let what = if e.data { "data" } else { "zero" };
                outln!("{:<#20x}{:<#20x}{:<8}{what}", e.start, e.length, e.depth);
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
                    compressed: false,
                    offset: None,
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
                    compressed: false,
                    offset: None,
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
                                compressed: false,
                                offset: None,
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
                        compressed: false,
                        offset: None,
                    },
                ),
            },
        }
    }
    Ok(())
}

/// The layer at `depth` of `src`'s backing chain.
fn layer(src: &dyn DiskSource, depth: u32) -> Option<&dyn DiskSource> {
    let mut cur = src;
    for _ in 0..depth {
        cur = cur.backing()?;
    }
    Some(cur)
}

/// Splits each present entry where its layer stores it, adding the host `offset` (and `compressed`) as
/// qemu-img map does. Layers whose format does not report host offsets keep their entries as they are.
fn with_host_offsets(src: &dyn DiskSource, entries: Vec<Entry>) -> Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let l = layer(src, e.depth);
        let hosts = match l {
            Some(l) if e.present => l.host_extents(e.start, e.length)?,
            _ => None,
        };
        // A range a format layer maps into its file is data to that layer even where the file has a hole (qemu-img
        // map: `"zero": true, "data": true` on a flat VMDK or fixed VHD); a raw layer's status is the file's own.
        let mapped_is_data = l.is_some_and(|l| l.format() != imgshift_converters::Format::Raw);
        let Some(hosts) = hosts else {
            out.push(e);
            continue;
        };
        let end = e.start + e.length;
        let mut at = e.start;
        for h in hosts {
            let (s, t) = (h.guest.max(at), h.guest.saturating_add(h.len).min(end));
            if t <= s {
                continue;
            }
            if s > at {
                out.push(Entry {
                    start: at,
                    length: s - at,
                    ..e.clone()
                });
            }
            out.push(Entry {
                start: s,
                length: t - s,
                compressed: h.host.is_none(),
                offset: h.host.map(|o| o.saturating_add(s - h.guest)),
                data: e.data || (mapped_is_data && h.host.is_some()),
                ..e.clone()
            });
            at = t;
        }
        if at < end {
            out.push(Entry {
                start: at,
                length: end - at,
                ..e
            });
        }
    }
    Ok(out)
}
