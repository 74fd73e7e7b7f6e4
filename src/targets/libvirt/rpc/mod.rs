//! A client of libvirt's RPC protocol in Rust: XDR messages over the daemon's UNIX socket (or over `ssh`
//! running `virt-ssh-helper`), for exactly the calls imgshift makes. No libvirt library is linked or needed.
//!
//! - [`xdr`]: the XDR codec, with every length from the daemon bounded.
//! - [`packet`]: message framing (length, header, payload).
//! - [`proto`]: program, procedure and error numbers, and the structures calls exchange.
//! - [`uri`]: which socket or `ssh` command a connection URI means.
//! - [`client`]: the connection: one reader thread routes replies and stream data to the callers by serial.
//! - [`stream`]: upload and download streams, holes included (sparse streams).
//! - [`api`]: connections, pools, volumes and domains, with the methods imgshift uses.

pub mod api;
pub mod client;
pub mod packet;
pub mod proto;
pub mod stream;
pub mod uri;
pub mod xdr;

pub use api::{Connect, Domain, StoragePool, StorageVol};
pub use proto::RemoteError;

/// An error of a libvirt call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon refused or failed the call (its `remote_error`).
    #[error("{}", .0.message)]
    Remote(RemoteError),
    /// The connection could not be set up (socket, `ssh`, authentication, URI).
    #[error("{0}")]
    Connect(String),
    /// The connection broke.
    #[error("the connection to libvirt was lost: {0}")]
    Closed(String),
    /// The daemon sent something this client does not understand.
    #[error("libvirt protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// libvirt's error code (`virErrorNumber`), for errors the daemon returned.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Remote(r) => Some(r.code),
            _ => None,
        }
    }

    /// True when the daemon said the domain, pool or volume looked up does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.code(),
            Some(
                proto::codes::NO_DOMAIN
                    | proto::codes::NO_STORAGE_POOL
                    | proto::codes::NO_STORAGE_VOL
            )
        )
    }
}

impl From<xdr::XdrError> for Error {
    fn from(e: xdr::XdrError) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;
