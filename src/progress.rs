//! Progress on standard error: an indicatif bar on a terminal; with `-p` on a non-terminal (a log, CI), plain
//! lines at most every few seconds.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use imgshift_converters::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shortest time between two plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress lines for a non-terminal.
struct Lines {
    what: String,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    last: Mutex<Instant>,
}

impl Lines {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        format!(
            "imgshift: {}: {} of {} ({pct}%), {}/s",
            self.what,
            human_size(done),
            human_size(total),
            human_size((done as f64 / secs) as u64)
        )
    }
}

/// A byte-count progress display, or nothing.
pub struct Bar {
    bar: Option<ProgressBar>,
    lines: Option<Lines>,
}

impl Bar {
    /// Progress labelled `what`: a bar on a terminal (unless `quiet`), plain lines when `forced` on a
    /// non-terminal, nothing otherwise.
    pub fn new(what: &str, forced: bool, quiet: bool) -> Bar {
        Bar::build(what, forced, quiet, None)
    }

    /// Like [`Bar::new`], drawn as a line of `multi` on a terminal.
    pub fn in_multi(what: &str, forced: bool, quiet: bool, multi: Option<&MultiProgress>) -> Bar {
        Bar::build(what, forced, quiet, multi)
    }

    fn build(what: &str, forced: bool, quiet: bool, multi: Option<&MultiProgress>) -> Bar {
        if quiet {
            return Bar {
                bar: None,
                lines: None,
            };
        }
        if !std::io::stderr().is_terminal() {
            let lines = forced.then(|| Lines {
                what: what.to_string(),
                total: AtomicU64::new(0),
                done: AtomicU64::new(0),
                started: Instant::now(),
                last: Mutex::new(Instant::now()),
            });
            return Bar { bar: None, lines };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        let bar = match multi {
            Some(m) => m.add(bar),
            None => bar,
        };
        Bar {
            bar: Some(bar),
            lines: None,
        }
    }

    /// Removes the bar (or prints the last line).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(l) = &self.lines {
            eprintln!("{}", l.line());
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
        if let Some(l) = &self.lines {
            l.total.store(total, Ordering::Relaxed);
        }
    }
    fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(l) = &self.lines {
            l.done.fetch_add(n, Ordering::Relaxed);
            if let Ok(mut last) = l.last.lock()
                && last.elapsed() >= LINE_EVERY
            {
                *last = Instant::now();
                eprintln!("{}", l.line());
            }
        }
    }
}

/// Formats a byte count like qemu-img ("16 GiB").
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}
