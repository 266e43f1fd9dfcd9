//! /proc/PID/fd and /proc/PID/fdinfo.

use super::{parse_err, read_link, read_text};
use crate::error::Result;

/// The fields of /proc/PID/fdinfo/N that stasis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// f_flags in octal in the file, including O_CLOEXEC of the fd.
    pub flags: u32,
    pub mnt_id: u64,
    pub ino: u64,
}

/// Reads /proc/PID/fdinfo/FD.
pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = read_text(&path)?;
    let mut info = FdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "pos" => info.pos = value.parse().map_err(|_| parse_err(&path, "bad pos"))?,
            "flags" => {
                info.flags =
                    u32::from_str_radix(value, 8).map_err(|_| parse_err(&path, "bad flags"))?
            }
            "mnt_id" => info.mnt_id = value.parse().map_err(|_| parse_err(&path, "bad mnt_id"))?,
            "ino" => info.ino = value.parse().map_err(|_| parse_err(&path, "bad ino"))?,
            _ => {}
        }
    }
    Ok(info)
}

/// Where /proc/PID/fd/FD points ("/path", "pipe:[123]", "socket:[4]", "anon_inode:[eventfd]").
pub fn read_fd_target(pid: i32, fd: i32) -> Result<String> {
    read_link(&format!("/proc/{pid}/fd/{fd}"))
}

/// What /proc/PID/fdinfo/N says of an eventfd, timerfd, signalfd or epoll fd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventInfo {
    pub eventfd_count: Option<u64>,
    pub eventfd_semaphore: bool,
    pub clockid: Option<i32>,
    pub ticks: u64,
    pub settime_flags: u32,
    /// (seconds, nanoseconds).
    pub it_value: (u64, u64),
    pub it_interval: (u64, u64),
    pub sigmask: Option<u64>,
    /// (watched fd, events, data, inode of the watched file).
    pub epoll: Vec<(u32, u32, u64, u64)>,
    pub inotify: Vec<InotifyMark>,
}

/// One inotify watch as fdinfo shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InotifyMark {
    pub wd: i32,
    pub ino: u64,
    /// The kernel's device number of the watched file's filesystem (major << 20 | minor).
    pub sdev: u64,
    pub mask: u32,
    pub handle_type: i32,
    pub handle: Vec<u8>,
}

fn parse_inotify(line: &str) -> Option<InotifyMark> {
    let mut m = InotifyMark::default();
    for word in line.split_whitespace() {
        let Some((k, v)) = word.split_once(':') else {
            continue;
        };
        match k {
            "wd" => m.wd = i32::from_str_radix(v, 16).ok()?,
            "ino" => m.ino = u64::from_str_radix(v, 16).ok()?,
            "sdev" => m.sdev = u64::from_str_radix(v, 16).ok()?,
            "mask" => m.mask = u32::from_str_radix(v, 16).ok()?,
            "fhandle-type" => m.handle_type = i32::from_str_radix(v, 16).ok()?,
            "f_handle" => {
                m.handle = (0..v.len() / 2)
                    .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16))
                    .collect::<std::result::Result<_, _>>()
                    .ok()?
            }
            _ => {}
        }
    }
    (!m.handle.is_empty()).then_some(m)
}

fn pair(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Parses the event-fd lines of fdinfo text (`path` names it in errors).
pub fn parse_event_info(path: &str, text: &str) -> Result<EventInfo> {
    let bad = |what: &str| parse_err(path, format!("bad {what}"));
    let mut e = EventInfo::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("inotify ") {
            e.inotify
                .push(parse_inotify(rest).ok_or_else(|| bad("inotify line"))?);
            continue;
        }
        if let Some(rest) = line.strip_prefix("tfd:") {
            // "tfd: 3 events: 19 data: 3 pos:0 ino:14 sdev:10"
            let words: Vec<&str> = rest.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            let fd = words.first().and_then(|w| w.parse().ok());
            let events = after("events:").and_then(|w| u32::from_str_radix(w, 16).ok());
            let data = after("data:").and_then(|w| u64::from_str_radix(w, 16).ok());
            let ino = words
                .iter()
                .find_map(|w| w.strip_prefix("ino:"))
                .and_then(|w| u64::from_str_radix(w, 16).ok());
            match (fd, events, data, ino) {
                (Some(f), Some(ev), Some(d), Some(i)) => e.epoll.push((f, ev, d, i)),
                _ => return Err(bad("epoll tfd line")),
            }
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "eventfd-count" => {
                e.eventfd_count = Some(u64::from_str_radix(value, 16).map_err(|_| bad(key))?)
            }
            "eventfd-semaphore" => e.eventfd_semaphore = value == "1",
            "clockid" => e.clockid = Some(value.parse().map_err(|_| bad(key))?),
            "ticks" => e.ticks = value.parse().map_err(|_| bad(key))?,
            "settime flags" => {
                e.settime_flags = u32::from_str_radix(value, 8).map_err(|_| bad(key))?
            }
            "it_value" => e.it_value = pair(value).ok_or_else(|| bad(key))?,
            "it_interval" => e.it_interval = pair(value).ok_or_else(|| bad(key))?,
            "sigmask" => e.sigmask = Some(u64::from_str_radix(value, 16).map_err(|_| bad(key))?),
            _ => {}
        }
    }
    Ok(e)
}

/// Reads the event-fd state of /proc/PID/fdinfo/FD.
pub fn read_event_info(pid: i32, fd: i32) -> Result<EventInfo> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    parse_event_info(&path, &read_text(&path)?)
}

#[cfg(test)]
mod event_tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let t = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t20\nclockid: 1\nticks: 3\n\
                 settime flags: 01\nit_value: (9, 989767150)\nit_interval: (2, 0)\n";
        let e = parse_event_info("x", t).unwrap();
        assert_eq!(e.clockid, Some(1));
        assert_eq!((e.ticks, e.settime_flags), (3, 1));
        assert_eq!(e.it_value, (9, 989767150));
        assert_eq!(e.it_interval, (2, 0));
        let e = parse_event_info(
            "x",
            "eventfd-count:               1f\neventfd-semaphore: 1\n",
        )
        .unwrap();
        assert_eq!((e.eventfd_count, e.eventfd_semaphore), (Some(31), true));
        let e = parse_event_info("x", "sigmask:\t0000000800000200\n").unwrap();
        assert_eq!(e.sigmask, Some(0x800000200));
        let e = parse_event_info(
            "x",
            "tfd:        3 events:       19 data:                3  pos:0 ino:14 sdev:10\n",
        )
        .unwrap();
        assert_eq!(e.epoll, vec![(3, 0x19, 3, 0x14)]);
        assert!(parse_event_info("x", "tfd: x events: y\n").is_err());
        let e = parse_event_info(
            "x",
            "inotify wd:1a ino:98c121 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8 \
             fhandle-type:1 f_handle:21c19800aac39201\n",
        )
        .unwrap();
        assert_eq!(e.inotify.len(), 1);
        let m = &e.inotify[0];
        assert_eq!(
            (m.wd, m.ino, m.sdev, m.mask),
            (0x1a, 0x98c121, 0xfe00000, 0x100)
        );
        assert_eq!(m.handle, vec![0x21, 0xc1, 0x98, 0, 0xaa, 0xc3, 0x92, 1]);
    }
}
