//! Ctrl-C (SIGINT) and SIGTERM, in the two ways imgshift's commands need them:
//! - Commands that write local files ([`on_signal`], [`remove_on_signal`]): the temporary outputs registered here
//!   are removed and the process exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed by
//!   them.
//! - Commands that run jobs ([`install`], [`check`]): the first signal asks the job to stop at a safe point
//!   (requests in flight finish, the journal is saved, the `resume` line is printed, exit 130 or 143); a second
//!   one ends the process at once, as it would without imgshift's handler.
//!
//! A process uses one or the other: a job's outputs are on the target, a local command's in its folder.

use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::sync::{Mutex, Once};

/// Exit status after SIGINT (128 + 2).
pub const EXIT_SIGINT: i32 = 130;
/// Exit status after SIGTERM (128 + 15).
pub const EXIT_SIGTERM: i32 = 143;

type Cleanup = Box<dyn Fn() + Send>;

/// What to undo when a signal arrives, in registration order.
static CLEANUPS: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Runs `cleanup` (then exits 130 or 143) if SIGINT or SIGTERM arrives from now on. The handlers are installed
/// before this returns.
pub fn on_signal(cleanup: impl Fn() + Send + 'static) {
    CLEANUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Box::new(cleanup));
    INSTALL.call_once(install_cleanup_thread);
}

/// Creates a local output ([`imgshift_converters::OutputSet`]) whose temporary files are removed on
/// SIGINT/SIGTERM. The handlers are installed first and the cleanup list is held while the file is created, so
/// a signal arriving in between waits for the registration instead of leaving the file behind.
pub fn output_set(
    path: &std::path::Path,
    durability: imgshift_converters::Durability,
) -> imgshift_converters::Result<(
    imgshift_converters::OutputSet,
    imgshift_converters::FileSink,
)> {
    INSTALL.call_once(install_cleanup_thread);
    let mut cleanups = CLEANUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (set, sink) = imgshift_converters::OutputSet::with_durability(path, durability)?;
    let r = set.remover();
    cleanups.push(Box::new(move || r.remove_temporaries()));
    Ok((set, sink))
}

/// A thread that waits for the signals; a signal runs every cleanup and ends the process.
fn install_cleanup_thread() {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("imgshift-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                let _ = ready_tx.send(());
                let code = tokio::select! {
                    _ = int.recv() => EXIT_SIGINT,
                    _ = term.recv() => EXIT_SIGTERM,
                };
                let cleanups = CLEANUPS
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for c in cleanups.iter() {
                    c();
                }
                eprintln!("imgshift: interrupted; the unfinished output was removed");
                std::process::exit(code);
            });
        });
    if spawned.is_ok() {
        // Handlers are in place before the work starts (or the thread gave up).
        let _ = ready_rx.recv();
    }
}

// --- Jobs: a cooperative stop at a safe point. ---

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

/// Installs the job handlers (once per process; later calls do nothing).
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

/// A flag that turns true at the first SIGINT or SIGTERM once [`install`] ran (for code that polls a flag).
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::clone(armed())
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
