//! Reading a volume back through libvirt (sparse download streams of byte ranges), for `migrate`'s verify
//! stage: [`VolumeStorage`] is a read-only [`Storage`] over the volume's bytes (its file, for a qcow2 volume the
//! qcow2 container), and [`open`] puts imgshift's own reader of the volume's format on top of it, which gives
//! the guest's bytes. Nothing is copied to a local file.

use std::sync::{Arc, Mutex};

use super::rpc::api::SPARSE_STREAM;
use super::rpc::stream::Chunk;
use super::rpc::{Error as RpcError, StorageVol};
use super::{Error, Result, VolFormat, msg};
use imgshift_converters::{DiskSource, Error as ConvError, Format, OpenGate, Storage};

/// Reads are made in aligned pieces of this size and the last few are kept: the qcow2 reader asks for its
/// header, tables and clusters in small reads, each of which would otherwise be a download stream of its own.
const PIECE: u64 = 256 * 1024;
/// Pieces kept.
const KEPT: usize = 32;
/// `VIR_STORAGE_VOL_GET_PHYSICAL`: `info_flags` reports the file's length in `allocation`.
const VOL_GET_PHYSICAL: u32 = 1;

/// A volume's bytes, read over libvirt download streams.
pub struct VolumeStorage {
    vol: StorageVol,
    name: String,
    len: u64,
    kept: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

impl VolumeStorage {
    /// The bytes of `vol` (named `name` in messages): its capacity for a raw volume, its file's length for a
    /// qcow2 one.
    pub fn new(vol: &StorageVol, name: &str, format: VolFormat) -> Result<Self> {
        let len = match format {
            VolFormat::Raw => {
                vol.info()
                    .map_err(|e| Error::call(format!("cannot read volume '{name}'"), &e))?
                    .capacity
            }
            VolFormat::Qcow2 => {
                vol.info_flags(VOL_GET_PHYSICAL)
                    .map_err(|e| Error::call(format!("cannot read volume '{name}'"), &e))?
                    .allocation
            }
        };
        Ok(VolumeStorage {
            vol: vol.clone(),
            name: name.to_string(),
            len,
            kept: Mutex::new(Vec::new()),
        })
    }

    /// Downloads `buf.len()` bytes at `offset` in one stream; holes come as holes and are zeros here.
    fn download(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        let err = |what: &str, e: &RpcError| {
            ConvError::io_plain(
                &format!("volume '{}': {what}", self.name),
                std::io::Error::other(msg(e)),
            )
        };
        let asked = buf.len();
        let over = |done: usize| {
            ConvError::input(format!(
                "volume '{}': the daemon sent more than the {asked} bytes asked for at offset {offset} ({done})",
                self.name
            ))
        };
        let mut s = self
            .vol
            .download(offset, buf.len() as u64, SPARSE_STREAM)
            .map_err(|e| err(&format!("cannot download from offset {offset}"), &e))?;
        let mut done = 0usize;
        loop {
            let chunk = s.next_chunk().map_err(|e| err("the download failed", &e))?;
            let n = match &chunk {
                Chunk::Data(d) => d.len(),
                Chunk::Hole(h) => usize::try_from(*h).unwrap_or(usize::MAX),
                Chunk::End => break,
            };
            let end = done.checked_add(n).ok_or_else(|| over(usize::MAX))?;
            let Some(dst) = buf.get_mut(done..end) else {
                s.abort();
                return Err(over(end));
            };
            match chunk {
                Chunk::Data(d) => dst.copy_from_slice(&d),
                _ => dst.fill(0),
            }
            done = end;
        }
        s.finish()
            .map_err(|e| err("the download did not finish", &e))?;
        if done != buf.len() {
            return Err(ConvError::input(format!(
                "volume '{}': {done} bytes came back for {} asked at offset {offset}",
                self.name,
                buf.len()
            )));
        }
        Ok(())
    }

    /// Piece `index` (a cached copy when there is one).
    fn piece(&self, index: u64) -> imgshift_converters::Result<Arc<Vec<u8>>> {
        if let Ok(kept) = self.kept.lock()
            && let Some((_, p)) = kept.iter().find(|(i, _)| *i == index)
        {
            return Ok(p.clone());
        }
        let start = index * PIECE;
        let n = usize::try_from(PIECE.min(self.len.saturating_sub(start)))
            .map_err(|_| ConvError::input("piece too large"))?;
        let mut data = vec![0u8; n];
        self.download(&mut data, start)?;
        let data = Arc::new(data);
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() >= KEPT {
                kept.remove(0);
            }
            kept.push((index, data.clone()));
        }
        Ok(data)
    }
}

impl Storage for VolumeStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                ConvError::input(format!(
                    "volume '{}': read of {} bytes at {offset} past its end ({})",
                    self.name,
                    buf.len(),
                    self.len
                ))
            })?;
        if buf.len() as u64 >= PIECE {
            return self.download(buf, offset);
        }
        let mut at = offset;
        while at < end {
            let index = at / PIECE;
            let piece = self.piece(index)?;
            let from = usize::try_from(at - index * PIECE).unwrap_or(usize::MAX);
            let dst_from = usize::try_from(at - offset).unwrap_or(usize::MAX);
            let n = (piece.len().saturating_sub(from)).min(buf.len().saturating_sub(dst_from));
            let (Some(dst), Some(src)) = (
                buf.get_mut(dst_from..dst_from + n),
                piece.get(from..from + n),
            ) else {
                return Err(ConvError::input("internal error: piece out of range"));
            };
            if n == 0 {
                return Err(ConvError::input("internal error: empty piece"));
            }
            dst.copy_from_slice(src);
            at += n as u64;
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("libvirt volume '{}'", self.name)
    }
}

/// The guest's view of volume `vol` of `format`: imgshift's reader of that format over [`VolumeStorage`]. No
/// file the volume names (a qcow2 backing file) is opened.
pub fn open(
    vol: &StorageVol,
    name: &str,
    format: VolFormat,
) -> anyhow::Result<Box<dyn DiskSource>> {
    let storage: Arc<dyn Storage> = Arc::new(VolumeStorage::new(vol, name, format)?);
    let fmt = Format::from_name(format.name())?;
    Ok(imgshift_converters::open(
        storage,
        Some(fmt),
        &OpenGate::deny_all(),
    )?)
}
