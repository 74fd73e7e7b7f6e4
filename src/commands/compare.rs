//! `imgshift compare`: content comparison with qemu-img's exit codes (0 same, 1 differ, 2 error).

use std::path::Path;

use anyhow::{Context, Result};
use imgshift_converters::compare;

use super::open_image;
use crate::cli::TrustArgs;
use crate::progress::Bar;

/// Runs `compare`.
pub fn run(
    a: &Path,
    b: &Path,
    fa: Option<&str>,
    fb: Option<&str>,
    strict: bool,
    progress: bool,
    trust: &TrustArgs,
) -> Result<u8> {
    let inner = || -> Result<u8> {
        let sa = open_image(a, fa, trust)?;
        let sb = open_image(b, fb, trust)?;
        if strict && sa.virtual_size() != sb.virtual_size() {
            outln!("Strict mode: Image size mismatch!");
            return Ok(1);
        }
        if sa.virtual_size() != sb.virtual_size() {
            // As qemu-img: the longer image's tail must read as zeros for the images to be identical.
            outln!("Warning: Image size mismatch!");
        }
        let bar = Bar::new("compare", progress, !progress);
        let r = compare(sa.as_ref(), sb.as_ref(), &bar).context("cannot compare")?;
        bar.finish();
        match r {
            None => {
                outln!("Images are identical.");
                Ok(0)
            }
            Some(off) => {
                outln!("Content mismatch at offset {off}!");
                Ok(1)
            }
        }
    };
    inner().or_else(|e| {
        // A closed pipe ends quietly in `main`.
        if crate::closed_pipe(&e) {
            return Err(e);
        }
        super::report(&e);
        Ok(2)
    })
}
