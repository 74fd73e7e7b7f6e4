//! Ctrl-C and SIGTERM for the commands that run jobs: the first signal asks the job to stop at a safe point
//! (requests in flight finish, the journal is saved, the `resume` line is printed, exit 130 or 143); a second one
//! ends the process at once, as it would without imgshift's handler.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

/// The signal received (0: none).
fn received_signal() -> &'static Arc<AtomicUsize> {
    static S: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    S.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// Whether a signal was received (arms the default action for the next one).
fn armed() -> &'static Arc<AtomicBool> {
    static A: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    A.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// A job stopped by a signal at a safe point.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}", if *.signal == SIGTERM { "SIGTERM" } else { "SIGINT (Ctrl-C)" })]
pub struct Interrupted {
    /// The signal's number.
    pub signal: i32,
}

impl Interrupted {
    /// The exit code a shell expects after this signal (128 + its number: 130, 143).
    pub fn exit_code(&self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(130)
    }
}

/// Installs the handlers (once per process; later calls do nothing).
pub fn install() -> anyhow::Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    for sig in [SIGINT, SIGTERM] {
        // Registered first: with the flag already set, the default action (the process ends).
        signal_hook::flag::register_conditional_default(sig, Arc::clone(armed()))?;
        signal_hook::flag::register_usize(sig, Arc::clone(received_signal()), sig as usize)?;
        signal_hook::flag::register(sig, Arc::clone(armed()))?;
    }
    let _ = DONE.set(());
    Ok(())
}

/// `Err` once SIGINT or SIGTERM arrived.
pub fn check() -> Result<(), Interrupted> {
    match received_signal().load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(Interrupted {
            signal: i32::try_from(n).unwrap_or(SIGINT),
        }),
    }
}
