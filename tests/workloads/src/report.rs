//! Collects check failures into one `FAIL` line.

use std::fmt::Debug;

/// At most this many failure messages are printed; the rest are counted.
const MAX_SHOWN: usize = 24;

/// The failures found by one check.
#[derive(Debug, Default)]
pub struct Report {
    fails: Vec<String>,
    infos: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a failure.
    pub fn fail(&mut self, msg: impl Into<String>) {
        self.fails.push(msg.into());
    }

    /// Records a failure `msg` unless `cond` holds.
    pub fn ensure(&mut self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fails.push(msg());
        }
    }

    /// Records `"<what>: expected <e>, got <g>"` unless equal.
    pub fn eq<T: PartialEq + Debug>(&mut self, what: &str, expected: T, got: T) {
        if expected != got {
            self.fails
                .push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }

    /// Like [`Report::eq`], printing the values in hex.
    pub fn eq_hex<T: PartialEq + std::fmt::LowerHex>(&mut self, what: &str, expected: T, got: T) {
        if expected != got {
            self.fails
                .push(format!("{what}: expected {expected:#x}, got {got:#x}"));
        }
    }

    /// Unwraps `r`, recording the error as a failure.
    pub fn ok<T>(&mut self, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fails.push(e);
                None
            }
        }
    }

    /// Adds an informational note, printed as an `INFO` line before `PASS`/`FAIL`.
    pub fn info(&mut self, msg: impl Into<String>) {
        self.infos.push(msg.into());
    }

    /// True if nothing failed.
    pub fn passed(&self) -> bool {
        self.fails.is_empty()
    }

    /// The number of failures.
    pub fn failures(&self) -> usize {
        self.fails.len()
    }

    /// The informational notes.
    pub fn infos(&self) -> &[String] {
        &self.infos
    }

    /// The text after `FAIL <name>: `, on one line.
    pub fn fail_text(&self) -> String {
        let mut s = String::new();
        for (i, f) in self.fails.iter().take(MAX_SHOWN).enumerate() {
            if i > 0 {
                s.push_str("; ");
            }
            s.push_str(f);
        }
        if self.fails.len() > MAX_SHOWN {
            s.push_str(&format!("; ... and {} more", self.fails.len() - MAX_SHOWN));
        }
        one_line(&s)
    }
}

/// Replaces line breaks so a message stays on one protocol line.
pub fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}
