//! VHDX log replay, in memory (MS-VHDX 2.3). A VHDX whose header names a log GUID was not closed cleanly: its
//! metadata (BAT, metadata region) is only consistent after the log's active sequence is applied. Sources are
//! never written, so the replay builds an overlay of the sectors the log would write, and every later read of
//! the file goes through it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::header::{HEADER_SECTION_SIZE, Header, Region};
use super::{FMT, Guid, read_u32, read_u64};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Log entry signature "loge" (MS-VHDX 2.3.1.1).
pub const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// Data descriptor signature "desc" (MS-VHDX 2.3.1.3).
pub const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
/// Zero descriptor signature "zero" (MS-VHDX 2.3.1.2).
pub const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
/// Data sector signature "data" (MS-VHDX 2.3.1.4).
pub const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// The log is a circular buffer of 4 KiB sectors (MS-VHDX 2.3).
pub const LOG_SECTOR: u64 = 4096;
/// Size of the entry header (MS-VHDX 2.3.1.1).
pub const ENTRY_HEADER_SIZE: u64 = 64;
/// Size of a descriptor (MS-VHDX 2.3.1.2, 2.3.1.3).
pub const DESCRIPTOR_SIZE: u64 = 32;
/// Largest log replayed: it is held in memory while the active sequence is searched (Hyper-V and qemu create
/// 1 MiB logs).
pub const MAX_REPLAY_LOG: u64 = 64 << 20;
/// Work bound for the search (entry checksums and chain steps), so a crafted log cannot make it quadratic.
const SEARCH_BUDGET: u64 = 1 << 30;

/// One change a log entry makes.
#[derive(Debug, Clone)]
enum Change {
    /// 4 KiB of data at a file offset.
    Data(u64, Arc<Vec<u8>>),
    /// Zeros over `[offset, offset+len)`.
    Zero(u64, u64),
}

/// A valid log entry.
#[derive(Debug, Clone)]
struct Entry {
    sequence: u64,
    sectors: u64,
    tail_sector: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    changes: Vec<Change>,
}

/// What replaying the log produced.
pub struct Replay {
    /// The storage to read the image through (the original when nothing was replayed).
    pub storage: Arc<dyn Storage>,
    /// Entries applied.
    pub entries: u64,
}

/// Replays the log of `header` in memory. Returns the original storage when the log is empty.
pub fn replay(storage: Arc<dyn Storage>, header: &Header) -> Result<Replay> {
    if header.log_guid.is_zero() {
        return Ok(Replay {
            storage,
            entries: 0,
        });
    }
    let log = Region {
        offset: header.log_offset,
        length: header.log_length,
    };
    if log.length > MAX_REPLAY_LOG {
        return Err(Error::limit(
            FMT,
            format!(
                "the log to replay is {} bytes (at most {MAX_REPLAY_LOG} are replayed in memory); open it once in Hyper-V or run qemu-img check -r all on a COPY",
                log.length
            ),
        ));
    }
    // bounded by MAX_REPLAY_LOG
    let mut bytes = vec![0u8; log.length as usize];
    storage.read_exact_at(&mut bytes, log.offset)?;
    let entries = find_active_sequence(&bytes, header.log_guid)?;
    let Some(head) = entries.last() else {
        // A log GUID with no valid sequence: nothing to replay (qemu opens such files as they are).
        return Ok(Replay {
            storage,
            entries: 0,
        });
    };
    let file_len = storage.len();
    // "FlushedFileOffset ... if the file is smaller, the file has been truncated" (MS-VHDX 2.3.1.1).
    if head.flushed_file_offset > file_len {
        return Err(Error::corrupt(
            FMT,
            format!(
                "the log says the file was {} bytes long but it has {file_len} (truncated?)",
                head.flushed_file_offset
            ),
        ));
    }
    // LastFileOffset is "a file size that all allocated file structures fit into" (MS-VHDX 2.3.1.1): no
    // descriptor may write past it (or past the file, if that is longer). It is not the size the replayed file
    // takes: qemu (block/vhdx-log.c vhdx_log_flush) grows the file only by the descriptors it writes, and
    // truncates up only to round a LastFileOffset that is not a 1 MiB multiple. So the replayed file ends at the
    // real end or at the end of the last descriptor's write, whichever is later; a LastFileOffset far past both
    // cannot make regions or blocks that lie beyond the file look present.
    let limit = file_len.max(head.last_file_offset);
    let mut written_end = 0u64;
    let mut overlay = Overlay::default();
    for e in &entries {
        for c in &e.changes {
            let (off, n) = match c {
                Change::Data(off, _) => (*off, LOG_SECTOR),
                Change::Zero(off, n) => (*off, *n),
            };
            let target = Region {
                offset: off,
                length: n,
            };
            let end = off.checked_add(n).filter(|&end| {
                end <= limit && off >= HEADER_SECTION_SIZE && !target.overlaps(&log)
            });
            let Some(end) = end else {
                return Err(Error::corrupt(
                    FMT,
                    format!(
                        "log entry {} writes {n} bytes at {off}, outside the file's metadata and data",
                        e.sequence
                    ),
                ));
            };
            written_end = written_end.max(end);
            overlay.apply(c.clone());
        }
    }
    let len = file_len.max(written_end);
    Ok(Replay {
        storage: Arc::new(Replayed {
            inner: storage,
            len,
            overlay,
        }),
        entries: entries.len() as u64,
    })
}

/// Finds the active sequence (MS-VHDX 2.3.3): among the sequences of valid entries with consecutive sequence
/// numbers, each running from the entry its head's Tail names to the head, the one with the largest head
/// sequence number. Returns its entries in replay order (empty when there is none).
fn find_active_sequence(log: &[u8], guid: Guid) -> Result<Vec<Entry>> {
    let n = log.len() as u64 / LOG_SECTOR;
    let mut budget = SEARCH_BUDGET;
    let mut valid: Vec<Option<Entry>> = Vec::new();
    for s in 0..n {
        valid.push(parse_entry(log, s, guid, &mut budget)?);
    }
    let mut heads: Vec<u64> = (0..n).filter(|&s| valid[s as usize].is_some()).collect();
    heads.sort_by_key(|&s| std::cmp::Reverse(valid[s as usize].as_ref().map_or(0, |e| e.sequence)));
    for h in heads {
        let Some(head) = valid.get(h as usize).and_then(|e| e.as_ref()) else {
            continue;
        };
        let mut chain = Vec::new();
        let mut at = head.tail_sector;
        let mut expect: Option<u64> = None;
        let mut steps = 0u64;
        let ok = loop {
            budget = budget.checked_sub(1).ok_or_else(search_limit)?;
            let Some(e) = valid.get(at as usize).and_then(|e| e.as_ref()) else {
                break false;
            };
            if expect.is_some_and(|x| x != e.sequence) {
                break false;
            }
            chain.push(e.clone());
            steps += e.sectors;
            if at == h && e.sequence == head.sequence {
                break true;
            }
            if steps >= n {
                break false;
            }
            expect = e.sequence.checked_add(1);
            at = (at + e.sectors) % n;
        };
        if ok {
            return Ok(chain);
        }
    }
    Ok(Vec::new())
}

fn search_limit() -> Error {
    Error::limit(
        FMT,
        "searching the log for its active sequence took too long; open it once in Hyper-V or run qemu-img check -r all on a COPY",
    )
}

/// Parses the entry starting at log sector `sector`; `None` when it is not a valid entry (MS-VHDX 2.3.1).
fn parse_entry(log: &[u8], sector: u64, guid: Guid, budget: &mut u64) -> Result<Option<Entry>> {
    let log_len = log.len() as u64;
    let start = sector * LOG_SECTOR;
    let Some(h) = log.get(start as usize..(start + ENTRY_HEADER_SIZE) as usize) else {
        return Ok(None);
    };
    if !h.starts_with(ENTRY_SIGNATURE) {
        return Ok(None);
    }
    let entry_length = u64::from(read_u32(h, 8)?);
    let tail = u64::from(read_u32(h, 12)?);
    let sequence = read_u64(h, 16)?;
    let descriptor_count = u64::from(read_u32(h, 24)?);
    let log_guid = Guid::read(h, 32)?;
    let flushed_file_offset = read_u64(h, 48)?;
    let last_file_offset = read_u64(h, 56)?;
    // EntryLength "MUST be a multiple of 4 KB"; SequenceNumber "MUST be greater than zero"; LogGuid must equal
    // the header's; Tail is a sector offset inside the log (MS-VHDX 2.3.1.1).
    let desc_sectors =
        (ENTRY_HEADER_SIZE + descriptor_count * DESCRIPTOR_SIZE).div_ceil(LOG_SECTOR);
    if entry_length == 0
        || !entry_length.is_multiple_of(LOG_SECTOR)
        || entry_length > log_len
        || sequence == 0
        || log_guid != guid
        || !tail.is_multiple_of(LOG_SECTOR)
        || tail >= log_len
        || desc_sectors * LOG_SECTOR > entry_length
    {
        return Ok(None);
    }
    *budget = budget.checked_sub(entry_length).ok_or_else(search_limit)?;
    // The entry may wrap around the end of the circular log.
    let mut entry = Vec::with_capacity(entry_length as usize);
    let first = (log_len - start).min(entry_length);
    entry.extend_from_slice(
        log.get(start as usize..(start + first) as usize)
            .unwrap_or(&[]),
    );
    entry.extend_from_slice(log.get(..(entry_length - first) as usize).unwrap_or(&[]));
    if entry.len() as u64 != entry_length {
        return Ok(None);
    }
    // Checksum: CRC-32C over the whole entry with the Checksum field zero (MS-VHDX 2.3.1.1).
    if !super::checksum_ok(&entry, 4) {
        return Ok(None);
    }
    let mut changes = Vec::new();
    let mut data_sector = desc_sectors;
    for i in 0..descriptor_count {
        let at = (ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE) as usize;
        let Some(d) = entry.get(at..at + DESCRIPTOR_SIZE as usize) else {
            return Ok(None);
        };
        let file_offset = read_u64(d, 16)?;
        if read_u64(d, 24)? != sequence || !file_offset.is_multiple_of(LOG_SECTOR) {
            return Ok(None);
        }
        if d.starts_with(ZERO_DESC_SIGNATURE) {
            let zero_length = read_u64(d, 8)?;
            if !zero_length.is_multiple_of(LOG_SECTOR) {
                return Ok(None);
            }
            changes.push(Change::Zero(file_offset, zero_length));
        } else if d.starts_with(DATA_DESC_SIGNATURE) {
            // The data sector keeps bytes 8..4092; the descriptor holds the first 8 (LeadingBytes) and last 4
            // (TrailingBytes); the sector repeats the sequence number split high/low (MS-VHDX 2.3.1.3, 2.3.1.4).
            let off = (data_sector * LOG_SECTOR) as usize;
            let Some(s) = entry.get(off..off + LOG_SECTOR as usize) else {
                return Ok(None);
            };
            let seq = (u64::from(read_u32(s, 4)?) << 32) | u64::from(read_u32(s, 4092)?);
            if !s.starts_with(DATA_SECTOR_SIGNATURE) || seq != sequence {
                return Ok(None);
            }
            let mut data = Vec::with_capacity(LOG_SECTOR as usize);
            data.extend_from_slice(d.get(8..16).unwrap_or(&[0; 8]));
            data.extend_from_slice(s.get(8..4092).unwrap_or(&[]));
            data.extend_from_slice(d.get(4..8).unwrap_or(&[0; 4]));
            changes.push(Change::Data(file_offset, Arc::new(data)));
            data_sector += 1;
        } else {
            return Ok(None);
        }
    }
    Ok(Some(Entry {
        sequence,
        sectors: entry_length / LOG_SECTOR,
        tail_sector: tail / LOG_SECTOR,
        flushed_file_offset,
        last_file_offset,
        changes,
    }))
}

/// A replayed range: its end, and its data sector (None: zeros).
type Piece = (u64, Option<Arc<Vec<u8>>>);

/// Replayed changes as non-overlapping pieces keyed by file offset; later changes replace earlier ones.
#[derive(Default)]
struct Overlay {
    /// start -> (end, data sector or None for zeros). Every bound is a multiple of 4 KiB.
    pieces: BTreeMap<u64, Piece>,
}

impl Overlay {
    fn apply(&mut self, change: Change) {
        let (start, end, data) = match change {
            Change::Data(off, d) => (off, off + LOG_SECTOR, Some(d)),
            Change::Zero(off, n) => (off, off + n, None),
        };
        if end <= start {
            return;
        }
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(k, _)| *k)
            .collect();
        for k in overlapping {
            if let Some((e, d)) = self.pieces.remove(&k) {
                // Data pieces are single aligned sectors, so only zero ranges are ever split.
                if d.is_none() {
                    if k < start {
                        self.pieces.insert(k, (start, None));
                    }
                    if e > end {
                        self.pieces.insert(end, (e, None));
                    }
                }
            }
        }
        self.pieces.insert(start, (end, data));
    }
}

/// The file as the replayed log leaves it.
struct Replayed {
    inner: Arc<dyn Storage>,
    len: u64,
    overlay: Overlay,
}

impl Storage for Replayed {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::corrupt(
                    FMT,
                    format!(
                        "read of {} bytes at {offset} is past the end of the replayed file ({} bytes)",
                        buf.len(),
                        self.len
                    ),
                )
            })?;
        // The log may have written past the real end: bytes there that it did not write read as zeros.
        self.inner.read_at_zero_fill(buf, offset)?;
        let first = self
            .overlay
            .pieces
            .range(..=offset)
            .next_back()
            .map_or(offset, |(k, _)| *k);
        for (&s, (e, data)) in self.overlay.pieces.range(first..end) {
            let (a, b) = (s.max(offset), (*e).min(end));
            if b <= a {
                continue;
            }
            let dst = buf.get_mut((a - offset) as usize..(b - offset) as usize);
            match (dst, data) {
                (Some(dst), Some(d)) => {
                    if let Some(src) = d.get((a - s) as usize..(b - s) as usize) {
                        dst.copy_from_slice(src);
                    }
                }
                (Some(dst), None) => dst.fill(0),
                (None, _) => {}
            }
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.inner.name()
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn sector(b: u8) -> Arc<Vec<u8>> {
        Arc::new(vec![b; LOG_SECTOR as usize])
    }

    #[test]
    fn later_changes_win() {
        let mut o = Overlay::default();
        o.apply(Change::Zero(0, 4 * LOG_SECTOR));
        o.apply(Change::Data(LOG_SECTOR, sector(7)));
        o.apply(Change::Data(3 * LOG_SECTOR, sector(8)));
        o.apply(Change::Zero(3 * LOG_SECTOR, LOG_SECTOR));
        let r = Replayed {
            inner: Arc::new(MemStorage::new(vec![0xff; 6 * 4096], "t")),
            len: 6 * 4096,
            overlay: o,
        };
        let mut buf = vec![1u8; 6 * 4096];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 7));
        assert!(buf[8192..16384].iter().all(|&b| b == 0));
        assert!(buf[16384..].iter().all(|&b| b == 0xff));
        let mut mid = vec![0u8; 10];
        r.read_exact_at(&mut mid, 4090).unwrap();
        assert_eq!(&mid[..6], &[0; 6]);
        assert_eq!(&mid[6..], &[7; 4]);
        assert!(r.read_exact_at(&mut mid, 6 * 4096 - 5).is_err());
    }

    /// An entry with one zero descriptor and one data descriptor (so it spans 2 sectors).
    fn entry(guid: Guid, seq: u64, tail: u64, target: u64) -> Vec<u8> {
        let mut e = vec![0u8; 2 * LOG_SECTOR as usize];
        e[0..4].copy_from_slice(ENTRY_SIGNATURE);
        e[8..12].copy_from_slice(&(2 * LOG_SECTOR as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&2u32.to_le_bytes());
        e[32..48].copy_from_slice(&guid.0);
        e[64..68].copy_from_slice(ZERO_DESC_SIGNATURE);
        e[72..80].copy_from_slice(&LOG_SECTOR.to_le_bytes());
        e[80..88].copy_from_slice(&(target + LOG_SECTOR).to_le_bytes());
        e[88..96].copy_from_slice(&seq.to_le_bytes());
        e[96..100].copy_from_slice(DATA_DESC_SIGNATURE);
        e[112..120].copy_from_slice(&target.to_le_bytes());
        e[120..128].copy_from_slice(&seq.to_le_bytes());
        e[4096..4100].copy_from_slice(DATA_SECTOR_SIGNATURE);
        e[4100..4104].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        e[8188..8192].copy_from_slice(&(seq as u32).to_le_bytes());
        let c = super::super::checksum(&e, 4);
        e[4..8].copy_from_slice(&c.to_le_bytes());
        e
    }

    /// Writes `e` into the circular `log` at sector `at`, wrapping.
    fn place(log: &mut [u8], at: u64, e: &[u8]) {
        let n = log.len();
        for (i, b) in e.iter().enumerate() {
            log[(at as usize * 4096 + i) % n] = *b;
        }
    }

    #[test]
    fn finds_a_wrapping_sequence_from_the_head_tail() {
        let g = Guid([3; 16]);
        let mut log = vec![0u8; 1 << 20];
        let last = 255u64;
        // seq 5 wraps from the last sector to sector 0; seq 6 follows at sector 1 and names seq 5 as its tail
        place(&mut log, last, &entry(g, 5, last * LOG_SECTOR, 2 << 20));
        place(&mut log, 1, &entry(g, 6, last * LOG_SECTOR, 3 << 20));
        // a stale entry of an older sequence elsewhere, and one of another log GUID with a higher number
        place(&mut log, 100, &entry(g, 2, 100 * LOG_SECTOR, 4 << 20));
        place(
            &mut log,
            150,
            &entry(Guid([4; 16]), 99, 150 * LOG_SECTOR, 4 << 20),
        );
        let seq = find_active_sequence(&log, g).unwrap();
        assert_eq!(
            seq.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![5, 6]
        );
        // a head whose tail does not lead back to it is not a sequence: break seq 5's checksum
        log[(last as usize) * 4096 + 200] ^= 1;
        let seq = find_active_sequence(&log, g).unwrap();
        assert_eq!(seq.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn empty_or_foreign_log_has_no_sequence() {
        let g = Guid([1; 16]);
        assert!(
            find_active_sequence(&vec![0u8; 1 << 20], g)
                .unwrap()
                .is_empty()
        );
        let mut log = vec![0u8; 1 << 20];
        log[..4].copy_from_slice(ENTRY_SIGNATURE);
        assert!(find_active_sequence(&log, g).unwrap().is_empty());
    }
}
