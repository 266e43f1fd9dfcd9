//! Parsing `/proc/self/maps`.

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// Permissions, e.g. `rw-p`.
    pub perms: String,
    /// File offset.
    pub offset: u64,
    /// Inode (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[vdso]`, ...), empty for anonymous.
    pub path: String,
}

/// Reads and parses `/proc/self/maps`.
pub fn read_maps() -> Result<Vec<MapEntry>, String> {
    let text = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("read /proc/self/maps: {e}"))?;
    text.lines().map(parse_line).collect()
}

fn parse_line(line: &str) -> Result<MapEntry, String> {
    let bad = || format!("unparsable /proc/self/maps line {line:?}");
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(bad)?;
    let perms = it.next().ok_or_else(bad)?;
    let offset = it.next().ok_or_else(bad)?;
    let _dev = it.next().ok_or_else(bad)?;
    let inode = it.next().ok_or_else(bad)?;
    let path = it.next().unwrap_or("").trim_start();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    Ok(MapEntry {
        start: usize::from_str_radix(s, 16).map_err(|_| bad())?,
        end: usize::from_str_radix(e, 16).map_err(|_| bad())?,
        perms: perms.to_string(),
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        inode: inode.parse().map_err(|_| bad())?,
        path: path.to_string(),
    })
}

/// The entry containing `addr`.
pub fn containing(maps: &[MapEntry], addr: usize) -> Option<&MapEntry> {
    maps.iter().find(|m| m.start <= addr && addr < m.end)
}

/// The first entry whose path is exactly `name` (e.g. `[vdso]`).
pub fn named<'a>(maps: &'a [MapEntry], name: &str) -> Option<&'a MapEntry> {
    maps.iter().find(|m| m.path == name)
}

/// Checks that `[start, end)` is exactly one mapping with permissions `perms`.
pub fn check_exact(
    maps: &[MapEntry],
    what: &str,
    start: usize,
    end: usize,
    perms: &str,
) -> Result<(), String> {
    match containing(maps, start) {
        None => Err(format!(
            "{what}: no mapping at {start:#x} in /proc/self/maps"
        )),
        Some(m) if m.start != start || m.end != end || m.perms != perms => Err(format!(
            "{what}: expected mapping {start:#x}-{end:#x} {perms}, got {:#x}-{:#x} {}",
            m.start, m.end, m.perms
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let m =
            parse_line("7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]")
                .unwrap();
        assert_eq!(m.start, 0x7ffd1000);
        assert_eq!(m.path, "[vdso]");
        let m = parse_line("55d0-55d1 rw-p 00001000 08:01 1234 /tmp/a b").unwrap();
        assert_eq!(m.inode, 1234);
        assert_eq!(m.offset, 0x1000);
        assert_eq!(m.path, "/tmp/a b");
        let m = parse_line("55d0-55d1 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(m.path, "");
        assert!(read_maps().unwrap().len() > 3);
    }
}
