//! imgshift: move virtual machine disks between formats and clouds.

mod cli;
mod commands;
mod generalize;
mod guest;
mod journal;
mod migrate;
mod open;
mod progress;
mod targets;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Writing to a closed pipe (e.g. `imgshift convert ... - | head`) is not an error worth a message.
            if e.chain().any(|c| {
                c.downcast_ref::<imgshift_converters::Error>()
                    .is_some_and(|e| e.is_broken_pipe())
                    || c.downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::from(1);
            }
            commands::report(&e);
            ExitCode::from(1)
        }
    }
}
