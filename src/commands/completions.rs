//! `imgshift completions SHELL` and `imgshift man`: generated from the same clap definitions as the parser
//! (clap_complete, clap_mangen), so they never disagree with it.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::Cli;

fn print(bytes: &[u8]) -> Result<u8> {
    // A closed pipe (`| head`) comes back as an error the caller treats quietly, never as a panic.
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(0)
}

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Result<u8> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "imgshift", &mut buf);
    print(&buf)
}

/// Prints the manual page as roff.
pub fn man() -> Result<u8> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
    print(&buf)
}
