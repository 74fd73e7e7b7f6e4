//! `FormatWriter`: an output format as a planner. The engine tells it up front which ranges may hold data
//! (`Plan`), then hands it the data in guest order as `Run`s; the writer lays the file out and emits it
//! through a `Sink`.
//!
//! Two layouts come from the same code. When the sink can seek back (a local file), a writer allocates lazily
//! as data arrives, skips chunks that turned out to be zero, and writes its tables last. When it cannot (stdout,
//! an upload), the writer computes its tables from the plan, emits them first, and treats every planned chunk
//! as allocated: a planned chunk that turns out to be zero is simply not written, and the sink fills the gap.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sink::Sink;

/// The allocation the engine will feed a writer.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// Size of the virtual disk being written.
    pub virtual_size: u64,
    /// Granularity-aligned `(start, end)` ranges that may hold data, sorted and disjoint. Everything else is
    /// zero and will never be passed to `write_run`.
    pub runs: &'a [(u64, u64)],
}

impl Plan<'_> {
    /// Total bytes in the planned runs.
    pub fn data_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1 - r.0).sum()
    }
}

/// A piece of guest data, handed over in increasing guest-offset order.
#[derive(Debug, Clone, Copy)]
pub enum Run<'a> {
    /// `len` bytes that are all zero (inside a planned range).
    Zero(u64),
    /// Bytes to store; a whole number of granules, except at the end of the disk.
    Data(&'a [u8]),
    /// One granule, compressed by the writer's own `ChunkCompressor`; `len` is its uncompressed length.
    Compressed {
        /// The compressed bytes.
        data: &'a [u8],
        /// Uncompressed length.
        len: u64,
    },
}

impl Run<'_> {
    /// Guest bytes the run covers.
    pub fn guest_len(&self) -> u64 {
        match self {
            Run::Zero(n) => *n,
            Run::Data(d) => d.len() as u64,
            Run::Compressed { len, .. } => *len,
        }
    }
}

/// Compresses one granule on an engine worker thread.
pub trait ChunkCompressor: Send + Sync {
    /// Returns the compressed bytes, or `None` when storing the chunk uncompressed is better.
    fn compress(&self, chunk: &[u8]) -> Result<Option<Vec<u8>>>;
}

/// An output format.
pub trait FormatWriter: Send {
    /// The unit (bytes, a power of two) in which the writer allocates or compresses; the engine aligns data
    /// runs to it.
    fn granularity(&self) -> u64;

    /// The step (a power of two, at most the granularity) at which the engine detects zeros inside planned
    /// runs; `Run::Zero`/`Run::Data` pieces then start and end on multiples of it. The default, the granularity
    /// capped at 1 MiB, suits writers that take whole granules; writers that leave holes inside an allocated
    /// block (VHD, VHDX, VDI) ask for 4 KiB, qemu-img's default `-S`.
    fn zero_granule(&self) -> u64 {
        self.granularity().min(1 << 20)
    }

    /// The compressor the engine should run on worker threads, when output is compressed.
    fn compressor(&self) -> Option<Arc<dyn ChunkCompressor>> {
        None
    }

    /// Size of the virtual disk the output will have for a source of `source_size` bytes (formats with
    /// geometry rules may round up; never down).
    fn output_virtual_size(&self, source_size: u64) -> Result<u64> {
        Ok(source_size)
    }

    /// Called once before any data.
    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> Result<()>;

    /// Called for consecutive pieces of the planned runs, in increasing `offset` order.
    fn write_run(&mut self, sink: &mut dyn Sink, offset: u64, run: Run<'_>) -> Result<()>;

    /// Writes the remaining metadata and ends the file; returns the output's length in bytes.
    fn finish(&mut self, sink: &mut dyn Sink) -> Result<u64>;
}

/// The kind of value an `-o` option takes, named as qemu-img's `-o help` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKind {
    /// Free text or one of a set of words.
    Str,
    /// `on` or `off`.
    Bool,
    /// A byte count with an optional binary suffix (`64k`, `2M`).
    Size,
    /// A plain number.
    Num,
}

impl OptionKind {
    /// qemu-img's spelling (`<str>`, `<bool (on/off)>`, `<size>`, `<num>`).
    pub fn name(self) -> &'static str {
        match self {
            OptionKind::Str => "str",
            OptionKind::Bool => "bool (on/off)",
            OptionKind::Size => "size",
            OptionKind::Num => "num",
        }
    }
}

/// One `-o` option a writer takes: the facts `-o help` prints. Each writer module lists its own.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    /// The key, as qemu-img spells it.
    pub name: &'static str,
    /// The kind of value.
    pub kind: OptionKind,
    /// The value used when the option is absent.
    pub default: &'static str,
    /// What the option does (one line).
    pub help: &'static str,
}

/// `-o key=value,...` options, as qemu-img spells them. Each writer takes the keys it knows; any key left
/// over is an error naming it.
#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    values: BTreeMap<String, String>,
}

impl WriterOptions {
    /// Parses `a=b,c=d` (qemu-img's `-o` syntax; `,,` escapes a comma in a value). May be called repeatedly.
    pub fn parse_into(&mut self, text: &str) -> Result<()> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|s| !s.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.to_string()),
                // qemu-img accepts a bare flag name as "on"
                None => (item.trim().to_string(), "on".to_string()),
            };
            self.values.insert(k, v);
        }
        Ok(())
    }

    /// The value given for `key`, without taking it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The keys given, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Sets a key (the CLI maps `-c` and `-B` onto options).
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.values.insert(key.to_string(), value.into());
    }

    /// Takes a string option.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes a boolean option (`on|off|true|false|yes|no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(Some(true)),
                "off" | "false" | "no" | "0" => Ok(Some(false)),
                _ => Err(Error::input(format!(
                    "option {key}: expected on or off, got '{v}'"
                ))),
            },
        }
    }

    /// Takes a size option (`65536`, `64k`, `2M`, `1G`; binary units as qemu-img).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(v) => parse_size(&v)
                .map(Some)
                .map_err(|e| e.context(format!("option {key}"))),
        }
    }

    /// Fails when options remain that no one took.
    pub fn finish(&self, format: &str) -> Result<()> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::input(format!(
                "invalid option '{k}' for format {format}"
            ))),
        }
    }
}

/// Parses a size with an optional binary suffix (k, M, G, T, P, E; `b` for bytes).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(Error::input(format!("invalid size '{text}'"))),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| Error::input(format!("invalid size '{text}'")))?;
    n.checked_mul(mult)
        .ok_or_else(|| Error::input(format!("size '{text}' is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let mut o = WriterOptions::default();
        o.parse_into("cluster_size=2M,compression_type=zstd,lazy_refcounts")
            .unwrap();
        assert_eq!(o.take_size("cluster_size").unwrap(), Some(2 << 20));
        assert_eq!(o.take("compression_type").as_deref(), Some("zstd"));
        assert_eq!(o.take_bool("lazy_refcounts").unwrap(), Some(true));
        o.finish("qcow2").unwrap();
        o.set("bogus", "1");
        assert!(o.finish("qcow2").unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("99999999999E").is_err());
        assert!(parse_size("x").is_err());
    }
}
