//! Printing results: human text or one JSON document (`--json`), and progress bars.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    out(&format!("{}\n", serde_json::to_string_pretty(value)?));
    Ok(())
}

/// A byte-progress bar on stderr, or a hidden one when stderr is not a terminal or JSON
/// output was asked for.
pub fn progress_bar(json: bool, msg: &'static str) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}

/// A progress report (bytes done, bytes to do) that moves `bar`.
pub fn follow(bar: &ProgressBar) -> impl Fn(u64, u64) + Sync + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

/// Milliseconds with three decimals from microseconds.
pub fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Writes to standard output. A closed pipe (`stasis image inspect X | head`) ends stasis
/// quietly with the shell's usual 141 instead of a panic; other errors are reported.
/// (SIGPIPE stays ignored: it must never kill stasis while it holds a process stopped.)
pub fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("stasis: writing output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`out`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::report::out(&format!("{}\n", format_args!($($t)*)))
    };
}
