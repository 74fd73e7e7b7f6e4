//! Per-block SHA-256 of a disk, for sources that cannot say what changed: a run hashes the source and sends the
//! blocks whose hash differs from the last point's. A block of zeros has the all-zero "hash" [`ZERO`] (SHA-256
//! never gives it in practice), so holes cost no hashing and a block that became zero is a change.
//!
//! Stored as a small binary file: the magic, the block size and the disk size (big-endian u64 each), then one
//! 32-byte hash per block. 64 KiB per GiB of disk.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use imgshift_converters::DiskSource;
use imgshift_converters::engine::{is_zero, source_map};
use sha2::{Digest, Sha256};

use super::BLOCK;
use super::changes::ChangeSet;

/// The hash of a block of zeros.
pub const ZERO: [u8; 32] = [0; 32];
const MAGIC: &[u8; 16] = b"imgshift-hashes1";
const HEADER: usize = 32;

/// The hash of one block's bytes.
pub fn hash_block(buf: &[u8]) -> [u8; 32] {
    if is_zero(buf) {
        return ZERO;
    }
    Sha256::digest(buf).into()
}

/// One hash per [`BLOCK`] of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    size: u64,
    hashes: Vec<[u8; 32]>,
}

/// Number of blocks of a disk of `size` bytes, as an index bound.
fn block_count(size: u64) -> Result<usize> {
    usize::try_from(size.div_ceil(BLOCK)).context("disk too large to hash")
}

impl BlockHashes {
    /// Every block zero.
    pub fn zeros(size: u64) -> Result<BlockHashes> {
        Ok(BlockHashes {
            size,
            hashes: vec![ZERO; block_count(size)?],
        })
    }

    /// Hashes every block of `src` that its map calls data, reading with `threads` threads; `stop` ends the
    /// work early (an interrupt) with an error.
    pub fn compute(src: &dyn DiskSource, threads: usize, stop: &AtomicBool) -> Result<BlockHashes> {
        let size = src.virtual_size();
        let map = source_map(src).context("cannot map the source")?;
        let mut out = BlockHashes::zeros(size)?;
        let todo: Vec<u64> = ChangeSet::data_of(&map, size).blocks().collect();
        let results = read_and_hash(src, &todo, threads, stop)?;
        for (i, h) in todo.iter().zip(results) {
            out.set(*i, h);
        }
        Ok(out)
    }

    /// The disk size these hashes are of.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sets block `i`'s hash (ignored out of range).
    pub fn set(&mut self, i: u64, h: [u8; 32]) {
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| self.hashes.get_mut(i)) {
            *slot = h;
        }
    }

    /// The blocks whose hash differs from `prev`'s (every block beyond `prev`'s size counts as changed unless it
    /// is zero).
    pub fn changed_since(&self, prev: &BlockHashes) -> ChangeSet {
        let changed = self.hashes.iter().enumerate().filter_map(|(i, h)| {
            let before = prev.hashes.get(i).unwrap_or(&ZERO);
            (h != before).then_some(i as u64)
        });
        ChangeSet::from_blocks(changed, self.size)
    }

    /// The file form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.hashes.len() * 32);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&BLOCK.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        for h in &self.hashes {
            v.extend_from_slice(h);
        }
        v
    }

    /// Reads the file form, checking it describes a disk of `size` bytes.
    pub fn from_bytes(b: &[u8], size: u64) -> Result<BlockHashes> {
        let (Some(magic), Some(block), Some(stored)) = (b.get(..16), b.get(16..24), b.get(24..32))
        else {
            bail!("block hash file too short");
        };
        if magic != MAGIC {
            bail!("not an imgshift block hash file");
        }
        let block = u64::from_be_bytes(block.try_into().context("block size")?);
        let stored = u64::from_be_bytes(stored.try_into().context("disk size")?);
        if block != BLOCK {
            bail!("block hash file made with {block}-byte blocks, not {BLOCK}");
        }
        if stored != size {
            bail!("block hash file is of a {stored}-byte disk, not {size}");
        }
        let n = block_count(size)?;
        let body = &b[HEADER..];
        if body.len() != n.checked_mul(32).context("disk too large to hash")? {
            bail!(
                "block hash file has {} bytes of hashes for {n} blocks",
                body.len()
            );
        }
        let hashes = body
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(BlockHashes { size, hashes })
    }
}

/// Reads and hashes blocks `todo` of `src` with `threads` threads; hashes in `todo`'s order.
pub fn read_and_hash(
    src: &dyn DiskSource,
    todo: &[u64],
    threads: usize,
    stop: &AtomicBool,
) -> Result<Vec<[u8; 32]>> {
    let size = src.virtual_size();
    let next = AtomicUsize::new(0);
    let out = Mutex::new(vec![ZERO; todo.len()]);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, 64) {
            s.spawn(|| {
                let mut buf = vec![0u8; BLOCK as usize];
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { return };
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let start = i.saturating_mul(BLOCK);
                    let len = BLOCK.min(size.saturating_sub(start)) as usize;
                    let b = &mut buf[..len];
                    if let Err(e) = src.read_at(b, start) {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(
                                anyhow::Error::new(e)
                                    .context(format!("cannot read the source at offset {start}")),
                            );
                        }
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    let h = hash_block(b);
                    if let Ok(mut o) = out.lock()
                        && let Some(slot) = o.get_mut(k)
                    {
                        *slot = h;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    out.into_inner()
        .map_err(|_| anyhow::anyhow!("hash table lock poisoned"))
}

/// The hashes of a new point: `prev`'s (or zeros for a first point) with the changed blocks' hashes from
/// `recorded`, reading and hashing changed blocks not recorded. `None` when a block outside the changes has no
/// known hash (no `prev` after a diff-driven point).
pub fn after_point(
    prev: Option<&BlockHashes>,
    first: bool,
    changes: &ChangeSet,
    mut recorded: std::collections::BTreeMap<u64, [u8; 32]>,
    src: &dyn DiskSource,
    threads: usize,
    stop: &AtomicBool,
) -> Result<Option<BlockHashes>> {
    let size = changes.size();
    let mut out = match (prev, first) {
        (Some(p), _) if p.size() == size => p.clone(),
        (_, true) => BlockHashes::zeros(size)?,
        _ => return Ok(None),
    };
    let missing: Vec<u64> = changes
        .blocks()
        .filter(|i| !recorded.contains_key(i))
        .collect();
    let hashed = read_and_hash(src, &missing, threads, stop)?;
    recorded.extend(missing.into_iter().zip(hashed));
    for i in changes.blocks() {
        if let Some(h) = recorded.get(&i) {
            out.set(i, *h);
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_diff() {
        let size = 3 * BLOCK + 7;
        let mut a = BlockHashes::zeros(size).unwrap();
        a.set(1, [1; 32]);
        let b = BlockHashes::from_bytes(&a.to_bytes(), size).unwrap();
        assert_eq!(a, b);
        assert!(BlockHashes::from_bytes(&a.to_bytes(), size + BLOCK).is_err());
        assert!(BlockHashes::from_bytes(&a.to_bytes()[..40], size).is_err());
        let mut c = a.clone();
        c.set(3, [2; 32]);
        c.set(1, ZERO);
        assert_eq!(
            c.changed_since(&a).ranges(),
            &[(BLOCK, 2 * BLOCK), (3 * BLOCK, size)]
        );
        assert_eq!(hash_block(&[0; 100]), ZERO);
        assert_ne!(hash_block(&[1; 100]), ZERO);
    }
}
