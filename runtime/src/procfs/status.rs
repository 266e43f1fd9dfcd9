//! /proc/PID/status.

use super::{parse_err, read_text};
use crate::error::Result;

/// The fields of /proc/PID/status that stasis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub umask: u32,
    pub state: char,
    pub tgid: i32,
    pub threads: u64,
    /// Real, effective, saved, filesystem.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: Vec<u32>,
    pub sig_blk: u64,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub no_new_privs: bool,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    /// NSpid, NSpgid, NSsid: the process's PID, process group and session in each pid
    /// namespace from the one of this /proc down to its own (the last is what it sees;
    /// 0 where the group or session lies outside that namespace).
    pub ns_pid: Vec<i32>,
    pub ns_pgid: Vec<i32>,
    pub ns_sid: Vec<i32>,
}

impl Status {
    /// Its PID as it sees it (in its own pid namespace).
    pub fn own_pid(&self) -> Option<i32> {
        self.ns_pid.last().copied()
    }

    /// How many pid namespaces below this /proc's it is (0: the same one).
    pub fn ns_depth(&self) -> usize {
        self.ns_pid.len().saturating_sub(1)
    }
}

/// Parses the text of /proc/PID/status.
pub fn parse_status(path: &str, text: &str) -> Result<Status> {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| parse_err(path, key));
        let list = |v: &str| -> Result<Vec<u32>> {
            v.split_whitespace()
                .map(|x| x.parse().map_err(|_| parse_err(path, key)))
                .collect()
        };
        let pids = |v: &str| -> Result<Vec<i32>> {
            v.split_whitespace()
                .map(|x| x.parse().map_err(|_| parse_err(path, key)))
                .collect()
        };
        match key {
            "Name" => s.name = value.to_string(),
            "Umask" => s.umask = u32::from_str_radix(value, 8).map_err(|_| parse_err(path, key))?,
            "State" => s.state = value.chars().next().unwrap_or('?'),
            "Tgid" => s.tgid = value.parse().map_err(|_| parse_err(path, key))?,
            "Threads" => s.threads = value.parse().map_err(|_| parse_err(path, key))?,
            "Uid" => s.uids = list(value)?,
            "Gid" => s.gids = list(value)?,
            "Groups" => s.groups = list(value)?,
            "SigBlk" => s.sig_blk = hex(value)?,
            "SigIgn" => s.sig_ign = hex(value)?,
            "SigCgt" => s.sig_cgt = hex(value)?,
            "NoNewPrivs" => s.no_new_privs = value == "1",
            "CapInh" => s.cap_inh = hex(value)?,
            "CapPrm" => s.cap_prm = hex(value)?,
            "CapEff" => s.cap_eff = hex(value)?,
            "CapBnd" => s.cap_bnd = hex(value)?,
            "CapAmb" => s.cap_amb = hex(value)?,
            "NSpid" => s.ns_pid = pids(value)?,
            "NSpgid" => s.ns_pgid = pids(value)?,
            "NSsid" => s.ns_sid = pids(value)?,
            _ => {}
        }
    }
    if s.uids.len() != 4 || s.gids.len() != 4 {
        return Err(parse_err(path, "missing Uid/Gid lines"));
    }
    Ok(s)
}

/// Reads /proc/PID/status.
pub fn read_status(pid: i32) -> Result<Status> {
    let path = format!("/proc/{pid}/status");
    parse_status(&path, &read_text(&path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let text = "Name:\tcat\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t77\nUid:\t0\t0\t0\t0\n\
                    Gid:\t5\t5\t5\t5\nGroups:\t1 2 \nThreads:\t3\nSigBlk:\t0000000000010000\n\
                    SigIgn:\t0000000000000004\nSigCgt:\t0000000000000002\nNoNewPrivs:\t1\n";
        let s = parse_status("status", text).unwrap();
        assert_eq!(s.umask, 0o22);
        assert_eq!(s.threads, 3);
        assert_eq!(s.gids, vec![5, 5, 5, 5]);
        assert_eq!(s.groups, vec![1, 2]);
        assert_eq!(s.sig_blk, 0x10000);
        assert!(s.no_new_privs);
        assert!(s.ns_pid.is_empty());
    }

    #[test]
    fn parses_pid_namespace_ids() {
        let text = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nNSpid:\t4711\t3\n\
                    NSpgid:\t4700\t0\nNSsid:\t4711\t3\n";
        let s = parse_status("status", text).unwrap();
        assert_eq!(
            (s.ns_pid.clone(), s.ns_pgid.clone()),
            (vec![4711, 3], vec![4700, 0])
        );
        assert_eq!((s.own_pid(), s.ns_depth()), (Some(3), 1));
        assert_eq!(s.ns_sid, vec![4711, 3]);
    }

    #[test]
    fn rejects_missing_ids() {
        assert!(parse_status("status", "Name:\tx\n").is_err());
    }
}
