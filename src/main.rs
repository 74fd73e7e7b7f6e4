//! imgshift: move virtual machine disks between formats and clouds.

/// `println!` that returns the write error instead of panicking: a reader that closed the pipe
/// (`imgshift info IMG | head -1`) ends the command quietly through `main` (see [`closed_pipe`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!("{}\n", format_args!($($arg)*)))?
    };
}

mod cli;
mod commands;
mod generalize;
mod guest;
mod interrupt;
mod job;
mod journal;
mod open;
mod progress;
mod replica;
mod replicate;
mod runner;
mod sources;
mod target_kind;
mod targets;

use std::process::ExitCode;

use clap::Parser;

/// A usage error found after parsing (an unknown `-O` format, an option that does not fit the format): exit
/// code 2, as clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit status when a printing command's reader went away (`imgshift info IMG | head -1`): 0, as ripgrep
/// does, so that `set -o pipefail` scripts do not fail because `head` had what it needed. Nothing is printed.
const EXIT_CLOSED_PIPE: u8 = 0;

/// True when the error is a write to a pipe whose reader went away.
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<imgshift_converters::Error>()
            .is_some_and(|e| e.is_broken_pipe())
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A printing command whose reader closed the pipe ends quietly (`convert ... -` turns a closed
            // pipe into its own error first, which says so).
            if closed_pipe(&e) {
                return ExitCode::from(EXIT_CLOSED_PIPE);
            }
            commands::report(&e);
            if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) {
                return ExitCode::from(2);
            }
            // A job stopped by Ctrl-C or SIGTERM exits as the shell expects (130, 143).
            match e.downcast_ref::<interrupt::Interrupted>().or_else(|| {
                e.chain()
                    .find_map(|c| c.downcast_ref::<interrupt::Interrupted>())
            }) {
                Some(i) => ExitCode::from(i.exit_code()),
                None => ExitCode::from(1),
            }
        }
    }
}
