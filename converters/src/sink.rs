//! Where a writer's bytes go. A `Sink` receives `(file offset, bytes)` pieces: a local file takes them anywhere
//! (holes stay holes), a stream takes them only in increasing order and fills gaps with zeros, an uploader
//! skips gaps. `OutputSet` makes local outputs atomic: temporary names in the destination folder, renamed on
//! `commit`, removed if dropped uncommitted.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Receives a writer's output.
pub trait Sink: Send {
    /// Writes `data` at `offset` of the output file. Streaming sinks require increasing offsets.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// True when earlier offsets can be written again (a local file); writers then place metadata last.
    fn can_seek_back(&self) -> bool;
    /// Reads back bytes already written (seekable sinks only; used to patch tables).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (offset, buf);
        Err(Error::input("this destination cannot be read back"))
    }
    /// Ends the output at `len` bytes (extends with zeros or a hole).
    fn finish(&mut self, len: u64) -> Result<()>;
    /// A second output file next to this one, called `file_name` (VMDK extents). Only local outputs have it.
    fn sibling(&mut self, file_name: &str) -> Result<Box<dyn Sink>> {
        Err(Error::input(format!(
            "this destination holds one file; '{file_name}' would need a folder (write to a local file instead)"
        )))
    }
    /// The final file name of this output, when it is a file (VMDK descriptors name their extents).
    fn file_name(&self) -> Option<String> {
        None
    }
}

/// When a local output reaches the disk, named after qemu-img's `-t` cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// No syncs: the kernel writes the file back in its own time (qemu-img convert's default, `-t unsafe`).
    /// A crash soon after the conversion can leave a file with stale or missing data.
    #[default]
    Unsafe,
    /// The data is synced before the file is renamed into place and the folder is synced after (`-t
    /// writeback`): once the command returns, a power loss cannot lose or tear the output.
    Writeback,
}

/// A local file, written with positional writes; skipped ranges stay holes.
///
/// With [`Durability::Writeback`] the file is made durable before it is renamed (`finish` syncs it). So that
/// this final sync does not wait for the whole output to reach the disk, a background thread syncs the data
/// written so far every [`EARLY_SYNC_BYTES`]: the disk writes back while the conversion goes on.
pub struct FileSink {
    file: File,
    path: PathBuf,
    final_name: Option<String>,
    set: Option<std::sync::Arc<std::sync::Mutex<OutputSetInner>>>,
    early: Option<EarlySync>,
    unsynced: u64,
    durability: Durability,
}

/// Bytes written between two background syncs: large enough that the syncs are few, small enough that the
/// final one has little left to write.
pub const EARLY_SYNC_BYTES: u64 = 32 << 20;

/// The background syncing thread: a request channel (bounded to one pending request) and its handle.
struct EarlySync {
    tx: std::sync::mpsc::SyncSender<()>,
    handle: std::thread::JoinHandle<std::io::Result<()>>,
}

impl EarlySync {
    fn start(file: &File) -> Option<EarlySync> {
        let file = file.try_clone().ok()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let handle = std::thread::Builder::new()
            .name("imgshift-sync".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok(())
            })
            .ok()?;
        Some(EarlySync { tx, handle })
    }

    /// Stops the thread; returns the first error its syncs met.
    fn stop(self) -> std::io::Result<()> {
        drop(self.tx);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")))
    }
}

impl FileSink {
    /// The file being written (a temporary name inside an [`OutputSet`] until it commits).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps an open, writable file.
    pub fn new(file: File, path: PathBuf) -> Self {
        FileSink {
            file,
            path,
            final_name: None,
            set: None,
            early: None,
            unsynced: 0,
            durability: Durability::Writeback,
        }
    }
}

impl Sink for FileSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(
                &format!("cannot write {} bytes at offset {offset} of", data.len()),
                &self.path,
                e,
            )
        })?;
        if self.durability == Durability::Unsafe {
            return Ok(());
        }
        self.unsynced = self.unsynced.saturating_add(data.len() as u64);
        if self.unsynced >= EARLY_SYNC_BYTES {
            self.unsynced = 0;
            if self.early.is_none() {
                self.early = EarlySync::start(&self.file);
            }
            if let Some(e) = &self.early {
                // A full channel means a sync is already queued: it will cover these bytes too.
                let _ = e.tx.try_send(());
            }
        }
        Ok(())
    }
    fn can_seek_back(&self) -> bool {
        true
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("cannot read back", &self.path, e))
    }
    fn finish(&mut self, len: u64) -> Result<()> {
        if let Some(e) = self.early.take() {
            e.stop()
                .map_err(|e| Error::io("cannot sync", &self.path, e))?;
        }
        self.file
            .set_len(len)
            .map_err(|e| Error::io("cannot set the length of", &self.path, e))?;
        if self.durability == Durability::Unsafe {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("cannot sync", &self.path, e))
    }
    fn sibling(&mut self, file_name: &str) -> Result<Box<dyn Sink>> {
        match &self.set {
            Some(set) => OutputSet::add_file(set, file_name),
            None => Err(Error::input("this output cannot hold extra files")),
        }
    }
    fn file_name(&self) -> Option<String> {
        self.final_name.clone()
    }
}

/// A forward-only stream (stdout, a pipe): gaps are written as zeros.
pub struct StreamSink<W: Write + Send> {
    out: W,
    pos: u64,
}

impl<W: Write + Send> StreamSink<W> {
    /// Wraps a writer positioned at offset 0.
    pub fn new(out: W) -> Self {
        StreamSink { out, pos: 0 }
    }

    fn zeros(&mut self, mut n: u64) -> Result<()> {
        static ZERO: [u8; 64 * 1024] = [0; 64 * 1024];
        while n > 0 {
            let k = n.min(ZERO.len() as u64) as usize;
            self.out
                .write_all(&ZERO[..k])
                .map_err(|e| Error::io_plain("cannot write to the output stream", e))?;
            n -= k as u64;
        }
        Ok(())
    }
}

impl<W: Write + Send> Sink for StreamSink<W> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset < self.pos {
            return Err(Error::input(format!(
                "internal error: stream output went back from {} to {offset}",
                self.pos
            )));
        }
        self.zeros(offset - self.pos)?;
        self.out
            .write_all(data)
            .map_err(|e| Error::io_plain("cannot write to the output stream", e))?;
        self.pos = offset + data.len() as u64;
        Ok(())
    }
    fn can_seek_back(&self) -> bool {
        false
    }
    fn finish(&mut self, len: u64) -> Result<()> {
        if len > self.pos {
            self.zeros(len - self.pos)?;
            self.pos = len;
        }
        self.out
            .flush()
            .map_err(|e| Error::io_plain("cannot flush the output stream", e))
    }
}

/// Test/inspection sink: records pieces in memory (seekable).
#[derive(Debug, Default)]
pub struct MemSink {
    /// The bytes written so far.
    pub data: Vec<u8>,
}

impl Sink for MemSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let off =
            usize::try_from(offset).map_err(|_| Error::input("offset too large for memory"))?;
        let end = off + data.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[off..end].copy_from_slice(data);
        Ok(())
    }
    fn can_seek_back(&self) -> bool {
        true
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let off = offset as usize;
        let end = off + buf.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        buf.copy_from_slice(&self.data[off..end]);
        Ok(())
    }
    fn finish(&mut self, len: u64) -> Result<()> {
        self.data.resize(len as usize, 0);
        Ok(())
    }
}

struct PendingFile {
    temp: tempfile::TempPath,
    final_path: PathBuf,
}

/// Removes the temporary files of an [`OutputSet`] that is not committed yet (see [`OutputSet::remover`]).
#[derive(Clone)]
pub struct OutputRemover {
    inner: std::sync::Weak<std::sync::Mutex<OutputSetInner>>,
}

impl OutputRemover {
    /// Deletes every temporary file of the set created so far; later files of the set are not covered, so the
    /// caller exits right after.
    pub fn remove_temporaries(&self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut g = inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Dropping a TempPath deletes its file.
            g.files.clear();
        }
    }
}

/// The files of one local output.
pub struct OutputSetInner {
    dir: PathBuf,
    files: Vec<PendingFile>,
    durability: Durability,
}

/// Atomic local output: every file is created under a temporary name in the destination folder and renamed to
/// its final name by `commit`. Dropping the set without committing removes the temporary files.
pub struct OutputSet {
    inner: std::sync::Arc<std::sync::Mutex<OutputSetInner>>,
}

impl OutputSet {
    /// Prepares an output whose main file is `path`, synced before it is renamed ([`Durability::Writeback`]).
    /// Refuses when `path` is an existing directory.
    pub fn new(path: &Path) -> Result<(OutputSet, FileSink)> {
        Self::with_durability(path, Durability::Writeback)
    }

    /// As [`OutputSet::new`], with the given durability for every file of the set.
    pub fn with_durability(path: &Path, durability: Durability) -> Result<(OutputSet, FileSink)> {
        if path.is_dir() {
            return Err(Error::input(format!(
                "{} is a directory; name the output file to create",
                path.display()
            )));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Name the folder the user gave, not the hidden temporary file that could not be created in it.
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "the output folder {} does not exist",
                dir.display()
            )));
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::input(format!("{} has no file name", path.display())))?
            .to_string_lossy()
            .into_owned();
        let inner = std::sync::Arc::new(std::sync::Mutex::new(OutputSetInner {
            dir,
            files: Vec::new(),
            durability,
        }));
        let set = OutputSet { inner };
        let sink = Self::create(&set.inner, &name)?;
        Ok((set, sink))
    }

    fn create(
        inner: &std::sync::Arc<std::sync::Mutex<OutputSetInner>>,
        name: &str,
    ) -> Result<FileSink> {
        if name.contains('/') || name == ".." || name == "." || name.is_empty() {
            return Err(Error::input(format!("invalid output file name '{name}'")));
        }
        let mut g = inner
            .lock()
            .map_err(|_| Error::input("output set lock poisoned"))?;
        let dir = g.dir.clone();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".imgshift-tmp")
            // As any new file (and as qemu-img's outputs): 0666 less the umask, not tempfile's private 0600.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(&dir)
            .map_err(|e| Error::io("cannot create a temporary file in", &dir, e))?;
        let (file, temp) = tmp.into_parts();
        let path = temp.to_path_buf();
        g.files.push(PendingFile {
            temp,
            final_path: dir.join(name),
        });
        let mut sink = FileSink::new(file, path);
        sink.final_name = Some(name.to_string());
        sink.durability = g.durability;
        sink.set = Some(inner.clone());
        Ok(sink)
    }

    fn add_file(
        inner: &std::sync::Arc<std::sync::Mutex<OutputSetInner>>,
        name: &str,
    ) -> Result<Box<dyn Sink>> {
        Ok(Box::new(Self::create(inner, name)?))
    }

    /// A handle that removes this set's temporary files from another thread (the CLI's SIGINT/SIGTERM watcher),
    /// so an interrupted conversion leaves nothing behind. Files already renamed by `commit` are not touched.
    pub fn remover(&self) -> OutputRemover {
        OutputRemover {
            inner: std::sync::Arc::downgrade(&self.inner),
        }
    }

    /// Renames every file to its final name and syncs the folder.
    pub fn commit(self) -> Result<()> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| Error::input("output set lock poisoned"))?;
        let files = std::mem::take(&mut g.files);
        for f in files {
            f.temp
                .persist(&f.final_path)
                .map_err(|e| Error::io("cannot rename the output to", &f.final_path, e.error))?;
        }
        if g.durability == Durability::Writeback
            && let Ok(d) = File::open(&g.dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}
