//! /proc/PID/maps and the VmFlags lines of /proc/PID/smaps.

use super::{parse_err, read_text};
use crate::error::Result;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` in the permissions column (MAP_SHARED), else private.
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path or pseudo-name ("[heap]", "[vdso]"), empty for anonymous memory.
    pub name: String,
    /// VmFlags codes from smaps, when they were read.
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    /// PROT_* bits of this mapping.
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ as u32;
        }
        if self.write {
            p |= libc::PROT_WRITE as u32;
        }
        if self.exec {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the mapping is empty (never true for a kernel-reported mapping).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether this is one of the kernel's vDSO block ([vvar], [vvar_vclock], [vdso]), which
    /// must move as one.
    pub fn is_vdso_block(&self) -> bool {
        matches!(self.name.as_str(), "[vvar]" | "[vvar_vclock]" | "[vdso]")
    }

    /// Whether smaps listed the flag (two-letter code such as "gd").
    pub fn has_flag(&self, code: &str) -> bool {
        self.vm_flags.iter().any(|f| f == code)
    }
}

/// Parses the text of /proc/PID/maps.
pub fn parse_maps(path: &str, text: &str) -> Result<Vec<MapEntry>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_line(path, l))
        .collect()
}

fn parse_line(path: &str, line: &str) -> Result<MapEntry> {
    let bad = |what: &str| parse_err(path, format!("{what} in line {line:?}"));
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let r = rest.trim_start_matches(' ');
        let end = r.find(' ').unwrap_or(r.len());
        let (f, tail) = r.split_at(end);
        rest = tail;
        (!f.is_empty()).then_some(f)
    };
    let range = field().ok_or_else(|| bad("missing range"))?;
    let perms = field().ok_or_else(|| bad("missing permissions"))?;
    let offset = field().ok_or_else(|| bad("missing offset"))?;
    let dev = field().ok_or_else(|| bad("missing device"))?;
    let inode = field().ok_or_else(|| bad("missing inode"))?;
    let name = rest.trim_start_matches(' ').to_string();
    let (start, end) = range.split_once('-').ok_or_else(|| bad("bad range"))?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad("bad hex number"));
    let (maj, min) = dev.split_once(':').ok_or_else(|| bad("bad device"))?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad("bad permissions"));
    }
    let (start, end) = (hex(start)?, hex(end)?);
    if end <= start {
        return Err(bad("empty range"));
    }
    Ok(MapEntry {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: hex(offset)?,
        dev_major: u32::from_str_radix(maj, 16).map_err(|_| bad("bad device"))?,
        dev_minor: u32::from_str_radix(min, 16).map_err(|_| bad("bad device"))?,
        inode: inode.parse().map_err(|_| bad("bad inode"))?,
        name,
        vm_flags: Vec::new(),
    })
}

/// Parses /proc/PID/smaps into (start address, VmFlags codes) pairs.
pub fn parse_smaps_flags(path: &str, text: &str) -> Result<Vec<(u64, Vec<String>)>> {
    let mut out = Vec::new();
    let mut current: Option<u64> = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let start = current
                .take()
                .ok_or_else(|| parse_err(path, "VmFlags before a mapping line"))?;
            out.push((
                start,
                flags.split_whitespace().map(str::to_string).collect(),
            ));
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(_)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                    current = Some(s);
                }
            }
        }
    }
    Ok(out)
}

/// Reads /proc/PID/maps (without VmFlags).
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/maps");
    let text = read_text(&path)?;
    parse_maps(&path, &text)
}

/// Reads /proc/PID/smaps: the mappings with their VmFlags.
pub fn read_smaps_flags(pid: i32) -> Result<Vec<MapEntry>> {
    let mut maps = read_maps(pid)?;
    let path = format!("/proc/{pid}/smaps");
    let text = read_text(&path)?;
    let flags = parse_smaps_flags(&path, &text)?;
    let mut i = 0;
    for m in maps.iter_mut() {
        while i < flags.len() && flags[i].0 < m.start {
            i += 1;
        }
        if i < flags.len() && flags[i].0 == m.start {
            m.vm_flags = flags[i].1.clone();
        }
    }
    Ok(maps)
}

/// The first mapping of `pid` (lowest address) and its VmFlags, read from the start of
/// /proc/PID/smaps and no further: the kernel walks the page tables of each mapping it
/// reports there, and the rest of a large process would take a while.
pub fn first_smaps_flags(pid: i32) -> Result<Option<(u64, u64, Vec<String>)>> {
    use std::io::BufRead;
    let path = format!("/proc/{pid}/smaps");
    let file =
        std::fs::File::open(&path).map_err(|e| crate::RuntimeError::sys("open", &path, e))?;
    let mut range = None;
    for line in std::io::BufReader::with_capacity(4096, file).lines() {
        let line = line.map_err(|e| crate::RuntimeError::sys("read", &path, e))?;
        if range.is_none() {
            let first = parse_maps(&path, &format!("{line}\n"))?;
            range = first.first().map(|m| (m.start, m.end));
            continue;
        }
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let flags = flags.split_whitespace().map(str::to_string).collect();
            return Ok(range.map(|(s, e)| (s, e, flags)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 fe:01 1234                       /usr/bin/cat
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
7f0000000000-7f0000001000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
7f0000002000-7f0000003000 ---p 00000000 00:00 0 
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_maps_lines() {
        let m = parse_maps("maps", MAPS).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].start, 0x55d0c8a00000);
        assert_eq!(m[0].name, "/usr/bin/cat");
        assert_eq!(m[0].dev_major, 0xfe);
        assert_eq!(m[0].inode, 1234);
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "[stack]");
        assert!(m[2].shared);
        assert_eq!(m[2].name, "/dev/zero (deleted)");
        assert_eq!(m[3].prot(), 0);
        assert_eq!(m[3].name, "");
        assert!(m[4].exec);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_maps("maps", "zzzz-1 rw-p 0 0:0 0").is_err());
        assert!(parse_maps("maps", "1000-0fff rw-p 0 00:00 0").is_err());
        assert!(parse_maps("maps", "1000-2000 rw 0 00:00 0").is_err());
    }

    #[test]
    fn parses_smaps_flags() {
        let text = "7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 [stack]\nSize: 132 kB\nVmFlags: rd wr mr mw me gd ac\n";
        let f = parse_smaps_flags("smaps", text).unwrap();
        assert_eq!(f[0].0, 0x7ffd1c000000);
        assert!(f[0].1.contains(&"gd".to_string()));
    }
}
