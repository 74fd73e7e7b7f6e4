//! Upload targets. Each consumes the converter engine's output of the source's virtual disk contents.

pub mod aws;
pub mod azure;
