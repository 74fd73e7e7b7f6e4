//! `imgshift info`: format, sizes, backing file and allocation, as qemu-img info prints them.

use std::path::Path;

use anyhow::{Context, Result};
use imgshift_converters::{DiskSource, ExtentKind, resolved_extents};
use serde_json::{Map, Value, json};

use super::{gate, human_size, naming, open_image, open_ova};
use crate::cli::{OutputFormat, TrustArgs};

/// Runs `info`.
pub fn run(
    image: &Path,
    format: Option<&str>,
    backing_chain: bool,
    output: OutputFormat,
    trust: &TrustArgs,
) -> Result<u8> {
    if backing_chain && open_ova(image, format)?.is_none() {
        let src = open_image(image, format, trust)?;
        let chain = describe_chain(image, src.as_ref())?;
        match output {
            OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&Value::Array(chain))?),
            OutputFormat::Human => {
                for (i, v) in chain.iter().enumerate() {
                    if i > 0 {
                        outln!("");
                    }
                    print_human(v)?;
                }
            }
        }
        return Ok(0);
    }
    let v = match open_ova(image, format)? {
        // An OVA: the boot disk's fields, plus every disk the descriptor lists.
        Some(pkg) => {
            let src = pkg
                .open_boot_disk(&gate(trust)?)
                .map_err(|e| naming(e, image))?;
            let mut v = describe(image, src.as_ref())?;
            v["disks"] = pkg
                .disks()
                .iter()
                .map(|d| {
                    json!({
                        "index": d.index,
                        "id": d.id,
                        "file": d.file_name,
                        "capacity": d.capacity,
                        "format": d.format.map(|f| f.name()),
                        "member-size": d.size,
                    })
                })
                .collect();
            v
        }
        None => {
            let src = match open_image(image, format, trust) {
                Ok(s) => s,
                Err(e) => {
                    // A corrupt image's header can still be shown, as qemu-img info does; the error (exit 1)
                    // follows on standard error.
                    if let Some(v) = header_only(image, format, &e) {
                        match output {
                            OutputFormat::Json => {
                                outln!("{}", serde_json::to_string_pretty(&v)?)
                            }
                            OutputFormat::Human => print_human(&v)?,
                        }
                    }
                    return Err(e);
                }
            };
            describe(image, src.as_ref())?
        }
    };
    match output {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Human => print_human(&v)?,
    }
    Ok(0)
}

/// What the header of a qcow2 image says when the reader refused the image's tables (a `Corrupt` error):
/// virtual size, cluster size, backing file. `None` for any other error or format.
fn header_only(image: &Path, format: Option<&str>, e: &anyhow::Error) -> Option<Value> {
    use imgshift_converters::{ErrorKind, FileStorage, Format};
    let corrupt = e.chain().any(|c| {
        c.downcast_ref::<imgshift_converters::Error>()
            .is_some_and(|le| le.kind() == ErrorKind::Corrupt)
    });
    if !corrupt {
        return None;
    }
    let storage = FileStorage::open(image).ok()?;
    let fmt = match format {
        Some(f) => Format::from_name(f).ok()?,
        None => imgshift_converters::formats::probe::probe(&storage).ok()?,
    };
    if fmt != Format::Qcow2 {
        return None;
    }
    let h = imgshift_converters::formats::qcow2::read_header_fields(&storage).ok()?;
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(h.size));
    m.insert("filename".into(), json!(image.display().to_string()));
    m.insert("format".into(), json!("qcow2"));
    if let Ok(meta) = std::fs::metadata(image) {
        use std::os::unix::fs::MetadataExt;
        m.insert("actual-size".into(), json!(meta.blocks() * 512));
    }
    m.insert("cluster-size".into(), json!(h.cluster_size()));
    m.insert("dirty-flag".into(), json!(h.dirty()));
    if let Some(b) = &h.backing_file {
        m.insert("backing-filename".into(), json!(b));
    }
    if let Some(b) = &h.backing_format {
        m.insert("backing-filename-format".into(), json!(b));
    }
    m.insert("corrupt".into(), json!(true));
    Some(Value::Object(m))
}

/// One object per layer of the backing chain, the image first (qemu-img info --backing-chain). A backing
/// file's path is its name joined to the folder of the image naming it, as the open gate resolved it.
fn describe_chain(image: &Path, src: &dyn DiskSource) -> Result<Vec<Value>> {
    let mut out = vec![describe(image, src)?];
    let mut path = image.to_path_buf();
    let mut cur = src;
    while let (Some(name), Some(b)) = (cur.info().backing_filename, cur.backing()) {
        path = path.parent().unwrap_or(Path::new(".")).join(name);
        out.push(describe(&path, b)?);
        cur = b;
    }
    Ok(out)
}

/// The JSON object `info --output json` prints (qemu-img's field names plus allocation counts).
pub fn describe(image: &Path, src: &dyn DiskSource) -> Result<Value> {
    let info = src.info();
    let size = src.virtual_size();
    let top = src
        .extents(0, size)
        .with_context(|| format!("cannot map {}", image.display()))?;
    let resolved = resolved_extents(src, 0, size)
        .with_context(|| format!("cannot map {}", image.display()))?;
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(size));
    m.insert("filename".into(), json!(image.display().to_string()));
    m.insert("format".into(), json!(src.format().name()));
    if let Ok(meta) = std::fs::metadata(image) {
        use std::os::unix::fs::MetadataExt;
        m.insert("actual-size".into(), json!(meta.blocks() * 512));
    }
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    if let Some(b) = &info.backing_filename {
        m.insert("backing-filename".into(), json!(b));
    }
    if let Some(b) = &info.backing_format {
        m.insert("backing-filename-format".into(), json!(b));
    }
    if let Some(fs) = &info.format_specific {
        m.insert(
            "format-specific".into(),
            json!({"type": src.format().name(), "data": fs}),
        );
    }
    m.insert("allocated-bytes".into(), json!(top.bytes(ExtentKind::Data)));
    m.insert("data-bytes".into(), json!(resolved.bytes(ExtentKind::Data)));
    Ok(Value::Object(m))
}

fn print_human(v: &Value) -> Result<()> {
    let get = |k: &str| v.get(k);
    if let Some(f) = get("filename").and_then(Value::as_str) {
        outln!("image: {f}");
    }
    if let Some(f) = get("format").and_then(Value::as_str) {
        outln!("file format: {f}");
    }
    if let Some(s) = get("virtual-size").and_then(Value::as_u64) {
        outln!("virtual size: {} ({s} bytes)", human_size(s));
    }
    if let Some(s) = get("actual-size").and_then(Value::as_u64) {
        outln!("disk size: {}", human_size(s));
    }
    if let Some(c) = get("cluster-size").and_then(Value::as_u64) {
        outln!("cluster_size: {c}");
    }
    if let Some(b) = get("backing-filename").and_then(Value::as_str) {
        outln!("backing file: {b}");
    }
    if let Some(b) = get("backing-filename-format").and_then(Value::as_str) {
        outln!("backing file format: {b}");
    }
    if get("corrupt").and_then(Value::as_bool) == Some(true) {
        outln!("corrupt: yes (header only; `imgshift check` lists the problems)");
    }
    if get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        outln!("dirty flag: yes");
    }
    if let Some(Value::Object(data)) = get("format-specific").and_then(|f| f.get("data")) {
        outln!("Format specific information:");
        for (k, val) in data {
            print_specific(k, val, 1)?;
        }
    }
    if let Some(a) = get("allocated-bytes").and_then(Value::as_u64) {
        outln!("allocated in this image: {} ({a} bytes)", human_size(a));
    }
    if let Some(d) = get("data-bytes").and_then(Value::as_u64) {
        outln!("data (with backing chain): {} ({d} bytes)", human_size(d));
    }
    if let Some(Value::Array(disks)) = get("disks") {
        outln!("OVA disks (0 is the boot disk; convert --disk N picks one):");
        for d in disks {
            let cap = d["capacity"].as_u64().unwrap_or(0);
            outln!(
                "    {}: id {}, file {}, capacity {} ({cap} bytes), format {}",
                d["index"],
                d["id"].as_str().unwrap_or("?"),
                d["file"].as_str().unwrap_or("?"),
                human_size(cap),
                d["format"].as_str().unwrap_or("probed"),
            );
        }
    }
    Ok(())
}

/// One format-specific field, nested as qemu-img info prints lists and objects (`bitmaps:` / `[0]:` / `name: b0`).
fn print_specific(key: &str, val: &Value, depth: usize) -> Result<()> {
    let pad = "    ".repeat(depth);
    match val {
        Value::Array(items) => {
            outln!("{pad}{key}:");
            for (i, v) in items.iter().enumerate() {
                print_specific(&format!("[{i}]"), v, depth + 1)?;
            }
        }
        Value::Object(fields) => {
            outln!("{pad}{key}:");
            for (k, v) in fields {
                print_specific(k, v, depth + 1)?;
            }
        }
        Value::String(s) => outln!("{pad}{key}: {s}"),
        other => outln!("{pad}{key}: {other}"),
    }
    Ok(())
}
