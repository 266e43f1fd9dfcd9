//! /proc/PID/timers: the process's POSIX timers.

use super::{parse_err, read_text};
use crate::error::Result;

/// One timer as /proc/PID/timers shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerInfo {
    pub id: i32,
    pub signo: i32,
    pub sigval: u64,
    /// SIGEV_* notification, with SIGEV_THREAD_ID (4) set when aimed at a thread.
    pub notify: i32,
    pub notify_pid: i32,
    pub clock_id: i32,
}

/// Parses the text of /proc/PID/timers.
pub fn parse_timers(path: &str, text: &str) -> Result<Vec<TimerInfo>> {
    let mut out: Vec<TimerInfo> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || parse_err(path, format!("bad {key} line {line:?}"));
        if key == "ID" {
            out.push(TimerInfo {
                id: value.parse().map_err(|_| bad())?,
                ..Default::default()
            });
            continue;
        }
        let t = out
            .last_mut()
            .ok_or_else(|| parse_err(path, "field before ID"))?;
        match key {
            "signal" => {
                let (sig, val) = value.split_once('/').ok_or_else(bad)?;
                t.signo = sig.parse().map_err(|_| bad())?;
                t.sigval = u64::from_str_radix(val, 16).map_err(|_| bad())?;
            }
            "notify" => {
                let (how, who) = value.split_once('/').ok_or_else(bad)?;
                let base = match how {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => return Err(bad()),
                };
                let (kind, pid) = who.split_once('.').ok_or_else(bad)?;
                t.notify = base
                    | if kind == "tid" {
                        libc::SIGEV_THREAD_ID
                    } else {
                        0
                    };
                t.notify_pid = pid.parse().map_err(|_| bad())?;
            }
            "ClockID" => t.clock_id = value.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(out)
}

/// Reads /proc/PID/timers.
pub fn read_timers(pid: i32) -> Result<Vec<TimerInfo>> {
    let path = format!("/proc/{pid}/timers");
    parse_timers(&path, &read_text(&path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timers() {
        let text = "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.77\nClockID: 1\n\
                    ID: 2\nsignal: 40/000000000000004d\nnotify: signal/tid.78\nClockID: 0\n";
        let t = parse_timers("timers", text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].id, t[0].signo, t[0].clock_id), (0, 14, 1));
        assert_eq!(t[1].sigval, 0x4d);
        assert_eq!(t[1].notify, libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID);
        assert_eq!(t[1].notify_pid, 78);
        assert!(parse_timers("timers", "signal: 1/0\n").is_err());
    }
}
