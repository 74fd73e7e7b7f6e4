//! Ctrl-C (SIGINT) and SIGTERM for commands that write local files: the temporary outputs registered here are
//! removed and the process exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed by them.

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
    INSTALL.call_once(install);
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
    INSTALL.call_once(install);
    let mut cleanups = CLEANUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (set, sink) = imgshift_converters::OutputSet::with_durability(path, durability)?;
    let r = set.remover();
    cleanups.push(Box::new(move || r.remove_temporaries()));
    Ok((set, sink))
}

/// A thread that waits for the signals; a signal runs every cleanup and ends the process.
fn install() {
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
