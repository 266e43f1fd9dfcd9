//! `wl-files`: open regular files and `/dev/null` with offsets and flags.
//!
//! Set-up (files in `$TMPDIR`, default `/tmp`, named `stasis-wl-files-<pid>-<tag>-*`):
//! - fd 3: `rw.dat` (40000 bytes of pattern) `O_RDWR`, offset 12345;
//! - fd 4: closed (a gap);
//! - fd 5: `ro.dat` (8192 bytes) `O_RDONLY|O_CLOEXEC`, offset 500;
//! - fd 6: `append.log` (1000 bytes + one line written through it) `O_WRONLY|O_APPEND`
//!   (opened at fd 4 and moved with `dup2`, so it has no `FD_CLOEXEC`);
//! - fd 10: `/dev/null` `O_WRONLY` (moved with `dup2`).
//!
//! Checks: the set of open fds below 1024 is exactly what it was at start plus these (breaks
//! if the restorer leaks its own fds or loses one); for each fd the `/proc/self/fd` target,
//! device and inode (the same file, not a copy), `lseek(fd, 0, SEEK_CUR)`, `F_GETFL` (access
//! mode, `O_APPEND`), `FD_CLOEXEC`; reading at the rw and ro offsets returns the file content
//! there (then the offset is put back); the files' sizes; `/dev/null` is still char device
//! 1:3 and writable; and an append: the file is first extended through another descriptor,
//! then a line written through fd 6 must land at the new end (breaks if `O_APPEND` was lost
//! and the write goes to the old offset). The whole append file is compared.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use stasis_workloads::{pattern, sys, Ctx, Report, Spec};

const RW_FD: i32 = 3;
const GAP_FD: i32 = 4;
const RO_FD: i32 = 5;
const APPEND_FD: i32 = 6;
const NULL_FD: i32 = 10;
const RW_SIZE: usize = 40000;
const RW_OFFSET: i64 = 12345;
const RO_SIZE: usize = 8192;
const RO_OFFSET: i64 = 500;
const FD_SCAN: i32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct FdState {
    path: PathBuf,
    flags: i32,
    fd_flags: i32,
    offset: i64,
    dev: u64,
    ino: u64,
}

struct Files {
    rw_path: PathBuf,
    ro_path: PathBuf,
    app_path: PathBuf,
    rw: Vec<u8>,
    ro: Vec<u8>,
    app: Vec<u8>,
    open_at_start: Vec<i32>,
    fds: Vec<(i32, FdState)>,
}

fn open_fds() -> Vec<i32> {
    (0..FD_SCAN)
        .filter(|&fd| sys::fcntl_get(fd, libc::F_GETFD, "F_GETFD").is_ok())
        .collect()
}

fn open(path: &std::path::Path, flags: i32) -> Result<i32, String> {
    let c = sys::cpath(path)?;
    // SAFETY: `c` is a valid NUL-terminated path; the mode is used only with O_CREAT.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o640 as libc::c_uint) };
    sys::cvt(fd, &format!("open {path:?} flags {flags:#x}"))
}

fn dup2(from: i32, to: i32) -> Result<(), String> {
    // SAFETY: dup2 on fds this program owns; `to` is free or ours.
    let r = unsafe { libc::dup2(from, to) };
    sys::cvt(r, &format!("dup2({from}, {to})"))?;
    // SAFETY: closing our own duplicate.
    unsafe { libc::close(from) };
    Ok(())
}

fn fd_state(fd: i32) -> Result<FdState, String> {
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("readlink /proc/self/fd/{fd}: {e}"))?;
    let st = sys::fstat(fd)?;
    Ok(FdState {
        path,
        flags: sys::fcntl_get(fd, libc::F_GETFL, "F_GETFL")?,
        fd_flags: sys::fcntl_get(fd, libc::F_GETFD, "F_GETFD")?,
        offset: sys::lseek(fd, 0, libc::SEEK_CUR)?,
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

fn read_exact_fd(fd: i32, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` is a live, writable buffer of `n` bytes.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), n) };
    let r = sys::cvt_long(r as i64, &format!("read(fd {fd}, {n})"))?;
    buf.truncate(r as usize);
    Ok(buf)
}

fn setup(ctx: &mut Ctx) -> Result<Files, String> {
    let open_at_start = open_fds();
    for fd in [RW_FD, GAP_FD, RO_FD, APPEND_FD, NULL_FD] {
        if open_at_start.contains(&fd) {
            return Err(format!(
                "fd {fd} is already open at start (the harness must leave 3..10 free)"
            ));
        }
    }
    let base = format!("stasis-wl-files-{}-{}", sys::getpid_raw(), ctx.tag);
    let dir = sys::tmp_dir();
    let rw_path = dir.join(format!("{base}-rw.dat"));
    let ro_path = dir.join(format!("{base}-ro.dat"));
    let app_path = dir.join(format!("{base}-append.log"));
    let rw: Vec<u8> = (0..RW_SIZE)
        .map(|i| pattern::byte(ctx.seed ^ 1, i))
        .collect();
    let ro: Vec<u8> = (0..RO_SIZE)
        .map(|i| pattern::byte(ctx.seed ^ 2, i))
        .collect();
    let mut app: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).collect();
    for (p, d) in [(&rw_path, &rw), (&ro_path, &ro), (&app_path, &app)] {
        std::fs::write(p, d).map_err(|e| format!("write {p:?}: {e}"))?;
        ctx.remove_at_exit(p.clone());
    }
    let fd = open(&rw_path, libc::O_RDWR)?;
    if fd != RW_FD {
        dup2(fd, RW_FD)?;
    }
    let app_fd = open(&app_path, libc::O_WRONLY | libc::O_APPEND)?;
    let fd = open(&ro_path, libc::O_RDONLY | libc::O_CLOEXEC)?;
    if fd != RO_FD {
        return Err(format!("ro file opened at fd {fd}, expected {RO_FD}"));
    }
    dup2(app_fd, APPEND_FD)?;
    let fd = open(std::path::Path::new("/dev/null"), libc::O_WRONLY)?;
    dup2(fd, NULL_FD)?;
    sys::lseek(RW_FD, RW_OFFSET, libc::SEEK_SET)?;
    let got = read_exact_fd(RO_FD, RO_OFFSET as usize)?;
    if got.len() != RO_OFFSET as usize {
        return Err(format!("short read of {ro_path:?}"));
    }
    let line = b"line written through the O_APPEND fd at setup\n";
    sys::write_all(APPEND_FD, line)?;
    app.extend_from_slice(line);
    let mut fds = Vec::new();
    for fd in [RW_FD, RO_FD, APPEND_FD, NULL_FD] {
        fds.push((fd, fd_state(fd)?));
    }
    Ok(Files {
        rw_path,
        ro_path,
        app_path,
        rw,
        ro,
        app,
        open_at_start,
        fds,
    })
}

fn check_read_at(r: &mut Report, what: &str, fd: i32, off: i64, content: &[u8]) {
    let Some(got) = r.ok(read_exact_fd(fd, 100)) else {
        return;
    };
    let want = &content[off as usize..(off as usize + 100).min(content.len())];
    r.eq(
        &format!("{what}: 100 bytes read at offset {off}"),
        want,
        &got[..],
    );
    r.ok(sys::lseek(fd, off, libc::SEEK_SET));
}

fn check(f: &mut Files, round: u32, r: &mut Report) {
    let mut want_open = f.open_at_start.clone();
    want_open.extend([RW_FD, RO_FD, APPEND_FD, NULL_FD]);
    want_open.sort_unstable();
    r.eq("open fds below 1024", want_open, open_fds());
    for (fd, want) in &f.fds {
        if let Some(got) = r.ok(fd_state(*fd)) {
            r.eq(&format!("fd {fd} state"), want, &got);
        }
    }
    for (p, size) in [
        (&f.rw_path, f.rw.len()),
        (&f.ro_path, f.ro.len()),
        (&f.app_path, f.app.len()),
    ] {
        match std::fs::metadata(p) {
            Ok(m) => r.eq(&format!("size of {p:?}"), size as u64, m.size()),
            Err(e) => r.fail(format!("stat {p:?}: {e}")),
        }
    }
    check_read_at(r, "rw fd 3", RW_FD, RW_OFFSET, &f.rw);
    check_read_at(r, "ro fd 5", RO_FD, RO_OFFSET, &f.ro);
    if let Some(st) = r.ok(sys::fstat(NULL_FD)) {
        r.eq_hex("fd 10 file type", libc::S_IFCHR, st.st_mode & libc::S_IFMT);
        r.eq("fd 10 device", libc::makedev(1, 3), st.st_rdev);
    }
    r.ok(sys::write_all(NULL_FD, b"x"));

    // Grow the append file through another descriptor, then append through fd 6.
    let ext = format!("extended from outside before check {round}\n");
    let line = format!("appended through fd 6 at check {round}\n");
    match std::fs::OpenOptions::new().write(true).open(&f.app_path) {
        Ok(file) => {
            use std::os::unix::fs::FileExt;
            match file.write_all_at(ext.as_bytes(), f.app.len() as u64) {
                Ok(()) => f.app.extend_from_slice(ext.as_bytes()),
                Err(e) => r.fail(format!("extend {:?}: {e}", f.app_path)),
            }
        }
        Err(e) => r.fail(format!("open {:?}: {e}", f.app_path)),
    }
    if r.ok(sys::write_all(APPEND_FD, line.as_bytes())).is_some() {
        f.app.extend_from_slice(line.as_bytes());
    }
    match std::fs::read(&f.app_path) {
        Ok(got) => {
            if got != f.app {
                let tail = |v: &[u8]| {
                    String::from_utf8_lossy(&v[v.len().saturating_sub(80)..]).into_owned()
                };
                r.fail(format!(
                    "append file after write through O_APPEND fd 6: expected {} bytes ending {:?}, got {} bytes ending {:?}",
                    f.app.len(),
                    tail(&f.app),
                    got.len(),
                    tail(&got)
                ));
            }
        }
        Err(e) => r.fail(format!("read {:?}: {e}", f.app_path)),
    }
    if let Some(off) = r.ok(sys::lseek(APPEND_FD, 0, libc::SEEK_CUR)) {
        r.eq("fd 6 offset after the append", f.app.len() as i64, off);
    }
    // Later checks expect fd 6 at the new end.
    for (fd, st) in &mut f.fds {
        if *fd == APPEND_FD {
            st.offset = f.app.len() as i64;
        }
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-files", &Spec::default());
    let f = setup(&mut ctx);
    let mut f = ctx.setup(f);
    ctx.ready();
    let mut round = 0u32;
    ctx.serve_blocking(|r| {
        round += 1;
        check(&mut f, round, r);
        r.info(format!(
            "fds {:?}",
            f.fds.iter().map(|x| x.0).collect::<Vec<_>>()
        ));
    })
}
