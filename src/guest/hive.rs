//! A read-only Windows registry hive (regf) reader: keys, subkeys and values, nothing else (no transaction
//! logs, no deleted cells, no writes).
//!
//! Why in-house: the hive crates evaluated do not fit: `nt-hive` (by the author of the `ntfs` crate) is
//! GPL-2.0-or-later, which the project's MIT OR Apache-2.0 binary cannot take without changing its licence;
//! `notatin` (Apache-2.0) is a forensic tool with open-ended (`>=`) requirements on crossterm, blake3, regex and
//! nom; `frnsc-hive` needs the forensic-rs framework. The subset read here is small and documented
//! (libyal's "Windows NT Registry File (REGF) format specification", the layout `hivex` reads).
//!
//! Layout: a 4096-byte base block ("regf", root cell offset at 0x24, hive bins size at 0x28), then hive bins
//! ("hbin") holding cells. A cell starts with an i32 size (negative when allocated); offsets are relative to the
//! first hive bin. Keys are "nk" cells, their subkey lists "lf"/"lh"/"li" or an index root "ri" of such lists,
//! values "vk" cells listed by an array of offsets; data of at most 4 bytes is held in the vk cell itself.
//!
//! Hostile hives: every offset and length is checked against the data, every cell visited costs from a budget
//! ([`MAX_CELLS`]) so a lookup ends in bounded time, lists are capped ([`MAX_LIST`]) and "ri" lists are one
//! level deep, as Windows writes them. The caller caps the file size ([`MAX_HIVE`]).

use std::cell::Cell;

/// Largest hive file read (bytes). Windows' own SOFTWARE hives stay well below this.
pub const MAX_HIVE: u64 = 256 << 20;
/// Cells one hive lets its lookups visit in all.
pub const MAX_CELLS: u64 = 2_000_000;
/// Most entries read from one subkey list or value list.
pub const MAX_LIST: usize = 65_536;
/// Largest value data read (bytes): the strings and numbers imgshift looks at are far smaller; bigger data is
/// held in "db" big-data cells, which this reader does not follow.
pub const MAX_VALUE: usize = 16_344;

const BASE: usize = 4096;

/// Why a hive could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HiveError {
    /// Not a regf hive.
    #[error("not a registry hive (no regf signature)")]
    NotAHive,
    /// A cell offset or length leaves the hive.
    #[error("cell at offset {0:#x} lies outside the hive")]
    OutOfRange(u32),
    /// A cell does not hold what its referrer says.
    #[error("cell at offset {0:#x} is not a {1} cell")]
    BadCell(u32, &'static str),
    /// The cell budget ran out.
    #[error("the hive needs more than {MAX_CELLS} cells for the lookups asked: refused as hostile")]
    Budget,
}

/// A hive held in memory.
pub struct Hive {
    data: Vec<u8>,
    root: u32,
    budget: Cell<u64>,
}

/// A key of a hive.
#[derive(Clone, Copy)]
pub struct Key<'h> {
    hive: &'h Hive,
    /// Cell offset of the "nk" record.
    at: u32,
}

/// A value's data and registry type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// REG_SZ = 1, REG_EXPAND_SZ = 2, REG_BINARY = 3, REG_DWORD = 4, REG_MULTI_SZ = 7, REG_QWORD = 11.
    pub kind: u32,
    /// Raw data.
    pub data: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    super::le_u16(b, at)
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    super::le_u32(b, at)
}

impl Hive {
    /// Takes the bytes of a hive file (at most [`MAX_HIVE`]; the caller reads no more).
    pub fn new(data: Vec<u8>) -> Result<Hive, HiveError> {
        if data.get(..4) != Some(b"regf") || data.len() <= BASE {
            return Err(HiveError::NotAHive);
        }
        let root = u32_at(&data, 0x24).ok_or(HiveError::NotAHive)?;
        let hive = Hive {
            data,
            root,
            budget: Cell::new(MAX_CELLS),
        };
        hive.nk(root)?;
        Ok(hive)
    }

    /// The root key.
    pub fn root(&self) -> Key<'_> {
        Key {
            hive: self,
            at: self.root,
        }
    }

    /// The key at a backslash-separated path below the root (case-insensitive, as Windows compares).
    pub fn key(&self, path: &str) -> Result<Option<Key<'_>>, HiveError> {
        let mut k = self.root();
        for part in path.split('\\').filter(|p| !p.is_empty()) {
            match k.subkey(part)? {
                Some(s) => k = s,
                None => return Ok(None),
            }
        }
        Ok(Some(k))
    }

    /// The data of the cell at `off` (after its size field), charged to the budget.
    fn cell(&self, off: u32) -> Result<&[u8], HiveError> {
        let left = self.budget.get();
        if left == 0 {
            return Err(HiveError::Budget);
        }
        self.budget.set(left.saturating_sub(1));
        let start = usize::try_from(off)
            .ok()
            .and_then(|o| o.checked_add(BASE))
            .ok_or(HiveError::OutOfRange(off))?;
        let size = self
            .data
            .get(start..)
            .and_then(|b| b.get(..4))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(i32::from_le_bytes)
            .ok_or(HiveError::OutOfRange(off))?;
        let len = usize::try_from(size.unsigned_abs()).map_err(|_| HiveError::OutOfRange(off))?;
        if len < 4 {
            return Err(HiveError::OutOfRange(off));
        }
        let end = start.checked_add(len).ok_or(HiveError::OutOfRange(off))?;
        self.data
            .get(start.saturating_add(4)..end)
            .ok_or(HiveError::OutOfRange(off))
    }

    fn nk(&self, off: u32) -> Result<&[u8], HiveError> {
        let c = self.cell(off)?;
        if c.get(..2) != Some(b"nk") || c.len() < 76 {
            return Err(HiveError::BadCell(off, "key (nk)"));
        }
        Ok(c)
    }

    /// The "nk" offsets a subkey list names ("lf", "lh", "li", or an "ri" of those).
    fn list(&self, off: u32, depth: u8, out: &mut Vec<u32>) -> Result<(), HiveError> {
        let c = self.cell(off)?;
        let sig = c.get(..2).ok_or(HiveError::BadCell(off, "subkey list"))?;
        let count = usize::from(u16_at(c, 2).ok_or(HiveError::BadCell(off, "subkey list"))?);
        let (stride, nested) = match sig {
            b"lf" | b"lh" => (8usize, false),
            b"li" => (4, false),
            b"ri" if depth == 0 => (4, true),
            _ => return Err(HiveError::BadCell(off, "subkey list")),
        };
        for i in 0..count {
            if out.len() >= MAX_LIST {
                break;
            }
            let at = i
                .checked_mul(stride)
                .and_then(|x| x.checked_add(4))
                .ok_or(HiveError::BadCell(off, "subkey list"))?;
            let Some(child) = u32_at(c, at) else {
                return Err(HiveError::BadCell(off, "subkey list"));
            };
            if nested {
                self.list(child, 1, out)?;
            } else {
                out.push(child);
            }
        }
        Ok(())
    }
}

/// A name stored in a key or value record: Latin-1 when `compressed`, UTF-16LE otherwise.
fn name(raw: &[u8], compressed: bool) -> String {
    if compressed {
        raw.iter().map(|&b| char::from(b)).collect()
    } else {
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|p| {
                u16::from_le_bytes([
                    p.first().copied().unwrap_or(0),
                    p.get(1).copied().unwrap_or(0),
                ])
            })
            .collect();
        String::from_utf16_lossy(&units)
    }
}

fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || a.to_lowercase() == b.to_lowercase()
}

impl<'h> Key<'h> {
    /// The key's name.
    pub fn name(&self) -> Result<String, HiveError> {
        let c = self.hive.nk(self.at)?;
        let flags = u16_at(c, 2).unwrap_or(0);
        let len = usize::from(u16_at(c, 72).unwrap_or(0));
        let raw = c
            .get(76..76usize.saturating_add(len))
            .ok_or(HiveError::BadCell(self.at, "key (nk)"))?;
        Ok(name(raw, flags & 0x20 != 0))
    }

    /// The subkeys (at most [`MAX_LIST`]).
    pub fn subkeys(&self) -> Result<Vec<Key<'h>>, HiveError> {
        let c = self.hive.nk(self.at)?;
        let count = u32_at(c, 20).unwrap_or(0);
        let list = u32_at(c, 28).unwrap_or(u32::MAX);
        let mut offs = Vec::new();
        if count > 0 && list != u32::MAX {
            self.hive.list(list, 0, &mut offs)?;
        }
        Ok(offs
            .into_iter()
            .map(|at| Key {
                hive: self.hive,
                at,
            })
            .collect())
    }

    /// The subkey `name` (case-insensitive).
    pub fn subkey(&self, wanted: &str) -> Result<Option<Key<'h>>, HiveError> {
        for k in self.subkeys()? {
            if same_name(&k.name()?, wanted) {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// The value `name` (case-insensitive; "" is the default value).
    pub fn value(&self, wanted: &str) -> Result<Option<Value>, HiveError> {
        let c = self.hive.nk(self.at)?;
        let count = usize::try_from(u32_at(c, 36).unwrap_or(0)).unwrap_or(usize::MAX);
        let list = u32_at(c, 40).unwrap_or(u32::MAX);
        if count == 0 || list == u32::MAX {
            return Ok(None);
        }
        let offs = self.hive.cell(list)?;
        for i in 0..count.min(MAX_LIST) {
            let Some(vk_off) = i.checked_mul(4).and_then(|at| u32_at(offs, at)) else {
                return Err(HiveError::BadCell(list, "value list"));
            };
            let vk = self.hive.cell(vk_off)?;
            if vk.get(..2) != Some(b"vk") || vk.len() < 20 {
                return Err(HiveError::BadCell(vk_off, "value (vk)"));
            }
            let name_len = usize::from(u16_at(vk, 2).unwrap_or(0));
            let flags = u16_at(vk, 16).unwrap_or(0);
            let raw = vk
                .get(20..20usize.saturating_add(name_len))
                .ok_or(HiveError::BadCell(vk_off, "value (vk)"))?;
            if !same_name(&name(raw, flags & 1 != 0), wanted) {
                continue;
            }
            return self.data(vk_off, vk).map(Some);
        }
        Ok(None)
    }

    fn data(&self, vk_off: u32, vk: &[u8]) -> Result<Value, HiveError> {
        let size = u32_at(vk, 4).unwrap_or(0);
        let kind = u32_at(vk, 12).unwrap_or(0);
        let bad = HiveError::BadCell(vk_off, "value (vk)");
        if size & 0x8000_0000 != 0 {
            let n = usize::try_from(size & 0x7fff_ffff).map_err(|_| bad)?.min(4);
            let data = vk.get(8..8usize.saturating_add(n)).unwrap_or_default();
            return Ok(Value {
                kind,
                data: data.to_vec(),
            });
        }
        let n = usize::try_from(size).map_err(|_| HiveError::BadCell(vk_off, "value (vk)"))?;
        if n > MAX_VALUE {
            return Err(HiveError::BadCell(vk_off, "value of at most 16 KiB"));
        }
        let off = u32_at(vk, 8).ok_or(HiveError::BadCell(vk_off, "value (vk)"))?;
        let d = self.hive.cell(off)?;
        let data = d.get(..n).ok_or(HiveError::OutOfRange(off))?;
        Ok(Value {
            kind,
            data: data.to_vec(),
        })
    }
}

impl Value {
    /// REG_SZ / REG_EXPAND_SZ as text (UTF-16LE up to the first NUL); `None` for other types.
    pub fn string(&self) -> Option<String> {
        if self.kind != 1 && self.kind != 2 {
            return None;
        }
        let units: Vec<u16> = self
            .data
            .chunks_exact(2)
            .map(|p| {
                u16::from_le_bytes([
                    p.first().copied().unwrap_or(0),
                    p.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|&u| u != 0)
            .collect();
        Some(String::from_utf16_lossy(&units))
    }

    /// REG_DWORD as a number; `None` for other types.
    pub fn dword(&self) -> Option<u32> {
        if self.kind != 4 {
            return None;
        }
        u32_at(&self.data, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hive with root key "ROOT" holding a subkey "Sub" with a REG_SZ "Name" = "hi" and a REG_DWORD "Start" = 0.
    pub(crate) fn tiny() -> Vec<u8> {
        let mut h = vec![0u8; BASE];
        h[..4].copy_from_slice(b"regf");
        let mut bin = vec![0u8; 4096];
        bin[..4].copy_from_slice(b"hbin");
        let mut at = 32usize;
        let mut put = |bin: &mut Vec<u8>, body: &[u8]| -> u32 {
            let len = (body.len() + 4 + 7) & !7;
            let off = at as u32;
            bin[at..at + 4].copy_from_slice(&(-(len as i32)).to_le_bytes());
            bin[at + 4..at + 4 + body.len()].copy_from_slice(body);
            at += len;
            off
        };
        let nk = |name: &str, subkeys: u32, list: u32, values: u32, vlist: u32| {
            let mut b = vec![0u8; 76];
            b[..2].copy_from_slice(b"nk");
            b[2..4].copy_from_slice(&0x20u16.to_le_bytes());
            b[20..24].copy_from_slice(&subkeys.to_le_bytes());
            b[28..32].copy_from_slice(&list.to_le_bytes());
            b[36..40].copy_from_slice(&values.to_le_bytes());
            b[40..44].copy_from_slice(&vlist.to_le_bytes());
            b[72..74].copy_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b
        };
        let vk = |name: &str, kind: u32, size: u32, data: u32| {
            let mut b = vec![0u8; 20];
            b[..2].copy_from_slice(b"vk");
            b[2..4].copy_from_slice(&(name.len() as u16).to_le_bytes());
            b[4..8].copy_from_slice(&size.to_le_bytes());
            b[8..12].copy_from_slice(&data.to_le_bytes());
            b[12..16].copy_from_slice(&kind.to_le_bytes());
            b[16..18].copy_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b
        };
        let text: Vec<u8> = "hi\0".encode_utf16().flat_map(u16::to_le_bytes).collect();
        let text_off = put(&mut bin, &text);
        let v1 = put(&mut bin, &vk("Name", 1, text.len() as u32, text_off));
        let v2 = put(&mut bin, &vk("Start", 4, 0x8000_0004, 0));
        let mut vl = Vec::new();
        vl.extend_from_slice(&v1.to_le_bytes());
        vl.extend_from_slice(&v2.to_le_bytes());
        let vlist = put(&mut bin, &vl);
        let sub = put(&mut bin, &nk("Sub", 0, u32::MAX, 2, vlist));
        let mut lf = b"lf".to_vec();
        lf.extend_from_slice(&1u16.to_le_bytes());
        lf.extend_from_slice(&sub.to_le_bytes());
        lf.extend_from_slice(b"Sub\0");
        let lf_off = put(&mut bin, &lf);
        let root = put(&mut bin, &nk("ROOT", 1, lf_off, 0, u32::MAX));
        h[0x24..0x28].copy_from_slice(&root.to_le_bytes());
        h[0x28..0x2c].copy_from_slice(&4096u32.to_le_bytes());
        h.extend_from_slice(&bin);
        h
    }

    #[test]
    fn reads_keys_and_values() {
        let hive = Hive::new(tiny()).unwrap();
        assert_eq!(hive.root().name().unwrap(), "ROOT");
        let sub = hive.key("\\sub").unwrap().unwrap();
        assert_eq!(
            sub.value("NAME").unwrap().and_then(|v| v.string()),
            Some("hi".into())
        );
        assert_eq!(sub.value("Start").unwrap().and_then(|v| v.dword()), Some(0));
        assert!(sub.value("none").unwrap().is_none());
        assert!(hive.key("Sub\\Deeper").unwrap().is_none());
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_value_never_a_panic() {
        let good = tiny();
        let walk = |b: Vec<u8>| {
            if let Ok(h) = Hive::new(b)
                && let Ok(Some(k)) = h.key("Sub")
            {
                let _ = k.value("Name");
                let _ = k.value("Start");
            }
        };
        for n in 0..good.len() {
            walk(good[..n].to_vec());
        }
        for i in BASE..good.len() {
            for x in [0xffu8, 0x80, 0x01] {
                let mut b = good.clone();
                b[i] ^= x;
                walk(b);
            }
        }
    }

    #[test]
    fn a_self_referencing_index_root_is_bounded() {
        // An "ri" list naming itself: one level deep only, then "not a subkey list".
        let mut h = tiny();
        let root = u32::from_le_bytes(h[0x24..0x28].try_into().unwrap()) as usize + BASE + 4;
        let lf =
            u32::from_le_bytes(h[root + 28..root + 32].try_into().unwrap()) as usize + BASE + 4;
        h[lf..lf + 2].copy_from_slice(b"ri");
        let self_off = (lf - BASE - 4) as u32;
        h[lf + 4..lf + 8].copy_from_slice(&self_off.to_le_bytes());
        let hive = Hive::new(h).unwrap();
        assert!(matches!(hive.key("Sub"), Err(HiveError::BadCell(_, _))));
    }
}
