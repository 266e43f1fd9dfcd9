//! What a new container process does to itself before it runs anything: join its cgroups,
//! set its host name, build its mount namespace and pivot into its root filesystem.
//!
//! The steps are prepared in the parent as a list of [`Op`]s holding only C strings and
//! numbers, so the child (forked from a process that may have other threads) runs raw system
//! calls without allocating. A failing step is reported as its index and errno.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;

/// One step, run in the child.
#[derive(Debug, Clone)]
pub enum Op {
    /// write(fd, bytes): joining a cgroup through its cgroup.procs ("0" is the writer).
    Write {
        fd: RawFd,
        bytes: Vec<u8>,
        what: String,
    },
    SetHostname(CString),
    Mount {
        source: CString,
        target: CString,
        fstype: CString,
        flags: libc::c_ulong,
        data: CString,
    },
    /// mkdir, EEXIST accepted.
    Mkdir {
        path: CString,
        mode: u32,
    },
    Mknod {
        path: CString,
        mode: u32,
        dev: u64,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// chdir(dir); pivot_root(".", "."); umount2(".", MNT_DETACH); chdir("/"): the old
    /// root is stacked under the new one and then detached.
    PivotRoot(CString),
}

impl Op {
    /// What the step does, for an error message.
    pub fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Write { what, .. } => what.clone(),
            Op::SetHostname(h) => format!("sethostname {}", s(h)),
            Op::Mount { fstype, target, .. } => format!("mount {} on {}", s(fstype), s(target)),
            Op::Mkdir { path, .. } => format!("mkdir {}", s(path)),
            Op::Mknod { path, .. } => format!("mknod {}", s(path)),
            Op::Symlink { link, .. } => format!("symlink {}", s(link)),
            Op::PivotRoot(dir) => format!("pivot_root into {}", s(dir)),
        }
    }

    /// Runs the step; the errno on failure.
    ///
    /// # Safety
    /// Only raw system calls on the op's own data; safe in a freshly forked child.
    pub unsafe fn run(&self) -> Result<(), i32> {
        // SAFETY: every pointer passed is to a NUL-terminated C string or a buffer owned by
        // the op, valid for the call; the calls only act on this process.
        let rc = unsafe {
            match self {
                Op::Write { fd, bytes, .. } => {
                    let n = libc::write(*fd, bytes.as_ptr().cast(), bytes.len());
                    if n == bytes.len() as isize {
                        0
                    } else {
                        -1
                    }
                }
                Op::SetHostname(h) => libc::sethostname(h.as_ptr(), h.as_bytes().len()),
                Op::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => {
                    let opt = |c: &CString| {
                        if c.as_bytes().is_empty() {
                            std::ptr::null()
                        } else {
                            c.as_ptr()
                        }
                    };
                    libc::mount(
                        opt(source),
                        target.as_ptr(),
                        opt(fstype),
                        *flags,
                        opt(data).cast(),
                    )
                }
                Op::Mkdir { path, mode } => {
                    let rc = libc::mkdir(path.as_ptr(), *mode);
                    if rc != 0 && *libc::__errno_location() == libc::EEXIST {
                        0
                    } else {
                        rc
                    }
                }
                Op::Mknod { path, mode, dev } => libc::mknod(path.as_ptr(), *mode, *dev),
                Op::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()),
                Op::PivotRoot(dir) => {
                    let dot = c".".as_ptr();
                    if libc::chdir(dir.as_ptr()) != 0
                        || libc::syscall(libc::SYS_pivot_root, dot, dot) != 0
                        || libc::umount2(dot, libc::MNT_DETACH) != 0
                    {
                        -1
                    } else {
                        libc::chdir(c"/".as_ptr())
                    }
                }
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: reads this thread's errno.
            Err(unsafe { *libc::__errno_location() })
        }
    }
}

fn cstr(s: impl AsRef<[u8]>) -> CString {
    // Paths and names here never hold NUL: they come from Path/str the caller checked, and
    // a NUL is replaced rather than trusted.
    let bytes: Vec<u8> = s
        .as_ref()
        .iter()
        .map(|&b| if b == 0 { b'?' } else { b })
        .collect();
    CString::new(bytes).unwrap_or_default()
}

fn path_c(p: &Path) -> CString {
    cstr(p.as_os_str().as_encoded_bytes())
}

fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> Op {
    Op::Mount {
        source: cstr(source),
        target: path_c(target),
        fstype: cstr(fstype),
        flags,
        data: cstr(data),
    }
}

/// Device nodes of a container's /dev: (name, major, minor).
pub const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The mounts of a container's root filesystem, as `stasis run` makes them and restore
/// makes them again: (mount point, fstype).
pub const STANDARD_MOUNTS: [(&str, &str); 6] = [
    ("/proc", "proc"),
    ("/sys", "sysfs"),
    ("/dev", "tmpfs"),
    ("/dev/pts", "devpts"),
    ("/dev/shm", "tmpfs"),
    ("/dev/mqueue", "mqueue"),
];

/// The steps that build a container's mount namespace: the host's mounts made private (so
/// nothing propagates back), and with a root filesystem, the standard mounts under it and a
/// pivot into it. `proc` mounts a proc for the new PID namespace (the caller must be its
/// init, or a process in it); restore leaves it to the restored init.
pub fn mount_ops(rootfs: Option<&Path>, proc: bool) -> Vec<Op> {
    let mut ops = vec![mount(
        "",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )];
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let Some(root) = rootfs else {
        if proc {
            ops.push(mount(
                "proc",
                Path::new("/proc"),
                "proc",
                nosuid_nodev_noexec,
                "",
            ));
        }
        return ops;
    };
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    ops.push(mount(
        &root.to_string_lossy(),
        root,
        "",
        libc::MS_BIND | libc::MS_REC,
        "",
    ));
    for dir in ["proc", "sys", "dev"] {
        ops.push(Op::Mkdir {
            path: path_c(&at(dir)),
            mode: 0o755,
        });
    }
    if proc {
        ops.push(mount("proc", &at("proc"), "proc", nosuid_nodev_noexec, ""));
    }
    ops.push(mount(
        "sysfs",
        &at("sys"),
        "sysfs",
        nosuid_nodev_noexec | libc::MS_RDONLY,
        "",
    ));
    ops.push(mount(
        "tmpfs",
        &at("dev"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        "mode=755,size=65536k",
    ));
    for (name, major, minor) in DEVICES {
        ops.push(Op::Mknod {
            path: path_c(&at(&format!("dev/{name}"))),
            mode: libc::S_IFCHR | 0o666,
            dev: libc::makedev(major, minor),
        });
    }
    for dir in ["dev/pts", "dev/shm", "dev/mqueue"] {
        ops.push(Op::Mkdir {
            path: path_c(&at(dir)),
            mode: 0o755,
        });
    }
    ops.push(mount(
        "devpts",
        &at("dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    ));
    ops.push(mount(
        "shm",
        &at("dev/shm"),
        "tmpfs",
        nosuid_nodev_noexec,
        "mode=1777,size=65536k",
    ));
    ops.push(mount(
        "mqueue",
        &at("dev/mqueue"),
        "mqueue",
        nosuid_nodev_noexec,
        "",
    ));
    for (target, link) in [
        ("pts/ptmx", "dev/ptmx"),
        ("/proc/self/fd", "dev/fd"),
        ("/proc/self/fd/0", "dev/stdin"),
        ("/proc/self/fd/1", "dev/stdout"),
        ("/proc/self/fd/2", "dev/stderr"),
    ] {
        ops.push(Op::Symlink {
            target: cstr(target),
            link: path_c(&at(link)),
        });
    }
    ops.push(Op::PivotRoot(path_c(root)));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_rootfs_only_private_and_proc() {
        let ops = mount_ops(None, true);
        let d: Vec<String> = ops.iter().map(Op::describe).collect();
        assert_eq!(d, ["mount  on /", "mount proc on /proc"]);
        assert_eq!(mount_ops(None, false).len(), 1);
    }

    #[test]
    fn rootfs_mounts_everything_under_it_then_pivots() {
        let ops = mount_ops(Some(Path::new("/srv/c1")), false);
        let d: Vec<String> = ops.iter().map(Op::describe).collect();
        assert!(d.contains(&"mount sysfs on /srv/c1/sys".to_string()));
        assert!(d.contains(&"mknod /srv/c1/dev/null".to_string()));
        assert!(!d.iter().any(|s| s.starts_with("mount proc")));
        assert_eq!(
            d.last().map(String::as_str),
            Some("pivot_root into /srv/c1")
        );
        // Every mount but the first lands under the root filesystem.
        for op in &ops[1..] {
            if let Op::Mount { target, .. } = op {
                assert!(target.to_bytes().starts_with(b"/srv/c1"), "{op:?}");
            }
        }
        let with_proc = mount_ops(Some(Path::new("/srv/c1")), true);
        assert_eq!(with_proc.len(), ops.len() + 1);
    }
}
