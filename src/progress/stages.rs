//! How a job shows its stages: on a terminal one line per stage (a spinner while it runs, then its time and
//! result) plus a bytes bar with rate and ETA (indicatif MultiProgress); elsewhere plain `imgshift:` lines, the
//! bytes ones every few seconds; nothing with `--quiet`. An upload job (`upload aws|azure`) shows only its bytes
//! bar ([`StageUi::bars_only`]): its stage lines come with `--verbose`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Bar;

/// The stage display of one run.
pub struct StageUi {
    multi: Option<MultiProgress>,
    quiet: bool,
    count: usize,
    /// Print stage lines (migrate; an upload's only with --verbose).
    lines: bool,
    /// Plain progress lines on a non-terminal.
    plain_bars: bool,
}

/// A stage being shown.
pub struct StageLine {
    spinner: Option<ProgressBar>,
    label: String,
}

impl StageUi {
    /// A display for `count` stages.
    pub fn new(quiet: bool, count: usize) -> StageUi {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        StageUi {
            multi,
            quiet,
            count,
            lines: true,
            plain_bars: true,
        }
    }

    /// A display of bytes bars only (on a terminal, or elsewhere with `progress`), and stage lines only when
    /// `verbose`.
    pub fn bars_only(quiet: bool, count: usize, progress: bool, verbose: bool) -> StageUi {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        StageUi {
            multi,
            quiet,
            count,
            lines: verbose,
            plain_bars: progress,
        }
    }

    fn label(&self, index: usize, name: &str) -> String {
        format!("[{}/{}] {name}", index + 1, self.count)
    }

    /// Shows stage `index` as running.
    pub fn begin(&self, index: usize, name: &str) -> StageLine {
        let label = self.label(index, name);
        if !self.lines {
            return StageLine {
                spinner: None,
                label,
            };
        }
        let spinner = match &self.multi {
            Some(m) => {
                let p = m.add(ProgressBar::new_spinner());
                p.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                p.set_message(label.clone());
                p.enable_steady_tick(Duration::from_millis(120));
                Some(p)
            }
            None => {
                if !self.quiet {
                    eprintln!("imgshift: {label}: started");
                }
                None
            }
        };
        StageLine { spinner, label }
    }

    /// Shows the stage as finished after `secs` with `detail`.
    pub fn end(&self, line: StageLine, secs: f64, detail: &str) {
        let text = format!("{}: done in {secs:.1} s: {detail}", line.label);
        match line.spinner {
            Some(p) => {
                p.set_style(
                    ProgressStyle::with_template("{msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                p.finish_with_message(format!("✓ {text}"));
            }
            None => {
                if !self.quiet && self.lines {
                    eprintln!("imgshift: {text}");
                }
            }
        }
    }

    /// Shows the stage as failed.
    pub fn fail(&self, line: StageLine) {
        if let Some(p) = line.spinner {
            p.set_style(
                ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            p.finish_with_message(format!("✗ {}: failed", line.label));
        }
    }

    /// Shows a stage a previous run of the job finished.
    pub fn skipped(&self, index: usize, name: &str, detail: &str) {
        self.note(&format!(
            "{}: done by an earlier run: {detail}",
            self.label(index, name)
        ));
    }

    /// Whether each stage's line is shown (`migrate`; an upload's only with `--verbose`).
    pub fn stage_lines(&self) -> bool {
        self.lines
    }

    /// A line of text above the bars.
    pub fn note(&self, msg: &str) {
        if self.quiet || !self.lines {
            return;
        }
        self.say(msg);
    }

    /// A line of text above the bars, shown even when stage lines are not (unless `--quiet`).
    pub fn say(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(format!("imgshift: {msg}"));
            }
            None => eprintln!("imgshift: {msg}"),
        }
    }

    /// A bytes bar for the running stage (plain lines every few seconds on a non-terminal).
    pub fn bar(&self, what: &str) -> Bar {
        Bar::in_multi(what, self.plain_bars, self.quiet, self.multi.as_ref())
    }
}
