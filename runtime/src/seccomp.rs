//! seccomp state of another task: its mode from /proc, its filters through ptrace.
//!
//! A task in seccomp mode runs every syscall through its filters, injected ones too; a
//! tracer that seizes it with PTRACE_O_SUSPEND_SECCOMP (CAP_SYS_ADMIN, a kernel with
//! CONFIG_CHECKPOINT_RESTORE) has them bypassed until it detaches. The filters themselves
//! are read back index by index with PTRACE_SECCOMP_GET_FILTER (0 is the newest).

use crate::error::{Result, RuntimeError};
use crate::procfs;
use std::io;

/// PTRACE_O_SUSPEND_SECCOMP.
pub const PTRACE_O_SUSPEND_SECCOMP: libc::c_int = 1 << 21;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_GET_SECCOMP_METADATA: libc::c_uint = 0x420d;
/// Most instructions one classic BPF program may have (the kernel's BPF_MAXINSNS).
pub const BPF_MAXINSNS: usize = 4096;
/// Size of one classic BPF instruction (struct sock_filter).
pub const INSN_SIZE: usize = 8;
/// SECCOMP_MODE_STRICT and SECCOMP_MODE_FILTER as /proc/PID/status reports them.
pub const MODE_STRICT: u32 = 1;
pub const MODE_FILTER: u32 = 2;
/// The only filter flag the kernel reports back (PTRACE_GET_SECCOMP_METADATA).
pub const SECCOMP_FILTER_FLAG_LOG: u64 = 1 << 1;

/// A thread's seccomp mode (0 none, 1 strict, 2 filter) and its number of filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    pub mode: u32,
    pub filters: u32,
}

/// Parses the `Seccomp:` and `Seccomp_filters:` lines of a /proc status text.
pub fn parse_mode(text: &str) -> Mode {
    let mut m = Mode::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().parse().unwrap_or(0);
        match key {
            "Seccomp" => m.mode = value,
            "Seccomp_filters" => m.filters = value,
            _ => {}
        }
    }
    m
}

/// The seccomp mode of thread `tid` of process `pid`.
pub fn mode(pid: i32, tid: i32) -> Result<Mode> {
    Ok(parse_mode(&procfs::read_text(&format!(
        "/proc/{pid}/task/{tid}/status"
    ))?))
}

/// One filter of a thread: its classic BPF program (struct sock_filter array, raw) and the
/// flags it was installed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub insns: Vec<u8>,
    pub flags: u64,
}

#[repr(C)]
struct Metadata {
    filter_off: u64,
    flags: u64,
}

/// The filters of a stopped tracee, oldest first (the order they were installed in).
pub fn filters(tid: i32) -> Result<Vec<Filter>> {
    let mut out = Vec::new();
    for index in 0..=crate::seccomp::MAX_FILTERS {
        // SAFETY: a null data pointer asks only for the program's length.
        let rc = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER as _,
                tid,
                index,
                std::ptr::null_mut::<u8>(),
            )
        };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(RuntimeError::sys(
                "ptrace(PTRACE_SECCOMP_GET_FILTER)",
                format!("thread {tid}, filter {index}"),
                e,
            ));
        }
        let n = rc as usize;
        if n == 0 || n > BPF_MAXINSNS {
            return Err(RuntimeError::Protocol {
                op: "ptrace(PTRACE_SECCOMP_GET_FILTER)",
                pid: tid,
                what: format!("filter {index} has {n} instructions"),
            });
        }
        let mut insns = vec![0u8; n * INSN_SIZE];
        // SAFETY: insns has room for the n instructions the kernel reported.
        let rc = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER as _,
                tid,
                index,
                insns.as_mut_ptr(),
            )
        };
        if rc < 0 || rc as usize != n {
            return Err(RuntimeError::sys(
                "ptrace(PTRACE_SECCOMP_GET_FILTER)",
                format!("thread {tid}, filter {index}"),
                io::Error::last_os_error(),
            ));
        }
        let mut meta = Metadata {
            filter_off: index as u64,
            flags: 0,
        };
        // SAFETY: addr is the size of the struct, data points to it; the kernel reads
        // filter_off and writes flags.
        let rc = unsafe {
            libc::ptrace(
                PTRACE_GET_SECCOMP_METADATA as _,
                tid,
                std::mem::size_of::<Metadata>(),
                &mut meta as *mut Metadata,
            )
        };
        if rc < 0 {
            return Err(RuntimeError::sys(
                "ptrace(PTRACE_GET_SECCOMP_METADATA)",
                format!("thread {tid}, filter {index}"),
                io::Error::last_os_error(),
            ));
        }
        out.push(Filter {
            insns,
            flags: meta.flags,
        });
    }
    if out.len() > MAX_FILTERS {
        return Err(RuntimeError::Unsupported(format!(
            "thread {tid} has more than {MAX_FILTERS} seccomp filters"
        )));
    }
    out.reverse();
    Ok(out)
}

/// Most filters one thread may have in an image (the kernel's own bound is the total
/// length, MAX_INSNS_PER_PATH = 32768 instructions, so at most 32768 one-instruction ones).
pub const MAX_FILTERS: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mode() {
        let m = parse_mode("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t3\nSpeculation_Store_Bypass:\tthread vulnerable\n");
        assert_eq!(
            m,
            Mode {
                mode: 2,
                filters: 3
            }
        );
        assert_eq!(parse_mode("Name:\tx\n"), Mode::default());
    }
}
