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
            println!("Strict mode: Image size mismatch!");
            return Ok(1);
        }
        let bar = Bar::new("compare", progress, !progress);
        let r = compare(sa.as_ref(), sb.as_ref(), &bar).context("cannot compare")?;
        bar.finish();
        match r {
            None => {
                println!("Images are identical.");
                Ok(0)
            }
            Some(off) => {
                println!("Content mismatch at offset {off}!");
                Ok(1)
            }
        }
    };
    inner().or_else(|e| {
        super::report(&e);
        Ok(2)
    })
}
