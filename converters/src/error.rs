//! The one error type of the converters library: a kind, context (path, format, offset, field) and a source.

use std::path::PathBuf;

/// What went wrong, coarsely; callers branch on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused or failed an I/O call.
    Io,
    /// The bytes are not a valid image of the expected format.
    InvalidFormat,
    /// The image is valid but uses a feature imgshift does not handle.
    Unsupported,
    /// The image's metadata is internally inconsistent (points outside the file, overlaps, bad checksum).
    Corrupt,
    /// A file named inside an image was refused by the open gate.
    Denied,
    /// A resource bound was hit (table size, chain depth, extent count).
    Limit,
    /// The caller asked for something invalid (bad option, out-of-range offset).
    InvalidInput,
}

/// A library error: one line of text with its context.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// Kept for `is_broken_pipe`; its text is already part of `message`, so it is not exposed as a source.
    io: Option<std::io::Error>,
    /// A file the open gate refused for lying outside the folders it trusts (see `is_untrusted`).
    untrusted: bool,
}

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            io: None,
            untrusted: false,
        }
    }
    /// The image is not valid `format`: `what`.
    pub fn invalid(format: &str, what: impl std::fmt::Display) -> Self {
        Error::new(
            ErrorKind::InvalidFormat,
            format!("invalid {format} image: {what}"),
        )
    }
    /// The image's metadata is inconsistent.
    pub fn corrupt(format: &str, what: impl std::fmt::Display) -> Self {
        Error::new(
            ErrorKind::Corrupt,
            format!("corrupt {format} image: {what}"),
        )
    }
    /// A feature is not supported.
    pub fn unsupported(format: &str, what: impl std::fmt::Display) -> Self {
        Error::new(
            ErrorKind::Unsupported,
            format!("unsupported {format} image: {what}"),
        )
    }
    /// A resource bound was hit.
    pub fn limit(format: &str, what: impl std::fmt::Display) -> Self {
        Error::new(
            ErrorKind::Limit,
            format!("{format} image exceeds a limit: {what}"),
        )
    }
    /// A path named in an image was refused.
    pub fn denied(what: impl std::fmt::Display) -> Self {
        Error::new(ErrorKind::Denied, what.to_string())
    }
    /// A file named in an image was refused because it lies outside the folders the open gate trusts (kind
    /// `Denied`): trusting the folder that holds it ([`crate::OpenGate::allow_dir`]) would open it.
    pub fn untrusted(what: impl std::fmt::Display) -> Self {
        Error {
            untrusted: true,
            ..Error::new(ErrorKind::Denied, what.to_string())
        }
    }
    /// Marks this error as caused (in part) by an [`Error::untrusted`] refusal, when `yes`: for an error
    /// gathered from several attempts, one of which was refused for lying outside the trusted folders.
    pub(crate) fn marked_untrusted(mut self, yes: bool) -> Self {
        self.untrusted |= yes;
        self
    }
    /// True for an [`Error::untrusted`] refusal (also after `context`): what a caller turns into its own hint
    /// (the CLI names its `--allow-dir` flag).
    pub fn is_untrusted(&self) -> bool {
        self.untrusted
    }
    /// The caller passed something invalid.
    pub fn input(what: impl std::fmt::Display) -> Self {
        Error::new(ErrorKind::InvalidInput, what.to_string())
    }
    /// An I/O error during `op` on `path`.
    pub fn io(op: &str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        Error {
            kind: ErrorKind::Io,
            message: format!("{op} {}: {source}", path.display()),
            io: Some(source),
            untrusted: false,
        }
    }
    /// An I/O error without a path (streams).
    pub fn io_plain(op: &str, source: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: format!("{op}: {source}"),
            io: Some(source),
            untrusted: false,
        }
    }
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// Prefix the message with context, keeping the kind.
    pub fn context(mut self, ctx: impl std::fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
    /// True when the underlying I/O error is a broken pipe (reader of stdout went away).
    pub fn is_broken_pipe(&self) -> bool {
        self.io
            .as_ref()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Checked arithmetic helpers for header values: each failure is a `Corrupt` error naming the field.
pub trait CheckedExt: Sized {
    /// `self + rhs`, or an overflow error naming `what`.
    fn add_or(self, rhs: Self, format: &str, what: &str) -> Result<Self>;
    /// `self * rhs`, or an overflow error naming `what`.
    fn mul_or(self, rhs: Self, format: &str, what: &str) -> Result<Self>;
}

impl CheckedExt for u64 {
    fn add_or(self, rhs: u64, format: &str, what: &str) -> Result<u64> {
        self.checked_add(rhs)
            .ok_or_else(|| Error::corrupt(format, format!("{what} overflows")))
    }
    fn mul_or(self, rhs: u64, format: &str, what: &str) -> Result<u64> {
        self.checked_mul(rhs)
            .ok_or_else(|| Error::corrupt(format, format!("{what} overflows")))
    }
}
