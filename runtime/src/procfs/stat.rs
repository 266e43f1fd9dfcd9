//! /proc/PID/stat.

use super::{parse_err, read_text};
use crate::error::Result;

/// The fields of /proc/PID/stat that stasis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub nice: i64,
    pub num_threads: u64,
    /// Clock ticks after boot at which the process started: with the PID, it names one
    /// process for good (a PID alone may be reused).
    pub starttime: u64,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// The status wait(2) reports (for a zombie).
    pub exit_code: u64,
}

/// Parses the text of /proc/PID/stat. The comm field may contain spaces and parentheses,
/// so fields are counted from the last ')'.
pub fn parse_stat(path: &str, text: &str) -> Result<Stat> {
    let open = text.find('(').ok_or_else(|| parse_err(path, "no '('"))?;
    let close = text.rfind(')').ok_or_else(|| parse_err(path, "no ')'"))?;
    if close < open {
        return Err(parse_err(path, "')' before '('"));
    }
    let pid = text[..open]
        .trim()
        .parse()
        .map_err(|_| parse_err(path, "bad pid"))?;
    let comm = text[open + 1..close].to_string();
    // fields[0] is field 3 (state) of proc(5).
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let num = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .ok_or_else(|| parse_err(path, format!("missing field {n}")))?
            .parse::<i64>()
            .map(|v| v as u64)
            .map_err(|_| parse_err(path, format!("bad field {n}")))
    };
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| parse_err(path, "missing state"))?;
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: num(4)? as i32,
        pgrp: num(5)? as i32,
        session: num(6)? as i32,
        nice: num(19)? as i64,
        num_threads: num(20)?,
        starttime: num(22)?,
        start_code: num(26)?,
        end_code: num(27)?,
        start_stack: num(28)?,
        start_data: num(45)?,
        end_data: num(46)?,
        start_brk: num(47)?,
        arg_start: num(48)?,
        arg_end: num(49)?,
        env_start: num(50)?,
        env_end: num(51)?,
        exit_code: num(52)?,
    })
}

/// Reads /proc/PID/stat.
pub fn read_stat(pid: i32) -> Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    parse_stat(&path, &read_text(&path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_parens_and_spaces() {
        let text = "4242 (a (b) c) S 1 4242 4242 34816 4242 4194560 110 0 0 0 0 0 0 0 20 0 1 0 \
                    555 8654848 230 18446744073709551615 94000000000000 94000000010000 \
                    140720000000000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94000000020000 \
                    94000000021000 94000000030000 140720000001000 140720000001100 \
                    140720000001100 140720000002000 0\n";
        let s = parse_stat("stat", text).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "a (b) c");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.num_threads, 1);
        assert_eq!(s.start_code, 94000000000000);
        assert_eq!(s.start_brk, 94000000030000);
        assert_eq!(s.env_end, 140720000002000);
    }

    #[test]
    fn rejects_short() {
        assert!(parse_stat("stat", "1 (x) S 0 1").is_err());
        assert!(parse_stat("stat", "garbage").is_err());
    }
}
