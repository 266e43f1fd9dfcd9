//! A container's root file system on its way to the destination, when the hosts share no
//! storage: sent whole while the container runs, then, frozen, only what changed since
//! (an entry whose inode, size, mode, owner, mtime or ctime differs, or whose ctime is so
//! recent that a later write could hide in the same clock tick) and the paths gone. Both
//! are tar streams (hard links kept as links, symbolic links as links, device nodes and
//! FIFOs as such, extended attributes along); sockets are left out (a bound socket is
//! recreated by the restore). The walk stays on the root's file system.
//!
//! The receiving side unpacks with the tar reader's own path checks (no absolute paths, no
//! `..`, nothing through a symbolic link out of the directory) and checks every path it is
//! told to remove the same way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What an entry looked like when it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    rdev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Meta {
    fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            ino: m.ino(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            rdev: m.rdev(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The entries sent, by path relative to the root, and when the walk began.
pub struct Manifest {
    entries: HashMap<PathBuf, Meta>,
    began: SystemTime,
}

/// A change this close to the walk's start may have a later one in the same clock tick.
const RACY: Duration = Duration::from_secs(1);

/// What one send did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub entries: u64,
    pub removed: u64,
}

/// Every entry under `root` (relative paths, the root itself as "."), in walk order
/// (a directory before what it holds), on the root's file system.
fn walk(root: &Path) -> io::Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let top = std::fs::symlink_metadata(root)?;
    let dev = top.dev();
    let mut out = vec![(PathBuf::from("."), top)];
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let path = rel.join(&name);
            let m = std::fs::symlink_metadata(root.join(&path))?;
            if m.file_type().is_socket() {
                continue;
            }
            if m.is_dir() && m.dev() == dev {
                dirs.push(path.clone());
            }
            out.push((path, m));
        }
    }
    Ok(out)
}

/// Appends the entries to a tar stream into `w`; a file linked again (same inode) is sent
/// as a hard link to its first path. The tree may be changing (a container running):
/// a file or link gone since the walk is left out (returned, so it is not taken as sent),
/// and a file is sent with exactly the size it had when opened (cut or padded with zeros
/// if it changes meanwhile; its ctime then differs, so the frozen copy sends it again).
fn append(
    root: &Path,
    entries: &[(PathBuf, std::fs::Metadata)],
    w: &mut dyn Write,
) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tar = tar::Builder::new(w);
    tar.follow_symlinks(false);
    let mut linked: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut gone = Vec::new();
    let vanished = |e: &io::Error| {
        e.kind() == io::ErrorKind::NotFound
            || [libc::ELOOP, libc::ENXIO].contains(&e.raw_os_error().unwrap_or(0))
    };
    for (rel, m) in entries {
        // Whatever can fail because the entry is gone is done before anything of it is
        // written.
        let file = match m.is_file() {
            true => match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(root.join(rel))
                .and_then(|f| f.metadata().map(|fm| (f, fm)))
            {
                Ok((f, fm)) if fm.is_file() => Some((f, fm)),
                Ok(_) => {
                    gone.push(rel.clone());
                    continue;
                }
                Err(e) if vanished(&e) => {
                    gone.push(rel.clone());
                    continue;
                }
                Err(e) => return Err(e),
            },
            false => None,
        };
        let target = match m.file_type().is_symlink() {
            true => match std::fs::read_link(root.join(rel)) {
                Ok(t) => Some(t),
                Err(e) if vanished(&e) => {
                    gone.push(rel.clone());
                    continue;
                }
                Err(e) => return Err(e),
            },
            false => None,
        };
        let meta = file.as_ref().map_or(m, |(_, fm)| fm);
        // The tar header's mtime is whole seconds: the exact one rides in a PAX record
        // (a restore checks the files a process maps by it).
        let mtime = format!("{}.{:09}", meta.mtime(), meta.mtime_nsec());
        tar.append_pax_extensions([("mtime", mtime.as_bytes())])?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata(meta);
        if meta.is_file() && meta.nlink() > 1 {
            if let Some(first) = linked.get(&(meta.dev(), meta.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                tar.append_link(&mut h, rel, first)?;
                continue;
            }
            linked.insert((meta.dev(), meta.ino()), rel.clone());
        }
        match (file, target) {
            (Some((f, fm)), _) => {
                let size = fm.len();
                let exact = f.take(size).chain(io::repeat(0).take(size));
                tar.append_data(&mut h, rel, exact.take(size))?;
            }
            (None, Some(t)) => tar.append_link(&mut h, rel, t)?,
            (None, None) if m.is_dir() => tar.append_data(&mut h, rel, io::empty())?,
            (None, None) => tar.append_path_with_name(root.join(rel), rel)?,
        }
    }
    tar.finish()?;
    Ok(gone)
}

/// Sends the whole tree under `root` into `w` as a tar stream; returns what was sent.
pub fn send_all(root: &Path, w: &mut dyn Write) -> io::Result<(Manifest, Sent)> {
    let began = SystemTime::now();
    let mut entries = walk(root)?;
    let gone = append(root, &entries, w)?;
    // What vanished before it was read was not sent: the frozen copy finds it or not.
    entries.retain(|(p, _)| !gone.contains(p));
    let sent = Sent {
        entries: entries.len() as u64,
        removed: 0,
    };
    let entries = entries
        .into_iter()
        .map(|(p, m)| (p, Meta::of(&m)))
        .collect();
    Ok((Manifest { entries, began }, sent))
}

/// Sends, into `w`, a tar stream of what changed under `root` since `before` was sent, and
/// returns the paths that are gone since (deepest first).
pub fn send_changes(
    root: &Path,
    before: &Manifest,
    w: &mut dyn Write,
) -> io::Result<(Vec<PathBuf>, Sent)> {
    let racy = before
        .began
        .checked_sub(RACY)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let racy = racy
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let now = walk(root)?;
    let mut changed = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (rel, m) in now {
        let meta = Meta::of(&m);
        let same = before.entries.get(&rel) == Some(&meta) && meta.ctime.0 < racy;
        seen.insert(rel.clone());
        if !same {
            changed.push((rel, m));
        }
    }
    let vanished = append(root, &changed, w)?;
    let mut gone: Vec<PathBuf> = before
        .entries
        .keys()
        .filter(|p| !seen.contains(*p) || vanished.contains(p))
        .cloned()
        .collect();
    gone.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let sent = Sent {
        entries: changed.len() as u64,
        removed: gone.len() as u64,
    };
    Ok((gone, sent))
}

/// Unpacks a tar stream from `r` into `dst` (every path checked by the tar reader: none
/// may leave `dst`), with owners, modes, times and extended attributes. What an entry
/// replaces is removed first (a file sent again as a hard link, a file become a link).
pub fn unpack(r: impl Read, dst: &Path) -> io::Result<()> {
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    // Directories get their times last (what is unpacked into them changes them).
    let mut dirs = Vec::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        let mtime = exact_mtime(&mut entry)?;
        if entry.header().entry_type() != tar::EntryType::Directory {
            let name = rel.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{rel:?} is not UTF-8"))
            })?;
            remove(dst, name)?;
        }
        if !entry.unpack_in(dst)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{rel:?} lies outside the root file system"),
            ));
        }
        if let Some(t) = mtime {
            match entry.header().entry_type() {
                tar::EntryType::Directory => dirs.push((rel, t)),
                // A hard link shares its first name's times.
                tar::EntryType::Link => {}
                _ => filetime::set_symlink_file_times(dst.join(&rel), t, t)?,
            }
        }
    }
    for (rel, t) in dirs.iter().rev() {
        filetime::set_symlink_file_times(dst.join(rel), *t, *t)?;
    }
    Ok(())
}

/// The entry's mtime to the nanosecond, from its PAX record `mtime=SECONDS.NANOSECONDS`.
fn exact_mtime<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Option<filetime::FileTime>> {
    let Some(pax) = entry.pax_extensions()? else {
        return Ok(None);
    };
    for ext in pax {
        let ext = ext?;
        if ext.key() != Ok("mtime") {
            continue;
        }
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "a bad PAX mtime");
        let v = ext.value().map_err(|_| bad())?;
        let (sec, nsec) = v.split_once('.').unwrap_or((v, "0"));
        let sec: i64 = sec.parse().map_err(|_| bad())?;
        let nsec: u32 = format!("{nsec:0<9}")
            .get(..9)
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        return Ok(Some(filetime::FileTime::from_unix_time(sec, nsec)));
    }
    Ok(None)
}

/// Removes `rel` under `dst`, once it is known to lie there: a relative path of plain
/// names whose parent, followed through any link, is still inside `dst`.
pub fn remove(dst: &Path, rel: &str) -> io::Result<()> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{rel:?} is not a path inside the root file system"),
        )
    };
    let path = Path::new(rel);
    if rel.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    let full = dst.join(path);
    let parent = full.parent().ok_or_else(bad)?;
    let inside = std::fs::canonicalize(dst)?;
    match std::fs::canonicalize(parent) {
        Ok(p) if p.starts_with(&inside) => {}
        Ok(_) => return Err(bad()),
        // Its directory is gone already (removed before it): nothing left to remove.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match std::fs::symlink_metadata(&full) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&full),
        Ok(_) => std::fs::remove_file(&full),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stasis-rootfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn a_tree_goes_whole_then_its_changes_and_removals() {
        let (src, dst) = (scratch("src"), scratch("dst"));
        std::fs::create_dir_all(src.join("etc/d")).expect("mkdir");
        std::fs::write(src.join("etc/a"), b"one").expect("write");
        std::fs::write(src.join("etc/d/gone"), b"x").expect("write");
        std::fs::hard_link(src.join("etc/a"), src.join("etc/a2")).expect("link");
        std::os::unix::fs::symlink("a", src.join("etc/s")).expect("symlink");
        let mut tar = Vec::new();
        let (manifest, sent) = send_all(&src, &mut tar).expect("send all");
        assert_eq!(sent.entries, 7, "root, etc, etc/d, and four entries");
        unpack(&tar[..], &dst).expect("unpack");
        assert_eq!(std::fs::read(dst.join("etc/a2")).expect("read"), b"one");
        // An entry gone between the walk and its reading is left out, the stream whole.
        let mut listed = walk(&src).expect("walk");
        let ghost = std::fs::symlink_metadata(src.join("etc/a")).expect("meta");
        listed.push((PathBuf::from("etc/ghost"), ghost));
        let mut racy = Vec::new();
        let left_out = append(&src, &listed, &mut racy).expect("append with a ghost");
        assert_eq!(left_out, [PathBuf::from("etc/ghost")]);
        let n = tar::Archive::new(&racy[..])
            .entries()
            .expect("entries")
            .count();
        assert_eq!(n, listed.len() - 1, "the stream holds every other entry");
        for p in ["etc/a", "etc", "etc/s"] {
            let (s, d) = (
                std::fs::symlink_metadata(src.join(p)).expect("src"),
                std::fs::symlink_metadata(dst.join(p)).expect("dst"),
            );
            assert_eq!(
                (s.mtime(), s.mtime_nsec()),
                (d.mtime(), d.mtime_nsec()),
                "{p}: its mtime to the nanosecond"
            );
        }
        let (a, a2) = (
            std::fs::metadata(dst.join("etc/a")).expect("a"),
            std::fs::metadata(dst.join("etc/a2")).expect("a2"),
        );
        assert_eq!(a.ino(), a2.ino(), "the hard link is a link again");
        assert_eq!(
            std::fs::read_link(dst.join("etc/s")).expect("link"),
            Path::new("a")
        );

        std::fs::write(src.join("etc/new"), b"two").expect("write");
        std::fs::remove_dir_all(src.join("etc/d")).expect("rm");
        let mut tar = Vec::new();
        let (gone, _) = send_changes(&src, &manifest, &mut tar).expect("changes");
        unpack(&tar[..], &dst).expect("unpack changes");
        for p in &gone {
            remove(&dst, p.to_str().expect("utf8")).expect("remove");
        }
        assert_eq!(std::fs::read(dst.join("etc/new")).expect("read"), b"two");
        assert!(!dst.join("etc/d").exists(), "a removed directory came back");
        for hostile in ["../x", "/etc/passwd", "", "a/../../b"] {
            assert!(remove(&dst, hostile).is_err(), "{hostile:?} was removed");
        }
        std::os::unix::fs::symlink("/", dst.join("out")).expect("symlink");
        assert!(remove(&dst, "out/tmp").is_err(), "removed through a link");

        // A hostile stream: a link out of the tree, then a file through it.
        let outside = scratch("outside");
        let mut evil = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        evil.append_link(&mut h, "way", &outside).expect("link");
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        evil.append_data(&mut h, "way/planted", &b"x"[..])
            .expect("file");
        let evil = evil.into_inner().expect("tar");
        assert!(
            unpack(&evil[..], &dst).is_err(),
            "a file went through a link"
        );
        assert!(
            !outside.join("planted").exists(),
            "a file was planted outside"
        );
        let _ = std::fs::remove_dir_all(&outside);
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }
}
