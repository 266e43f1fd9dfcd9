//! /proc/PID/limits (prlimit() on another uid's task fails here without CAP_SYS_RESOURCE).

use super::{parse_err, read_text};
use crate::error::Result;

/// One resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// RLIMIT_* number.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

const NAMES: [(&str, u32); 16] = [
    ("Max cpu time", libc::RLIMIT_CPU),
    ("Max file size", libc::RLIMIT_FSIZE),
    ("Max data size", libc::RLIMIT_DATA),
    ("Max stack size", libc::RLIMIT_STACK),
    ("Max core file size", libc::RLIMIT_CORE),
    ("Max resident set", libc::RLIMIT_RSS),
    ("Max processes", libc::RLIMIT_NPROC),
    ("Max open files", libc::RLIMIT_NOFILE),
    ("Max locked memory", libc::RLIMIT_MEMLOCK),
    ("Max address space", libc::RLIMIT_AS),
    ("Max file locks", libc::RLIMIT_LOCKS),
    ("Max pending signals", libc::RLIMIT_SIGPENDING),
    ("Max msgqueue size", libc::RLIMIT_MSGQUEUE),
    ("Max nice priority", libc::RLIMIT_NICE),
    ("Max realtime priority", libc::RLIMIT_RTPRIO),
    ("Max realtime timeout", libc::RLIMIT_RTTIME),
];

/// Parses the text of /proc/PID/limits.
pub fn parse_limits(path: &str, text: &str) -> Result<Vec<Limit>> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let Some((name, resource)) = NAMES.iter().find(|(n, _)| line.starts_with(n)) else {
            continue;
        };
        let mut cols = line[name.len()..].split_whitespace();
        let value = |v: Option<&str>| -> Result<u64> {
            match v {
                Some("unlimited") => Ok(u64::MAX),
                Some(v) => v
                    .parse()
                    .map_err(|_| parse_err(path, format!("bad value for {name}"))),
                None => Err(parse_err(path, format!("missing value for {name}"))),
            }
        };
        let soft = value(cols.next())?;
        let hard = value(cols.next())?;
        out.push(Limit {
            resource: *resource,
            soft,
            hard,
        });
    }
    if out.len() != NAMES.len() {
        return Err(parse_err(
            path,
            format!("found {} of {} limits", out.len(), NAMES.len()),
        ));
    }
    Ok(out)
}

/// Reads /proc/PID/limits.
pub fn read_limits(pid: i32) -> Result<Vec<Limit>> {
    let path = format!("/proc/{pid}/limits");
    parse_limits(&path, &read_text(&path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_own_limits() {
        let l = read_limits(std::process::id() as i32).unwrap();
        assert_eq!(l.len(), 16);
        let nofile = l
            .iter()
            .find(|l| l.resource == libc::RLIMIT_NOFILE)
            .unwrap();
        assert!(nofile.soft <= nofile.hard);
    }

    #[test]
    fn parses_unlimited() {
        let mut text = String::from("Limit Soft Limit Hard Limit Units\n");
        for (n, _) in NAMES {
            text.push_str(&format!(
                "{n:<26}unlimited            4096                 x\n"
            ));
        }
        let l = parse_limits("limits", &text).unwrap();
        assert_eq!(l[0].soft, u64::MAX);
        assert_eq!(l[0].hard, 4096);
    }
}
