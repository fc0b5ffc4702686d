//! Progress of long runs (simulate, replay, reprice, produce) on a
//! terminal: done/total, rate and ETA on one line of stderr, redrawn at most
//! five times a second. When stderr is not a terminal it prints nothing, so
//! logs and pipes stay clean.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// What is being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of input (shown in MB/s).
    Bytes,
    /// Things (events, records), named.
    Items(&'static str),
}

/// A progress line.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    unit: Unit,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
    drawn: bool,
}

impl Progress {
    /// A progress line for `total` units of work (0: unknown).
    pub fn new(label: impl Into<String>, total: u64, unit: Unit) -> Progress {
        Progress::with_terminal(label, total, unit, std::io::stderr().is_terminal())
    }

    /// As [`Progress::new`], saying whether to draw.
    pub fn with_terminal(label: impl Into<String>, total: u64, unit: Unit, tty: bool) -> Progress {
        Progress {
            label: label.into(),
            total,
            unit,
            started: Instant::now(),
            last_draw: None,
            tty,
            drawn: false,
        }
    }

    /// The line for `done` units after `elapsed`.
    pub fn line(&self, done: u64, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if self.total > done && rate > 0.0 {
            format!("ETA {}", human_secs((self.total - done) as f64 / rate))
        } else {
            String::new()
        };
        let pct = if self.total > 0 {
            format!("{:5.1}%  ", 100.0 * done.min(self.total) as f64 / self.total as f64)
        } else {
            String::new()
        };
        match self.unit {
            Unit::Bytes => format!(
                "{}  {pct}{:.1}/{:.1} MB  {:.1} MB/s  {eta}",
                self.label,
                done as f64 / 1e6,
                self.total as f64 / 1e6,
                rate / 1e6
            ),
            Unit::Items(what) => format!(
                "{}  {pct}{done}/{} {what}  {:.0}/s  {eta}",
                self.label, self.total, rate
            ),
        }
    }

    /// Sets the total (when it is known only once work has started).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Reports `done` units; redraws if due.
    pub fn set(&mut self, done: u64) {
        if !self.tty {
            return;
        }
        let now = Instant::now();
        if self
            .last_draw
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(200))
        {
            return;
        }
        self.last_draw = Some(now);
        self.drawn = true;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[2K{}", self.line(done, self.started.elapsed()));
        let _ = e.flush();
    }

    /// Ends the line (if one was drawn).
    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            eprintln!();
        }
        self.drawn = false;
    }
}

fn human_secs(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_share_rate_and_eta() {
        let p = Progress::with_terminal("replay", 1000, Unit::Items("events"), false);
        let l = p.line(250, Duration::from_secs(5));
        assert!(l.contains(" 25.0%"), "{l}");
        assert!(l.contains("250/1000 events"), "{l}");
        assert!(l.contains("50/s"), "{l}");
        assert!(l.contains("ETA 15s"), "{l}");
        let b = Progress::with_terminal("read", 10_000_000, Unit::Bytes, false);
        assert!(b.line(5_000_000, Duration::from_secs(2)).contains("2.5 MB/s"));
        assert_eq!(human_secs(3725.0), "1h02m");
    }
}
