//! imgshift-converters: the conversion engine and one reader + planned writer per disk image format.
//!
//! Readers implement [`DiskSource`] (virtual size, allocation map, positional reads); writers implement
//! [`FormatWriter`] (plan from the allocation map, then emit in file order into a [`Sink`]). The engine
//! ([`engine::convert`]) connects the two with bounded parallel reads. Files named inside images are opened only
//! through the [`OpenGate`].
#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod extent;
pub mod formats;
pub mod gate;
pub mod sink;
pub mod source;
pub mod storage;
pub mod writer;

pub use engine::{ConvertOptions, ConvertStats, NoProgress, Progress, compare, convert};
pub use error::{Error, ErrorKind, Result};
pub use extent::{Extent, ExtentKind, ExtentMap};
pub use formats::{Format, create_writer, open, open_path, writer_compresses, writer_options};
pub use gate::OpenGate;
pub use sink::{Durability, FileSink, MemSink, OutputRemover, OutputSet, Sink, StreamSink};
pub use source::{CheckReport, DiskSource, HostExtent, ImageInfo, resolved_extents};
pub use storage::{FileStorage, MemStorage, SliceStorage, Storage};
pub use writer::{ChunkCompressor, FormatWriter, OptionKind, OptionSpec, Plan, Run, WriterOptions};
