//! `wl-fileattrs`: owners, modes and times of open files, and files that lost their name.
//!
//! Set-up, in `$TMPDIR`: a memfd holding a shell script (`exit 7`), mode 0750, owner
//! 4321:4322, reopened read-only at fd 10 (the writable fd closed) and mapped MAP_SHARED
//! read-only; a file D created 0604, owner 4321:4322, written, given times 1e9 s (atime) and
//! 1.5e9 s (mtime) and unlinked, held at fd 11; a file A written with 3 pages, linked to B,
//! unlinked, and shrunk through fd 12 to 5000 bytes; a file R at fd 13 (read-write) and a
//! file M mapped MAP_SHARED read-only, both with atime = mtime = 1.2e9 s.
//!
//! Checks (repeatable): the memfd's mode, owner and that execveat(fd 10, "", AT_EMPTY_PATH)
//! runs it (exit 7; ETXTBSY if a writable reference to it is left); D's mode, owner and
//! times; fd 12 and B are one file (same inode, one link, 5000 bytes, a byte written through
//! the fd is read back through B); R's and M's times unchanged.

use stasis_workloads::{sys, Ctx, Report, Spec};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;

const MEMFD: i32 = 10;
const DELETED: i32 = 11;
const LINKED: i32 = 12;
const R: i32 = 13;
const UID: u32 = 4321;
const GID: u32 = 4322;
const D_ATIME: i64 = 1_000_000_000;
const D_MTIME: i64 = 1_500_000_000;
const R_TIME: i64 = 1_200_000_000;
const SCRIPT: &[u8] = b"#!/bin/sh\nexit 7\n";

struct State {
    b: std::path::PathBuf,
    m: std::path::PathBuf,
    r: std::path::PathBuf,
}

fn err(what: &str) -> String {
    sys::os_err(what)
}

fn set_times(fd: i32, atime: i64, mtime: i64) -> Result<(), String> {
    let ts = |s: i64| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: 0,
    };
    let t = [ts(atime), ts(mtime)];
    // SAFETY: t is two timespecs.
    sys::cvt(unsafe { libc::futimens(fd, t.as_ptr()) }, "futimens")?;
    Ok(())
}

fn open_new(path: &std::path::Path, mode: u32) -> Result<i32, String> {
    let c = sys::cpath(path)?;
    // SAFETY: c is a valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            mode,
        )
    };
    sys::cvt(fd, &format!("open {path:?}"))
}

fn at(fd: i32, want: i32) -> Result<(), String> {
    // SAFETY: dup2/close on fds we own.
    unsafe {
        if libc::dup2(fd, want) != want {
            return Err(err("dup2"));
        }
        libc::close(fd);
    }
    Ok(())
}

fn setup(ctx: &mut Ctx) -> Result<State, String> {
    let dir = sys::tmp_dir();
    let pid = sys::getpid_raw();
    let path = |n: &str| dir.join(format!("stasis-wl-fileattrs-{pid}-{n}"));
    for n in ["B", "R", "M"] {
        ctx.remove_at_exit(path(n));
    }
    // SAFETY: plain syscalls on fds and mappings made here; buffers are locals.
    unsafe {
        let m = libc::memfd_create(c"wl-fileattrs-script".as_ptr(), 0);
        sys::cvt(m, "memfd_create")?;
        sys::write_all(m, SCRIPT)?;
        sys::cvt(libc::fchown(m, UID, GID), "fchown memfd")?;
        sys::cvt(libc::fchmod(m, 0o750), "fchmod memfd")?;
        let ro = CString::new(format!("/proc/self/fd/{m}")).map_err(|e| e.to_string())?;
        let r = libc::open(ro.as_ptr(), libc::O_RDONLY);
        sys::cvt(r, "reopen memfd read-only")?;
        libc::close(m);
        at(r, MEMFD)?;
        let map = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            MEMFD,
            0,
        );
        if map == libc::MAP_FAILED {
            return Err(err("mmap memfd"));
        }

        let d = open_new(&path("D"), 0o604)?;
        sys::cvt(libc::fchmod(d, 0o604), "fchmod D")?;
        sys::cvt(libc::fchown(d, UID, GID), "fchown D")?;
        sys::write_all(d, b"deleted")?;
        set_times(d, D_ATIME, D_MTIME)?;
        let dc = sys::cpath(&path("D"))?;
        sys::cvt(libc::unlink(dc.as_ptr()), "unlink D")?;
        at(d, DELETED)?;

        let a = open_new(&path("A"), 0o644)?;
        let content: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        sys::write_all(a, &content)?;
        let (ac, bc) = (sys::cpath(&path("A"))?, sys::cpath(&path("B"))?);
        sys::cvt(libc::link(ac.as_ptr(), bc.as_ptr()), "link A B")?;
        sys::cvt(libc::unlink(ac.as_ptr()), "unlink A")?;
        sys::cvt(libc::ftruncate(a, 5000), "ftruncate A")?;
        at(a, LINKED)?;

        let r = open_new(&path("R"), 0o644)?;
        sys::write_all(r, b"regular")?;
        set_times(r, R_TIME, R_TIME)?;
        at(r, R)?;
        let mf = open_new(&path("M"), 0o644)?;
        sys::cvt(libc::ftruncate(mf, 8192), "ftruncate M")?;
        let mm = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ,
            libc::MAP_SHARED,
            mf,
            0,
        );
        if mm == libc::MAP_FAILED {
            return Err(err("mmap M"));
        }
        set_times(mf, R_TIME, R_TIME)?;
        libc::close(mf);
    }
    Ok(State {
        b: path("B"),
        m: path("M"),
        r: path("R"),
    })
}

/// Runs the memfd: its exit status, or the errno of execveat.
fn run_memfd() -> Result<i32, String> {
    // SAFETY: the workload is single-threaded; the child only calls execveat and _exit.
    unsafe {
        let child = libc::fork();
        if child < 0 {
            return Err(err("fork"));
        }
        if child == 0 {
            let argv = [c"script".as_ptr(), std::ptr::null()];
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            libc::syscall(
                libc::SYS_execveat,
                MEMFD,
                c"".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            libc::_exit(100 + sys::errno());
        }
        let mut st = 0;
        libc::waitpid(child, &mut st, 0);
        let code = libc::WEXITSTATUS(st);
        if code > 100 {
            return Err(format!(
                "execveat: {}",
                std::io::Error::from_raw_os_error(code - 100)
            ));
        }
        Ok(code)
    }
}

fn check(r: &mut Report, st: &State) {
    if let Some(m) = r.ok(sys::fstat(MEMFD)) {
        r.eq("memfd mode", 0o750, m.st_mode & 0o7777);
        r.eq("memfd owner", (UID, GID), (m.st_uid, m.st_gid));
    }
    r.eq("memfd runs (execveat)", Ok(7), run_memfd());
    if let Some(d) = r.ok(sys::fstat(DELETED)) {
        r.eq("deleted file mode", 0o604, d.st_mode & 0o7777);
        r.eq("deleted file owner", (UID, GID), (d.st_uid, d.st_gid));
        r.eq("deleted file mtime", D_MTIME, d.st_mtime);
        r.eq("deleted file atime", D_ATIME, d.st_atime);
        r.eq("deleted file links", 0, d.st_nlink as i64);
    }
    match (sys::fstat(LINKED), std::fs::metadata(&st.b)) {
        (Ok(f), Ok(b)) => {
            r.eq("fd 12 and B are one file", b.ino(), f.st_ino);
            r.eq("links", 1, f.st_nlink as i64);
            r.eq("size", 5000, f.st_size);
            // SAFETY: pwrite from a local byte.
            let n = unsafe { libc::pwrite(LINKED, b"Z".as_ptr().cast(), 1, 4000) };
            r.eq("pwrite through fd 12", 1, n);
            match std::fs::read(&st.b) {
                Ok(data) => {
                    r.eq("B's length", 5000, data.len());
                    r.eq(
                        "byte written through fd 12, read through B",
                        Some(&b'Z'),
                        data.get(4000),
                    );
                    r.eq(
                        "B's other bytes",
                        Some(&((4001 % 251) as u8)),
                        data.get(4001),
                    );
                }
                Err(e) => r.fail(format!("read B: {e}")),
            }
            // Put it back, so the check can be repeated.
            let orig = [(4000 % 251) as u8];
            // SAFETY: pwrite from a local byte.
            unsafe { libc::pwrite(LINKED, orig.as_ptr().cast(), 1, 4000) };
        }
        (f, b) => r.fail(format!("stat fd 12 / B: {:?} / {:?}", f.err(), b.err())),
    }
    for (what, p) in [("open file R", &st.r), ("mapped file M", &st.m)] {
        match std::fs::metadata(p) {
            Ok(m) => {
                r.eq(&format!("{what} mtime"), R_TIME, m.mtime());
                r.eq(&format!("{what} atime"), R_TIME, m.atime());
            }
            Err(e) => r.fail(format!("stat {what}: {e}")),
        }
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-fileattrs", &Spec::default());
    let st = setup(&mut ctx);
    let st = ctx.setup(st);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        ctx.respond(cmd, |r| check(r, &st));
    }
}
