//! Progress bars for the commands that can run long (`eval`, `sample`, `grad`, validation in
//! `train`): on stderr, with elapsed time and ETA, and only once the work has run for a second,
//! so that quick commands print nothing but their result.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long work runs before its bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// A bar over `len` units of work that stays hidden for its first second (and always when
/// `enabled` is false, or stderr is not a terminal).
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    enabled: bool,
    shown: Cell<bool>,
}

impl Progress {
    /// `what` names the work (`evaluating`, `sampling`) and `unit` what is counted.
    pub fn new(len: u64, what: &str, unit: &str, enabled: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        let template = format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed_precise}} (ETA {{eta}}) {{msg}}"
        );
        bar.set_style(
            ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Progress {
            bar,
            started: Instant::now(),
            enabled,
            shown: Cell::new(false),
        }
    }

    /// A bar that never shows (library calls, tests).
    pub fn hidden() -> Progress {
        Progress::new(0, "", "", false)
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.show_when_due();
    }

    /// A word on the unit in progress (`layer 12`).
    pub fn set_message(&self, message: String) {
        self.bar.set_message(message);
        self.show_when_due();
    }

    fn show_when_due(&self) {
        if self.enabled && !self.shown.get() && self.started.elapsed() >= SHOW_AFTER {
            self.shown.set(true);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    /// Remove the bar (the result is printed after it).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Whether the bar has appeared (it appears after [`SHOW_AFTER`] of work).
    pub fn shown(&self) -> bool {
        self.shown.get()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_appears_only_after_a_second_of_work_and_only_when_enabled() {
        let quick = Progress::new(10, "evaluating", "examples", true);
        quick.inc(5);
        assert!(!quick.shown());
        let slow = Progress::new(10, "evaluating", "examples", true);
        let off = Progress::new(10, "evaluating", "examples", false);
        std::thread::sleep(SHOW_AFTER + Duration::from_millis(20));
        slow.inc(1);
        off.inc(1);
        assert!(slow.shown());
        assert!(!off.shown());
    }
}
